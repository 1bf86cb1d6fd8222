//! Flow-matching transport for the LightningDiT (docs/design.md §5.4 "Flow-matching objective", §8.7; LightningDiT
//! `transport/` with the VTP settings `create_transport("Linear", "velocity", None, None, None,
//! use_cosine_loss=True, use_lognorm=True)`).
//!
//! Linear path with **t = 0 noise, t = 1 data** (ICPlan `alpha_t = t`, `sigma_t = 1 - t`):
//! `x_t = t·x1 + (1 - t)·x0`, `x0 ~ N(0, I)`, target velocity `u = x1 - x0`. Per-sample loss
//! `mse = mean_{C,H,W}((v - u)²)` and `cos = mean_{H,W}(1 - cos_sim_C(v, u))` (cosine along the channel dim,
//! eps 1e-8); `total = mean_B(cos) + mean_B(mse)` (what `train.py` backpropagates). Training times are
//! logit-normal `t = sigmoid(mu + sigma·N(0, 1))` or uniform `U[0, 1)`; `train_eps = 0`, so no clipping.
//! The model receives the raw `t ∈ (0, 1)`.
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

/// Cosine-similarity eps of the cosine term (`F.cosine_similarity` default, `1e-8`).
pub const COSINE_EPS: f64 = 1e-8;

/// How training times `t ∈ (0, 1)` are drawn (LightningDiT `Transport.sample`).
///
/// In a TOML config: `{ kind = "uniform" }` or `{ kind = "logit-normal", mu = 0.0, sigma = 1.0 }` (`mu`
/// defaults to 0, `sigma` to 1). The default is logit-normal (0, 1): what the official LightningDiT
/// `train.py`/`transport` does, because it never reads the VTP configs' `lognorm_mu`/`lognorm_sigma`
/// (fixtures LOSSES.md §8). The values VTP's configs state — (−0.5, 1.25) for VTP-S/B and (−0.75, 1.0) for
/// VTP-L — are [`TimeSampling::VTP_S_B_STATED`] and [`TimeSampling::VTP_L_STATED`].
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum TimeSampling {
    /// `t ~ U[0, 1)` (`use_lognorm: false`). (serde ignores extra keys beside `kind` on this variant.)
    Uniform,
    /// `t = sigmoid(n)`, `n ~ N(mu, sigma²)` (`use_lognorm: true`).
    LogitNormal {
        /// Mean of the normal before the sigmoid.
        #[serde(default)]
        mu: f64,
        /// Standard deviation of the normal before the sigmoid.
        #[serde(default = "one")]
        sigma: f64,
    },
}

fn one() -> f64 {
    1.0
}

impl TimeSampling {
    /// Logit-normal (0, 1): what the official code samples (the default).
    pub const OFFICIAL: TimeSampling = TimeSampling::LogitNormal { mu: 0.0, sigma: 1.0 };
    /// Logit-normal (−0.5, 1.25), stated by `train_vtp_{s,b}_dit_xl.yaml` (not read by the official code).
    pub const VTP_S_B_STATED: TimeSampling = TimeSampling::LogitNormal { mu: -0.5, sigma: 1.25 };
    /// Logit-normal (−0.75, 1.0), stated by `train_vtp_l_dit_xl.yaml` (not read by the official code).
    pub const VTP_L_STATED: TimeSampling = TimeSampling::LogitNormal { mu: -0.75, sigma: 1.0 };
}

impl Default for TimeSampling {
    /// [`TimeSampling::OFFICIAL`].
    fn default() -> Self {
        TimeSampling::OFFICIAL
    }
}

/// `n` training times (f32 `[n]`) on `device`, drawn from torch's generator for that device (callers seed
/// it): logit-normal `sigmoid(mu + sigma·randn(n))` or uniform `rand(n)` ∈ `[0, 1)`. With (0, 1) this is
/// exactly `torch.sigmoid(torch.randn(n))` of the reference `fm_loss`.
pub fn sample_t(n: i64, sampling: &TimeSampling, device: Device) -> Tensor {
    match *sampling {
        TimeSampling::Uniform => Tensor::rand([n], (Kind::Float, device)),
        TimeSampling::LogitNormal { mu, sigma } => (Tensor::randn([n], (Kind::Float, device)) * sigma + mu).sigmoid(),
    }
}

