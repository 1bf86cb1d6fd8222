//! Understanding evaluations (docs/design.md §5.1, §5.2): class names and templates, zero-shot classification,
//! linear probing (feature protocols, cache, trainer), on a tiny random model and synthetic data.
mod common;
use std::cell::Cell;

use image::{Rgb, RgbImage};
use tch::{Device, Kind, Tensor};
use vtp::config::VtpConfig;
use vtp::data::source;
use vtp::data::stream::StreamOptions;
use vtp::eval::classnames::{self, ClassSet, CIFAR10_CLASSNAMES};
use vtp::eval::linear_probe::{
    extract_features, resize_center_crop, train_linear_probe, CacheKey, FeatureCache, LinearProbeResult, ProbeConfig,
    Protocol, OFFICIAL_LR_GRID,
};
use vtp::eval::zero_shot::{classify, labelled_batches, squash_resize, topk_hits, ZeroShotClassifier, LOGIT_SCALE};
use vtp::model::fingerprint::model_fingerprint;
use vtp::model::VtpModel;

/// A tiny CLIP-enabled model: width 32, depth 4 (so `official-n4` applies), the full CLIP vocabulary
/// (real prompts tokenise into it), no pixel decoder.
fn tiny_model() -> VtpModel {
    let config: VtpConfig = serde_json::from_str(
        r#"{"vision_embed_dim": 32, "vision_depth": 4, "vision_num_heads": 2, "vision_feature_bottleneck": 16,
            "train_reconstruction": false, "text_embed_dim": 24, "text_depth": 1, "text_num_heads": 2}"#,
    )
    .unwrap();
    tch::manual_seed(7);
    VtpModel::new(config, Device::Cpu).unwrap()
}

/// Largest absolute difference of two tensors.
fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

/// Labelled batches of the synthetic held-out split at `res`, squashed to `size`.
fn synthetic_batches(
    n: usize,
    res: u32,
    size: u32,
    label: &str,
    batch: usize,
) -> impl Iterator<Item = anyhow::Result<(Tensor, Vec<i64>)>> {
    let stream = source::open(&format!("synthetic:heldout?n={n}&res={res}&seed=3"), &StreamOptions::default()).unwrap();
    labelled_batches(stream, label, batch, move |img| squash_resize(img, size))
}

#[test]
fn imagenet_names_and_templates_are_openclips() {
    let _generator = common::torch_generator();
    let names = classnames::imagenet_classnames();
    assert_eq!(names.len(), 1000);
    assert_eq!(&names[..3], ["tench", "goldfish", "great white shark"]);
    assert_eq!(&names[998..], ["corn cob", "toilet paper"]);
    assert_eq!(names.iter().filter(|n| **n == "missile").count(), 2);
    assert_eq!(names.iter().filter(|n| **n == "sunglasses").count(), 2);
    assert!(names.iter().all(|n| !n.is_empty() && n.trim() == *n));

    let templates = classnames::openai_imagenet_templates();
    assert_eq!(templates.len(), 80);
    assert_eq!(&templates[..2], ["a bad photo of a {c}.", "a photo of many {c}."]);
    assert_eq!(templates[79], "a tattoo of the {c}.");
    assert!(templates.iter().all(|t| t.matches("{c}").count() == 1));
    assert_eq!(classnames::fill_template(templates[0], names[0]), "a bad photo of a tench.");
}

