//! Per-branch augmentations (docs/design.md §4.2) and iBOT block masking + collation (docs/design.md §4.3,
//! `../shared/fixtures/LOSSES.md` §6): the masking invariants over many seeds, the collation of the
//! fixture's masks, and the shapes, ranges, parameter ranges and exact values of the augmentations.
mod common;
use image::{Rgb, RgbImage};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use tch::{Kind, Tensor};
use vtp::data::augment::{
    apply_photometric, collate_multicrop, gaussian_blur, grayscale, render_crops, rgb_tensor, sample_rng, solarize,
    Augment, ClipCrop, CropBox, CropParams, DinoMultiCrop, JitterOp, JitterParams, PhotometricParams,
    RandomResizedCrop, ReconCrop, BLUR_SIGMA, CLIP_SCALE, DINO_GLOBAL_SCALE, DINO_LOCAL_SCALE,
};
use vtp::data::image::{IMAGENET_MEAN, IMAGENET_STD};
use vtp::data::masking::{collate_masks, mask_upperbound, MaskBatch, MaskingGenerator};
use vtp::io::read_safetensors_map;

// ------------------------------------------------------------------------------------------------
// Masking

/// Number of set cells of a mask.
fn count(mask: &[bool]) -> usize {
    mask.iter().filter(|&&m| m).count()
}

/// LOSSES.md §6: (grid side, requested n, observed min, observed max, fraction exactly n) over 2000 draws.
const MASK_COUNT_TABLE: [(usize, usize, usize, usize, f64); 13] = [
    (8, 1, 0, 1, 0.72),
    (8, 2, 0, 2, 0.99),
    (8, 3, 0, 3, 0.96),
    (8, 6, 4, 6, 0.98),
    (8, 12, 10, 12, 0.97),
    (8, 19, 18, 19, 0.96),
    (8, 25, 24, 25, 0.95),
    (8, 32, 30, 32, 0.95),
    (16, 25, 23, 25, 0.90),
    (16, 51, 49, 51, 0.93),
    (16, 76, 74, 76, 0.92),
    (16, 102, 100, 102, 0.92),
    (16, 128, 125, 128, 0.92),
];

#[test]
fn mask_counts_match_the_losses_table() {
    let draws = 2000;
    for (grid, n, lo, hi, exact) in MASK_COUNT_TABLE {
        let generator = MaskingGenerator::dinov2(grid);
        let mut rng = ChaCha8Rng::seed_from_u64(1000 * grid as u64 + n as u64);
        let counts: Vec<usize> = (0..draws).map(|_| count(&generator.generate(n, &mut rng))).collect();
        let (min, max) = (*counts.iter().min().unwrap(), *counts.iter().max().unwrap());
        let fraction = counts.iter().filter(|&&c| c == n).count() as f64 / draws as f64;
        assert_eq!(max, hi, "{grid}x{grid}, n {n}: never over-masks, and reaches n");
        // The minimum is a rare event: allow one cell below the reference's observed minimum.
        assert!(min + 1 >= lo, "{grid}x{grid}, n {n}: min {min} < reference {lo}");
        assert!((fraction - exact).abs() <= 0.04, "{grid}x{grid}, n {n}: exact fraction {fraction} vs {exact}");
    }
}

#[test]
fn masks_are_unions_of_rectangles_narrower_than_the_grid() {
    for (grid_h, grid_w) in [(8, 8), (16, 16), (6, 10)] {
        let generator = MaskingGenerator::new(grid_h, grid_w, 0.5 * (grid_h * grid_w) as f64);
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        for draw in 0..3000 {
            let n = draw % (grid_h * grid_w / 2 + 1);
            let (mask, blocks) = generator.generate_blocks(n, &mut rng);
            assert_eq!(mask.len(), grid_h * grid_w);
            assert!(count(&mask) <= n, "over-masked: {} > {n}", count(&mask));
            let mut union = vec![false; mask.len()];
            for b in &blocks {
                assert!(b.height >= 1 && b.width >= 1, "{b:?}");
                assert!(b.height < grid_h && b.width < grid_w, "{b:?} spans the {grid_h}x{grid_w} grid");
                assert!(b.top + b.height <= grid_h && b.left + b.width <= grid_w, "{b:?} out of the grid");
                for y in b.top..b.top + b.height {
                    union[y * grid_w + b.left..y * grid_w + b.left + b.width].fill(true);
                }
            }
            assert_eq!(union, mask, "mask is not the union of its blocks");
        }
    }
}

