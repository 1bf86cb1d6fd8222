//! `vtp reconstruct | encode | decode | features`: the tokenizer's image paths.
use super::images::{batches, builtin_images, progress, save_batch_image, to_tensor, ImageInputs};
use super::{out_path, ModelArgs};
use crate::eval::metrics::psnr;
use crate::eval::recon::denormalise;
use crate::io::{read_safetensors, write_safetensors};
use crate::model::encoder::tokens_to_map;
use crate::model::{Layers, VtpModel};
use anyhow::{bail, Context, Result};
use clap::Args;
use std::path::PathBuf;
use tch::{Device, Tensor};

/// Arguments of `vtp reconstruct`.
#[derive(Args, Debug)]
pub struct ReconstructArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    images: ImageInputs,
    /// Output folder for the reconstructed PNGs (`<input stem>.png`).
    #[arg(long, short = 'o', default_value = "out/reconstruct")]
    out: PathBuf,
}

/// Arguments of `vtp encode`.
#[derive(Args, Debug)]
pub struct EncodeArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    images: ImageInputs,
    /// Output .safetensors file: one tensor `[C, H/16, W/16]` per image, keyed by its file stem.
    #[arg(long, short = 'o')]
    out: PathBuf,
}

/// Arguments of `vtp decode`.
#[derive(Args, Debug)]
pub struct DecodeArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// A .safetensors file of latents, `[C, h, w]` or `[B, C, h, w]` per key (as `encode` writes).
    latents: PathBuf,
    /// Output folder for the PNGs (`<key>.png`, `<key>-<i>.png` for batched tensors).
    #[arg(long, short = 'o', default_value = "out/decode")]
    out: PathBuf,
}

/// Arguments of `vtp features`.
#[derive(Args, Debug)]
pub struct FeaturesArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    images: ImageInputs,
    /// Output .safetensors file (keys `<stem>.cls_token`, `<stem>.patch_tokens`, …).
    #[arg(long, short = 'o')]
    out: PathBuf,
    /// Last-layer features through the 64-d bottleneck (the reconstruction latents' tokens).
    #[arg(long)]
    bottleneck: bool,
    /// Also write the final-normed CLS/patch tokens of the last N blocks (`<stem>.layer<i>.*`).
    #[arg(long)]
    layers: Option<i64>,
    /// Patch tokens as maps `[C, h, w]` instead of `[N, C]`.
    #[arg(long)]
    reshape: bool,
    /// Also write the CLIP image embedding (`<stem>.clip`, L2-normalised).
    #[arg(long)]
    clip: bool,
}

/// Encode + decode every input, write PNGs, print PSNR.
pub fn reconstruct(a: &ReconstructArgs, device: Device) -> Result<()> {
    let model = a.model.load(device)?;
    let patch = model.config.vision_patch_size;
    let images = if a.images.inputs.is_empty() {
        eprintln!("note: no input images given; using 4 built-in test images");
        builtin_images(a.images.size.unwrap_or(256), patch)?
    } else {
        a.images.load(patch)?
    };
    let bar = progress(images.len(), "reconstruct");
    let mut total = 0.0;
    for chunk in batches(&images, a.images.batch) {
        let x = to_tensor(chunk, device);
        let y = model.get_latents_decoded_images(&model.get_reconstruction_latents(&x)?)?;
        let psnrs = Vec::<f64>::try_from(psnr(&denormalise(&x), &denormalise(&y)).to_device(Device::Cpu))?;
        for ((i, named), p) in chunk.iter().enumerate().zip(psnrs) {
            let path = out_path(&a.out, &named.name, "png");
            save_batch_image(&path, &y, i as i64)?;
            total += p;
            bar.suspend(|| println!("{}: PSNR {p:.2} dB -> {}", named.name, path.display()));
            bar.inc(1);
        }
    }
    bar.finish_and_clear();
    println!("mean PSNR {:.2} dB over {} images", total / images.len() as f64, images.len());
    Ok(())
}

