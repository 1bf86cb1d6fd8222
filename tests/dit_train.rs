//! `vtp dit extract` + `vtp dit train` end to end on a tiny random tokenizer and the synthetic data
//! (generation issue, integration tests): the latent statistics are computed from the cache, travel
//! bit-identically into the checkpoint and the export, and are applied exactly once each way;
//! extraction resumes to byte-identical shards and stores the flipped images' latents; DiT resume is
//! bit-identical; non-finite steps are skipped or stop the run; the loss falls.
mod common;
use common::{s, stderr};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};
use vtp::data::image::{prepare_rgb, Fit};
use vtp::data::source;
use vtp::data::stream::StreamOptions;
use vtp::dit::cache::{CacheManifest, LatentCache, STATS};
use vtp::dit::config::DitConfig;
use vtp::dit::model::{GuidedChannels, LightningDit};
use vtp::dit::sampler::SamplerConfig;
use vtp::dit::stats::LatentStats;
use vtp::dit::train::sample_latents;
use vtp::io::read_safetensors_map;
use vtp::model::VtpModel;

/// 96 synthetic 32-px images: with the tiny tokenizer (patch 16) 2×2 latents of 64 channels.
const DATA: &str = "synthetic:train?n=96&res=32";
/// Latent channels of [`common::init_tiny_model`] (`vision_feature_bottleneck` default).
const C: i64 = 64;

/// A tiny tokenizer and its extracted cache under `dir`.
fn tokenizer_and_cache(dir: &Path) -> (PathBuf, PathBuf) {
    let model = common::init_tiny_model(dir, 1);
    let cache = dir.join("cache");
    common::assert_success(&common::dit_extract(&model, DATA, &cache, "40", &[]), "vtp dit extract");
    (model, cache)
}

/// Asserts two tensor maps have the same keys and bit-identical tensors (same dtype, shape, bytes).
fn assert_bit_identical(a: &HashMap<String, Tensor>, b: &HashMap<String, Tensor>, what: &str) {
    let mut ka: Vec<&String> = a.keys().collect();
    let mut kb: Vec<&String> = b.keys().collect();
    ka.sort();
    kb.sort();
    assert_eq!(ka, kb, "{what}: tensor names");
    for (name, t) in a {
        let u = &b[name];
        assert_eq!((t.kind(), t.size()), (u.kind(), u.size()), "{what}: {name}");
        assert!(bytes(t) == bytes(u), "{what}: {name} differs");
    }
}

fn bytes(t: &Tensor) -> Vec<u8> {
    Vec::<u8>::try_from(t.contiguous().reshape([-1]).view_dtype(Kind::Uint8)).unwrap()
}

/// `[1, C, 1, 1]` view of a per-channel vector.
fn per_channel(v: &Tensor) -> Tensor {
    v.view([1, -1, 1, 1])
}

