//! The pre-training run's configuration (spec §4): one TOML file with a section per concern, the
//! presets (`tiny` for a 2-core CPU; `small`/`base`/`large` = the released architectures with the
//! paper's recipe), dotted `key=value` overrides, and `--print-config` with a comment on every key.
//!
//! Where the paper is silent the DINOv2 / OpenCLIP defaults it names are used, and the key's comment
//! says so (spec §4.5: VTP's own optimiser values are not published).
use super::objectives::dino::TeacherCentering;
use super::optim::AdamWConfig;
use super::precision::Precision;
use super::schedule::ScheduleConfig;
use crate::config::VtpConfig;
use anyhow::{bail, Context, Result};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use std::path::Path;

/// Which objectives a run trains: the paper's ablations (spec §4.8, Figures 5–6).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Objectives {
    /// Reconstruction only (the AE baseline).
    #[serde(rename = "ae")]
    Ae,
    /// CLIP + reconstruction.
    #[serde(rename = "clip+ae")]
    ClipAe,
    /// DINO/iBOT (+ KoLeo) + reconstruction.
    #[serde(rename = "ssl+ae")]
    SslAe,
    /// CLIP + SSL + reconstruction: full VTP.
    #[serde(rename = "all")]
    All,
}

impl Objectives {
    /// Whether the CLIP loss is on.
    pub fn clip(self) -> bool {
        matches!(self, Objectives::ClipAe | Objectives::All)
    }

    /// Whether the SSL losses are on.
    pub fn ssl(self) -> bool {
        matches!(self, Objectives::SslAe | Objectives::All)
    }
}

/// `[data]`: where samples come from and the crop sizes of each branch (spec §4.2).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    pub source: String,
    pub eval_source: String,
    pub workers: usize,
    pub shuffle_buffer: usize,
    pub clip_size: i64,
    pub global_size: i64,
    pub local_size: i64,
    pub n_local_crops: usize,
    pub recon_size: i64,
}

/// `[batch]`: images per step of each branch (spec §4.2: all `clip` pairs go to CLIP; `ssl` and
/// `recon` are independent random subsets of them).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BatchConfig {
    pub clip: usize,
    pub ssl: usize,
    pub recon: usize,
}

/// `[loss]`: weights and settings of the objectives (spec §4.1, §4.4, §4.6).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LossConfig {
    pub lambda_rec: f64,
    pub lambda_ssl: f64,
    pub lambda_clip: f64,
    pub dino_weight: f64,
    pub ibot_weight: f64,
    pub koleo_weight: f64,
    pub lpips: bool,
    /// Weight of the mean squared error added to `L_rec` (vtp-rs's, not the paper's: 0 in its presets).
    #[serde(default)]
    pub l2_weight: f64,
    pub centering: TeacherCentering,
    pub student_temp: f64,
    pub center_momentum: f64,
    pub clip_drop_path: f64,
    pub ssl_drop_path: f64,
    pub rec_drop_path: f64,
    /// One student trunk pass over the requests of the same image size and drop-path rate
    /// (`train::passes`); false: one pass per objective.
    #[serde(default = "merge_by_default")]
    pub merge_trunk_passes: bool,
}

/// `loss.merge_trunk_passes` when a config leaves it out: merged.
fn merge_by_default() -> bool {
    true
}

/// `[dino_head]`: the DINO head shared by DINO and iBOT (spec §4.4).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DinoHeadConfig {
    pub out_dim: i64,
    pub hidden_dim: i64,
    pub bottleneck_dim: i64,
}

/// `[optim]`: AdamW, its parameter groups and gradient clipping (spec §4.5).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct OptimConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub clip_grad: f64,
    pub layer_decay: f64,
    pub patch_embed_lr_mult: f64,
    /// AdamW as ATen's fused kernel (`torch.optim.AdamW(fused=True)`); false = PyTorch's single-tensor update.
    #[serde(default = "super::optim::fused_by_default")]
    pub fused: bool,
}

/// `[train]`: length, seed and failure handling of the run.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    pub steps: u64,
    pub seed: u64,
    pub deterministic: bool,
    pub max_bad_steps: u64,
    /// The arithmetic of the forward passes (f32, or bf16 autocast with f32 master weights).
    #[serde(default)]
    pub precision: Precision,
    /// TF32 tensor cores for the f32 matmuls and convolutions on CUDA.
    #[serde(default)]
    pub tf32: bool,
}

