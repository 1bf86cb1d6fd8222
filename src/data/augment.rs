//! Per-branch augmentations on tensors (docs/design.md §4.2): the CLIP random-resized crop, DINOv2's
//! multi-crop (`dinov2/data/augmentations.py::DataAugmentationDINO`) and the reconstruction crop.
//!
//! Each transform is split in two: `sample` draws every random parameter from the caller's RNG
//! (never torch's global generator, so a seed and an image give the same crops on any thread;
//! [`sample_rng`] derives one stream per sample), and [`render_crops`] applies the drawn
//! parameters with libtorch ops on whatever device the image tensor lives on. Each operation follows
//! torchvision's tensor implementation (`transforms/_functional_tensor.py`): antialiased bicubic
//! `resized_crop`, `ColorJitter`'s four ops in random order, ITU-R 601-2 grayscale, reflect-padded
//! Gaussian blur, solarize; outputs are ImageNet-normalised `f32` (docs/design.md §1.6).
//! Differences from torchvision: values are clamped to `[0, 1]` after the bicubic resize (torchvision
//! clamps only `u8`), the blur runs as two 1-D passes (equal up to rounding), and the contrast mean
//! is accumulated in `f64` so that it does not depend on libtorch's thread count.
//!
//! Throughput: the crops of one image are small tensors, so parallelise over samples (e.g. rayon,
//! one [`sample_rng`] per sample) with libtorch's intra-op threads set to 1, rather than relying on
//! intra-op threading (about half the rate on 2 cores).

use image::RgbImage;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use tch::{Kind, Tensor};

use super::image::{IMAGENET_MEAN, IMAGENET_STD};

/// DINOv2 `global_crops_scale` (docs/design.md §4.2).
pub const DINO_GLOBAL_SCALE: (f64, f64) = (0.32, 1.0);
/// DINOv2 `local_crops_scale` (docs/design.md §4.2).
pub const DINO_LOCAL_SCALE: (f64, f64) = (0.05, 0.32);
/// OpenCLIP's training crop scale (docs/design.md §4.2).
pub const CLIP_SCALE: (f64, f64) = (0.9, 1.0);
/// torchvision `RandomResizedCrop` default aspect-ratio range.
pub const CROP_RATIO: (f64, f64) = (3.0 / 4.0, 4.0 / 3.0);
/// `RandomHorizontalFlip` probability of every flipped branch (docs/design.md §4.2).
pub const FLIP_P: f64 = 0.5;
/// `RandomSolarize(threshold=128)` on 8-bit images, as a fraction of full scale (docs/design.md §4.2).
pub const SOLARIZE_THRESHOLD: f64 = 128.0 / 255.0;
/// DINOv2 `GaussianBlur`: `kernel_size = 9` (docs/design.md §4.2).
pub const BLUR_KERNEL_SIZE: usize = 9;
/// DINOv2 `GaussianBlur`: `sigma ∈ [radius_min, radius_max] = [0.1, 2.0]` (docs/design.md §4.2).
pub const BLUR_SIGMA: (f64, f64) = (0.1, 2.0);
/// torchvision `RandomResizedCrop.get_params`: attempts before the central-crop fallback.
const CROP_ATTEMPTS: usize = 10;
/// ITU-R 601-2 luma weights of torchvision `rgb_to_grayscale`.
const LUMA: [f64; 3] = [0.2989, 0.587, 0.114];

/// The RNG of sample `index` under `seed`: ChaCha8 seeded with `seed`, stream `index`. Samples get
/// independent streams, so a sample's augmentation does not depend on which thread draws it.
pub fn sample_rng(seed: u64, index: u64) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(index);
    rng
}

/// A decoded image as a `[3, H, W]` `u8` tensor (one copy of the pixels, viewed channel-first).
pub fn rgb_tensor(img: &RgbImage) -> Tensor {
    let (w, h) = img.dimensions();
    Tensor::from_slice(img.as_raw()).view([i64::from(h), i64::from(w), 3]).permute([2, 0, 1])
}

/// A crop rectangle in source pixels (torchvision's `(i, j, h, w)`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CropBox {
    pub top: u32,
    pub left: u32,
    pub height: u32,
    pub width: u32,
}

/// torchvision `RandomResizedCrop(size, scale, ratio, BICUBIC)` (docs/design.md §4.2).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RandomResizedCrop {
    /// Output side in pixels.
    pub size: i64,
    /// Range of the crop's area as a fraction of the image's.
    pub scale: (f64, f64),
    /// Range of the crop's aspect ratio `w / h`, sampled log-uniformly.
    pub ratio: (f64, f64),
}

