//! Parity with the official implementation: every output tensor of the three fixture models'
//! `io.safetensors` within relative L2 error 1e-4 (issue: core model acceptance), worst error printed.
mod common;
use tch::Device;
use vtp::check::check_reference;
use vtp::io::read_safetensors_map;
use vtp::model::VtpModel;

const MAX_REL: f64 = 1e-4;

fn check_fixture(name: &str, expected_outputs: usize) {
    tch::set_num_threads(2);
    let dir = common::fixture(name);
    let model = VtpModel::load(&dir, Device::Cpu).expect("fixture model loads");
    let io = read_safetensors_map(&dir.join("io.safetensors")).expect("fixture io loads");
    let results = check_reference(&model, &io).expect("every reference key is understood");
    assert_eq!(results.len(), expected_outputs, "{name}: every out.* tensor is checked");
    let mut failures = Vec::new();
    for r in &results {
        println!("{name} {:<100} rel_l2 {:.3e}  max_abs {:.3e}", r.key, r.rel_l2, r.max_abs);
        if r.rel_l2.is_nan() || r.rel_l2 > MAX_REL {
            failures.push(format!("{} {:.3e}", r.key, r.rel_l2));
        }
    }
    let worst = results.iter().map(|r| r.rel_l2).fold(0.0, f64::max);
    println!("{name}: worst relative L2 error {worst:.3e} over {} outputs", results.len());
    assert!(failures.is_empty(), "{name}: outputs above {MAX_REL}: {failures:?}");
}

#[test]
fn vtp_tiny_matches_reference() {
    check_fixture("vtp-tiny", 40);
}

#[test]
fn vtp_tiny_variant_matches_reference() {
    check_fixture("vtp-tiny-variant", 41);
}

#[test]
fn vtp_tiny_aeonly_matches_reference() {
    check_fixture("vtp-tiny-aeonly", 29);
}
