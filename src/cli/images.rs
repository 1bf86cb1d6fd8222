//! Image inputs of the CLI: files and folders, fitted to the patch grid, batched by size.
use crate::data::image::{list_images, load_image, prepare_rgb, save_png, Fit, ImageTensor};
use anyhow::{bail, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

/// Image inputs and how they are fitted to the model.
#[derive(Args, Debug, Clone)]
pub struct ImageInputs {
    /// Image files and/or folders of images (.png .jpg .jpeg .webp).
    pub inputs: Vec<PathBuf>,
    /// Resize and centre-crop every image to SIZE×SIZE (the ADM centre crop of VTP's reconstruction
    /// evaluation; SIZE a multiple of 16). Default: centre-crop each side down to a multiple of 16,
    /// no resampling.
    #[arg(long)]
    pub size: Option<u32>,
    /// Images per forward pass (consecutive images of equal size are batched).
    #[arg(long, default_value_t = 4)]
    pub batch: usize,
}

/// One fitted image and the name its outputs are written under (its file stem).
pub struct NamedImage {
    pub name: String,
    pub image: ImageTensor,
}

impl ImageInputs {
    /// How images are fitted (`--size` or crop-to-multiple).
    pub fn fit(&self, patch: i64) -> Result<Fit> {
        match self.size {
            Some(s) if s == 0 || i64::from(s) % patch != 0 => bail!("--size {s} is not a positive multiple of {patch}"),
            Some(s) => Ok(Fit::AdmCenterCrop(s)),
            None => Ok(Fit::CropToMultiple),
        }
    }

    /// The input files: each file as given, each folder's images sorted; a missing path is an error.
    pub fn paths(&self) -> Result<Vec<PathBuf>> {
        let mut out = Vec::new();
        for p in &self.inputs {
            if p.is_dir() {
                let found = list_images(p)?;
                if found.is_empty() {
                    bail!("folder '{}' holds no .png/.jpg/.jpeg/.webp images", p.display());
                }
                out.extend(found);
            } else if p.exists() {
                out.push(p.clone());
            } else {
                bail!("input '{}' does not exist", p.display());
            }
        }
        Ok(out)
    }

    /// Loads every input image, fitted for patch size `patch`.
    pub fn load(&self, patch: i64) -> Result<Vec<NamedImage>> {
        let fit = self.fit(patch)?;
        self.paths()?
            .iter()
            .map(|p| Ok(NamedImage { name: stem(p), image: load_image(p, patch as u32, fit)? }))
            .collect()
    }
}

fn stem(p: &Path) -> String {
    p.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "image".into())
}

/// Groups consecutive images of equal size into batches of at most `batch`.
pub fn batches(images: &[NamedImage], batch: usize) -> Vec<&[NamedImage]> {
    let mut out = Vec::new();
    let mut start = 0;
    for i in 1..=images.len() {
        let same = i < images.len()
            && i - start < batch.max(1)
            && (images[i].image.height, images[i].image.width)
                == (images[start].image.height, images[start].image.width);
        if !same {
            out.push(&images[start..i]);
            start = i;
        }
    }
    out
}

/// Stacks a batch of equal-size images into `[B, 3, H, W]` on `device`.
pub fn to_tensor(images: &[NamedImage], device: Device) -> Tensor {
    let parts: Vec<Tensor> = images
        .iter()
        .map(|n| Tensor::from_slice(&n.image.data).view([1, 3, n.image.height as i64, n.image.width as i64]))
        .collect();
    Tensor::cat(&parts, 0).to_device(device)
}

/// The values of a tensor as f32 on the CPU, row-major.
pub fn to_vec(t: &Tensor) -> Vec<f32> {
    Vec::<f32>::try_from(t.to_device(Device::Cpu).to_kind(Kind::Float).contiguous().view([-1]))
        .expect("a float CPU tensor converts to Vec<f32>")
}

/// Writes image `i` of an ImageNet-normalised batch `[B, 3, H, W]` as PNG.
pub fn save_batch_image(path: &Path, batch: &Tensor, i: i64) -> Result<()> {
    let img = batch.get(i);
    let (_, h, w) = img.size3()?;
    save_png(path, &to_vec(&img), h as usize, w as usize)
}

/// A progress bar over `n` images (hidden for a single image or when not on a terminal).
pub fn progress(n: usize, what: &str) -> ProgressBar {
    if n <= 1 {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(n as u64);
    let style = ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} {per_sec} eta {eta}")
        .expect("valid template")
        .progress_chars("=> ");
    bar.set_style(style);
    bar.set_message(what.to_string());
    bar
}

/// Built-in test images (no downloads): gradients with a coloured disc and a rectangle, the
/// picture recipe of the fixtures' non-square input, at `size`×`size`.
pub fn builtin_images(size: u32, patch: i64) -> Result<Vec<NamedImage>> {
    (0..4u32)
        .map(|b| {
            let img = image::RgbImage::from_fn(size, size, |x, y| builtin_pixel(b, x, y, size));
            let image = prepare_rgb(&img, patch as u32, Fit::CropToMultiple)?;
            Ok(NamedImage { name: format!("builtin-{b}"), image })
        })
        .collect()
}

fn builtin_pixel(b: u32, x: u32, y: u32, size: u32) -> image::Rgb<u8> {
    let (fx, fy, fb) = ((x as f64 + 0.5) / size as f64, (y as f64 + 0.5) / size as f64, b as f64);
    let (cy, cx) = (0.3 + 0.15 * fb, 0.3 + 0.12 * fb);
    let mut rgb = [0.15 + 0.7 * fx, 0.2 + 0.6 * fy, 0.5 + 0.3 * (std::f64::consts::TAU * (fx + fy) * (1.0 + fb)).sin()];
    if (fy - cy).powi(2) + (fx - cx).powi(2) < 0.22f64.powi(2) {
        rgb = [[0.9, 0.15, 0.1], [0.1, 0.3, 0.85], [0.2, 0.8, 0.3], [0.9, 0.9, 0.9]][b as usize % 4];
    }
    if fy > 0.65 && fy < 0.9 && fx > 0.55 - 0.1 * fb && fx < 0.9 - 0.1 * fb {
        rgb = [0.95, 0.9, 0.2];
    }
    image::Rgb(rgb.map(|v| (v.clamp(0.0, 1.0) * 255.0).round() as u8))
}
