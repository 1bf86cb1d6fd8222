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