impl TrainConfig {
    /// `steps` steps from seed 0 in f32 without TF32.
    pub fn new(steps: u64, deterministic: bool, max_bad_steps: u64) -> Self {
        Self { steps, seed: 0, deterministic, max_bad_steps, precision: Precision::F32, tf32: false }
    }
}

/// `[eval]`: the online evaluation and reconstruction grid.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct EvalConfig {
    pub every: u64,
    pub samples: usize,
    pub classes: String,
    /// Training images of the online linear probes (a labelled SPEC; "" = no probes).
    #[serde(default)]
    pub probe_source: String,
    /// How many of them.
    #[serde(default)]
    pub probe_samples: usize,
    pub grid_every: u64,
    pub grid_images: usize,
}

/// `[debug]`: fault injection for testing the failure handling.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct DebugConfig {
    pub nan_at_steps: Vec<u64>,
}

/// `[log]`: metrics and plots.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    pub every: u64,
}

/// `[checkpoint]`: how often and how many.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CheckpointConfig {
    pub every: u64,
    pub keep: usize,
}

/// The whole run (`vtp pretrain`), one section per concern.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PretrainConfig {
    pub preset: String,
    pub objectives: Objectives,
    pub train: TrainConfig,
    pub data: DataConfig,
    pub batch: BatchConfig,
    pub loss: LossConfig,
    pub dino_head: DinoHeadConfig,
    pub optim: OptimConfig,
    pub schedule: ScheduleConfig,
    pub eval: EvalConfig,
    pub log: LogConfig,
    pub checkpoint: CheckpointConfig,
    /// `[dist]`: the multi-process job's timeouts and gradient buckets.
    #[serde(default)]
    pub dist: crate::dist::DistConfig,
    #[serde(default)]
    pub debug: DebugConfig,
    pub model: VtpConfig,
}

/// The tiny preset's training data: the built-in scenes at 64² with every object twice the default
/// size (a main object then spans 2-3 patches a side: at the default sizes one 16-pixel patch holds
/// it, and even a supervised tiny ViT reads its shape at ~20 %). README "Pre-training" has the runs.
pub const TINY_TRAIN_DATA: &str = "synthetic:train?res=64&zoom=2";

/// Names accepted by [`PretrainConfig::preset`].
pub const PRETRAIN_PRESETS: [&str; 4] = ["tiny", "small", "base", "large"];

/// Keys of `VTPConfig` that are metadata, not architecture (kept in `model.extra`).
const MODEL_METADATA_KEYS: [&str; 5] = ["architectures", "model_type", "torch_dtype", "dtype", "transformers_version"];

impl PretrainConfig {
    /// The default config of a preset.
    pub fn preset(name: &str) -> Result<Self> {
        match name {
            "tiny" => Ok(Self::tiny()),
            "small" | "base" | "large" => Self::released(name),
            _ => bail!("unknown preset '{name}' (expected one of {})", PRETRAIN_PRESETS.join(", ")),
        }
    }