/// Encode every input to latents in one .safetensors file.
pub fn encode(a: &EncodeArgs, device: Device) -> Result<()> {
    let model = a.model.load(device)?;
    let images = required(&a.images, &model)?;
    let mut out = Vec::new();
    let bar = progress(images.len(), "encode");
    for chunk in batches(&images, a.images.batch) {
        let z = model.get_reconstruction_latents(&to_tensor(chunk, device))?;
        for (i, named) in chunk.iter().enumerate() {
            out.push((named.name.clone(), z.get(i as i64).to_device(Device::Cpu)));
            bar.inc(1);
        }
    }
    bar.finish_and_clear();
    write_safetensors(&a.out, &out, &[("format", "pt")])?;
    println!("wrote {} latents to {}", out.len(), a.out.display());
    Ok(())
}

fn required(inputs: &ImageInputs, model: &VtpModel) -> Result<Vec<super::images::NamedImage>> {
    if inputs.inputs.is_empty() {
        bail!("no input images given");
    }
    inputs.load(model.config.vision_patch_size)
}

/// Decode every latent tensor of a file to PNGs.
pub fn decode(a: &DecodeArgs, device: Device) -> Result<()> {
    let model = a.model.load(device)?;
    let latents = read_safetensors(&a.latents)?;
    let bar = progress(latents.len(), "decode");
    for (key, z) in &latents {
        let z = match z.dim() {
            3 => z.unsqueeze(0),
            4 => z.shallow_clone(),
            _ => bail!(
                "'{}': tensor '{key}' has shape {:?}, expected [C, h, w] or [B, C, h, w]",
                a.latents.display(),
                z.size()
            ),
        };
        let y = model
            .get_latents_decoded_images(&z.to_device(device).to_kind(tch::Kind::Float))
            .with_context(|| format!("'{}': tensor '{key}'", a.latents.display()))?;
        for i in 0..y.size()[0] {
            let name = if y.size()[0] == 1 { key.clone() } else { format!("{key}-{i}") };
            save_batch_image(&out_path(&a.out, &name, "png"), &y, i)?;
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    println!("decoded {} tensors to {}", latents.len(), a.out.display());
    Ok(())
}

/// Write encoder features for every input.
pub fn features(a: &FeaturesArgs, device: Device) -> Result<()> {
    let model = a.model.load(device)?;
    let images = required(&a.images, &model)?;
    let mut out: Vec<(String, Tensor)> = Vec::new();
    let bar = progress(images.len(), "features");
    for chunk in batches(&images, a.images.batch) {
        let x = to_tensor(chunk, device);
        let mut sets = vec![(String::new(), model.get_last_layer_feature(&x, a.bottleneck)?)];
        if let Some(n) = a.layers {
            let layers = model.get_intermediate_layers_feature(&x, &Layers::Last(n), true)?;
            sets.extend(layers.into_iter().enumerate().map(|(i, f)| (format!(".layer{i}"), f)));
        }
        let clip = if a.clip { Some(model.get_clip_image_feature(&x, true)?) } else { None };
        for (i, named) in chunk.iter().enumerate() {
            let i = i as i64;
            for (suffix, f) in &sets {
                let patches = if a.reshape { tokens_to_map(&f.patches, f.grid) } else { f.patches.shallow_clone() };
                out.push((format!("{}{suffix}.cls_token", named.name), f.cls.get(i).to_device(Device::Cpu)));
                out.push((format!("{}{suffix}.patch_tokens", named.name), patches.get(i).to_device(Device::Cpu)));
            }
            if let Some(c) = &clip {
                out.push((format!("{}.clip", named.name), c.get(i).to_device(Device::Cpu)));
            }
            bar.inc(1);
        }
    }
    bar.finish_and_clear();
    write_safetensors(&a.out, &out, &[("format", "pt")])?;
    println!("wrote {} tensors for {} images to {}", out.len(), images.len(), a.out.display());
    Ok(())
}