#[test]
fn zero_request_gives_an_empty_mask() {
    let generator = MaskingGenerator::dinov2(16);
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let (mask, blocks) = generator.generate_blocks(0, &mut rng);
    assert_eq!(mask, vec![false; 256]);
    assert!(blocks.is_empty());
}

#[test]
fn generator_parameters_follow_dinov2() {
    let generator = MaskingGenerator::dinov2(14);
    assert_eq!((generator.grid_h, generator.grid_w, generator.num_patches()), (14, 14, 196));
    assert_eq!(generator.max_num_patches, 98.0);
    assert_eq!(generator.min_num_patches, 4.0);
    assert!((generator.log_aspect_ratio.0 + 1.20397).abs() < 1e-5);
    assert!((generator.log_aspect_ratio.1 - 1.20397).abs() < 1e-5);
}

#[test]
fn upperbound_uses_float32_linspace_and_truncation() {
    // LOSSES.md §6: 12 + 19 + 25 + 32 for the fixture, 4941 for DINOv2's default batch.
    assert_eq!(mask_upperbound(8, 64), 88);
    assert_eq!(mask_upperbound(128, 256), 4941);
    // Odd and tiny batches: int(B * 0.5) masked rows.
    assert_eq!(mask_upperbound(1, 64), 0);
    assert_eq!(mask_upperbound(3, 64), int_f32(64, 0.5));
}

/// `int(n * p)` with a `float32` product.
fn int_f32(n: usize, p: f32) -> i64 {
    (n as f32 * p) as i64
}

#[test]
fn collate_reproduces_the_fixture_from_its_masks() {
    let fx = read_safetensors_map(&common::fixture("losses.safetensors")).expect("losses fixture loads");
    let masks = &fx["mask.collated_masks"];
    assert_eq!((masks.kind(), masks.size()), (Kind::Bool, vec![8, 64]));
    let upperbound = fx["mask.upperbound"].int64_value(&[]);
    assert_eq!(mask_upperbound(8, 64), upperbound);
    let batch = MaskBatch::from_masks(masks.shallow_clone(), upperbound);
    for (name, ours) in [
        ("mask_indices_list", &batch.mask_indices_list),
        ("masks_weight", &batch.masks_weight),
        ("n_masked_patches", &batch.n_masked_patches),
    ] {
        let reference = &fx[&format!("mask.{name}")];
        assert_eq!((ours.kind(), ours.size()), (reference.kind(), reference.size()), "{name}");
        assert!(ours.equal(reference), "{name} differs");
    }
    let per_image = batch.masks.sum_dim_intlist(-1, false, Kind::Int64);
    assert!(per_image.equal(&fx["mask.per_image_counts"]));
    assert_eq!(batch.upperbound, 88);
}

#[test]
fn collate_invariants_over_many_seeds() {
    let generator = MaskingGenerator::dinov2(8);
    for (seed, n_rows) in (0..300).map(|s| (s, [8usize, 8, 5, 2, 1][s as usize % 5])) {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let batch = collate_masks(&generator, n_rows, &mut rng);
        assert_eq!((batch.masks.kind(), batch.masks.size()), (Kind::Bool, vec![n_rows as i64, 64]));
        let counts = Vec::<i64>::try_from(batch.masks.sum_dim_intlist(-1, false, Kind::Int64)).unwrap();
        assert!(counts.iter().filter(|&&c| c > 0).count() <= n_rows / 2, "seed {seed}: {counts:?}");
        assert!(counts.iter().all(|&c| c <= 32), "seed {seed}: {counts:?}");
        let total: i64 = counts.iter().sum();
        assert!(total <= batch.upperbound, "seed {seed}: {total} > {}", batch.upperbound);
        assert_eq!(batch.upperbound, mask_upperbound(n_rows, 64));
        assert_eq!(Vec::<i64>::try_from(&batch.n_masked_patches).unwrap(), vec![total]);
        let indices = Vec::<i64>::try_from(&batch.mask_indices_list).unwrap();
        assert_eq!(indices.len() as i64, total);
        assert!(indices.windows(2).all(|w| w[0] < w[1]), "indices ascend");
        let weights = Vec::<f32>::try_from(&batch.masks_weight).unwrap();
        for (row, &c) in counts.iter().enumerate().filter(|(_, &c)| c > 0) {
            let in_row: Vec<f32> =
                indices.iter().zip(&weights).filter(|(&i, _)| i / 64 == row as i64).map(|(_, &w)| w).collect();
            assert_eq!(in_row.len() as i64, c);
            assert!(in_row.iter().all(|&w| w == 1.0 / c as f32));
            assert!((in_row.iter().sum::<f32>() - 1.0).abs() < 1e-5);
        }
    }
}

