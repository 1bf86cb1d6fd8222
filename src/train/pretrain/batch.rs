//! Batch composition of a pre-training step (docs/design.md §4.2): every step draws `B` image–caption pairs;
//! all of them go to CLIP (OpenCLIP crop + caption tokens), an independent random subset of `B_ssl`
//! images to SSL (DINOv2 multi-crop + iBOT masks, collated crop-major) and another of `B_rec` images
//! to reconstruction (random square crop).
use super::config::{BatchConfig, Objectives, PretrainConfig};
use crate::data::augment::{Augment, ClipCrop, DinoMultiCrop, ReconCrop};
use crate::data::masking::{collate_masks, MaskBatch, MaskingGenerator};
use crate::data::Sample;
use crate::model::text::token_ids;
use crate::tokenizer::ClipTokenizer;
use rand::Rng;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use tch::{Device, Tensor};

/// Global crops per image (DINOv2).
pub const N_GLOBAL_CROPS: i64 = 2;

/// The SSL part of a batch: DINOv2's collate output.
#[derive(Debug)]
pub struct SslBatch {
    /// `[2·B_ssl, 3, G, G]`, crop-major (all first crops, then all second crops).
    pub global: Tensor,
    /// `[n_local·B_ssl, 3, L, L]`, crop-major.
    pub local: Tensor,
    /// The iBOT masks of the global crops.
    pub masks: MaskBatch,
}

/// One step's inputs, ImageNet-normalised `f32`.
#[derive(Debug)]
pub struct PretrainBatch {
    /// `[B, 3, S, S]` CLIP crops (present when CLIP is trained).
    pub clip_images: Option<Tensor>,
    /// `[B, L]` caption token ids.
    pub tokens: Option<Tensor>,
    pub ssl: Option<SslBatch>,
    /// `[B_rec, 3, R, R]` reconstruction crops.
    pub recon: Tensor,
}

impl PretrainBatch {
    /// Moves every tensor to `device`.
    pub fn to_device(self, device: Device) -> Self {
        let to = |t: Tensor| t.to_device(device);
        Self {
            clip_images: self.clip_images.map(to),
            tokens: self.tokens.map(to),
            ssl: self.ssl.map(|s| SslBatch {
                global: to(s.global),
                local: to(s.local),
                masks: MaskBatch {
                    masks: to(s.masks.masks),
                    mask_indices_list: to(s.masks.mask_indices_list),
                    masks_weight: to(s.masks.masks_weight),
                    n_masked_patches: to(s.masks.n_masked_patches),
                    upperbound: s.masks.upperbound,
                },
            }),
            recon: to(self.recon),
        }
    }
}

impl PretrainBatch {
    /// The one batch that `parts` (the per-rank batches of a data-parallel step, in rank order) form
    /// together: every tensor concatenated along the batch, the SSL crops and iBOT masks kept
    /// crop-major (all ranks' first crops, then all second crops, …) and the mask indices and
    /// weights recomputed — what one process steps on to take the same step as the ranks together.
    pub fn concat(parts: &[PretrainBatch]) -> Self {
        let cat = |ts: Vec<&Tensor>| Tensor::cat(&ts, 0);
        let optional =
            |f: fn(&PretrainBatch) -> Option<&Tensor>| parts.iter().map(f).collect::<Option<Vec<&Tensor>>>().map(cat);
        let ssl = parts.iter().map(|p| p.ssl.as_ref()).collect::<Option<Vec<&SslBatch>>>().map(|ssl| {
            // `[crops · b, …]` per rank → `[crops · Σb, …]`, crop-major.
            let crop_major = |f: fn(&SslBatch) -> &Tensor, crops: i64| {
                let chunks: Vec<Vec<Tensor>> = ssl.iter().map(|s| f(s).chunk(crops, 0)).collect();
                let ordered: Vec<&Tensor> =
                    (0..crops as usize).flat_map(|c| chunks.iter().map(move |ch| &ch[c])).collect();
                cat(ordered)
            };
            let n_local = ssl[0].local.size()[0] / (ssl[0].global.size()[0] / N_GLOBAL_CROPS).max(1);
            let masks = crop_major(|s| &s.masks.masks, N_GLOBAL_CROPS);
            let upperbound = ssl.iter().map(|s| s.masks.upperbound).sum();
            SslBatch {
                global: crop_major(|s| &s.global, N_GLOBAL_CROPS),
                local: if n_local > 0 {
                    crop_major(|s| &s.local, n_local)
                } else {
                    cat(ssl.iter().map(|s| &s.local).collect())
                },
                masks: MaskBatch::from_masks(masks, upperbound),
            }
        });
        PretrainBatch {
            clip_images: optional(|p| p.clip_images.as_ref()),
            tokens: optional(|p| p.tokens.as_ref()),
            ssl,
            recon: cat(parts.iter().map(|p| &p.recon).collect()),
        }
    }
}

