//! iBOT masked-image modelling on patch tokens (docs/design.md §4.4; DINOv2
//! `dinov2/loss/ibot_patch_loss.py::iBOTPatchLoss`, torch fallback without xformers, and its use in
//! `ssl_meta_arch.forward_backward`).
//!
//! Over the `M` masked patches of the global crops, with per-patch weights `w_i = 1 / max(masked count of its
//! image, 1)`: `L = -Σ_i w_i · Σ_k t_ik · log_softmax(s_i / T_s)_k / n_images`, where `n_images` is the number of
//! global-crop images (`masks.shape[0]`). Targets are centred with the iBOT centre (`[1, 1, K]`, EMA of the mean over the
//! masked patches) or Sinkhorn–Knopp normalised with `B` = the masked-patch count; both helpers are DINO's
//! ([`super::dino`]).
use super::dino::{
    center_ema, sinkhorn_knopp_teacher, softmax_centered, TeacherCentering, LOSS_SCALES, SINKHORN_ITERATIONS,
};
use crate::dist::DataParallel;
use anyhow::Result;
use tch::{Device, Kind, Tensor};

/// DINOv2 `iBOTPatchLoss`: the masked-patch cross-entropy and its teacher centre.
#[derive(Debug)]
pub struct IbotPatchLoss {
    /// EMA centre of the teacher patch logits, `[1, 1, K]`.
    pub center: Tensor,
    /// Student temperature `T_s` (0.1).
    pub student_temp: f64,
    /// Centre momentum `m` (0.9).
    pub center_momentum: f64,
}

impl IbotPatchLoss {
    /// A loss over `patch_out_dim` prototypes with a zero centre on `device`.
    pub fn new(patch_out_dim: i64, student_temp: f64, center_momentum: f64, device: Device) -> Self {
        Self { center: Tensor::zeros([1, 1, patch_out_dim], (Kind::Float, device)), student_temp, center_momentum }
    }

    /// Centred targets `softmax((t - center) / teacher_temp)` of the masked teacher patch logits (`[M, K]`),
    /// with the current centre: `[M, K]`.
    pub fn softmax_center_teacher(&self, teacher_masked: &Tensor, teacher_temp: f64) -> Tensor {
        softmax_centered(&teacher_masked.unsqueeze(0), &self.center, teacher_temp).squeeze_dim(0)
    }

    /// Centre EMA with the mean over the `M` masked patches (`[M, K]`). DINOv2 sees them as one `[1, M, K]`
    /// sequence: `batch_center = all_reduce(Σ_0 mean_1(h)) / (len(h) · world)` with `len(h) = 1` — the
    /// mean of the processes' means (their masked counts may differ). A process without masked patches
    /// (possible at a few images per process) has no mean: it is left out of the average (DINOv2's would
    /// be NaN and poison the centre for good), and when no process has any the centre stays.
    pub fn update_center(&mut self, teacher_masked: &Tensor, dp: &DataParallel) -> Result<()> {
        let [m, k] = teacher_masked.size()[..] else { anyhow::bail!("masked teacher logits must be [M, K]") };
        let batch_sum = match m {
            0 => Tensor::zeros([1, 1, k], (Kind::Float, teacher_masked.device())),
            _ => tch::no_grad(|| teacher_masked.unsqueeze(0).mean_dim(1, false, None).sum_dim_intlist(0, true, None)),
        };
        let with_patches = Tensor::from_slice(&[(m > 0) as i64 as f32]).to_device(teacher_masked.device());
        dp.sum(&[batch_sum.shallow_clone(), with_patches.shallow_clone()])?;
        let count = with_patches.double_value(&[0]).round() as i64;
        if count > 0 {
            self.center = center_ema(&self.center, &batch_sum, count, self.center_momentum);
        }
        Ok(())
    }

    /// Targets for the masked teacher patch logits (`[M, K]`): centring uses the centre from before this batch
    /// and then updates it; Sinkhorn–Knopp uses `B` = the masked-patch count of every process and leaves
    /// the centre alone.
    pub fn teacher_targets(
        &mut self,
        teacher_masked: &Tensor,
        teacher_temp: f64,
        centering: TeacherCentering,
        dp: &DataParallel,
    ) -> Result<Tensor> {
        match centering {
            TeacherCentering::Centering => {
                let targets = self.softmax_center_teacher(teacher_masked, teacher_temp);
                self.update_center(teacher_masked, dp)?;
                Ok(targets)
            }
            TeacherCentering::SinkhornKnopp => {
                let n_masked_patches = dp.mean(&[teacher_masked.size()[0] as f64])?[0] * dp.world() as f64;
                sinkhorn_knopp_teacher(teacher_masked, teacher_temp, SINKHORN_ITERATIONS, n_masked_patches, dp)
            }
        }
    }

    /// DINOv2 `forward_masked`: `-Σ_i w_i · Σ_k t_ik · log_softmax(s_i / T_s)_k / masks.shape[0]` for the masked
    /// student logits and targets (`[M, K]`, in `mask_indices_list` order), the masks (`[B, N]` bool) and the
    /// weights (`[M]`, `masks_weight` of the collate).
    pub fn forward_masked(
        &self,
        student_masked: &Tensor,
        targets: &Tensor,
        masks: &Tensor,
        masks_weight: &Tensor,
    ) -> Tensor {
        let lsm = (student_masked / self.student_temp).log_softmax(-1, Kind::Float);
        let loss = (targets * lsm).sum_dim_intlist(-1, false, None) * masks_weight;
        -loss.sum(None) / masks.size()[0]
    }

    /// `ibot_patch_loss` of `ssl_meta_arch`: [`Self::forward_masked`] `· loss_scales · (1 / n_global_crops)`
    /// (`loss_scales = 2`, so with two global crops it equals the raw loss).
    pub fn ibot_patch_loss(
        &self,
        student_masked: &Tensor,
        targets: &Tensor,
        masks: &Tensor,
        masks_weight: &Tensor,
        n_global_crops: i64,
    ) -> Tensor {
        let ibot_loss_scale = 1.0 / n_global_crops as f64;
        self.forward_masked(student_masked, targets, masks, masks_weight) * LOSS_SCALES * ibot_loss_scale
    }
}