#[test]
fn class_sets_resolve_by_name() {
    let _generator = common::torch_generator();
    let imagenet = classnames::resolve("imagenet").unwrap();
    assert_eq!((imagenet.class_names.len(), imagenet.templates.len(), imagenet.label_key.as_str()), (1000, 80, "cls"));
    let cifar = classnames::resolve("cifar10").unwrap();
    assert_eq!(cifar.class_names, CIFAR10_CLASSNAMES);
    assert_eq!(
        (cifar.templates.len(), cifar.templates[0].as_str(), cifar.label_key.as_str()),
        (18, "a photo of a {c}.", "cls")
    );
    for (name, n, key) in
        [("synthetic-shape", 8, "shape"), ("synthetic-color", 8, "color"), ("synthetic-shape_color", 64, "shape_color")]
    {
        let set = classnames::resolve(name).unwrap();
        assert_eq!((set.name.as_str(), set.class_names.len(), set.label_key.as_str()), (name, n, key));
        assert_eq!(set.class_names, vtp::data::synthetic::class_names(key).unwrap());
        assert!(!set.templates.is_empty() && set.templates.iter().all(|t| t.contains("{c}")));
    }
    assert_eq!("Synthetic-Shape-Color".parse::<ClassSet>().unwrap(), ClassSet::Synthetic("shape_color".into()));
    assert_eq!("ImageNet-1k".parse::<ClassSet>().unwrap(), ClassSet::Imagenet);
    let err = "mnist".parse::<ClassSet>().unwrap_err().to_string();
    assert!(err.contains("unknown class set 'mnist'") && err.contains("synthetic-shape_color"), "{err}");
    assert_eq!(ClassSet::all().len(), 5);
}

#[test]
fn logits_and_topk_on_known_cases() {
    let _generator = common::torch_generator();
    // Image features equal to a class's weight column: that class wins, with logit 100.
    let w = Tensor::from_slice(&[1.0f32, 0.0, 0.6, 0.0, 1.0, 0.8]).view([2, 3]); // unit columns [Wt=2, C=3]
    let feats = w.tr().contiguous();
    let logits = classify(&feats, &w);
    assert_eq!(Vec::<i64>::try_from(logits.argmax(1, false)).unwrap(), [0, 1, 2]);
    assert!((logits.double_value(&[2, 2]) - LOGIT_SCALE).abs() < 1e-4);
    assert!((logits.double_value(&[0, 2]) - 60.0).abs() < 1e-4);

    let logits = Tensor::from_slice(&[
        0.1f32, 0.9, 0.0, 0.5, 0.3, 0.2, 0.05, // row 0: order 1, 3, 4, 5, 0, 6, 2
        9.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, // row 1: order 0, 6, 5, 4, 3, 2, 1
    ])
    .view([2, 7]);
    assert_eq!(topk_hits(&logits, &[1, 0], &[1, 5]).unwrap(), [2, 2]);
    assert_eq!(topk_hits(&logits, &[5, 3], &[1, 5]).unwrap(), [0, 2]);
    assert_eq!(topk_hits(&logits, &[0, 1], &[1, 5]).unwrap(), [0, 1]);
    assert_eq!(topk_hits(&logits, &[6, 1], &[1, 5, 7]).unwrap(), [0, 0, 2]);
    assert_eq!(topk_hits(&logits, &[6, 1], &[1, 50]).unwrap(), [0, 2], "k is capped at C");
    assert!(topk_hits(&logits, &[7, 0], &[1]).unwrap_err().to_string().contains("label 7 is out of range"));
    assert!(topk_hits(&logits, &[0], &[1]).is_err());
}