/// Turns `B` samples into a [`PretrainBatch`].
pub struct BatchBuilder {
    clip: ClipCrop,
    multicrop: DinoMultiCrop,
    recon: ReconCrop,
    masking: MaskingGenerator,
    tokenizer: ClipTokenizer,
    context_length: usize,
    sizes: BatchConfig,
    objectives: Objectives,
}

impl BatchBuilder {
    /// The builder of `config`'s crops, masks, objectives and text context for batches of `sizes`
    /// (this rank's share of `config.batch`).
    pub fn new(config: &PretrainConfig, sizes: &BatchConfig) -> Self {
        let (data, objectives) = (&config.data, config.objectives);
        let (patch, context_length) = (config.model.vision_patch_size, config.model.text_context_length);
        Self {
            clip: ClipCrop::new(data.clip_size),
            multicrop: DinoMultiCrop::dinov2(data.global_size, data.local_size, data.n_local_crops),
            recon: ReconCrop::new(data.recon_size),
            masking: MaskingGenerator::dinov2((data.global_size / patch) as usize),
            tokenizer: ClipTokenizer::new(),
            context_length: context_length as usize,
            sizes: sizes.clone(),
            objectives,
        }
    }

    /// Builds the batch of `samples` (`B` of them). Every random draw (subsets, crops, masks) comes
    /// from `rng`; crops are rendered in parallel, each from its own generator seeded by `rng`.
    pub fn build(&self, samples: &[Sample], rng: &mut ChaCha8Rng) -> PretrainBatch {
        let n = samples.len();
        let ssl_ids = rand::seq::index::sample(rng, n, self.sizes.ssl.min(n)).into_vec();
        let rec_ids = rand::seq::index::sample(rng, n, self.sizes.recon.min(n)).into_vec();
        let (clip_images, tokens) = if self.objectives.clip() {
            let captions: Vec<&str> = samples.iter().map(|s| s.caption.as_str()).collect();
            let images = render(samples.iter().collect(), rng, |s, r| self.clip.apply(&s.image, r));
            (Some(images), Some(token_ids(&self.tokenizer, &captions, self.context_length)))
        } else {
            (None, None)
        };
        let ssl = self.objectives.ssl().then(|| {
            let chosen: Vec<&Sample> = ssl_ids.iter().map(|&i| &samples[i]).collect();
            let seeds = seeds(chosen.len(), rng);
            let images =
                chosen.iter().zip(seeds).map(|(s, seed)| (&s.image, ChaCha8Rng::seed_from_u64(seed))).collect();
            let (global, local) = self.multicrop.apply_batch(images);
            let masks = collate_masks(&self.masking, global.size()[0] as usize, rng);
            SslBatch { global, local, masks }
        });
        let recon = render(rec_ids.iter().map(|&i| &samples[i]).collect(), rng, |s, r| self.recon.apply(&s.image, r));
        PretrainBatch { clip_images, tokens, ssl, recon }
    }
}

/// One seed per item, drawn from `rng`.
fn seeds(n: usize, rng: &mut ChaCha8Rng) -> Vec<u64> {
    (0..n).map(|_| rng.random()).collect()
}

/// Renders one crop per sample in parallel (each with its own seeded generator) and stacks them.
pub fn render<F>(samples: Vec<&Sample>, rng: &mut ChaCha8Rng, crop: F) -> Tensor
where
    F: Fn(&Sample, &mut ChaCha8Rng) -> Tensor + Sync,
{
    let seeds = seeds(samples.len(), rng);
    let crops: Vec<Tensor> =
        samples.par_iter().zip(seeds).map(|(s, seed)| crop(s, &mut ChaCha8Rng::seed_from_u64(seed))).collect();
    Tensor::stack(&crops, 0)
}
