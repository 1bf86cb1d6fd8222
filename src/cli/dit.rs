//! `vtp dit extract | train | sample | reference | fid`: LightningDiT on VTP latents (docs/design.md §5.4, §8) —
//! the latent cache, flow-matching training on the shared run machinery, sampling to PNGs, and
//! FID / sample class accuracy against a reference set.
use super::fid::InceptionArgs;
use super::images::progress;
use super::train::{print_summary, RunArgs};
use crate::data::image::{save_grid01, Levels};
use crate::data::synthetic;
use crate::dit::cache::{self, ExtractOptions, LatentCache};
use crate::dit::config::{DitTrainConfig, DIT_PRESETS};
use crate::dit::generate::{generate, score, GenerationOptions, GenerationReference};
use crate::dit::sampler::{Method, SamplerConfig};
use crate::dit::stats::LatentStats;
use crate::dit::train::{DitRun, TrainedDit};
use crate::model::VtpModel;
use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use std::path::{Path, PathBuf};
use tch::{Device, Tensor};

/// The `vtp dit` sub-commands.
#[derive(Subcommand, Debug)]
pub enum DitCommand {
    /// Encode a data set (and its horizontal flips) into a latent cache with per-channel statistics.
    Extract(ExtractArgs),
    /// Train a LightningDiT on a latent cache by flow matching (config + overrides, resume, metrics).
    Train(DitTrainArgs),
    /// Sample images from a trained DiT: PNGs `{index:06}.png` and a grid.
    Sample(SampleArgs),
    /// Build a reference set for `vtp dit fid`: Inception statistics of real held-out images and a
    /// classifier of their labels (linear probe on Inception features of real train images).
    Reference(ReferenceArgs),
    /// Generate N samples and report FID (and, with a labelled reference, sample class accuracy) as JSON.
    Fid(DitFidArgs),
}

/// Runs a `vtp dit` sub-command.
pub fn run(command: &DitCommand, device: Device) -> Result<()> {
    match command {
        DitCommand::Extract(a) => extract(a, device),
        DitCommand::Train(a) => train(a, device),
        DitCommand::Sample(a) => sample(a, device),
        DitCommand::Reference(a) => reference(a, device),
        DitCommand::Fid(a) => fid(a, device),
    }
}

/// Arguments of `vtp dit extract`.
#[derive(Args, Debug)]
pub struct ExtractArgs {
    /// The tokenizer: a released-format folder or `hf:ORG/NAME[@REV]`.
    #[arg(long, short = 'm')]
    model: String,
    /// Data SPEC (e.g. `synthetic:train?n=4096&res=64`, WebDataset shards, an image folder).
    #[arg(long)]
    data: String,
    /// Cache folder (continued when it holds a partial cache of the same extraction).
    #[arg(long, short = 'o')]
    out: PathBuf,
    /// Label set of the class labels (`shape`, `color`, `shape_color` for synthetic data; `cls` for shards).
    #[arg(long, default_value = "shape")]
    labels: String,
    /// Number of classes (default: the synthetic label set's size).
    #[arg(long)]
    num_classes: Option<i64>,
    /// Image side (ADM centre crop) to encode.
    #[arg(long, default_value_t = 64)]
    size: u32,
    /// Images per encoder batch.
    #[arg(long, default_value_t = 32)]
    batch: usize,
    /// Samples per shard.
    #[arg(long, default_value_t = 1024)]
    per_shard: usize,
    /// Stop after N samples.
    #[arg(long)]
    limit: Option<usize>,
    /// Data reader threads.
    #[arg(long, default_value_t = 2)]
    workers: usize,
}

