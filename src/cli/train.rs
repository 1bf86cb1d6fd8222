//! `vtp pretrain`: stage 1 of VTP (docs/design.md §4), CLIP + SSL + reconstruction from scratch, on the shared
//! run machinery (config + overrides, progress bar, metrics, plots, checkpoints, resume).
use crate::dist::DataParallel;
use crate::train::pretrain::config::{PretrainConfig, PRETRAIN_PRESETS};
use crate::train::pretrain::objectives::recon::ReconLoss;
use crate::train::pretrain::PretrainRun;
use crate::train::run::{launch, prepare_run_dir, RunConfig, RunOptions, RunSummary, Trainer, RUN_CONFIG};
use anyhow::{Context, Result};
use clap::Args;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tch::Device;

/// Arguments shared by the trainers: config, overrides, run directory, resume (each trainer adds
/// its own `--preset`, whose names differ).
#[derive(Args, Debug)]
pub struct RunArgs {
    /// TOML config over the preset's defaults (see --print-config for every key).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Dotted overrides, e.g. `train.steps=100 checkpoint.every=50`.
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
    /// The run directory (`--out`), checked for this invocation and created ([`prepare_run_dir`]).
    pub fn run_dir(&self) -> Result<PathBuf> {
        let out = self.out.clone().context("--out DIR is required (the run directory)")?;
        prepare_run_dir(&out, self.resume)?;
        Ok(out)
    }

    /// The effective config: `preset`, the run's saved config when resuming (else --config),
    /// then the overrides.
    pub fn load_config<C: RunConfig>(&self, preset: &str) -> Result<C> {
        let saved = self.out.as_ref().map(|o| o.join(RUN_CONFIG)).filter(|p| self.resume && p.exists());
        let file = self.config.clone().or(saved);
        C::load(preset, file.as_deref(), &self.overrides)
    }

    /// With --print-config: prints `config` with its comments and returns true (the command exits).
    pub fn print_config<C: RunConfig>(&self, config: &C) -> Result<bool> {
        if self.print_config {
            print!("{}", config.to_commented_toml()?);
        }
        Ok(self.print_config)
    }

    /// Trains with this invocation's resume and stop settings ([`launch`]).
    pub fn train<C: RunConfig, T: Trainer>(
        &self,
        dir: &Path,
        config: &C,
        build: impl FnOnce(Arc<DataParallel>) -> Result<(T, RunOptions)>,
    ) -> Result<Option<RunSummary>> {
        launch(dir, config, self.resume, self.stop_after, build)
    }
}

/// Arguments of `vtp pretrain`.
#[derive(Args, Debug)]
pub struct PretrainArgs {
    /// Preset the defaults come from.
    #[arg(long, default_value = "tiny", value_parser = PRETRAIN_PRESETS)]
    preset: String,
    #[command(flatten)]
    run: RunArgs,
}

/// The reconstruction loss of a run whose config asks for LPIPS when `*lpips`: without its weights,
/// no LPIPS term, said once, and `*lpips` set to false so the run records it.
pub fn recon_loss(lpips: &mut bool, device: Device) -> ReconLoss {
    if !*lpips {
        return ReconLoss::new(None);
    }
    let (loss, note) = ReconLoss::load_default(device);
    if let Some(note) = note {
        eprintln!("note: {note}; the run records loss.lpips = false");
        *lpips = false;
    }
    loss
}

/// Trains a VTP tokenizer from scratch and exports it in the released format.
pub fn pretrain(a: &PretrainArgs, device: Device) -> Result<()> {
    let mut config: PretrainConfig = a.run.load_config(&a.preset)?;
    if a.run.print_config(&config)? {
        return Ok(());
    }
    let dir = a.run.run_dir()?;
    let recon = recon_loss(&mut config.loss.lpips, device);
    let summary = a.run.train(&dir, &config, |dp| {
        let trainer = PretrainRun::new(config.clone(), recon, device, dp)?;
        let opts = trainer.run_options();
        Ok((trainer, opts))
    })?;
    print_summary(&summary, &dir, "tokenizer");
    Ok(())
}

/// The closing lines of a run that exports `what` (e.g. "tokenizer"); nothing on ranks other than 0.
pub fn print_summary(s: &Option<RunSummary>, dir: &Path, what: &str) {
    let Some(s) = s else { return };
    let evals: Vec<String> = s.last_eval.iter().map(|(k, v)| format!("{k} {v:.2}")).collect();
    println!("{} steps ({} skipped); {}", s.steps, s.skipped, evals.join(", "));
    match &s.exported {
        Some(model) => println!("{what} written to {} (config.json + model.safetensors)", model.display()),
        None => println!("stopped before the end; continue with: --resume --out {}", dir.display()),
    }
    println!("metrics: {0}/metrics.jsonl, {0}/tensorboard, plots: {0}/plots", dir.display());
}
