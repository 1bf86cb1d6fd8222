//! `vtp bench`: images/s on random or synthetic input, printed as one JSON line in the format of
//! `../shared/bench/pytorch_vtp.py` so both can be compared. `--mode reconstruct` (default) times
//! encode + decode under no-grad; `--mode pretrain-step` one all-objectives `Pretrainer::step` and
//! `--mode recon-step` one reconstruction-only step (`objectives = ae`), both with the L1-only
//! reconstruction loss and no stochastic depth (as `benches/pytorch_pretrain.py` and
//! `pytorch_vtp.py --mode train-step`), on one batch built once from the synthetic source.
use super::ModelArgs;
use crate::data::source;
use crate::data::stream::StreamOptions;
use crate::data::Sample;
use crate::dist::DataParallel;
use crate::dit::config::DitConfig;
use crate::dit::model::LightningDit;
use crate::dit::sampler::{self, SamplerConfig};
use crate::dit::train::{dit_optimizer, flow_step, FlowRecipe};
use crate::dit::transport::TimeSampling;
use crate::train::optim::AdamWConfig;
use crate::train::precision::Precision;
use crate::train::pretrain::batch::{BatchBuilder, PretrainBatch};
use crate::train::pretrain::config::{BatchConfig, PretrainConfig};
use crate::train::pretrain::objectives::recon::ReconLoss;
use crate::train::pretrain::{local_batch, Pretrainer};
use crate::train::profile::StepProfile;
use crate::train::schedule::Schedules;
use anyhow::{bail, Result};
use clap::{Args, ValueEnum};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::sync::Arc;
use std::time::Instant;
use tch::{Device, Kind, Tensor};

/// What `vtp bench` times.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum BenchMode {
    /// Encode + decode of `--batch` random `--size`² images under no-grad.
    Reconstruct,
    /// One all-objectives pre-training step: `--batch` CLIP pairs at `--size`, SSL and reconstruction
    /// subsets in the paper's 16k:4k:2k ratio (`batch.ssl = max(2, B/4)`, `batch.recon = max(1, B/8)`),
    /// the preset's global / local crops.
    PretrainStep,
    /// One reconstruction-only step (`objectives = ae`) on `--batch` crops of `--size`².
    ReconStep,
    /// One LightningDiT flow-matching step (logit-normal t, MSE + cosine loss, backward, AdamW 2e-4,
    /// betas (0.9, 0.95)) of the DiT preset `--preset` (tiny, small, B, L, XL: 16×16×64 latents) on
    /// `--batch` random latents, as `pytorch_dit.py --mode train-step`.
    DitTrainStep,
    /// Euler sampling of `--batch` latents with `--steps` DiT calls (no CFG, no shift), as
    /// `pytorch_dit.py --mode sample`.
    DitSample,
}

impl BenchMode {
    /// The name printed in the JSON line (the `--mode` value).
    fn name(self) -> &'static str {
        match self {
            BenchMode::Reconstruct => "reconstruct",
            BenchMode::PretrainStep => "pretrain-step",
            BenchMode::ReconStep => "recon-step",
            BenchMode::DitTrainStep => "dit-train-step",
            BenchMode::DitSample => "dit-sample",
        }
    }
}

/// Arguments of `vtp bench`.
#[derive(Args, Debug)]
pub struct BenchArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// What to time. The training modes build a random model of the pre-training preset `--preset`
    /// (tiny, small, base, large) and record the resident memory after steps 20 and 200 when the
    /// run is that long (a leak check).
    #[arg(long, value_enum, default_value_t = BenchMode::Reconstruct)]
    mode: BenchMode,
    /// Image side (training modes: the CLIP and reconstruction crops).
    #[arg(long, default_value_t = 256)]
    size: i64,
    /// Batch size (pretrain-step: the CLIP pairs per step).
    #[arg(long, default_value_t = 4)]
    batch: i64,
    /// Timed iterations (the median is reported).
    #[arg(long, default_value_t = 5)]
    iters: usize,
    /// Untimed warm-up iterations.
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// `dit-sample`: Euler steps (DiT calls) per sample.
    #[arg(long, default_value_t = 50)]
    steps: i64,
    /// Training modes: forward passes in f32 or bf16 autocast (`train.precision`).
    #[arg(long, value_enum, default_value_t = Precision::F32)]
    precision: Precision,
    /// Training modes: `key=value` overrides of the pre-training config, applied last (e.g. `batch.ssl=4`).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// `pretrain-step` / `recon-step`: add the median seconds of each phase of the step (each
    /// objective's forward, backward, clipping, optimiser, teacher EMA) to the line as `phases`.
    #[arg(long)]
    profile: bool,
}

/// Run the benchmark and print one JSON line.
pub fn bench(a: &BenchArgs, device: Device) -> Result<()> {
    match a.mode {
        BenchMode::Reconstruct => bench_reconstruct(a, device),
        BenchMode::PretrainStep | BenchMode::ReconStep => bench_train_step(a, device),
        BenchMode::DitTrainStep | BenchMode::DitSample => bench_dit(a, device),
    }
}

