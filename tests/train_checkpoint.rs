//! Checkpoint files (`vtp::train::checkpoint`): save / latest / load round trip with values and dtypes
//! kept, `keep_last` pruning, temporary folders of interrupted saves ignored, one-line errors naming a
//! corrupt file or the missing / mis-shaped tensors of a restore; checksums that catch a flipped byte,
//! and `--resume` past a truncated, bit-flipped or incomplete newest checkpoint.
mod common;
use common::s;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Output;
use tch::{Device, Kind, Tensor};
use vtp::train::checkpoint::{latest, load, load_newest_intact, restore_into, save, STATE_FILE, TENSORS_FILE};

fn tensors() -> Vec<(String, Tensor)> {
    vec![
        ("student.w".into(), Tensor::arange(12, (Kind::Float, Device::Cpu)).reshape([3, 4]) / 7.0),
        ("teacher.periods".into(), Tensor::from_slice(&[1.5f32, 2.25]).to_kind(Kind::BFloat16)),
        ("optim.w.step".into(), Tensor::from(3.0f32)),
        ("data.position".into(), Tensor::from_slice(&[7i64, -1])),
        ("centre".into(), Tensor::from_slice(&[0.1f64, 0.2, 0.3])),
    ]
}

fn state(step: u64) -> serde_json::Value {
    serde_json::json!({"step": step, "data": {"epoch": 1, "offset": 42}, "config": {"lr": 0.004}})
}

