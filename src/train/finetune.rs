//! Stage 2, `vtp finetune-decoder` (spec §4.7): the visual tokenizer (encoder + bottleneck, hence the
//! latent space) is frozen and only the pixel decoder is trained, with LightningDiT's / LDM's
//! `LPIPSWithDiscriminator` objective ([`super::discriminator`]):
//! `L_G = L1 + w_p·LPIPS + w·disc_factor·(−mean D(x̂))` on the decoder and the hinge loss on a
//! PatchGAN discriminator, each with its own AdamW, on the shared run loop ([`super::run`]).
//!
//! One step: latents of the batch under no_grad, the decoder's reconstruction `x̂`, the generator
//! loss and its backward (decoder gradients only reach the decoder's AdamW), then, from
//! `loss.disc_start` on, the discriminator's hinge loss on `x` and `x̂.detach()` and its backward.
//! Both updates are applied only when every loss and gradient norm is finite, so a skipped step
//! changes nothing. (The reference trains with Lightning's two-optimiser loop, which re-decodes the
//! batch with the just-updated decoder for the discriminator step; here the discriminator sees the
//! step's own reconstruction, the common manual-optimisation variant, which keeps steps atomic.)
//! Before `disc_start` the adversarial term and the discriminator step are skipped altogether (the
//! reference multiplies them by `disc_factor = 0`, which leaves every weight where it is).
use super::batch::render;
use super::checkpoint::restore_into;
use super::config::{
    commented_toml, key_doc, load_layered, CheckpointConfig, DebugConfig, EvalConfig, LogConfig, TrainConfig,
};
use super::discriminator::{adaptive_weight, generator_loss, hinge_d_loss, NLayerDiscriminator};
use super::feed::{BatchQueue, DataFeed, RankPositions};
use super::objectives::recon::ReconLoss;
use super::online::{online_evaluation, ReconGrid};
use super::optim::{clip_grad_norm, dinov2_param_specs, AdamW, AdamWConfig};
use super::precision::f32;
use super::pretrain::step_seed;
use super::run::{RunOptions, StepReport, Trainer};
use super::schedule::CosineScheduler;
use crate::data::augment::{Augment, ReconCrop};
use crate::data::source::StreamOptions;
use crate::data::Sample;
use crate::dist::DataParallel;
use crate::model::fingerprint::tensors_fingerprint;
use crate::model::VtpModel;
use anyhow::{bail, Context, Result};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tch::{nn, Kind, Tensor};

/// Names accepted by [`FinetuneConfig::preset`].
pub const FINETUNE_PRESETS: [&str; 2] = ["tiny", "default"];

/// Prefix of the trained parameters' official names: the pixel decoder.
pub const DECODER_PREFIX: &str = "pixel_decoder.";

/// The decoder's last layer, on which the adaptive weight is computed (spec §1.4: the final 1×1 conv).
pub const LAST_LAYER: &str = "pixel_decoder.proj_out.weight";

/// `[data]`: training and held-out sources and the reconstruction crop.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FinetuneDataConfig {
    pub source: String,
    pub eval_source: String,
    pub workers: usize,
    pub shuffle_buffer: usize,
    pub recon_size: i64,
}

/// `[batch]`: images per step.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FinetuneBatchConfig {
    pub size: usize,
}

/// `[loss]`: `LPIPSWithDiscriminator`'s settings (spec §4.7).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct GanLossConfig {
    pub lpips: bool,
    pub perceptual_weight: f64,
    pub disc_weight: f64,
    pub disc_start: u64,
    pub disc_layers: i64,
    pub disc_channels: i64,
}

/// `[optim]`: the two AdamWs (decoder and discriminator) and gradient clipping.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FinetuneOptimConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    pub clip_grad: f64,
    pub disc_lr_mult: f64,
    /// AdamW as ATen's fused kernel (`torch.optim.AdamW(fused=True)`); false = PyTorch's single-tensor update.
    #[serde(default = "crate::train::optim::fused_by_default")]
    pub fused: bool,
}

/// `[schedule]`: the learning rate (linear warm-up from 0, then cosine to `min_lr`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LrScheduleConfig {
    pub lr: f64,
    pub min_lr: f64,
    pub warmup_steps: u64,
}