#[test]
fn zero_shot_classifier_on_a_tiny_model() {
    let _generator = common::torch_generator();
    let model = tiny_model();
    let set = classnames::resolve("synthetic-shape").unwrap();
    let clf = ZeroShotClassifier::build(&model, &set.class_names, &set.templates, 3).unwrap();
    assert_eq!(clf.weights.size(), [24, 8]);
    let norms = clf.weights.linalg_norm(2.0, [0i64].as_slice(), false, None::<Kind>);
    assert!(max_diff(&norms, &Tensor::ones([8], (Kind::Float, Device::Cpu))) < 1e-5, "{norms}");

    // Column 5 by hand: all templates of class 5, normalised features, mean, renormalised.
    let tok = vtp::tokenizer::ClipTokenizer::new();
    let prompts: Vec<String> =
        set.templates.iter().map(|t| classnames::fill_template(t, &set.class_names[5])).collect();
    let prompts: Vec<&str> = prompts.iter().map(String::as_str).collect();
    let ids: Vec<i64> = tok.tokenize(&prompts, 77).concat();
    let text = Tensor::from_slice(&ids).view([prompts.len() as i64, 77]);
    let mean = tch::no_grad(|| model.get_clip_text_feature(&text, true).unwrap()).mean_dim(0, false, None::<Kind>);
    let expected = &mean / mean.norm();
    assert!(max_diff(&clf.weights.select(1, 5), &expected) < 1e-6);
    // The batch of classes does not change the weights.
    let one_by_one = ZeroShotClassifier::build(&model, &set.class_names, &set.templates, 1).unwrap();
    assert!(max_diff(&one_by_one.weights, &clf.weights) < 1e-6);

    // Known answer through the classifier: each class's own column classifies as that class.
    let logits = clf.logits(&clf.weights.tr());
    assert_eq!(Vec::<i64>::try_from(logits.argmax(1, false)).unwrap(), (0..8).collect::<Vec<i64>>());
    let hits = topk_hits(&logits, &(0..8).collect::<Vec<_>>(), &[1, 5]).unwrap();
    assert_eq!(hits, [8, 8]);

    // End to end on the synthetic held-out split.
    let result = clf.evaluate(&model, synthetic_batches(20, 32, 32, &set.label_key, 8)).unwrap();
    assert_eq!((result.n_images, result.n_classes, result.n_templates), (20, 8, set.templates.len()));
    assert!(0.0 <= result.top1 && result.top1 <= result.top5 && result.top5 <= 100.0, "{result:?}");
    assert!(result.protocol.starts_with("zero-shot §5.1 (8 classes × 4 templates"), "{}", result.protocol);
    let json = serde_json::to_value(&result).unwrap();
    assert_eq!(json["n_images"], 20);

    // ImageNet prompts tokenise into the full vocabulary (three classes × 80 templates).
    let imagenet = classnames::resolve("imagenet").unwrap();
    let clf = ZeroShotClassifier::build(&model, &imagenet.class_names[..3], &imagenet.templates, 10).unwrap();
    assert_eq!(clf.weights.size(), [24, 3]);

    let bad = ZeroShotClassifier::build(&model, &set.class_names, &["no placeholder".to_string()], 10);
    assert!(bad.unwrap_err().to_string().contains("has no '{c}'"));
    let mut missing = synthetic_batches(4, 32, 32, "cls", 4);
    let err = missing.next().unwrap().unwrap_err().to_string();
    assert!(err.contains("has no label 'cls'"), "{err}");
    assert!(missing.next().is_none());
}

#[test]
fn preprocessing_sizes() {
    let _generator = common::torch_generator();
    let img = RgbImage::from_fn(40, 20, |x, y| Rgb([x as u8 * 6, y as u8 * 12, 77]));
    let t = squash_resize(&img, 32).unwrap();
    assert_eq!((t.width, t.height, t.data.len()), (32, 32, 3 * 32 * 32));
    // Already the right size: exactly ToTensor + Normalize.
    let square = RgbImage::from_fn(16, 16, |x, y| Rgb([x as u8, y as u8, 200]));
    let t = squash_resize(&square, 16).unwrap();
    let expect = (1.0f32 / 255.0 - 0.485) / 0.229;
    assert_eq!(t.data[1], expect);

    let t = resize_center_crop(&RgbImage::new(300, 200), 256, 224).unwrap();
    assert_eq!((t.width, t.height), (224, 224));
    let t = resize_center_crop(&RgbImage::new(64, 96), 64, 48).unwrap();
    assert_eq!((t.width, t.height), (48, 48));
    assert!(resize_center_crop(&RgbImage::new(64, 64), 32, 48).is_err());
}

