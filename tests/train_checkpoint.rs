//! Checkpoint files (`vtp::train::checkpoint`): save / latest / load round trip with values and dtypes
//! kept, `keep_last` pruning, temporary folders of interrupted saves ignored, one-line errors naming a
//! corrupt file or the missing / mis-shaped tensors of a restore.
use std::collections::HashMap;
use std::path::Path;
use tch::{Device, Kind, Tensor};
use vtp::train::checkpoint::{latest, load, restore_into, save, STATE_FILE, TENSORS_FILE};

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
