//! What a tokenizer run shows while it trains, shared by `vtp pretrain` and `vtp finetune-decoder`:
//! the online evaluation (zero-shot top-1 and reconstruction PSNR / SSIM through the same library
//! code `vtp eval` runs) and the reconstruction grid (held-out inputs above their reconstructions).
use super::config::EvalConfig;
use crate::data::image::{prepare_rgb, save_grid01, Fit, Levels};
use crate::data::source;
use crate::data::stream::StreamOptions;
use crate::data::Sample;
use crate::eval::classnames;
use crate::eval::linear_probe::{train_linear_probe, ProbeConfig, Protocol};
use crate::eval::recon::{self, ReconMetrics};
use crate::eval::zero_shot::{self, squash_resize};
use crate::model::VtpModel;
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use tch::{Device, Tensor};

/// The frozen features the online linear probes read: the final-norm CLS token (what CLIP and DINO
/// train) and the mean of the 64-d latents (what reconstruction and the generator see).
pub const PROBE_PROTOCOLS: [Protocol; 2] = [Protocol::LastCls, Protocol::Bottleneck];

/// The online evaluation of `model` on `eval_source`: for every comma-separated class set of
/// `eval.classes`, the zero-shot top-1 at `clip_size` (`eval/zero_shot_top1/<set>`, when the model has
/// CLIP) and the linear-probe top-1 of each of [`PROBE_PROTOCOLS`] trained on `eval.probe_source`
/// (`eval/probe_top1/<set>/<protocol>`, when set); then PSNR and SSIM at `recon_size` (`eval/psnr`,
/// `eval/ssim`), over `eval.samples` images.
pub fn online_evaluation(
    model: &VtpModel,
    eval_source: &str,
    eval: &EvalConfig,
    clip_size: i64,
    recon_size: i64,
) -> Result<Vec<(String, f64)>> {
    let _guard = tch::no_grad_guard();
    let mut out = Vec::new();
    let sets: Vec<&str> = eval.classes.split(',').map(str::trim).filter(|s| !s.is_empty()).collect();
    for set in sets.iter().filter(|_| model.config.train_clip) {
        let z = zero_shot::evaluate_source(model, eval_source, set, eval.samples, 64, clip_size as u32, |_| {})?;
        out.push((format!("eval/zero_shot_top1/{set}"), z.top1));
    }
    if !eval.probe_source.is_empty() && !sets.is_empty() {
        out.extend(online_probes(model, eval_source, eval, &sets, clip_size as u32)?);
    }
    let metrics = ReconMetrics { inception: None, lpips: None, size: recon_size as u32, batch: 32 };
    let r = recon::evaluate_source(model, eval_source, eval.samples, &metrics, |_| {})?;
    out.push(("eval/psnr".to_string(), r.psnr));
    out.push(("eval/ssim".to_string(), r.ssim));
    Ok(out)
}

/// The linear probes of [`PROBE_PROTOCOLS`] for the labels of every class set of `sets`: trained on the
/// first `eval.probe_samples` images of `eval.probe_source`, scored on the first `eval.samples` of
/// `eval_source`, every image squashed to `size` as for zero-shot. Each image's features are extracted
/// once and serve every set.
fn online_probes(
    model: &VtpModel,
    eval_source: &str,
    eval: &EvalConfig,
    sets: &[&str],
    size: u32,
) -> Result<Vec<(String, f64)>> {
    let classes = sets.iter().map(|set| classnames::resolve_for_data(set, eval_source)).collect::<Result<Vec<_>>>()?;
    let keys: Vec<&str> = classes.iter().map(|c| c.label_key.as_str()).collect();
    let train = probe_features(model, &eval.probe_source, eval.probe_samples, &keys, size)?;
    let val = probe_features(model, eval_source, eval.samples, &keys, size)?;
    let config = ProbeConfig { epochs: PROBE_EPOCHS, ..ProbeConfig::default() };
    let mut out = Vec::new();
    for (s, (set, c)) in sets.iter().zip(&classes).enumerate() {
        for (p, protocol) in PROBE_PROTOCOLS.iter().enumerate() {
            let (train, val) = ((&train.0[p], &train.1[s]), (&val.0[p], &val.1[s]));
            let r = train_linear_probe(train, val, Some(c.class_names.len()), &config, &protocol.description())?;
            out.push((format!("eval/probe_top1/{set}/{}", protocol.name()), r.top1));
        }
    }
    Ok(out)
}