/// The whole stage-2 run (`vtp finetune-decoder`), one section per concern; `model` is the
/// tokenizer being fine-tuned (`--model`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FinetuneConfig {
    pub preset: String,
    pub model: String,
    pub train: TrainConfig,
    pub data: FinetuneDataConfig,
    pub batch: FinetuneBatchConfig,
    pub loss: GanLossConfig,
    pub optim: FinetuneOptimConfig,
    pub schedule: LrScheduleConfig,
    pub eval: EvalConfig,
    pub log: LogConfig,
    pub checkpoint: CheckpointConfig,
    /// `[dist]`: the multi-process job's timeouts and gradient buckets.
    #[serde(default)]
    pub dist: crate::dist::DistConfig,
    #[serde(default)]
    pub debug: DebugConfig,
}

impl FinetuneConfig {
    /// The default config of a preset (`model` empty: it comes from `--model`).
    pub fn preset(name: &str) -> Result<Self> {
        match name {
            "tiny" => Ok(Self::tiny()),
            "default" => Ok(Self::default_preset()),
            _ => bail!("unknown preset '{name}' (expected one of {})", FINETUNE_PRESETS.join(", ")),
        }
    }

    /// `tiny`: a few hundred steps on the built-in synthetic scenes, for a 2-core CPU.
    fn tiny() -> Self {
        Self {
            preset: "tiny".into(),
            model: String::new(),
            train: TrainConfig::new(300, true, 5),
            data: FinetuneDataConfig {
                source: "synthetic:train?res=64".into(),
                eval_source: "synthetic:heldout?n=64&res=64".into(),
                workers: 2,
                shuffle_buffer: 0,
                recon_size: 64,
            },
            batch: FinetuneBatchConfig { size: 8 },
            loss: GanLossConfig { disc_start: 100, ..GanLossConfig::ldm() },
            optim: FinetuneOptimConfig::ldm(),
            schedule: LrScheduleConfig { lr: 5e-4, min_lr: 5e-5, warmup_steps: 20 },
            eval: EvalConfig {
                every: 100,
                samples: 64,
                classes: String::new(),
                probe_source: String::new(),
                probe_samples: 0,
                grid_every: 100,
                grid_images: 8,
            },
            log: LogConfig { every: 10 },
            checkpoint: CheckpointConfig { every: 100, keep: 2 },
            dist: crate::dist::DistConfig::default(),
            debug: DebugConfig::default(),
        }
    }

    /// `default`: the LDM recipe at 256 px for a released tokenizer; the step counts are this
    /// project's choice (the paper publishes none, spec §4.7).
    fn default_preset() -> Self {
        Self {
            preset: "default".into(),
            model: String::new(),
            train: TrainConfig::new(50_000, false, 20),
            data: FinetuneDataConfig {
                source: "synthetic:train".into(),
                eval_source: "synthetic:heldout?n=1000".into(),
                workers: 8,
                shuffle_buffer: 1000,
                recon_size: 256,
            },
            batch: FinetuneBatchConfig { size: 32 },
            loss: GanLossConfig::ldm(),
            optim: FinetuneOptimConfig::ldm(),
            schedule: LrScheduleConfig { lr: 1e-4, min_lr: 1e-4, warmup_steps: 0 },
            eval: EvalConfig {
                every: 2000,
                samples: 1000,
                classes: String::new(),
                probe_source: String::new(),
                probe_samples: 0,
                grid_every: 2000,
                grid_images: 8,
            },
            log: LogConfig { every: 20 },
            checkpoint: CheckpointConfig { every: 1000, keep: 3 },
            dist: crate::dist::DistConfig::default(),
            debug: DebugConfig::default(),
        }
    }

    /// A preset, then a TOML file over it, then `key=value` overrides; validated.
    pub fn load(preset: &str, file: Option<&Path>, overrides: &[String]) -> Result<Self> {
        let config: Self = load_layered(Self::preset, preset, file, overrides)?;
        config.validate()?;
        Ok(config)
    }

    /// Checks what a run cannot train, with a one-line reason (the model-dependent checks are in
    /// [`FinetuneRun::new`]).
    pub fn validate(&self) -> Result<()> {
        let positive = [
            ("train.steps", self.train.steps),
            ("log.every", self.log.every),
            ("data.workers", self.data.workers as u64),
            ("batch.size", self.batch.size as u64),
            ("loss.disc_layers", self.loss.disc_layers.max(0) as u64),
            ("loss.disc_channels", self.loss.disc_channels.max(0) as u64),
        ];
        if let Some((name, _)) = positive.iter().find(|(_, v)| *v == 0) {
            bail!("{name} must be at least 1");
        }
        self.lr_schedule().context("config [schedule]")?;
        Ok(())
    }