    /// `tiny`: a VTP small enough to learn the built-in synthetic scenes on a 2-core CPU in minutes.
    fn tiny() -> Self {
        let model = VtpConfig {
            image_size: 64,
            vision_embed_dim: 96,
            vision_depth: 4,
            vision_num_heads: 3,
            decoder_embed_dim: 96,
            decoder_depth: 2,
            decoder_num_heads: 3,
            text_embed_dim: 64,
            text_depth: 2,
            text_num_heads: 2,
            text_context_length: 32,
            ..VtpConfig::preset("small").expect("built-in preset")
        };
        let steps = 1600;
        Self {
            preset: "tiny".into(),
            objectives: Objectives::All,
            train: TrainConfig::new(steps, true, 5),
            data: DataConfig {
                source: TINY_TRAIN_DATA.into(),
                eval_source: "synthetic:heldout?n=256&res=64&zoom=2".into(),
                workers: 2,
                shuffle_buffer: 0,
                clip_size: 64,
                global_size: 64,
                local_size: 32,
                n_local_crops: 4,
                recon_size: 64,
            },
            batch: BatchConfig { clip: 64, ssl: 16, recon: 16 },
            // Centred targets at a cold teacher (0.04 throughout) over 128 prototypes: the 32 teacher rows
            // of a step cannot fill 1024 (Sinkhorn-Knopp spreads them to uniform, centring too once the
            // teacher warms to 0.07), README "Pre-training". L2 next to L1: on L1 alone the tiny
            // autoencoder stalls at patch-mean colours.
            loss: LossConfig { ssl_drop_path: 0.0, l2_weight: 1.0, ..LossConfig::paper() },
            dino_head: DinoHeadConfig { out_dim: 128, hidden_dim: 256, bottleneck_dim: 64 },
            optim: OptimConfig { layer_decay: 1.0, ..OptimConfig::dinov2() },
            schedule: ScheduleConfig {
                lr: 2e-3,
                min_lr: 1e-5,
                warmup_steps: 50,
                weight_decay: 0.04,
                weight_decay_end: 0.1,
                momentum_teacher: 0.99,
                momentum_teacher_end: 1.0,
                teacher_temp: 0.04,
                warmup_teacher_temp: 0.04,
                warmup_teacher_temp_steps: 150,
                freeze_last_layer_steps: 50,
            },
            eval: EvalConfig {
                every: 200,
                samples: 256,
                classes: "synthetic-shape,synthetic-color".into(),
                probe_source: "synthetic:train?n=1000&res=64&zoom=2&seed=1".into(),
                probe_samples: 1000,
                grid_every: 200,
                grid_images: 8,
            },
            log: LogConfig { every: 10 },
            checkpoint: CheckpointConfig { every: 200, keep: 2 },
            dist: crate::dist::DistConfig::default(),
            debug: DebugConfig::default(),
            model,
        }
    }

    /// `small` / `base` / `large`: the released architecture (spec §2.2) with the paper's batch
    /// split and loss weights and the DINOv2 / OpenCLIP defaults where VTP's are unpublished (spec §4.5).
    fn released(name: &str) -> Result<Self> {
        Ok(Self {
            preset: name.into(),
            objectives: Objectives::All,
            // 1.1B samples at a 16k CLIP batch (spec §4.5, §4.8).
            train: TrainConfig::new(67_000, false, 20),
            data: DataConfig {
                source: "synthetic:train".into(),
                eval_source: "synthetic:heldout?n=1000".into(),
                workers: 8,
                shuffle_buffer: 1000,
                clip_size: 256,
                global_size: 224,
                local_size: 96,
                n_local_crops: 8,
                recon_size: 256,
            },
            batch: BatchConfig { clip: 16_384, ssl: 4_096, recon: 2_048 },
            loss: LossConfig::paper(),
            dino_head: DinoHeadConfig { out_dim: 65_536, hidden_dim: 2048, bottleneck_dim: 256 },
            optim: OptimConfig::dinov2(),
            // DINOv2's schedules (epochs of 1250 steps), with its lr rule 0.004 * sqrt(B / 1024) applied
            // to the SSL batch of 4096.
            schedule: ScheduleConfig { lr: 0.008, ..ScheduleConfig::default() },
            eval: EvalConfig {
                every: 2000,
                samples: 1000,
                classes: "synthetic-shape".into(),
                probe_source: "synthetic:train?n=1000".into(),
                probe_samples: 1000,
                grid_every: 2000,
                grid_images: 8,
            },
            log: LogConfig { every: 20 },
            checkpoint: CheckpointConfig { every: 1000, keep: 3 },
            dist: crate::dist::DistConfig::default(),
            debug: DebugConfig::default(),
            model: VtpConfig::preset(name)?,
        })
    }

    /// A preset, then a TOML file over it, then `key=value` overrides ([`load_layered`]); validated.
    pub fn load(preset: &str, file: Option<&Path>, overrides: &[String]) -> Result<Self> {
        let config: Self = load_layered(Self::preset, preset, file, overrides)?;
        config.validate()?;
        Ok(config)
    }

