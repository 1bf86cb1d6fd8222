//! The `vtp` binary end to end (`check` on every fixture is in tests/parity.rs): offline `hf:` ids, tokenize, init +
//! reconstruct/encode/decode/features/zero-shot, and one-line errors (no panic) for bad input.
mod common;
use common::{assert_one_line_error, s, stderr};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn vtp(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vtp")).args(args).env("HF_HUB_OFFLINE", "1").output().expect("vtp runs")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn copy_fixture_model(name: &str, to: &Path) -> PathBuf {
    let dir = to.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(common::fixture(name).join(f), dir.join(f)).unwrap();
    }
    dir
}

#[test]
fn check_fails_past_the_bound() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = common::fixture("vtp-tiny");
    let random = tmp.path().join("random");
    let o = vtp(&["init", "--config", s(&dir.join("config.json")), "--out", s(&random), "--seed", "3"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = vtp(&["check", "--model", s(&random), "--reference", s(&dir.join("io.safetensors"))]);
    assert_one_line_error(&o, &["exceed the bound"]);
    assert!(stdout(&o).contains("FAIL"));
}

#[test]
fn hf_ids_resolve_through_an_offline_cache() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = tmp.path().join("models--MiniMaxAI--VTP-Tiny-f16d64");
    let hash = "0123456789abcdef0123456789abcdef01234567";
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), hash).unwrap();
    let snapshots = repo.join("snapshots");
    copy_fixture_model("vtp-tiny", &snapshots);
    std::fs::rename(snapshots.join("vtp-tiny"), snapshots.join(hash)).unwrap();
    let reference = common::fixture("vtp-tiny").join("io.safetensors");
    let run = |id: &str| {
        Command::new(env!("CARGO_BIN_EXE_vtp"))
            // Pinned to AVX2: the fixture was made on an AVX2 CPU (tests/parity.rs on kernels).
            .args(["--kernels", "avx2", "check", "--model", id, "--reference", s(&reference), "--max-rel", "1e-6"])
            .env("HF_HUB_CACHE", tmp.path())
            .env("HF_HUB_OFFLINE", "1")
            .output()
            .unwrap()
    };
    let o = run("hf:MiniMaxAI/VTP-Tiny-f16d64");
    assert!(o.status.success(), "{}", stderr(&o));
    let o = run("hf:MiniMaxAI/VTP-Missing-f16d64");
    assert_one_line_error(&o, &["MiniMaxAI/VTP-Missing-f16d64"]);
}

#[test]
fn tokenize_prints_one_row_per_text() {
    let o = vtp(&["tokenize", "--context-length", "10", "a photo of a dog.", "A  Photo of the  CAT!!"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o), "49406 320 1125 539 320 1929 269 49407 0 0\n49406 320 1125 539 518 2368 748 49407 0 0\n");
}

fn write_png(path: &Path, w: u32, h: u32) {
    image::RgbImage::from_fn(w, h, |x, y| image::Rgb([(x * 7) as u8, (y * 5) as u8, ((x + y) * 3) as u8]))
        .save(path)
        .unwrap();
}