/// Encodes a data set into a latent cache.
pub fn extract(a: &ExtractArgs, device: Device) -> Result<()> {
    let num_classes = match (a.num_classes, synthetic::class_names(&a.labels)) {
        (Some(n), _) if n > 0 => n,
        (Some(n), _) => bail!("--num-classes must be at least 1, got {n}"),
        (None, Some(names)) => names.len() as i64,
        (None, None) => bail!("--num-classes is required for label set '{}'", a.labels),
    };
    let model = VtpModel::load(&crate::hub::resolve_model_dir(&a.model)?, device)?;
    let opts = ExtractOptions {
        source: a.data.clone(),
        label_set: a.labels.clone(),
        num_classes,
        image_size: a.size,
        batch: a.batch,
        per_shard: a.per_shard,
        limit: a.limit,
        workers: a.workers,
    };
    let bar = progress(a.limit.unwrap_or(0), "encoding");
    // A folder is recorded absolute, so later commands find the tokenizer from any directory.
    let tokenizer = std::fs::canonicalize(&a.model).map_or(a.model.clone(), |p| p.display().to_string());
    let manifest = cache::extract(&model, &tokenizer, &opts, &a.out, |done| bar.set_position(done as u64))?;
    bar.finish_and_clear();
    let [c, h, w] = manifest.latent_shape;
    println!(
        "{} latents [{c}, {h}, {w}] (+ flipped) of '{}' with '{}' labels ({} classes) in {}; statistics in {}",
        manifest.samples(),
        manifest.source,
        manifest.label_set,
        manifest.num_classes,
        a.out.display(),
        a.out.join(cache::STATS).display()
    );
    Ok(())
}

/// Arguments of `vtp dit train`.
#[derive(Args, Debug)]
pub struct DitTrainArgs {
    /// The latent cache (`vtp dit extract --out`); overrides the config's `cache`.
    #[arg(long)]
    cache: Option<String>,
    /// Preset the defaults come from.
    #[arg(long, default_value = "tiny", value_parser = DIT_PRESETS)]
    preset: String,
    /// Latent statistics instead of the cache's: `vtp-s`, `vtp-b`, `vtp-l` (the released ones) or a
    /// statistics file (`latent_stats.safetensors`); recorded as the config's `stats`.
    #[arg(long)]
    stats: Option<String>,
    #[command(flatten)]
    run: RunArgs,
}

/// The statistics named by `--stats`: a released name or a file.
fn stats_override(spec: &str) -> Result<LatentStats> {
    if crate::dit::stats::RELEASED_NAMES.contains(&spec) {
        LatentStats::released(spec)
    } else {
        LatentStats::load(Path::new(spec))
    }
}

/// Trains a DiT on a latent cache and exports its EMA weights, statistics and provenance.
pub fn train(a: &DitTrainArgs, device: Device) -> Result<()> {
    let mut config: DitTrainConfig = a.run.load_config(&a.preset)?;
    if let Some(cache) = &a.cache {
        config.cache = cache.clone();
    }
    if let Some(stats) = &a.stats {
        config.stats = stats.clone();
    }
    if config.cache.is_empty() {
        if a.run.print_config(&config)? {
            return Ok(());
        }
        bail!("--cache DIR is required (a latent cache written by `vtp dit extract`)");
    }
    let mut cache = LatentCache::open(Path::new(&config.cache))?;
    if !config.stats.is_empty() {
        cache.stats = stats_override(&config.stats)?;
    }
    config.resolve(&cache.manifest).with_context(|| format!("latent cache '{}'", config.cache))?;
    if a.run.print_config(&config)? {
        return Ok(());
    }
    let tokenizer = VtpModel::load(&crate::hub::resolve_model_dir(&cache.manifest.tokenizer)?, device)
        .with_context(|| format!("the cache's tokenizer '{}'", cache.manifest.tokenizer))?;
    let dir = a.run.run_dir()?;
    let summary = a.run.train(&dir, &config, |dp| {
        let trainer = DitRun::new(config.clone(), cache, tokenizer, device, dp)?;
        let opts = trainer.run_options();
        Ok((trainer, opts))
    })?;
    print_summary(&summary, &dir, "DiT (EMA weights, latent statistics, dit.json)");
    Ok(())
}