    /// The learning-rate schedule over `train.steps`.
    pub fn lr_schedule(&self) -> Result<CosineScheduler> {
        let s = &self.schedule;
        CosineScheduler::new(s.lr, s.min_lr, self.train.steps, s.warmup_steps, 0.0, 0)
    }

    /// The loop settings of this config.
    pub fn run_options(&self) -> RunOptions {
        RunOptions::from_config(&self.train, &self.log, &self.eval, &self.checkpoint)
    }

    /// The config as commented TOML: every key preceded by what it means (`--print-config`).
    pub fn to_commented_toml(&self) -> Result<String> {
        commented_toml(self, FINETUNE_HEADER, finetune_key_doc)
    }
}

impl GanLossConfig {
    /// `LPIPSWithDiscriminator`'s defaults (LDM / VA-VAE): `w_p = 1`, `disc_weight = 0.5`, a 3-layer,
    /// 64-channel PatchGAN; the discriminator starts at step 5000 (LDM's autoencoders use 50k, VA-VAE 1:
    /// [unknown] for VTP).
    fn ldm() -> Self {
        Self {
            lpips: true,
            perceptual_weight: 1.0,
            disc_weight: 0.5,
            disc_start: 5000,
            disc_layers: 3,
            disc_channels: 64,
        }
    }
}

impl FinetuneOptimConfig {
    /// LDM's `Adam(betas = (0.5, 0.9))` for both networks, no weight decay, no clipping, the same lr.
    fn ldm() -> Self {
        Self { beta1: 0.5, beta2: 0.9, eps: 1e-8, weight_decay: 0.0, clip_grad: 0.0, disc_lr_mult: 1.0, fused: true }
    }

    /// The AdamW hyper-parameters.
    pub fn adamw(&self) -> AdamWConfig {
        AdamWConfig { beta1: self.beta1, beta2: self.beta2, eps: self.eps, fused: self.fused }
    }

    /// The clipping threshold for [`clip_grad_norm`] (0 = off: the norm is only measured).
    fn max_norm(&self) -> f64 {
        if self.clip_grad > 0.0 {
            self.clip_grad
        } else {
            f64::INFINITY
        }
    }
}

/// The first lines of `vtp finetune-decoder --print-config`.
const FINETUNE_HEADER: &str = "# vtp finetune-decoder configuration (spec §4.7): the encoder and bottleneck are frozen, the pixel\n# decoder is trained with L1 + LPIPS + a PatchGAN (LDM `LPIPSWithDiscriminator`).\n";

/// What each key of [`FinetuneConfig`] means; keys shared with `vtp pretrain` fall back to its table.
pub fn finetune_key_doc(path: &str) -> &'static str {
    FINETUNE_KEY_DOCS.iter().find(|(k, _)| *k == path).map_or_else(|| key_doc(path), |(_, d)| *d)
}

