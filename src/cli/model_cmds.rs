//! `vtp init` and `vtp check`: model files and parity against reference dumps.
use crate::check::check_reference;
use crate::config::{VtpConfig, PRESETS};
use crate::io::read_safetensors_map;
use crate::model::VtpModel;
use anyhow::{bail, Result};
use clap::Args;
use std::path::PathBuf;
use tch::Device;

/// Arguments of `vtp init`.
#[derive(Args, Debug)]
pub struct InitArgs {
    /// Preset of a released checkpoint's architecture.
    #[arg(long, default_value = "small", value_parser = PRESETS)]
    preset: String,
    /// Use this config.json instead of a preset.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Output directory (config.json + model.safetensors).
    #[arg(long, short = 'o')]
    out: PathBuf,
    /// Seed of the random initialisation.
    #[arg(long, default_value_t = 0)]
    seed: i64,
}

/// Arguments of `vtp check`.
#[derive(Args, Debug)]
pub struct CheckArgs {
    /// Released-format directory or `hf:ORG/NAME[@REV]`.
    #[arg(long, short = 'm')]
    model: String,
    /// Reference dump: `in.*` inputs and `out.<method>.<options>` outputs (README: "Reference dumps").
    #[arg(long)]
    reference: PathBuf,
    /// Largest accepted relative L2 error ‖ours − ref‖ / ‖ref‖ per output.
    #[arg(long, default_value_t = 1e-4)]
    max_rel: f64,
}

/// Write a random model in the released format.
pub fn init(a: &InitArgs, device: Device) -> Result<()> {
    let config = match &a.config {
        Some(path) => VtpConfig::from_file(path)?,
        None => VtpConfig::preset(&a.preset)?,
    };
    tch::manual_seed(a.seed);
    let model = VtpModel::new(config, device)?;
    model.save(&a.out)?;
    let params: i64 = model.vs.trainable_variables().iter().map(|t| t.numel() as i64).sum();
    println!("wrote a random model ({:.1}M parameters) to {}", params as f64 / 1e6, a.out.display());
    Ok(())
}

/// Compare every output of a reference dump; fails past `--max-rel`.
pub fn check(a: &CheckArgs, device: Device) -> Result<()> {
    let model = VtpModel::load(&crate::hub::resolve_model_dir(&a.model)?, device)?;
    let io = read_safetensors_map(&a.reference)?;
    let results = check_reference(&model, &io)?;
    let width = results.iter().map(|r| r.key.len()).max().unwrap_or(0);
    let mut worst: f64 = 0.0;
    let mut failed = 0;
    for r in &results {
        let ok = r.rel_l2 <= a.max_rel;
        failed += usize::from(!ok);
        worst = worst.max(r.rel_l2);
        println!(
            "{:<width$}  rel_l2 {:.3e}  max_abs {:.3e}  {}",
            r.key,
            r.rel_l2,
            r.max_abs,
            if ok { "ok" } else { "FAIL" }
        );
    }
    println!("{} outputs, worst relative L2 error {worst:.3e} (bound {:.1e})", results.len(), a.max_rel);
    if failed > 0 {
        bail!("{failed} of {} outputs exceed the bound {:.1e}", results.len(), a.max_rel);
    }
    Ok(())
}