#[test]
fn collate_masks_the_requested_rows_in_distribution() {
    // Over many batches of 8 rows, on average 4 rows are masked with requests spread over
    // int(64·U(0.1, 0.5)) ∈ [6, 32].
    let generator = MaskingGenerator::dinov2(8);
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let (mut masked_rows, mut min, mut max) = (0, i64::MAX, 0);
    for _ in 0..500 {
        let batch = collate_masks(&generator, 8, &mut rng);
        let counts = Vec::<i64>::try_from(batch.masks.sum_dim_intlist(-1, false, Kind::Int64)).unwrap();
        for c in counts.into_iter().filter(|&c| c > 0) {
            masked_rows += 1;
            (min, max) = (min.min(c), max.max(c));
        }
    }
    assert!(masked_rows > 4 * 500 * 99 / 100, "{masked_rows}");
    // int(64 · U(0.4, 0.5)) reaches 32 only when U returns 0.5 itself.
    assert!((4..=6).contains(&min) && (30..=32).contains(&max), "[{min}, {max}]");
}

// ------------------------------------------------------------------------------------------------
// Augmentations

/// A smooth, colourful `w`×`h` test image.
fn pattern(w: u32, h: u32) -> RgbImage {
    RgbImage::from_fn(w, h, |x, y| {
        let (x, y) = (f64::from(x), f64::from(y));
        let v = |f: f64| (127.5 + 127.5 * f.sin()) as u8;
        Rgb([v(x / 17.0), v(y / 11.0 + 1.0), v((x + y) / 23.0 + 2.0)])
    })
}

/// ImageNet-normalised `[.., 3, H, W]` back to `[0, 1]`.
fn denormalise(x: &Tensor) -> Tensor {
    let mean = Tensor::from_slice(&IMAGENET_MEAN).view([3, 1, 1]);
    let std = Tensor::from_slice(&IMAGENET_STD).view([3, 1, 1]);
    x * std + mean
}

/// Largest absolute difference.
fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

/// `[K, 3, H, W]` `f32` from per-pixel RGB values (one row).
fn rgb_batch(h: i64, w: i64, pixel: impl Fn(i64, i64) -> [f32; 3]) -> Tensor {
    let mut data = vec![0f32; (3 * h * w) as usize];
    for y in 0..h {
        for x in 0..w {
            for (c, v) in pixel(y, x).into_iter().enumerate() {
                data[((c as i64 * h + y) * w + x) as usize] = v;
            }
        }
    }
    Tensor::from_slice(&data).view([1, 3, h, w])
}

/// Jitter with one op order and the given factors.
fn jitter(brightness: f64, contrast: f64, saturation: f64, hue: f64) -> PhotometricParams {
    let order = JitterOp::ALL;
    PhotometricParams {
        jitter: Some(JitterParams { order, brightness, contrast, saturation, hue }),
        ..Default::default()
    }
}