const FINETUNE_KEY_DOCS: &[(&str, &str)] = &[
    (
        "preset",
        "the preset these defaults come from: tiny (2-core CPU, synthetic data) or default (LDM recipe, 256 px)",
    ),
    (
        "model",
        "the tokenizer to fine-tune (--model): a released-format folder or hf:ORG/NAME; only its pixel decoder changes",
    ),
    ("train.seed", "seed of every random draw (data order, crops, discriminator init)"),
    ("data.eval_source", "held-out data SPEC of the online evaluation (PSNR, SSIM) and the reconstruction grid"),
    ("data.recon_size", "crop side (random square crop, flipped); a multiple of the patch size"),
    ("batch.size", "images per step (both the decoder and the discriminator step)"),
    ("loss.lpips", "add LPIPS-VGG to L1 (needs its weight files; without them L1 alone, said once and recorded)"),
    ("loss.perceptual_weight", "weight w_p of LPIPS in L_rec = L1 + w_p·LPIPS [LDM: 1]"),
    ("loss.disc_weight", "factor on the adaptive weight of the generator's adversarial term [LDM: 0.5]"),
    (
        "loss.disc_start",
        "0-based step from which the adversarial term and the discriminator are trained [unknown for VTP]",
    ),
    ("loss.disc_layers", "strided layers of the PatchGAN discriminator [LDM: 3]"),
    ("loss.disc_channels", "base channels of the PatchGAN discriminator (doubled per layer, capped at 8x) [LDM: 64]"),
    ("optim.beta1", "AdamW beta1 of both optimisers [LDM: 0.5]"),
    ("optim.beta2", "AdamW beta2 of both optimisers [LDM: 0.9]"),
    ("optim.eps", "AdamW epsilon of both optimisers [LDM: 1e-8]"),
    ("optim.fused", crate::train::optim::FUSED_DOC),
    ("optim.weight_decay", "decoupled weight decay of both optimisers, not on biases and norms [LDM: 0]"),
    ("optim.clip_grad", "gradient-norm clipping threshold of each network, 0 = off [LDM: off]"),
    ("optim.disc_lr_mult", "discriminator lr = this x the decoder's lr [LDM: 1]"),
    ("schedule.lr", "decoder learning rate after warm-up [LDM: 1e-4 base, constant]"),
    ("schedule.min_lr", "final learning rate of the cosine decay (= lr: constant)"),
    ("schedule.warmup_steps", "linear lr warm-up from 0"),
    ("eval.every", "online evaluation (PSNR, SSIM on data.eval_source) every N steps, 0 = off"),
    ("eval.classes", "zero-shot class set also evaluated (it must not move: the encoder is frozen); \"\" = off"),
    ("eval.probe_source", "training images of online linear probes of the frozen encoder (\"\" = off)"),
    ("eval.probe_samples", "images of eval.probe_source the probes train on"),
];

