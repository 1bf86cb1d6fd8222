//! `vtp dit` command-line behaviour on a tiny random tokenizer (generation issue): sampling writes
//! the PNGs it promises, and every mismatch — another tokenizer, missing statistics, a label outside
//! the class range, another DiT config, an unknown config key, statistics of another channel count —
//! is a one-line error naming what is wrong.
mod common;
use common::{assert_one_line_error, s};
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::OnceLock;
use vtp::data::source;
use vtp::data::stream::StreamOptions;
use vtp::dit::stats::LatentStats;
use vtp::io::read_safetensors_map;

/// 48 synthetic 32-px images: with the tiny tokenizer (patch 16) 2×2 latents.
const DATA: &str = "synthetic:train?n=48&res=32";

/// `vtp dit sample --dit DIT --out OUT --steps 3`, then `extra`.
fn sample(dit: &Path, out: &Path, extra: &[&str]) -> Output {
    common::vtp(&[&["dit", "sample", "--dit", s(dit), "--out", s(out), "--steps", "3"][..], extra].concat())
}

/// What the tests share (read-only; a test that changes something works on a copy): a tiny
/// tokenizer, its cache of [`DATA`], and a 2-step DiT run on it.
struct Fixture {
    tokenizer: PathBuf,
    cache: PathBuf,
    run: PathBuf,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        // One folder per test process (statics are never dropped, so no TempDir): those of finished
        // processes are removed first.
        let root = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
        for entry in std::fs::read_dir(&root).unwrap().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.strip_prefix("dit_cli-").is_some_and(|pid| !Path::new("/proc").join(pid).exists()) {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
        let dir = root.join(format!("dit_cli-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let tokenizer = common::init_tiny_model(&dir, 1);
        let cache = dir.join("cache");
        common::assert_success(&common::dit_extract(&tokenizer, DATA, &cache, "32", &[]), "vtp dit extract");
        let run = dir.join("run");
        common::assert_success(&common::dit_train(&cache, &run, &["train.steps=2"]), "vtp dit train");
        Fixture { tokenizer, cache, run }
    })
}

/// A copy of the folder `from` (recursively) at `to`.
fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

#[test]
fn a_cache_or_a_tokenizer_of_another_tokenizer_is_refused() {
    let f = fixture();
    let tmp = tempfile::tempdir().unwrap();
    let other = common::init_tiny_model_with(tmp.path(), "other", "", 1);
    let cache = tmp.path().join("cache");
    copy_dir(&f.cache, &cache);
    let before = std::fs::read(cache.join("cache.json")).unwrap();
    let o = common::dit_extract(&other, DATA, &cache, "32", &[]);
    assert_one_line_error(&o, &[s(&cache), "holds a cache of another extraction", "choose another --out"]);
    assert_eq!(std::fs::read(cache.join("cache.json")).unwrap(), before, "the cache is left as it was");
    // The same tokenizer but another source is another extraction too.
    let o = common::dit_extract(&f.tokenizer, "synthetic:train?n=40&res=32", &cache, "32", &[]);
    assert_one_line_error(&o, &["holds a cache of another extraction"]);

    let o = sample(&f.run.join("model"), &tmp.path().join("samples"), &["--tokenizer", s(&other)]);
    assert_one_line_error(&o, &[s(&other), "fingerprint", "is not the one this DiT was trained on"]);
    assert!(!tmp.path().join("samples/000000.png").exists());
}

#[test]
fn missing_latent_statistics_are_an_error() {
    let f = fixture();
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    copy_dir(&f.cache, &cache);
    std::fs::remove_file(cache.join("latent_stats.safetensors")).unwrap();
    let o = common::dit_train(&cache, &tmp.path().join("run"), &["train.steps=1"]);
    assert_one_line_error(&o, &[s(&cache), "statistics missing", "latent_stats.safetensors"]);

    let dit = tmp.path().join("dit");
    copy_dir(&f.run.join("model"), &dit);
    std::fs::remove_file(dit.join("latent_stats.safetensors")).unwrap();
    let o = sample(&dit, &tmp.path().join("samples"), &[]);
    assert_one_line_error(&o, &[s(&dit), "latent statistics missing", "latent_stats.safetensors"]);
}

#[test]
fn a_label_outside_the_class_range_names_the_sample() {
    let f = fixture();
    let tmp = tempfile::tempdir().unwrap();
    let first = source::open(DATA, &StreamOptions::default())
        .unwrap()
        .map(Result::unwrap)
        .find(|s| s.labels["shape"] >= 3)
        .expect("a sample of shape class ≥ 3");
    let label = first.labels["shape"];
    let o = common::dit_extract(
        &f.tokenizer,
        DATA,
        &tmp.path().join("cache"),
        "32",
        &["--labels", "shape", "--num-classes", "3"],
    );
    let named = format!("sample '{}': label {label} is outside the class range 0..3", first.key);
    assert_one_line_error(&o, &[&named]);
    let o = common::dit_extract(&f.tokenizer, DATA, &tmp.path().join("cache2"), "32", &["--labels", "mood"]);
    assert_one_line_error(&o, &["--num-classes", "mood"]);
    let o = common::dit_extract(
        &f.tokenizer,
        DATA,
        &tmp.path().join("cache3"),
        "32",
        &["--labels", "mood", "--num-classes", "2"],
    );
    assert_one_line_error(&o, &["has no 'mood' label", "shape"]);
}

#[test]
fn a_dit_of_another_config_is_refused_naming_the_keys() {
    let f = fixture();
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    copy_dir(&f.run, &run);
    // --resume takes the run's config.toml, then the overrides: another width cannot load the checkpoint.
    let o = common::vtp(&["dit", "train", "--out", s(&run), "--resume", "model.hidden_size=64"]);
    common::assert_run_error(
        &o,
        &[
            "checkpoint does not match",
            "mis-shaped",
            "model.blocks.0.attn.proj.weight (saved [32, 32], expected [64, 64])",
        ],
    );

    let dit = tmp.path().join("dit");
    copy_dir(&f.run.join("model"), &dit);
    let config = std::fs::read_to_string(dit.join("config.json")).unwrap();
    assert!(config.contains("\"hidden_size\": 32"), "{config}");
    std::fs::write(dit.join("config.json"), config.replace("\"hidden_size\": 32", "\"hidden_size\": 64")).unwrap();
    let o = sample(&dit, &tmp.path().join("samples"), &[]);
    assert_one_line_error(
        &o,
        &[
            "does not match its LightningDiT config",
            "26 mis-shaped",
            "blocks.0.attn.proj.weight (file [32, 32], config [64, 64])",
        ],
    );
}

#[test]
fn a_failed_resume_leaves_the_run_resumable() {
    let f = fixture();
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    copy_dir(&f.run, &run);
    let before = std::fs::read_to_string(run.join("config.toml")).unwrap();
    let o = common::vtp(&["dit", "train", "--out", s(&run), "--resume", "model.hidden_size=64"]);
    common::assert_run_error(&o, &["checkpoint does not match"]);
    assert_eq!(std::fs::read_to_string(run.join("config.toml")).unwrap(), before, "config.toml unchanged");
    let o = common::vtp(&["dit", "train", "--out", s(&run), "--resume", "train.steps=3"]);
    common::assert_success(&o, "a plain --resume after a failed one");
}

#[test]
fn unknown_config_keys_are_one_line_errors_and_print_config_comments_every_key() {
    let f = fixture();
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    common::assert_run_error(
        &common::dit_train(&f.cache, &run, &["model.hiden_size=3"]),
        &["unknown config key 'model.hiden_size'"],
    );
    common::assert_run_error(&common::dit_train(&f.cache, &run, &["trian.steps=3"]), &["unknown config key 'trian"]);
    common::assert_run_error(
        &common::dit_train(&f.cache, &run, &["train.stepz=3"]),
        &["unknown config key 'train.stepz'"],
    );
    assert!(!run.join("config.toml").exists(), "nothing is written for a bad config");

    let text = common::print_config_of(&["dit", "train"]);
    for line in ["[model]", "hidden_size = 128", "in_channels = 0", "[transport]", "cosine_loss = true", "[sample]"] {
        assert!(text.lines().any(|l| l == line), "{line:?} in:\n{text}");
    }
    // With a cache the printed config has the sizes resolved from it.
    let resolved = common::print_config_of(&["dit", "train", "--cache", s(&f.cache), "model.hidden_size=32"]);
    for line in ["in_channels = 64", "input_size = 2", "num_classes = 8", "hidden_size = 32"] {
        assert!(resolved.lines().any(|l| l == line), "{line:?} in:\n{resolved}");
    }
}

#[test]
fn sample_writes_the_pngs_and_released_stats_must_match_the_channels() {
    let f = fixture();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("samples");
    let o = sample(&f.run.join("model"), &out, &["-n", "5", "--batch", "2"]);
    common::assert_success(&o, "vtp dit sample");
    let mut names: Vec<String> =
        std::fs::read_dir(&out).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    assert_eq!(names, ["000000.png", "000001.png", "000002.png", "000003.png", "000004.png", "grid.png"]);
    for name in &names[..5] {
        let img = image::open(out.join(name)).unwrap();
        assert_eq!((img.width(), img.height()), (32, 32), "{name}: the tokenizer's 32-px images");
    }
    let grid = image::open(out.join("grid.png")).unwrap();
    assert!(grid.height() >= 5 * 32, "five rows of one sample (one row per class)");
    // A training checkpoint samples too (its EMA weights), identically to the export of that step.
    let ckpt = vtp::train::checkpoint::latest(&f.run).unwrap().unwrap();
    let from_ckpt = tmp.path().join("from-ckpt");
    common::assert_success(&sample(&ckpt, &from_ckpt, &["-n", "5", "--batch", "2"]), "vtp dit sample of a checkpoint");
    for name in &names {
        assert_eq!(std::fs::read(out.join(name)).unwrap(), std::fs::read(from_ckpt.join(name)).unwrap(), "{name}");
    }

    // The released VTP statistics have 64 channels: they replace a 64-channel cache's own …
    let run = tmp.path().join("vtp-s");
    common::assert_success(&common::dit_train(&f.cache, &run, &["train.steps=1", "--stats", "vtp-s"]), "--stats vtp-s");
    let released = LatentStats::released("vtp-s").unwrap();
    let exported = read_safetensors_map(&run.join("model/latent_stats.safetensors")).unwrap();
    assert!(exported["mean"].equal(&released.mean) && exported["std"].equal(&released.std));
    // … and are refused for latents of another channel count.
    let narrow = common::init_tiny_model_with(tmp.path(), "narrow", r#""vision_feature_bottleneck": 16"#, 0);
    let cache16 = tmp.path().join("cache16");
    common::assert_success(&common::dit_extract(&narrow, DATA, &cache16, "32", &[]), "vtp dit extract (16 channels)");
    let o = common::dit_train(&cache16, &tmp.path().join("run16"), &["train.steps=1", "--stats", "vtp-s"]);
    common::assert_run_error(&o, &["latent statistics have 64 channels, the latents 16"]);
    let o = sample(
        &f.run.join("model"),
        &tmp.path().join("bad"),
        &["--stats", s(&cache16.join("latent_stats.safetensors"))],
    );
    assert_one_line_error(&o, &["latent statistics have 16 channels, the latents 64"]);
}
