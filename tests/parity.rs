//! Parity with the official implementation on every output tensor of the three fixture models'
//! `io.safetensors`, three ways (issue 17), because float32 results depend on the CPU's kernels:
//! 1. **AVX2-pinned** (`vtp --kernels avx2 check`, a subprocess, since libtorch reads the pinning
//!    variables when it starts): what the fixtures' AVX2 CPU computed, on any x86-64 CPU. Bound 1e-6;
//!    0 (bit-identical) is what is reached.
//! 2. **This machine's kernels**, in-process against the same fixtures. Bound 1e-3: on AVX-512, oneDNN
//!    and ATen round matmuls differently (~1e-7) and the official bf16 RoPE rotation amplifies that to
//!    1.35e-4 in `vtp-tiny`'s decoded 48×80 image (PyTorch itself shows the same figure there); 1e-3
//!    covers that cross-CPU spread with margin and still catches any real bug (a wrong op is ≫ 1e-2).
//! 3. **Same machine, PyTorch**: `../shared/bench/pytorch_vtp.py` (through `tests/pytorch_dump.py`) and
//!    `vtp check` on the same inputs, same kernels, same thread count: latents, decoded images, CLIP
//!    image and text features within 1e-6 — the code path users run equals PyTorch on this CPU.
mod common;
use common::s;
use std::path::Path;
use std::process::{Command, Output};
use tch::Device;
use vtp::check::check_reference;
use vtp::io::read_safetensors_map;
use vtp::model::VtpModel;

/// The fixture models and how many `out.*` tensors each reference holds.
const FIXTURES: [(&str, usize); 3] = [("vtp-tiny", 40), ("vtp-tiny-variant", 41), ("vtp-tiny-aeonly", 29)];

/// Bound of the pinned and same-machine comparisons (issue 17; 0 is reached).
const EXACT: f64 = 1e-6;

/// Bound under this machine's default kernels: the cross-CPU spread (module doc, item 2).
const NATIVE_CROSS_CPU: f64 = 1e-3;

/// `vtp [--kernels K] --threads 2 check` of `model` against `reference` at `EXACT`; asserts success
/// and that every line is printed; returns stdout.
fn vtp_check(kernels: &str, model: &Path, reference: &Path, outputs: usize) -> String {
    let o: Output = Command::new(env!("CARGO_BIN_EXE_vtp"))
        .args(["--kernels", kernels, "--threads", "2", "check", "--model", s(model), "--reference", s(reference)])
        .args(["--max-rel", &EXACT.to_string()])
        .output()
        .expect("vtp runs");
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    println!("{out}");
    assert!(o.status.success(), "{}: {}", model.display(), String::from_utf8_lossy(&o.stderr));
    assert_eq!(out.lines().filter(|l| l.contains("rel_l2")).count(), outputs, "every output is checked: {out}");
    assert!(out.contains(&format!("{outputs} outputs, worst relative L2 error")), "{out}");
    out
}

#[test]
fn every_fixture_matches_exactly_on_avx2_kernels() {
    for (name, outputs) in FIXTURES {
        let dir = common::fixture(name);
        vtp_check("avx2", &dir, &dir.join("io.safetensors"), outputs);
    }
}

#[test]
fn every_fixture_matches_within_the_cross_cpu_spread_on_this_machines_kernels() {
    tch::set_num_threads(2);
    for (name, outputs) in FIXTURES {
        let dir = common::fixture(name);
        let model = VtpModel::load(&dir, Device::Cpu).expect("fixture model loads");
        let io = read_safetensors_map(&dir.join("io.safetensors")).expect("fixture io loads");
        let results = check_reference(&model, &io).expect("every reference key is understood");
        assert_eq!(results.len(), outputs, "{name}: every out.* tensor is checked");
        for r in &results {
            println!("{name} {:<100} rel_l2 {:.3e}  max_abs {:.3e}", r.key, r.rel_l2, r.max_abs);
        }
        let failures: Vec<String> = results
            .iter()
            .filter(|r| r.rel_l2.is_nan() || r.rel_l2 > NATIVE_CROSS_CPU)
            .map(|r| format!("{} {:.3e}", r.key, r.rel_l2))
            .collect();
        let worst = results.iter().map(|r| r.rel_l2).fold(0.0, f64::max);
        println!("{name}: worst relative L2 error {worst:.3e} over {outputs} outputs (native kernels)");
        assert!(failures.is_empty(), "{name}: outputs above {NATIVE_CROSS_CPU}: {failures:?}");
    }
}

#[test]
fn every_fixture_matches_pytorch_on_this_machine() {
    let tmp = tempfile::tempdir().unwrap();
    for (name, _) in FIXTURES {
        let dir = common::fixture(name);
        let dump = tmp.path().join(format!("{name}.safetensors"));
        let o = Command::new(common::venv_python())
            .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/pytorch_dump.py"))
            .args(["--bench-dir", s(&common::shared_bench()), "--model-dir", s(&dir)])
            .args(["--inputs", s(&dir.join("io.safetensors")), "--out", s(&dump), "--threads", "2"])
            .output()
            .expect("python runs");
        assert!(o.status.success(), "pytorch_dump.py {name}: {}", String::from_utf8_lossy(&o.stderr));
        println!("{name}: {}", String::from_utf8_lossy(&o.stdout).trim());
        let outputs = read_safetensors_map(&dump).unwrap().keys().filter(|k| k.starts_with("out.")).count();
        // latents + decoded (x2 sizes) + decoded from random, and the 6 CLIP features when it has CLIP.
        assert!(outputs >= 5, "{name}: the dump holds {outputs} outputs");
        vtp_check("native", &dir, &dump, outputs);
    }
}
