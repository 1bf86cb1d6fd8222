//! `vtp dit train` (docs/design.md §5.4, §8.7): LightningDiT trained by flow matching on a latent cache, on the
//! run machinery every trainer shares ([`crate::train::run`]: progress, metrics, plots, atomic
//! checkpoints, bit-identical resume, non-finite step handling). Each step draws a batch of cached
//! latents (or their flipped copies, with probability ½), normalises them with the cache's statistics,
//! samples `t` and the noise, and takes one AdamW step on `mean(cos) + mean(mse)`, then updates the EMA
//! whose weights are sampled and exported.
use super::cache::{LatentCache, STATS};
use super::model::{GuidedChannels, LightningDit};
use super::sampler::{self, SamplerConfig};
use super::stats::LatentStats;
use super::transport::{self, FlowLoss, TimeSampling};
use crate::dist::DataParallel;
use crate::model::VtpModel;
use crate::train::checkpoint::restore_into;
use crate::train::ema::ema_update;
use crate::train::online::save_grid;
use crate::train::optim::{AdamW, AdamWConfig, ParamSpec};
use crate::train::precision::{f32, Precision};
use crate::train::run::{RunOptions, StepReport, Trainer};
use crate::train::step::{guarded_backward, step_seed};
use anyhow::{bail, Context, Result};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tch::{Device, Kind, Tensor};

pub use super::config::{DitTrainConfig, DIT_PRESETS};

/// What an exported DiT folder holds besides `config.json` + `model.safetensors` (the EMA weights in the
/// official layout) and [`STATS`]: where its latents come from, so sampling decodes with the right
/// tokenizer and checks it.
pub const DIT_INFO: &str = "dit.json";

/// The provenance of a DiT: its tokenizer and class labels (`dit.json`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DitInfo {
    /// The tokenizer whose latents the DiT models (a released-format folder or `hf:` spec).
    pub tokenizer: String,
    /// Its weight fingerprint (checked before decoding).
    pub fingerprint: String,
    /// The label set of the class labels and its class count.
    pub label_set: String,
    pub num_classes: i64,
    /// Image side the tokenizer encoded.
    pub image_size: i64,
    /// The sampler the run used for its grids.
    pub sampler: SamplerConfig,
}

/// A trained DiT as `vtp dit sample` / `fid` use it: EMA weights, latent statistics, provenance.
pub struct TrainedDit {
    pub model: LightningDit,
    pub stats: LatentStats,
    pub info: DitInfo,
}

impl TrainedDit {
    /// Loads an exported DiT folder (`config.json`, `model.safetensors`, [`STATS`], [`DIT_INFO`]) or a
    /// `vtp dit train` checkpoint folder (`checkpoints/step-*`: its EMA weights, statistics and info).
    pub fn load(dir: &Path, device: Device) -> Result<Self> {
        if dir.join(crate::train::checkpoint::STATE_FILE).is_file() {
            return Self::load_checkpoint(dir, device);
        }
        let model = LightningDit::load_dir(dir, device)?;
        let stats = LatentStats::load(&dir.join(STATS))
            .with_context(|| format!("DiT '{}': latent statistics missing or unreadable", dir.display()))?;
        stats.check_channels(model.config().in_channels)?;
        let path = dir.join(DIT_INFO);
        let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read '{}'", path.display()))?;
        let info = serde_json::from_str(&text).with_context(|| format!("'{}' is malformed", path.display()))?;
        Ok(Self { model, stats, info })
    }

    /// The EMA model, statistics and info of a training checkpoint.
    fn load_checkpoint(dir: &Path, device: Device) -> Result<Self> {
        let (tensors, state) = crate::train::checkpoint::load(dir)?;
        let what = || format!("checkpoint '{}'", dir.display());
        let config: DitTrainConfig = serde_json::from_value(state["config"].clone()).with_context(what)?;
        let info: DitInfo = serde_json::from_value(state["info"].clone()).with_context(what)?;
        let model = LightningDit::new(config.model, device)?;
        restore_into(&model.named_parameters(), &tensors, "ema.").with_context(what)?;
        let stats = LatentStats::from_tensors(&tensors, "latent_stats.").with_context(what)?;
        Ok(Self { model, stats, info })
    }

