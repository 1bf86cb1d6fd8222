//! `vtp pretrain`: stage 1 of VTP (spec §4), CLIP + SSL + reconstruction from scratch, on the shared
//! run machinery (config + overrides, progress bar, metrics, plots, checkpoints, resume).
use crate::train::config::{PretrainConfig, PRETRAIN_PRESETS};
use crate::train::objectives::recon::ReconLoss;
use crate::train::pretrain::PretrainRun;
use crate::train::run::{run, RunSummary};
use anyhow::{bail, Context, Result};
use clap::Args;
use std::path::{Path, PathBuf};
use tch::Device;

/// Name of the effective config a run writes into its directory.
pub const RUN_CONFIG: &str = "config.toml";

/// Arguments shared by the trainers: config, overrides, run directory, resume.
#[derive(Args, Debug)]
pub struct RunArgs {
    /// TOML config over the preset's defaults (see --print-config for every key).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Preset the defaults come from.
    #[arg(long, default_value = "tiny", value_parser = PRETRAIN_PRESETS)]
    preset: String,
    /// Dotted overrides, e.g. `train.steps=100 checkpoint.every=50 batch.clip=32`.
    #[arg(value_name = "KEY=VALUE")]
    overrides: Vec<String>,
    /// Run directory: config.toml, metrics.jsonl, tensorboard/, plots/, samples/, checkpoints/, model/.
    #[arg(long, short = 'o')]
    out: Option<PathBuf>,
    /// Continue from the newest checkpoint of --out (its config.toml is the base config).
    #[arg(long)]
    resume: bool,
    /// Stop (with a checkpoint) after N steps of this invocation; continue later with --resume.
    #[arg(long, value_name = "N")]
    stop_after: Option<u64>,
    /// Print the effective config, with a comment on every key, and exit.
    #[arg(long)]
    print_config: bool,
}

impl RunArgs {
    /// The run directory, checked for this invocation: a fresh run never reuses a directory that
    /// holds a run; a resumed one needs it.
    fn run_dir(&self) -> Result<PathBuf> {
        let out = self.out.clone().context("--out DIR is required (the run directory)")?;
        let has_run = out.join(RUN_CONFIG).exists();
        if self.resume && !has_run {
            bail!("--resume: '{}' holds no run ({RUN_CONFIG} is missing)", out.display());
        }
        if !self.resume && has_run {
            bail!("'{}' already holds a run; continue it with --resume or choose another --out", out.display());
        }
        std::fs::create_dir_all(&out).with_context(|| format!("cannot create run directory '{}'", out.display()))?;
        let probe = out.join(".vtp-write-test");
        std::fs::write(&probe, b"").with_context(|| format!("run directory '{}' is not writable", out.display()))?;
        std::fs::remove_file(&probe).ok();
        Ok(out)
    }

    /// The effective config: the preset, the run's saved config when resuming (else --config),
    /// then the overrides.
    fn pretrain_config(&self) -> Result<PretrainConfig> {
        let saved = self.out.as_ref().map(|o| o.join(RUN_CONFIG)).filter(|p| self.resume && p.exists());
        let file = self.config.clone().or(saved);
        PretrainConfig::load(&self.preset, file.as_deref(), &self.overrides)
    }
}

/// Arguments of `vtp pretrain`.
#[derive(Args, Debug)]
pub struct PretrainArgs {
    #[command(flatten)]
    run: RunArgs,
}

/// Writes the effective config into the run directory.
fn write_config(dir: &Path, config: &PretrainConfig) -> Result<()> {
    crate::io::write_atomic(&dir.join(RUN_CONFIG), config.to_commented_toml()?.as_bytes())
}

/// Trains a VTP tokenizer from scratch and exports it in the released format.
pub fn pretrain(a: &PretrainArgs, device: Device) -> Result<()> {
    let mut config = a.run.pretrain_config()?;
    if a.run.print_config {
        print!("{}", config.to_commented_toml()?);
        return Ok(());
    }
    let dir = a.run.run_dir()?;
    let recon = if config.loss.lpips {
        let (loss, note) = ReconLoss::load_default(device);
        if let Some(note) = note {
            eprintln!("note: {note}; the run records loss.lpips = false");
            config.loss.lpips = false;
        }
        loss
    } else {
        ReconLoss::new(None)
    };
    write_config(&dir, &config)?;
    let summary = tch::with_grad(|| -> Result<RunSummary> {
        let mut trainer = PretrainRun::new(config, recon, device)?;
        let opts = crate::train::run::RunOptions { stop_after: a.run.stop_after, ..trainer.run_options() };
        run(&mut trainer, &opts, &dir, a.run.resume)
    })?;
    print_summary(&summary, &dir);
    Ok(())
}

/// The closing lines of a run.
fn print_summary(s: &RunSummary, dir: &Path) {
    let evals: Vec<String> = s.last_eval.iter().map(|(k, v)| format!("{k} {v:.2}")).collect();
    println!("{} steps ({} skipped); {}", s.steps, s.skipped, evals.join(", "));
    match &s.exported {
        Some(model) => println!("tokenizer written to {} (config.json + model.safetensors)", model.display()),
        None => println!("stopped before the end; continue with: --resume --out {}", dir.display()),
    }
    println!("metrics: {0}/metrics.jsonl, {0}/tensorboard, plots: {0}/plots", dir.display());
}
