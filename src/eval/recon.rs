//! Reconstruction evaluation (docs/design.md §5.3): ADM centre crop, encode + decode, then per image PSNR,
//! SSIM and LPIPS on `[0, 1]` pixels, and rFID between the inputs and the reconstructions written as
//! 8-bit images (`(x·255).astype(uint8)`, truncation) through the FID Inception network.
use super::frechet::{frechet_distance, GaussianStats, FID_EPS};
use super::inception::FidInception;
use super::lpips::Lpips;
use super::metrics::{psnr, ssim};
use crate::data::image::{prepare_rgb, Fit, IMAGENET_MEAN, IMAGENET_STD};
use crate::data::Sample;
use crate::model::VtpModel;
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

/// Reconstruction metrics over an image set; every field names its protocol.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ReconResult {
    pub protocol: String,
    pub n_images: usize,
    /// Mean per-image PSNR (dB) on `[0, 1]` images.
    pub psnr: f64,
    /// Mean per-image SSIM (torchmetrics defaults, data range 1).
    pub ssim: f64,
    /// Mean per-image LPIPS-VGG on `2·x − 1`, when its weights were available.
    pub lpips: Option<f64>,
    /// rFID (pytorch-fid rules) between inputs and reconstructions, when the Inception weights were available.
    pub rfid: Option<f64>,
}

/// `[B, 3, H, W]` ImageNet-normalised -> `[0, 1]` (`x·std + mean`, clamped), as the tool de-normalises.
pub fn denormalise(x: &Tensor) -> Tensor {
    unnormalise(x).clamp(0.0, 1.0)
}

/// `x · std + mean` per channel: ImageNet-normalised `[B, 3, H, W]` back to pixel scale, unclamped
/// (so every pixel keeps its gradient).
pub fn unnormalise(x: &Tensor) -> Tensor {
    let device = x.device();
    let mean = Tensor::from_slice(&IMAGENET_MEAN).to_device(device).view([1, 3, 1, 1]);
    let std = Tensor::from_slice(&IMAGENET_STD).to_device(device).view([1, 3, 1, 1]);
    x.to_kind(Kind::Float) * std + mean
}

/// `(x·255).astype(uint8) / 255`: the value an image has after being written as PNG and read back.
pub fn as_uint8_image(x01: &Tensor) -> Tensor {
    (x01 * 255.0).to_kind(Kind::Uint8).to_kind(Kind::Float) / 255.0
}

/// Inception pool3 features of a list of `[3, H, W]` images in `[0, 1]`, `batch` at a time.
pub fn inception_features(inception: &FidInception, images: &[Tensor], batch: usize) -> Result<Tensor> {
    if images.is_empty() {
        bail!("no images to compute FID features of");
    }
    let parts: Result<Vec<Tensor>> = images
        .chunks(batch.max(1))
        .map(|c| Ok(inception.try_features(&Tensor::stack(c, 0))?.to_device(Device::Cpu)))
        .collect();
    Ok(Tensor::cat(&parts?, 0))
}

/// The rFID between two image sets (`[3, H, W]` in `[0, 1]`, already 8-bit quantised).
pub fn rfid(inception: &FidInception, reference: &[Tensor], reconstructed: &[Tensor], batch: usize) -> Result<f64> {
    let a = GaussianStats::from_features(&inception_features(inception, reference, batch)?)?;
    let b = GaussianStats::from_features(&inception_features(inception, reconstructed, batch)?)?;
    Ok(frechet_distance(&a, &b, FID_EPS)?.fid)
}

/// Networks the reconstruction evaluation may use.
pub struct ReconMetrics<'a> {
    pub inception: Option<&'a FidInception>,
    pub lpips: Option<&'a Lpips>,
    /// Crop side (docs/design.md §5.3: 256).
    pub size: u32,
    pub batch: usize,
}

/// The reconstruction protocol on the first `limit` samples of the source `spec`, as `vtp eval` and
/// the pre-training run's online evaluation both run it; `progress` gets the images done so far.
pub fn evaluate_source(
    model: &VtpModel,
    spec: &str,
    limit: usize,
    m: &ReconMetrics,
    progress: impl FnMut(usize),
) -> Result<ReconResult> {
    let stream = crate::data::source::open(spec, &crate::data::stream::StreamOptions::default())?.take(limit);
    let mut result = evaluate(model, stream, m, progress)?;
    result.protocol = format!("{} on '{spec}'", result.protocol);
    Ok(result)
}

/// Runs the reconstruction protocol over `samples`; `progress` is called with the images done so far.
pub fn evaluate<I>(
    model: &VtpModel,
    samples: I,
    m: &ReconMetrics,
    mut progress: impl FnMut(usize),
) -> Result<ReconResult>
where
    I: IntoIterator<Item = Result<Sample>>,
{
    let patch = model.config.vision_patch_size as u32;
    let (mut psnrs, mut ssims, mut lpipss) = (Vec::new(), Vec::new(), Vec::new());
    let (mut refs, mut recs) = (Vec::new(), Vec::new());
    let mut pending = Vec::new();
    let mut flush = |pending: &mut Vec<Tensor>| -> Result<()> {
        if pending.is_empty() {
            return Ok(());
        }
        let x = Tensor::stack(pending, 0).to_device(model.device());
        pending.clear();
        let y = tch::no_grad(|| -> Result<Tensor> {
            model.get_latents_decoded_images(&model.get_reconstruction_latents(&x)?)
        })?;
        let (x01, y01) = (denormalise(&x), denormalise(&y));
        psnrs.extend(Vec::<f64>::try_from(psnr(&x01, &y01).to_device(Device::Cpu))?);
        ssims.extend(Vec::<f64>::try_from(ssim(&x01, &y01).to_device(Device::Cpu))?);
        if let Some(l) = m.lpips {
            lpipss
                .extend(Vec::<f64>::try_from(l.distance01(&x01, &y01)?.to_kind(Kind::Double).to_device(Device::Cpu))?);
        }
        if m.inception.is_some() {
            for i in 0..x01.size()[0] {
                refs.push(as_uint8_image(&x01.get(i)).to_device(Device::Cpu));
                recs.push(as_uint8_image(&y01.get(i)).to_device(Device::Cpu));
            }
        }
        progress(psnrs.len());
        Ok(())
    };
    for sample in samples {
        let img = prepare_rgb(&sample?.image, patch, Fit::AdmCenterCrop(m.size))?;
        pending.push(Tensor::from_slice(&img.data).view([3, img.height as i64, img.width as i64]));
        if pending.len() == m.batch.max(1) {
            flush(&mut pending)?;
        }
    }
    flush(&mut pending)?;
    if psnrs.is_empty() {
        bail!("the source yielded no images");
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let rfid = match m.inception {
        Some(inc) if refs.len() >= 2 => Some(rfid(inc, &refs, &recs, m.batch)?),
        _ => None,
    };
    Ok(ReconResult {
        protocol: format!(
            "reconstruction §5.3: ADM centre crop {0}x{0}, f32, per-image PSNR/SSIM(torchmetrics)/LPIPS-VGG, \
             rFID(pytorch-fid Inception pool3, uint8-truncated images)",
            m.size
        ),
        n_images: psnrs.len(),
        psnr: mean(&psnrs),
        ssim: mean(&ssims),
        lpips: (!lpipss.is_empty()).then(|| mean(&lpipss)),
        rfid,
    })
}