#[test]
fn latent_statistics_round_trip_and_are_applied_exactly_once() {
    let _generator = common::torch_generator();
    let tmp = tempfile::tempdir().unwrap();
    let (_, cache_dir) = tokenizer_and_cache(tmp.path());
    let manifest = CacheManifest::read(&cache_dir).unwrap();
    assert_eq!(manifest.shards, [40, 40, 16], "96 samples in shards of 40: two full, one partial");
    assert!(manifest.complete);
    assert_eq!(manifest.latent_shape, [C, 2, 2]);
    assert_eq!(manifest.num_classes, 8, "the synthetic 'shape' label set");

    // The statistics file is LatentStats::compute of every shard's plain latents, and that is the
    // per-channel mean and unbiased std over (N, H, W).
    let shards: Vec<HashMap<String, Tensor>> =
        (0..3).map(|i| read_safetensors_map(&CacheManifest::shard_path(&cache_dir, i)).unwrap()).collect();
    let latents = Tensor::cat(&shards.iter().map(|m| m["latents"].shallow_clone()).collect::<Vec<_>>(), 0);
    let flipped = Tensor::cat(&shards.iter().map(|m| m["latents_flip"].shallow_clone()).collect::<Vec<_>>(), 0);
    let labels = Tensor::cat(&shards.iter().map(|m| m["labels"].shallow_clone()).collect::<Vec<_>>(), 0);
    assert_eq!(latents.size(), [96, C, 2, 2]);
    let file = read_safetensors_map(&cache_dir.join(STATS)).unwrap();
    let (file_mean, file_std) = (&file["mean"], &file["std"]);
    assert_eq!((file_mean.kind(), file_mean.size()), (Kind::Float, vec![C]));
    let computed = LatentStats::compute(&latents).unwrap();
    assert!(computed.mean.equal(file_mean) && computed.std.equal(file_std), "stats file = compute(all latents)");
    let values = Vec::<f32>::try_from(latents.permute([1, 0, 2, 3]).contiguous().reshape([-1])).unwrap();
    let m = 96 * 4;
    let (fm, fs) = (Vec::<f32>::try_from(file_mean).unwrap(), Vec::<f32>::try_from(file_std).unwrap());
    for c in 0..C as usize {
        let x: Vec<f64> = values[c * m..(c + 1) * m].iter().map(|&v| v as f64).collect();
        let mu = x.iter().sum::<f64>() / m as f64;
        let sd = (x.iter().map(|v| (v - mu).powi(2)).sum::<f64>() / (m - 1) as f64).sqrt();
        assert!((fm[c] as f64 - mu).abs() <= 1e-6 * sd, "channel {c}: mean {} vs {mu}", fm[c]);
        // The biased std differs by sqrt(383/384) ≈ 1 − 1.3e-3: a 1e-5 tolerance tells them apart.
        assert!((fs[c] as f64 / sd - 1.0).abs() < 1e-5, "channel {c}: std {} vs unbiased {sd}", fs[c]);
    }
    assert!(fs.iter().any(|&v| (v - 1.0).abs() > 0.05), "non-trivial statistics, or the checks below prove nothing");

    // The training batch is (z − mean)/std of the chosen plain or flipped latent, once.
    let cache = LatentCache::open(&cache_dir).unwrap();
    assert!(cache.stats.mean.equal(file_mean) && cache.stats.std.equal(file_std));
    let picks: [(i64, bool); 6] = [(0, false), (5, true), (50, true), (95, false), (17, true), (40, false)];
    let indices = Tensor::from_slice(&picks.map(|p| p.0));
    let flip = Tensor::from_slice(&picks.map(|p| p.1));
    let (x, y) = cache.batch(&indices, &flip);
    let chosen: Vec<Tensor> = picks.iter().map(|&(i, f)| if f { flipped.get(i) } else { latents.get(i) }).collect();
    let expected = (Tensor::stack(&chosen, 0) - per_channel(file_mean)) / per_channel(file_std);
    assert!(x.equal(&expected), "batch = (z − mean)/std of the chosen latents");
    assert!(y.equal(&labels.index_select(0, &indices)), "labels of the chosen samples");

    // The run's checkpoint and export carry the same statistics, bit for bit.
    let run = tmp.path().join("run");
    common::assert_success(&common::dit_train(&cache_dir, &run, &["train.steps=2"]), "vtp dit train");
    let latest = vtp::train::checkpoint::latest(&run).unwrap().expect("a checkpoint");
    let (tensors, _) = vtp::train::checkpoint::load(&latest).unwrap();
    let exported = read_safetensors_map(&run.join("model").join(STATS)).unwrap();
    for (name, t) in [
        ("checkpoint latent_stats.mean", &tensors["latent_stats.mean"]),
        ("checkpoint latent_stats.std", &tensors["latent_stats.std"]),
        ("export mean", &exported["mean"]),
        ("export std", &exported["std"]),
    ] {
        let want = if name.ends_with("mean") { file_mean } else { file_std };
        assert_eq!((t.kind(), t.size()), (Kind::Float, vec![C]), "{name}");
        assert!(bytes(t) == bytes(want), "{name} differs from the cache's statistics");
    }

    // Sampling de-normalises exactly once: a fresh DiT's final layer is zero, so its velocity is 0
    // and the integrated sample is the starting noise x0.
    let config = DitConfig {
        input_size: 2,
        in_channels: C,
        num_classes: 8,
        hidden_size: 32,
        depth: 1,
        num_heads: 2,
        ..DitConfig::preset("tiny").unwrap()
    };
    let model = LightningDit::new(config, Device::Cpu).unwrap();
    let y = Tensor::from_slice(&[0i64, 3, 7]);
    let sampler = SamplerConfig { steps: 4, ..SamplerConfig::default() };
    tch::manual_seed(11);
    let x0 = Tensor::randn([3, C, 2, 2], (Kind::Float, Device::Cpu));
    let v = tch::no_grad(|| model.forward(&x0, &Tensor::full([3], 0.5, (Kind::Float, Device::Cpu)), &y, false));
    assert_eq!(v.abs().max().double_value(&[]), 0.0, "a fresh DiT's velocity is exactly 0");
    tch::manual_seed(11);
    let z = sample_latents(&model, &cache.stats, &y, &sampler, GuidedChannels::All, |_, _| {});
    let once = &x0 * per_channel(file_std) + per_channel(file_mean);
    assert!(z.equal(&once), "sample = x0·std + mean (max diff {})", (&z - &once).abs().max().double_value(&[]));
    let twice = &once * per_channel(file_std) + per_channel(file_mean);
    assert!(!z.allclose(&x0, 1e-3, 1e-3, false) && !z.allclose(&twice, 1e-3, 1e-3, false));
}

