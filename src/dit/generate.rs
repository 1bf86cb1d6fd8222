//! Generating images with a trained DiT and scoring them (docs/design.md §5.4 "Decoding to images", "FID-50k"):
//! samples are decoded by the tokenizer, de-normalised, clamped and truncated to 8 bits as the
//! reference does, and compared with a reference set through FID-Inception pool features. For labelled
//! data (the synthetic scenes) a **reference classifier** — a linear probe on the same Inception
//! features, trained on real images of the train split — also scores whether each sample shows its
//! class; its accuracy on real held-out images is stated beside it.
use super::model::GuidedChannels;
use super::sampler::SamplerConfig;
use super::train::{sample_latents, TrainedDit};
use crate::data::image::adm_center_crop;
use crate::data::source;
use crate::data::stream::StreamOptions;
use crate::eval::fid_stats::{read_npz, write_npz};
use crate::eval::frechet::{frechet_distance, GaussianStats, FID_EPS};
use crate::eval::inception::FidInception;
use crate::eval::linear_probe::{train_linear_classifier, LinearClassifier, ProbeConfig};
use crate::eval::recon::{as_uint8_image, denormalise, inception_features};
use crate::io::{read_safetensors_map, write_atomic, write_safetensors};
use crate::model::VtpModel;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;
use tch::{Device, Kind, Tensor};

/// How samples are drawn for an evaluation.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct GenerationOptions {
    /// Number of samples.
    pub n: usize,
    /// Samples per sampler batch.
    pub batch: usize,
    /// The ODE sampler and guidance.
    pub sampler: SamplerConfig,
    /// Guide only channels 0..2 as the official `forward_with_cfg` (off: every channel).
    pub first_three_channels: bool,
    /// Seed of the noise.
    pub seed: u64,
}

impl GenerationOptions {
    fn guided(&self) -> GuidedChannels {
        if self.first_three_channels {
            GuidedChannels::FirstThree
        } else {
            GuidedChannels::All
        }
    }
}

/// `n` samples with balanced labels `i mod num_classes` (the reference draws them uniformly at
/// random), as 8-bit-quantised `[3, H, W]` images in `[0, 1]` on the CPU, with their labels;
/// `progress(done)` after each batch.
pub fn generate(
    dit: &TrainedDit,
    tokenizer: &VtpModel,
    opts: &GenerationOptions,
    mut progress: impl FnMut(usize),
) -> Result<(Vec<Tensor>, Vec<i64>)> {
    if opts.n == 0 || opts.batch == 0 {
        bail!("the number of samples and the batch size must be at least 1");
    }
    opts.sampler.validate()?;
    let classes = dit.info.num_classes;
    let labels: Vec<i64> = (0..opts.n as i64).map(|i| i % classes).collect();
    tch::manual_seed(opts.seed as i64);
    let mut images = Vec::with_capacity(opts.n);
    for chunk in labels.chunks(opts.batch) {
        let y = Tensor::from_slice(chunk).to_device(dit.model.device());
        let z = sample_latents(&dit.model, &dit.stats, &y, &opts.sampler, opts.guided(), |_, _| {});
        let decoded = tch::no_grad(|| tokenizer.get_latents_decoded_images(&z))?;
        let pixels = as_uint8_image(&denormalise(&decoded)).to_device(Device::Cpu);
        images.extend(pixels.unbind(0));
        progress(images.len());
    }
    Ok((images, labels))
}

/// What generated images are compared with: Inception statistics and, for labelled data, the
/// reference classifier.
pub struct GenerationReference {
    /// Where the statistics come from (a data spec and count, or an `.npz` path).
    pub description: String,
    pub stats: GaussianStats,
    pub classifier: Option<ReferenceClassifier>,
}

/// A linear probe on Inception pool features, trained on real images.
pub struct ReferenceClassifier {
    pub classifier: LinearClassifier,
    /// What it was trained and checked on (data, label set, counts, recipe).
    pub protocol: String,
    /// Its top-1 on real held-out images, percent.
    pub real_accuracy: f64,
}

