//! The DiT's configurations: the model's `LightningDiT(...)` arguments ([`DitConfig`], its
//! `config.json`, docs/design.md §8.1) and the `vtp dit train` run (docs/design.md §5.4 "DiT configs", §8.7): one TOML
//! section per concern, presets, dotted overrides and commented printing through the same machinery
//! as `vtp pretrain`. The `[sample]` section is the sampler's own [`SamplerConfig`].
use super::cache::{CacheManifest, LatentCache};
use super::sampler::SamplerConfig;
use super::transport::TimeSampling;
use crate::dist::DistConfig;
use crate::io::write_atomic;
use crate::train::config::{
    commented_toml, field_doc, load_layered, shared_key_doc, CheckpointConfig, ConfigDocs, DebugConfig, LogConfig,
    TrainConfig,
};
use crate::train::optim::AdamWConfig;
use crate::train::run::RunConfig;
use anyhow::{bail, Context, Result};
use documented::DocumentedFields;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;

/// The published preset names accepted by [`DitConfig::preset`] (docs/design.md §8.1; "tiny" and "small" are
/// the CPU-sized presets of `pytorch_dit.py`; "B", "L", "XL" without a patch size mean patch 1, as
/// there and in the VTP configs). An optional `LightningDiT-` prefix is accepted too.
pub const PRESET_NAMES: [&str; 15] = [
    "tiny", "small", "B", "B/1", "B/2", "L", "L/1", "L/2", "XL", "XL/1", "XL/2", "1p0B/1", "1p0B/2", "1p6B/1", "1p6B/2",
];

/// `LightningDiT(...)` constructor arguments, named and defaulted as in the official code (docs/design.md §8.1);
/// this is `config.json`. Unknown keys are errors (a `[model]` typo in a training config must not pass
/// silently); [`Self::from_file`] drops the non-architecture keys a `config.json` may carry
/// (`use_checkpoint`, and `_`-prefixed notes such as `_class`, `_derived`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, DocumentedFields)]
#[serde(default, deny_unknown_fields)]
pub struct DitConfig {
    /// Latent height = width (0 in a `vtp dit train` config = from the cache) [VTP: 16].
    pub input_size: i64,
    /// Patch side of the `x_embedder` conv [VTP: 1].
    pub patch_size: i64,
    /// Latent channels (0 in a `vtp dit train` config = from the cache) [VTP: 64].
    pub in_channels: i64,
    /// Transformer width [XL: 1152].
    pub hidden_size: i64,
    /// Number of blocks [XL: 28].
    pub depth: i64,
    /// Attention heads [XL: 16].
    pub num_heads: i64,
    /// MLP hidden = int(hidden_size · mlp_ratio) (SwiGLU: int(2/3 · that)) [4].
    pub mlp_ratio: f64,
    /// Training label dropout to the null class (CFG); > 0 also adds the null-class row `num_classes` [0.1].
    pub class_dropout_prob: f64,
    /// Number of real classes, the null / CFG label being `num_classes` (0 in a `vtp dit train` config = from the
    /// cache) [ImageNet: 1000].
    pub num_classes: i64,
    /// The final layer predicts 2·in_channels channels and `forward` returns the first in_channels [VTP: false].
    pub learn_sigma: bool,
    /// Per-head q/k norm (RMSNorm with use_rmsnorm, else affine LayerNorm eps 1e-5) [VTP: false].
    pub use_qknorm: bool,
    /// SwiGLU FFN (`w12`, `w3`) instead of timm's GELU-tanh `Mlp` (`fc1`, `fc2`) [VTP: true].
    pub use_swiglu: bool,
    /// 2-D RoPE on q and k (`feat_rope`) [VTP: true].
    pub use_rope: bool,
    /// RMSNorm (with weight) instead of affine-free LayerNorm for norm1/norm2/norm_final [VTP: true].
    pub use_rmsnorm: bool,
    /// 4-way adaLN modulation without shifts in the blocks [VTP: false].
    pub wo_shift: bool,
}