#[test]
fn multicrop_shapes_ranges_and_crop_major_collation() {
    let aug = DinoMultiCrop::dinov2(224, 96, 8);
    let images = [pattern(320, 240), pattern(200, 300)];
    let outputs: Vec<_> =
        images.iter().enumerate().map(|(i, img)| aug.apply(img, &mut sample_rng(11, i as u64))).collect();
    for out in &outputs {
        assert_eq!((out.global.kind(), out.global.size()), (Kind::Float, vec![2, 3, 224, 224]));
        assert_eq!((out.local.kind(), out.local.size()), (Kind::Float, vec![8, 3, 96, 96]));
        for crops in [&out.global, &out.local] {
            let unit = denormalise(crops);
            assert!(unit.min().double_value(&[]) >= -1e-6 && unit.max().double_value(&[]) <= 1.0 + 1e-6);
        }
        assert_eq!(out.params.local.len(), 8);
    }
    let (global, local) = collate_multicrop(&outputs);
    assert_eq!(global.size(), vec![4, 3, 224, 224]);
    assert_eq!(local.size(), vec![16, 3, 96, 96]);
    for crop in 0..2 {
        for (b, out) in outputs.iter().enumerate() {
            assert!(global.get(crop * 2 + b as i64).equal(&out.global.get(crop)), "global crop {crop} image {b}");
        }
    }
    for crop in 0..8 {
        for (b, out) in outputs.iter().enumerate() {
            assert!(local.get(crop * 2 + b as i64).equal(&out.local.get(crop)), "local crop {crop} image {b}");
        }
    }
}

/// The batched multi-crop (photometric ops over all images' crops at once) renders what each image's
/// own multi-crop renders, collated crop-major: the same draws, the same pixels to ≤ 1e-5 (the bound
/// of a batched path; it comes out bit-identical here).
#[test]
fn batched_multicrop_matches_per_image_multicrops() {
    let aug = DinoMultiCrop::dinov2(64, 32, 4);
    let images: Vec<RgbImage> = (0..12).map(|i| pattern(90 + 7 * i, 120 - 3 * i)).collect();
    let per_image: Vec<_> =
        images.iter().enumerate().map(|(i, img)| aug.apply(img, &mut sample_rng(9, i as u64))).collect();
    let draws = per_image.iter().flat_map(|o| o.params.global.iter().chain(&o.params.local)).map(|p| p.photometric);
    let kinds = draws.fold([0; 4], |mut n, p| {
        n[0] += usize::from(p.jitter.is_some());
        n[1] += usize::from(p.grayscale);
        n[2] += usize::from(p.blur_sigma.is_some());
        n[3] += usize::from(p.solarize);
        n
    });
    assert!(kinds.iter().all(|&n| n > 0), "every photometric op is drawn at least once: {kinds:?}");
    let (global, local) = collate_multicrop(&per_image);
    let batched = aug.apply_batch(images.iter().enumerate().map(|(i, img)| (img, sample_rng(9, i as u64))).collect());
    for (name, a, b) in [("global", &batched.0, &global), ("local", &batched.1, &local)] {
        assert_eq!(a.size(), b.size(), "{name}");
        let diff = max_diff(a, b);
        println!("{name}: max |batched - per image| = {diff:e}");
        assert!(diff <= 1e-5, "{name}: {diff:e}");
    }
}

#[test]
fn multicrop_is_deterministic_under_a_seed_on_any_thread() {
    let aug = DinoMultiCrop::dinov2(64, 32, 3);
    let img = pattern(150, 120);
    let reference = aug.apply(&img, &mut sample_rng(5, 42));
    let from_threads: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..2).map(|_| s.spawn(|| aug.apply(&img, &mut sample_rng(5, 42)))).collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for out in &from_threads {
        assert_eq!(out.params, reference.params);
        assert!(out.global.equal(&reference.global) && out.local.equal(&reference.local));
    }
    let other = aug.apply(&img, &mut sample_rng(5, 43));
    assert_ne!(other.params, reference.params, "another sample index draws other crops");
}

#[test]
fn random_resized_crop_respects_scale_and_ratio() {
    let (width, height) = (640u32, 480u32);
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    for scale in [DINO_GLOBAL_SCALE, DINO_LOCAL_SCALE, CLIP_SCALE] {
        let rrc = RandomResizedCrop::new(224, scale);
        for _ in 0..2000 {
            let b = rrc.sample_box(width, height, &mut rng);
            assert!(b.top + b.height <= height && b.left + b.width <= width, "{b:?}");
            let (w, h) = (f64::from(b.width), f64::from(b.height));
            // w and h are rounded: the area and ratio hold up to half a pixel per side.
            let area = w * h / f64::from(width * height);
            let slack = (w + h) / 2.0 / f64::from(width * height);
            assert!(area >= scale.0 - slack && area <= scale.1 + slack, "{b:?}: area {area} for {scale:?}");
            let ratio = w / h;
            assert!(ratio >= 0.75 * (1.0 - 1.0 / h) && ratio <= 4.0 / 3.0 * (1.0 + 1.0 / h), "{b:?}: ratio {ratio}");
        }
    }
}