/// `--mode reconstruct`.
fn bench_reconstruct(a: &BenchArgs, device: Device) -> Result<()> {
    let model = a.model.load(device)?;
    tch::manual_seed(a.model.seed + 1);
    let x = Tensor::randn([a.batch, 3, a.size, a.size], (Kind::Float, device));
    let times = timed(a, device, |_| {
        drop(model.get_latents_decoded_images(&model.get_reconstruction_latents(&x)?)?);
        Ok(())
    })?;
    let median = times[times.len() / 2];
    let line = serde_json::json!({
        "impl": "vtp-rs", "preset": a.model.model.clone().unwrap_or(a.model.preset.clone()), "mode": "reconstruct",
        "size": a.size, "batch": a.batch, "threads": tch::get_num_threads(), "device": format!("{device:?}"),
        "img_per_s": a.batch as f64 / median, "s_per_iter": median, "s_per_iter_min": times[0],
        "iters": a.iters, "warmup": a.warmup,
    });
    println!("{line}");
    Ok(())
}

/// The pre-training config of a training mode: the preset, the mode's batch and crop sizes, the
/// L1-only reconstruction loss, no stochastic depth, then `--set`.
fn train_config(a: &BenchArgs) -> Result<PretrainConfig> {
    if a.model.model.is_some() {
        bail!("--mode {} trains a random --preset model; --model is not supported", a.mode.name());
    }
    let (b, s) = (a.batch, a.size);
    let mut overrides = match a.mode {
        BenchMode::PretrainStep => vec![
            format!("batch.clip={b}"),
            format!("batch.ssl={}", (b / 4).max(2)),
            format!("batch.recon={}", (b / 8).max(1)),
            format!("data.clip_size={s}"),
        ],
        // As `pytorch_vtp.py --mode train-step --optim`: no gradient clipping (and `ae` runs no teacher EMA).
        _ => vec![
            "objectives=ae".into(),
            format!("batch.clip={b}"),
            "batch.ssl=0".into(),
            format!("batch.recon={b}"),
            "optim.clip_grad=0".into(),
        ],
    };
    overrides.push(format!("data.recon_size={s}"));
    overrides.push(format!("train.precision={}", a.precision.name()));
    for o in ["loss.lpips=false", "loss.clip_drop_path=0.0", "loss.ssl_drop_path=0.0", "loss.rec_drop_path=0.0"] {
        overrides.push(o.into());
    }
    overrides.extend(a.set.iter().cloned());
    PretrainConfig::load(&a.model.preset, None, &overrides)
}

/// This rank's share (`sizes`) of one batch of `config`, built from synthetic samples large enough
/// for every crop (each rank its own samples).
fn synthetic_batch(config: &PretrainConfig, sizes: &BatchConfig, seed: u64, rank: usize) -> Result<PretrainBatch> {
    let d = &config.data;
    let res = [d.clip_size, d.global_size, d.recon_size].into_iter().max().unwrap_or(d.recon_size);
    let spec = format!("synthetic:train?n={}&res={res}", config.batch.clip);
    let samples: Vec<Sample> = source::open(&spec, &StreamOptions::default())?.collect::<Result<_>>()?;
    let mine = &samples[rank * sizes.clip..(rank + 1) * sizes.clip];
    let builder = BatchBuilder::new(config, sizes);
    Ok(builder.build(mine, &mut ChaCha8Rng::seed_from_u64(seed + rank as u64)))
}

/// `--mode pretrain-step` / `recon-step`: times `Pretrainer::step` (with gradients) on one batch;
/// under `vtp launch` / torchrun every rank steps on its share of the global batch (data parallel)
/// and rank 0 prints the line.
fn bench_train_step(a: &BenchArgs, device: Device) -> Result<()> {
    let config = train_config(a)?;
    let dp = Arc::new(DataParallel::join(&config.dist)?);
    let sizes = local_batch(&config.batch, &dp)?;
    let batch = synthetic_batch(&config, &sizes, a.model.seed as u64, dp.rank())?.to_device(device);
    let schedules = Schedules::new(&config.schedule, config.train.steps)?;
    let mut trainer = Pretrainer::new(config.clone(), ReconLoss::new(None), device, dp.clone())?;
    trainer.profile = a.profile.then(StepProfile::default);
    let mut rss = serde_json::Map::new();
    let times = timed(a, device, |i| {
        if let (true, Some(profile)) = (i == a.warmup, &mut trainer.profile) {
            profile.clear();
        }
        let (_, _, skipped) = tch::with_grad(|| trainer.step(&batch, &schedules.at(i as u64), false))?;
        if skipped {
            bail!("step {i} had a non-finite loss or gradient");
        }
        if [19, 199].contains(&i) {
            rss.insert(format!("rss_after_{}_mib", i + 1), proc_status_mib("VmRSS").into());
        }
        Ok(())
    })?;
    let median = times[times.len() / 2];
    let (c, images) = (&config, if a.mode == BenchMode::PretrainStep { config.batch.clip } else { config.batch.recon });
    let mut line = serde_json::json!({
        "impl": "vtp-rs", "preset": c.preset, "mode": a.mode.name(), "objectives": c.objectives,
        "batch": c.batch.clip, "batch_ssl": c.batch.ssl, "batch_recon": c.batch.recon, "clip_size": c.data.clip_size,
        "global_size": c.data.global_size, "local_size": c.data.local_size, "n_local_crops": c.data.n_local_crops,
        "recon_size": c.data.recon_size, "dino_out_dim": c.dino_head.out_dim, "threads": tch::get_num_threads(),
        "device": format!("{device:?}"), "precision": c.train.precision, "img_per_s": images as f64 / median,
        "s_per_iter": median, "s_per_iter_min": times[0], "iters": a.iters, "warmup": a.warmup,
        "peak_rss_mib": proc_status_mib("VmHWM"), "world": dp.world(), "overlap": c.dist.overlap,
    });
    line.as_object_mut().expect("a JSON object").extend(rss);
    if let Some(p) = &trainer.profile {
        line["phases"] = p.medians().into_iter().map(|(k, v)| (k.to_string(), serde_json::json!(v))).collect();
    }
    if dp.is_main() {
        println!("{line}");
    }
    Ok(())
}

