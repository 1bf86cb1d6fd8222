//! DINO self-distillation on CLS tokens (docs/design.md §4.4; DINOv2 `dinov2/loss/dino_clstoken_loss.py::DINOLoss` and
//! the composition in `dinov2/train/ssl_meta_arch.py::forward_backward`).
//!
//! Cross-entropy between teacher targets `t` and student logits `s`:
//! `H(t, s) = -mean_rows(Σ_k t_k · log_softmax(s / T_s)_k)`, summed over every (student chunk, teacher chunk)
//! pair. Teacher targets are either *centred* `softmax((t - c) / T_t)` with the EMA centre
//! `c ← m·c + (1 - m)·mean_rows(t)` (updated after use), or *Sinkhorn–Knopp* normalised (3 iterations, no
//! centre). The centring and Sinkhorn helpers here are shared with the iBOT patch loss ([`super::ibot`]).
use crate::dist::DataParallel;
use anyhow::Result;
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

/// DINOv2's `loss_scales = 2` ("since we process global crops together"), the factor of the global DINO term
/// and of the iBOT term.
pub const LOSS_SCALES: i64 = 2;

/// DINOv2's Sinkhorn–Knopp iteration count (`n_iterations=3`).
pub const SINKHORN_ITERATIONS: i64 = 3;

/// How teacher logits become targets (DINOv2 `cfg.train.centering`: `"centering"` or `"sinkhorn_knopp"`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TeacherCentering {
    /// `softmax((t - center) / T_t)` with an EMA centre (the DINOv2 default).
    #[default]
    Centering,
    /// [`sinkhorn_knopp_teacher`] with [`SINKHORN_ITERATIONS`] iterations; no centre.
    SinkhornKnopp,
}

/// `softmax((teacher - center) / teacher_temp, -1)` without autograd (DINOv2 `softmax_center_teacher`).
pub(crate) fn softmax_centered(teacher_logits: &Tensor, center: &Tensor, teacher_temp: f64) -> Tensor {
    tch::no_grad(|| ((teacher_logits - center) / teacher_temp).softmax(-1, Kind::Float))
}

/// DINOv2 `apply_center_update`: `center · m + (batch_sum / count) · (1 - m)`, without autograd.
pub(crate) fn center_ema(center: &Tensor, batch_sum: &Tensor, count: i64, momentum: f64) -> Tensor {
    tch::no_grad(|| center * momentum + (batch_sum / count) * (1.0 - momentum))
}

/// DINOv2 `sinkhorn_knopp_teacher` (no autograd): `Q = exp(t / T_t)ᵀ` (`[K, rows]`, no max-subtraction, as the
/// reference), `Q /= ΣQ`, then `n_iterations` times `Q /= rowsum(Q); Q /= K; Q /= colsum(Q); Q /= B`, and
/// `(Q · B)ᵀ` (each row sums to 1). `n_samples` is `B`: the global row count for DINO, the all-reduced
/// masked-patch count for iBOT (with one process, the number of rows of `teacher_logits`). Over several
/// processes (`dp`) the total and the per-prototype sums are all-reduced, as DINOv2's `dist.all_reduce`.
pub fn sinkhorn_knopp_teacher(
    teacher_logits: &Tensor,
    teacher_temp: f64,
    n_iterations: i64,
    n_samples: f64,
    dp: &DataParallel,
) -> Result<Tensor> {
    tch::no_grad(|| {
        let mut q = (teacher_logits.to_kind(Kind::Float) / teacher_temp).exp().tr();
        let n_prototypes = q.size()[0] as f64;
        let total = q.sum(None);
        dp.sum(&[total.shallow_clone()])?;
        q /= total;
        for _ in 0..n_iterations {
            let per_prototype = q.sum_dim_intlist(1, true, None);
            dp.sum(&[per_prototype.shallow_clone()])?;
            q /= per_prototype;
            q /= n_prototypes;
            q /= q.sum_dim_intlist(0, true, None);
            q /= n_samples;
        }
        q *= n_samples;
        Ok(q.tr())
    })
}

/// The two DINO terms as `ssl_meta_arch` composes them (before `dino_loss_weight`).
#[derive(Debug)]
pub struct DinoTerms {
    /// `dino_local_crops_loss`: local student crops vs every teacher global crop (zero without local crops).
    pub local: Tensor,
    /// `dino_global_crops_loss`: global student crops vs the swapped teacher crops.
    pub global: Tensor,
}

impl DinoTerms {
    /// `local + global`, the DINO part of the SSL loss (weight 1).
    pub fn total(&self) -> Tensor {
        &self.local + &self.global
    }
}

/// DINOv2 `DINOLoss`: the CLS-token cross-entropy and its teacher centre.
#[derive(Debug)]
pub struct DinoLoss {
    /// EMA centre of the teacher logits, `[1, K]`.
    pub center: Tensor,
    /// Student temperature `T_s` (0.1).
    pub student_temp: f64,
    /// Centre momentum `m` (0.9).
    pub center_momentum: f64,
}