    /// Writes the folder [`Self::load`] reads.
    pub fn save(model: &LightningDit, stats: &LatentStats, info: &DitInfo, dir: &Path) -> Result<()> {
        model.save_dir(dir)?;
        stats.save(&dir.join(STATS))?;
        crate::io::write_atomic(&dir.join(DIT_INFO), serde_json::to_string_pretty(info)?.as_bytes())
    }

    /// The tokenizer of [`DitInfo::tokenizer`] (or `over`), checked against the recorded fingerprint.
    pub fn tokenizer(&self, over: Option<&str>, device: Device) -> Result<VtpModel> {
        let spec = over.unwrap_or(&self.info.tokenizer);
        let model = VtpModel::load(&crate::hub::resolve_model_dir(spec)?, device)?;
        let fingerprint = crate::model::fingerprint::model_fingerprint(&model)?;
        if fingerprint != self.info.fingerprint {
            bail!(
                "tokenizer '{spec}' (fingerprint {fingerprint}) is not the one this DiT was trained on ({})",
                self.info.fingerprint
            );
        }
        Ok(model)
    }
}

/// `n` samples from the DiT `model` for class labels `y` (`[n]` int64): Gaussian noise integrated by
/// `sampler` (with guidance when `cfg_scale > 1`, every channel guided unless `first_three`), then
/// de-normalised by `stats` — the latents to decode. Draws the noise from torch's generator.
pub fn sample_latents(
    model: &LightningDit,
    stats: &LatentStats,
    y: &Tensor,
    config: &SamplerConfig,
    guided: GuidedChannels,
    progress: impl FnMut(usize, usize),
) -> Tensor {
    let c = model.config();
    let n = y.size()[0];
    let x0 = Tensor::randn([n, c.in_channels, c.input_size, c.input_size], (Kind::Float, model.device()));
    let interval = (config.cfg_interval_start > 0.0).then_some(config.cfg_interval_start);
    let velocity = |x: &Tensor, t: &Tensor| {
        if config.uses_cfg() {
            model.guided_forward(x, t, y, config.cfg_scale, interval, guided)
        } else {
            model.forward(x, t, y, false)
        }
    };
    let x1 = tch::no_grad(|| sampler::sample_with_progress(&x0, config, velocity, progress));
    stats.denormalise(&x1)
}

/// The `vtp dit train` run: model, EMA, optimiser and the cached latents.
pub struct DitRun {
    config: DitTrainConfig,
    cache: LatentCache,
    model: LightningDit,
    ema: LightningDit,
    optim: AdamW,
    tokenizer: VtpModel,
    info: DitInfo,
    time: TimeSampling,
    dp: Arc<DataParallel>,
}

impl DitRun {
    /// A fresh run of `config` on `cache` (whose tokenizer `tokenizer` decodes the sample grids), this
    /// process being `dp`'s rank: every rank holds the whole cache and takes its rows of each batch;
    /// the weights start as rank 0's.
    pub fn new(
        config: DitTrainConfig,
        cache: LatentCache,
        tokenizer: VtpModel,
        device: Device,
        dp: Arc<DataParallel>,
    ) -> Result<Self> {
        config.check_cache(&cache)?;
        dp.local_rows(config.batch.size as i64).context("batch.size")?;
        tch::manual_seed(config.train.seed as i64);
        let model = LightningDit::new(config.model.clone(), device)?;
        let mut ema = LightningDit::new(config.model.clone(), device)?;
        ema.vs_mut().copy(model.vs())?;
        ema.vs_mut().freeze();
        let weights: Vec<Tensor> = [&model, &ema].iter().flat_map(|m| m.named_parameters()).map(|(_, t)| t).collect();
        dp.broadcast_from_main(&weights)?;
        let o = &config.optim;
        let optim = dit_optimizer(&model, o.adamw());
        let m = &cache.manifest;
        let info = DitInfo {
            tokenizer: m.tokenizer.clone(),
            fingerprint: m.fingerprint.clone(),
            label_set: m.label_set.clone(),
            num_classes: m.num_classes,
            image_size: m.image_size,
            sampler: config.sample.clone(),
        };
        let cache = cache.to_device(device);
        let time = config.transport.time_sampling()?;
        Ok(Self { config, cache, model, ema, optim, tokenizer, info, time, dp })
    }

