//! Image I/O for the tokenizer: decoding, fitting to a size the model accepts, ImageNet
//! normalisation (CHW `f32`) and PNG output (every PNG the crate writes goes through [`encode_png`]:
//! [`write_png`] for an RGB image, [`save_png`] for normalised values, [`save_grid01`] for tensors).
//!
//! Normalisation matches torchvision `ToTensor` + `Normalize` bit for bit (docs/design.md §1.6, §5).
//! Resampling for [`Fit::AdmCenterCrop`] re-implements Pillow's `Image.resize` (BOX and BICUBIC,
//! 8-bit fixed-point two-pass convolution of `libImaging/Resample.c`, horizontal pass first as in
//! Pillow 3.4–12.x), so it reproduces those Pillow versions' pixels exactly given the same decoded
//! input. Pillow 13 runs the vertical pass first when the height shrinks by more than twice as
//! many pixels as the width, which can move such pixels by one level.
//! Decoding uses the `image` crate: PNG is exact, but its JPEG decoder differs from the libjpeg
//! that PIL uses by a few levels in some pixels (chroma upsampling, IDCT).

use std::fs;
use std::io::Cursor;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use image::{imageops, ImageFormat, ImageReader, RgbImage};
use tch::{Device, Kind, Tensor};

/// ImageNet per-channel (RGB) mean (docs/design.md §1.6).
pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
/// ImageNet per-channel (RGB) standard deviation (docs/design.md §1.6).
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

/// File extensions (lower case) that [`list_images`] picks up.
const IMAGE_EXTENSIONS: [&str; 4] = ["png", "jpg", "jpeg", "webp"];

/// Fractional bits of Pillow's fixed-point resampling coefficients (`PRECISION_BITS`).
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// How an image is brought to a size the model accepts (H, W multiples of the patch size).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Fit {
    /// Centre-crop each side to the largest multiple of the patch size (torchvision
    /// `CenterCrop` offsets); no resampling.
    CropToMultiple,
    /// ADM / guided-diffusion `center_crop_arr(img, s)`: BOX halvings while the short side is at
    /// least `2s`, BICUBIC resize of the short side to `s`, then an `s`×`s` centre crop.
    /// `s` must be a multiple of the patch size.
    AdmCenterCrop(u32),
}

/// A decoded RGB image as CHW `f32`, ImageNet-normalised.
#[derive(Clone, Debug, PartialEq)]
pub struct ImageTensor {
    /// Channel-major values: `data[c * height * width + y * width + x]`.
    pub data: Vec<f32>,
    /// Height in pixels (a multiple of the patch size).
    pub height: usize,
    /// Width in pixels (a multiple of the patch size).
    pub width: usize,
}

/// Decodes the image at `path` (format sniffed from its content), converts it to RGB, fits it
/// with `fit` and normalises it.
pub fn load_image(path: &Path, patch: u32, fit: Fit) -> Result<ImageTensor> {
    let img = decode_rgb(path)?;
    prepare_named(&img, patch, fit, &format!("image '{}'", path.display()))
}

/// Fits an already decoded RGB image with `fit` and normalises it.
pub fn prepare_rgb(img: &RgbImage, patch: u32, fit: Fit) -> Result<ImageTensor> {
    prepare_named(img, patch, fit, "image")
}

/// De-normalises an ImageNet-normalised CHW image into 8-bit RGB: `x * std + mean`, clamped to
/// `[0, 1]`, scaled by 255 and **truncated** to `u8`, like the reference tools' `astype(uint8)`
/// (docs/design.md §5.3, §7.8).
pub fn to_rgb_image(chw_normalised: &[f32], height: usize, width: usize) -> Result<RgbImage> {
    let plane = height * width;
    if chw_normalised.len() != 3 * plane {
        bail!("expected 3x{height}x{width} = {} values, got {}", 3 * plane, chw_normalised.len());
    }
    let too_big = || anyhow!("size {width}x{height} is too large");
    let w = u32::try_from(width).map_err(|_| too_big())?;
    let h = u32::try_from(height).map_err(|_| too_big())?;
    RgbImage::from_raw(w, h, interleave_u8(chw_normalised, plane)).ok_or_else(too_big)
}

