//! The training metrics machinery: the JSONL log and its resume, the native TensorBoard event files
//! (read back with the `tensorboard` package and checked record by record), and the PNG plots.
mod common;

use std::path::{Path, PathBuf};
use vtp::train::metrics::{read_jsonl, MetricsLog};
use vtp::train::plots::{plot_curves, plot_metrics, Series};

/// The `step` column of a JSONL log.
fn steps(rows: &[serde_json::Map<String, serde_json::Value>]) -> Vec<u64> {
    rows.iter().map(|r| r["step"].as_u64().unwrap()).collect()
}

#[test]
fn resumed_log_has_each_step_once_and_nan_as_null() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = MetricsLog::open(dir.path(), None).unwrap();
    for step in 1..=5u64 {
        let loss = if step == 3 { f64::NAN } else { step as f64 * 0.5 };
        log.log(step, &[("loss/total", loss), ("lr", 1e-4)]).unwrap();
    }
    log.flush().unwrap();
    drop(log);
    let mut log = MetricsLog::open(dir.path(), Some(3)).unwrap();
    for step in 4..=6u64 {
        log.log(step, &[("loss/total", 100.0 + step as f64), ("lr", 2e-4)]).unwrap();
    }
    log.flush().unwrap();

    let rows = read_jsonl(&dir.path().join("metrics.jsonl")).unwrap();
    assert_eq!(steps(&rows), [1, 2, 3, 4, 5, 6]);
    assert_eq!(rows[0].keys().collect::<Vec<_>>(), ["step", "loss/total", "lr"]);
    assert_eq!(rows[1]["loss/total"], 1.0);
    assert!(rows[2]["loss/total"].is_null(), "NaN is written as null: {:?}", rows[2]);
    assert_eq!(rows[3]["loss/total"], 104.0);
    assert_eq!(rows[5]["lr"], 2e-4);
    assert_eq!(rows[0]["lr"], 1e-4);
}

#[test]
fn resume_drops_a_line_torn_by_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("metrics.jsonl");
    std::fs::write(&path, "{\"step\": 1, \"lr\": 0.5}\n{\"step\": 2, \"lr\": 0.25}\n{\"step\": 3, \"l").unwrap();
    let mut log = MetricsLog::open(dir.path(), Some(2)).unwrap();
    log.log(3, &[("lr", 0.125)]).unwrap();
    log.flush().unwrap();
    let rows = read_jsonl(&path).unwrap();
    assert_eq!(steps(&rows), [1, 2, 3]);
    assert_eq!(rows[2]["lr"], 0.125);
}

#[test]
fn malformed_jsonl_line_names_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("metrics.jsonl");
    std::fs::write(&path, "{\"step\": 1}\n\n{\"step\": 2,\n").unwrap();
    let message = read_jsonl(&path).unwrap_err().to_string();
    assert!(message.contains("metrics.jsonl") && message.contains("line 3"), "{message}");
    assert!(!message.contains('\n'), "{message}");
}

/// The single event file in `run_dir/tensorboard`.
fn event_file(run_dir: &Path) -> PathBuf {
    let files: Vec<PathBuf> =
        std::fs::read_dir(run_dir.join("tensorboard")).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(files.len(), 1, "{files:?}");
    let name = files[0].file_name().unwrap().to_string_lossy().into_owned();
    assert!(name.starts_with("events.out.tfevents."), "{name}");
    files[0].clone()
}

/// Reads the event file with tensorboard's own record reader (which raises on a bad CRC) and its
/// `EventAccumulator`; prints `{"records": n, "version": ..., "scalars": {tag: [[step, value]]}}`.
const TENSORBOARD_READER: &str = r#"
import json, math, sys
from tensorboard.compat.tensorflow_stub import errors, pywrap_tensorflow
from tensorboard.compat.proto import event_pb2
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
reader = pywrap_tensorflow.PyRecordReader_New(sys.argv[1])
events = []
while True:
    try:
        reader.GetNext()
    except errors.OutOfRangeError:
        break
    events.append(event_pb2.Event.FromString(reader.record()))
acc = EventAccumulator(sys.argv[2], size_guidance={"scalars": 0})
acc.Reload()
scalars = {tag: [[s.step, None if math.isnan(s.value) else s.value] for s in acc.Scalars(tag)]
           for tag in acc.Tags()["scalars"]}
print(json.dumps({"records": len(events), "version": events[0].file_version, "scalars": scalars}))
"#;

