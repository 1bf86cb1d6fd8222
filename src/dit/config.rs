//! The `vtp dit train` configuration (spec §5.4 "DiT configs", §8.7): one TOML section per concern,
//! presets, dotted overrides and commented printing through the same machinery as `vtp pretrain`.
use super::cache::{CacheManifest, LatentCache};
use super::model::DitConfig;
use super::sampler::SamplerConfig;
use super::transport::TimeSampling;
use crate::dist::DistConfig;
use crate::train::config::{
    commented_toml, key_doc, load_layered, CheckpointConfig, DebugConfig, LogConfig, TrainConfig,
};
use crate::train::optim::AdamWConfig;
use crate::train::run::RunConfig;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Preset names of [`DitTrainConfig::preset`].
pub const DIT_PRESETS: [&str; 2] = ["tiny", "xl"];

/// The whole `vtp dit train` run.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DitTrainConfig {
    pub preset: String,
    /// The latent cache folder (`vtp dit extract --out`).
    pub cache: String,
    /// Latent statistics instead of the cache's: a released name or a file ("" = the cache's).
    #[serde(default)]
    pub stats: String,
    pub train: TrainConfig,
    pub batch: DitBatchConfig,
    pub transport: TransportConfig,
    pub optim: DitOptimConfig,
    pub ema: EmaConfig,
    pub sample: SamplerConfig,
    pub eval: DitEvalConfig,
    pub log: LogConfig,
    pub checkpoint: CheckpointConfig,
    /// `[dist]`: the multi-process job's timeouts and gradient buckets.
    #[serde(default)]
    pub dist: crate::dist::DistConfig,
    #[serde(default)]
    pub debug: DebugConfig,
    pub model: DitConfig,
}

/// `[batch]`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DitBatchConfig {
    pub size: usize,
}

/// `[transport]`: the time distribution and the loss (spec §5.4 "Flow-matching objective").
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TransportConfig {
    /// `logit-normal` or `uniform`.
    pub time: String,
    pub mu: f64,
    pub sigma: f64,
    pub cosine_loss: bool,
}

impl TransportConfig {
    /// The time distribution these keys name.
    pub fn time_sampling(&self) -> Result<TimeSampling> {
        match self.time.as_str() {
            "logit-normal" => Ok(TimeSampling::LogitNormal { mu: self.mu, sigma: self.sigma }),
            "uniform" => Ok(TimeSampling::Uniform),
            other => bail!("transport.time must be logit-normal or uniform, got '{other}'"),
        }
    }
}

/// `[optim]`: AdamW with a constant learning rate.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DitOptimConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    pub clip_grad: f64,
    /// AdamW as ATen's fused kernel (`torch.optim.AdamW(fused=True)`); false = PyTorch's single-tensor update.
    #[serde(default = "crate::train::optim::fused_by_default")]
    pub fused: bool,
}

/// `[ema]`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct EmaConfig {
    pub decay: f64,
}

/// `[eval]`: the EMA's fixed-batch flow loss and the sample grid.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DitEvalConfig {
    pub every: u64,
    pub samples: usize,
    pub grid_every: u64,
    pub grid_images: usize,
}

impl DitTrainConfig {
    /// The default config of a preset.
    pub fn preset(name: &str) -> Result<Self> {
        match name {
            "tiny" => Ok(Self::tiny()),
            "xl" => Ok(Self::xl()),
            _ => bail!("unknown preset '{name}' (expected one of {})", DIT_PRESETS.join(", ")),
        }
    }

    /// `tiny`: a 4-block, 128-wide LightningDiT for the tiny tokenizer's 4×4×64 latents on a 2-core CPU
    /// (a few minutes); the cache's shape and class count fill `model.input_size / in_channels /
    /// num_classes` (0 = from the cache).
    fn tiny() -> Self {
        Self {
            preset: "tiny".into(),
            cache: String::new(),
            stats: String::new(),
            train: TrainConfig::new(2000, true, 5),
            batch: DitBatchConfig { size: 64 },
            transport: TransportConfig::official(),
            // EMA 0.999 over 2000 steps still holds ~14 % of the zero-initialised start and lags ~1000
            // steps: its samples were per-patch noise while the raw weights drew scenes (README
            // "Generation", `benches/dit_diagnose.py`). lr 2e-3: the 128-wide model learns 4× faster.
            optim: DitOptimConfig { lr: 2e-3, ..DitOptimConfig::lightningdit() },
            ema: EmaConfig { decay: 0.99 },
            sample: SamplerConfig { steps: 50, shift: 0.3, ..SamplerConfig::default() },
            eval: DitEvalConfig { every: 500, samples: 256, grid_every: 500, grid_images: 8 },
            log: LogConfig { every: 10 },
            checkpoint: CheckpointConfig { every: 500, keep: 2 },
            dist: crate::dist::DistConfig::default(),
            debug: DebugConfig::default(),
            model: DitConfig {
                input_size: 0,
                in_channels: 0,
                num_classes: 0,
                hidden_size: 128,
                depth: 4,
                num_heads: 4,
                ..DitConfig::preset("tiny").expect("built-in preset")
            },
        }
    }