/// `t` `[B]` viewed as `[B, 1, …, 1]` to broadcast against `like` (LightningDiT `expand_t_like_x`).
pub fn expand_t_like(t: &Tensor, like: &Tensor) -> Tensor {
    let mut shape = vec![-1i64];
    shape.resize(like.dim(), 1);
    t.view(shape.as_slice())
}

/// The linear path at `t` `[B]`: `(x_t, u_t) = (t·x1 + (1 - t)·x0, x1 - x0)` (ICPlan `compute_mu_t` /
/// `compute_ut`, same operation order, so bit-identical to the reference).
pub fn interpolate(x0: &Tensor, x1: &Tensor, t: &Tensor) -> (Tensor, Tensor) {
    let tb = expand_t_like(t, x1);
    let xt = &tb * x1 + tb.rsub_scalar(1.0) * x0;
    (xt, x1 - x0)
}

/// The flow-matching loss terms of one batch.
#[derive(Debug)]
pub struct FlowLoss {
    /// `mean_B(mse_per_sample)` (what `train.py` logs as the loss).
    pub mse: Tensor,
    /// `mean_B(cos_per_sample)`.
    pub cos: Tensor,
    /// What is backpropagated: `cos + mse` with the cosine term, `mse` without.
    pub total: Tensor,
    /// `mean_{C,H,W}((pred - u)²)`, `[B]`.
    pub mse_per_sample: Tensor,
    /// `mean_{H,W}(1 - cos_sim_C(pred, u))`, `[B]` (computed even when not part of `total`).
    pub cos_per_sample: Tensor,
}

/// Per-sample velocity MSE, `mean` over every dim but the batch of `(pred - ut)²` (`mean_flat`).
pub fn mse_per_sample(pred: &Tensor, ut: &Tensor) -> Tensor {
    let dims: Vec<i64> = (1..pred.dim() as i64).collect();
    (pred - ut).square().mean_dim(dims.as_slice(), false, None::<Kind>)
}

/// Per-sample cosine loss: `1 - F.cosine_similarity(pred, ut, dim=1, eps=1e-8)` (channel dim), averaged over
/// the spatial dims.
pub fn cos_per_sample(pred: &Tensor, ut: &Tensor) -> Tensor {
    let dims: Vec<i64> = (1..pred.dim() as i64 - 1).collect();
    let cos = Tensor::cosine_similarity(pred, ut, 1, COSINE_EPS).rsub_scalar(1.0);
    cos.mean_dim(dims.as_slice(), false, None::<Kind>)
}

/// [`FlowLoss`] of a velocity prediction `pred` against the target `ut` (`[B, C, H, W]`):
/// `total = mean(cos) + mean(mse)` when `use_cosine`, else `mean(mse)` (LightningDiT `training_losses`
/// reduced as `train.py` does).
pub fn loss(pred: &Tensor, ut: &Tensor, use_cosine: bool) -> FlowLoss {
    let mse_per_sample = mse_per_sample(pred, ut);
    let cos_per_sample = cos_per_sample(pred, ut);
    let mse = mse_per_sample.mean(None::<Kind>);
    let cos = cos_per_sample.mean(None::<Kind>);
    let total = if use_cosine { &cos + &mse } else { mse.shallow_clone() };
    FlowLoss { mse, cos, total, mse_per_sample, cos_per_sample }
}

/// One training loss: [`interpolate`] `x0` (noise) and `x1` (data) at `t` `[B]`, call
/// `velocity(x_t, t)` (the model with its labels bound), and take the [`loss`] against `u = x1 - x0`.
pub fn training_loss(
    velocity: impl FnOnce(&Tensor, &Tensor) -> Tensor,
    x1: &Tensor,
    x0: &Tensor,
    t: &Tensor,
    use_cosine: bool,
) -> FlowLoss {
    let (xt, ut) = interpolate(x0, x1, t);
    let pred = velocity(&xt, t);
    loss(&pred, &ut, use_cosine)
}