impl RandomResizedCrop {
    /// A square `size` crop with `scale` and torchvision's default ratio `(3/4, 4/3)`.
    pub fn new(size: i64, scale: (f64, f64)) -> Self {
        Self { size, scale, ratio: CROP_RATIO }
    }

    /// torchvision `RandomResizedCrop.get_params` for a `width`×`height` image: up to 10 draws of
    /// (area, log-uniform ratio), else the central crop clipped to the ratio range.
    pub fn sample_box(&self, width: u32, height: u32, rng: &mut impl Rng) -> CropBox {
        let area = f64::from(width) * f64::from(height);
        let log_ratio = (self.ratio.0.ln(), self.ratio.1.ln());
        for _ in 0..CROP_ATTEMPTS {
            let target_area = area * uniform(rng, self.scale);
            let aspect = uniform(rng, log_ratio).exp();
            let w = (target_area * aspect).sqrt().round_ties_even() as u32;
            let h = (target_area / aspect).sqrt().round_ties_even() as u32;
            if (1..=width).contains(&w) && (1..=height).contains(&h) {
                let top = rng.random_range(0..=height - h);
                let left = rng.random_range(0..=width - w);
                return CropBox { top, left, height: h, width: w };
            }
        }
        self.central_box(width, height)
    }

    /// The fallback of `get_params`: the whole image, narrowed to the nearest allowed ratio.
    fn central_box(&self, width: u32, height: u32) -> CropBox {
        let in_ratio = f64::from(width) / f64::from(height);
        let (min_ratio, max_ratio) = (self.ratio.0.min(self.ratio.1), self.ratio.0.max(self.ratio.1));
        let (w, h) = if in_ratio < min_ratio {
            (width, (f64::from(width) / min_ratio).round_ties_even() as u32)
        } else if in_ratio > max_ratio {
            ((f64::from(height) * max_ratio).round_ties_even() as u32, height)
        } else {
            (width, height)
        };
        CropBox { top: (height - h) / 2, left: (width - w) / 2, height: h, width: w }
    }
}

/// One of the four `ColorJitter` operations.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JitterOp {
    Brightness,
    Contrast,
    Saturation,
    Hue,
}

impl JitterOp {
    /// torchvision's `fn_idx` numbering.
    pub const ALL: [JitterOp; 4] = [JitterOp::Brightness, JitterOp::Contrast, JitterOp::Saturation, JitterOp::Hue];

    /// torchvision `adjust_*` on a `[K, 3, H, W]` batch in `[0, 1]`, one factor per row.
    fn apply(self, batch: &Tensor, factors: &[f64]) -> Tensor {
        match self {
            JitterOp::Brightness => (batch * row_factors(factors, batch)).clamp(0.0, 1.0),
            JitterOp::Contrast => {
                let mean = luma(batch).mean_dim([-3i64, -2, -1].as_slice(), true, Kind::Double).to_kind(Kind::Float);
                blend(batch, &mean, factors)
            }
            JitterOp::Saturation => blend(batch, &luma(batch), factors),
            JitterOp::Hue => adjust_hue(batch, &row_factors(factors, batch)),
        }
    }
}

/// The drawn parameters of one `ColorJitter` call: the order of the ops and their factors.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct JitterParams {
    /// torchvision `fn_idx`: a random permutation of the four ops.
    pub order: [JitterOp; 4],
    pub brightness: f64,
    pub contrast: f64,
    pub saturation: f64,
    /// Shift of the hue, as a fraction of the colour circle.
    pub hue: f64,
}

impl JitterParams {
    /// The factor this draw uses for `op`.
    pub fn factor(&self, op: JitterOp) -> f64 {
        match op {
            JitterOp::Brightness => self.brightness,
            JitterOp::Contrast => self.contrast,
            JitterOp::Saturation => self.saturation,
            JitterOp::Hue => self.hue,
        }
    }
}

/// torchvision `ColorJitter(brightness, contrast, saturation, hue)`: factors uniform in
/// `[max(0, 1 - s), 1 + s]` for the first three, hue shift uniform in `[-hue, hue]`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ColorJitter {
    pub brightness: f64,
    pub contrast: f64,
    pub saturation: f64,
    pub hue: f64,
}

impl ColorJitter {
    /// DINOv2's `ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)` (docs/design.md §4.2).
    pub const DINOV2: ColorJitter = ColorJitter { brightness: 0.4, contrast: 0.4, saturation: 0.2, hue: 0.1 };

