//! Reconstruction loss `L_rec = L1 + LPIPS (+ w_2·L2)` (docs/design.md §4.1; the trainer applies `λ_rec = 0.1`).
//!
//! The model's inputs and outputs are ImageNet-normalised. `L1 = mean |x - x'|` and `L2 = mean (x - x')²`
//! are taken on those normalised tensors, as the model sees them; LPIPS-VGG ([`Lpips`]) is taken on the
//! images mapped to `[-1, 1]` (`2 · (x · std + mean) - 1`, not clamped, so every pixel keeps its gradient)
//! and averaged over the batch. Without the LPIPS weights the LPIPS term is absent.
//!
//! The L2 term is vtp-rs's, not the paper's (`loss.l2_weight`, 0 in the paper's presets): trained on L1
//! alone, a tiny tokenizer stalls at the patch-mean solution (every 16×16 patch its mean colour) and cannot
//! even memorise 16 images, because L1's gradient weighs a pixel's sign, not its error, so the few
//! high-contrast object pixels pull no harder than the background's noise; the squared error lets them
//! (README "Pre-training", the overfit test).
use crate::eval::lpips::Lpips;
use crate::eval::recon::unnormalise;
use anyhow::Result;
use tch::{Device, Reduction, Tensor};

/// The terms of one reconstruction loss evaluation (scalars, differentiable w.r.t. the reconstruction).
#[derive(Debug)]
pub struct ReconTerms {
    /// Mean absolute difference of the normalised tensors.
    pub l1: Tensor,
    /// Mean squared difference of the normalised tensors, when its weight is not zero.
    pub l2: Option<Tensor>,
    /// Batch mean of LPIPS, when the LPIPS weights are loaded.
    pub lpips: Option<Tensor>,
    /// `l1 + lpips + l2_weight · l2` (the absent terms left out).
    pub total: Tensor,
}

/// `L_rec` with an optional frozen LPIPS network and an optional weighted L2 term.
#[derive(Debug)]
pub struct ReconLoss {
    lpips: Option<Lpips>,
    l2_weight: f64,
}

impl ReconLoss {
    /// The loss with the given LPIPS network (`None`: no LPIPS term) and no L2 term.
    pub fn new(lpips: Option<Lpips>) -> Self {
        Self { lpips, l2_weight: 0.0 }
    }

    /// The same loss with an L2 term of weight `weight` (0 = none).
    pub fn with_l2(self, weight: f64) -> Self {
        Self { l2_weight: weight, ..self }
    }

    /// The loss with LPIPS from [`Lpips::load_default`]; when the weights cannot be loaded, no LPIPS term and a
    /// one-line note saying why.
    pub fn load_default(device: Device) -> (Self, Option<String>) {
        match Lpips::load_default(device) {
            Ok(lpips) => (Self::new(Some(lpips)), None),
            Err(e) => (Self::new(None), Some(format!("no LPIPS term in the reconstruction loss: {e:#}"))),
        }
    }

    /// Whether the LPIPS term is computed.
    pub fn has_lpips(&self) -> bool {
        self.lpips.is_some()
    }

    /// `L_rec` between ImageNet-normalised `[B, 3, H, W]` images (LPIPS needs `H, W ≥ 16`); gradients flow to
    /// both inputs, never to the LPIPS weights. Errors only on shapes LPIPS rejects.
    pub fn forward(&self, target: &Tensor, reconstruction: &Tensor) -> Result<ReconTerms> {
        let l1 = reconstruction.l1_loss(target, Reduction::Mean);
        let lpips = match &self.lpips {
            Some(net) => Some(net.forward(&to_lpips_range(target), &to_lpips_range(reconstruction))?.mean(None)),
            None => None,
        };
        let total = match &lpips {
            Some(p) => &l1 + p,
            None => l1.shallow_clone(),
        };
        let l2 = (self.l2_weight != 0.0).then(|| reconstruction.mse_loss(target, Reduction::Mean));
        let total = match &l2 {
            Some(l2) => total + l2 * self.l2_weight,
            None => total,
        };
        Ok(ReconTerms { l1, l2, lpips, total })
    }
}

/// ImageNet-normalised images to LPIPS' `[-1, 1]` range: `2 · (x · std + mean) - 1`, unclamped.
fn to_lpips_range(x: &Tensor) -> Tensor {
    unnormalise(x) * 2 - 1
}
