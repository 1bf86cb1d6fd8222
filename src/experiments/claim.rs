//! The paper's claim at small scale, the experiment `vtp claim` runs (VTP §1, Fig. 4/5 in
//! miniature). Tokenizers are pre-trained on the synthetic scenes with `objectives = ae`
//! (reconstruction only) and `all` (CLIP + SSL + reconstruction) at several step budgets, evaluated
//! (zero-shot, linear probe, PSNR, rFID), their latents cached, and the same LightningDiT recipe
//! trained on each; every DiT is scored at several points of its training (FID against real held-out
//! images, and the class accuracy of its samples by a reference classifier). Each stage is a child
//! process of the running `vtp` executable whose output folder is kept, so an interrupted experiment
//! continues where it stopped; its typed reports are read back, and the table (`claim.md`,
//! `claim.json`) and the plots (`claim-fid.png`, `claim-accuracy.png`) are written at the end.
use crate::dit::generate::{GenerationReport, ReferenceInfo};
use crate::eval::report::EvalReport;
use crate::io::read_json;
use crate::train::plots::{plot_curves, Series};
use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

/// The sizes of one experiment.
#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    /// Tokenizer pre-training step budgets (the tokenizer-compute axis).
    pub budgets: Vec<u64>,
    /// DiT training steps, the same for every tokenizer.
    pub dit_steps: u64,
    /// DiT steps at which samples are scored.
    pub dit_points: Vec<u64>,
    /// Generated samples per score (FID N).
    pub fid_n: usize,
    /// Real held-out images of the FID reference.
    pub reference_n: usize,
    /// Real training images of the reference classifier.
    pub reference_train_n: usize,
    /// Training images encoded into each latent cache.
    pub cache_n: usize,
    /// Held-out images of the tokenizer evaluation.
    pub eval_n: usize,
    /// Linear-probe training images.
    pub probe_train_n: usize,
    /// Extra overrides of the pre-training runs.
    pub pretrain_overrides: Vec<String>,
    /// Extra overrides of the DiT runs.
    pub dit_overrides: Vec<String>,
}

impl Plan {
    /// The full experiment (≈ 1¼ hours on 2 cores: three budgets, N = 500) or its quick form (a few minutes).
    pub fn new(quick: bool) -> Self {
        if quick {
            Plan {
                budgets: vec![4, 8],
                dit_steps: 8,
                dit_points: vec![4, 8],
                fid_n: 16,
                reference_n: 24,
                reference_train_n: 32,
                cache_n: 64,
                eval_n: 24,
                probe_train_n: 32,
                pretrain_overrides: [
                    "batch.clip=16",
                    "batch.ssl=4",
                    "batch.recon=4",
                    "schedule.warmup_steps=1",
                    "schedule.freeze_last_layer_steps=1",
                    "schedule.warmup_teacher_temp_steps=1",
                ]
                .map(String::from)
                .to_vec(),
                dit_overrides: vec!["batch.size=16".into(), "model.hidden_size=32".into(), "model.depth=1".into()],
            }
        } else {
            Plan {
                budgets: vec![200, 400, 800],
                dit_steps: 2000,
                dit_points: vec![1000, 2000],
                fid_n: 500,
                reference_n: 500,
                reference_train_n: 1000,
                cache_n: 8192,
                eval_n: 500,
                probe_train_n: 1000,
                pretrain_overrides: Vec::new(),
                dit_overrides: Vec::new(),
            }
        }
    }
}

/// The objectives compared: reconstruction only, and everything.
const OBJECTIVES: [&str; 2] = ["ae", "all"];
/// Image side of the whole experiment (the tiny preset's).
const SIZE: u32 = 64;

/// The object scale of the scenes, as the tiny preset trains on them (`TINY_TRAIN_DATA`).
const ZOOM: u32 = 2;