/// The generator side of one step: its loss and named terms (scalars).
pub struct GeneratorLosses {
    pub total: Tensor,
    pub terms: Vec<(&'static str, Tensor)>,
}

/// What one step computed, for its report.
pub struct StepOutcome {
    pub generator: GeneratorLosses,
    /// `(d_loss, mean D(x), mean D(x̂))` from `disc_start` on.
    pub disc: Option<(Tensor, Tensor, Tensor)>,
    pub grad_norm: f64,
    pub disc_grad_norm: f64,
    pub skipped: bool,
}

/// `vtp finetune-decoder`'s run: the frozen tokenizer, its trained decoder, the discriminator, the
/// two optimisers and the data feed.
pub struct FinetuneRun {
    pub config: FinetuneConfig,
    pub model: VtpModel,
    /// The discriminator's store (not part of the released tokenizer).
    pub disc_vs: nn::VarStore,
    pub disc: NLayerDiscriminator,
    recon: ReconLoss,
    decoder_optim: AdamW,
    disc_optim: AdamW,
    last_layer: Tensor,
    lr: CosineScheduler,
    /// The data feed and the crops, one step ahead on a thread of their own.
    batches: BatchQueue<Tensor>,
    grid: ReconGrid,
    /// A checksum of the frozen weights, stored in checkpoints: a resume must load the same tokenizer.
    frozen_fingerprint: String,
    /// This process's place in the job and every rank's data position.
    dp: Arc<DataParallel>,
    feeds: RankPositions,
}

/// The model's parameters whose name starts (or not, `!decoder`) with [`DECODER_PREFIX`], sorted.
fn named_parameters(model: &VtpModel, decoder: bool) -> Vec<(String, Tensor)> {
    let mut named: Vec<(String, Tensor)> =
        model.vs.variables().into_iter().filter(|(k, _)| k.starts_with(DECODER_PREFIX) == decoder).collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    named
}

/// Every tensor of a store, sorted by name.
fn sorted_variables(vs: &nn::VarStore) -> Vec<(String, Tensor)> {
    let mut named: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    named
}

/// An AdamW over `named` (weight decay off for biases, norms and vectors, as in pre-training).
fn adamw(named: Vec<(String, Tensor)>, config: AdamWConfig) -> AdamW {
    AdamW::new(dinov2_param_specs(named, 0, 1.0, 1.0), config)
}

impl FinetuneRun {
    /// A fresh run of `config` on the tokenizer `model` with the reconstruction loss `recon`: the
    /// encoder, bottleneck and every other non-decoder weight frozen, the discriminator seeded by
    /// `train.seed`; over several processes (`dp`) each rank reads its slice of the data and takes
    /// `batch.size / world` images a step, all starting from rank 0's decoder and discriminator.
    pub fn new(config: FinetuneConfig, model: VtpModel, recon: ReconLoss, dp: Arc<DataParallel>) -> Result<Self> {
        check_model(&config, &model)?;
        let local_batch = dp.local_rows(config.batch.size as i64).context("batch.size")?.1 as usize;
        let frozen = named_parameters(&model, false);
        for (_, t) in &frozen {
            let _ = t.set_requires_grad(false);
        }
        let frozen_fingerprint = tensors_fingerprint(&frozen)?;
        tch::manual_seed(config.train.seed as i64);
        let disc_vs = nn::VarStore::new(model.device());
        let l = &config.loss;
        let disc = NLayerDiscriminator::new(&disc_vs.root() / "discriminator", 3, l.disc_channels, l.disc_layers);
        let d_out = disc.output_size(config.data.recon_size);
        if d_out < 1 {
            bail!(
                "data.recon_size = {} is too small for a {}-layer discriminator (its output would be {d_out} pixels)",
                config.data.recon_size,
                l.disc_layers
            );
        }
        let adam = config.optim.adamw();
        let decoder_optim = adamw(named_parameters(&model, true), adam);
        let disc_optim = adamw(sorted_variables(&disc_vs), adam);
        let last_layer = model.vs.variables().remove(LAST_LAYER).context("the model has no pixel decoder")?;
        let trained: Vec<Tensor> =
            named_parameters(&model, true).into_iter().chain(sorted_variables(&disc_vs)).map(|(_, t)| t).collect();
        dp.broadcast_from_main(&trained)?;
        let feed = DataFeed::open(&config.data.source, stream_options(&config, &dp), None)?;
        let crop = ReconCrop::new(config.data.recon_size);
        let rank_seed = dp.rank_seed(config.train.seed);
        let build = move |step: u64, samples: &[Sample]| {
            let mut rng = ChaCha8Rng::seed_from_u64(step_seed(rank_seed, step));
            render(samples.iter().collect(), &mut rng, |s, r| crop.apply(&s.image, r))
        };
        let batches = BatchQueue::new(feed, local_batch, Arc::new(build));
        let (data, eval) = (&config.data, &config.eval);
        let grid = ReconGrid::new(&data.eval_source, eval.grid_images, model.config.vision_patch_size, data.recon_size);
        Ok(Self {
            lr: config.lr_schedule()?,
            config,
            model,
            disc_vs,
            disc,
            recon,
            decoder_optim,
            disc_optim,
            last_layer,
            batches,
            grid,
            frozen_fingerprint,
            dp,
            feeds: RankPositions::default(),
        })
    }

    /// The loop settings of this run's config.
    pub fn run_options(&self) -> RunOptions {
        self.config.run_options()
    }

    /// The generator loss of the reconstruction `x̂` of `images`: `L_rec = L1 + w_p·LPIPS`, plus the
    /// adaptively weighted `−mean D(x̂)` when `adversarial`.
    fn generator_losses(&self, images: &Tensor, recon: &Tensor, adversarial: bool) -> Result<GeneratorLosses> {
        let l = &self.config.loss;
        let r = self.recon.forward(images, recon)?;
        // Out of place: `r.l1` is reported as its own term.
        let rec = match &r.lpips {
            Some(p) => &r.l1 + p * l.perceptual_weight,
            None => r.l1.shallow_clone(),
        };
        let mut terms = vec![("rec_l1", r.l1)];
        terms.extend(r.lpips.map(|p| ("rec_lpips", p)));
        terms.push(("rec", rec.shallow_clone()));
        if !adversarial {
            return Ok(GeneratorLosses { total: rec, terms });
        }
        let g = generator_loss(&self.discriminate(recon)?);
        let w = adaptive_weight(&rec, &g, &self.last_layer, l.disc_weight);
        let total = &rec + &w * &g;
        terms.push(("g", g));
        terms.push(("d_weight", w));
        Ok(GeneratorLosses { total, terms })
    }

    /// Runs a forward pass in the run's precision (`train.precision`).
    fn amp<T>(&self, forward: impl FnOnce() -> T) -> Result<T> {
        self.config.train.precision.autocast(self.model.device(), forward)
    }