/// Files of a reference folder (`vtp dit reference --out`).
const REF_STATS: &str = "stats.npz";
const REF_CLASSIFIER: &str = "classifier.safetensors";
const REF_INFO: &str = "reference.json";

/// What `reference.json` records.
#[derive(Serialize, Deserialize)]
pub struct ReferenceInfo {
    /// The reference images, e.g. `500 real images of '<SPEC>' at 64²`.
    pub description: String,
    /// How its classifier was trained, when it has one.
    pub classifier_protocol: Option<String>,
    /// That classifier's top-1 on the real held-out images, percent.
    pub classifier_real_accuracy: Option<f64>,
}

/// Inception features and labels of the first `n` images of `spec` at `size` (ADM centre crop,
/// 8-bit pixels as stored), `label_set` labels.
fn real_features(
    inception: &FidInception,
    spec: &str,
    n: usize,
    size: u32,
    label_set: &str,
    batch: usize,
) -> Result<(Tensor, Tensor)> {
    let mut images = Vec::with_capacity(n);
    let mut labels = Vec::with_capacity(n);
    for sample in source::open(spec, &StreamOptions::default())?.take(n) {
        let s = sample?;
        let img = adm_center_crop(&s.image, size);
        let hwc = Tensor::from_slice(img.as_raw()).view([size as i64, size as i64, 3]);
        images.push(hwc.permute([2, 0, 1]).to_kind(Kind::Float) / 255.0);
        let label =
            s.labels.get(label_set).with_context(|| format!("sample '{}' has no '{label_set}' label", s.key))?;
        labels.push(*label);
    }
    if images.len() < 2 {
        bail!("'{spec}' yields {} images; a reference needs at least 2", images.len());
    }
    Ok((inception_features(inception, &images, batch)?, Tensor::from_slice(&labels)))
}

impl GenerationReference {
    /// The reference of a labelled data set: FID statistics of the first `n_ref` images of
    /// `heldout`, and a classifier of `label_set` trained on the first `n_train` images of `train`,
    /// checked on those held-out images.
    #[allow(clippy::too_many_arguments)]
    pub fn from_data(
        inception: &FidInception,
        train: &str,
        heldout: &str,
        label_set: &str,
        n_train: usize,
        n_ref: usize,
        size: u32,
        batch: usize,
    ) -> Result<Self> {
        let (ref_x, ref_y) = real_features(inception, heldout, n_ref, size, label_set, batch)?;
        let (train_x, train_y) = real_features(inception, train, n_train, size, label_set, batch)?;
        let probe = ProbeConfig { epochs: 30, ..ProbeConfig::default() };
        let protocol = format!("linear probe on FID-Inception pool features of {n_train} real '{train}' images");
        let (result, classifier) =
            train_linear_classifier((&train_x, &train_y), (&ref_x, &ref_y), None, &probe, &protocol)?;
        let real_accuracy = classifier.accuracy(&ref_x, &ref_y);
        Ok(Self {
            description: format!("{} real images of '{heldout}' at {size}²", ref_x.size()[0]),
            stats: GaussianStats::from_features(&ref_x)?,
            classifier: Some(ReferenceClassifier {
                classifier,
                protocol: format!("{}; label set '{label_set}'", result.protocol),
                real_accuracy,
            }),
        })
    }

    /// A reference of statistics only (`vtp fid-stats` output or ADM's `VIRTUAL_imagenet256_labeled.npz`).
    pub fn from_npz(path: &Path) -> Result<Self> {
        Ok(Self { description: path.display().to_string(), stats: read_npz(path)?, classifier: None })
    }