    /// The sampling range of `op`'s factor.
    pub fn range(&self, op: JitterOp) -> (f64, f64) {
        let around_one = |s: f64| ((1.0 - s).max(0.0), 1.0 + s);
        match op {
            JitterOp::Brightness => around_one(self.brightness),
            JitterOp::Contrast => around_one(self.contrast),
            JitterOp::Saturation => around_one(self.saturation),
            JitterOp::Hue => (-self.hue, self.hue),
        }
    }

    /// torchvision `ColorJitter.get_params`: a random op order, then the four factors.
    pub fn sample(&self, rng: &mut impl Rng) -> JitterParams {
        let mut order = JitterOp::ALL;
        order.shuffle(rng);
        let [brightness, contrast, saturation, hue] = JitterOp::ALL.map(|op| uniform(rng, self.range(op)));
        JitterParams { order, brightness, contrast, saturation, hue }
    }
}

/// The drawn colour, blur and solarize parameters of one crop; the default changes nothing.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct PhotometricParams {
    /// `Some` when the `RandomApply(ColorJitter)` fired.
    pub jitter: Option<JitterParams>,
    pub grayscale: bool,
    /// The blur's sigma when the blur fired.
    pub blur_sigma: Option<f64>,
    pub solarize: bool,
}

/// DINOv2's colour distortions of one crop kind: `RandomApply(ColorJitter, jitter_p)`,
/// `RandomGrayscale(grayscale_p)`, Gaussian blur with `blur_p`, `RandomSolarize(128, solarize_p)`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Photometric {
    pub jitter: ColorJitter,
    pub jitter_p: f64,
    pub grayscale_p: f64,
    /// Probability that the blur is applied. docs/design.md §4.2 gives 1.0 / 0.1 / 0.5 (global 1 / global 2 /
    /// locals); DINOv2's code passes `1 - p` to `RandomApply`, so its effective values are 0.0 / 0.9 / 0.5
    /// (facebookresearch/dinov2 PR #411).
    pub blur_p: f64,
    pub solarize_p: f64,
}

impl Photometric {
    /// DINOv2's jitter (p 0.8) and grayscale (p 0.2) with the given blur and solarize probabilities.
    pub fn dinov2(blur_p: f64, solarize_p: f64) -> Self {
        Self { jitter: ColorJitter::DINOV2, jitter_p: 0.8, grayscale_p: 0.2, blur_p, solarize_p }
    }

    /// Draws the parameters in DINOv2's order (jitter, grayscale, blur, solarize).
    pub fn sample(&self, rng: &mut impl Rng) -> PhotometricParams {
        let jitter = chance(rng, self.jitter_p).then(|| self.jitter.sample(rng));
        let grayscale = chance(rng, self.grayscale_p);
        let blur_sigma = chance(rng, self.blur_p).then(|| uniform(rng, BLUR_SIGMA));
        let solarize = chance(rng, self.solarize_p);
        PhotometricParams { jitter, grayscale, blur_sigma, solarize }
    }
}

/// The drawn parameters of one output crop.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CropParams {
    /// Source rectangle, resized to the output size.
    pub crop: CropBox,
    /// Horizontal flip after the resize.
    pub flip: bool,
    pub photometric: PhotometricParams,
}

/// A crop-producing augmentation: parameters drawn from the caller's RNG, then rendered.
pub trait Augment {
    /// Side of the square output.
    fn size(&self) -> i64;

    /// Draws the parameters for a `width`×`height` image.
    fn sample(&self, width: u32, height: u32, rng: &mut impl Rng) -> CropParams;

    /// Draws and renders one crop of `img`: `[3, S, S]` `f32`, ImageNet-normalised.
    fn apply(&self, img: &RgbImage, rng: &mut impl Rng) -> Tensor {
        let params = self.sample(img.width(), img.height(), rng);
        render_crops(&rgb_tensor(img), &[params], self.size()).squeeze_dim(0)
    }
}

/// One DINOv2 crop kind: random-resized crop, horizontal flip, then [`Photometric`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CropRecipe {
    pub crop: RandomResizedCrop,
    pub flip_p: f64,
    pub photometric: Photometric,
}

impl Augment for CropRecipe {
    fn size(&self) -> i64 {
        self.crop.size
    }

    fn sample(&self, width: u32, height: u32, rng: &mut impl Rng) -> CropParams {
        let crop = self.crop.sample_box(width, height, rng);
        let flip = chance(rng, self.flip_p);
        CropParams { crop, flip, photometric: self.photometric.sample(rng) }
    }
}

