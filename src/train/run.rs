//! The run loop every trainer shares (`vtp pretrain`, `vtp finetune-decoder`, later `vtp dit train`):
//! steps with a progress bar, metrics (`metrics.jsonl` + TensorBoard) and plots, online evaluation,
//! atomic checkpoints every N steps and on SIGINT/SIGTERM, bit-identical `--resume`, and non-finite
//! step handling (reported with every term, skipped; the run stops after K in a row). In a
//! multi-process job every rank runs the loop; rank 0 alone logs, evaluates, draws the grids and writes
//! checkpoints and the export, and all ranks stop at the same step.
use super::checkpoint;
use super::config::{CheckpointConfig, EvalConfig, LogConfig, TrainConfig};
use super::metrics::MetricsLog;
use super::plots::plot_metrics;
use super::precision::set_tf32;
use crate::dist::{DataParallel, DistConfig};
use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;
use tch::Tensor;

/// What one optimisation step reports.
#[derive(Debug, Clone, Default)]
pub struct StepReport {
    /// Named scalars: `loss/*` terms (shown on the progress bar), schedules (`lr`, …), `grad_norm`.
    pub scalars: Vec<(String, f64)>,
    /// Images the step consumed (for images/s).
    pub images: usize,
    /// The loss or a gradient was non-finite: nothing was updated.
    pub skipped: bool,
    /// Warnings for the user (e.g. the SSL collapse alarm), printed once each by rank 0.
    pub warnings: Vec<String>,
}

/// A trainer the run loop drives.
pub trait Trainer {
    /// Runs optimisation step `step` (0-based). A step whose loss or gradients are not finite must
    /// leave every weight and state unchanged and report `skipped`.
    fn train_step(&mut self, step: u64) -> Result<StepReport>;
    /// The online evaluation after `step` steps: named scalars (`eval/*`).
    fn evaluate(&mut self, step: u64) -> Result<Vec<(String, f64)>>;
    /// Writes the picture of progress after `step` steps (a reconstruction or sample grid) into `dir`.
    fn snapshot(&mut self, step: u64, dir: &Path) -> Result<PathBuf>;
    /// Collects what the checkpoint needs from every rank (e.g. each rank's data position); runs on
    /// every rank just before rank 0 writes a checkpoint.
    fn sync_state(&mut self) -> Result<()> {
        Ok(())
    }
    /// The checkpoint: named tensors and a JSON state (data position, …).
    fn checkpoint(&self) -> (Vec<(String, Tensor)>, serde_json::Value);
    /// Restores a checkpoint written by [`Self::checkpoint`].
    fn restore(&mut self, tensors: &HashMap<String, Tensor>, state: &serde_json::Value) -> Result<()>;
    /// Exports the trained model into `dir`.
    fn export(&self, dir: &Path) -> Result<()>;
}

/// Name of the effective config a run writes into its directory.
pub const RUN_CONFIG: &str = "config.toml";

/// A trainer's configuration as the run machinery builds, prints and records it.
pub trait RunConfig: Sized {
    /// The preset, then `file` over it, then the `key=value` overrides; validated.
    fn load(preset: &str, file: Option<&Path>, overrides: &[String]) -> Result<Self>;
    /// The config as TOML with a comment on every key (`--print-config`, the run's config.toml).
    fn to_commented_toml(&self) -> Result<String>;
    /// Its `[dist]` section (timeouts and buckets of a multi-process run).
    fn dist(&self) -> &DistConfig;
}