fn checkpoint_names(run: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(run.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn save_latest_load_round_trip() {
    let run = tempfile::tempdir().unwrap();
    assert_eq!(latest(run.path()).unwrap(), None, "no checkpoints folder yet");
    let dir = save(run.path(), 120, &tensors(), &state(120), 3).unwrap();
    assert_eq!(dir, run.path().join("checkpoints/step-00000120"));
    assert!(dir.join(TENSORS_FILE).is_file() && dir.join(STATE_FILE).is_file());
    assert_eq!(latest(run.path()).unwrap(), Some(dir.clone()));
    let (loaded, json) = load(&dir).unwrap();
    assert_eq!(json, state(120));
    assert_eq!(loaded.len(), tensors().len());
    for (name, t) in tensors() {
        let back = &loaded[&name];
        assert_eq!(back.kind(), t.kind(), "{name}");
        assert!(back.equal(&t), "{name}");
    }
    // Saving the same step again replaces it.
    save(run.path(), 120, &tensors()[..1], &state(121), 3).unwrap();
    assert_eq!(load(&dir).unwrap().1, state(121));
    assert_eq!(checkpoint_names(run.path()), ["step-00000120"]);
}

#[test]
fn keep_last_prunes_the_oldest() {
    let run = tempfile::tempdir().unwrap();
    for step in [5, 10, 100_000_000, 15] {
        save(run.path(), step, &tensors(), &state(step), 2).unwrap();
    }
    // Ordered by step, not by name: step 100000000 is the newest.
    assert_eq!(checkpoint_names(run.path()), ["step-00000015", "step-100000000"]);
    assert_eq!(latest(run.path()).unwrap(), Some(run.path().join("checkpoints/step-100000000")));
    let keep_all = tempfile::tempdir().unwrap();
    for step in 1..=4 {
        save(keep_all.path(), step, &tensors(), &state(step), 0).unwrap();
    }
    assert_eq!(checkpoint_names(keep_all.path()).len(), 4, "keep_last 0 keeps every checkpoint");
}

#[test]
fn interrupted_save_is_ignored_then_cleaned_up() {
    let run = tempfile::tempdir().unwrap();
    let done = save(run.path(), 10, &tensors(), &state(10), 3).unwrap();
    // A crash mid-save leaves a temporary folder (here half-written: no state.json).
    let orphan = run.path().join("checkpoints/.tmp-step-00000020-999");
    std::fs::create_dir_all(&orphan).unwrap();
    std::fs::write(orphan.join(TENSORS_FILE), b"partial").unwrap();
    assert_eq!(latest(run.path()).unwrap(), Some(done));
    save(run.path(), 30, &tensors(), &state(30), 3).unwrap();
    assert_eq!(checkpoint_names(run.path()), ["step-00000010", "step-00000030"]);
}

#[test]
fn corrupt_files_are_one_line_errors_naming_them() {
    let run = tempfile::tempdir().unwrap();
    let dir = save(run.path(), 1, &tensors(), &state(1), 3).unwrap();
    std::fs::write(dir.join(TENSORS_FILE), b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":").unwrap();
    let err = format!("{:#}", load(&dir).unwrap_err());
    assert!(!err.contains('\n') && err.contains(&dir.join(TENSORS_FILE).display().to_string()), "{err}");
    let dir = save(run.path(), 2, &tensors(), &state(2), 3).unwrap();
    std::fs::write(dir.join(STATE_FILE), b"{\"step\": ").unwrap();
    let err = format!("{:#}", load(&dir).unwrap_err());
    assert!(!err.contains('\n') && err.contains(&dir.join(STATE_FILE).display().to_string()), "{err}");
    std::fs::remove_file(dir.join(STATE_FILE)).unwrap();
    let err = format!("{:#}", load(&dir).unwrap_err());
    assert!(!err.contains('\n') && err.contains(STATE_FILE), "{err}");
}

#[test]
fn duplicate_names_are_refused() {
    let run = tempfile::tempdir().unwrap();
    let mut t = tensors();
    t.push(("centre".into(), Tensor::from(1.0f32)));
    let err = save(run.path(), 1, &t, &state(1), 3).unwrap_err().to_string();
    assert!(err.contains("'centre'"), "{err}");
    assert_eq!(latest(run.path()).unwrap(), None);
}

#[test]
fn restore_into_copies_in_place_and_names_problems() {
    let saved: HashMap<String, Tensor> = tensors().into_iter().map(|(n, t)| (format!("ckpt.{n}"), t)).collect();
    let w = Tensor::zeros([3, 4], (Kind::Float, Device::Cpu)).set_requires_grad(true);
    let periods = Tensor::zeros([2], (Kind::Float, Device::Cpu));
    let live =
        vec![("student.w".to_string(), w.shallow_clone()), ("teacher.periods".to_string(), periods.shallow_clone())];
    restore_into(&live, &saved, "ckpt.").unwrap();
    assert!(w.equal(&saved["ckpt.student.w"]) && w.requires_grad(), "copied in place into the leaf");
    assert!(periods.equal(&Tensor::from_slice(&[1.5f32, 2.25])), "converted to the live dtype");

    let untouched = Tensor::zeros([3], (Kind::Double, Device::Cpu));
    let bad = vec![
        ("centre".to_string(), untouched.shallow_clone()),
        ("student.w".to_string(), Tensor::zeros([4, 3], (Kind::Float, Device::Cpu))),
        ("dino_head.last_layer.weight_g".to_string(), Tensor::zeros([8, 1], (Kind::Float, Device::Cpu))),
    ];
    let err = restore_into(&bad, &saved, "ckpt.").unwrap_err().to_string();
    assert!(!err.contains('\n'), "{err}");
    assert!(err.contains("missing [ckpt.dino_head.last_layer.weight_g]"), "{err}");
    assert!(err.contains("ckpt.student.w (saved [3, 4], expected [4, 3])"), "{err}");
    assert!(untouched.equal(&Tensor::zeros([3], (Kind::Double, Device::Cpu))), "nothing copied on error");
}

#[test]
fn long_restore_errors_stay_short() {
    let live: Vec<(String, Tensor)> = (0..10).map(|i| (format!("p{i}"), Tensor::from(0.0f32))).collect();
    let err = restore_into(&live, &HashMap::new(), "").unwrap_err().to_string();
    assert!(err.contains("missing [p0, p1, p2, p3, p4, p5, p6, p7 (+2 more)]"), "{err}");
}

/// Flips one bit of byte `at` (counted from the end when negative) of the file `path`.
fn flip_byte(path: &Path, at: i64) {
    let mut bytes = std::fs::read(path).unwrap();
    let i = if at < 0 { bytes.len() - at.unsigned_abs() as usize } else { at as usize };
    bytes[i] ^= 0x10;
    std::fs::write(path, bytes).unwrap();
}

/// Flips one bit in the middle of the tensor data of the safetensors file `path`.
fn flip_in_data(path: &Path) {
    let bytes = std::fs::read(path).unwrap();
    let header = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    flip_byte(path, (8 + header + bytes.len()) as i64 / 2);
}

/// Cuts the file `path` to half its length.
fn truncate(path: &Path) {
    let bytes = std::fs::read(path).unwrap();
    std::fs::write(path, &bytes[..bytes.len() / 2]).unwrap();
}

/// `load(dir)`'s error, asserted to be one line.
fn load_error(dir: &Path) -> String {
    let err = format!("{:#}", load(dir).unwrap_err());
    assert!(!err.contains('\n'), "{err}");
    err
}

#[test]
fn a_flipped_byte_in_a_tensor_or_the_state_fails_its_checksum() {
    let run = tempfile::tempdir().unwrap();
    let dir = save(run.path(), 1, &tensors(), &state(1), 3).unwrap();
    let original = std::fs::read(dir.join(TENSORS_FILE)).unwrap();
    // The last byte of the file is tensor data: still a valid safetensors file, caught by its checksum.
    flip_byte(&dir.join(TENSORS_FILE), -1);
    assert!(vtp::io::read_safetensors(&dir.join(TENSORS_FILE)).is_ok(), "the flip leaves the file parsable");
    let err = load_error(&dir);
    assert!(err.contains("checksum mismatch in tensor '") && err.contains(TENSORS_FILE), "{err}");
    std::fs::write(dir.join(TENSORS_FILE), original).unwrap();
    load(&dir).unwrap();
    // "offset": 42 -> 43 is still valid JSON.
    let text = std::fs::read_to_string(dir.join(STATE_FILE)).unwrap();
    std::fs::write(dir.join(STATE_FILE), text.replace("42", "43")).unwrap();
    let err = load_error(&dir);
    assert!(
        err.contains("checksum mismatch in '") && err.contains(&dir.join(STATE_FILE).display().to_string()),
        "{err}"
    );
}

#[test]
fn a_checkpoint_written_before_checksums_still_loads() {
    let run = tempfile::tempdir().unwrap();
    let dir = save(run.path(), 1, &tensors(), &state(1), 3).unwrap();
    vtp::io::write_safetensors(&dir.join(TENSORS_FILE), &tensors(), &[("format", "pt")]).unwrap();
    let (loaded, json) = load(&dir).unwrap();
    assert_eq!(json, state(1));
    for (name, t) in tensors() {
        assert!(loaded[&name].equal(&t), "{name}");
    }
}

#[test]
fn the_newest_intact_checkpoint_is_found_past_corrupt_ones() {
    let run = tempfile::tempdir().unwrap();
    let dirs: Vec<PathBuf> = (1..=3).map(|step| save(run.path(), step, &tensors(), &state(step), 0).unwrap()).collect();
    truncate(&dirs[2].join(TENSORS_FILE));
    std::fs::remove_file(dirs[1].join(STATE_FILE)).unwrap();
    let found = load_newest_intact(run.path()).unwrap();
    assert_eq!((found.dir.as_path(), &found.state), (dirs[0].as_path(), &state(1)));
    let unreadable: Vec<&PathBuf> = found.unreadable.iter().map(|(dir, _)| dir).collect();
    assert_eq!(unreadable, [&dirs[2], &dirs[1]], "newest first");
    assert!(format!("{:#}", found.unreadable[1].1).contains(STATE_FILE));
    // None intact: one line naming each, and every folder is left in place.
    flip_byte(&dirs[0].join(TENSORS_FILE), -1);
    let err = format!("{:#}", load_newest_intact(run.path()).err().unwrap());
    assert!(!err.contains('\n') && err.starts_with("no intact checkpoint under"), "{err}");
    assert!(dirs.iter().all(|d| err.contains(&d.display().to_string()) && d.is_dir()), "{err}");
    assert_eq!(checkpoint_names(run.path()), ["step-00000001", "step-00000002", "step-00000003"]);
    let empty = tempfile::tempdir().unwrap();
    let err = load_newest_intact(empty.path()).err().unwrap().to_string();
    assert!(err.starts_with("no checkpoint under"), "{err}");
}

#[test]
fn a_save_never_prunes_the_checkpoint_it_wrote() {
    // A run resumed at step 2 past a corrupt step 3 saves step 2 again while step 3 is the newest.
    let run = tempfile::tempdir().unwrap();
    save(run.path(), 3, &tensors(), &state(3), 1).unwrap();
    save(run.path(), 2, &tensors(), &state(2), 1).unwrap();
    assert_eq!(checkpoint_names(run.path()), ["step-00000002", "step-00000003"]);
}

/// [`common::PRETRAIN_FAST`] as a run: 6 steps, a checkpoint every 2, 3 kept.
const SMALL_RUN: &[&str] = &["train.steps=6", "checkpoint.every=2", "checkpoint.keep=3"];

/// `vtp pretrain` of [`SMALL_RUN`] into `run`, then `extra`.
fn pretrain(run: &Path, extra: &[&str]) -> Output {
    let args = [
        &["pretrain", "--preset", "tiny", "--out", s(run)][..],
        common::PRETRAIN_STEP_SMALL,
        common::PRETRAIN_FAST,
        SMALL_RUN,
        extra,
    ];
    common::vtp(&args.concat())
}

/// A [`SMALL_RUN`] stopped after 4 steps (checkpoints at steps 2 and 4) in `dir/name`.
fn stopped_run(dir: &Path, name: &str) -> PathBuf {
    let run = dir.join(name);
    common::assert_success(&pretrain(&run, &["--stop-after", "4"]), "vtp pretrain --stop-after 4");
    assert_eq!(checkpoint_names(&run), ["step-00000002", "step-00000004"]);
    run
}

/// A copy of the run folder `run` at `to`.
fn copy_run(run: &Path, to: &Path) -> PathBuf {
    let o = std::process::Command::new("cp").args(["-a", s(run), s(to)]).output().unwrap();
    common::assert_success(&o, "cp -a");
    to.to_path_buf()
}

/// The steps that logged `loss/total` in a run's metrics, in order.
fn logged_steps(run: &Path) -> Vec<u64> {
    let records = vtp::train::metrics::read_jsonl(&run.join("metrics.jsonl")).unwrap();
    records.iter().filter(|r| r.contains_key("loss/total")).filter_map(|r| r["step"].as_u64()).collect()
}

/// A way to damage a checkpoint folder: its name, the problem `--resume` reports, the damage.
type Fault = (&'static str, &'static str, fn(&Path));

#[test]
fn resume_continues_from_the_newest_intact_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let stopped = stopped_run(tmp.path(), "stopped");
    // The intact run resumes at step 4; the final model of every resume below must equal its.
    let intact = copy_run(&stopped, &tmp.path().join("intact"));
    common::assert_success(&pretrain(&intact, &["--resume"]), "resume of the intact run");
    let expected = vtp::io::read_safetensors(&intact.join("model/model.safetensors")).unwrap();
    let newest = |run: &Path| run.join("checkpoints/step-00000004");
    let faults: [Fault; 3] = [
        ("truncated", "not a valid safetensors file", |dir| truncate(&dir.join(TENSORS_FILE))),
        ("bit-flipped", "checksum mismatch in tensor", |dir| flip_in_data(&dir.join(TENSORS_FILE))),
        ("missing-file", "cannot read", |dir| std::fs::remove_file(dir.join(TENSORS_FILE)).unwrap()),
    ];
    for (name, problem, corrupt) in faults {
        let run = copy_run(&stopped, &tmp.path().join(name));
        corrupt(&newest(&run));
        let o = pretrain(&run, &["--resume"]);
        common::assert_success(&o, &format!("resume past a {name} checkpoint"));
        let err = common::stderr(&o);
        let warnings: Vec<&str> = err.lines().filter(|l| l.starts_with("warning: checkpoint")).collect();
        assert_eq!(warnings.len(), 1, "{name}: one line: {err}");
        let line = warnings[0];
        let named = line.contains(&newest(&run).display().to_string()) && line.contains(problem);
        assert!(named && line.ends_with("; resuming from step 2"), "{name}: {line}");
        assert_eq!(logged_steps(&run), (1..=6).collect::<Vec<_>>(), "{name}: steps 3 and 4 re-run once");
        let model = vtp::io::read_safetensors(&run.join("model/model.safetensors")).unwrap();
        assert_eq!(model.len(), expected.len());
        for ((n, a), (_, b)) in model.iter().zip(&expected) {
            assert!(a.equal(b), "{name}: {n} differs from the run resumed at step 4");
        }
        assert_eq!(checkpoint_names(&run), ["step-00000002", "step-00000004", "step-00000006"], "{name}");
    }
}

#[test]
fn resume_with_no_intact_checkpoint_is_a_one_line_error_that_deletes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let run = stopped_run(tmp.path(), "run");
    truncate(&run.join("checkpoints/step-00000004").join(TENSORS_FILE));
    std::fs::remove_file(run.join("checkpoints/step-00000002").join(STATE_FILE)).unwrap();
    // Every file of the run with its MD5 sum, sorted.
    let files = |run: &Path| {
        let o = std::process::Command::new("find").args([s(run), "-type", "f", "-exec", "md5sum", "{}", "+"]).output();
        let mut lines: Vec<String> = String::from_utf8_lossy(&o.unwrap().stdout).lines().map(String::from).collect();
        lines.sort();
        lines
    };
    let before = files(&run);
    let o = pretrain(&run, &["--resume"]);
    common::assert_run_error(&o, &["--resume: no intact checkpoint", "step-00000002", "step-00000004"]);
    assert_eq!(files(&run), before, "nothing is written or deleted");
}