impl Default for DitConfig {
    /// The official constructor defaults (docs/design.md §8.1).
    fn default() -> Self {
        Self {
            input_size: 32,
            patch_size: 2,
            in_channels: 32,
            hidden_size: 1152,
            depth: 28,
            num_heads: 16,
            mlp_ratio: 4.0,
            class_dropout_prob: 0.1,
            num_classes: 1000,
            learn_sigma: false,
            use_qknorm: false,
            use_swiglu: false,
            use_rope: false,
            use_rmsnorm: false,
            wo_shift: false,
        }
    }
}

impl DitConfig {
    /// The VTP generation setup (docs/design.md §5.4): 16×16×64 latents, 1000 classes, SwiGLU + RoPE + RMSNorm,
    /// no q/k-norm, with shift; the given size.
    fn vtp(hidden_size: i64, depth: i64, num_heads: i64, patch_size: i64) -> Self {
        Self {
            input_size: 16,
            patch_size,
            in_channels: 64,
            hidden_size,
            depth,
            num_heads,
            num_classes: 1000,
            use_qknorm: false,
            use_swiglu: true,
            use_rope: true,
            use_rmsnorm: true,
            wo_shift: false,
            ..Self::default()
        }
    }

    /// A preset by name ([`PRESET_NAMES`], docs/design.md §8.1) with the VTP options; an unknown name is an error
    /// listing the valid ones.
    pub fn preset(name: &str) -> Result<Self> {
        let (hidden, depth, heads, patch) = match name.strip_prefix("LightningDiT-").unwrap_or(name) {
            "tiny" => (64, 2, 2, 1),
            "small" => (384, 12, 6, 1),
            "B" | "B/1" => (768, 12, 12, 1),
            "B/2" => (768, 12, 12, 2),
            "L" | "L/1" => (1024, 24, 16, 1),
            "L/2" => (1024, 24, 16, 2),
            "XL" | "XL/1" => (1152, 28, 16, 1),
            "XL/2" => (1152, 28, 16, 2),
            "1p0B/1" => (1536, 24, 24, 1),
            "1p0B/2" => (1536, 24, 24, 2),
            "1p6B/1" => (1792, 28, 28, 1),
            "1p6B/2" => (1792, 28, 28, 2),
            _ => bail!("unknown LightningDiT preset '{name}'; valid: {}", PRESET_NAMES.join(", ")),
        };
        Ok(Self::vtp(hidden, depth, heads, patch))
    }

    /// Checks the sizes the architecture needs (docs/design.md §8.2–§8.4): positive sizes, `patch_size` divides
    /// `input_size`, `num_heads` divides `hidden_size`, `hidden_size` divisible by 4 (sin-cos table),
    /// head_dim divisible by 4 with RoPE, a ratio > 0 and a dropout probability in [0, 1].
    pub fn validate(&self) -> Result<()> {
        let sizes = [
            ("input_size", self.input_size),
            ("patch_size", self.patch_size),
            ("in_channels", self.in_channels),
            ("hidden_size", self.hidden_size),
            ("depth", self.depth),
            ("num_heads", self.num_heads),
            ("num_classes", self.num_classes),
        ];
        for (key, v) in sizes {
            if v <= 0 {
                bail!("{key} must be positive, got {v}");
            }
        }
        if self.input_size % self.patch_size != 0 {
            bail!("patch_size {} must divide input_size {}", self.patch_size, self.input_size);
        }
        if self.hidden_size % self.num_heads != 0 {
            bail!("num_heads {} must divide hidden_size {}", self.num_heads, self.hidden_size);
        }
        if self.hidden_size % 4 != 0 {
            bail!("hidden_size {} must be a multiple of 4 (2-D sin-cos table)", self.hidden_size);
        }
        if self.use_rope && self.head_dim() % 4 != 0 {
            bail!("with use_rope the head dim hidden_size/num_heads = {} must be a multiple of 4", self.head_dim());
        }
        if self.mlp_ratio.is_nan() || self.mlp_ratio <= 0.0 || self.mlp_hidden() <= 0 {
            bail!("mlp_ratio must be positive, got {}", self.mlp_ratio);
        }
        if !(0.0..=1.0).contains(&self.class_dropout_prob) {
            bail!("class_dropout_prob must be in [0, 1], got {}", self.class_dropout_prob);
        }
        Ok(())
    }

