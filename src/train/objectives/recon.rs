//! Reconstruction loss `L_rec = L1 + LPIPS` with unit weights inside (spec §4.1; the trainer applies
//! `λ_rec = 0.1`).
//!
//! The model's inputs and outputs are ImageNet-normalised. `L1 = mean |x - x'|` is taken on those normalised
//! tensors, as the model sees them; LPIPS-VGG ([`Lpips`]) is taken on the images mapped to `[-1, 1]`
//! (`2 · (x · std + mean) - 1`, not clamped, so every pixel keeps its gradient) and averaged over the batch.
//! Without the LPIPS weights the loss is L1 only.
use crate::eval::lpips::Lpips;
use crate::eval::recon::unnormalise;
use anyhow::Result;
use tch::{Device, Reduction, Tensor};

/// The terms of one reconstruction loss evaluation (scalars, differentiable w.r.t. the reconstruction).
#[derive(Debug)]
pub struct ReconTerms {
    /// Mean absolute difference of the normalised tensors.
    pub l1: Tensor,
    /// Batch mean of LPIPS, when the LPIPS weights are loaded.
    pub lpips: Option<Tensor>,
    /// `l1 + lpips` (or `l1` alone).
    pub total: Tensor,
}

/// `L_rec` with an optional frozen LPIPS network.
#[derive(Debug)]
pub struct ReconLoss {
    lpips: Option<Lpips>,
}

impl ReconLoss {
    /// The loss with the given LPIPS network (`None`: L1 only).
    pub fn new(lpips: Option<Lpips>) -> Self {
        Self { lpips }
    }

    /// The loss with LPIPS from [`Lpips::load_default`]; when the weights cannot be loaded, L1 only and a
    /// one-line note saying why.
    pub fn load_default(device: Device) -> (Self, Option<String>) {
        match Lpips::load_default(device) {
            Ok(lpips) => (Self::new(Some(lpips)), None),
            Err(e) => (Self::new(None), Some(format!("reconstruction loss is L1 only (no LPIPS): {e:#}"))),
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
        Ok(ReconTerms { l1, lpips, total })
    }
}

/// ImageNet-normalised images to LPIPS' `[-1, 1]` range: `2 · (x · std + mean) - 1`, unclamped.
fn to_lpips_range(x: &Tensor) -> Tensor {
    unnormalise(x) * 2 - 1
}