#[test]
fn random_resized_crop_falls_back_to_the_central_crop() {
    let rrc = RandomResizedCrop::new(96, DINO_GLOBAL_SCALE);
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    // Too wide for any allowed ratio: h = 20, w = round(20 · 4/3) = 27, centred.
    assert_eq!(rrc.sample_box(1000, 20, &mut rng), CropBox { top: 0, left: 486, height: 20, width: 27 });
    // Too tall: w = 20, h = round(20 / (3/4)) = 27.
    assert_eq!(rrc.sample_box(20, 1000, &mut rng), CropBox { top: 486, left: 0, height: 27, width: 20 });
}

#[test]
fn multicrop_parameters_have_dinov2_ranges_and_rates() {
    let aug = DinoMultiCrop::dinov2(224, 96, 8);
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    let draws = 2000;
    let all: Vec<_> = (0..draws).map(|_| aug.sample(400, 300, &mut rng)).collect();
    let kinds: [(&str, Vec<&CropParams>, f64, f64); 3] = [
        ("global 1", all.iter().map(|p| &p.global[0]).collect(), 1.0, 0.0),
        ("global 2", all.iter().map(|p| &p.global[1]).collect(), 0.1, 0.2),
        ("local", all.iter().flat_map(|p| &p.local).collect(), 0.5, 0.0),
    ];
    let rate = |crops: &[&CropParams], pred: &dyn Fn(&CropParams) -> bool| {
        crops.iter().filter(|c| pred(c)).count() as f64 / crops.len() as f64
    };
    for (name, crops, blur_p, solarize_p) in &kinds {
        let near =
            |got: f64, want: f64, what: &str| assert!((got - want).abs() < 0.04, "{name} {what}: {got} vs {want}");
        near(rate(crops, &|c| c.flip), 0.5, "flip");
        near(rate(crops, &|c| c.photometric.jitter.is_some()), 0.8, "jitter");
        near(rate(crops, &|c| c.photometric.grayscale), 0.2, "grayscale");
        near(rate(crops, &|c| c.photometric.blur_sigma.is_some()), *blur_p, "blur");
        near(rate(crops, &|c| c.photometric.solarize), *solarize_p, "solarize");
        for c in crops {
            if let Some(j) = c.photometric.jitter {
                let mut order = j.order.map(|op| op as usize);
                order.sort_unstable();
                assert_eq!(order, [0, 1, 2, 3], "order is a permutation");
                assert!((0.6..=1.4).contains(&j.brightness) && (0.6..=1.4).contains(&j.contrast));
                assert!((0.8..=1.2).contains(&j.saturation) && (-0.1..=0.1).contains(&j.hue));
            }
            if let Some(sigma) = c.photometric.blur_sigma {
                assert!((BLUR_SIGMA.0..=BLUR_SIGMA.1).contains(&sigma));
            }
        }
    }
}

#[test]
fn clip_and_recon_crops() {
    let img = pattern(300, 200);
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    let clip = ClipCrop::new(64);
    let recon = ReconCrop::new(128);
    let mut flips = 0;
    for _ in 0..500 {
        let p = clip.sample(300, 200, &mut rng);
        assert!(!p.flip && p.photometric == PhotometricParams::default());
        assert!(f64::from(p.crop.width * p.crop.height) >= (CLIP_SCALE.0 - 0.01) * 60000.0, "{:?}", p.crop);
        let r = recon.sample(300, 200, &mut rng);
        assert_eq!((r.crop.top, r.crop.width, r.crop.height), (0, 200, 200));
        assert!(r.crop.left <= 100);
        flips += usize::from(r.flip);
    }
    assert!((200..300).contains(&flips), "{flips} flips of 500");
    for (out, size) in [(clip.apply(&img, &mut rng), 64), (recon.apply(&img, &mut rng), 128)] {
        assert_eq!((out.kind(), out.size()), (Kind::Float, vec![3, size, size]));
        let unit = denormalise(&out);
        assert!(unit.min().double_value(&[]) >= -1e-6 && unit.max().double_value(&[]) <= 1.0 + 1e-6);
    }
}