#[test]
fn feature_protocols_on_a_tiny_model() {
    let _generator = common::torch_generator();
    let model = tiny_model();
    let images = || synthetic_batches(6, 48, 48, "shape", 4);
    let mut by_name = std::collections::HashMap::new();
    for (protocol, dim) in [
        (Protocol::Official { n_blocks: 1 }, 64),
        (Protocol::Official { n_blocks: 4 }, 160),
        (Protocol::LastCls, 32),
        (Protocol::Bottleneck, 16),
    ] {
        assert_eq!(protocol.feature_dim(&model), dim);
        let (x, y) = extract_features(&model, images(), protocol).unwrap();
        assert_eq!((x.size(), x.kind(), y.size(), y.kind()), (vec![6, dim], Kind::Float, vec![6], Kind::Int64));
        by_name.insert(protocol.name(), x);
    }
    // official-n1 = [final-norm CLS, mean of final-norm patches]; official-n4 ends with the same.
    let (images_t, _) = images().next().unwrap().unwrap();
    let last = tch::no_grad(|| model.get_last_layer_feature(&images_t, false).unwrap());
    let n1 = &by_name["official-n1"];
    assert!(max_diff(&n1.narrow(0, 0, 4).narrow(1, 0, 32), &last.cls) < 1e-5);
    assert!(max_diff(&n1.narrow(0, 0, 4).narrow(1, 32, 32), &last.patches.mean_dim(1, false, None::<Kind>)) < 1e-5);
    assert!(max_diff(&by_name["last-cls"], &n1.narrow(1, 0, 32)) < 1e-6);
    assert!(max_diff(&by_name["official-n4"].narrow(1, 96, 64), n1) < 1e-6);
    let bottleneck = tch::no_grad(|| model.get_last_layer_feature(&images_t, true).unwrap());
    let pooled = bottleneck.patches.mean_dim(1, false, None::<Kind>);
    assert!(max_diff(&by_name["bottleneck"].narrow(0, 0, 4), &pooled) < 1e-6);

    let err = extract_features(&model, images(), Protocol::Official { n_blocks: 5 }).unwrap_err().to_string();
    assert!(err.contains("encoder has 4 blocks"), "{err}");
    for p in Protocol::ALL {
        assert_eq!(p.name().parse::<Protocol>().unwrap(), p);
        assert_eq!(serde_json::to_string(&p).unwrap(), format!("\"{}\"", p.name()));
    }
    assert_eq!("official".parse::<Protocol>().unwrap(), Protocol::Official { n_blocks: 4 });
    assert!("official-n0".parse::<Protocol>().is_err());
}

#[test]
fn feature_cache_computes_once() {
    let _generator = common::torch_generator();
    let model = tiny_model();
    let dir = tempfile::tempdir().unwrap();
    let cache = FeatureCache::new(dir.path().join("feats"));
    let fingerprint = model_fingerprint(&model).unwrap();
    assert_eq!(fingerprint, model_fingerprint(&model).unwrap());
    let key = CacheKey {
        model: fingerprint.clone(),
        data: "synthetic:heldout?n=5|squash48".into(),
        protocol: "last-cls".into(),
    };
    let calls = Cell::new(0);
    let compute = || {
        calls.set(calls.get() + 1);
        extract_features(&model, synthetic_batches(5, 48, 48, "color", 2), Protocol::LastCls)
    };
    let (x1, y1) = cache.get_or_compute(&key, compute).unwrap();
    let (x2, y2) = cache.get_or_compute(&key, compute).unwrap();
    assert_eq!(calls.get(), 1);
    assert_eq!((x1.size(), y1.size()), (vec![5, 32], vec![5]));
    assert!(x1.equal(&x2) && y1.equal(&y2));
    assert!(cache.path(&key).is_file());
    let other = CacheKey { protocol: "bottleneck".into(), ..key.clone() };
    assert_ne!(cache.path(&other), cache.path(&key));
    let (x3, _) = cache
        .get_or_compute(&other, || {
            calls.set(calls.get() + 1);
            extract_features(&model, synthetic_batches(5, 48, 48, "color", 2), Protocol::Bottleneck)
        })
        .unwrap();
    assert_eq!((calls.get(), x3.size()), (2, vec![5, 16]));

    // Any weight change changes the fingerprint.
    let changed = tiny_model();
    tch::no_grad(|| {
        let mut vars = changed.vs.variables();
        let _ = vars.get_mut("trunk.norm.weight").unwrap().f_add_scalar_(1e-3).unwrap();
    });
    assert_ne!(model_fingerprint(&changed).unwrap(), fingerprint);
}