    /// Checks the combinations a run cannot train, with a one-line reason.
    pub fn validate(&self) -> Result<()> {
        if let Some(key) = self.model.extra.keys().find(|k| !MODEL_METADATA_KEYS.contains(&k.as_str())) {
            bail!("unknown config key 'model.{key}'");
        }
        self.model.validate().context("config [model]")?;
        let b = &self.batch;
        if b.clip == 0 {
            bail!("batch.clip must be at least 1");
        }
        for (name, n) in [("batch.ssl", b.ssl), ("batch.recon", b.recon)] {
            if n > b.clip {
                bail!("{name} = {n} is larger than the batch (batch.clip = {})", b.clip);
            }
        }
        if self.objectives.ssl() && b.ssl < 2 {
            bail!("batch.ssl must be at least 2 with SSL objectives (KoLeo needs a neighbour)");
        }
        if b.recon == 0 {
            bail!("batch.recon must be at least 1 (reconstruction is always trained)");
        }
        if self.objectives.clip() && !self.model.train_clip {
            bail!("objectives = {:?} needs model.train_clip = true", self.objectives);
        }
        if !self.model.train_reconstruction {
            bail!("model.train_reconstruction must be true (reconstruction is always trained)");
        }
        let p = self.model.vision_patch_size;
        for (name, s) in [
            ("data.clip_size", self.data.clip_size),
            ("data.global_size", self.data.global_size),
            ("data.local_size", self.data.local_size),
            ("data.recon_size", self.data.recon_size),
        ] {
            if s < p || s % p != 0 {
                bail!("{name} = {s} must be a positive multiple of the patch size {p}");
            }
        }
        for (name, every) in [("train.steps", self.train.steps), ("log.every", self.log.every)] {
            if every == 0 {
                bail!("{name} must be at least 1");
            }
        }
        if self.data.workers == 0 {
            bail!("data.workers must be at least 1");
        }
        super::schedule::Schedules::new(&self.schedule, self.train.steps).context("config [schedule]")?;
        Ok(())
    }

    /// The config as commented TOML: every key preceded by what it means (`--print-config`).
    pub fn to_commented_toml(&self) -> Result<String> {
        let header = match self.preset.as_str() {
            "tiny" => format!("{PRETRAIN_HEADER}{TINY_CHOICES}"),
            _ => PRETRAIN_HEADER.to_string(),
        };
        commented_toml(self, &header, key_doc)
    }
}

/// Why the tiny preset departs from the paper's recipe, with the runs (README "Pre-training"), printed
/// under the header of its `--print-config`.
const TINY_CHOICES: &str = "\
# tiny preset, chosen by measurement (README \"Pre-training\", issue 23):
#  data.source zoom=2: at the default object sizes a supervised tiny ViT reads shape at 19 % after 800
#    steps, at zoom 2 at 67-74 %.
#  loss.l2_weight = 1: one fixed batch, 1000 steps: L1 alone 25.2 dB, L1 + L2 31.5 dB.
#  dino_head.out_dim = 128, centring, teacher_temp 0.04: DINO on one batch falls 4.10 -> 0.56 (ln K 4.85);
#    1024 prototypes with Sinkhorn-Knopp stay near ln K (7.19 -> 5.90 of 6.93), and so does a 0.07 teacher
#    (target entropy 4.74 of 4.85 after 800 steps).
#  train.steps = 1600: what fits the main job's 10 minutes on 2 cores since the steps got faster; the
#    recipe kept learning to 2400 steps (shape probe 23 -> 30 %, PSNR 19.7 -> 21.8 dB).
";

/// The first lines of `vtp pretrain --print-config`.
const PRETRAIN_HEADER: &str = "# vtp pretrain configuration (spec §4). Defaults marked [DINOv2] / [OpenCLIP] are\n# those libraries' values: the paper does not publish VTP's.\n";

/// A trainer's config as a layered value: the preset `preset_of(preset)`, then a TOML file over it
/// (whose own `preset` key, if another, replaces the base), then `key=value` overrides; deserialised
/// with errors naming the key path and the file. Not validated.
pub fn load_layered<T: Serialize + DeserializeOwned>(
    preset_of: impl Fn(&str) -> Result<T>,
    preset: &str,
    file: Option<&Path>,
    overrides: &[String],
) -> Result<T> {
    let mut value = toml::Value::try_from(preset_of(preset)?).context("cannot serialise the preset")?;
    if let Some(path) = file {
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read config '{}'", path.display()))?;
        let user: toml::Table = toml::from_str(&text)
            .map_err(|e| anyhow::anyhow!("config '{}': {}", path.display(), one_line(&e.to_string())))?;
        if let Some(p) = user.get("preset").and_then(toml::Value::as_str).filter(|p| *p != preset) {
            value = toml::Value::try_from(preset_of(p)?)?;
        }
        merge(&mut value, toml::Value::Table(user));
    }
    for kv in overrides {
        apply_override(&mut value, kv)?;
    }
    from_value(value).with_context(|| match file {
        Some(p) => format!("config '{}'", p.display()),
        None => "config".to_string(),
    })
}