/// Writes an ImageNet-normalised CHW image as an 8-bit RGB PNG ([`to_rgb_image`], [`write_png`]).
pub fn save_png(path: &Path, chw_normalised: &[f32], height: usize, width: usize) -> Result<()> {
    let fail = |msg: String| anyhow!("cannot write PNG '{}': {msg}", path.display());
    let img = to_rgb_image(chw_normalised, height, width).map_err(|e| fail(e.to_string()))?;
    write_png(path, &img).map_err(|e| fail(one_line(&format!("{e:#}"))))
}

/// How a value in `[0, 1]` becomes an 8-bit level after scaling by 255.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Levels {
    /// Truncated, as the reference tools' `astype(uint8)`.
    Truncate,
    /// Rounded to the nearest level (exact for images already quantised to 8 bits).
    Round,
}

/// Writes rows of images `[N, 3, H, W]` in `[0, 1]` (one tensor per row) as one PNG grid, each value
/// scaled by 255 and brought to 8 bits by `levels` ([`write_png`]); one image `[3, H, W]` is the
/// grid `&[image.unsqueeze(0)]`.
pub fn save_grid01(path: &Path, rows: &[Tensor], levels: Levels) -> Result<()> {
    let (n, _, h, w) = rows[0].size4()?;
    let mut grid = RgbImage::new((n * w) as u32, (rows.len() as i64 * h) as u32);
    for (r, row) in rows.iter().enumerate() {
        let scaled = row.to_device(Device::Cpu).to_kind(Kind::Float) * 255.0;
        let pixels = match levels {
            Levels::Truncate => scaled,
            Levels::Round => scaled.round(),
        }
        .to_kind(Kind::Uint8);
        for i in 0..n {
            let bytes = Vec::<u8>::try_from(pixels.get(i).permute([1, 2, 0]).contiguous().view([-1]))?;
            let tile = RgbImage::from_raw(w as u32, h as u32, bytes).context("grid tile size")?;
            imageops::replace(&mut grid, &tile, i * w, r as i64 * h);
        }
    }
    write_png(path, &grid)
}

/// Writes an RGB image to `path` as PNG ([`encode_png`]), atomically, creating parent folders.
pub fn write_png(path: &Path, img: &RgbImage) -> Result<()> {
    crate::io::write_atomic(path, &encode_png(img)?)
}

/// The PNG file bytes of an RGB image (the `image` crate's default encoder settings).
pub fn encode_png(img: &RgbImage) -> Result<Vec<u8>> {
    let mut png = Vec::new();
    img.write_to(&mut Cursor::new(&mut png), ImageFormat::Png).context("cannot encode PNG")?;
    Ok(png)
}

/// Decodes encoded image bytes (format sniffed from the content) to RGB8; `None` when they do
/// not decode.
pub(crate) fn decode_image(bytes: &[u8]) -> Option<RgbImage> {
    image::load_from_memory(bytes).ok().map(|img| img.into_rgb8())
}

/// The images (`.png`, `.jpg`, `.jpeg`, `.webp`, any case) directly inside `dir`, sorted by path.
/// Sub-directories are not searched; an empty result is not an error.
pub fn list_images(dir: &Path) -> Result<Vec<PathBuf>> {
    let fail = |e: std::io::Error| anyhow!("cannot list directory '{}': {e}", dir.display());
    let mut images = Vec::new();
    for entry in fs::read_dir(dir).map_err(fail)? {
        let path = entry.map_err(fail)?.path();
        if path.is_file() && has_image_extension(&path) {
            images.push(path);
        }
    }
    images.sort();
    Ok(images)
}

/// Whether `path` ends in one of [`IMAGE_EXTENSIONS`] (case-insensitive).
fn has_image_extension(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}

/// Opens and decodes `path` as RGB8 (alpha dropped, grey replicated, like PIL `convert("RGB")`).
fn decode_rgb(path: &Path) -> Result<RgbImage> {
    let shown = path.display();
    let reader = ImageReader::open(path)
        .and_then(ImageReader::with_guessed_format)
        .map_err(|e| anyhow!("cannot read image '{shown}': {}", one_line(&e)))?;
    let img = reader.decode().map_err(|e| anyhow!("cannot decode image '{shown}': {}", one_line(&e)))?;
    Ok(img.into_rgb8())
}