/// Gaussian blobs: `per_class` points around each of `classes` well-separated centres in `dim` dims.
fn blobs(classes: i64, per_class: i64, dim: i64, seed: i64) -> (Tensor, Tensor) {
    tch::manual_seed(seed);
    let centres = Tensor::eye(dim, (Kind::Float, Device::Cpu)).narrow(0, 0, classes) * 4.0;
    let labels = Tensor::arange(classes, (Kind::Int64, Device::Cpu)).repeat_interleave_self_int(per_class, 0, None);
    let x = centres.index_select(0, &labels) + Tensor::randn([classes * per_class, dim], (Kind::Float, Device::Cpu));
    (x, labels)
}

#[test]
fn linear_probe_separates_gaussian_blobs() {
    let _generator = common::torch_generator();
    let (train_x, train_y) = blobs(4, 100, 16, 1);
    let (val_x, val_y) = blobs(4, 50, 16, 2);
    let config = ProbeConfig { epochs: 10, batch_size: 32, ..ProbeConfig::default() };
    let run = || train_linear_probe((&train_x, &train_y), (&val_x, &val_y), None, &config, "blobs").unwrap();
    let result: LinearProbeResult = run();
    assert!(result.top1 >= 95.0, "{result:?}");
    assert_eq!((result.n_train, result.n_val, result.feature_dim, result.n_classes), (400, 200, 16, 4));
    assert_eq!(result.top1_per_lr.len(), OFFICIAL_LR_GRID.len());
    let scaled: Vec<f64> = OFFICIAL_LR_GRID.iter().map(|lr| lr * 32.0 / 256.0).collect();
    assert!(scaled.contains(&result.best_lr) && OFFICIAL_LR_GRID.contains(&result.best_base_lr));
    let best = result.top1_per_lr.iter().map(|(_, a)| *a).fold(0.0, f64::max);
    assert_eq!(result.top1, best);
    assert!((1..=10).contains(&result.best_epoch));
    assert!(result.protocol.starts_with("blobs; 13 linear classifiers"), "{}", result.protocol);
    assert_eq!(run(), result, "deterministic under a seed");

    // Selection over the grid: a rate too small to move the N(0, 0.01) weights loses to a useful one.
    let grid = ProbeConfig { lr_grid: vec![1e-9, 1.0], ..config.clone() };
    let r = train_linear_probe((&train_x, &train_y), (&val_x, &val_y), Some(4), &grid, "blobs").unwrap();
    assert_eq!((r.best_base_lr, r.best_lr), (1.0, 32.0 / 256.0));
    assert!(r.top1_per_lr[0].1 < 80.0 && r.top1_per_lr[1].1 >= 95.0, "{r:?}");
    let json = serde_json::to_value(&r).unwrap();
    assert_eq!(json["best_base_lr"], 1.0);

    let err = train_linear_probe((&train_x, &train_y), (&val_x, &val_y), Some(3), &config, "x").unwrap_err();
    assert!(err.to_string().contains("out of range for 3 classes"), "{err}");
}

#[test]
fn linear_probe_end_to_end_on_synthetic_features() {
    let _generator = common::torch_generator();
    let model = tiny_model();
    let feats = |split: &str, n: usize| {
        let stream =
            source::open(&format!("synthetic:{split}?n={n}&res=32&seed=1"), &StreamOptions::default()).unwrap();
        let batches = labelled_batches(stream, "color", 16, |img| resize_center_crop(img, 32, 32));
        extract_features(&model, batches, Protocol::Official { n_blocks: 4 }).unwrap()
    };
    let (tx, ty) = feats("train", 48);
    let (vx, vy) = feats("heldout", 24);
    let config = ProbeConfig { epochs: 2, batch_size: 16, ..ProbeConfig::default() };
    let r =
        train_linear_probe((&tx, &ty), (&vx, &vy), Some(8), &config, &Protocol::Official { n_blocks: 4 }.description())
            .unwrap();
    assert_eq!((r.n_train, r.n_val, r.feature_dim, r.n_classes), (48, 24, 160, 8));
    assert!(r.protocol.starts_with("linear probe §5.2 official n=4"), "{}", r.protocol);
    assert!((0.0..=100.0).contains(&r.top1));
}
