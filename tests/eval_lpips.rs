//! LPIPS-VGG parity with the PyPI `lpips` package (v0.1 heads, seeded random VGG16 backbone): the reference is
//! computed by `tests/scripts/lpips_reference.py` in the project venv, which must have torch, torchvision,
//! lpips and safetensors (a missing venv or package fails the test; it is never skipped).
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use tch::{Device, Kind, Tensor};
use vtp::eval::lpips::{
    convert_to_safetensors, find_weights_in, read_state_dict, resolve_weight_paths, Lpips, BACKBONE_FILE,
    CONVERTED_FILE, HEADS_FILE,
};
use vtp::io::read_safetensors_map;

const PAIRS: usize = 8;
const MAX_ABS: f64 = 1e-4;

struct Reference {
    _dir: tempfile::TempDir,
    dir: PathBuf,
    tensors: HashMap<String, Tensor>,
}

// The tensors are only read (shallow clones) from the tests' threads.
unsafe impl Sync for Reference {}
unsafe impl Send for Reference {}

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn heads_pth() -> PathBuf {
    let path = root().join(".venv/lib/python3.11/site-packages/lpips/weights/v0.1/vgg.pth");
    assert!(path.is_file(), "'{}' is missing: install the `lpips` package into .venv", path.display());
    path
}

/// Runs the reference script once per test binary.
fn reference() -> &'static Reference {
    static REF: OnceLock<Reference> = OnceLock::new();
    REF.get_or_init(|| {
        let python = root().join(".venv/bin/python");
        assert!(python.exists(), "the project venv '{}' is missing: run scripts/setup.sh", python.display());
        let probe = Command::new(&python)
            .args(["-c", "import torch, torchvision, lpips, safetensors"])
            .output()
            .expect("cannot run the venv's python");
        assert!(
            probe.status.success(),
            "the venv lacks a package the LPIPS reference needs (pip install torchvision lpips safetensors): {}",
            String::from_utf8_lossy(&probe.stderr).trim()
        );
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        let out = Command::new(&python)
            .arg(root().join("tests/scripts/lpips_reference.py"))
            .arg(&dir)
            .output()
            .expect("cannot run lpips_reference.py");
        assert!(
            out.status.success(),
            "lpips_reference.py failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let tensors = read_safetensors_map(&dir.join("lpips-reference.safetensors")).unwrap();
        Reference { _dir: tmp, dir, tensors }
    })
}

fn get(name: &str) -> Tensor {
    reference().tensors.get(name).unwrap_or_else(|| panic!("reference lacks '{name}'")).shallow_clone()
}

fn model() -> &'static Lpips {
    struct Shared(Lpips);
    unsafe impl Sync for Shared {}
    unsafe impl Send for Shared {}
    static MODEL: OnceLock<Shared> = OnceLock::new();
    &MODEL
        .get_or_init(|| {
            let backbone = reference().dir.join("vgg16-seeded-legacy.pth");
            Shared(Lpips::load(&backbone, &heads_pth(), Device::Cpu).unwrap())
        })
        .0
}