#[test]
fn extraction_resumes_to_identical_shards_and_flips_are_the_flipped_images_latents() {
    let _generator = common::torch_generator();
    let tmp = tempfile::tempdir().unwrap();
    let (model_dir, whole) = tokenizer_and_cache(tmp.path());
    let split = tmp.path().join("split");
    common::assert_success(&common::dit_extract(&model_dir, DATA, &split, "40", &[]), "vtp dit extract");
    // An extraction interrupted before its last shard: that shard, the statistics (written once
    // complete) and the completion mark are missing.
    std::fs::remove_file(CacheManifest::shard_path(&split, 2)).unwrap();
    std::fs::remove_file(split.join(STATS)).unwrap();
    let mut manifest = CacheManifest::read(&split).unwrap();
    manifest.shards.pop();
    manifest.complete = false;
    std::fs::write(split.join("cache.json"), serde_json::to_string_pretty(&manifest).unwrap()).unwrap();
    assert!(LatentCache::open(&split).is_err(), "an unfinished cache does not open for training");
    let o = common::dit_extract(&model_dir, DATA, &split, "40", &[]);
    common::assert_success(&o, "continued vtp dit extract");
    assert!(String::from_utf8_lossy(&o.stdout).contains("96 latents [64, 2, 2]"), "{}", stderr(&o));
    for name in ["shard-00000.safetensors", "shard-00001.safetensors", "shard-00002.safetensors", "cache.json", STATS] {
        let (a, b) = (std::fs::read(whole.join(name)).unwrap(), std::fs::read(split.join(name)).unwrap());
        assert!(a == b, "{name} differs between the continued and the uninterrupted extraction");
    }

    // Spot check: sample 45 (second shard) encoded by itself, plain and mirrored before the crop.
    let tokenizer = VtpModel::load(&model_dir, Device::Cpu).unwrap();
    let sample = source::open(DATA, &StreamOptions::default()).unwrap().nth(45).unwrap().unwrap();
    let encode = |img: &image::RgbImage| {
        let t = prepare_rgb(img, 16, Fit::AdmCenterCrop(32)).unwrap();
        let x = Tensor::from_slice(&t.data).view([1, 3, t.height as i64, t.width as i64]);
        tch::no_grad(|| tokenizer.get_reconstruction_latents(&x).unwrap()).squeeze_dim(0)
    };
    let plain = encode(&sample.image);
    let mirrored = encode(&image::imageops::flip_horizontal(&sample.image));
    let shard = read_safetensors_map(&CacheManifest::shard_path(&whole, 1)).unwrap();
    let (cached, cached_flip) = (shard["latents"].get(5), shard["latents_flip"].get(5));
    let diff = |a: &Tensor, b: &Tensor| (a - b).abs().max().double_value(&[]);
    let scale = plain.abs().max().double_value(&[]);
    assert!(diff(&cached, &plain) <= 1e-5 * scale, "latents of sample 45: {}", diff(&cached, &plain));
    assert!(diff(&cached_flip, &mirrored) <= 1e-5 * scale, "flipped latents: {}", diff(&cached_flip, &mirrored));
    assert!(diff(&cached_flip, &plain) > 1e-2 * scale, "the flipped latents are not the plain ones");
    assert_eq!(shard["labels"].int64_value(&[5]), sample.labels["shape"]);
}