    /// `xl`: VTP's generation recipe (spec §5.4): LightningDiT-XL/1 on 16×16×64 latents, batch 1024,
    /// 100k steps, AdamW 2e-4 (0.9, 0.95), EMA 0.9999, Euler 250 points with shift 0.075, no CFG.
    fn xl() -> Self {
        Self {
            preset: "xl".into(),
            cache: String::new(),
            stats: String::new(),
            train: TrainConfig::new(100_000, false, 20),
            batch: DitBatchConfig { size: 1024 },
            transport: TransportConfig::official(),
            optim: DitOptimConfig::lightningdit(),
            ema: EmaConfig { decay: 0.9999 },
            sample: SamplerConfig::default(),
            eval: DitEvalConfig { every: 5000, samples: 1024, grid_every: 5000, grid_images: 8 },
            log: LogConfig { every: 100 },
            checkpoint: CheckpointConfig { every: 20_000, keep: 3 },
            dist: crate::dist::DistConfig::default(),
            debug: DebugConfig::default(),
            model: DitConfig { num_classes: 0, ..DitConfig::preset("XL").expect("built-in preset") },
        }
    }

    /// A preset, then a TOML file over it, then `key=value` overrides; validated except for the
    /// cache-dependent sizes ([`Self::resolve`]).
    pub fn load(preset: &str, file: Option<&Path>, overrides: &[String]) -> Result<Self> {
        let config: Self = load_layered(Self::preset, preset, file, overrides)?;
        config.validate()?;
        Ok(config)
    }

    /// Checks what a run cannot train, with a one-line reason.
    pub fn validate(&self) -> Result<()> {
        let positive =
            [("train.steps", self.train.steps), ("log.every", self.log.every), ("batch.size", self.batch.size as u64)];
        if let Some((name, _)) = positive.iter().find(|(_, v)| *v == 0) {
            bail!("{name} must be at least 1");
        }
        self.transport.time_sampling()?;
        self.sample.validate().context("config [sample]")?;
        if !(0.0..=1.0).contains(&self.ema.decay) {
            bail!("ema.decay must be in [0, 1], got {}", self.ema.decay);
        }
        Ok(())
    }

    /// Fills the sizes left at 0 (`model.input_size`, `in_channels`, `num_classes`) from the cache's
    /// manifest, then checks the model against it: the latent grid must be `input_size²` and the class
    /// count the cache's.
    pub fn resolve(&mut self, manifest: &CacheManifest) -> Result<()> {
        let [c, h, w] = manifest.latent_shape;
        let m = &mut self.model;
        for (slot, value) in
            [(&mut m.input_size, h), (&mut m.in_channels, c), (&mut m.num_classes, manifest.num_classes)]
        {
            if *slot == 0 {
                *slot = value;
            }
        }
        if h != w || m.input_size != h || m.in_channels != c {
            bail!(
                "the cache's latents are {c}×{h}×{w} but the model expects {}×{s}×{s} (model.in_channels, \
                 model.input_size)",
                m.in_channels,
                s = m.input_size
            );
        }
        if m.num_classes != manifest.num_classes {
            bail!("model.num_classes = {} but the cache has {} classes", m.num_classes, manifest.num_classes);
        }
        m.validate().context("config [model]")
    }

    /// [`Self::resolve`]'s checks against a loaded cache, and its statistics' channel count.
    pub fn check_cache(&self, cache: &LatentCache) -> Result<()> {
        let mut resolved = self.clone();
        resolved.resolve(&cache.manifest)?;
        if resolved != *self {
            bail!("the model sizes are not resolved against the cache");
        }
        cache.stats.check_channels(self.model.in_channels)
    }

    /// The config as commented TOML: every key preceded by what it means (`--print-config`).
    pub fn to_commented_toml(&self) -> Result<String> {
        commented_toml(self, DIT_HEADER, dit_key_doc)
    }
}

impl TransportConfig {
    /// What the official LightningDiT `transport` runs for the VTP configs: logit-normal (0, 1) times
    /// (the configs' stated mu/sigma are not read, fixtures LOSSES.md §8) and the cosine loss.
    fn official() -> Self {
        Self { time: "logit-normal".into(), mu: 0.0, sigma: 1.0, cosine_loss: true }
    }
}

impl DitOptimConfig {
    /// The VTP DiT configs: AdamW lr 2e-4 constant, betas (0.9, 0.95), no weight decay, no clipping.
    fn lightningdit() -> Self {
        Self { lr: 2e-4, beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.0, clip_grad: 0.0, fused: true }
    }

    /// The AdamW hyper-parameters.
    pub fn adamw(&self) -> AdamWConfig {
        AdamWConfig { beta1: self.beta1, beta2: self.beta2, eps: self.eps, fused: self.fused }
    }
}

/// The first lines of `vtp dit train --print-config`.
const DIT_HEADER: &str = "# vtp dit train configuration (spec §5.4, §8): LightningDiT trained by flow matching on a latent cache\n# (t = 0 noise, t = 1 data, velocity target x1 − x0, loss mean(mse) + mean(1 − cos)).\n";

