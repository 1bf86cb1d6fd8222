//! Every key of every trainer's configuration is documented on its struct field: each key of each
//! preset (`vtp pretrain`, `vtp finetune-decoder`, `vtp dit train`) has a real doc, and
//! `--print-config`'s TOML puts that doc on the line before the key.
use serde::Serialize;
use vtp::dit::config::{DitTrainConfig, DIT_PRESETS};
use vtp::train::config::ConfigDocs;
use vtp::train::finetune::config::{FinetuneConfig, FINETUNE_PRESETS};
use vtp::train::pretrain::config::{PretrainConfig, PRETRAIN_PRESETS};
use vtp::train::run::RunConfig;

/// The dotted path of every leaf (non-table value) of `value`, below `prefix`.
fn leaf_paths(value: &toml::Value, prefix: &str, out: &mut Vec<String>) {
    match value.as_table() {
        Some(table) => {
            for (key, v) in table {
                let path = if prefix.is_empty() { key.clone() } else { format!("{prefix}.{key}") };
                leaf_paths(v, &path, out);
            }
        }
        None => out.push(prefix.to_string()),
    }
}

/// Whether `doc` says something: not empty, not a placeholder.
fn is_real_doc(doc: &str) -> bool {
    let doc = doc.trim();
    let placeholder = ["undocumented", "todo", "fixme", "tbd"].iter().any(|p| doc.to_lowercase().contains(p));
    doc.len() >= 8 && !placeholder
}

/// Checks every key of `config` (named `what`): a real doc, and the doc line before it in the printed TOML.
fn assert_every_key_documented<C: Serialize + ConfigDocs + RunConfig>(what: &str, config: &C) {
    let mut paths = Vec::new();
    leaf_paths(&toml::Value::try_from(config).unwrap(), "", &mut paths);
    assert!(paths.len() > 20, "{what}: {paths:?}");
    let undocumented: Vec<&String> = paths.iter().filter(|p| !C::key_doc(p).is_some_and(is_real_doc)).collect();
    assert!(undocumented.is_empty(), "{what}: keys without a doc: {undocumented:?}");

    let printed = config.to_commented_toml().unwrap();
    let lines: Vec<&str> = printed.lines().collect();
    let mut printed_keys = 0;
    for (i, line) in lines.iter().enumerate() {
        if line.contains(" = ") && !line.starts_with('#') {
            printed_keys += 1;
            let doc = lines[i - 1].strip_prefix("# ").unwrap_or_else(|| panic!("{what}: no doc line before {line}"));
            assert!(is_real_doc(doc), "{what}: {line} has the doc {doc:?}");
        }
    }
    assert_eq!(printed_keys, paths.len(), "{what}: every key is printed once, with its doc:\n{printed}");
}

#[test]
fn every_pretrain_key_has_a_doc() {
    for name in PRETRAIN_PRESETS {
        let config = PretrainConfig::preset(name).unwrap();
        assert_every_key_documented(&format!("pretrain {name}"), &config);
    }
    let doc = PretrainConfig::key_doc("model.vision_depth").unwrap();
    assert!(doc.contains("vision encoder"), "each model key has its own doc, not a generic one: {doc}");
}

#[test]
fn every_finetune_key_has_a_doc() {
    for name in FINETUNE_PRESETS {
        let config = FinetuneConfig::preset(name).unwrap();
        assert_every_key_documented(&format!("finetune {name}"), &config);
    }
}

#[test]
fn every_dit_key_has_a_doc() {
    for name in DIT_PRESETS {
        let config = DitTrainConfig::preset(name).unwrap();
        assert_every_key_documented(&format!("dit {name}"), &config);
    }
}

#[test]
fn unknown_keys_have_no_doc() {
    for path in ["train.stepz", "nosuch.key", "presett", "model.vision_dpeth", "loss.disc_start"] {
        assert_eq!(PretrainConfig::key_doc(path), None, "{path}");
    }
    assert!(FinetuneConfig::key_doc("loss.disc_start").is_some());
    assert_eq!(DitTrainConfig::key_doc("loss.disc_start"), None);
}