/// Epochs of the online linear probes (the rows are few, so more passes than §5.2's 10).
const PROBE_EPOCHS: usize = 30;

/// Images per forward pass of the probe features.
const PROBE_BATCH: usize = 64;

/// The features of each of [`PROBE_PROTOCOLS`] and the labels under each of `label_keys` of the first
/// `limit` samples of `spec`, squashed to `size`; a sample without one of the labels is an error naming it.
fn probe_features(
    model: &VtpModel,
    spec: &str,
    limit: usize,
    label_keys: &[&str],
    size: u32,
) -> Result<(Vec<Tensor>, Vec<Tensor>)> {
    let samples: Vec<Sample> = source::open(spec, &StreamOptions::default())?.take(limit).collect::<Result<_>>()?;
    if samples.is_empty() {
        bail!("the linear-probe source '{spec}' yields no images");
    }
    let mut features: Vec<Vec<Tensor>> = PROBE_PROTOCOLS.iter().map(|_| Vec::new()).collect();
    for chunk in samples.chunks(PROBE_BATCH) {
        let images = chunk
            .iter()
            .map(|s| {
                let img = squash_resize(&s.image, size).with_context(|| format!("sample '{}'", s.key))?;
                Ok(Tensor::from_slice(&img.data).view([3, img.height as i64, img.width as i64]))
            })
            .collect::<Result<Vec<_>>>()?;
        let images = Tensor::stack(&images, 0);
        for (f, protocol) in features.iter_mut().zip(PROBE_PROTOCOLS) {
            f.push(protocol.features(model, &images)?.to_device(Device::Cpu));
        }
    }
    let labels = label_keys
        .iter()
        .map(|key| {
            let of = |s: &Sample| {
                s.labels.get(*key).copied().with_context(|| format!("sample '{}' has no label '{key}'", s.key))
            };
            Ok(Tensor::from_slice(&samples.iter().map(of).collect::<Result<Vec<i64>>>()?))
        })
        .collect::<Result<_>>()?;
    Ok((features.iter().map(|f| Tensor::cat(f, 0)).collect(), labels))
}

/// A run's reconstruction grids: the first `n` held-out images of a source, centre-cropped to
/// `size` and read once, above a model's reconstructions of them.
pub struct ReconGrid {
    spec: String,
    n: usize,
    patch: i64,
    size: i64,
    inputs: Option<Tensor>,
}

impl ReconGrid {
    /// The grid of the first `n` images of `spec` at `size` for a model of patch size `patch`.
    pub fn new(spec: &str, n: usize, patch: i64, size: i64) -> Self {
        Self { spec: spec.to_string(), n, patch, size, inputs: None }
    }

    /// `[n, 3, size, size]` ImageNet-normalised inputs (read on first use); an empty source is an error.
    fn inputs(&mut self) -> Result<Tensor> {
        if self.inputs.is_none() {
            let fit = Fit::AdmCenterCrop(self.size as u32);
            let images: Vec<Tensor> = source::open(&self.spec, &StreamOptions::default())?
                .take(self.n)
                .map(|s| {
                    let img = prepare_rgb(&s?.image, self.patch as u32, fit)?;
                    Ok(Tensor::from_slice(&img.data).view([3, img.height as i64, img.width as i64]))
                })
                .collect::<Result<_>>()?;
            if images.is_empty() {
                bail!("the evaluation source '{}' yields no images", self.spec);
            }
            self.inputs = Some(Tensor::stack(&images, 0));
        }
        Ok(self.inputs.as_ref().expect("just read").shallow_clone())
    }

    /// Writes `dir/recon-<step>.png`: the inputs (top row) above `model`'s reconstructions.
    pub fn save(&mut self, model: &VtpModel, step: u64, dir: &Path) -> Result<PathBuf> {
        let inputs = self.inputs()?;
        let outputs = tch::no_grad(|| -> Result<Tensor> {
            let x = inputs.to_device(model.device());
            model.get_latents_decoded_images(&model.get_reconstruction_latents(&x)?)
        })?;
        let path = dir.join(format!("recon-{step:08}.png"));
        save_grid(&path, &[inputs, outputs.to_device(Device::Cpu)])?;
        Ok(path)
    }
}

/// Writes rows of ImageNet-normalised images `[N, 3, H, W]` (one tensor per row) as one PNG grid.
pub fn save_grid(path: &Path, rows: &[Tensor]) -> Result<()> {
    let rows: Vec<Tensor> = rows.iter().map(recon::denormalise).collect();
    save_grid01(path, &rows, Levels::Truncate)
}
