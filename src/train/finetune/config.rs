//! `vtp finetune-decoder`'s configuration (docs/design.md §4.7): the tokenizer to fine-tune, data, batch, the
//! GAN loss, the two optimisers and the learning-rate schedule, on the shared sections of
//! [`crate::train::config`].
use crate::dist::DistConfig;
use crate::train::config::{
    commented_toml, field_doc, load_layered, shared_key_doc, CheckpointConfig, ConfigDocs, DebugConfig, EvalConfig,
    LogConfig, TrainConfig,
};
use crate::train::optim::AdamWConfig;
use crate::train::run::{RunConfig, RunOptions};
use crate::train::schedule::{check_lr_warmup, fit_warmups, CosineScheduler, WarmupLength};
use anyhow::{bail, Context, Result};
use documented::DocumentedFields;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Names accepted by [`FinetuneConfig::preset`].
pub const FINETUNE_PRESETS: [&str; 2] = ["tiny", "default"];

/// `[data]`: training and held-out sources and the reconstruction crop.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, DocumentedFields)]
#[serde(deny_unknown_fields)]
pub struct FinetuneDataConfig {
    /// Training data SPEC: synthetic[:split][?n=&res=&seed=&zoom=&colorless=&group=], shards {a..b}.tar,
    /// or a folder (README: Data).
    pub source: String,
    /// Held-out data SPEC of the online evaluation (PSNR, SSIM) and the reconstruction grid.
    pub eval_source: String,
    /// Data reader threads.
    pub workers: usize,
    /// Shuffle-buffer slots per reader (0 = stored order).
    pub shuffle_buffer: usize,
    /// Crop side (random square crop, flipped); a multiple of the patch size.
    pub recon_size: i64,
}

/// `[batch]`: images per step.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, DocumentedFields)]
#[serde(deny_unknown_fields)]
pub struct FinetuneBatchConfig {
    /// Images per step (both the decoder and the discriminator step).
    pub size: usize,
}

/// `[loss]`: `LPIPSWithDiscriminator`'s settings (docs/design.md §4.7).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, DocumentedFields)]
#[serde(deny_unknown_fields)]
pub struct GanLossConfig {
    /// Add LPIPS-VGG to L1 (needs its weight files; without them L1 alone, said once and recorded).
    pub lpips: bool,
    /// Weight w_p of LPIPS in L_rec = L1 + w_p·LPIPS [LDM: 1].
    pub perceptual_weight: f64,
    /// Factor on the adaptive weight of the generator's adversarial term [LDM: 0.5].
    pub disc_weight: f64,
    /// 0-based step from which the adversarial term and the discriminator are trained [unknown for VTP].
    pub disc_start: u64,
    /// Strided layers of the PatchGAN discriminator [LDM: 3].
    pub disc_layers: i64,
    /// Base channels of the PatchGAN discriminator (doubled per layer, capped at 8x) [LDM: 64].
    pub disc_channels: i64,
}

/// `[optim]`: the two AdamWs (decoder and discriminator) and gradient clipping.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, DocumentedFields)]
#[serde(deny_unknown_fields)]
pub struct FinetuneOptimConfig {
    /// AdamW beta1 of both optimisers [LDM: 0.5].
    pub beta1: f64,
    /// AdamW beta2 of both optimisers [LDM: 0.9].
    pub beta2: f64,
    /// AdamW epsilon of both optimisers [LDM: 1e-8].
    pub eps: f64,
    /// Decoupled weight decay of both optimisers, not on biases and norms [LDM: 0].
    pub weight_decay: f64,
    /// Gradient-norm clipping threshold of each network, 0 = off [LDM: off].
    pub clip_grad: f64,
    /// Discriminator lr = this x the decoder's lr [LDM: 1].
    pub disc_lr_mult: f64,
    #[doc = crate::train::optim::fused_doc!()]
    #[serde(default = "crate::train::optim::fused_by_default")]
    pub fused: bool,
}

/// `[schedule]`: the learning rate (linear warm-up from 0, then cosine to `min_lr`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, DocumentedFields)]
#[serde(deny_unknown_fields)]
pub struct LrScheduleConfig {
    /// Decoder learning rate after warm-up [LDM: 1e-4 base, constant].
    pub lr: f64,
    /// Final learning rate of the cosine decay (= lr: constant).
    pub min_lr: f64,
    /// Linear lr warm-up from 0.
    pub warmup_steps: u64,
}

