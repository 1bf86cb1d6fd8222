//! What every trainer's configuration shares: the sections `[train]`, `[eval]`, `[log]`,
//! `[checkpoint]`, `[debug]`, and the TOML machinery (a preset, a file over it, dotted `key=value`
//! overrides, errors naming the key, and `--print-config` with a comment on every key).
use super::precision::Precision;
use anyhow::{bail, Context, Result};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use std::path::Path;

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
