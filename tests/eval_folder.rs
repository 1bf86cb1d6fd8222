//! `--classes folder`: zero-shot classification and linear probing on any labelled class folders
//! (ImageNet layout, `DIR/<class>/<image>`), the classes being the sorted sub-folder names; on a tiny
//! random model and a few PNGs written here.
mod common;
use std::path::Path;

use common::{assert_one_line_error, assert_success, s, vtp};
use tch::{Device, Kind};
use vtp::config::VtpConfig;
use vtp::data::source;
use vtp::data::stream::StreamOptions;
use vtp::eval::classnames::{self, folder_prompt_name, FOLDER_CLASS_SET};
use vtp::eval::zero_shot::ZeroShotClassifier;
use vtp::model::VtpModel;

/// The class folders, created in this (not alphabetical) order; sorted: apple_pie, mango, zebra.
const CLASSES: [&str; 3] = ["zebra", "apple_pie", "mango"];

/// Their prompt names in label order.
const SORTED_NAMES: [&str; 3] = ["apple pie", "mango", "zebra"];

/// A 16×16 PNG at `path` whose colours depend on `seed`.
fn write_png(path: &Path, seed: u32) {
    let img = image::RgbImage::from_fn(16, 16, |x, y| {
        image::Rgb([(seed * 70 + x * 9) as u8, (seed * 31 + y * 13) as u8, ((x + y) * 5 + seed * 3) as u8])
    });
    img.save(path).unwrap();
}

/// `per_class` PNGs in `dir/<class>/` for every class of [`CLASSES`] (image seeds offset by `shift`).
fn write_class_folders(dir: &Path, classes: &[&str], per_class: u32, shift: u32) {
    for (c, class) in classes.iter().enumerate() {
        let class_dir = dir.join(class);
        std::fs::create_dir_all(&class_dir).unwrap();
        for i in 0..per_class {
            write_png(&class_dir.join(format!("{i}.png")), c as u32 * 10 + i + shift);
        }
    }
}

/// A tiny CLIP model with the full CLIP vocabulary (real prompts tokenise into it).
fn tiny_model() -> VtpModel {
    let config: VtpConfig = serde_json::from_str(
        r#"{"vision_embed_dim": 32, "vision_depth": 1, "vision_num_heads": 2, "train_reconstruction": false,
            "text_embed_dim": 24, "text_depth": 1, "text_num_heads": 2}"#,
    )
    .unwrap();
    tch::manual_seed(3);
    VtpModel::new(config, Device::Cpu).unwrap()
}

#[test]
fn folder_classes_are_the_sorted_sub_folders_and_label_the_samples() {
    let _generator = common::torch_generator();
    let tmp = tempfile::tempdir().unwrap();
    write_class_folders(tmp.path(), &CLASSES, 3, 0);
    let spec = s(tmp.path());

    let set = classnames::resolve_for_data(" Folder ", spec).unwrap();
    assert_eq!((set.name.as_str(), set.label_key.as_str()), (FOLDER_CLASS_SET, "cls"));
    assert_eq!(set.class_names, SORTED_NAMES);
    assert_eq!(set.templates, classnames::openai_imagenet_templates());
    let prompts = classnames::prompts(&set.templates, &set.class_names[0]);
    assert_eq!(prompts.len(), 80);
    assert!(prompts.iter().all(|p| p.contains("apple pie") && !p.contains('_')), "{prompts:?}");
    assert!(prompts.contains(&"a photo of a apple pie.".to_string()));

    // Every sample's `cls` label indexes its own folder's name.
    let mut per_label = [0; 3];
    for sample in source::open(spec, &StreamOptions::default()).unwrap() {
        let sample = sample.unwrap();
        let label = sample.labels["cls"];
        let folder = sample.key.split('/').next().unwrap();
        assert_eq!(set.class_names[label as usize], folder_prompt_name(folder), "sample {}", sample.key);
        per_label[label as usize] += 1;
    }
    assert_eq!(per_label, [3, 3, 3]);

    // The classifier's column 0 is the text feature of "apple pie" prompts, not of "apple_pie" ones.
    let model = tiny_model();
    let column = |names: &[&str]| {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let w = ZeroShotClassifier::build(&model, &names, &set.templates, 10).unwrap().weights;
        w.select(1, 0).to_kind(Kind::Double)
    };
    let classifier = ZeroShotClassifier::build(&model, &set.class_names, &set.templates, 2).unwrap();
    let first = classifier.weights.select(1, 0).to_kind(Kind::Double);
    assert!((&first - column(&["apple pie"])).abs().max().double_value(&[]) < 1e-5);
    assert!((&first - column(&["apple_pie"])).abs().max().double_value(&[]) > 1e-3);
}