/// A config as commented TOML (`--print-config`, the run's `config.toml`): `header`, the top-level
/// scalars, then one `[section]` per table, every key preceded by `# doc(dotted.path)`.
pub fn commented_toml<T: Serialize>(config: &T, header: &str, doc: impl Fn(&str) -> &'static str) -> Result<String> {
    let value = toml::Value::try_from(config)?;
    let table = value.as_table().context("the config is a table")?;
    let mut out = String::from(header);
    let (scalars, sections): (Vec<_>, Vec<_>) = table.iter().partition(|(_, v)| !v.is_table());
    for (key, v) in scalars {
        write_key(&mut out, doc(key), key, v);
    }
    for (section, v) in sections {
        out.push_str(&format!("\n[{section}]\n"));
        for (key, v) in v.as_table().into_iter().flatten() {
            write_key(&mut out, doc(&format!("{section}.{key}")), key, v);
        }
    }
    Ok(out)
}

fn write_key(out: &mut String, doc: &str, key: &str, v: &toml::Value) {
    out.push_str(&format!("# {doc}\n{key} = {v}\n"));
}

impl LossConfig {
    /// The paper's weights (λ_rec 0.1, λ_ssl = λ_clip = 1) and DINOv2's SSL settings (spec §4.1, §4.4).
    fn paper() -> Self {
        Self {
            lambda_rec: 0.1,
            lambda_ssl: 1.0,
            lambda_clip: 1.0,
            dino_weight: 1.0,
            ibot_weight: 1.0,
            koleo_weight: 0.1,
            lpips: true,
            l2_weight: 0.0,
            centering: TeacherCentering::Centering,
            student_temp: 0.1,
            center_momentum: 0.9,
            clip_drop_path: 0.0,
            ssl_drop_path: 0.1,
            rec_drop_path: 0.0,
            merge_trunk_passes: true,
        }
    }
}

impl OptimConfig {
    /// The AdamW hyper-parameters.
    pub fn adamw(&self) -> AdamWConfig {
        AdamWConfig { beta1: self.beta1, beta2: self.beta2, eps: self.eps, fused: self.fused }
    }

    /// DINOv2's AdamW settings (spec §4.5), fused.
    fn dinov2() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            clip_grad: 3.0,
            layer_decay: 0.9,
            patch_embed_lr_mult: 0.2,
            fused: true,
        }
    }
}

/// Deserialises a config value; errors name the full key path (e.g. `unknown config key 'train.stepz'`).
pub fn from_value<T: DeserializeOwned>(value: toml::Value) -> Result<T> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let inner = one_line(&e.into_inner().to_string());
        match inner.strip_prefix("unknown field `").and_then(|r| r.split('`').next()) {
            Some(field) if path == "." || path.is_empty() => anyhow::anyhow!("unknown config key '{field}'"),
            Some(field) if path == field || path.ends_with(&format!(".{field}")) => {
                anyhow::anyhow!("unknown config key '{path}'")
            }
            Some(field) => anyhow::anyhow!("unknown config key '{path}.{field}'"),
            None => anyhow::anyhow!("config key '{path}': {inner}"),
        }
    })
}

/// Deep-merges `over` into `base` (tables merge key by key; anything else replaces).
fn merge(base: &mut toml::Value, over: toml::Value) {
    match (base, over) {
        (toml::Value::Table(b), toml::Value::Table(o)) => {
            for (k, v) in o {
                match b.get_mut(&k) {
                    Some(slot) => merge(slot, v),
                    None => {
                        b.insert(k, v);
                    }
                }
            }
        }
        (slot, v) => *slot = v,
    }
}