/// The whole stage-2 run (`vtp finetune-decoder`), one section per concern; `model` is the
/// tokenizer being fine-tuned (`--model`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, DocumentedFields)]
#[serde(deny_unknown_fields)]
pub struct FinetuneConfig {
    /// The preset these defaults come from: tiny (2-core CPU, synthetic data) or default (LDM recipe, 256 px).
    pub preset: String,
    /// The tokenizer to fine-tune (--model): a released-format folder or hf:ORG/NAME; only its pixel decoder
    /// changes.
    pub model: String,
    /// `[train]`: length, seed and failure handling.
    pub train: TrainConfig,
    /// `[data]`: sources and the crop.
    pub data: FinetuneDataConfig,
    /// `[batch]`: images per step.
    pub batch: FinetuneBatchConfig,
    /// `[loss]`: L1 + LPIPS + the PatchGAN.
    pub loss: GanLossConfig,
    /// `[optim]`: the two AdamWs and clipping.
    pub optim: FinetuneOptimConfig,
    /// `[schedule]`: the learning rate.
    pub schedule: LrScheduleConfig,
    /// `[eval]`: online evaluation and reconstruction grid.
    pub eval: EvalConfig,
    /// `[log]`: metrics and plots.
    pub log: LogConfig,
    /// `[checkpoint]`: how often and how many.
    pub checkpoint: CheckpointConfig,
    /// `[dist]`: the multi-process job's timeouts and gradient buckets.
    #[serde(default)]
    pub dist: crate::dist::DistConfig,
    /// `[debug]`: fault injection.
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
    /// project's choice (the paper publishes none, docs/design.md §4.7).
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

    /// A preset, then a TOML file over it, then `key=value` overrides; the lr warm-up fitted to a
    /// short run ([`Self::fit_warmup`]); validated.
    pub fn load(preset: &str, file: Option<&Path>, overrides: &[String]) -> Result<Self> {
        let mut config: Self = load_layered(Self::preset, preset, file, overrides)?;
        config.fit_warmup();
        config.validate()?;
        Ok(config)
    }

    /// Scales the lr warm-up, when still at its preset's value, to a `train.steps` shorter than it
    /// ([`fit_warmups`]), saying so in one line on stderr.
    fn fit_warmup(&mut self) {
        let Ok(preset) = Self::preset(&self.preset) else { return };
        let warmup = &mut self.schedule.warmup_steps;
        let mut lengths = [WarmupLength { name: "lr warm-up", steps: warmup, preset: preset.schedule.warmup_steps }];
        if let Some(note) = fit_warmups(self.train.steps, preset.train.steps, &mut lengths) {
            eprintln!("note: {note}");
        }
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
        check_lr_warmup("schedule.warmup_steps", self.schedule.warmup_steps, self.train.steps)?;
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
        commented_toml(self, FINETUNE_HEADER)
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
}

/// The first lines of `vtp finetune-decoder --print-config`.
const FINETUNE_HEADER: &str = "# vtp finetune-decoder configuration (docs/design.md §4.7): the encoder and bottleneck are frozen, the pixel\n# decoder is trained with L1 + LPIPS + a PatchGAN (LDM `LPIPSWithDiscriminator`).\n";

impl ConfigDocs for FinetuneConfig {
    fn section_key_doc(section: &str, key: &str) -> Option<&'static str> {
        match section {
            "data" => field_doc::<FinetuneDataConfig>(key),
            "batch" => field_doc::<FinetuneBatchConfig>(key),
            "loss" => field_doc::<GanLossConfig>(key),
            "optim" => field_doc::<FinetuneOptimConfig>(key),
            "schedule" => field_doc::<LrScheduleConfig>(key),
            _ => shared_key_doc(section, key),
        }
    }
}

impl RunConfig for FinetuneConfig {
    fn load(preset: &str, file: Option<&Path>, overrides: &[String]) -> Result<Self> {
        FinetuneConfig::load(preset, file, overrides)
    }

    fn to_commented_toml(&self) -> Result<String> {
        FinetuneConfig::to_commented_toml(self)
    }

    fn dist(&self) -> &DistConfig {
        &self.dist
    }
}