/// One tokenizer's row of the table.
#[derive(Debug, Serialize)]
struct Row {
    objectives: String,
    tokenizer_steps: u64,
    tokenizer_seconds: f64,
    zero_shot_top1: Option<f64>,
    linear_probe_top1: Option<f64>,
    psnr: Option<f64>,
    rfid: Option<f64>,
    /// Per scored DiT step: (step, FID, sample class accuracy).
    dit: Vec<(u64, f64, Option<f64>)>,
}

/// Runs the experiment `plan` in the folder `out`, stage by stage (children of the running `vtp`
/// executable; those that score images use the FID Inception weights `inception`), reads their
/// reports back and writes the table and plots.
pub fn run(out: &Path, plan: &Plan, inception: PathBuf) -> Result<()> {
    std::fs::create_dir_all(out.join("logs")).with_context(|| format!("cannot create '{}'", out.display()))?;
    let vtp = Stage { exe: std::env::current_exe()?, logs: out.join("logs"), inception };
    let reference = out.join("reference");
    vtp.run_once("reference", &reference.join("reference.json"), |c| {
        c.args(["dit", "reference", "--size", &SIZE.to_string()])
            .args(["-n", &plan.reference_n.to_string(), "--n-train", &plan.reference_train_n.to_string()])
            .args([
                "--heldout",
                &format!("synthetic:heldout?res={SIZE}&zoom={ZOOM}"),
                "--train",
                &format!("synthetic:train?res={SIZE}&zoom={ZOOM}&seed=1"),
            ])
            .arg("--out")
            .arg(&reference);
    })?;
    let mut rows = Vec::new();
    for objectives in OBJECTIVES {
        for &steps in &plan.budgets {
            rows.push(tokenizer_and_dit(&vtp, plan, out, &reference, objectives, steps)?);
        }
    }
    write_report(out, plan, &rows, &reference)
}

/// Pre-trains, evaluates, caches and generates for one (objectives, budget) pair.
fn tokenizer_and_dit(
    vtp: &Stage,
    plan: &Plan,
    out: &Path,
    reference: &Path,
    objectives: &str,
    steps: u64,
) -> Result<Row> {
    let name = format!("{objectives}-{steps}");
    let tok = out.join(format!("tokenizer-{name}"));
    let seconds = vtp.run_once(&format!("pretrain-{name}"), &tok.join("model/config.json"), |c| {
        c.args(["pretrain", "--preset", "tiny", "--out"]).arg(&tok).args([
            format!("objectives={objectives}"),
            format!("train.steps={steps}"),
            format!("eval.every={steps}"),
            format!("eval.grid_every={steps}"),
            format!("checkpoint.every={steps}"),
            // The experiment runs its own probes (`vtp eval`) on more images.
            "eval.probe_source=".to_string(),
        ]);
        c.args(&plan.pretrain_overrides);
    })?;
    let seconds = seconds.unwrap_or_else(|| recorded_seconds(&tok));
    std::fs::write(tok.join("wall_seconds.txt"), format!("{seconds:.1}\n"))?;
    let model = tok.join("model");
    let eval = tok.join("eval.json");
    vtp.run_once(&format!("eval-{name}"), &eval, |c| {
        let tasks = if objectives == "ae" { "linear-probe,recon" } else { "zero-shot,linear-probe,recon" };
        c.args(["eval", "--model"]).arg(&model).args(["--tasks", tasks, "--classes", "synthetic-shape"]);
        c.args(["--data", &format!("synthetic:heldout?n={}&res={SIZE}&zoom={ZOOM}", plan.eval_n)]);
        c.args(["--train-data", &format!("synthetic:train?n={}&res={SIZE}&zoom={ZOOM}&seed=1", plan.probe_train_n)]);
        c.args(["--protocols", "bottleneck", "--probe-crop", &SIZE.to_string(), "--size", &SIZE.to_string()]);
        c.args(["--limit", &plan.eval_n.max(plan.probe_train_n).to_string(), "--epochs", "30"]);
        c.arg("--cache").arg(out.join("probe-cache")).arg("--out").arg(&eval);
    })?;
    let cache = out.join(format!("cache-{name}"));
    vtp.run_once(&format!("extract-{name}"), &cache.join("latent_stats.safetensors"), |c| {
        c.args(["dit", "extract", "--model"]).arg(&model).arg("--out").arg(&cache);
        c.args(["--data", &format!("synthetic:train?n={}&res={SIZE}&zoom={ZOOM}", plan.cache_n), "--labels", "shape"]);
        c.args(["--size", &SIZE.to_string()]);
    })?;
    let dit = out.join(format!("dit-{name}"));
    vtp.run_once(&format!("dit-{name}"), &dit.join("model/dit.json"), |c| {
        c.args(["dit", "train", "--cache"]).arg(&cache).arg("--out").arg(&dit);
        c.args([format!("train.steps={}", plan.dit_steps), format!("eval.grid_every={}", plan.dit_steps)]);
        c.args([format!("checkpoint.every={}", gcd_all(&plan.dit_points)), "checkpoint.keep=0".to_string()]);
        c.args(&plan.dit_overrides);
    })?;
    let mut scores = Vec::new();
    for &point in &plan.dit_points {
        let report = dit.join(format!("fid-{point:08}.json"));
        let checkpoint = dit.join(format!("checkpoints/step-{point:08}"));
        vtp.run_once(&format!("fid-{name}-{point}"), &report, |c| {
            c.args(["dit", "fid", "--dit"]).arg(&checkpoint).arg("--reference").arg(reference);
            c.args(["-n", &plan.fid_n.to_string()]).arg("--report").arg(&report);
        })?;
        let r: GenerationReport = read_json(&report)?;
        scores.push((point, r.fid, r.class_accuracy));
    }
    let e = EvalReport::read(&eval)?;
    Ok(Row {
        objectives: objectives.to_string(),
        tokenizer_steps: steps,
        tokenizer_seconds: seconds,
        zero_shot_top1: e.zero_shot.map(|z| z.top1),
        linear_probe_top1: e.linear_probe.first().map(|p| p.top1),
        psnr: e.reconstruction.as_ref().map(|r| r.psnr),
        rfid: e.reconstruction.and_then(|r| r.rfid),
        dit: scores,
    })
}