    /// The discriminator's logits of `images`, in f32.
    fn discriminate(&self, images: &Tensor) -> Result<Tensor> {
        Ok(f32(&self.amp(|| self.disc.forward(images))?))
    }

    /// The discriminator's hinge loss on real `images` and detached `fake`s, and its mean logits.
    fn disc_losses(&self, images: &Tensor, fake: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let (real, fake) = (self.discriminate(images)?, self.discriminate(fake)?);
        Ok((hinge_d_loss(&real, &fake), real.mean(Kind::Float), fake.mean(Kind::Float)))
    }

    /// Whether the scalar loss `t` is finite on every rank (so that all ranks skip together).
    fn finite_everywhere(&self, t: &Tensor) -> Result<bool> {
        Ok(self.dp.mean(&[t.double_value(&[])])?[0].is_finite())
    }

    /// One step on `images` (this rank's share) at `step` with learning rate `lr` (see the module
    /// doc), gradients averaged over the ranks; `inject_nan` (tests) makes the generator loss NaN. The
    /// adaptive GAN weight is each rank's own, as in taming-transformers under DDP.
    pub fn step(&mut self, images: &Tensor, step: u64, lr: f64, inject_nan: bool) -> Result<StepOutcome> {
        let adversarial = step >= self.config.loss.disc_start;
        let max_norm = self.config.optim.max_norm();
        self.decoder_optim.zero_grad();
        let recon = f32(&self.amp(|| {
            let latents = tch::no_grad(|| self.model.get_reconstruction_latents(images))?;
            self.model.get_latents_decoded_images(&latents)
        })??);
        let mut generator = self.generator_losses(images, &recon, adversarial)?;
        if inject_nan {
            generator.total = &generator.total * f64::NAN;
        }
        let mut grad_norm = f64::NAN;
        if self.finite_everywhere(&generator.total)? {
            let decoder_params = params(&self.decoder_optim);
            self.dp.backward(&generator.total, &decoder_params)?;
            grad_norm = clip_grad_norm(&decoder_params, max_norm);
        }
        // The generator's backward also reached the discriminator: those gradients are dropped.
        self.disc_optim.zero_grad();
        let disc = adversarial.then(|| self.disc_losses(images, &recon.detach())).transpose()?;
        let mut disc_grad_norm = 0.0;
        if let Some((d_loss, _, _)) = &disc {
            disc_grad_norm = f64::NAN;
            if self.finite_everywhere(d_loss)? {
                let disc_params = params(&self.disc_optim);
                self.dp.backward(d_loss, &disc_params)?;
                disc_grad_norm = clip_grad_norm(&disc_params, max_norm);
            }
        }
        let skipped = !grad_norm.is_finite() || !disc_grad_norm.is_finite();
        if skipped {
            self.decoder_optim.zero_grad();
            self.disc_optim.zero_grad();
        } else {
            let wd = self.config.optim.weight_decay;
            self.decoder_optim.step(lr, wd, lr)?;
            if adversarial {
                let disc_lr = lr * self.config.optim.disc_lr_mult;
                self.disc_optim.step(disc_lr, wd, disc_lr)?;
            }
        }
        Ok(StepOutcome { generator, disc, grad_norm, disc_grad_norm, skipped })
    }

    /// The step's scalars: every loss term and the discriminator's logits (means over the ranks), lr
    /// and gradient norms.
    fn scalars(&self, o: &StepOutcome, lr: f64) -> Result<Vec<(String, f64)>> {
        let mut terms: Vec<(String, &Tensor)> = vec![("loss/total".to_string(), &o.generator.total)];
        for (k, v) in &o.generator.terms {
            terms.push((if *k == "d_weight" { k.to_string() } else { format!("loss/{k}") }, v));
        }
        if let Some((d, real, fake)) = &o.disc {
            terms.extend([("loss/d".into(), d), ("disc/logits_real".into(), real), ("disc/logits_fake".into(), fake)]);
        }
        let values: Vec<f64> = terms.iter().map(|(_, t)| t.double_value(&[])).collect();
        let mut out: Vec<(String, f64)> = terms.into_iter().map(|(k, _)| k).zip(self.dp.mean(&values)?).collect();
        if o.disc.is_some() {
            out.push(("disc_grad_norm".into(), o.disc_grad_norm));
        }
        out.push(("lr".into(), lr));
        out.push(("grad_norm".into(), o.grad_norm));
        out.push(("data/skipped_samples".into(), self.batches.skipped().total() as f64));
        out.push(("data/wait_s".into(), self.batches.wait_s()));
        Ok(out)
    }