    /// The loop settings of this run's config.
    pub fn run_options(&self) -> RunOptions {
        let c = &self.config;
        RunOptions {
            steps: c.train.steps,
            log_every: c.log.every,
            eval_every: c.eval.every,
            grid_every: c.eval.grid_every,
            checkpoint_every: c.checkpoint.every,
            keep: c.checkpoint.keep,
            max_bad_steps: c.train.max_bad_steps,
            tf32: c.train.tf32,
            stop_after: None,
        }
    }

    /// The cache indices of step `step`: consecutive slices of one seeded permutation per epoch
    /// (a batch may straddle two epochs), a function of (seed, step) only.
    fn batch_indices(&self, step: u64) -> Tensor {
        let n = self.cache.len() as u64;
        let b = self.config.batch.size as u64;
        let mut out = Vec::with_capacity(b as usize);
        let mut perm: Option<(u64, Vec<i64>)> = None;
        for q in step * b..(step + 1) * b {
            let epoch = q / n;
            if perm.as_ref().is_none_or(|(e, _)| *e != epoch) {
                let mut order: Vec<i64> = (0..n as i64).collect();
                order.shuffle(&mut ChaCha8Rng::seed_from_u64(step_seed(self.config.train.seed, epoch)));
                perm = Some((epoch, order));
            }
            out.push(perm.as_ref().expect("just set").1[(q % n) as usize]);
        }
        Tensor::from_slice(&out).to_device(self.cache.labels.device())
    }

    /// The flow-matching loss of `model` on the normalised latents `x1` with labels `y`, times `t`
    /// and noise `x0` (label dropout when `train`).
    fn loss(&self, model: &LightningDit, x1: &Tensor, x0: &Tensor, t: &Tensor, y: &Tensor, train: bool) -> FlowLoss {
        let velocity = |xt: &Tensor, t: &Tensor| model.forward(xt, t, y, train);
        transport::training_loss(velocity, x1, x0, t, self.config.transport.cosine_loss)
    }
}

/// What one flow-matching step reports: the global batch's loss terms, the gradient norm (before
/// clipping) and whether the update was skipped.
#[derive(Debug, Clone, Copy)]
pub struct FlowStep {
    pub total: f64,
    pub mse: f64,
    pub cos: f64,
    pub grad_norm: f64,
    pub skipped: bool,
}

/// The recipe of one flow-matching step ([`flow_step`]): the time distribution, the loss, the
/// forward precision and the optimiser's learning rate, weight decay and clipping (0 = off).
#[derive(Clone, Copy, Debug)]
pub struct FlowRecipe {
    pub time: TimeSampling,
    pub cosine_loss: bool,
    pub precision: Precision,
    pub lr: f64,
    pub weight_decay: f64,
    pub clip_grad: f64,
}