/// A decoder's error message on one line, without control characters.
fn one_line(e: &dyn std::fmt::Display) -> String {
    let text: String = e.to_string().chars().map(|c| if c.is_control() { ' ' } else { c }).collect();
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// [`prepare_rgb`] with `name` (e.g. `image 'x.png'`) used in error messages.
fn prepare_named(img: &RgbImage, patch: u32, fit: Fit, name: &str) -> Result<ImageTensor> {
    if patch == 0 {
        bail!("cannot prepare {name}: patch size is 0");
    }
    let (w, h) = img.dimensions();
    if w == 0 || h == 0 {
        bail!("{name} is empty ({w}x{h})");
    }
    let fitted = match fit {
        Fit::CropToMultiple => crop_to_multiple(img, patch, name)?,
        Fit::AdmCenterCrop(size) => {
            if size == 0 || size % patch != 0 {
                bail!("cannot prepare {name}: crop size {size} is not a positive multiple of the patch size {patch}");
            }
            adm_center_crop(img, size)
        }
    };
    Ok(normalise(&fitted))
}

/// Centre-crops both sides down to the largest multiple of `patch`.
fn crop_to_multiple(img: &RgbImage, patch: u32, name: &str) -> Result<RgbImage> {
    let (w, h) = img.dimensions();
    if w < patch || h < patch {
        bail!("{name} is {w}x{h}, smaller than one {patch}x{patch} patch");
    }
    let (cw, ch) = (w - w % patch, h - h % patch);
    Ok(crop(img, centre_offset(w, cw), centre_offset(h, ch), cw, ch))
}

/// torchvision `CenterCrop` offset: `int(round((full - cropped) / 2.0))`, Python's
/// round-half-to-even included.
fn centre_offset(full: u32, cropped: u32) -> u32 {
    (f64::from(full - cropped) / 2.0).round_ties_even() as u32
}

/// Copies the `w`×`h` region at (`left`, `top`).
fn crop(img: &RgbImage, left: u32, top: u32, w: u32, h: u32) -> RgbImage {
    image::imageops::crop_imm(img, left, top, w, h).to_image()
}

/// ADM `center_crop_arr(img, size)` with Pillow's resampling (see the module doc).
pub fn adm_center_crop(img: &RgbImage, size: u32) -> RgbImage {
    let mut cur = img.clone();
    while u64::from(cur.width().min(cur.height())) >= 2 * u64::from(size) {
        cur = pil_resize(&cur, cur.width() / 2, cur.height() / 2, Filter::Box);
    }
    let (w, h) = cur.dimensions();
    let scale = f64::from(size) / f64::from(w.min(h));
    let scaled = |x: u32| (f64::from(x) * scale).round_ties_even() as u32;
    let cur = pil_resize(&cur, scaled(w), scaled(h), Filter::Bicubic);
    let (w, h) = cur.dimensions();
    let (left, top) = (w.saturating_sub(size) / 2, h.saturating_sub(size) / 2);
    crop(&cur, left, top, size, size)
}

/// The two Pillow resampling filters ADM uses.
#[derive(Clone, Copy, Debug)]
enum Filter {
    /// `Image.BOX`: support 0.5.
    Box,
    /// `Image.BICUBIC`: Keys cubic with `a = -0.5`, support 2.
    Bicubic,
}

impl Filter {
    /// Half-width of the filter in input pixels at scale 1.
    fn support(self) -> f64 {
        match self {
            Filter::Box => 0.5,
            Filter::Bicubic => 2.0,
        }
    }

    /// The filter's weight at offset `x` (Pillow's `box_filter` / `bicubic_filter`).
    fn weight(self, x: f64) -> f64 {
        const A: f64 = -0.5;
        match self {
            Filter::Box => f64::from(u8::from(x > -0.5 && x <= 0.5)),
            Filter::Bicubic => {
                let x = x.abs();
                if x < 1.0 {
                    ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
                } else if x < 2.0 {
                    (((x - 5.0) * x + 8.0) * x - 4.0) * A
                } else {
                    0.0
                }
            }
        }
    }
}

/// The input window and fixed-point weights of one output pixel along one axis.
struct Taps {
    /// First input index.
    start: usize,
    /// Weights scaled by `2^PRECISION_BITS` and rounded, one per input index from `start`.
    weights: Vec<i64>,
}

/// Pillow's `precompute_coeffs` + `normalize_coeffs_8bpc` for resizing `in_size` to `out_size`.
fn precompute_taps(in_size: u32, out_size: u32, filter: Filter) -> Vec<Taps> {
    let scale = f64::from(in_size) / f64::from(out_size);
    let filter_scale = scale.max(1.0);
    let support = filter.support() * filter_scale;
    let inv_filter_scale = 1.0 / filter_scale;
    (0..out_size)
        .map(|xx| {
            let center = (f64::from(xx) + 0.5) * scale;
            let start = ((center - support + 0.5) as i64).max(0);
            let end = ((center + support + 0.5) as i64).min(i64::from(in_size));
            let raw: Vec<f64> =
                (start..end).map(|x| filter.weight((x as f64 - center + 0.5) * inv_filter_scale)).collect();
            let total: f64 = raw.iter().sum();
            let weights = raw.iter().map(|&w| to_fixed(if total == 0.0 { w } else { w / total })).collect();
            Taps { start: start as usize, weights }
        })
        .collect()
}

/// Rounds a weight half away from zero to `PRECISION_BITS` fixed point (C `(int)(w*2^22 ± 0.5)`).
fn to_fixed(w: f64) -> i64 {
    let scaled = w * f64::from(1u32 << PRECISION_BITS);
    if w < 0.0 {
        (-0.5 + scaled) as i64
    } else {
        (0.5 + scaled) as i64
    }
}

/// Weighted sum of `values` in Pillow's 8-bit fixed point, with its rounding and clipping.
fn fixed_dot(values: impl Iterator<Item = u8>, weights: &[i64]) -> u8 {
    let acc = values.zip(weights).fold(1i64 << (PRECISION_BITS - 1), |acc, (v, &k)| acc + i64::from(v) * k);
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Pillow `Image.resize((w, h), filter)` for an RGB image: horizontal pass, then vertical pass,
/// each skipped when that dimension is unchanged; 8-bit intermediate.
fn pil_resize(img: &RgbImage, w: u32, h: u32, filter: Filter) -> RgbImage {
    let horizontal = if w == img.width() {
        img.clone()
    } else {
        let taps = precompute_taps(img.width(), w, filter);
        RgbImage::from_fn(w, img.height(), |x, y| {
            let t = &taps[x as usize];
            image::Rgb(std::array::from_fn(|c| {
                let row = (t.start..).map(|sx| img.get_pixel(sx as u32, y)[c]);
                fixed_dot(row, &t.weights)
            }))
        })
    };
    if h == horizontal.height() {
        return horizontal;
    }
    let taps = precompute_taps(horizontal.height(), h, filter);
    RgbImage::from_fn(w, h, |x, y| {
        let t = &taps[y as usize];
        image::Rgb(std::array::from_fn(|c| {
            let column = (t.start..).map(|sy| horizontal.get_pixel(x, sy as u32)[c]);
            fixed_dot(column, &t.weights)
        }))
    })
}

/// ToTensor + Normalize: `(v / 255 - mean) / std` in `f32`, laid out CHW.
fn normalise(img: &RgbImage) -> ImageTensor {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let plane = w * h;
    let mut data = vec![0.0f32; 3 * plane];
    for (i, px) in img.pixels().enumerate() {
        for (c, &v) in px.0.iter().enumerate() {
            data[c * plane + i] = (f32::from(v) / 255.0 - IMAGENET_MEAN[c]) / IMAGENET_STD[c];
        }
    }
    ImageTensor { data, height: h, width: w }
}

/// `x * std + mean` for `channel`, clamped to `[0, 1]`.
fn denormalise(x: f32, channel: usize) -> f32 {
    (x * IMAGENET_STD[channel] + IMAGENET_MEAN[channel]).clamp(0.0, 1.0)
}

/// CHW normalised values to interleaved RGB bytes, truncating like `astype(uint8)`.
fn interleave_u8(chw: &[f32], plane: usize) -> Vec<u8> {
    (0..plane).flat_map(|i| (0..3).map(move |c| (denormalise(chw[c * plane + i], c) * 255.0) as u8)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::Rgb;

    /// A deterministic, detailed test pattern (the same formula as the Pillow golden script).
    fn pattern(w: u32, h: u32) -> RgbImage {
        RgbImage::from_fn(w, h, |x, y| {
            let (x, y) = (u64::from(x), u64::from(y));
            Rgb([((x * 7 + y * 3) % 256) as u8, ((x * x + y * 5) % 256) as u8, ((x * y * 11 + 13) % 256) as u8])
        })
    }

    /// Normalised CHW back to interleaved HWC bytes (exact for values made by `normalise`).
    fn to_bytes(t: &ImageTensor) -> Vec<u8> {
        let plane = t.height * t.width;
        (0..plane)
            .flat_map(|i| {
                (0..3).map(move |c| {
                    let v = t.data[c * plane + i] * IMAGENET_STD[c] + IMAGENET_MEAN[c];
                    (v * 255.0).round() as u8
                })
            })
            .collect()
    }

    /// 64-bit FNV-1a hash.
    fn fnv1a(bytes: &[u8]) -> u64 {
        bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
    }

    #[test]
    fn normalisation_matches_torchvision_bits() {
        // f32 bit patterns of torch `x.float().div(255).sub(mean).div(std)` for x = 0, 1, 128, 255.
        let expected: [[u32; 4]; 3] = [
            [3221719997, 3221648171, 1033350962, 1074785821],
            [3221375268, 3221301839, 1045568328, 1075539383],
            [3219585033, 3219438826, 1054498108, 1076426179],
        ];
        let levels = [0u8, 1, 128, 255];
        let img = RgbImage::from_fn(16, 16, |x, _| {
            let v = levels[(x as usize).min(3)];
            Rgb([v, v, v])
        });
        let t = prepare_rgb(&img, 16, Fit::CropToMultiple).unwrap();
        for (c, row) in expected.iter().enumerate() {
            for (x, &bits) in row.iter().enumerate() {
                assert_eq!(t.data[c * 256 + x].to_bits(), bits, "channel {c} level {}", levels[x]);
            }
        }
    }

    #[test]
    fn centre_offsets_round_half_to_even_like_torchvision() {
        let cases = [(16, 0), (17, 0), (18, 1), (19, 2), (21, 2), (23, 4), (25, 4), (31, 8)];
        for (full, offset) in cases {
            assert_eq!(centre_offset(full, 16), offset, "full size {full}");
        }
    }

    #[test]
    fn crop_to_multiple_keeps_the_centre() {
        // 37x50 -> 32x48, left = round(2.5) = 2, top = round(1.0) = 1.
        let img = RgbImage::from_fn(37, 50, |x, y| Rgb([x as u8, y as u8, 0]));
        let t = prepare_rgb(&img, 16, Fit::CropToMultiple).unwrap();
        assert_eq!((t.width, t.height), (32, 48));
        assert_eq!(t.data.len(), 3 * 32 * 48);
        let bytes = to_bytes(&t);
        assert_eq!(&bytes[..2], &[2, 1]);
        let last = 3 * (32 * 48 - 1);
        assert_eq!(&bytes[last..last + 2], &[33, 48]);
    }

    #[test]
    fn adm_crop_has_the_requested_size() {
        for (w, h) in [(1, 5), (300, 200), (513, 1600), (1025, 513), (256, 256), (2000, 1100)] {
            let t = prepare_rgb(&pattern(w, h), 16, Fit::AdmCenterCrop(256)).unwrap();
            assert_eq!((t.width, t.height, t.data.len()), (256, 256, 3 * 256 * 256), "{w}x{h}");
        }
    }

    #[test]
    fn adm_crop_matches_pillow() {
        // FNV-1a of the HWC bytes of ADM `center_crop_arr(pattern(w, h), s)` under Pillow 12.3
        // (identical under 11.3; Pillow 13 differs on the last, tall case).
        let cases = [
            (70, 37, 16, 0x739c_09d7_4acd_925f),
            (23, 41, 32, 0x4631_6871_5721_fbe0),
            (67, 130, 32, 0xd5f5_3b34_4e18_3dae),
            (40, 200, 16, 0x5b1f_6382_1c4b_7023),
        ];
        for (w, h, s, hash) in cases {
            let t = prepare_rgb(&pattern(w, h), 16, Fit::AdmCenterCrop(s)).unwrap();
            assert_eq!(fnv1a(&to_bytes(&t)), hash, "{w}x{h} -> {s}");
        }
    }

    #[test]
    fn adm_crop_size_must_be_a_multiple_of_the_patch() {
        for size in [0, 100] {
            let err = prepare_rgb(&pattern(300, 300), 16, Fit::AdmCenterCrop(size)).unwrap_err();
            assert!(err.to_string().contains("not a positive multiple"), "{err}");
        }
    }

    #[test]
    fn save_then_load_is_within_one_level_and_truncates() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nested/out.png");
        let t = prepare_rgb(&pattern(48, 32), 16, Fit::CropToMultiple).unwrap();
        save_png(&path, &t.data, t.height, t.width).unwrap();
        let back = load_image(&path, 16, Fit::CropToMultiple).unwrap();
        assert_eq!((back.width, back.height), (48, 32));
        for (i, (a, b)) in to_bytes(&t).iter().zip(to_bytes(&back)).enumerate() {
            assert!(*a == b || *a == b + 1, "byte {i}: {a} saved as {b}");
        }
        // A value that de-normalises to 100.9 / 255 is written as 100, not 101.
        let plane = 16 * 16;
        let data: Vec<f32> =
            (0..3 * plane).map(|i| (100.9 / 255.0 - IMAGENET_MEAN[i / plane]) / IMAGENET_STD[i / plane]).collect();
        save_png(&path, &data, 16, 16).unwrap();
        let img = image::open(&path).unwrap().into_rgb8();
        assert!(img.pixels().all(|p| p.0 == [100, 100, 100]));
    }

    #[test]
    fn save_rejects_a_wrong_length() {
        let dir = tempfile::tempdir().unwrap();
        let err = save_png(&dir.path().join("x.png"), &[0.0; 10], 2, 2).unwrap_err();
        assert!(err.to_string().contains("expected 3x2x2 = 12 values, got 10"), "{err}");
    }

    #[test]
    fn grid_tiles_rows_and_chooses_the_levels() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("grid.png");
        // Two rows of two 1x1 images: 100.9 / 255 everywhere but the last image (its index / 255).
        let rows: Vec<Tensor> = (0..2)
            .map(|r| {
                Tensor::from_slice(&[100.9f32 / 255.0, (100 + r) as f32 / 255.0])
                    .view([2, 1, 1, 1])
                    .repeat([1, 3, 1, 1])
            })
            .collect();
        let levels_at = |levels| {
            save_grid01(&path, &rows, levels).unwrap();
            let img = image::open(&path).unwrap().into_rgb8();
            assert_eq!(img.dimensions(), (2, 2));
            img.pixels().map(|p| p.0[0]).collect::<Vec<u8>>()
        };
        assert_eq!(levels_at(Levels::Truncate)[0], 100);
        assert_eq!(levels_at(Levels::Round), [101, 100, 101, 101]);
        assert_eq!(decode_image(&encode_png(&pattern(5, 3)).unwrap()).unwrap(), pattern(5, 3));
    }

    #[test]
    fn tiny_image_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tiny.png");
        pattern(10, 12).save(&path).unwrap();
        let err = load_image(&path, 16, Fit::CropToMultiple).unwrap_err().to_string();
        assert!(err.contains("tiny.png"), "{err}");
        assert!(err.contains("is 10x12, smaller than one 16x16 patch"), "{err}");
    }

    #[test]
    fn corrupt_or_missing_file_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.png");
        fs::write(&path, b"\x89PNG\r\n\x1a\nthis is not really a png").unwrap();
        let err = load_image(&path, 16, Fit::CropToMultiple).unwrap_err().to_string();
        assert!(err.starts_with("cannot decode image '") && err.contains("bad.png"), "{err}");
        fs::write(&path, b"garbage bytes").unwrap();
        let err = load_image(&path, 16, Fit::CropToMultiple).unwrap_err().to_string();
        assert!(err.contains("bad.png") && !err.contains('\n'), "{err}");
        let missing = dir.path().join("missing.jpg");
        let err = load_image(&missing, 16, Fit::CropToMultiple).unwrap_err().to_string();
        assert!(err.starts_with("cannot read image '") && err.contains("missing.jpg"), "{err}");
    }

    #[test]
    fn list_images_filters_and_sorts() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["b.jpg", "a.PNG", "d.webp", "c.JPEG", "notes.txt", "noext"] {
            fs::write(dir.path().join(name), b"").unwrap();
        }
        fs::create_dir(dir.path().join("sub.png")).unwrap();
        fs::write(dir.path().join("sub.png/inner.png"), b"").unwrap();
        let names: Vec<String> = list_images(dir.path())
            .unwrap()
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["a.PNG", "b.jpg", "c.JPEG", "d.webp"]);
        let err = list_images(&dir.path().join("nope")).unwrap_err().to_string();
        assert!(err.starts_with("cannot list directory '") && err.contains("nope"), "{err}");
    }
}