impl DinoLoss {
    /// A loss over `out_dim` prototypes with a zero centre on `device`.
    pub fn new(out_dim: i64, student_temp: f64, center_momentum: f64, device: Device) -> Self {
        Self { center: Tensor::zeros([1, out_dim], (Kind::Float, device)), student_temp, center_momentum }
    }

    /// Centred, sharpened teacher targets `softmax((t - center) / teacher_temp)` with the current centre.
    pub fn softmax_center_teacher(&self, teacher_logits: &Tensor, teacher_temp: f64) -> Tensor {
        softmax_centered(teacher_logits, &self.center, teacher_temp)
    }

    /// Centre EMA over the rows of `teacher_logits` (`[rows, K]`) of every process: `batch_center =
    /// all_reduce(Σ_rows t) / (rows · world)`, then `center = center · m + batch_center · (1 - m)`.
    pub fn update_center(&mut self, teacher_logits: &Tensor, dp: &DataParallel) -> Result<()> {
        let batch_sum = tch::no_grad(|| teacher_logits.sum_dim_intlist(0, true, None));
        dp.sum(&[batch_sum.shallow_clone()])?;
        let rows = teacher_logits.size()[0] * dp.world() as i64;
        self.center = center_ema(&self.center, &batch_sum, rows, self.center_momentum);
        Ok(())
    }

    /// Targets for `teacher_logits` (`[n_global · B, K]`): centring uses the centre from before this batch
    /// and then updates it; Sinkhorn–Knopp uses `B = rows · world` and leaves the centre alone.
    pub fn teacher_targets(
        &mut self,
        teacher_logits: &Tensor,
        teacher_temp: f64,
        centering: TeacherCentering,
        dp: &DataParallel,
    ) -> Result<Tensor> {
        match centering {
            TeacherCentering::Centering => {
                let targets = self.softmax_center_teacher(teacher_logits, teacher_temp);
                self.update_center(teacher_logits, dp)?;
                Ok(targets)
            }
            TeacherCentering::SinkhornKnopp => {
                let rows = (teacher_logits.size()[0] * dp.world() as i64) as f64;
                sinkhorn_knopp_teacher(teacher_logits, teacher_temp, SINKHORN_ITERATIONS, rows, dp)
            }
        }
    }

    /// DINOv2 `DINOLoss.forward`: `Σ_s Σ_t -mean_rows(Σ_k t · log_softmax(s / T_s))` over every student chunk
    /// and every teacher chunk (each `[rows, K]`, the same row count).
    pub fn forward(&self, student_chunks: &[Tensor], teacher_chunks: &[Tensor]) -> Tensor {
        let mut terms = student_chunks.iter().flat_map(|s| {
            let lsm = (s / self.student_temp).log_softmax(-1, Kind::Float);
            teacher_chunks.iter().map(move |t| (t * &lsm).sum_dim_intlist(-1, false, None).mean(None))
        });
        let first = -terms.next().expect("at least one student and one teacher chunk");
        terms.fold(first, |total, term| total - term)
    }

    /// The local and global DINO terms of `ssl_meta_arch` for crop-major student logits (`student_global`
    /// `[n_global · B, K]`, `student_local` `[n_local · B, K]`) and the swapped teacher targets
    /// (`[n_global · B, K]`, teacher crop order reversed). With `n_local_terms = n_local · n_global` and
    /// `n_global_terms = (n_global - 1) · n_global`: `local = forward(local chunks, teacher chunks) /
    /// (n_global_terms + n_local_terms)` and `global = forward([student_global], [targets]) · 2 /
    /// (n_global_terms + n_local_terms)`; without local crops the local term is zero.
    pub fn dino_crops_loss(
        &self,
        student_global: &Tensor,
        student_local: &Tensor,
        teacher_targets: &Tensor,
        n_global_crops: i64,
        n_local_crops: i64,
    ) -> DinoTerms {
        let n_local_terms = n_local_crops * n_global_crops;
        let n_global_terms = (n_global_crops - 1) * n_global_crops;
        let n_terms = n_global_terms + n_local_terms;
        assert!(n_terms > 0, "DINO loss needs two global crops or some local crops");
        let local = if n_local_crops > 0 {
            let teacher_chunks = teacher_targets.chunk(n_global_crops, 0);
            self.forward(&student_local.chunk(n_local_crops, 0), &teacher_chunks) / n_terms
        } else {
            Tensor::zeros([], (Kind::Float, student_global.device()))
        };
        let pair = [teacher_targets.shallow_clone()];
        let global = self.forward(&[student_global.shallow_clone()], &pair) * LOSS_SCALES / n_terms;
        DinoTerms { local, global }
    }
}
