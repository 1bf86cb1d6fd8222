//! Per-channel latent statistics (docs/design.md §5.4): the DiT trains on `z = (latent − mean)/std` and samples
//! are mapped back by `latent = x·std + mean` before decoding. They travel with the latent cache, every
//! DiT checkpoint and every exported DiT, so training and sampling apply them exactly once; forgetting
//! them collapses FID (a recurring LightningDiT issue).
use super::released_stats::RELEASED;
use crate::io::{read_safetensors_map, write_safetensors};
use anyhow::{bail, Context, Result};
use std::collections::HashMap;
use std::path::Path;
use tch::{Kind, Tensor};

/// Per-channel `mean` and `std`, `[C]` f32.
#[derive(Debug)]
pub struct LatentStats {
    pub mean: Tensor,
    pub std: Tensor,
}

impl Clone for LatentStats {
    fn clone(&self) -> Self {
        Self { mean: self.mean.copy(), std: self.std.copy() }
    }
}

/// Names of the released statistics ([`LatentStats::released`]).
pub const RELEASED_NAMES: [&str; 3] = ["vtp-s", "vtp-b", "vtp-l"];

impl LatentStats {
    /// Mean and **unbiased** std per channel over (N, H, W) of `latents` `[N, C, H, W]`, in f64 and
    /// stored as f32, as `ImgLatentDataset` computes them (it draws 10,000 random latents; this uses
    /// every non-flipped latent it is given).
    pub fn compute(latents: &Tensor) -> Result<Self> {
        let (n, c, h, w) = latents.size4().context("latents must be [N, C, H, W]")?;
        if n * h * w < 2 {
            bail!("at least two latent positions are needed for an unbiased std (got {n}×{h}×{w})");
        }
        let flat = latents.to_kind(Kind::Double).permute([1, 0, 2, 3]).reshape([c, -1]);
        let mean = flat.mean_dim(1, false, None::<Kind>);
        let std = flat.std_correction(1, 1, false);
        Ok(Self { mean: mean.to_kind(Kind::Float), std: std.to_kind(Kind::Float) })
    }

    /// The released statistics of `vtp-s`, `vtp-b` or `vtp-l` (docs/design.md §5.4).
    pub fn released(name: &str) -> Result<Self> {
        let (_, mean, std) = RELEASED.iter().find(|(n, _, _)| *n == name).with_context(|| {
            format!("unknown released latent statistics '{name}' (expected one of {})", RELEASED_NAMES.join(", "))
        })?;
        Ok(Self { mean: Tensor::from_slice(mean), std: Tensor::from_slice(std) })
    }

    /// Number of channels.
    pub fn channels(&self) -> i64 {
        self.mean.size()[0]
    }

    /// `(z − mean)/std` over the channel dim of `z` `[B, C, H, W]`.
    pub fn normalise(&self, z: &Tensor) -> Tensor {
        let (mean, std) = self.broadcast(z);
        (z - mean) / std
    }

    /// `x·std + mean`: a normalised sample back to the tokenizer's latent space (the reference's
    /// `samples * std / latent_multiplier + mean` with multiplier 1).
    pub fn denormalise(&self, x: &Tensor) -> Tensor {
        let (mean, std) = self.broadcast(x);
        x * std + mean
    }

    /// Mean and std shaped `[1, C, 1, 1]` on `like`'s device.
    fn broadcast(&self, like: &Tensor) -> (Tensor, Tensor) {
        let shape = [1, self.channels(), 1, 1];
        (self.mean.view(shape).to_device(like.device()), self.std.view(shape).to_device(like.device()))
    }

    /// The tensors `{prefix}mean`, `{prefix}std` (for checkpoints and exports).
    pub fn named_tensors(&self, prefix: &str) -> Vec<(String, Tensor)> {
        vec![(format!("{prefix}mean"), self.mean.shallow_clone()), (format!("{prefix}std"), self.std.shallow_clone())]
    }

    /// Reads `{prefix}mean` / `{prefix}std` from a tensor map, checking their shapes and that std > 0.
    pub fn from_tensors(map: &HashMap<String, Tensor>, prefix: &str) -> Result<Self> {
        let get = |name: &str| -> Result<Tensor> {
            let t = map.get(&format!("{prefix}{name}")).with_context(|| format!("no '{prefix}{name}' tensor"))?;
            Ok(t.to_kind(Kind::Float).reshape([-1]))
        };
        let (mean, std) = (get("mean")?, get("std")?);
        if mean.size() != std.size() {
            bail!("latent mean {:?} and std {:?} differ in shape", mean.size(), std.size());
        }
        if std.le(0.0).any().int64_value(&[]) != 0 {
            bail!("latent std has a non-positive entry");
        }
        Ok(Self { mean, std })
    }

    /// Writes `mean` and `std` to a safetensors file.
    pub fn save(&self, path: &Path) -> Result<()> {
        write_safetensors(path, &self.named_tensors(""), &[("format", "vtp-latent-stats")])
    }

    /// Reads a file written by [`Self::save`] (keys `mean`, `std`).
    pub fn load(path: &Path) -> Result<Self> {
        Self::from_tensors(&read_safetensors_map(path)?, "").with_context(|| format!("'{}'", path.display()))
    }

    /// Checks that these statistics fit latents of `channels` channels.
    pub fn check_channels(&self, channels: i64) -> Result<()> {
        if self.channels() != channels {
            bail!("latent statistics have {} channels, the latents {channels}", self.channels());
        }
        Ok(())
    }
}