#[test]
fn full_crop_at_native_size_is_the_normalised_image_and_flip_mirrors_it() {
    let image = rgb_tensor(&pattern(24, 24));
    let whole = CropBox { top: 0, left: 0, height: 24, width: 24 };
    let params = |flip| CropParams { crop: whole, flip, photometric: PhotometricParams::default() };
    let plain = render_crops(&image, &[params(false)], 24);
    assert_eq!(plain.size(), vec![1, 3, 24, 24]);
    let expected = image.to_kind(Kind::Float) / 255.0;
    assert!(max_diff(&denormalise(&plain).squeeze_dim(0), &expected) < 1e-6);
    assert!(render_crops(&image, &[params(true)], 24).equal(&plain.flip([-1])));
}

#[test]
fn grayscale_and_solarize_are_exact() {
    let x = rgb_batch(2, 3, |y, x| {
        let v = [0.0, 0.25, 0.5, 128.0 / 255.0, 0.75, 1.0][(y * 3 + x) as usize] as f32;
        [v, 1.0 - v, v * 0.5]
    });
    let solarized = solarize(&x);
    let threshold = (128.0f64 / 255.0) as f32;
    let expected = x.where_self(&x.lt(f64::from(threshold)), &(1.0 - &x));
    assert!(solarized.equal(&expected));
    assert_eq!(solarized.double_value(&[0, 0, 1, 0]), f64::from(1.0f32 - 128.0 / 255.0), "128/255 is inverted");
    assert_eq!(solarized.double_value(&[0, 0, 0, 2]), 0.5, "0.5 < 128/255 is kept");
    let gray = grayscale(&x);
    assert_eq!(gray.size(), vec![1, 3, 2, 3]);
    let values = Vec::<f32>::try_from(x.flatten(0, -1)).unwrap();
    for i in 0..6 {
        let (r, g, b) = (values[i], values[6 + i], values[12 + i]);
        let luma = r * 0.2989 + g * 0.587 + b * 0.114;
        for c in 0..3 {
            assert_eq!(gray.double_value(&[0, c, (i / 3) as i64, (i % 3) as i64]) as f32, luma);
        }
    }
}

#[test]
fn jitter_ops_follow_torchvision() {
    let x = rgb_batch(4, 5, |y, x| [0.1 + 0.05 * x as f32, 0.8 - 0.1 * y as f32, 0.3]);
    // Brightness: a scaled, clamped copy (the identity factors of the other ops change nothing but
    // the hue round trip's rounding).
    let bright = apply_photometric(&x, &[jitter(1.5, 1.0, 1.0, 0.0)]);
    assert!(max_diff(&bright, &(&x * 1.5).clamp(0.0, 1.0)) < 1e-6);
    // Contrast 0: every pixel becomes the mean luma; saturation 0: the grayscale image.
    let flat = apply_photometric(&x, &[jitter(1.0, 0.0, 1.0, 0.0)]);
    let mean_luma = grayscale(&x).mean(Kind::Float).double_value(&[]);
    assert!((flat - mean_luma).abs().max().double_value(&[]) < 1e-6);
    let desaturated = apply_photometric(&x, &[jitter(1.0, 1.0, 0.0, 0.0)]);
    assert!(max_diff(&desaturated, &grayscale(&x)) < 1e-6);
    // Hue +1/3 turns red into green and green into blue.
    let red_green = rgb_batch(1, 2, |_, x| if x == 0 { [1.0, 0.0, 0.0] } else { [0.0, 0.6, 0.0] });
    let shifted = apply_photometric(&red_green, &[jitter(1.0, 1.0, 1.0, 1.0 / 3.0)]);
    let expected = rgb_batch(1, 2, |_, x| if x == 0 { [0.0, 1.0, 0.0] } else { [0.0, 0.0, 0.6] });
    assert!(max_diff(&shifted, &expected) < 1e-6);
    // Rows without jitter are untouched while the others change.
    let batch = Tensor::cat(&[&x, &x], 0);
    let mixed = apply_photometric(&batch, &[PhotometricParams::default(), jitter(0.5, 1.0, 1.0, 0.0)]);
    assert!(mixed.get(0).equal(&x.get(0)));
    assert!(max_diff(&mixed.get(1), &(x.get(0) * 0.5)) < 1e-6);
}

