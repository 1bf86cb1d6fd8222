//! The exponential moving average of a set of weights, shared by the DINO teacher (docs/design.md §4.4) and the
//! DiT's EMA (docs/design.md §5.4, `update_ema`).

use tch::Tensor;

/// `θ_ema ← m·θ_ema + (1 − m)·θ` for each `(θ_ema, θ)` pair, in place and without gradients, rounded
/// as `mul_(m)` then ATen's fused `add_(θ, alpha = 1 − m)` (DINOv2's `_foreach_add_`, LightningDiT's
/// `update_ema`): `addcmul_` with a 0-dim `α` is that one rounding bit for bit; `θ_ema + (α·θ)` would
/// round twice.
pub fn ema_update<'a>(pairs: impl IntoIterator<Item = (Tensor, &'a Tensor)>, momentum: f64) {
    tch::no_grad(|| {
        let alpha = Tensor::from((1.0 - momentum) as f32);
        for (mut target, source) in pairs {
            let _ = target.g_mul_scalar_(momentum);
            let _ = target.addcmul_(source, &alpha.to_device(source.device()));
        }
    })
}