/// The CLIP branch (docs/design.md §4.2, OpenCLIP): `RandomResizedCrop(size, scale=(0.9, 1.0), bicubic)`, nothing else.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ClipCrop {
    pub crop: RandomResizedCrop,
}

impl ClipCrop {
    /// OpenCLIP's training crop at `size` with [`CLIP_SCALE`].
    pub fn new(size: i64) -> Self {
        Self { crop: RandomResizedCrop::new(size, CLIP_SCALE) }
    }
}

impl Augment for ClipCrop {
    fn size(&self) -> i64 {
        self.crop.size
    }

    fn sample(&self, width: u32, height: u32, rng: &mut impl Rng) -> CropParams {
        let crop = self.crop.sample_box(width, height, rng);
        CropParams { crop, flip: false, photometric: PhotometricParams::default() }
    }
}

/// The reconstruction branch (docs/design.md §4.2, "centre/random crop to 256"): a square of the short side at a
/// uniformly random offset along the long side, bicubic-resized to `size`, flipped with `flip_p`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ReconCrop {
    pub size: i64,
    pub flip_p: f64,
}

impl ReconCrop {
    /// A `size` crop with a horizontal flip of probability 0.5.
    pub fn new(size: i64) -> Self {
        Self { size, flip_p: FLIP_P }
    }
}

impl Augment for ReconCrop {
    fn size(&self) -> i64 {
        self.size
    }

    fn sample(&self, width: u32, height: u32, rng: &mut impl Rng) -> CropParams {
        let side = width.min(height);
        let top = rng.random_range(0..=height - side);
        let left = rng.random_range(0..=width - side);
        let flip = chance(rng, self.flip_p);
        let crop = CropBox { top, left, height: side, width: side };
        CropParams { crop, flip, photometric: PhotometricParams::default() }
    }
}

/// DINOv2 `DataAugmentationDINO` (docs/design.md §4.2): two global crops and `n_local` local crops per image.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DinoMultiCrop {
    /// Global crop 1 (blur p 1.0) and global crop 2 (blur p 0.1, solarize p 0.2).
    pub global: [CropRecipe; 2],
    /// Every local crop (blur p 0.5).
    pub local: CropRecipe,
    pub n_local: usize,
}

/// The drawn parameters of one image's multi-crop.
#[derive(Clone, Debug, PartialEq)]
pub struct MultiCropParams {
    pub global: [CropParams; 2],
    pub local: Vec<CropParams>,
}

/// One image's multi-crop: ImageNet-normalised `f32` crops and the parameters that made them.
#[derive(Debug)]
pub struct MultiCropOutput {
    /// `[2, 3, G, G]`.
    pub global: Tensor,
    /// `[n_local, 3, L, L]`.
    pub local: Tensor,
    pub params: MultiCropParams,
}

impl DinoMultiCrop {
    /// DINOv2's recipe with `global` and `local` crop sides (docs/design.md §4.2: 224 or 256, 96) and `n_local`
    /// local crops (8): scales [`DINO_GLOBAL_SCALE`] / [`DINO_LOCAL_SCALE`], flip 0.5, jitter 0.8,
    /// grayscale 0.2, blur 1.0 / 0.1 / 0.5, solarize 0.2 on global crop 2.
    pub fn dinov2(global: i64, local: i64, n_local: usize) -> Self {
        let recipe = |size, scale, blur_p, solarize_p| CropRecipe {
            crop: RandomResizedCrop::new(size, scale),
            flip_p: FLIP_P,
            photometric: Photometric::dinov2(blur_p, solarize_p),
        };
        Self {
            global: [recipe(global, DINO_GLOBAL_SCALE, 1.0, 0.0), recipe(global, DINO_GLOBAL_SCALE, 0.1, 0.2)],
            local: recipe(local, DINO_LOCAL_SCALE, 0.5, 0.0),
            n_local,
        }
    }

    /// Draws every crop's parameters for a `width`×`height` image, in DINOv2's order (global 1,
    /// global 2, locals).
    pub fn sample(&self, width: u32, height: u32, rng: &mut impl Rng) -> MultiCropParams {
        let global = [self.global[0].sample(width, height, rng), self.global[1].sample(width, height, rng)];
        let local = (0..self.n_local).map(|_| self.local.sample(width, height, rng)).collect();
        MultiCropParams { global, local }
    }

    /// Draws and renders the multi-crop of `img` on the CPU.
    pub fn apply(&self, img: &RgbImage, rng: &mut impl Rng) -> MultiCropOutput {
        let params = self.sample(img.width(), img.height(), rng);
        self.render(&rgb_tensor(img), params)
    }