    /// Reads and validates a `config.json` (`use_checkpoint` and `_`-prefixed keys ignored); errors name
    /// the file.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read config '{}'", path.display()))?;
        let mut value: Value =
            serde_json::from_str(&text).with_context(|| format!("invalid config '{}'", path.display()))?;
        if let Value::Object(map) = &mut value {
            map.retain(|k, _| !k.starts_with('_') && k != "use_checkpoint");
        }
        let config: Self =
            serde_json::from_value(value).with_context(|| format!("invalid config '{}'", path.display()))?;
        config.validate().with_context(|| format!("invalid config '{}'", path.display()))?;
        Ok(config)
    }

    /// Writes `config.json` as `pytorch_dit.py` does: the constructor arguments plus
    /// `use_checkpoint: false`, sorted keys, 2-space indent.
    pub fn to_file(&self, path: &Path) -> Result<()> {
        let mut sorted: BTreeMap<String, Value> = match serde_json::to_value(self)? {
            Value::Object(map) => map.into_iter().collect(),
            _ => unreachable!("a struct serialises to an object"),
        };
        sorted.insert("use_checkpoint".into(), Value::Bool(false));
        let text = serde_json::to_string_pretty(&sorted)? + "\n";
        write_atomic(path, text.as_bytes())
    }

    /// Tokens per side, `input_size / patch_size`.
    pub fn grid(&self) -> i64 {
        self.input_size / self.patch_size
    }

    /// Number of tokens T = grid².
    pub fn num_patches(&self) -> i64 {
        self.grid() * self.grid()
    }

    /// Per-head width `hidden_size / num_heads`.
    pub fn head_dim(&self) -> i64 {
        self.hidden_size / self.num_heads
    }

    /// Channels the final layer predicts: `2·in_channels` with `learn_sigma`, else `in_channels`.
    pub fn out_channels(&self) -> i64 {
        if self.learn_sigma {
            2 * self.in_channels
        } else {
            self.in_channels
        }
    }

    /// `mlp_hidden_dim = int(hidden_size · mlp_ratio)` (docs/design.md §8.4).
    pub fn mlp_hidden(&self) -> i64 {
        (self.hidden_size as f64 * self.mlp_ratio) as i64
    }

    /// SwiGLU hidden width `int(2/3 · mlp_hidden)` (docs/design.md §8.4; 170 for the tiny fixture).
    pub fn swiglu_hidden(&self) -> i64 {
        (2.0 / 3.0 * self.mlp_hidden() as f64) as i64
    }

    /// Rows of the label table: `num_classes + 1` when `class_dropout_prob > 0` (the null row), else
    /// `num_classes` (docs/design.md §8.2).
    pub fn label_rows(&self) -> i64 {
        self.num_classes + i64::from(self.has_null_class())
    }

    /// Whether the label table has the null / CFG row (`class_dropout_prob > 0`).
    pub fn has_null_class(&self) -> bool {
        self.class_dropout_prob > 0.0
    }

    /// The null (unconditional) label, `num_classes`.
    pub fn null_class(&self) -> i64 {
        self.num_classes
    }
}

/// Preset names of [`DitTrainConfig::preset`].
pub const DIT_PRESETS: [&str; 2] = ["tiny", "xl"];

/// The whole `vtp dit train` run.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, DocumentedFields)]
#[serde(deny_unknown_fields)]
pub struct DitTrainConfig {
    /// The preset these defaults come from: tiny (2-core CPU, the tiny tokenizer's latents) or xl (VTP's
    /// recipe).
    pub preset: String,
    /// The latent cache folder written by `vtp dit extract --out` (latents, labels, statistics).
    pub cache: String,
    /// Latent statistics instead of the cache's: vtp-s, vtp-b, vtp-l (released, docs/design.md §5.4) or a file;
    /// "" = the cache's.
    #[serde(default)]
    pub stats: String,
    /// `[train]`: length, seed and failure handling.
    pub train: TrainConfig,
    /// `[batch]`: latents per step.
    pub batch: DitBatchConfig,
    /// `[transport]`: the time distribution and the loss.
    pub transport: TransportConfig,
    /// `[optim]`: AdamW.
    pub optim: DitOptimConfig,
    /// `[ema]`: the exported EMA weights.
    pub ema: EmaConfig,
    /// `[sample]`: the sampler of the grids and `vtp dit sample`.
    pub sample: SamplerConfig,
    /// `[eval]`: the EMA's flow loss and the sample grid.
    pub eval: DitEvalConfig,
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
    /// `[model]`: the LightningDiT's arguments.
    pub model: DitConfig,
}

