//! Weights and config: released-format round trip, Python-readable output, presets, validation.
mod common;
use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use tch::{Device, Kind, Tensor};
use vtp::config::VtpConfig;
use vtp::io::read_safetensors;
use vtp::model::VtpModel;

const FIXTURE_MODELS: [&str; 3] = ["vtp-tiny", "vtp-tiny-variant", "vtp-tiny-aeonly"];

fn tensors(path: &Path) -> BTreeMap<String, Tensor> {
    read_safetensors(path).expect("safetensors reads").into_iter().collect()
}

fn bits_equal(a: &Tensor, b: &Tensor) -> bool {
    a.kind() == b.kind()
        && a.size() == b.size()
        && a.reshape([-1]).view_dtype(Kind::Uint8).equal(&b.reshape([-1]).view_dtype(Kind::Uint8))
}

#[test]
fn load_save_load_keeps_tensors_dtypes_and_config() {
    for name in FIXTURE_MODELS {
        let dir = common::fixture(name);
        let tmp = tempfile::tempdir().unwrap();
        let model = VtpModel::load(&dir, Device::Cpu).unwrap();
        model.save(tmp.path()).unwrap();
        let (original, saved) =
            (tensors(&dir.join("model.safetensors")), tensors(&tmp.path().join("model.safetensors")));
        assert_eq!(original.keys().collect::<Vec<_>>(), saved.keys().collect::<Vec<_>>(), "{name}: key set");
        for (k, t) in &original {
            assert!(
                bits_equal(t, &saved[k]),
                "{name}: tensor {k} differs (dtype {:?} vs {:?})",
                t.kind(),
                saved[k].kind()
            );
        }
        let reloaded = VtpModel::load(tmp.path(), Device::Cpu).unwrap();
        assert_eq!(reloaded.config, model.config, "{name}: config semantics survive the round trip");
        let c0: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
        let c1: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(tmp.path().join("config.json")).unwrap()).unwrap();
        assert_eq!(c0, c1, "{name}: config.json keeps every key and value (unknown keys included)");
    }
}

#[test]
fn saved_files_load_in_python_with_the_fixture_key_set_and_dtypes() {
    let python = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python");
    assert!(python.exists(), "the project venv is missing: run scripts/setup.sh");
    let script = "import sys, json\nfrom safetensors import safe_open\n\
        f = safe_open(sys.argv[1], 'pt')\n\
        print(json.dumps({'meta': f.metadata(), 'keys': {k: str(f.get_tensor(k).dtype) for k in f.keys()}}, sort_keys=True))";
    let describe = |file: &Path| {
        let out = Command::new(&python).args(["-c", script]).arg(file).output().unwrap();
        assert!(out.status.success(), "python failed: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };
    for name in FIXTURE_MODELS {
        let dir = common::fixture(name);
        let tmp = tempfile::tempdir().unwrap();
        VtpModel::load(&dir, Device::Cpu).unwrap().save(tmp.path()).unwrap();
        let ours = describe(&tmp.path().join("model.safetensors"));
        assert_eq!(ours, describe(&dir.join("model.safetensors")), "{name}: key set, dtypes and metadata");
        assert!(ours.contains("\"trunk.rope_embed.periods\": \"torch.bfloat16\""), "{name}: periods stay bf16");
    }
}

#[test]
fn small_preset_has_the_released_parameter_count() {
    // pytorch_vtp.py --preset small --describe: total 167,177,857 (VTP-S incl. the text tower).
    let model = VtpModel::new(VtpConfig::preset("small").unwrap(), Device::Cpu).unwrap();
    let total: i64 = model.vs.trainable_variables().iter().map(|t| t.numel() as i64).sum();
    assert_eq!(total, 167_177_857);
    let encoder: i64 =
        model.vs.variables().iter().filter(|(k, _)| k.starts_with("trunk.")).map(|(_, t)| t.numel() as i64).sum();
    assert_eq!(encoder, 21_611_520);
    let w1 = &model.vs.variables()["trunk.blocks.0.mlp.w1.weight"];
    assert_eq!(w1.size(), [1024, 384], "SwiGLU width of VTP-S");
}

#[test]
fn presets_follow_the_released_sizes() {
    for (name, dim, depth, heads) in [("small", 384, 12, 6), ("base", 768, 12, 12), ("large", 1024, 24, 16)] {
        let c = VtpConfig::preset(name).unwrap();
        assert_eq!((c.vision_embed_dim, c.vision_depth, c.vision_num_heads), (dim, depth, heads));
        assert_eq!((c.decoder_embed_dim, c.decoder_depth, c.decoder_num_heads), (dim, depth, heads));
        assert_eq!((c.vision_feature_bottleneck, c.vision_patch_size, c.text_embed_dim), (64, 16, 768));
        c.validate().unwrap();
    }
    assert_eq!(vtp::model::ffn::ffn_hidden(vtp::config::FfnLayer::SwiGlu, 1024, 4.0), 2736);
    assert_eq!(vtp::model::ffn::ffn_hidden(vtp::config::FfnLayer::SwiGlu32, 32, 4.0), 96);
    assert!(VtpConfig::preset("huge").is_err());
}

#[test]
fn validation_gives_one_line_reasons() {
    let bad = |f: &dyn Fn(&mut VtpConfig)| {
        let mut c = VtpConfig::default();
        f(&mut c);
        let msg = c.validate().unwrap_err().to_string();
        assert!(!msg.contains('\n'), "one line: {msg}");
        msg
    };
    assert!(bad(&|c| c.vision_num_heads = 7).contains("does not divide"));
    assert!(bad(&|c| c.decoder_num_heads = 5).contains("decoder"));
    assert!(bad(&|c| c.text_num_heads = 5).contains("text_num_heads"));
    assert!(bad(&|c| {
        c.vision_embed_dim = 72;
        c.vision_num_heads = 4
    })
    .contains("multiple of 4"));
    assert!(bad(&|c| c.text_embed_cls = true).contains("text_embed_cls"));
    let err = serde_json::from_str::<VtpConfig>(r#"{"vision_ffn_layer": "geglu"}"#).unwrap_err().to_string();
    assert!(err.contains("geglu"), "{err}");
}

#[test]
fn config_defaults_fill_missing_fields_and_unknown_fields_survive() {
    let c: VtpConfig = serde_json::from_str(r#"{"vision_embed_dim": 384, "custom_field": [1, 2]}"#).unwrap();
    assert_eq!(c.vision_embed_dim, 384);
    assert_eq!(c.vision_depth, 12);
    assert_eq!(c.decoder_norm_layer, vtp::config::NormLayer::LayerNorm);
    let back = serde_json::to_value(&c).unwrap();
    assert_eq!(back["custom_field"], serde_json::json!([1, 2]));
    assert_eq!(back["vision_init_values"], serde_json::Value::Null);
}