    /// Renders drawn parameters from a `[3, H, W]` image tensor (`u8`, or float in `[0, 1]`) on its device.
    pub fn render(&self, image: &Tensor, params: MultiCropParams) -> MultiCropOutput {
        let global = render_crops(image, &params.global, self.global[0].size());
        let local = render_crops(image, &params.local, self.local.size());
        MultiCropOutput { global, local, params }
    }

    /// The multi-crops of many images, each drawn from its own generator, collated crop-major: the
    /// same tensors as [`collate_multicrop`] of each image's [`DinoMultiCrop::apply`], faster. The
    /// crops are cut per image (in parallel on rayon's pool); the photometric ops and the
    /// normalisation then run once over all global and once over all local crops (two tasks), a few
    /// hundred launches on larger tensors instead of as many per image.
    pub fn apply_batch<R: Rng + Send>(&self, images: Vec<(&RgbImage, R)>) -> (Tensor, Tensor) {
        let cut: Vec<(Tensor, Tensor, MultiCropParams)> = images
            .into_par_iter()
            .map(|(img, mut rng)| {
                let params = self.sample(img.width(), img.height(), &mut rng);
                let image = rgb_tensor(img);
                let global = cut_crops(&image, &params.global, self.global[0].size());
                let local = cut_crops(&image, &params.local, self.local.size());
                (global, local, params)
            })
            .collect();
        let global = crop_major(cut.iter().map(|(g, _, _)| g).collect());
        let local = crop_major(cut.iter().map(|(_, l, _)| l).collect());
        let params: Vec<&MultiCropParams> = cut.iter().map(|(_, _, p)| p).collect();
        let by_crop = |crops: fn(&MultiCropParams) -> &[CropParams], count: usize| -> Vec<PhotometricParams> {
            (0..count).flat_map(|c| params.iter().map(move |p| crops(p)[c].photometric)).collect()
        };
        let (global_photometric, local_photometric) = (by_crop(|p| &p.global, 2), by_crop(|p| &p.local, self.n_local));
        rayon::join(
            move || finish_crops(&global, &global_photometric),
            move || finish_crops(&local, &local_photometric),
        )
    }
}

/// Collates per-image multi-crops crop-major (docs/design.md §4.2): global `[2B, 3, G, G]` (all first crops,
/// then all second crops) and local `[n_local·B, 3, L, L]`.
///
/// # Panics
/// If `samples` is empty or their crops differ in shape.
pub fn collate_multicrop(samples: &[MultiCropOutput]) -> (Tensor, Tensor) {
    let global = crop_major(samples.iter().map(|s| &s.global).collect());
    let local = crop_major(samples.iter().map(|s| &s.local).collect());
    (global, local)
}

/// Per-image `[K, 3, S, S]` crops as one `[K·B, 3, S, S]` batch: all first crops, then all second crops, …
fn crop_major(crops: Vec<&Tensor>) -> Tensor {
    let stacked = Tensor::stack(&crops, 1);
    let size = stacked.size();
    stacked.reshape([size[0] * size[1], size[2], size[3], size[4]])
}

/// Renders crops of one image: resized crop, flip, photometric ops, ImageNet normalisation.
/// `image` is `[3, H, W]`, `u8` or float in `[0, 1]`; the result is `[K, 3, size, size]` `f32` on its device.
pub fn render_crops(image: &Tensor, params: &[CropParams], size: i64) -> Tensor {
    let photometric: Vec<PhotometricParams> = params.iter().map(|p| p.photometric).collect();
    finish_crops(&cut_crops(image, params, size), &photometric)
}

/// The geometric half of [`render_crops`]: each crop resized and flipped, `[K, 3, size, size]` in `[0, 1]`.
fn cut_crops(image: &Tensor, params: &[CropParams], size: i64) -> Tensor {
    let crops: Vec<Tensor> = params
        .iter()
        .map(|p| {
            let crop = resized_crop(image, p.crop, size);
            if p.flip {
                crop.flip([-1])
            } else {
                crop
            }
        })
        .collect();
    Tensor::stack(&crops, 0)
}

/// The photometric half of [`render_crops`]: each row's photometric ops, then ImageNet normalisation.
fn finish_crops(crops: &Tensor, photometric: &[PhotometricParams]) -> Tensor {
    normalise(&apply_photometric(crops, photometric))
}