#[test]
fn dit_resume_is_bit_identical() {
    let _generator = common::torch_generator();
    let tmp = tempfile::tempdir().unwrap();
    let (_, cache) = tokenizer_and_cache(tmp.path());
    let (whole, split) = (tmp.path().join("whole"), tmp.path().join("split"));
    common::assert_success(&common::dit_train(&cache, &whole, &["train.steps=6"]), "vtp dit train");
    let o = common::dit_train(&cache, &split, &["train.steps=6", "--stop-after", "3"]);
    common::assert_success(&o, "vtp dit train --stop-after 3");
    assert!(!split.join("model").exists(), "stopped before the end: nothing exported yet");
    let o = common::vtp(
        &[&["dit", "train", "--out", s(&split), "--resume"][..], common::DIT_TINY, &["train.steps=6"]].concat(),
    );
    common::assert_success(&o, "vtp dit train --resume");
    assert!(stderr(&o).contains("resuming from") && stderr(&o).contains("step 3"), "{}", stderr(&o));

    let model = |run: &Path| read_safetensors_map(&run.join("model/model.safetensors")).unwrap();
    assert_bit_identical(&model(&whole), &model(&split), "exported model.safetensors");
    let ckpt = |run: &Path| vtp::train::checkpoint::load(&run.join("checkpoints/step-00000006")).unwrap().0;
    let (a, b) = (ckpt(&whole), ckpt(&split));
    for prefix in ["model.", "ema.", "optim.", "latent_stats."] {
        assert!(a.keys().any(|k| k.starts_with(prefix)), "the checkpoint has {prefix}* tensors");
    }
    assert_bit_identical(&a, &b, "step-6 checkpoint");
    assert_eq!(
        common::series(&whole, "loss/total"),
        common::series(&split, "loss/total"),
        "the same losses, each step once"
    );
    assert_eq!(common::series(&whole, "loss/total").len(), 6);
}

#[test]
fn an_injected_nan_is_skipped_and_a_run_that_stays_nan_stops() {
    let _generator = common::torch_generator();
    let tmp = tempfile::tempdir().unwrap();
    let (_, cache) = tokenizer_and_cache(tmp.path());
    let run = tmp.path().join("nan");
    let o = common::dit_train(&cache, &run, &["train.steps=6", "debug.nan_at_steps=[2]"]);
    common::assert_success(&o, "vtp dit train with one NaN step");
    let err = stderr(&o);
    assert!(err.contains("step 3: non-finite loss or gradient, step skipped: loss/total=NaN"), "{err}");
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("6 steps (1 skipped)"),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
    assert_eq!(common::series(&run, "skipped_step"), [1.0]);
    assert_eq!(common::series(&run, "loss/total").len(), 5, "the skipped step's loss is not logged");
    assert!(run.join("model/model.safetensors").is_file());

    let all = tmp.path().join("all-nan");
    let every: Vec<String> = (0..10).map(|i| i.to_string()).collect();
    let nan = format!("debug.nan_at_steps=[{}]", every.join(","));
    let o = common::dit_train(&cache, &all, &["train.steps=10", "train.max_bad_steps=3", &nan]);
    common::assert_run_error(&o, &["stopped at step 3 after 3 consecutive non-finite steps", "no checkpoint"]);
    assert!(!all.join("model").exists() && vtp::train::checkpoint::latest(&all).unwrap().is_none());
}

#[test]
fn the_flow_loss_falls() {
    let _generator = common::torch_generator();
    let tmp = tempfile::tempdir().unwrap();
    let (_, cache) = tokenizer_and_cache(tmp.path());
    let run = tmp.path().join("run");
    common::assert_success(&common::dit_train(&cache, &run, &["train.steps=150", "optim.lr=1e-3"]), "vtp dit train");
    let loss = common::series(&run, "loss/total");
    assert_eq!(loss.len(), 150);
    let (first, last) = (common::mean(&loss[..20]), common::mean(&loss[130..]));
    println!("loss/total: first 20 steps {first:.4}, last 20 steps {last:.4}");
    assert!(last < 0.9 * first, "the flow loss did not fall ({first} -> {last})");
    assert!(run.join("samples").read_dir().unwrap().next().is_some(), "a sample grid was written");
}