/// The run directory `out`, checked for this invocation and created: a fresh run never reuses a
/// directory that holds a run (its [`RUN_CONFIG`]); a resumed one needs it; either must be writable.
pub fn prepare_run_dir(out: &Path, resume: bool) -> Result<()> {
    let has_run = out.join(RUN_CONFIG).exists();
    if resume && !has_run {
        bail!("--resume: '{}' holds no run ({RUN_CONFIG} is missing)", out.display());
    }
    if !resume && has_run {
        bail!("'{}' already holds a run; continue it with --resume or choose another --out", out.display());
    }
    std::fs::create_dir_all(out).with_context(|| format!("cannot create run directory '{}'", out.display()))?;
    let probe = out.join(".vtp-write-test");
    std::fs::write(&probe, b"").with_context(|| format!("run directory '{}' is not writable", out.display()))?;
    std::fs::remove_file(&probe).ok();
    Ok(())
}

/// A whole training run: joins the multi-process job when a launcher started this process
/// (`config.dist()`), builds the trainer for this rank with gradients on (the CLI runs under
/// no_grad), then runs the shared loop ([`run`]), resuming when asked and stopping after
/// `stop_after` steps of this invocation if given. `config` is recorded in `dir` once the trainer is
/// built and (when resuming) its checkpoint restored, so a failed start leaves the run's config as
/// it was. The summary is rank 0's (`None` on the other ranks, which print nothing).
pub fn launch<C: RunConfig, T: Trainer>(
    dir: &Path,
    config: &C,
    resume: bool,
    stop_after: Option<u64>,
    build: impl FnOnce(Arc<DataParallel>) -> Result<(T, RunOptions)>,
) -> Result<Option<RunSummary>> {
    let dp = Arc::new(DataParallel::join(config.dist())?);
    tch::with_grad(|| {
        let (mut trainer, opts) = build(dp.clone())?;
        let opts = RunOptions { stop_after, ..opts };
        let summary = run(&mut trainer, &opts, dir, resume, &dp, || write_config(dir, config))?;
        Ok(dp.is_main().then_some(summary))
    })
}

/// Writes the effective config into the run directory.
fn write_config<C: RunConfig>(dir: &Path, config: &C) -> Result<()> {
    crate::io::write_atomic(&dir.join(RUN_CONFIG), config.to_commented_toml()?.as_bytes())
}

/// How the loop runs (from the trainer's config).
#[derive(Debug, Clone)]
pub struct RunOptions {
    pub steps: u64,
    pub log_every: u64,
    pub eval_every: u64,
    pub grid_every: u64,
    pub checkpoint_every: u64,
    pub keep: usize,
    pub max_bad_steps: u64,
    /// TF32 tensor cores for CUDA f32 matmuls (`train.tf32`).
    pub tf32: bool,
    /// Stop (with a checkpoint) after this many steps of this invocation, e.g. to fit a job slot.
    pub stop_after: Option<u64>,
}

impl RunOptions {
    /// The loop settings of a trainer's `[train]`, `[log]`, `[eval]` and `[checkpoint]` sections.
    pub fn from_config(train: &TrainConfig, log: &LogConfig, eval: &EvalConfig, checkpoint: &CheckpointConfig) -> Self {
        Self {
            steps: train.steps,
            log_every: log.every,
            eval_every: eval.every,
            grid_every: eval.grid_every,
            checkpoint_every: checkpoint.every,
            keep: checkpoint.keep,
            max_bad_steps: train.max_bad_steps,
            tf32: train.tf32,
            stop_after: None,
        }
    }
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq)]
pub struct RunSummary {
    /// Steps completed (the checkpoint's step).
    pub steps: u64,
    /// Steps skipped for non-finite values.
    pub skipped: u64,
    /// Stopped by SIGINT/SIGTERM before `steps`.
    pub interrupted: bool,
    /// The last online evaluation.
    pub last_eval: Vec<(String, f64)>,
    /// Where the final model was exported (not when interrupted).
    pub exported: Option<PathBuf>,
}

/// Raised by SIGINT / SIGTERM: the loop checkpoints and stops after the current step.
fn stop_flag() -> Result<Arc<AtomicBool>> {
    let flag = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(signal, flag.clone()).context("cannot install the signal handler")?;
    }
    Ok(flag)
}