/// torchvision `resized_crop(img, i, j, h, w, [size, size], BICUBIC, antialias=True)` on `[3, H, W]`,
/// clamped to `[0, 1]`: `[3, size, size]` `f32`.
pub fn resized_crop(image: &Tensor, crop: CropBox, size: i64) -> Tensor {
    let [top, left, height, width] = [crop.top, crop.left, crop.height, crop.width].map(i64::from);
    let region = image.narrow(1, top, height).narrow(2, left, width);
    let unit = if region.kind() == Kind::Uint8 { region.to_kind(Kind::Float) / 255.0 } else { region };
    let mut resized = unit.unsqueeze(0).internal_upsample_bicubic2d_aa([size, size], false, None, None);
    let _ = resized.clamp_(0.0, 1.0);
    resized.squeeze_dim(0)
}

/// Applies per-row photometric parameters to a `[K, 3, H, W]` batch in `[0, 1]`, in DINOv2's order:
/// colour jitter, grayscale, blur, solarize. Rows sharing an operation are processed together.
pub fn apply_photometric(batch: &Tensor, params: &[PhotometricParams]) -> Tensor {
    let x = color_jitter(batch, params);
    let x = on_rows(&x, rows_where(params, |p| p.grayscale), grayscale);
    let (blurred, sigmas): (Vec<i64>, Vec<f64>) =
        params.iter().enumerate().filter_map(|(i, p)| p.blur_sigma.map(|s| (i as i64, s))).unzip();
    let x = on_rows(&x, blurred, |sub| gaussian_blur(sub, &sigmas));
    on_rows(&x, rows_where(params, |p| p.solarize), solarize)
}

/// `ColorJitter` with per-row op orders: at each of the 4 steps, the rows whose op at that step is
/// `op` get `op` with their factors.
fn color_jitter(batch: &Tensor, params: &[PhotometricParams]) -> Tensor {
    (0..JitterOp::ALL.len()).fold(batch.shallow_clone(), |x, step| {
        let groups = JitterOp::ALL
            .into_iter()
            .map(|op| {
                let (rows, factors): (Vec<i64>, Vec<f64>) = params
                    .iter()
                    .enumerate()
                    .filter_map(|(i, p)| p.jitter.filter(|j| j.order[step] == op).map(|j| (i as i64, j.factor(op))))
                    .unzip();
                RowGroup { rows, op: Box::new(move |sub: &Tensor| op.apply(sub, &factors)) }
            })
            .collect();
        on_row_groups(&x, groups)
    })
}

/// torchvision `rgb_to_grayscale(img, num_output_channels=3)` on a `[K, 3, H, W]` batch.
pub fn grayscale(batch: &Tensor) -> Tensor {
    luma(batch).repeat([1, 3, 1, 1])
}

/// torchvision `solarize(img, 128/255)` for float images: `1 - x` where `x >= threshold`, computed
/// as `|x - m|` with the exact 0 / 1 mask `m = clamp(sign(x - threshold) + 1, 0, 1)` (no slow `where`).
pub fn solarize(batch: &Tensor) -> Tensor {
    let inverted = ((batch - SOLARIZE_THRESHOLD).sign() + 1.0).clamp(0.0, 1.0);
    (batch - inverted).abs()
}

/// torchvision `gaussian_blur(img, [9, 9], [σ, σ])` on a `[K, 3, H, W]` batch with one σ per row:
/// reflect padding by 4, then the normalised 1-D Gaussian along the width and along the height.
/// Crops must be at least 5 pixels on each side (reflect padding).
pub fn gaussian_blur(batch: &Tensor, sigmas: &[f64]) -> Tensor {
    let size = batch.size();
    let (rows, channels) = (size[0], size[1]);
    let taps = BLUR_KERNEL_SIZE as i64;
    let kernels: Vec<f32> = sigmas.iter().flat_map(|&s| gaussian_kernel(s)).collect();
    let kernels = Tensor::from_slice(&kernels).to_device(batch.device()).view([rows, 1, taps]);
    let kernels = kernels.repeat_interleave_self_int(channels, 0, None);
    let pad = taps / 2;
    let planes = batch.reflection_pad2d([pad, pad, pad, pad]).reshape([1, rows * channels, -1, size[3] + 2 * pad]);
    let groups = rows * channels;
    let conv = |x: &Tensor, kernel: &Tensor| x.conv2d(kernel, None::<Tensor>, [1, 1], [0, 0], [1, 1], groups);
    let wide = conv(&planes, &kernels.view([groups, 1, 1, taps]));
    conv(&wide, &kernels.view([groups, 1, taps, 1])).view([rows, channels, size[2], size[3]])
}