    /// Writes a reference folder ([`Self::load`] reads it).
    pub fn save(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create '{}'", dir.display()))?;
        write_npz(&dir.join(REF_STATS), &self.stats)?;
        if let Some(c) = &self.classifier {
            let tensors = [
                ("weight".to_string(), c.classifier.weight.shallow_clone()),
                ("bias".to_string(), c.classifier.bias.shallow_clone()),
            ];
            write_safetensors(&dir.join(REF_CLASSIFIER), &tensors, &[("format", "vtp-reference-classifier")])?;
        }
        let info = ReferenceInfo {
            description: self.description.clone(),
            classifier_protocol: self.classifier.as_ref().map(|c| c.protocol.clone()),
            classifier_real_accuracy: self.classifier.as_ref().map(|c| c.real_accuracy),
        };
        write_atomic(&dir.join(REF_INFO), serde_json::to_string_pretty(&info)?.as_bytes())
    }

    /// A reference folder, or an `.npz` statistics file.
    pub fn load(path: &Path) -> Result<Self> {
        if path.extension().is_some_and(|e| e == "npz") {
            return Self::from_npz(path);
        }
        let info_path = path.join(REF_INFO);
        let text = std::fs::read_to_string(&info_path).with_context(|| {
            format!(
                "'{}' is neither a reference folder (vtp dit reference) nor an .npz statistics file",
                path.display()
            )
        })?;
        let info: ReferenceInfo =
            serde_json::from_str(&text).with_context(|| format!("'{}' is malformed", info_path.display()))?;
        let classifier = match (info.classifier_protocol, info.classifier_real_accuracy) {
            (Some(protocol), Some(real_accuracy)) => {
                let map = read_safetensors_map(&path.join(REF_CLASSIFIER))?;
                let get =
                    |k: &str| map.get(k).map(Tensor::shallow_clone).with_context(|| format!("classifier has no '{k}'"));
                let classifier = LinearClassifier { weight: get("weight")?, bias: get("bias")? };
                Some(ReferenceClassifier { classifier, protocol, real_accuracy })
            }
            _ => None,
        };
        Ok(Self { description: info.description, stats: read_npz(&path.join(REF_STATS))?, classifier })
    }
}

/// What `vtp dit fid` reports (its JSON).
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct GenerationReport {
    /// Number of generated samples.
    pub n: usize,
    /// The sampler: method, grid points, shift, CFG scale and interval.
    pub sampler: SamplerConfig,
    /// Whether guidance touched only channels 0..2 (the official quirk).
    pub first_three_channels: bool,
    /// Labels `i mod num_classes` (balanced).
    pub labels: String,
    /// The reference set.
    pub reference: String,
    pub fid: f64,
    /// Top-1 of the reference classifier on the samples against their class labels, percent.
    pub class_accuracy: Option<f64>,
    /// The reference classifier's top-1 on real held-out images, percent (its ceiling).
    pub classifier_real_accuracy: Option<f64>,
    pub classifier: Option<String>,
}

/// FID of `images` (from [`generate`]) against `reference`, and the class accuracy when it has a
/// classifier.
pub fn score(
    images: &[Tensor],
    labels: &[i64],
    inception: &FidInception,
    reference: &GenerationReference,
    opts: &GenerationOptions,
) -> Result<GenerationReport> {
    let features = inception_features(inception, images, 50)?;
    let fid = frechet_distance(&GaussianStats::from_features(&features)?, &reference.stats, FID_EPS)?.fid;
    let y = Tensor::from_slice(labels);
    let c = reference.classifier.as_ref();
    Ok(GenerationReport {
        n: images.len(),
        sampler: opts.sampler.clone(),
        first_three_channels: opts.first_three_channels,
        labels: "balanced: sample i has label i mod num_classes".into(),
        reference: reference.description.clone(),
        fid,
        class_accuracy: c.map(|c| c.classifier.accuracy(&features.to_kind(Kind::Float), &y)),
        classifier_real_accuracy: c.map(|c| c.real_accuracy),
        classifier: c.map(|c| c.protocol.clone()),
    })
}