#[test]
fn gaussian_blur_preserves_constants_and_mass() {
    let constant = Tensor::full([2, 3, 12, 12], 0.4, (Kind::Float, tch::Device::Cpu));
    assert!(max_diff(&gaussian_blur(&constant, &[0.5, 2.0]), &constant) < 1e-6);
    // A centred impulse spreads into the outer product of the normalised 1-D kernel.
    let impulse = Tensor::zeros([1, 3, 21, 21], (Kind::Float, tch::Device::Cpu));
    let _ = impulse.get(0).get(0).get(10).get(10).fill_(1.0);
    let blurred = gaussian_blur(&impulse, &[1.0]);
    assert!((blurred.get(0).get(0).sum(Kind::Double).double_value(&[]) - 1.0).abs() < 1e-6);
    let k: Vec<f64> = (-4..=4).map(|x: i32| (-0.5 * f64::from(x * x)).exp()).collect();
    let total: f64 = k.iter().sum();
    let centre = (k[4] / total).powi(2);
    assert!((blurred.double_value(&[0, 0, 10, 10]) - centre).abs() < 1e-6);
    assert!((blurred.double_value(&[0, 0, 10, 13]) - k[4] * k[7] / total / total).abs() < 1e-6);
    assert_eq!(blurred.double_value(&[0, 0, 10, 15]), 0.0, "the kernel has 9 taps");
    assert_eq!(blurred.get(0).get(1).abs().sum(Kind::Double).double_value(&[]), 0.0, "channels are separate");
}

#[test]
fn two_crops_match_torchvision() {
    // Reference: torchvision 0.28 (torch 2.13) tensor functionals on the same u8 image:
    // resized_crop(BICUBIC, antialias).clamp(0, 1), hflip, adjust_hue(-0.07), adjust_brightness(1.3),
    // adjust_saturation(1.15), adjust_contrast(0.7), gaussian_blur([9, 9], 1.2), solarize(128/255),
    // normalize; and a grayscale-only crop. Whole-output max difference was 1.7e-6.
    let image = rgb_tensor(&pattern(48, 40));
    let order = [JitterOp::Hue, JitterOp::Brightness, JitterOp::Saturation, JitterOp::Contrast];
    let jitter = JitterParams { order, brightness: 1.3, contrast: 0.7, saturation: 1.15, hue: -0.07 };
    let full = PhotometricParams { jitter: Some(jitter), grayscale: false, blur_sigma: Some(1.2), solarize: true };
    let a = CropParams { crop: CropBox { top: 3, left: 5, height: 30, width: 36 }, flip: true, photometric: full };
    let gray = PhotometricParams { grayscale: true, ..Default::default() };
    let b = CropParams { crop: CropBox { top: 10, left: 0, height: 20, width: 17 }, flip: false, photometric: gray };
    let out = render_crops(&image, &[a, b], 32);
    let expected = [
        ([0, 0, 0, 0], -1.681761384010315),
        ([0, 1, 5, 9], -1.29131019115448),
        ([0, 2, 31, 31], -0.24975711107254028),
        ([0, 1, 20, 25], 0.043400295078754425),
        ([0, 2, 10, 3], -0.8604058027267456),
        ([1, 0, 3, 4], 1.3928860425949097),
        ([1, 2, 30, 12], -0.03349184989929199),
    ];
    for (at, value) in expected {
        assert!((out.double_value(&at) - value).abs() < 1e-5, "{at:?}: {} vs {value}", out.double_value(&at));
    }
    for (row, mean) in [(0, -0.9625764121141129), (1, 0.8979820975964685)] {
        assert!((out.get(row).mean(Kind::Double).double_value(&[]) - mean).abs() < 1e-6, "row {row} mean");
    }
}