/// Running means of the scalars since the last log line.
#[derive(Default)]
struct Window {
    sums: BTreeMap<String, (f64, u64)>,
    order: Vec<String>,
    images: usize,
    since: Option<Instant>,
}

impl Window {
    fn add(&mut self, r: &StepReport) {
        for (k, v) in &r.scalars {
            let e = self.sums.entry(k.clone()).or_insert_with(|| {
                self.order.push(k.clone());
                (0.0, 0)
            });
            *e = (e.0 + v, e.1 + 1);
        }
        self.images += r.images;
    }

    /// The means, images/s since the window opened, and a fresh window.
    fn take(&mut self) -> Vec<(String, f64)> {
        let secs = self.since.map_or(0.0, |t| t.elapsed().as_secs_f64());
        let mut out: Vec<(String, f64)> =
            self.order.iter().map(|k| (k.clone(), self.sums[k].0 / self.sums[k].1.max(1) as f64)).collect();
        if secs > 0.0 {
            out.push(("images_per_s".into(), self.images as f64 / secs));
        }
        *self = Window { since: Some(Instant::now()), ..Window::default() };
        out
    }
}

fn bar(start: u64, steps: u64) -> ProgressBar {
    let bar = ProgressBar::new(steps);
    let style =
        ProgressStyle::with_template("{pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}").expect("valid template");
    bar.set_style(style);
    bar.set_position(start);
    bar
}

/// `loss 1.23 clip 0.45 … lr 1.0e-3 64 img/s` for the progress bar.
fn bar_message(scalars: &[(String, f64)]) -> String {
    let mut parts = Vec::new();
    for (k, v) in scalars {
        if let Some(term) = k.strip_prefix("loss/") {
            parts.push(format!("{} {v:.4}", if term == "total" { "loss" } else { term }));
        }
    }
    for (k, v) in scalars {
        match k.as_str() {
            "lr" => parts.push(format!("lr {v:.2e}")),
            "images_per_s" => parts.push(format!("{v:.1} img/s")),
            _ => {}
        }
    }
    parts.join(" ")
}

/// Every scalar of a report on one line (`name=value`), for a skipped step's message.
fn all_terms(scalars: &[(String, f64)]) -> String {
    scalars.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(" ")
}