/// `--mode dit-train-step` / `dit-sample` on a random DiT of preset `--preset`.
fn bench_dit(a: &BenchArgs, device: Device) -> Result<()> {
    tch::manual_seed(a.model.seed);
    let model = LightningDit::new(DitConfig::preset(&a.model.preset)?, device)?;
    let c = model.config().clone();
    let shape = [a.batch, c.in_channels, c.input_size, c.input_size];
    let x1 = Tensor::randn(shape, (Kind::Float, device));
    let y = Tensor::randint(c.num_classes, [a.batch], (Kind::Int64, device));
    let mut optim = dit_optimizer(&model, AdamWConfig { beta1: 0.9, beta2: 0.95, ..AdamWConfig::default() });
    let sampler = SamplerConfig { steps: a.steps + 1, shift: 0.0, ..SamplerConfig::default() };
    let times = timed(a, device, |i| {
        if a.mode == BenchMode::DitTrainStep {
            let single = DataParallel::single();
            let recipe = FlowRecipe {
                time: TimeSampling::OFFICIAL,
                cosine_loss: true,
                precision: a.precision,
                lr: 2e-4,
                weight_decay: 0.0,
                clip_grad: 0.0,
            };
            let r = tch::with_grad(|| flow_step(&model, &mut optim, (&x1, &y), &recipe, false, &single))?;
            if r.skipped {
                bail!("step {i} had a non-finite loss or gradient");
            }
        } else {
            let z = Tensor::randn(shape, (Kind::Float, device));
            drop(sampler::sample(&z, &sampler, |x, t| model.forward(x, t, &y, false)));
        }
        Ok(())
    })?;
    let median = times[times.len() / 2];
    let line = serde_json::json!({
        "impl": "vtp-rs", "preset": a.model.preset, "mode": a.mode.name(), "batch": a.batch,
        "steps": if a.mode == BenchMode::DitSample { Some(a.steps) } else { None },
        "threads": tch::get_num_threads(), "device": format!("{device:?}"), "precision": a.precision,
        "it_per_s": 1.0 / median, "img_per_s": a.batch as f64 / median, "s_per_iter": median, "s_per_iter_min": times[0],
        "iters": a.iters, "warmup": a.warmup, "params": model.num_parameters(), "peak_rss_mib": proc_status_mib("VmHWM"),
    });
    println!("{line}");
    Ok(())
}

/// Runs `iteration(i)` for `--warmup` + `--iters` iterations (waiting for the GPU after each) and
/// returns the timed iterations' seconds, sorted.
fn timed(a: &BenchArgs, device: Device, mut iteration: impl FnMut(usize) -> Result<()>) -> Result<Vec<f64>> {
    let mut times = Vec::with_capacity(a.iters);
    for i in 0..a.warmup + a.iters {
        let t0 = Instant::now();
        iteration(i)?;
        synchronize(device);
        if i >= a.warmup {
            times.push(t0.elapsed().as_secs_f64());
        }
    }
    if times.is_empty() {
        bail!("--iters must be at least 1");
    }
    times.sort_by(f64::total_cmp);
    Ok(times)
}

/// A memory field of `/proc/self/status` (`VmRSS`, `VmHWM`, …) in MiB; `None` where unavailable.
fn proc_status_mib(field: &str) -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.strip_prefix(field).is_some_and(|r| r.starts_with(':')))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some((kib / 1024.0 * 10.0).round() / 10.0)
}

/// Waits for the GPU so the timings cover the work (no-op on the CPU).
fn synchronize(device: Device) {
    if let Device::Cuda(i) = device {
        tch::Cuda::synchronize(i as i64);
    }
}