/// The wall time recorded by an earlier invocation (0 when none was).
fn recorded_seconds(tok: &Path) -> f64 {
    std::fs::read_to_string(tok.join("wall_seconds.txt")).ok().and_then(|s| s.trim().parse().ok()).unwrap_or(0.0)
}

/// Greatest common divisor of the scored steps (the checkpoint interval that lands on each).
fn gcd_all(values: &[u64]) -> u64 {
    fn gcd(a: u64, b: u64) -> u64 {
        if b == 0 {
            a
        } else {
            gcd(b, a % b)
        }
    }
    values.iter().copied().fold(0, gcd).max(1)
}

/// Runs `vtp` child processes, each logged to `logs/<name>.log`.
struct Stage {
    exe: PathBuf,
    logs: PathBuf,
    /// The FID Inception weights, passed to every stage that scores images.
    inception: PathBuf,
}

impl Stage {
    /// Runs the stage unless `done` exists; returns its wall time in seconds when it ran.
    fn run_once(&self, name: &str, done: &Path, args: impl FnOnce(&mut Command)) -> Result<Option<f64>> {
        if done.exists() {
            eprintln!("[claim] {name}: done earlier ({})", done.display());
            return Ok(None);
        }
        let log_path = self.logs.join(format!("{name}.log"));
        let log = std::fs::File::create(&log_path).with_context(|| format!("cannot write '{}'", log_path.display()))?;
        let mut c = Command::new(&self.exe);
        args(&mut c);
        let words: Vec<String> = c.get_args().take(2).map(|a| a.to_string_lossy().into_owned()).collect();
        if words[0] == "eval" || matches!(words[1].as_str(), "reference" | "fid") {
            c.arg("--inception").arg(&self.inception);
        }
        eprintln!("[claim] {name} …");
        let t0 = Instant::now();
        let status = c.stdout(log.try_clone()?).stderr(log).status().context("cannot start vtp")?;
        let seconds = t0.elapsed().as_secs_f64();
        if !status.success() {
            bail!("stage '{name}' failed ({status}); see {}", log_path.display());
        }
        eprintln!("[claim] {name}: {seconds:.0} s");
        Ok(Some(seconds))
    }
}

