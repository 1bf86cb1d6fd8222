//! The evaluation report `vtp eval` writes as JSON and experiments read back: every number names
//! its protocol, data set, image count and the model's fingerprint.
use super::linear_probe::LinearProbeResult;
use super::recon::ReconResult;
use super::zero_shot::ZeroShotResult;
use anyhow::Result;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// One evaluation of a tokenizer: zero-shot classification (§5.1), linear probes (§5.2) and
/// reconstruction metrics (§5.3), each present when it ran.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EvalReport {
    /// The model as given (path or hub name).
    pub model: String,
    /// [`model_fingerprint`](crate::model::fingerprint::model_fingerprint) of its config and weights.
    pub model_fingerprint: String,
    /// The evaluation data (source SPEC).
    pub data: String,
    /// The class set of zero-shot classification and linear probing.
    pub classes: Option<ClassesSummary>,
    /// Zero-shot top-1 / top-5, when it ran.
    pub zero_shot: Option<ZeroShotResult>,
    /// One result per feature protocol that ran.
    pub linear_probe: Vec<LinearProbeResult>,
    /// The linear probes' training data (source SPEC), when they ran.
    pub linear_probe_train_data: Option<String>,
    /// PSNR, SSIM, LPIPS and rFID, when it ran.
    pub reconstruction: Option<ReconResult>,
    /// `<task or metric>: <reason>` for each part that could not run.
    pub skipped: Vec<String>,
}

/// The class set of a report: its name and size.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClassesSummary {
    /// The class set's name (e.g. `synthetic-shape`).
    pub name: String,
    /// Its number of classes.
    pub n_classes: usize,
}

impl EvalReport {
    /// An empty report of `model` (fingerprint `model_fingerprint`) on `data`.
    pub fn new(model: String, model_fingerprint: String, data: String, classes: Option<ClassesSummary>) -> Self {
        EvalReport {
            model,
            model_fingerprint,
            data,
            classes,
            zero_shot: None,
            linear_probe: Vec::new(),
            linear_probe_train_data: None,
            reconstruction: None,
            skipped: Vec::new(),
        }
    }

    /// Writes the report as pretty JSON (atomically).
    pub fn write(&self, path: &Path) -> Result<()> {
        crate::io::write_atomic(path, (serde_json::to_string_pretty(self)? + "\n").as_bytes())
    }

    /// Reads a report [`Self::write`] wrote.
    pub fn read(path: &Path) -> Result<Self> {
        crate::io::read_json(path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The report keeps the keys existing `report.json` / `eval.json` files have, and reads back as written.
    #[test]
    fn report_keeps_its_keys_and_reads_back() {
        let classes = Some(ClassesSummary { name: "synthetic-shape".into(), n_classes: 4 });
        let mut report =
            EvalReport::new("random".into(), "0123456789abcdef".into(), "synthetic:heldout".into(), classes);
        report.reconstruction = Some(ReconResult { psnr: 20.5, rfid: Some(3.0), ..ReconResult::default() });
        report.skipped.push("LPIPS: no weights".into());
        let json = serde_json::to_value(&report).unwrap();
        let keys: Vec<&str> = json.as_object().unwrap().keys().map(String::as_str).collect();
        let expected = [
            "model",
            "model_fingerprint",
            "data",
            "classes",
            "zero_shot",
            "linear_probe",
            "linear_probe_train_data",
            "reconstruction",
            "skipped",
        ];
        assert_eq!(keys, expected);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("eval.json");
        report.write(&path).unwrap();
        assert_eq!(EvalReport::read(&path).unwrap(), report);
    }

    /// The example report in `docs/eval/` (written before reports named their class set) still reads.
    #[test]
    fn the_committed_example_report_reads() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/eval/random-small-synthetic-heldout.json");
        let report = EvalReport::read(&path).unwrap();
        assert_eq!(report.model_fingerprint, "73fa29884d40d3b8");
        assert!(report.classes.is_none() && report.zero_shot.is_some() && !report.linear_probe.is_empty());
    }
}