/// Sampler flags over a DiT's recorded sampler.
#[derive(Args, Debug, Clone)]
pub struct SamplerArgs {
    /// ODE integrator: euler or heun.
    #[arg(long)]
    method: Option<String>,
    /// Time-grid points (steps − 1 integration steps).
    #[arg(long)]
    steps: Option<i64>,
    /// Timestep shift s (0 = off).
    #[arg(long)]
    shift: Option<f64>,
    /// Classifier-free guidance scale (1 = off).
    #[arg(long)]
    cfg_scale: Option<f64>,
    /// Guidance off while t < this.
    #[arg(long)]
    cfg_interval_start: Option<f64>,
    /// Guide only latent channels 0..2, as the official `forward_with_cfg` (a DiT legacy quirk).
    #[arg(long)]
    first_three_channels: bool,
    /// Samples per sampler batch.
    #[arg(long, default_value_t = 32)]
    batch: usize,
    /// Seed of the noise.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Latent statistics instead of the DiT's own: `vtp-s`, `vtp-b`, `vtp-l` or a statistics file.
    #[arg(long)]
    stats: Option<String>,
    /// Decode with this tokenizer instead of the recorded one (its fingerprint must match).
    #[arg(long)]
    tokenizer: Option<String>,
}

impl SamplerArgs {
    /// The generation options for `n` samples: the DiT's sampler with these flags over it.
    fn options(&self, recorded: &SamplerConfig, n: usize) -> Result<GenerationOptions> {
        let mut s = recorded.clone();
        if let Some(m) = &self.method {
            s.method = match m.as_str() {
                "euler" => Method::Euler,
                "heun" => Method::Heun,
                other => bail!("--method must be euler or heun, got '{other}'"),
            };
        }
        s.steps = self.steps.unwrap_or(s.steps);
        s.shift = self.shift.unwrap_or(s.shift);
        s.cfg_scale = self.cfg_scale.unwrap_or(s.cfg_scale);
        s.cfg_interval_start = self.cfg_interval_start.unwrap_or(s.cfg_interval_start);
        s.validate()?;
        let first_three_channels = self.first_three_channels;
        Ok(GenerationOptions { n, batch: self.batch, sampler: s, first_three_channels, seed: self.seed })
    }

    /// The DiT of `dir` with `--stats` applied, and its tokenizer.
    fn load(&self, dir: &Path, device: Device) -> Result<(TrainedDit, VtpModel)> {
        let mut dit = TrainedDit::load(dir, device)?;
        if let Some(spec) = &self.stats {
            dit.stats = stats_override(spec)?;
            dit.stats.check_channels(dit.model.config().in_channels)?;
        }
        let tokenizer = dit.tokenizer(self.tokenizer.as_deref(), device)?;
        Ok((dit, tokenizer))
    }
}

/// Arguments of `vtp dit sample`.
#[derive(Args, Debug)]
pub struct SampleArgs {
    /// A trained DiT (`vtp dit train`'s `model/` folder).
    #[arg(long)]
    dit: PathBuf,
    /// Number of samples (labels i mod num_classes).
    #[arg(long, short = 'n', default_value_t = 16)]
    n: usize,
    /// Output folder: `{index:06}.png` and `grid.png`.
    #[arg(long, short = 'o')]
    out: PathBuf,
    #[command(flatten)]
    sampler: SamplerArgs,
}

/// Writes samples as PNGs and one grid (one row per class).
pub fn sample(a: &SampleArgs, device: Device) -> Result<()> {
    let (dit, tokenizer) = a.sampler.load(&a.dit, device)?;
    let opts = a.sampler.options(&dit.info.sampler, a.n)?;
    std::fs::create_dir_all(&a.out).with_context(|| format!("cannot create '{}'", a.out.display()))?;
    let bar = progress(a.n, "sampling");
    let (images, labels) = generate(&dit, &tokenizer, &opts, |done| bar.set_position(done as u64))?;
    bar.finish_and_clear();
    for (i, img) in images.iter().enumerate() {
        save_grid01(&a.out.join(format!("{i:06}.png")), &[img.unsqueeze(0)], Levels::Round)?;
    }
    let classes = dit.info.num_classes.min(images.len() as i64) as usize;
    let per_row = images.len() / classes;
    let rows: Vec<Tensor> = (0..classes)
        .map(|c| Tensor::stack(&images[c..].iter().step_by(classes).take(per_row).collect::<Vec<_>>(), 0))
        .collect();
    save_grid01(&a.out.join("grid.png"), &rows, Levels::Truncate)?;
    println!(
        "{} samples ({} classes of '{}', {:?} sampler, {} points, shift {}, CFG {}) in {}",
        labels.len(),
        dit.info.num_classes,
        dit.info.label_set,
        opts.sampler.method,
        opts.sampler.steps,
        opts.sampler.shift,
        opts.sampler.cfg_scale,
        a.out.display()
    );
    Ok(())
}