/// What `claim.json` holds: the plan, the reference set and one row per tokenizer.
#[derive(Serialize)]
struct ClaimReport<'a> {
    plan: &'a Plan,
    reference: &'a ReferenceInfo,
    rows: &'a [Row],
}

/// Writes `claim.json`, `claim.md` and the two plots.
fn write_report(out: &Path, plan: &Plan, rows: &[Row], reference: &Path) -> Result<()> {
    let r: ReferenceInfo = read_json(&reference.join("reference.json"))?;
    let classifier = r.classifier_real_accuracy.unwrap_or(f64::NAN);
    let json = ClaimReport { plan, reference: &r, rows };
    crate::io::write_atomic(&out.join("claim.json"), serde_json::to_string_pretty(&json)?.as_bytes())?;
    let opt =
        |v: Option<f64>, digits: usize, unit: &str| v.map_or("—".to_string(), |v| format!("{v:.digits$}{unit}"));
    let mut md = String::from(
        "| objectives | tokenizer steps | wall | zero-shot (shape) | linear probe (shape, latents) | PSNR | rFID |",
    );
    for p in &plan.dit_points {
        md.push_str(&format!(" DiT {p}: FID / class acc. |"));
    }
    md.push_str("\n|---|---|---|---|---|---|---|");
    md.push_str(&"---|".repeat(plan.dit_points.len()));
    for row in rows {
        md.push_str(&format!(
            "\n| {} | {} | {:.0} s | {} | {} | {} | {} |",
            row.objectives,
            row.tokenizer_steps,
            row.tokenizer_seconds,
            opt(row.zero_shot_top1, 1, " %"),
            opt(row.linear_probe_top1, 1, " %"),
            opt(row.psnr, 2, " dB"),
            opt(row.rfid, 1, "")
        ));
        for (_, fid, acc) in &row.dit {
            md.push_str(&format!(" {fid:.1} / {} |", opt(*acc, 1, " %")));
        }
    }
    md.push_str(&format!(
        "\n\nFID: {} samples per score against {} ({}); class accuracy: the reference classifier's top-1 on the \
         samples (its top-1 on real held-out images: {classifier:.1} %).\n",
        plan.fid_n,
        r.description,
        r.classifier_protocol.as_deref().unwrap_or("?"),
    ));
    crate::io::write_atomic(&out.join("claim.md"), md.as_bytes())?;
    let last = |row: &Row, pick: fn(&(u64, f64, Option<f64>)) -> f64| row.dit.last().map_or(f64::NAN, pick);
    let series = |pick: fn(&(u64, f64, Option<f64>)) -> f64| -> Vec<Series> {
        OBJECTIVES
            .iter()
            .map(|o| Series {
                name: (*o).to_string(),
                points: rows
                    .iter()
                    .filter(|r| r.objectives == *o)
                    .map(|r| (r.tokenizer_steps as f64, last(r, pick)))
                    .collect(),
            })
            .collect()
    };
    let fid_title = format!("DiT FID after {} steps vs tokenizer pre-training steps", plan.dit_steps);
    plot_curves(&out.join("claim-fid.png"), &fid_title, &series(|s| s.1), false)?;
    let acc_title = format!("sample class accuracy (%) after {} DiT steps vs tokenizer steps", plan.dit_steps);
    plot_curves(&out.join("claim-accuracy.png"), &acc_title, &series(|s| s.2.unwrap_or(f64::NAN)), false)?;
    println!("{md}");
    println!("written: {0}/claim.md, {0}/claim.json, {0}/claim-fid.png, {0}/claim-accuracy.png", out.display());
    Ok(())
}