/// Runs `trainer` for `opts.steps` steps in `run_dir` (which holds metrics, plots, checkpoints and
/// the exported model), from the newest checkpoint when `resume`; `dp` is this process's place in
/// the job (the trainer averages its gradients over it), `on_ready` runs on rank 0 once the
/// checkpoint is restored.
pub fn run(
    trainer: &mut dyn Trainer,
    opts: &RunOptions,
    run_dir: &Path,
    resume: bool,
    dp: &DataParallel,
    on_ready: impl FnOnce() -> Result<()>,
) -> Result<RunSummary> {
    let main = dp.is_main();
    set_tf32(opts.tf32)?;
    let start = if resume { restore_latest(trainer, run_dir, main)? } else { 0 };
    let mut metrics = match main {
        true => {
            on_ready()?;
            Some(MetricsLog::open(run_dir, resume.then_some(start))?)
        }
        false => None,
    };
    let stop = stop_flag()?;
    let bar = if main { bar(start, opts.steps) } else { ProgressBar::hidden() };
    let mut window = Window { since: Some(Instant::now()), ..Window::default() };
    let (mut bad_in_row, mut skipped) = (0u64, 0u64);
    let mut last_eval = Vec::new();
    let mut step = start;
    while step < opts.steps {
        let report = trainer.train_step(step)?;
        step += 1;
        if main {
            for w in &report.warnings {
                bar.suspend(|| eprintln!("warning: step {step}: {w}"));
            }
        }
        if report.skipped {
            skipped += 1;
            bad_in_row += 1;
            let terms = all_terms(&report.scalars);
            if let Some(m) = &mut metrics {
                bar.suspend(|| eprintln!("step {step}: non-finite loss or gradient, step skipped: {terms}"));
                m.log(step, &[("skipped_step", 1.0)])?;
            }
            if bad_in_row >= opts.max_bad_steps {
                bar.abandon();
                let last = checkpoint::latest(run_dir)?;
                let kept = last.map_or("no checkpoint was written yet".into(), |p| {
                    format!("the last good checkpoint is '{}'", p.display())
                });
                bail!("stopped at step {step} after {bad_in_row} consecutive non-finite steps; {kept}");
            }
        } else {
            bad_in_row = 0;
            window.add(&report);
        }
        let due = |every: u64| every > 0 && step % every == 0;
        if let Some(m) = &mut metrics {
            if due(opts.log_every) || step == opts.steps {
                let scalars = window.take();
                bar.set_message(bar_message(&scalars));
                if bar.is_hidden() {
                    eprintln!("step {step}/{} {}", opts.steps, bar_message(&scalars));
                }
                log(m, step, &scalars)?;
            }
            if due(opts.eval_every) || step == opts.steps {
                last_eval = trainer.evaluate(step)?;
                log(m, step, &last_eval)?;
                plot_metrics(run_dir)?;
            }
            if due(opts.grid_every) || step == opts.steps {
                trainer.snapshot(step, &run_dir.join("samples"))?;
            }
        }
        bar.set_position(step);
        let asked = stop.load(Ordering::SeqCst) || opts.stop_after.is_some_and(|n| step >= start + n);
        let interrupted = dp.any(asked)?;
        // No checkpoint inside a run of non-finite steps: the last one before it stays the newest.
        if (due(opts.checkpoint_every) || step == opts.steps || interrupted) && bad_in_row == 0 {
            trainer.sync_state()?;
            if main {
                save(trainer, run_dir, step, opts.keep)?;
            }
        }
        if interrupted && step < opts.steps {
            if main {
                plot_metrics(run_dir)?;
            }
            bar.abandon_with_message(format!("stopped at step {step}; checkpoint written, continue with --resume"));
            return Ok(RunSummary { steps: step, skipped, interrupted: true, last_eval, exported: None });
        }
    }
    bar.finish();
    let exported = match &mut metrics {
        Some(m) => {
            m.flush()?;
            plot_metrics(run_dir)?;
            let dir = run_dir.join("model");
            trainer.export(&dir)?;
            Some(dir)
        }
        None => None,
    };
    Ok(RunSummary { steps: step, skipped, interrupted: false, last_eval, exported })
}

fn log(metrics: &mut MetricsLog, step: u64, scalars: &[(String, f64)]) -> Result<()> {
    let refs: Vec<(&str, f64)> = scalars.iter().map(|(k, v)| (k.as_str(), *v)).collect();
    metrics.log(step, &refs)?;
    metrics.flush()
}

fn save(trainer: &dyn Trainer, run_dir: &Path, step: u64, keep: usize) -> Result<PathBuf> {
    let (tensors, mut state) = trainer.checkpoint();
    state["step"] = serde_json::json!(step);
    checkpoint::save(run_dir, step, &tensors, &state, keep)
}

/// Restores the newest intact checkpoint of `run_dir`, saying so when `tell`, with one warning line for
/// each newer one that could not be read; returns its step.
fn restore_latest(trainer: &mut dyn Trainer, run_dir: &Path, tell: bool) -> Result<u64> {
    let found = checkpoint::load_newest_intact(run_dir).context("--resume")?;
    let dir = &found.dir;
    let step = found.state["step"].as_u64().with_context(|| format!("'{}': state.json has no step", dir.display()))?;
    trainer.restore(&found.tensors, &found.state)?;
    if tell {
        for (bad, e) in &found.unreadable {
            eprintln!("warning: checkpoint '{}' is unreadable ({e:#}); resuming from step {step}", bad.display());
        }
        eprintln!("resuming from '{}' (step {step})", dir.display());
    }
    Ok(step)
}