    /// Every tensor a checkpoint holds: the decoder, the discriminator and both optimisers' moments.
    fn state_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = named_parameters(&self.model, true);
        out.extend(sorted_variables(&self.disc_vs));
        out.extend(self.decoder_optim.state_tensors());
        out.extend(self.disc_optim.state_tensors());
        out
    }
}

/// The optimised tensors of `optim`.
fn params(optim: &AdamW) -> Vec<Tensor> {
    optim.params().iter().map(|p| p.tensor.shallow_clone()).collect()
}

/// The model-dependent checks: a pixel decoder, a crop that is a multiple of the patch size.
fn check_model(config: &FinetuneConfig, model: &VtpModel) -> Result<()> {
    if model.pixel_decoder.is_none() {
        bail!("model '{}' has no pixel decoder (train_reconstruction = false)", config.model);
    }
    let (p, s) = (model.config.vision_patch_size, config.data.recon_size);
    if s < p || s % p != 0 {
        bail!("data.recon_size = {s} must be a positive multiple of the patch size {p}");
    }
    Ok(())
}

/// The stream options of the training source for rank `dp.rank()` of `dp.world()`.
fn stream_options(c: &FinetuneConfig, dp: &DataParallel) -> StreamOptions {
    StreamOptions {
        rank: dp.rank(),
        world_size: dp.world(),
        workers: c.data.workers,
        shuffle_buffer: c.data.shuffle_buffer,
        seed: c.train.seed,
        ..StreamOptions::default()
    }
}

impl Trainer for FinetuneRun {
    fn train_step(&mut self, step: u64) -> Result<StepReport> {
        let seed = step_seed(self.dp.rank_seed(self.config.train.seed), step);
        tch::manual_seed(seed as i64);
        let (images, samples) = self.batches.next(step)?;
        let lr = self.lr.value(step);
        let inject_nan = self.config.debug.nan_at_steps.contains(&step);
        let outcome = self.step(&images.to_device(self.model.device()), step, lr, inject_nan)?;
        let images = samples * self.dp.world();
        Ok(StepReport { scalars: self.scalars(&outcome, lr)?, images, skipped: outcome.skipped, warnings: Vec::new() })
    }

    fn evaluate(&mut self, _step: u64) -> Result<Vec<(String, f64)>> {
        let c = &self.config;
        online_evaluation(&self.model, &c.data.eval_source, &c.eval, c.data.recon_size, c.data.recon_size)
    }

    fn snapshot(&mut self, step: u64, dir: &Path) -> Result<PathBuf> {
        self.grid.save(&self.model, step, dir)
    }

    /// Gathers every rank's data position (all ranks, before rank 0 writes a checkpoint).
    fn sync_state(&mut self) -> Result<()> {
        self.feeds = RankPositions::gather(self.batches.position(), &self.dp)?;
        Ok(())
    }

    fn checkpoint(&self) -> (Vec<(String, Tensor)>, serde_json::Value) {
        let mut state = self.feeds.state(self.batches.position(), &self.dp);
        state["config"] = serde_json::json!(self.config);
        state["frozen_fingerprint"] = serde_json::json!(self.frozen_fingerprint);
        (self.state_tensors(), state)
    }

    fn restore(&mut self, tensors: &HashMap<String, Tensor>, state: &serde_json::Value) -> Result<()> {
        if state["frozen_fingerprint"].as_str() != Some(self.frozen_fingerprint.as_str()) {
            bail!("--resume: the checkpoint was trained on another tokenizer than '{}'", self.config.model);
        }
        let mut live = named_parameters(&self.model, true);
        live.extend(sorted_variables(&self.disc_vs));
        restore_into(&live, tensors, "")?;
        self.decoder_optim.load_state_tensors(tensors)?;
        self.disc_optim.load_state_tensors(tensors)?;
        let position = RankPositions::saved(state, &self.dp)?;
        let feed = DataFeed::open(&self.config.data.source, stream_options(&self.config, &self.dp), Some(&position))?;
        self.batches.restart(feed);
        Ok(())
    }

    fn export(&self, dir: &Path) -> Result<()> {
        self.model.save(dir)
    }
}