/// One flow-matching optimisation step of `model` on the global batch of normalised latents `x1`
/// with labels `y`: times from `recipe.time`, noise `x0 ~ N(0, I)` and label dropout drawn for the
/// whole batch (torch's generator, in that order), this rank's rows of all four (`dp`), the velocity
/// predicted in `recipe.precision` and the loss `mean(cos) + mean(mse)` in f32, backward, gradients
/// averaged over the ranks, gradient-norm clipping, AdamW. Any number of ranks thus takes the step
/// one process takes on the same batch. A non-finite loss (or `inject_nan`) or gradient norm skips
/// the update on every rank.
pub fn flow_step(
    model: &LightningDit,
    optim: &mut AdamW,
    (x1, y): (&Tensor, &Tensor),
    recipe: &FlowRecipe,
    inject_nan: bool,
    dp: &DataParallel,
) -> Result<FlowStep> {
    let t = transport::sample_t(x1.size()[0], &recipe.time, x1.device());
    let x0 = x1.randn_like();
    let y = model.drop_labels(y);
    let (x1, x0, t, y) = (dp.shard(x1)?, dp.shard(&x0)?, dp.shard(&t)?, dp.shard(&y)?);
    optim.zero_grad();
    let (xt, ut) = transport::interpolate(&x0, &x1, &t);
    let pred = recipe.precision.autocast(xt.device(), || model.forward(&xt, &t, &y, false))?;
    let mut loss = transport::loss(&f32(&pred), &ut, recipe.cosine_loss);
    if inject_nan {
        loss.total = &loss.total * f64::NAN;
    }
    let local = [&loss.total, &loss.mse, &loss.cos].map(|v| v.double_value(&[]));
    let [total, mse, cos] = <[f64; 3]>::try_from(dp.mean(&local)?).expect("three values");
    let params: Vec<Tensor> = optim.params().iter().map(|p| p.tensor.shallow_clone()).collect();
    let grad_norm = guarded_backward(&loss.total, total, &params, recipe.clip_grad, dp, None)?;
    let skipped = !grad_norm.is_finite();
    if skipped {
        optim.zero_grad();
    } else {
        optim.step(recipe.lr, recipe.weight_decay, recipe.lr)?;
    }
    Ok(FlowStep { total, mse, cos, grad_norm, skipped })
}

/// AdamW over every trainable parameter of `model` (one group: no per-parameter multipliers, as
/// LightningDiT's `train.py`).
pub fn dit_optimizer(model: &LightningDit, config: AdamWConfig) -> AdamW {
    let params = model
        .named_parameters()
        .into_iter()
        .map(|(name, tensor)| ParamSpec { name, tensor, lr_mult: 1.0, wd_mult: 1.0, is_last_layer: false })
        .collect();
    AdamW::new(params, config)
}

impl Trainer for DitRun {
    fn train_step(&mut self, step: u64) -> Result<StepReport> {
        tch::manual_seed(step_seed(self.config.train.seed, step) as i64);
        let indices = self.batch_indices(step);
        let b = indices.size()[0];
        // `np.random.uniform(0, 1) > 0.5` keeps the plain latent: flip below ½.
        let flip = Tensor::rand([b], (Kind::Float, self.model.device())).le(0.5);
        let (x1, y) = self.cache.batch(&indices, &flip);
        let (c, o) = (&self.config, &self.config.optim);
        let inject_nan = c.debug.nan_at_steps.contains(&step);
        let recipe = FlowRecipe {
            time: self.time,
            cosine_loss: c.transport.cosine_loss,
            precision: c.train.precision,
            lr: o.lr,
            weight_decay: o.weight_decay,
            clip_grad: o.clip_grad,
        };
        let r = flow_step(&self.model, &mut self.optim, (&x1, &y), &recipe, inject_nan, &self.dp)?;
        if !r.skipped {
            let live: HashMap<String, Tensor> = self.model.named_parameters().into_iter().collect();
            let pairs = self.ema.named_parameters().into_iter().map(|(k, e)| (e, &live[&k]));
            ema_update(pairs, c.ema.decay);
        }
        let scalars = vec![
            ("loss/total".to_string(), r.total),
            ("loss/mse".to_string(), r.mse),
            ("loss/cos".to_string(), r.cos),
            ("lr".to_string(), o.lr),
            ("grad_norm".to_string(), r.grad_norm),
        ];
        Ok(StepReport { scalars, images: b as usize, skipped: r.skipped, warnings: Vec::new() })
    }

