//! `vtp finetune-decoder`: stage 2 of VTP (docs/design.md §4.7), the pixel decoder of a trained tokenizer
//! fine-tuned with L1 + LPIPS + a PatchGAN while the encoder (hence the latents) stays frozen, on the
//! shared run machinery of `vtp pretrain` ([`crate::train::run`]).
use super::train::{print_summary, recon_loss, RunArgs};
use crate::model::VtpModel;
use crate::train::finetune::config::{FinetuneConfig, FINETUNE_PRESETS};
use crate::train::finetune::FinetuneRun;
use anyhow::{bail, Result};
use clap::Args;
use tch::Device;

/// Arguments of `vtp finetune-decoder`.
#[derive(Args, Debug)]
pub struct FinetuneArgs {
    /// The tokenizer to fine-tune: a released-format folder (config.json + model.safetensors) or
    /// `hf:ORG/NAME[@REV]`; with --resume, defaults to the run's recorded model.
    #[arg(long, short = 'm')]
    model: Option<String>,
    /// Preset the defaults come from.
    #[arg(long, default_value = "tiny", value_parser = FINETUNE_PRESETS)]
    preset: String,
    #[command(flatten)]
    run: RunArgs,
}

/// Fine-tunes a tokenizer's pixel decoder and exports the whole tokenizer in the released format.
pub fn finetune_decoder(a: &FinetuneArgs, device: Device) -> Result<()> {
    let mut config: FinetuneConfig = a.run.load_config(&a.preset)?;
    if let Some(model) = &a.model {
        config.model = model.clone();
    }
    if a.run.print_config(&config)? {
        return Ok(());
    }
    if config.model.is_empty() {
        bail!("--model DIR is required (the tokenizer whose decoder is fine-tuned)");
    }
    let model = VtpModel::load(&crate::hub::resolve_model_dir(&config.model)?, device)?;
    let dir = a.run.run_dir()?;
    let recon = recon_loss(&mut config.loss.lpips, device);
    let summary = a.run.train(&dir, &config, |dp| {
        let trainer = FinetuneRun::new(config.clone(), model, recon, dp)?;
        let opts = trainer.run_options();
        Ok((trainer, opts))
    })?;
    print_summary(&summary, &dir, "tokenizer");
    Ok(())
}