/// torchvision `_get_gaussian_kernel1d(9, σ)` in `f32`: `exp(-x²/2σ²)` at `x = -4..=4`, normalised.
fn gaussian_kernel(sigma: f64) -> [f32; BLUR_KERNEL_SIZE] {
    let sigma = sigma as f32;
    let half = (BLUR_KERNEL_SIZE / 2) as f32;
    let pdf: [f32; BLUR_KERNEL_SIZE] = std::array::from_fn(|i| (-0.5 * ((i as f32 - half) / sigma).powi(2)).exp());
    let total: f32 = pdf.iter().sum();
    pdf.map(|p| p / total)
}

/// torchvision `Normalize(IMAGENET_MEAN, IMAGENET_STD)`: `(x - mean) / std` per channel.
fn normalise(batch: &Tensor) -> Tensor {
    let device = batch.device();
    let mean = Tensor::from_slice(&IMAGENET_MEAN).to_device(device).view([3, 1, 1]);
    let std = Tensor::from_slice(&IMAGENET_STD).to_device(device).view([3, 1, 1]);
    let mut centred = batch - mean;
    centred /= std;
    centred
}

/// torchvision `rgb_to_grayscale(img, 1)`: `0.2989 r + 0.587 g + 0.114 b`, `[K, 1, H, W]`.
fn luma(batch: &Tensor) -> Tensor {
    let channel = |c: usize| batch.narrow(1, c as i64, 1) * LUMA[c];
    channel(0) + channel(1) + channel(2)
}

/// torchvision `_blend(img, other, ratio)` with one ratio per row: `(r·img + (1 - r)·other).clamp(0, 1)`.
fn blend(batch: &Tensor, other: &Tensor, ratios: &[f64]) -> Tensor {
    let complements: Vec<f64> = ratios.iter().map(|r| 1.0 - r).collect();
    (batch * row_factors(ratios, batch) + other * row_factors(&complements, batch)).clamp(0.0, 1.0)
}

/// torchvision `adjust_hue`: RGB → HSV, `h = (h + shift) mod 1`, HSV → RGB; `shift` is `[K, 1, 1, 1]`.
fn adjust_hue(batch: &Tensor, shift: &Tensor) -> Tensor {
    let (h, s, v) = rgb_to_hsv(batch);
    hsv_to_rgb(&fraction(&(h + shift)), &s, &v)
}

/// `x mod 1` for `x > -1`: `x - floor(x)`, which equals torch's `fmod(x, 1)` / `remainder(x, 1)` there
/// bit for bit (the subtraction is exact, or is the same rounded `x + 1`) and is much faster.
fn fraction(x: &Tensor) -> Tensor {
    x - x.floor()
}

/// torchvision `_rgb2hsv` on `[K, 3, H, W]`: hue, saturation and value planes, each `[K, 1, H, W]`.
///
/// The same arithmetic, with its `where` / boolean masks written as `{0, 1}` float masks from
/// `sign` of non-negative differences and `maximum` (libtorch's `where` is ~20× slower on the CPU).
fn rgb_to_hsv(batch: &Tensor) -> (Tensor, Tensor, Tensor) {
    let maxc = batch.amax([1], true);
    let minc = batch.amin([1], true);
    let cr = &maxc - &minc;
    // 1 where max == min (grey pixels), else 0; torchvision then divides by 1 instead of max / cr.
    let grey = cr.sign().rsub_scalar(1.0);
    let s = &cr / maxc.maximum(&grey);
    let gaps = &maxc - batch;
    let distances = &gaps / cr.maximum(&grey);
    let (rc, gc, bc) = (distances.narrow(1, 0, 1), distances.narrow(1, 1, 1), distances.narrow(1, 2, 1));
    // `maxc != c` as 0 / 1 per channel.
    let below = gaps.sign();
    let (below_r, below_g) = (below.narrow(1, 0, 1), below.narrow(1, 1, 1));
    let hr = below_r.rsub_scalar(1.0) * (&bc - &gc);
    let hg = below_g.rsub_scalar(1.0) * &below_r * ((&rc + 2.0) - &bc);
    let hb = below_g * &below_r * ((gc + 4.0) - &rc);
    (fraction(&((hr + hg + hb) / 6.0 + 1.0)), s, maxc)
}

/// Channel `c` of torchvision `_hsv2rgb` reads r's sector table `(v, q, p, p, t, v)` at sector
/// `floor(6h) + HSV_CHANNEL_SHIFT[c]` (mod 6): g's table `(t, v, v, q, p, p)` and b's `(p, p, t, v, v, q)`
/// are r's rotated.
const HSV_CHANNEL_SHIFT: [f32; 3] = [0.0, 4.0, 2.0];

