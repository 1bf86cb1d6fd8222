//! What every trainer's step shares: the seed of a step's random draws, and the guarded backward
//! pass between a step's loss and its update (finite check over the ranks, backward with gradients
//! averaged over the ranks, gradient-norm clipping).
use super::optim::clip_grad_norm;
use super::profile::StepProfile;
use crate::dist::DataParallel;
use anyhow::Result;
use std::time::Instant;
use tch::Tensor;

/// The seed of step `step`'s random draws (batch subsets, crops, masks, drop-path, noise): a function
/// of the run seed and the step only (SplitMix64 of both), so a resumed run draws exactly what the
/// uninterrupted one did.
pub fn step_seed(seed: u64, step: u64) -> u64 {
    let mut z = seed ^ step.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The middle of a training step. When `mean_loss` (the scalar `loss` averaged over the ranks, so
/// that every rank decides alike) is finite: the backward pass of `loss` into `params` with the
/// gradients averaged over the ranks, then gradient-norm clipping at `max_norm` (≤ 0: the norm is
/// measured, nothing clipped). Returns the gradient norm; it is NaN when the loss was not finite, and
/// a non-finite norm tells the caller to skip its update. With `profile`, records the phases
/// "backward" and "clip grad".
pub fn guarded_backward(
    loss: &Tensor,
    mean_loss: f64,
    params: &[Tensor],
    max_norm: f64,
    dp: &DataParallel,
    mut profile: Option<&mut StepProfile>,
) -> Result<f64> {
    if !mean_loss.is_finite() {
        return Ok(f64::NAN);
    }
    let mut t = Instant::now();
    dp.backward(loss, params)?;
    if let Some(p) = profile.as_deref_mut() {
        p.lap("backward", &mut t);
    }
    let grad_norm = clip_grad_norm(params, if max_norm > 0.0 { max_norm } else { f64::INFINITY });
    if let Some(p) = profile {
        p.lap("clip grad", &mut t);
    }
    Ok(grad_norm)
}