/// Arguments of `vtp dit reference`.
#[derive(Args, Debug)]
pub struct ReferenceArgs {
    /// Real training images of the classifier.
    #[arg(long, default_value = "synthetic:train?res=64")]
    train: String,
    /// Real held-out images: the FID statistics and the classifier's check.
    #[arg(long, default_value = "synthetic:heldout?res=64")]
    heldout: String,
    /// Label set of the classifier.
    #[arg(long, default_value = "shape")]
    labels: String,
    /// Training images of the classifier.
    #[arg(long, default_value_t = 2000)]
    n_train: usize,
    /// Held-out images (the FID reference).
    #[arg(long, short = 'n', default_value_t = 1000)]
    n: usize,
    /// Image side (ADM centre crop).
    #[arg(long, default_value_t = 64)]
    size: u32,
    /// Output folder.
    #[arg(long, short = 'o')]
    out: PathBuf,
    #[command(flatten)]
    inception: InceptionArgs,
}

/// Builds and writes a reference folder.
pub fn reference(a: &ReferenceArgs, device: Device) -> Result<()> {
    let inception = a.inception.load(device)?;
    let r = GenerationReference::from_data(&inception, &a.train, &a.heldout, &a.labels, a.n_train, a.n, a.size, 50)?;
    r.save(&a.out)?;
    let c = r.classifier.as_ref().expect("a data reference has a classifier");
    println!(
        "reference: {}; classifier top-1 on real held-out images {:.2} %; written to {}",
        r.description,
        c.real_accuracy,
        a.out.display()
    );
    Ok(())
}

/// Arguments of `vtp dit fid`.
#[derive(Args, Debug)]
pub struct DitFidArgs {
    /// A trained DiT (`vtp dit train`'s `model/` folder).
    #[arg(long)]
    dit: PathBuf,
    /// Reference: a `vtp dit reference` folder, or an `.npz` of Inception statistics (`vtp fid-stats`,
    /// ADM's `VIRTUAL_imagenet256_labeled.npz`).
    #[arg(long)]
    reference: PathBuf,
    /// Number of generated samples.
    #[arg(long, short = 'n', default_value_t = 1000)]
    n: usize,
    /// Also write the JSON report here.
    #[arg(long)]
    report: Option<PathBuf>,
    #[command(flatten)]
    sampler: SamplerArgs,
    #[command(flatten)]
    inception: InceptionArgs,
}

/// Generates samples and prints the JSON report (FID, class accuracy, N, sampler, reference).
pub fn fid(a: &DitFidArgs, device: Device) -> Result<()> {
    let reference = GenerationReference::load(&a.reference)?;
    let inception = a.inception.load(device)?;
    let (dit, tokenizer) = a.sampler.load(&a.dit, device)?;
    let opts = a.sampler.options(&dit.info.sampler, a.n)?;
    let bar = progress(a.n, "sampling");
    let (images, labels) = generate(&dit, &tokenizer, &opts, |done| bar.set_position(done as u64))?;
    bar.finish_and_clear();
    let report = score(&images, &labels, &inception, &reference, &opts)?;
    let json = serde_json::to_string_pretty(&report)?;
    if let Some(path) = &a.report {
        crate::io::write_atomic(path, json.as_bytes())?;
    }
    println!("{json}");
    Ok(())
}
