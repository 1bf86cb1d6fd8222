//! What every trainer's configuration shares: the sections `[train]`, `[eval]`, `[log]`,
//! `[checkpoint]`, `[debug]`, and the TOML machinery (a preset, a file over it, dotted `key=value`
//! overrides, errors naming the key, and `--print-config` with every key's doc, read from the `///`
//! comment on its struct field, [`ConfigDocs`]).
use super::precision::Precision;
use crate::dist::DistConfig;
use anyhow::{bail, Context, Result};
use documented::DocumentedFields;
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use std::path::Path;

/// `[train]`: length, seed and failure handling of the run.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, DocumentedFields)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// Optimisation steps of the run.
    pub steps: u64,
    /// Seed of every random draw: data order, crops and augmentations, initialisation, and each
    /// trainer's own (pre-training: masks, subsets, drop-path; decoder fine-tuning: the discriminator's
    /// init; DiT: flips, times, noise, label dropout).
    pub seed: u64,
    /// Deterministic mode: every step's randomness is drawn from (seed, step), so a --resume'd run
    /// reproduces an uninterrupted one bit for bit.
    pub deterministic: bool,
    /// Stop after this many consecutive steps with a non-finite loss or gradient.
    pub max_bad_steps: u64,
    /// Forward passes: "f32" or "bf16" (autocast; weights, norms, losses, optimiser f32).
    #[serde(default)]
    pub precision: Precision,
    /// Let CUDA f32 matmuls and convolutions use TF32 tensor cores (no effect on the CPU).
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
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, DocumentedFields)]
#[serde(deny_unknown_fields)]
pub struct EvalConfig {
    /// Online evaluation on data.eval_source every N steps, 0 = off (pre-training: zero-shot top-1 and
    /// PSNR; decoder fine-tuning: PSNR and SSIM).
    pub every: u64,
    /// Held-out images of the online evaluation.
    pub samples: usize,
    /// Comma-separated class sets of the online zero-shot and linear probes (synthetic-shape,
    /// synthetic-color, synthetic-shape_color, imagenet, cifar10, folder = the class sub-folders of
    /// data.eval_source; "" = off); in decoder fine-tuning they must not move (the encoder is frozen).
    pub classes: String,
    /// Training images of the online linear probes on the CLS token and the mean 64-d latent, scored on
    /// data.eval_source ("" = off); in decoder fine-tuning they probe the frozen encoder.
    #[serde(default)]
    pub probe_source: String,
    /// Images of eval.probe_source the probes train on.
    #[serde(default)]
    pub probe_samples: usize,
    /// Reconstruction grid PNG (inputs above reconstructions) every N steps, 0 = off.
    pub grid_every: u64,
    /// Images in the reconstruction grid.
    pub grid_images: usize,
}

/// `[debug]`: fault injection for testing the failure handling.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, DocumentedFields)]
#[serde(deny_unknown_fields)]
pub struct DebugConfig {
    /// Fault injection for tests: make the loss NaN at these 0-based steps.
    pub nan_at_steps: Vec<u64>,
}

/// `[log]`: metrics and plots.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, DocumentedFields)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// Metrics (metrics.jsonl, TensorBoard) and plots every N steps.
    pub every: u64,
}

/// `[checkpoint]`: how often and how many.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, DocumentedFields)]
#[serde(deny_unknown_fields)]
pub struct CheckpointConfig {
    /// Checkpoint every N steps (and on SIGINT/SIGTERM and at the end).
    pub every: u64,
    /// Checkpoints kept (the newest K).
    pub keep: usize,
}

/// A trainer's configuration whose every key is documented once, by the `///` comment on its field
/// ([`DocumentedFields`]): a top-level key by the config's own field, `section.key` by the field of the
/// section's struct, which [`Self::section_key_doc`] names. `--print-config` prints these docs.
pub trait ConfigDocs: DocumentedFields {
    /// The doc of `key` in `[section]`; `None` for a section or key the config does not have.
    fn section_key_doc(section: &str, key: &str) -> Option<&'static str>;

    /// The doc of a dotted key (`preset`, `train.seed`); `None` when it has none (or an empty one).
    fn key_doc(path: &str) -> Option<&'static str> {
        let doc = match path.split_once('.') {
            Some((section, key)) => Self::section_key_doc(section, key),
            None => field_doc::<Self>(path),
        };
        doc.filter(|d| !d.trim().is_empty())
    }
}

/// The `///` doc of `T`'s field `name` (`None`: no such field).
pub fn field_doc<T: DocumentedFields + ?Sized>(name: &str) -> Option<&'static str> {
    T::get_field_docs(name).ok()
}

/// The docs of the sections every trainer shares, `[train]`, `[eval]` ([`EvalConfig`]), `[log]`,
/// `[checkpoint]`, `[dist]` and `[debug]`: the fallback of each trainer's [`ConfigDocs::section_key_doc`].
pub fn shared_key_doc(section: &str, key: &str) -> Option<&'static str> {
    match section {
        "train" => field_doc::<TrainConfig>(key),
        "eval" => field_doc::<EvalConfig>(key),
        "log" => field_doc::<LogConfig>(key),
        "checkpoint" => field_doc::<CheckpointConfig>(key),
        "dist" => field_doc::<DistConfig>(key),
        "debug" => field_doc::<DebugConfig>(key),
        _ => None,
    }
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
/// scalars, then one `[section]` per table, every key preceded by `# ` and its doc on one line
/// ([`ConfigDocs::key_doc`]); a key without a doc is an error naming it.
pub fn commented_toml<T: Serialize + ConfigDocs>(config: &T, header: &str) -> Result<String> {
    let value = toml::Value::try_from(config)?;
    let table = value.as_table().context("the config is a table")?;
    let mut out = String::from(header);
    let (scalars, sections): (Vec<_>, Vec<_>) = table.iter().partition(|(_, v)| !v.is_table());
    for (key, v) in scalars {
        write_key::<T>(&mut out, key, key, v)?;
    }
    for (section, v) in sections {
        out.push_str(&format!("\n[{section}]\n"));
        for (key, v) in v.as_table().into_iter().flatten() {
            write_key::<T>(&mut out, &format!("{section}.{key}"), key, v)?;
        }
    }
    Ok(out)
}

/// `# doc` of the dotted `path`, then `key = value`.
fn write_key<T: ConfigDocs>(out: &mut String, path: &str, key: &str, v: &toml::Value) -> Result<()> {
    let doc = T::key_doc(path).with_context(|| format!("config key '{path}' has no doc"))?;
    out.push_str(&format!("# {}\n{key} = {v}\n", one_line(doc)));
    Ok(())
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
