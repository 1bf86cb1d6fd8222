//! `vtp claim --quick` (the CI-sized form of the README's generation experiment): every stage runs —
//! reference set, `ae` and `all` tokenizers at two budgets, their evaluation, latent caches, one DiT
//! each scored at two points — and the table, JSON and plots are written, with finite numbers where
//! the protocol defines them (no zero-shot for `ae`).
mod common;

use std::process::Command;

#[test]
fn claim_quick_runs_every_stage_and_reports() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("claim");
    let claim = || {
        Command::new(env!("CARGO_BIN_EXE_vtp"))
            .args(["--threads", "2", "claim", "--quick", "--out"])
            .arg(&out)
            .arg("--inception")
            .arg(common::fid_helper_weights())
            .output()
            .unwrap()
    };
    let result = claim();
    common::assert_success(&result, "vtp claim --quick");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("claim.json")).unwrap()).unwrap();
    let rows = json["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 4, "ae and all at two budgets each");
    for row in rows {
        let is_ae = row["objectives"] == "ae";
        assert_eq!(row["zero_shot_top1"].is_null(), is_ae, "zero-shot only for CLIP tokenizers: {row}");
        for key in ["linear_probe_top1", "psnr", "rfid"] {
            assert!(row[key].as_f64().is_some_and(f64::is_finite), "{key} missing or not finite: {row}");
        }
        let dit = row["dit"].as_array().unwrap();
        assert_eq!(dit.len(), 2, "two scored DiT points");
        for point in dit {
            let (fid, acc) = (point[1].as_f64().unwrap(), point[2].as_f64().unwrap());
            assert!(fid.is_finite() && fid > 0.0, "FID {fid}");
            assert!((0.0..=100.0).contains(&acc), "class accuracy {acc}");
        }
    }
    let md = std::fs::read_to_string(out.join("claim.md")).unwrap();
    assert_eq!(md.lines().filter(|l| l.starts_with("| ae ") || l.starts_with("| all ")).count(), 4, "{md}");
    for png in ["claim-fid.png", "claim-accuracy.png"] {
        assert!(std::fs::metadata(out.join(png)).unwrap().len() > 1000, "{png} is empty");
    }
    // A second invocation finds every stage done and only re-renders the report.
    let again = claim();
    common::assert_success(&again, "vtp claim --quick (again)");
    let log = String::from_utf8_lossy(&again.stderr);
    assert!(!log.contains(" …"), "a finished stage ran again:\n{log}");
}
