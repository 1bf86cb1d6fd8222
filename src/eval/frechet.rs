//! The Fréchet distance between two Gaussians fitted to feature sets, with pytorch-fid's rules
//! (`calculate_frechet_distance`, LOSSES.md §7), in f64:
//! `FID = ‖μ₁ − μ₂‖² + tr Σ₁ + tr Σ₂ − 2 tr √(Σ₁Σ₂)`.
//!
//! scipy's `sqrtm` (a Schur method) is replaced by the symmetric form
//! `tr √(Σ₁Σ₂) = Σᵢ √λᵢ(Σ₁^½ Σ₂ Σ₁^½)` (eigenvalues clipped at 0), which agrees with it to ~1e-9
//! relative on well-posed inputs. pytorch-fid adds `eps·I` to both covariances when `sqrtm` returns
//! non-finite values; the Schur recurrence divides by `√t_ii + √t_jj`, which is zero exactly when the
//! product has two eigenvalues that are exactly zero, so that is when the offset is applied here.
use anyhow::{bail, Result};
use tch::{Device, Kind, Tensor};

/// pytorch-fid's default `eps`.
pub const FID_EPS: f64 = 1e-6;

/// Mean `[d]` and covariance `[d, d]` (ddof 1, `np.cov(rowvar=False)`) of a feature set, in f64.
#[derive(Debug)]
pub struct GaussianStats {
    pub mu: Tensor,
    pub sigma: Tensor,
}

impl GaussianStats {
    /// Statistics of `features [n, d]` (n ≥ 2), as pytorch-fid's `calculate_activation_statistics`.
    pub fn from_features(features: &Tensor) -> Result<Self> {
        let x = features.to_kind(Kind::Double).to_device(Device::Cpu);
        let n = match x.size()[..] {
            [n, _] if n >= 2 => n,
            ref s => bail!("need features [n >= 2, d] for a covariance, got {s:?}"),
        };
        let mu = x.mean_dim(0, false, Kind::Double);
        let centred = &x - &mu;
        let sigma = centred.tr().matmul(&centred) / (n - 1) as f64;
        Ok(Self { mu, sigma })
    }
}

/// The Fréchet distance and how it was computed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Frechet {
    pub fid: f64,
    /// `‖μ₁ − μ₂‖²`.
    pub diff_sq: f64,
    /// `tr √(Σ₁Σ₂)` (with the offset when `eps_branch`).
    pub trace_covmean: f64,
    /// Whether the product was singular and `eps·I` was added (pytorch-fid's fallback).
    pub eps_branch: bool,
}

/// `calculate_frechet_distance(mu1, sigma1, mu2, sigma2, eps)`.
pub fn frechet_distance(a: &GaussianStats, b: &GaussianStats, eps: f64) -> Result<Frechet> {
    let d = a.mu.size()[0];
    if a.sigma.size() != [d, d] || b.mu.size() != [d] || b.sigma.size() != [d, d] {
        bail!(
            "statistics disagree in dimension: mu {:?}/{:?}, sigma {:?}/{:?}",
            a.mu.size(),
            b.mu.size(),
            a.sigma.size(),
            b.sigma.size()
        );
    }
    let (s1, s2) = (a.sigma.to_kind(Kind::Double), b.sigma.to_kind(Kind::Double));
    let diff = a.mu.to_kind(Kind::Double) - b.mu.to_kind(Kind::Double);
    let diff_sq = diff.dot(&diff).double_value(&[]);
    let eps_branch = exactly_singular(&s1.matmul(&s2));
    let (s1o, s2o) = if eps_branch {
        let offset = Tensor::eye(d, (Kind::Double, Device::Cpu)) * eps;
        (&s1 + &offset, &s2 + &offset)
    } else {
        (s1.shallow_clone(), s2.shallow_clone())
    };
    let trace_covmean = trace_sqrt_product(&s1o, &s2o);
    let trace = |s: &Tensor| s.trace().double_value(&[]);
    let fid = diff_sq + trace(&s1) + trace(&s2) - 2.0 * trace_covmean;
    Ok(Frechet { fid, diff_sq, trace_covmean, eps_branch })
}

/// Whether `m` has two eigenvalues that are exactly zero (or any non-finite one): the case in which
/// a Schur-method `sqrtm` divides by zero and pytorch-fid falls back to the offset.
fn exactly_singular(m: &Tensor) -> bool {
    let ev = m.linalg_eigvals().abs();
    let zeros = ev.eq(0.0).sum(Kind::Int64).int64_value(&[]);
    let finite = ev.isfinite().all().int64_value(&[]) == 1;
    zeros >= 2 || !finite
}

/// `tr √(Σ₁Σ₂) = Σ √λ(Σ₁^½ Σ₂ Σ₁^½)`. Eigenvalues below the round-off level `d·ε·λ_max` are set to
/// zero: they are noise of a rank-deficient product (fewer samples than dimensions), and their square
/// roots would otherwise add up to a visible bias (e.g. a negative FID between identical small sets).
fn trace_sqrt_product(s1: &Tensor, s2: &Tensor) -> f64 {
    let (values, vectors) = s1.linalg_eigh("L");
    let root = (&vectors * values.clamp_min(0.0).sqrt().unsqueeze(0)).matmul(&vectors.tr());
    let inner = root.matmul(s2).matmul(&root);
    let inner = (&inner + inner.tr()) / 2.0;
    let eigenvalues = inner.linalg_eigvalsh("L");
    let noise = eigenvalues.abs().max().double_value(&[]) * eigenvalues.size()[0] as f64 * f64::EPSILON;
    let signal = eigenvalues.where_scalarother(&eigenvalues.gt(noise), 0.0);
    signal.sqrt().sum(Kind::Double).double_value(&[])
}