#[test]
fn tensorboard_reads_back_the_scalars() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = MetricsLog::open(dir.path(), None).unwrap();
    let expected: Vec<(u64, f64, f64)> = (0..5).map(|s| (s * 10, 1.0 / (s as f64 + 3.0), 1e-3 * s as f64)).collect();
    for &(step, loss, lr) in &expected {
        let loss = if step == 20 { f64::NAN } else { loss };
        log.log(step, &[("loss/total", loss), ("lr", lr)]).unwrap();
    }
    log.flush().unwrap();
    let file = event_file(dir.path());
    let out = std::process::Command::new(common::venv_python())
        .args(["-c", TENSORBOARD_READER, file.to_str().unwrap(), dir.path().join("tensorboard").to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "tensorboard reader: {}", String::from_utf8_lossy(&out.stderr));
    let read: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(read["records"], 1 + 2 * expected.len());
    assert_eq!(read["version"], "brain.Event:2");
    let tags: Vec<&String> = read["scalars"].as_object().unwrap().keys().collect();
    assert_eq!(tags.len(), 2, "{tags:?}");
    for (tag, column) in [("loss/total", 1), ("lr", 2)] {
        let points = read["scalars"][tag].as_array().unwrap_or_else(|| panic!("no tag {tag}: {read}"));
        assert_eq!(points.len(), expected.len());
        for (point, row) in points.iter().zip(&expected) {
            let want = if column == 1 { row.1 } else { row.2 };
            assert_eq!(point[0], row.0, "{tag} step");
            match point[1].as_f64() {
                Some(got) => assert_eq!(got as f32, want as f32, "{tag} at step {}", row.0),
                None => assert!(tag == "loss/total" && row.0 == 20, "{tag} is NaN at step {}", row.0),
            }
        }
    }
}

/// CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), bit by bit: independent of the crate the
/// writer uses.
fn crc32c_bitwise(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 { (crc >> 1) ^ 0x82F6_3B78 } else { crc >> 1 };
        }
    }
    !crc
}

/// TFRecord's masked CRC.
fn masked(bytes: &[u8]) -> u32 {
    let crc = crc32c_bitwise(bytes);
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

#[test]
fn event_records_carry_correct_masked_crc32c() {
    assert_eq!(crc32c_bitwise(b"123456789"), 0xE306_9283);
    let dir = tempfile::tempdir().unwrap();
    let mut log = MetricsLog::open(dir.path(), None).unwrap();
    log.log(7, &[("loss/total", 0.5), ("eval/zero_shot_top1", 0.25)]).unwrap();
    log.flush().unwrap();
    let bytes = std::fs::read(event_file(dir.path())).unwrap();
    let u32_at = |i: usize| u32::from_le_bytes(bytes[i..i + 4].try_into().unwrap());
    let (mut at, mut records) = (0, Vec::new());
    while at < bytes.len() {
        let len = u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap()) as usize;
        assert_eq!(u32_at(at + 8), masked(&bytes[at..at + 8]), "length CRC of record {}", records.len());
        let data = &bytes[at + 12..at + 12 + len];
        assert_eq!(u32_at(at + 12 + len), masked(data), "data CRC of record {}", records.len());
        records.push(data.to_vec());
        at += 16 + len;
    }
    assert_eq!(at, bytes.len());
    assert_eq!(records.len(), 3);
    assert!(records[0].windows(13).any(|w| w == b"brain.Event:2"));
    assert!(records[2].windows(19).any(|w| w == b"eval/zero_shot_top1"));
}

/// The decoded PNG and its number of distinct colours.
fn decode(path: &Path) -> (image::RgbImage, usize) {
    let image = image::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())).to_rgb8();
    let colours: std::collections::HashSet<[u8; 3]> = image.pixels().map(|p| p.0).collect();
    (image, colours.len())
}

#[test]
fn plot_metrics_writes_the_charts() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = MetricsLog::open(dir.path(), None).unwrap();
    for step in 0..200u64 {
        let t = step as f64;
        let mut scalars = vec![
            ("loss/total", 5.0 * (-t / 40.0).exp() + 0.01),
            ("loss/distill", 2.0 / (1.0 + t / 10.0)),
            ("lr", 1e-3 * (t / 20.0).min(1.0)),
            ("momentum", 0.99 + 0.009 * t / 200.0),
        ];
        if step % 50 == 49 {
            scalars.push(("eval/zero_shot_top1", t / 400.0));
        }
        log.log(step, &scalars).unwrap();
    }
    log.flush().unwrap();
    let written = plot_metrics(dir.path()).unwrap();
    let names: Vec<String> = written.iter().map(|p| p.file_name().unwrap().to_string_lossy().into_owned()).collect();
    assert_eq!(names, ["losses.png", "eval.png", "lr.png"]);
    for path in &written {
        assert_eq!(path.parent().unwrap(), dir.path().join("plots"));
        let (image, colours) = decode(path);
        assert_eq!(image.dimensions(), (900, 500), "{}", path.display());
        assert!(colours > 20, "{} has only {colours} colours", path.display());
        assert!(image.pixels().any(|p| p.0 == [31, 119, 180]), "{} has no first-series line", path.display());
    }
}

#[test]
fn plot_curves_skips_non_finite_points_and_handles_empty_series() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("log.png");
    let points = vec![(0.0, 10.0), (1.0, f64::NAN), (2.0, f64::INFINITY), (3.0, 0.0), (4.0, 0.001)];
    let series = [Series { name: "a".into(), points }, Series { name: "empty".into(), points: vec![] }];
    plot_curves(&path, "log scale", &series, true).unwrap();
    let (image, colours) = decode(&path);
    assert_eq!(image.dimensions(), (900, 500));
    assert!(colours > 20, "only {colours} colours");
    plot_curves(&dir.path().join("none.png"), "nothing", &[], false).unwrap();
}