fn max_abs(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

#[test]
fn matches_pypi_lpips_on_eight_pairs() {
    let lpips = model();
    let mut worst = 0f64;
    for i in 0..PAIRS {
        let (a, b) = (get(&format!("in0.{i}")), get(&format!("in1.{i}")));
        let want = get(&format!("out.{i}"));
        let got = lpips.distance(&a, &b).unwrap();
        assert_eq!(got.size(), [1]);
        let err = max_abs(&got, &want);
        println!(
            "pair {i} {:?}: ours {:.8} lpips {:.8} abs err {err:.3e}",
            &a.size()[2..],
            got.double_value(&[0]),
            want.double_value(&[0])
        );
        worst = worst.max(err);
    }
    println!("max abs error over {PAIRS} pairs: {worst:.3e}");
    assert!(worst <= MAX_ABS, "LPIPS error {worst:e} > {MAX_ABS:e}");
}

#[test]
fn legacy_and_zip_pth_and_safetensors_read_the_same() {
    let r = reference();
    let legacy: HashMap<String, Tensor> =
        read_state_dict(&r.dir.join("vgg16-seeded-legacy.pth")).unwrap().into_iter().collect();
    let zip: HashMap<String, Tensor> = read_state_dict(&r.dir.join("vgg16-seeded.pth")).unwrap().into_iter().collect();
    assert_eq!(legacy.len(), 26);
    assert_eq!(zip.len(), 26);
    for (k, v) in &zip {
        assert!(v.equal(&legacy[k]), "'{k}' differs between the zip and legacy files");
        assert_eq!(v.kind(), Kind::Float);
    }
    // The package's heads (legacy format) read exactly as torch.load reads them.
    let heads: HashMap<String, Tensor> = read_state_dict(&heads_pth()).unwrap().into_iter().collect();
    assert_eq!(heads.len(), 5);
    for k in 0..5 {
        assert!(heads[&format!("lin{k}.model.1.weight")].equal(&get(&format!("heads.{k}"))), "head {k} differs");
    }
    // Other dtypes, views sharing a storage (transposed, offset) and skipped storages, in both formats.
    for file in ["mixed-legacy.pth", "mixed-zip.pth"] {
        let mixed = read_state_dict(&r.dir.join(file)).unwrap();
        assert_eq!(mixed.len(), 30, "{file}");
        for (k, v) in &mixed {
            let want = get(&format!("mixed.{k}"));
            assert_eq!(v.kind(), want.kind(), "{file}: {k}");
            assert!(v.equal(&want), "{file}: '{k}' differs");
        }
        let only_backbone = Lpips::load(&r.dir.join(file), &heads_pth(), Device::Cpu).unwrap();
        let (a, b) = (get("in0.3"), get("in1.3"));
        assert!(only_backbone.distance(&a, &b).unwrap().equal(&model().distance(&a, &b).unwrap()), "{file}");
    }
    // `torch.save(lpips_model.state_dict())` (zip, OrderedDict with `_metadata`, `net.sliceK.N.*` and `lin*`
    // keys; libtorch's loader rejects it) holds both parts: same model.
    let full = r.dir.join("lpips-model-state.pth");
    let whole = Lpips::load(&full, &full, Device::Cpu).unwrap();
    let (a, b) = (get("in0.7"), get("in1.7"));
    assert!(whole.distance(&a, &b).unwrap().equal(&model().distance(&a, &b).unwrap()));
    // The converted safetensors file gives a model with identical outputs.
    let out = r.dir.join("converted").join(CONVERTED_FILE);
    convert_to_safetensors(&r.dir.join("vgg16-seeded.pth"), &heads_pth(), &out).unwrap();
    let converted = Lpips::load(&out, &out, Device::Cpu).unwrap();
    let (a, b) = (get("in0.1"), get("in1.1"));
    assert!(converted.distance(&a, &b).unwrap().equal(&model().distance(&a, &b).unwrap()));
}

/// Batch-1 vs batch-8 tolerance: the pairs are computed independently, but libtorch's CPU convolution (oneDNN)
/// picks batch-size dependent kernels, so features differ in the last bits (PyTorch's `lpips` alike).
const BATCH_TOL: f64 = 1e-7;

#[test]
fn batched_matches_pypi_lpips_batched() {
    // The six 64×64 pairs in one batch, against the package run on the same batch: same kernels, same bits.
    let lpips = model();
    let a = Tensor::cat(&(0..6).map(|i| get(&format!("in0.{i}"))).collect::<Vec<_>>(), 0);
    let b = Tensor::cat(&(0..6).map(|i| get(&format!("in1.{i}"))).collect::<Vec<_>>(), 0);
    let got = lpips.distance(&a, &b).unwrap();
    let err = max_abs(&got, &get("out.batch6"));
    println!("batch of 6: max abs error vs lpips {err:.3e}");
    assert!(err <= MAX_ABS, "batched LPIPS error {err:e}");
}

#[test]
fn batch_size_independent_and_zero_on_identical_inputs() {
    let lpips = model();
    let a = Tensor::cat(&(0..6).map(|i| get(&format!("in0.{i}"))).collect::<Vec<_>>(), 0);
    let b = Tensor::cat(&(0..6).map(|i| get(&format!("in1.{i}"))).collect::<Vec<_>>(), 0);
    // 8 pairs of 64×64: the six reference pairs plus the first two swapped.
    let a8 = Tensor::cat(&[&a, &b.narrow(0, 0, 2)], 0);
    let b8 = Tensor::cat(&[&b, &a.narrow(0, 0, 2)], 0);
    let batched = lpips.distance(&a8, &b8).unwrap();
    assert_eq!(batched.size(), [8]);
    let single = Tensor::cat(
        &(0..8).map(|i| lpips.distance(&a8.narrow(0, i, 1), &b8.narrow(0, i, 1)).unwrap()).collect::<Vec<_>>(),
        0,
    );
    let diff = max_abs(&batched, &single);
    let rel = diff / single.abs().max().double_value(&[]);
    println!("batch 8 vs batch 1: max abs difference {diff:.3e} (relative {rel:.3e})");
    assert!(diff <= BATCH_TOL, "batch-size dependent LPIPS: {diff:e}");
    // Batch 1 is exactly the package's per-pair value.
    for i in 0..6 {
        assert!(single.narrow(0, i, 1).equal(&get(&format!("out.{i}"))), "pair {i}");
    }
    // LPIPS(x, y) == LPIPS(y, x), and LPIPS(x, x) == 0 exactly, whatever the batch.
    let swapped = max_abs(&batched.narrow(0, 6, 2), &batched.narrow(0, 0, 2));
    assert!(swapped <= BATCH_TOL, "asymmetric: {swapped:e}");
    assert!(single.narrow(0, 6, 2).equal(&single.narrow(0, 0, 2)), "asymmetric at batch 1");
    let same = lpips.distance(&a8, &a8).unwrap();
    assert_eq!(same.abs().max().double_value(&[]), 0.0, "LPIPS(x, x) = {same:?}");
}

#[test]
fn differentiable_with_respect_to_the_input() {
    let lpips = model();
    let a = get("in0.6").set_requires_grad(true);
    let b = get("in1.6");
    let loss = lpips.forward(&a, &b).unwrap().sum(Kind::Float);
    assert!(loss.requires_grad());
    let grad = Tensor::run_backward(&[&loss], &[&a], false, false).pop().unwrap();
    assert_eq!(grad.size(), a.size());
    let finite = bool::try_from(grad.isfinite().all()).unwrap();
    let norm = grad.norm().double_value(&[]);
    println!("|d lpips / d in0| = {norm:.6e}");
    assert!(finite && norm > 0.0, "gradient not finite or zero: norm {norm}");
    // Evaluation mode builds no graph.
    assert!(!lpips.distance(&a, &b).unwrap().requires_grad());
}

#[test]
fn weight_discovery_and_errors_name_files() {
    let r = reference();
    // Explicit paths win; a missing explicit path is an error naming it and saying how to get the weights.
    let missing = r.dir.join("nope.pth");
    let err = resolve_weight_paths(Some(&missing), Some(&heads_pth())).unwrap_err().to_string();
    assert!(err.contains("nope.pth") && err.contains(BACKBONE_FILE) && err.contains("lpips"), "{err}");
    assert!(!err.contains('\n'), "multi-line error: {err}");
    let found = resolve_weight_paths(Some(&r.dir.join("vgg16-seeded.pth")), Some(&heads_pth())).unwrap();
    assert_eq!(found.heads, heads_pth());
    // Swapped files: one-line errors naming the file and the key.
    let err = Lpips::load(&heads_pth(), &heads_pth(), Device::Cpu).unwrap_err().to_string();
    assert!(err.contains("vgg.pth") && err.contains("features.0.weight"), "{err}");
    let err = Lpips::load(&r.dir.join("vgg16-seeded.pth"), &r.dir.join("vgg16-seeded.pth"), Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(err.contains("vgg16-seeded.pth") && err.contains("lin0.model.1.weight"), "{err}");
    // A mis-shaped key.
    let bad = r.dir.join("bad-heads.safetensors");
    let mut heads = read_state_dict(&heads_pth()).unwrap();
    heads[0].1 = Tensor::zeros([1, 3, 1, 1], (Kind::Float, Device::Cpu));
    vtp::io::write_safetensors(&bad, &heads, &[]).unwrap();
    let err = Lpips::load(&r.dir.join("vgg16-seeded.pth"), &bad, Device::Cpu).unwrap_err().to_string();
    assert!(err.contains("bad-heads.safetensors") && err.contains("shape"), "{err}");
    // Not a state dict at all.
    let junk = r.dir.join("junk.pth");
    std::fs::write(&junk, b"hello world, not a checkpoint").unwrap();
    let err = read_state_dict(&junk).unwrap_err().to_string();
    assert!(err.contains("junk.pth") && !err.contains('\n'), "{err}");
    // Discovery in weight folders: nothing there is a one-line error saying how to obtain the files; the two
    // `.pth` files are found in any of the folders; a converted file takes precedence.
    let (d1, d2) = (r.dir.join("w1"), r.dir.join("w2"));
    std::fs::create_dir_all(&d1).unwrap();
    std::fs::create_dir_all(&d2).unwrap();
    let err = find_weights_in(&[d1.clone(), d2.clone()]).unwrap_err().to_string();
    println!("not found: {err}");
    assert!(
        err.contains(BACKBONE_FILE) && err.contains(HEADS_FILE) && err.contains("w1") && err.contains("w2"),
        "{err}"
    );
    assert!(err.contains("download.pytorch.org") && err.contains("lpips/weights/v0.1/vgg.pth"), "{err}");
    assert!(!err.contains('\n'), "multi-line error: {err}");
    std::fs::copy(heads_pth(), d1.join(HEADS_FILE)).unwrap();
    let err = find_weights_in(&[d1.clone(), d2.clone()]).unwrap_err().to_string();
    assert!(err.contains(BACKBONE_FILE) && !err.contains(&format!("no {HEADS_FILE}")), "{err}");
    std::fs::copy(r.dir.join("vgg16-seeded-legacy.pth"), d2.join(BACKBONE_FILE)).unwrap();
    let found = find_weights_in(&[d1.clone(), d2.clone()]).unwrap();
    assert_eq!((found.backbone, found.heads), (d2.join(BACKBONE_FILE), d1.join(HEADS_FILE)));
    convert_to_safetensors(&d2.join(BACKBONE_FILE), &d1.join(HEADS_FILE), &d2.join(CONVERTED_FILE)).unwrap();
    let found = find_weights_in(&[d1, d2.clone()]).unwrap();
    assert_eq!((found.backbone, found.heads), (d2.join(CONVERTED_FILE), d2.join(CONVERTED_FILE)));
}