/// Applies one `dotted.key=value` override; the value is read as TOML (`3`, `1e-4`, `true`,
/// `"text"`, `[1, 2]`), else taken as a bare string.
pub fn apply_override(value: &mut toml::Value, kv: &str) -> Result<()> {
    let (key, raw) = kv.split_once('=').with_context(|| format!("override '{kv}' is not of the form key=value"))?;
    let key = key.trim();
    if key.is_empty() || key.split('.').any(str::is_empty) {
        bail!("override '{kv}': malformed key '{key}'");
    }
    let parsed = toml::from_str::<toml::Table>(&format!("v = {raw}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.trim().to_string()));
    let mut slot = value;
    for part in key.split('.') {
        let table = slot.as_table_mut().with_context(|| format!("override '{kv}': '{key}' is not a config key"))?;
        slot = table.entry(part.to_string()).or_insert_with(|| toml::Value::Table(toml::Table::new()));
    }
    *slot = parsed;
    Ok(())
}

fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// What each key means (`--print-config`); every key of the config has an entry (tested).
pub fn key_doc(path: &str) -> &'static str {
    KEY_DOCS.iter().find(|(k, _)| *k == path).map(|(_, d)| *d).unwrap_or_else(|| {
        if path.starts_with("model.") {
            "VTPConfig field of the tokenizer being trained (spec §2.1)"
        } else {
            "(undocumented)"
        }
    })
}

const KEY_DOCS: &[(&str, &str)] = &[
    ("preset", "the preset these defaults come from: tiny (2-core CPU), small, base, large (released architectures)"),
    ("objectives", "objectives trained: \"ae\", \"clip+ae\", \"ssl+ae\" or \"all\" (the paper's ablations, spec §4.8)"),
    ("train.steps", "optimisation steps of the run"),
    ("train.seed", "seed of every random draw (data order, augmentations, masks, subsets, drop-path, init)"),
    ("train.deterministic", "deterministic mode: resume reproduces an uninterrupted run bit for bit"),
    ("train.max_bad_steps", "stop after this many consecutive steps with a non-finite loss or gradient"),
    ("train.precision", "forward passes: \"f32\" or \"bf16\" (autocast; weights, norms, losses, optimiser f32)"),
    ("train.tf32", "let CUDA f32 matmuls and convolutions use TF32 tensor cores (no effect on the CPU)"),
    ("data.source", "training data SPEC: synthetic[:split][?n=&res=&seed=&zoom=&colorless=&group=], shards {a..b}.tar, or a folder (README: Data)"),
    ("data.eval_source", "held-out data SPEC of the online evaluation (zero-shot top-1, PSNR)"),
    ("data.workers", "data reader threads"),
    ("data.shuffle_buffer", "shuffle-buffer slots per reader (0 = stored order)"),
    ("data.clip_size", "CLIP crop side: RandomResizedCrop(scale 0.9-1.0) [OpenCLIP]"),
    ("data.global_size", "SSL global crop side (2 per image) [DINOv2: 224]"),
    ("data.local_size", "SSL local crop side [DINOv2: 96]"),
    ("data.n_local_crops", "SSL local crops per image [DINOv2: 8]"),
    ("data.recon_size", "reconstruction crop side (random square crop)"),
    ("batch.clip", "image-caption pairs per step; all go to CLIP (paper: 16k; final models 32k)"),
    ("batch.ssl", "random subset of the batch for DINO/iBOT (paper: 4k)"),
    ("batch.recon", "random subset of the batch for reconstruction (paper: 2k)"),
    ("loss.lambda_rec", "weight of L_rec = L1 + LPIPS (paper: 0.1)"),
    ("loss.lambda_ssl", "weight of L_ssl = DINO + iBOT + KoLeo (paper: 1)"),
    ("loss.lambda_clip", "weight of the CLIP loss (paper: 1)"),
    ("loss.dino_weight", "DINO CLS-token loss weight inside L_ssl [DINOv2: 1]"),
    ("loss.ibot_weight", "iBOT masked-patch loss weight inside L_ssl [DINOv2: 1]"),
    ("loss.koleo_weight", "KoLeo weight inside L_ssl, 0 = off [DINOv2: 0.1; the paper names no KoLeo, spec §4.4 conflict 7]"),
    ("loss.lpips", "use LPIPS-VGG in L_rec (needs its weight files; without them no LPIPS term, said once and recorded)"),
    ("loss.l2_weight", "weight of an MSE term in L_rec, 0 = off (not the paper's; on L1 alone a small tokenizer stalls at patch-mean colours: README \"Pre-training\")"),
    ("loss.centering", "teacher targets: \"centering\" [DINOv2] or \"sinkhorn_knopp\" [DINOv3]"),
    ("loss.student_temp", "student softmax temperature [DINOv2: 0.1]"),
    ("loss.center_momentum", "EMA momentum of the DINO and iBOT centres [DINOv2: 0.9]"),
    ("loss.clip_drop_path", "stochastic-depth rate of the student trunk in the CLIP forward"),
    ("loss.ssl_drop_path", "stochastic-depth rate of the student trunk in the SSL forward (teacher: 0)"),
    ("loss.rec_drop_path", "stochastic-depth rate of the trunk in the reconstruction forward"),
    ("loss.merge_trunk_passes", "one student trunk pass over the CLIP, SSL and reconstruction images of the same size and drop-path rate (DINOv2's crop list; same mathematics, fewer launches); false = one pass per objective"),
    ("dino_head.out_dim", "prototypes K of the DINO head [DINOv2: 65536]"),
    ("dino_head.hidden_dim", "hidden width of the 3-layer MLP [DINOv2: 2048]"),
    ("dino_head.bottleneck_dim", "width before L2-normalisation and the weight-normalised last layer [DINOv2: 256]"),
    ("optim.beta1", "AdamW beta1 [DINOv2: 0.9]"),
    ("optim.beta2", "AdamW beta2 [DINOv2: 0.999; OpenCLIP: 0.98]"),
    ("optim.eps", "AdamW epsilon [DINOv2: 1e-8; OpenCLIP: 1e-6]"),
    ("optim.clip_grad", "gradient-norm clipping threshold, 0 = off [DINOv2: 3.0]"),
    ("optim.layer_decay", "layer-wise lr decay of the vision trunk, 1 = off [DINOv2: 0.9]"),
    ("optim.patch_embed_lr_mult", "lr multiplier of the patch embedding [DINOv2: 0.2]"),
    ("optim.fused", super::optim::FUSED_DOC),
    ("schedule.lr", "peak learning rate after warm-up [DINOv2: 0.004 * sqrt(batch / 1024)]"),
    ("schedule.min_lr", "final learning rate of the cosine decay [DINOv2: 1e-6]"),
    ("schedule.warmup_steps", "linear lr warm-up from 0 [DINOv2: 10 epochs of 1250 steps]"),
    ("schedule.weight_decay", "weight decay at the start (cosine schedule) [DINOv2: 0.04]"),
    ("schedule.weight_decay_end", "weight decay at the end [DINOv2: 0.4]"),
    ("schedule.momentum_teacher", "EMA momentum of the teacher at the start (cosine to the end value) [DINOv2: 0.992]"),
    ("schedule.momentum_teacher_end", "EMA momentum of the teacher at the end [DINOv2: 1.0]"),
    ("schedule.teacher_temp", "teacher temperature after warm-up [DINOv2: 0.07]"),
    ("schedule.warmup_teacher_temp", "teacher temperature at the start of its warm-up [DINOv2: 0.04]"),
    ("schedule.warmup_teacher_temp_steps", "steps of the linear teacher-temperature warm-up [DINOv2: 30 epochs]"),
    ("schedule.freeze_last_layer_steps", "steps with the DINO head's last layer frozen (lr 0) [DINOv2: 1 epoch]"),
    ("eval.every", "online evaluation (zero-shot top-1, PSNR on data.eval_source) every N steps, 0 = off"),
    ("eval.samples", "held-out images of the online evaluation"),
    ("eval.classes", "comma-separated class sets of the online zero-shot and linear probes (synthetic-shape, synthetic-color, synthetic-shape_color, imagenet, cifar10, folder = the class sub-folders of data.eval_source; \"\" = off)"),
    ("eval.probe_source", "training images of the online linear probes on the CLS token and the mean 64-d latent, scored on data.eval_source (\"\" = off)"),
    ("eval.probe_samples", "images of eval.probe_source the probes train on"),
    ("eval.grid_every", "reconstruction grid PNG (inputs above reconstructions) every N steps, 0 = off"),
    ("eval.grid_images", "images in the reconstruction grid"),
    ("log.every", "metrics (metrics.jsonl, TensorBoard) and plots every N steps"),
    ("checkpoint.every", "checkpoint every N steps (and on SIGINT/SIGTERM and at the end)"),
    ("checkpoint.keep", "checkpoints kept (the newest K)"),
    ("dist.timeout_s", "multi-process runs: seconds a collective may wait for the other ranks before the run fails (rank 0 evaluates meanwhile) [PyTorch: 1800]"),
    ("dist.join_timeout_s", "multi-process runs: seconds to wait for every rank to join at the start"),
    ("dist.bucket_mib", "multi-process runs: gradient all-reduce bucket size in MiB [DDP bucket_cap_mb: 25]"),
    ("dist.overlap", "multi-process runs: all-reduce gradient buckets during the backward pass (DDP's Reducer)"),
    ("debug.nan_at_steps", "fault injection for tests: make the loss NaN at these 0-based steps"),
];