/// `[batch]`: latents per step.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, DocumentedFields)]
#[serde(deny_unknown_fields)]
pub struct DitBatchConfig {
    /// Latents per step [VTP: 1024 global].
    pub size: usize,
}

/// `[transport]`: the time distribution and the loss (docs/design.md §5.4 "Flow-matching objective").
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, DocumentedFields)]
#[serde(deny_unknown_fields)]
pub struct TransportConfig {
    /// Training time distribution: logit-normal (t = sigmoid(N(mu, sigma))) or uniform.
    pub time: String,
    /// Logit-normal mean [official code: 0; VTP configs state −0.5 (S/B), −0.75 (L), unread].
    pub mu: f64,
    /// Logit-normal std [official code: 1; VTP configs state 1.25 (S/B), 1.0 (L), unread].
    pub sigma: f64,
    /// Add mean(1 − cos over channels) to the velocity MSE [VTP: true].
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
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, DocumentedFields)]
#[serde(deny_unknown_fields)]
pub struct DitOptimConfig {
    /// Constant AdamW learning rate [VTP: 2e-4].
    pub lr: f64,
    /// AdamW beta1 [VTP: 0.9].
    pub beta1: f64,
    /// AdamW beta2 [VTP: 0.95].
    pub beta2: f64,
    /// AdamW epsilon [torch default: 1e-8].
    pub eps: f64,
    /// Decoupled weight decay [VTP: 0].
    pub weight_decay: f64,
    /// Gradient-norm clipping threshold, 0 = off [VTP: off].
    pub clip_grad: f64,
    #[doc = crate::train::optim::fused_doc!()]
    #[serde(default = "crate::train::optim::fused_by_default")]
    pub fused: bool,
}

/// `[ema]`: the exponential moving average of the weights.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, DocumentedFields)]
#[serde(deny_unknown_fields)]
pub struct EmaConfig {
    /// EMA decay per step; the EMA weights are sampled and exported [VTP: 0.9999].
    pub decay: f64,
}

/// `[eval]`: the EMA's fixed-batch flow loss and the sample grid.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, DocumentedFields)]
#[serde(deny_unknown_fields)]
pub struct DitEvalConfig {
    /// EMA flow loss on a fixed batch (eval/flow_loss) every N steps, 0 = off.
    pub every: u64,
    /// Latents in that fixed batch (the cache's first ones, fixed noise and times).
    pub samples: usize,
    /// Sample grid (one row per class, decoded by the tokenizer) every N steps, 0 = off.
    pub grid_every: u64,
    /// Samples per grid row.
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

    /// `xl`: VTP's generation recipe (docs/design.md §5.4): LightningDiT-XL/1 on 16×16×64 latents, batch 1024,
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
        commented_toml(self, DIT_HEADER)
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
const DIT_HEADER: &str = "# vtp dit train configuration (docs/design.md §5.4, §8): LightningDiT trained by flow matching on a latent cache\n# (t = 0 noise, t = 1 data, velocity target x1 − x0, loss mean(mse) + mean(1 − cos)).\n";

impl ConfigDocs for DitTrainConfig {
    fn section_key_doc(section: &str, key: &str) -> Option<&'static str> {
        match section {
            "batch" => field_doc::<DitBatchConfig>(key),
            "transport" => field_doc::<TransportConfig>(key),
            "optim" => field_doc::<DitOptimConfig>(key),
            "ema" => field_doc::<EmaConfig>(key),
            "sample" => field_doc::<SamplerConfig>(key),
            "eval" => field_doc::<DitEvalConfig>(key),
            "model" => field_doc::<DitConfig>(key),
            _ => shared_key_doc(section, key),
        }
    }
}

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