#[test]
fn eval_runs_zero_shot_and_the_linear_probe_on_class_folders() {
    let _generator = common::torch_generator();
    let tmp = tempfile::tempdir().unwrap();
    let model = common::init_tiny_model(tmp.path(), 1);
    let (val, train) = (tmp.path().join("val"), tmp.path().join("train"));
    write_class_folders(&val, &CLASSES, 2, 0);
    write_class_folders(&train, &CLASSES, 3, 5);
    let report = tmp.path().join("report.json");
    let o = vtp(&[
        "eval",
        "--model",
        s(&model),
        "--data",
        s(&val),
        "--train-data",
        s(&train),
        "--classes",
        "folder",
        "--tasks",
        "zero-shot,linear-probe",
        "--protocols",
        "last-cls",
        "--epochs",
        "2",
        "--size",
        "32",
        "--probe-crop",
        "32",
        "--batch",
        "4",
        "--cache",
        s(&tmp.path().join("cache")),
        "--out",
        s(&report),
    ]);
    assert_success(&o, "vtp eval --classes folder");
    let r: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    assert_eq!(r["classes"], serde_json::json!({"name": "folder", "n_classes": 3}));
    let z = &r["zero_shot"];
    assert_eq!(
        (z["n_classes"].as_u64(), z["n_templates"].as_u64(), z["n_images"].as_u64()),
        (Some(3), Some(80), Some(6))
    );
    assert!(z["protocol"].as_str().unwrap().ends_with("(folder)"), "{z}");
    let probes = r["linear_probe"].as_array().unwrap();
    assert_eq!(probes.len(), 1);
    let p = &probes[0];
    assert_eq!((p["n_classes"].as_u64(), p["n_train"].as_u64(), p["n_val"].as_u64()), (Some(3), Some(9), Some(6)));
}

/// [`assert_one_line_error`] (exit code 1, one `error:` line holding every needle), and no panic.
fn assert_error(o: &std::process::Output, needles: &[&str]) {
    assert_one_line_error(o, needles);
    let err = common::stderr(o);
    assert!(!err.contains("panicked") && !err.contains("internal error") && !err.contains("backtrace"), "{err}");
}

#[test]
fn data_without_folder_labels_is_a_one_line_error() {
    let _generator = common::torch_generator();
    let tmp = tempfile::tempdir().unwrap();
    let model = common::init_tiny_model(tmp.path(), 1);
    let eval = |data: &str, tasks: &str, extra: &[&str]| {
        let args = ["eval", "--model", s(&model), "--data", data, "--classes", "folder", "--tasks", tasks];
        vtp(&[&args[..], extra].concat())
    };
    let empty = tmp.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    assert_error(&eval(s(&empty), "zero-shot", &[]), &["class set 'folder'", s(&empty), "is empty"]);

    let flat = tmp.path().join("flat");
    std::fs::create_dir(&flat).unwrap();
    (0..3).for_each(|i| write_png(&flat.join(format!("{i}.png")), i));
    let o = eval(s(&flat), "zero-shot", &[]);
    assert_error(&o, &[s(&flat), "3 images but no class sub-folders", "carry no labels"]);

    let synthetic = "synthetic:heldout?n=4&res=32";
    assert_error(&eval(synthetic, "zero-shot", &[]), &[synthetic, "the synthetic scenes", "not class folders"]);

    // The linear probe's training data must be class folders with the same classes.
    let val = tmp.path().join("val");
    write_class_folders(&val, &CLASSES, 1, 0);
    let o = eval(s(&val), "linear-probe", &[]);
    assert_error(&o, &["synthetic:train", "the synthetic scenes", "not class folders"]);
    let other = tmp.path().join("other");
    write_class_folders(&other, &["apple_pie", "mango"], 1, 0);
    let o = eval(s(&val), "linear-probe", &["--train-data", s(&other)]);
    assert_error(&o, &["the 2 classes of --train-data", s(&other), "not the 3 classes of --data"]);
}

#[test]
fn help_explains_the_folder_class_set() {
    let _generator = common::torch_generator();
    let o = vtp(&["eval", "--help"]);
    assert_success(&o, "vtp eval --help");
    let help = String::from_utf8_lossy(&o.stdout).split_whitespace().collect::<Vec<_>>().join(" ");
    for needle in ["or folder: the class sub-folders", "sorted name order", "'_' read as a space"] {
        assert!(help.contains(needle), "--help should say {needle:?}: {help}");
    }
}