#[test]
fn image_commands_run_on_a_random_tiny_model() {
    let tmp = tempfile::tempdir().unwrap();
    let model = copy_fixture_model("vtp-tiny", tmp.path());
    let images = tmp.path().join("images");
    std::fs::create_dir_all(&images).unwrap();
    write_png(&images.join("a.png"), 64, 48);
    write_png(&images.join("b.png"), 70, 90); // cropped to 64x80
    let out = tmp.path().join("rec");
    let o = vtp(&["reconstruct", "--model", s(&model), s(&images), "--out", s(&out)]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("mean PSNR"), "{}", stdout(&o));
    let rec = image::open(out.join("b.png")).unwrap();
    assert_eq!((rec.width(), rec.height()), (64, 80));

    let latents = tmp.path().join("z.safetensors");
    let o = vtp(&["encode", "--model", s(&model), s(&images), "--out", s(&latents)]);
    assert!(o.status.success(), "{}", stderr(&o));
    let z = vtp::io::read_safetensors_map(&latents).unwrap();
    assert_eq!(z["a"].size(), [64, 3, 4]);
    assert_eq!(z["b"].size(), [64, 5, 4]);
    let dec = tmp.path().join("dec");
    let o = vtp(&["decode", "--model", s(&model), s(&latents), "--out", s(&dec)]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(dec.join("a.png").exists() && dec.join("b.png").exists());

    let feats = tmp.path().join("f.safetensors");
    let o = vtp(&[
        "features",
        "--model",
        s(&model),
        s(&images.join("a.png")),
        "--out",
        s(&feats),
        "--layers",
        "2",
        "--clip",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let f = vtp::io::read_safetensors_map(&feats).unwrap();
    assert_eq!(f["a.cls_token"].size(), [72]);
    assert_eq!(f["a.layer1.patch_tokens"].size(), [12, 72]);
    assert_eq!(f["a.clip"].size(), [32]);

    let o = vtp(&["zero-shot", "--model", s(&model), s(&images.join("a.png")), "--labels", "a dog,a cat"]);
    // vtp-tiny's text tower has a 512-token vocabulary: real CLIP ids are out of range.
    assert_one_line_error(&o, &[]);
}

#[test]
fn zero_shot_prints_probabilities() {
    let tmp = tempfile::tempdir().unwrap();
    write_png(&tmp.path().join("x.png"), 32, 32);
    let model = common::init_tiny_model(tmp.path(), 1);
    let o = vtp(&["zero-shot", "--model", s(&model), s(&tmp.path().join("x.png")), "--labels", "a dog, a cat"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let line = stdout(&o);
    let probs: Vec<f64> = line.split(": ").filter_map(|piece| piece.split([',', ' ']).next()?.parse().ok()).collect();
    assert_eq!(probs.len(), 2, "{line}");
    assert!((probs.iter().sum::<f64>() - 1.0).abs() < 1e-3, "{line}");
}

#[test]
fn bad_inputs_are_one_line_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let reference = common::fixture("vtp-tiny").join("io.safetensors");
    let check = |dir: &Path| vtp(&["check", "--model", s(dir), "--reference", s(&reference)]);

    let missing = tmp.path().join("nope");
    assert_one_line_error(&check(&missing), &["nope"]);

    let truncated = copy_fixture_model("vtp-tiny", &tmp.path().join("t"));
    let bytes = std::fs::read(truncated.join("model.safetensors")).unwrap();
    std::fs::write(truncated.join("model.safetensors"), &bytes[..bytes.len() / 2]).unwrap();
    assert_one_line_error(&check(&truncated), &["model.safetensors", "not a valid safetensors"]);

    let corrupt = copy_fixture_model("vtp-tiny", &tmp.path().join("c"));
    std::fs::write(corrupt.join("model.safetensors"), b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage!}").unwrap();
    assert_one_line_error(&check(&corrupt), &["model.safetensors", "not a valid safetensors"]);

    let mismatch = copy_fixture_model("vtp-tiny", &tmp.path().join("m"));
    std::fs::copy(common::fixture("vtp-tiny-variant").join("config.json"), mismatch.join("config.json")).unwrap();
    assert_one_line_error(
        &check(&mismatch),
        &["does not match its config.json", "missing", "unexpected", "mis-shaped"],
    );

    let bad_config = copy_fixture_model("vtp-tiny", &tmp.path().join("b"));
    std::fs::write(bad_config.join("config.json"), r#"{"vision_num_heads": 5, "vision_embed_dim": 72}"#).unwrap();
    assert_one_line_error(&check(&bad_config), &["config.json", "does not divide"]);

    let model = copy_fixture_model("vtp-tiny", &tmp.path().join("ok"));
    let garbage = tmp.path().join("garbage.png");
    std::fs::write(&garbage, b"definitely not a png").unwrap();
    let o = vtp(&["reconstruct", "--model", s(&model), s(&garbage), "--out", s(&tmp.path().join("o"))]);
    assert_one_line_error(&o, &["garbage.png"]);

    let tiny = tmp.path().join("tiny.png");
    write_png(&tiny, 8, 8);
    let o = vtp(&["reconstruct", "--model", s(&model), s(&tiny), "--out", s(&tmp.path().join("o"))]);
    assert_one_line_error(&o, &["tiny.png", "smaller than one"]);

    let o = vtp(&["reconstruct", "--model", s(&model), s(&tmp.path().join("absent.png"))]);
    assert_one_line_error(&o, &["absent.png", "does not exist"]);

    let o = vtp(&["decode", "--model", s(&model), s(&garbage)]);
    assert_one_line_error(&o, &["garbage.png"]);
}

#[test]
fn data_write_shards_and_inspect() {
    let tmp = tempfile::tempdir().unwrap();
    let shards = tmp.path().join("shards");
    let o = vtp(&[
        "data",
        "write-shards",
        "--source",
        "synthetic:train?n=30&res=32",
        "--out",
        s(&shards),
        "--per-shard",
        "8",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("wrote 30 samples in 4 shards"), "{}", stdout(&o));
    let spec = format!("{}/{{000000..000003}}.tar", s(&shards));
    let out = tmp.path().join("inspect");
    let o = vtp(&["data", "inspect", &spec, "--out", s(&out), "--global-size", "64", "--local-size", "32"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = stdout(&o);
    assert!(text.contains("samples read: 30"), "{text}");
    assert!(text.contains("skipped: 0 corrupt, 0 without caption"), "{text}");
    assert!(text.contains("shape_color (30)"), "{text}");
    for sheet in ["samples.png", "augmentations.png"] {
        let img = image::open(out.join(sheet)).unwrap();
        assert!(img.width() > 100 && img.height() > 100, "{sheet}");
    }
    let o = vtp(&["data", "inspect", s(&tmp.path().join("missing.tar"))]);
    assert_one_line_error(&o, &["missing.tar"]);
}

#[test]
fn usage_errors_are_one_line() {
    for (args, needle) in [
        (&["--kernels", "avx512", "tokenize", "x"][..], "'avx512'"),
        (&["--threads", "0", "tokenize", "x"][..], "'0'"),
        (&["check", "--model"][..], "--model"),
    ] {
        let o = vtp(args);
        let err = stderr(&o);
        assert!(!o.status.success(), "{args:?} should fail");
        assert_eq!(err.lines().count(), 1, "{args:?}: one line of error: {err:?}");
        assert!(err.starts_with("error: ") && err.contains(needle), "{args:?}: {err}");
    }
}

#[test]
fn a_short_finetune_scales_its_lr_warm_up_once() {
    // The tiny preset warms the lr up over 20 of its 300 steps: 8 steps keep the ratio, at least 1 step.
    let o = vtp(&["finetune-decoder", "--print-config", "train.steps=8"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let err = stderr(&o);
    let notes: Vec<&str> = err.lines().filter(|l| l.starts_with("note: train.steps")).collect();
    assert_eq!(notes.len(), 1, "{err}");
    assert!(notes[0].contains("the preset's 300 steps") && notes[0].ends_with("lr warm-up 20 → 1"), "{}", notes[0]);
    let config: toml::Table = toml::from_str(&stdout(&o)).unwrap();
    assert_eq!(config["schedule"]["warmup_steps"].as_integer(), Some(1), "the effective (recorded) config");
    // A run at least as long as the warm-up, or a warm-up set explicitly, is left alone.
    for args in [&["train.steps=20"][..], &["train.steps=8", "schedule.warmup_steps=5"]] {
        let o = vtp(&[&["finetune-decoder", "--print-config"][..], args].concat());
        assert!(o.status.success() && !stderr(&o).contains("note:"), "{args:?}: {}", stderr(&o));
    }
    let o = vtp(&["finetune-decoder", "--print-config", "train.steps=8", "schedule.warmup_steps=30"]);
    assert_one_line_error(&o, &["schedule.warmup_steps = 30 is longer than train.steps = 8", "at most 8"]);
}

#[test]
fn pinned_kernels_keep_arguments_output_and_exit_status() {
    // `--kernels avx2` re-executes the program with the pinning variables (their effect on the
    // numbers is tests/parity.rs'); the re-executed process must see the same arguments and report
    // its own output and exit status.
    let o = vtp(&["--kernels", "avx2", "tokenize", "--context-length", "4", "a dog"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o), "49406 320 1929 49407\n");
    let o = vtp(&["--kernels", "avx2", "check", "--model", "/nonexistent/model", "--reference", "x"]);
    assert_one_line_error(&o, &["/nonexistent/model"]);
}