/// torchvision `_hsv2rgb`. Each channel is `clamp(v · (1 - s · a))` with `a` = 0 (v), `f` (q), 1 (p)
/// or `1 - f` (t), which evaluates exactly torchvision's `v`, `q`, `p`, `t`; `a` is selected with
/// `min` / `max` / `{0, 1}` factors, which return their operands exactly, instead of a one-hot `einsum`.
fn hsv_to_rgb(h: &Tensor, s: &Tensor, v: &Tensor) -> Tensor {
    let h6 = h * 6.0;
    let sector = h6.floor();
    let f = &h6 - &sector;
    let shift = Tensor::from_slice(&HSV_CHANNEL_SHIFT).to_device(v.device()).view([1, 3, 1, 1]);
    let k = sector + shift;
    let k = &k - (&k / 6.0).floor() * 6.0;
    let amount = sector_amount(&k, &f);
    (v * (s * amount).rsub_scalar(1.0)).clamp(0.0, 1.0)
}

/// For integer sectors `k` in `0..6` of r's table `(v, q, p, p, t, v)`: `0, f, 1, 1, 1 - f, 0`.
fn sector_amount(k: &Tensor, f: &Tensor) -> Tensor {
    // clamp(x, lo, hi) = min(max(x, lo), hi) with 0 / 1 bounds [k >= 2], [k >= 1] (rising: 0, f, 1, 1, 1, 1)
    // and [k <= 3], [k <= 4] (falling: 1, 1, 1, 1, 1 - f, 0).
    let rising = f.clamp_tensor(Some((k - 1.0).clamp(0.0, 1.0)), Some(k.clamp(0.0, 1.0)));
    let at_most = |n: f64| k.rsub_scalar(n + 1.0).clamp(0.0, 1.0);
    let falling = f.rsub_scalar(1.0).clamp_tensor(Some(at_most(3.0)), Some(at_most(4.0)));
    rising.minimum(&falling)
}

/// `values` as a `[K, 1, 1, 1]` `f32` tensor on `like`'s device.
fn row_factors(values: &[f64], like: &Tensor) -> Tensor {
    Tensor::from_slice(values).to_kind(Kind::Float).to_device(like.device()).view([-1, 1, 1, 1])
}

/// An operation on some rows of a batch.
struct RowGroup<'a> {
    /// Ascending row indices.
    rows: Vec<i64>,
    op: Box<dyn FnOnce(&Tensor) -> Tensor + 'a>,
}

/// Applies each group's operation to its rows (groups are disjoint) and leaves the other rows
/// unchanged. The result is assembled with one `cat` (libtorch's CPU `index_copy` is slow).
fn on_row_groups(batch: &Tensor, groups: Vec<RowGroup>) -> Tensor {
    let n = batch.size()[0];
    let mut groups: Vec<RowGroup> = groups.into_iter().filter(|g| !g.rows.is_empty()).collect();
    match groups.as_slice() {
        [] => return batch.shallow_clone(),
        [only] if only.rows.len() as i64 == n => return (groups.remove(0).op)(batch),
        _ => {}
    }
    let mut rows: Vec<Tensor> = (0..n).map(|i| batch.narrow(0, i, 1)).collect();
    for group in groups {
        let index = Tensor::from_slice(&group.rows).to_device(batch.device());
        let done = (group.op)(&batch.index_select(0, &index));
        for (j, &row) in group.rows.iter().enumerate() {
            rows[row as usize] = done.narrow(0, j as i64, 1);
        }
    }
    Tensor::cat(&rows, 0)
}

/// Applies `op` to the rows `rows` (ascending) of `batch` and leaves the other rows unchanged.
fn on_rows<'a>(batch: &Tensor, rows: Vec<i64>, op: impl FnOnce(&Tensor) -> Tensor + 'a) -> Tensor {
    on_row_groups(batch, vec![RowGroup { rows, op: Box::new(op) }])
}

/// The indices of the rows whose parameters satisfy `pred`.
fn rows_where(params: &[PhotometricParams], pred: impl Fn(&PhotometricParams) -> bool) -> Vec<i64> {
    params.iter().enumerate().filter(|(_, p)| pred(p)).map(|(i, _)| i as i64).collect()
}

/// `U(a, b)` as Python's `random.uniform`.
fn uniform(rng: &mut impl Rng, (a, b): (f64, f64)) -> f64 {
    a + (b - a) * rng.random::<f64>()
}

/// `true` with probability `p` (always for `p >= 1`, never for `p <= 0`).
fn chance(rng: &mut impl Rng, p: f64) -> bool {
    rng.random::<f64>() < p
}