/// What each key of [`DitTrainConfig`] means; `train.*`, `log.*`, `checkpoint.*`, `debug.*` fall back to
/// `vtp pretrain`'s table.
pub fn dit_key_doc(path: &str) -> &'static str {
    DIT_KEY_DOCS.iter().find(|(k, _)| *k == path).map_or_else(|| key_doc(path), |(_, d)| *d)
}

const DIT_KEY_DOCS: &[(&str, &str)] = &[
    (
        "preset",
        "the preset these defaults come from: tiny (2-core CPU, the tiny tokenizer's latents) or xl (VTP's recipe)",
    ),
    ("cache", "the latent cache folder written by `vtp dit extract` (latents, labels, statistics)"),
    ("stats", "latent statistics instead of the cache's: vtp-s, vtp-b, vtp-l (released, spec §5.4) or a file; \"\" = the cache's"),
    ("train.seed", "seed of every random draw (init, batch order, flips, times, noise, label dropout)"),
    ("train.deterministic", "draw every step's randomness from (seed, step) so --resume is bit-identical"),
    ("batch.size", "latents per step [VTP: 1024 global]"),
    ("transport.time", "training time distribution: logit-normal (t = sigmoid(N(mu, sigma))) or uniform"),
    ("transport.mu", "logit-normal mean [official code: 0; VTP configs state −0.5 (S/B), −0.75 (L), unread]"),
    ("transport.sigma", "logit-normal std [official code: 1; VTP configs state 1.25 (S/B), 1.0 (L), unread]"),
    ("transport.cosine_loss", "add mean(1 − cos over channels) to the velocity MSE [VTP: true]"),
    ("optim.lr", "constant AdamW learning rate [VTP: 2e-4]"),
    ("optim.beta1", "AdamW beta1 [VTP: 0.9]"),
    ("optim.beta2", "AdamW beta2 [VTP: 0.95]"),
    ("optim.eps", "AdamW epsilon [torch default: 1e-8]"),
    ("optim.fused", crate::train::optim::FUSED_DOC),
    ("optim.weight_decay", "decoupled weight decay [VTP: 0]"),
    ("optim.clip_grad", "gradient-norm clipping threshold, 0 = off [VTP: off]"),
    ("ema.decay", "EMA decay per step; the EMA weights are sampled and exported [VTP: 0.9999]"),
    ("sample.method", "ODE integrator of the sample grids and `vtp dit sample`: euler or heun [VTP: euler]"),
    ("sample.steps", "time-grid points linspace(0, 1, steps) (steps − 1 integration steps) [VTP: 250]"),
    ("sample.shift", "timestep shift s: t ← s·t / (1 + (s − 1)·t), 0 = off [VTP: 0.075]"),
    ("sample.cfg_scale", "classifier-free guidance scale, 1 = off [VTP: 1]"),
    ("sample.cfg_interval_start", "guidance off while t < this [VTP: 0]"),
    ("eval.every", "EMA flow loss on a fixed batch (eval/flow_loss) every N steps, 0 = off"),
    ("eval.samples", "latents in that fixed batch (the cache's first ones, fixed noise and times)"),
    ("eval.grid_every", "sample grid (one row per class, decoded by the tokenizer) every N steps, 0 = off"),
    ("eval.grid_images", "samples per grid row"),
    ("model.input_size", "latent side (0 = from the cache) [VTP: 16]"),
    ("model.patch_size", "patch side of the x_embedder [VTP: 1]"),
    ("model.in_channels", "latent channels (0 = from the cache) [VTP: 64]"),
    ("model.hidden_size", "transformer width [XL: 1152]"),
    ("model.depth", "blocks [XL: 28]"),
    ("model.num_heads", "attention heads [XL: 16]"),
    ("model.mlp_ratio", "MLP hidden = int(hidden·ratio), SwiGLU int(2/3·that) [4]"),
    ("model.class_dropout_prob", "training label dropout to the null class (CFG) [0.1]"),
    ("model.num_classes", "classes (0 = from the cache) [ImageNet: 1000]"),
    ("model.learn_sigma", "predict 2·C channels and use the first C [VTP: false]"),
    ("model.use_qknorm", "per-head q/k norm [VTP: false]"),
    ("model.use_swiglu", "SwiGLU FFN instead of GELU-tanh MLP [VTP: true]"),
    ("model.use_rope", "2-D RoPE on q and k [VTP: true]"),
    ("model.use_rmsnorm", "RMSNorm instead of affine-free LayerNorm [VTP: true]"),
    ("model.wo_shift", "adaLN modulation without shifts [VTP: false]"),
];

impl RunConfig for DitTrainConfig {
    fn load(preset: &str, file: Option<&Path>, overrides: &[String]) -> Result<Self> {
        DitTrainConfig::load(preset, file, overrides)
    }

    fn to_commented_toml(&self) -> Result<String> {
        DitTrainConfig::to_commented_toml(self)
    }

    fn dist(&self) -> &DistConfig {
        &self.dist
    }
}