    /// The EMA model's flow loss on a fixed batch (the first `eval.samples` cached latents, fixed
    /// noise and times): `eval/flow_loss`, `eval/flow_mse`.
    fn evaluate(&mut self, _step: u64) -> Result<Vec<(String, f64)>> {
        let _guard = tch::no_grad_guard();
        let n = (self.config.eval.samples as i64).min(self.cache.len());
        let device = self.model.device();
        let indices = Tensor::arange(n, (Kind::Int64, device));
        let (x1, y) = self.cache.batch(&indices, &Tensor::zeros([n], (Kind::Bool, device)));
        tch::manual_seed(self.config.train.seed as i64 ^ 0x5eed);
        let t = Tensor::rand([n], (Kind::Float, device));
        let x0 = x1.randn_like();
        let loss = self.loss(&self.ema, &x1, &x0, &t, &y, false);
        Ok(vec![
            ("eval/flow_loss".to_string(), loss.total.double_value(&[])),
            ("eval/flow_mse".to_string(), loss.mse.double_value(&[])),
        ])
    }

    /// `dir/samples-<step>.png`: EMA samples from fixed noise, one row per class (up to 8 rows of
    /// `eval.grid_images` columns), decoded by the tokenizer.
    fn snapshot(&mut self, step: u64, dir: &Path) -> Result<PathBuf> {
        let classes = self.info.num_classes.min(8);
        let per_row = self.config.eval.grid_images.max(1) as i64;
        let device = self.model.device();
        let y = Tensor::arange(classes, (Kind::Int64, device)).repeat_interleave_self_int(per_row, 0, None);
        tch::manual_seed(self.config.train.seed as i64 ^ 0x9a1d);
        let z = sample_latents(&self.ema, &self.cache.stats, &y, &self.config.sample, GuidedChannels::All, |_, _| {});
        let images = tch::no_grad(|| self.tokenizer.get_latents_decoded_images(&z))?.to_device(Device::Cpu);
        let rows: Vec<Tensor> = images.split(per_row, 0);
        let path = dir.join(format!("samples-{step:08}.png"));
        save_grid(&path, &rows)?;
        Ok(path)
    }

    fn checkpoint(&self) -> (Vec<(String, Tensor)>, serde_json::Value) {
        let mut tensors: Vec<(String, Tensor)> =
            self.model.named_parameters().into_iter().map(|(k, v)| (format!("model.{k}"), v)).collect();
        tensors.extend(self.ema.named_parameters().into_iter().map(|(k, v)| (format!("ema.{k}"), v)));
        tensors.extend(self.optim.state_tensors());
        tensors.extend(self.cache.stats.named_tensors("latent_stats."));
        let state = serde_json::json!({ "config": self.config, "info": self.info });
        (tensors, state)
    }

    fn restore(&mut self, tensors: &HashMap<String, Tensor>, _state: &serde_json::Value) -> Result<()> {
        let saved = LatentStats::from_tensors(tensors, "latent_stats.").context("the checkpoint")?;
        if !saved.mean.equal(&self.cache.stats.mean.to_device(Device::Cpu))
            || !saved.std.equal(&self.cache.stats.std.to_device(Device::Cpu))
        {
            bail!(
                "the checkpoint's latent statistics differ from the cache's: resume with the cache it was trained on"
            );
        }
        restore_into(&self.model.named_parameters(), tensors, "model.")?;
        restore_into(&self.ema.named_parameters(), tensors, "ema.")?;
        self.optim.load_state_tensors(tensors)
    }

    /// The EMA weights in the official layout, with the latent statistics and provenance.
    fn export(&self, dir: &Path) -> Result<()> {
        TrainedDit::save(&self.ema, &self.cache.stats, &self.info, dir)
    }
}
