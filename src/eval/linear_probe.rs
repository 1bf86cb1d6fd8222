//! Linear probing on frozen encoder features (docs/design.md §5.2, §7.12), under three named [`Protocol`]s:
//!
//! - [`Protocol::Official`] — DINOv2 / VTP `tools/test_linear_probing_hf.py`: the CLS tokens of the last
//!   `n ∈ {1, 4}` blocks (each through the final norm, shallow → deep) followed by the mean of the last
//!   block's patch tokens, full width, dim `(n + 1)·D`;
//! - [`Protocol::LastCls`] — the final-norm CLS token, `get_last_layer_feature(use_bottleneck=False).cls`, dim D;
//! - [`Protocol::Bottleneck`] — the mean over patches of the 64-d bottlenecked patch tokens (the latents the
//!   generator sees), `get_last_layer_feature(use_bottleneck=True).patch_tokens.mean(1)`.
//!
//! Features are extracted once under `no_grad` ([`extract_features`]) and cached ([`FeatureCache`]), then
//! [`train_linear_probe`] trains one linear classifier per learning rate of a grid simultaneously as §5.2
//! does (weights `N(0, 0.01)`, bias 0, SGD momentum 0.9, weight decay 0, cosine schedule to 0 stepped per
//! iteration, loss = sum of the classifiers' cross-entropies, lr grid × batch/256) and reports the best
//! top-1 over classifiers and epochs on the held-out features.
//!
//! Differences from the official tool, by design (CPU-sized, features cached): no train-time augmentation
//! (the official tool re-crops `RandomResizedCrop(224)` + flip every iteration; here train and val images
//! both go through the eval transform once, [`resize_center_crop`]), an epoch is one shuffled pass over
//! the training features (official: 1250 iterations), defaults of 10 epochs × batch 128, f32 throughout
//! (official: bf16 autocast features). The official tool reports the max over its n=1 and n=4 classifiers
//! together; that is `max(official-n1, official-n4)` here (the classifiers are independent).

use std::f64::consts::PI;
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use anyhow::{anyhow, bail, Context, Error, Result};
use image::imageops::FilterType;
use image::RgbImage;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use safetensors::SafeTensors;
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use crate::data::image::{prepare_rgb, Fit, ImageTensor};
use crate::io::{read_safetensors_map, write_safetensors};
use crate::model::fingerprint::Fnv;
use crate::model::{Layers, VtpModel};

use super::zero_shot::LabelledBatch;

/// §5.2's learning-rate grid, before scaling by `batch/256`.
pub const OFFICIAL_LR_GRID: [f64; 13] = [1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1];

/// §5.2's SGD momentum.
pub const MOMENTUM: f64 = 0.9;

/// §5.2's classifier weight initialisation: `N(0, 0.01²)` (std 0.01).
pub const INIT_STD: f64 = 0.01;

/// §5.2's eval transform: short side resized to this (bicubic) ...
pub const PROBE_RESIZE: u32 = 256;

/// ... then a centre crop of this side (14×14 tokens).
pub const PROBE_CROP: u32 = 224;

/// Which frozen features a linear probe reads (docs/design.md §5.2, §7.11–§7.12).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub enum Protocol {
    /// DINOv2's `create_linear_input(use_n_blocks=n_blocks, use_avgpool=True)` on
    /// `get_intermediate_layers_feature(n, return_class_token=True)` (docs/design.md §5.2): CLS of the last `n_blocks`
    /// blocks, shallow → deep, then the mean of the last block's patch tokens; dim `(n_blocks + 1)·D`.
    /// The official tool uses 1 and 4.
    Official {
        /// How many of the last blocks contribute their CLS token.
        n_blocks: i64,
    },
    /// The final-norm CLS token of the last block (`get_last_layer_feature(use_bottleneck=False)`), dim D.
    LastCls,
    /// The 64-d bottlenecked patch tokens (`get_last_layer_feature(use_bottleneck=True)`) mean-pooled over
    /// the patches: the latent the generator is trained on, summarised per image. (The bottlenecked CLS is
    /// not used: nothing trains it for reconstruction or generation.) Dim `vision_feature_bottleneck`.
    Bottleneck,
}

impl Protocol {
    /// The protocols a report usually runs: official n=1, official n=4, last CLS, bottleneck.
    pub const ALL: [Protocol; 4] = [
        Protocol::Official { n_blocks: 1 },
        Protocol::Official { n_blocks: 4 },
        Protocol::LastCls,
        Protocol::Bottleneck,
    ];

    /// Short name: `official-n1`, `official-n4`, `last-cls`, `bottleneck` ([`Protocol::from_str`] reads it).
    pub fn name(&self) -> String {
        match self {
            Protocol::Official { n_blocks } => format!("official-n{n_blocks}"),
            Protocol::LastCls => "last-cls".into(),
            Protocol::Bottleneck => "bottleneck".into(),
        }
    }

    /// What the features are, for reports: the spec section and the recipe.
    pub fn description(&self) -> String {
        match self {
            Protocol::Official { n_blocks } => format!(
                "linear probe §5.2 official n={n_blocks} (final-norm CLS of the last {n_blocks} block(s) + \
                 avg-pool of the last block's patch tokens, full width)"
            ),
            Protocol::LastCls => "linear probe last-cls (final-norm CLS of the last block, full width)".into(),
            Protocol::Bottleneck => {
                "linear probe bottleneck (mean over patches of the bottlenecked 64-d patch tokens)".into()
            }
        }
    }

    /// The feature width for `model`.
    pub fn feature_dim(&self, model: &VtpModel) -> i64 {
        match self {
            Protocol::Official { n_blocks } => (n_blocks + 1) * model.config.vision_embed_dim,
            Protocol::LastCls => model.config.vision_embed_dim,
            Protocol::Bottleneck => model.config.vision_feature_bottleneck,
        }
    }

    /// Checks the protocol applies to `model` (`1 ≤ n_blocks ≤ depth`).
    pub fn check(&self, model: &VtpModel) -> Result<()> {
        if let Protocol::Official { n_blocks } = self {
            let depth = model.trunk.depth();
            if !(1..=depth).contains(n_blocks) {
                bail!("protocol {} needs 1 <= n <= depth, but the encoder has {depth} blocks", self.name());
            }
        }
        Ok(())
    }

    /// The features `[B, dim]` (f32, on the model's device) of an ImageNet-normalised batch `[B, 3, H, W]`,
    /// without autograd.
    pub fn features(&self, model: &VtpModel, images: &Tensor) -> Result<Tensor> {
        self.check(model)?;
        let images = images.to_device(model.device());
        tch::no_grad(|| {
            let out = match self {
                Protocol::Official { n_blocks } => {
                    let blocks = model.get_intermediate_layers_feature(&images, &Layers::Last(*n_blocks), true)?;
                    let last = blocks.last().context("no block selected")?;
                    let mut parts: Vec<Tensor> = blocks.iter().map(|f| f.cls.shallow_clone()).collect();
                    parts.push(last.patches.mean_dim(1, false, None::<Kind>));
                    Tensor::cat(&parts, -1)
                }
                Protocol::LastCls => model.get_last_layer_feature(&images, false)?.cls,
                Protocol::Bottleneck => {
                    model.get_last_layer_feature(&images, true)?.patches.mean_dim(1, false, None::<Kind>)
                }
            };
            Ok(out.to_kind(Kind::Float))
        })
    }
}

impl fmt::Display for Protocol {
    /// Writes [`Protocol::name`].
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name())
    }
}

impl FromStr for Protocol {
    type Err = Error;

    /// Parses `official-nN` (also `official` = `official-n4`), `last-cls`, `bottleneck`.
    fn from_str(text: &str) -> Result<Self, Error> {
        let lower = text.trim().to_ascii_lowercase().replace('_', "-");
        Ok(match lower.as_str() {
            "official" => Protocol::Official { n_blocks: 4 },
            "last-cls" | "cls" => Protocol::LastCls,
            "bottleneck" => Protocol::Bottleneck,
            other => match other.strip_prefix("official-n").and_then(|n| n.parse::<i64>().ok()) {
                Some(n_blocks) if n_blocks >= 1 => Protocol::Official { n_blocks },
                _ => bail!("unknown linear-probe protocol '{text}' (expected official-n1, official-n4, last-cls or bottleneck)"),
            },
        })
    }
}

impl From<Protocol> for String {
    fn from(p: Protocol) -> String {
        p.name()
    }
}

impl TryFrom<String> for Protocol {
    type Error = Error;

    fn try_from(s: String) -> Result<Self, Error> {
        s.parse()
    }
}

/// Extracts the `protocol` features of every batch: `(features [N, dim] f32, labels [N] i64)`, both on the
/// CPU. Batches are moved to the model's device; autograd is off. No batch at all is an error.
pub fn extract_features<I>(model: &VtpModel, batches: I, protocol: Protocol) -> Result<(Tensor, Tensor)>
where
    I: IntoIterator<Item = Result<LabelledBatch>>,
{
    protocol.check(model)?;
    let (mut features, mut labels) = (Vec::new(), Vec::new());
    for batch in batches {
        let (images, batch_labels) = batch?;
        if images.size().first() != Some(&(batch_labels.len() as i64)) {
            bail!("a batch holds {:?} images but {} labels", images.size(), batch_labels.len());
        }
        features.push(protocol.features(model, &images)?.to_device(Device::Cpu));
        labels.extend(batch_labels);
    }
    if features.is_empty() {
        bail!("no samples to extract {} features from", protocol.name());
    }
    Ok((Tensor::cat(&features, 0), Tensor::from_slice(&labels)))
}

/// What identifies a set of cached features.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheKey {
    /// The model, e.g. [`model_fingerprint`](crate::model::fingerprint::model_fingerprint).
    pub model: String,
    /// The data: source SPEC, split, sample count and preprocessing (e.g. `synthetic:heldout?n=500|crop224`).
    pub data: String,
    /// The protocol ([`Protocol::name`]).
    pub protocol: String,
}

/// Extracted features cached as safetensors files (`features` f32 `[N, D]`, `labels` i64 `[N]`, the key in
/// the header metadata) under `dir`, one file per [`CacheKey`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FeatureCache {
    /// The cache folder (created on first write).
    pub dir: PathBuf,
}

impl FeatureCache {
    /// A cache in `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        FeatureCache { dir: dir.into() }
    }

    /// The file of `key`: `<protocol>-<hash of the key>.safetensors`.
    pub fn path(&self, key: &CacheKey) -> PathBuf {
        let mut h = Fnv::new();
        for part in [&key.model, &key.data, &key.protocol] {
            h.bytes(part.as_bytes());
        }
        let safe: String =
            key.protocol.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' { c } else { '_' }).collect();
        self.dir.join(format!("{safe}-{}.safetensors", h.hex()))
    }

    /// The cached features of `key`, or `None` when there is no readable file whose metadata matches `key`.
    pub fn get(&self, key: &CacheKey) -> Option<(Tensor, Tensor)> {
        let path = self.path(key);
        let bytes = std::fs::read(&path).ok()?;
        let (_, meta) = SafeTensors::read_metadata(&bytes).ok()?;
        let stored = meta.metadata().as_ref()?;
        let matches = |k: &str, v: &str| stored.get(k).map(String::as_str) == Some(v);
        if !(matches("model", &key.model) && matches("data", &key.data) && matches("protocol", &key.protocol)) {
            return None;
        }
        let mut map = read_safetensors_map(&path).ok()?;
        let (features, labels) = (map.remove("features")?, map.remove("labels")?);
        (features.kind() == Kind::Float && labels.kind() == Kind::Int64 && features.size()[0] == labels.size()[0])
            .then_some((features, labels))
    }

    /// Stores features under `key` (atomically).
    pub fn put(&self, key: &CacheKey, features: &Tensor, labels: &Tensor) -> Result<()> {
        let tensors = [
            ("features".to_string(), features.to_device(Device::Cpu).to_kind(Kind::Float)),
            ("labels".to_string(), labels.to_device(Device::Cpu).to_kind(Kind::Int64)),
        ];
        let meta = [("model", key.model.as_str()), ("data", key.data.as_str()), ("protocol", key.protocol.as_str())];
        write_safetensors(&self.path(key), &tensors, &meta)
    }

    /// The cached features of `key`, else `compute()`'s, which are then cached. Both on the CPU.
    pub fn get_or_compute<F>(&self, key: &CacheKey, compute: F) -> Result<(Tensor, Tensor)>
    where
        F: FnOnce() -> Result<(Tensor, Tensor)>,
    {
        if let Some(hit) = self.get(key) {
            return Ok(hit);
        }
        let (features, labels) = compute()?;
        self.put(key, &features, &labels)
            .with_context(|| format!("cannot cache features in '{}'", self.dir.display()))?;
        Ok((features.to_device(Device::Cpu), labels.to_device(Device::Cpu)))
    }
}

/// How [`train_linear_probe`] trains.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ProbeConfig {
    /// Passes over the training features.
    pub epochs: usize,
    /// Mini-batch size (capped at the number of training rows); the lr grid is scaled by `batch/256`.
    pub batch_size: usize,
    /// Base learning rates, one classifier each.
    pub lr_grid: Vec<f64>,
    /// Seed of the weight initialisation and the shuffling.
    pub seed: u64,
}

impl Default for ProbeConfig {
    /// 10 epochs, batch 128, [`OFFICIAL_LR_GRID`], seed 0.
    fn default() -> Self {
        ProbeConfig { epochs: 10, batch_size: 128, lr_grid: OFFICIAL_LR_GRID.to_vec(), seed: 0 }
    }
}

/// The result of a linear probe (docs/design.md §5.2). Accuracies are percentages.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LinearProbeResult {
    /// What was measured: the feature protocol's description and the training recipe.
    pub protocol: String,
    /// The best top-1 accuracy on the held-out features over all classifiers and epochs, percent.
    pub top1: f64,
    /// The (scaled) learning rate of the winning classifier.
    pub best_lr: f64,
    /// Its base rate in the grid, before scaling by `batch/256`.
    pub best_base_lr: f64,
    /// The epoch (1-based) at which it reached `top1`.
    pub best_epoch: usize,
    /// For each (scaled) learning rate, its best top-1 over epochs.
    pub top1_per_lr: Vec<(f64, f64)>,
    /// Training rows.
    pub n_train: usize,
    /// Held-out rows.
    pub n_val: usize,
    /// Feature width.
    pub feature_dim: usize,
    /// Classes (output width).
    pub n_classes: usize,
    /// Epochs trained.
    pub epochs: usize,
    /// Effective batch size.
    pub batch_size: usize,
}

/// Trains one linear classifier per rate of `config.lr_grid` on `train = (features [N, D], labels [N])`,
/// simultaneously as §5.2 does, and evaluates all of them on `val` after every epoch.
///
/// - `n_classes`: output width; `None` = 1 + the largest label of train and val.
/// - Weights `N(0, 0.01)`, biases 0, drawn from a ChaCha8 stream of `config.seed` (as is the shuffling),
///   so a run is deterministic for a given seed and thread count.
/// - Every epoch: a fresh permutation of the training rows, `⌊N / B⌋` mini-batches (`B = min(batch, N)`,
///   drop-last as the official sampler); loss = Σ over classifiers of the mean cross-entropy; SGD with
///   momentum 0.9 (PyTorch's form: `buf = 0.9·buf + g`, `p -= lr·buf`), weight decay 0; learning rate
///   `lr_k · B/256 · ½(1 + cos(π t / T))` at iteration `t` of `T = epochs · ⌊N / B⌋` (`CosineAnnealingLR`,
///   `eta_min = 0`).
/// - Reports the maximum held-out top-1 over classifiers and epochs (the official tool selects on the
///   validation set itself); on ties the earliest epoch, then the smaller rate, wins.
///
/// Runs on the device of the training features. `protocol` labels the result (e.g.
/// [`Protocol::description`]).
pub fn train_linear_probe(
    train: (&Tensor, &Tensor),
    val: (&Tensor, &Tensor),
    n_classes: Option<usize>,
    config: &ProbeConfig,
    protocol: &str,
) -> Result<LinearProbeResult> {
    Ok(train_linear_classifier(train, val, n_classes, config, protocol)?.0)
}

/// A trained linear classifier `argmax(x·W + b)` over features.
#[derive(Debug)]
pub struct LinearClassifier {
    /// `[D, C]`.
    pub weight: Tensor,
    /// `[C]`.
    pub bias: Tensor,
}

impl LinearClassifier {
    /// Predicted class of each row of `features` `[N, D]`, `[N]` int64.
    pub fn predict(&self, features: &Tensor) -> Tensor {
        let x = features.to_kind(Kind::Float).to_device(self.weight.device());
        (x.matmul(&self.weight) + &self.bias).argmax(-1, false)
    }

    /// Top-1 accuracy in percent on `features` `[N, D]` with `labels` `[N]`.
    pub fn accuracy(&self, features: &Tensor, labels: &Tensor) -> f64 {
        let hits = self.predict(features).eq_tensor(&labels.to_device(self.weight.device())).sum(Kind::Int64);
        100.0 * hits.int64_value(&[]) as f64 / labels.size()[0].max(1) as f64
    }
}

/// [`train_linear_probe`], also returning the winning rate's classifier as it stands after the last
/// epoch (to apply to other features, e.g. generated images: its accuracy on `val` at that epoch is
/// [`LinearClassifier::accuracy`], which can be below the reported best-epoch `top1`).
pub fn train_linear_classifier(
    train: (&Tensor, &Tensor),
    val: (&Tensor, &Tensor),
    n_classes: Option<usize>,
    config: &ProbeConfig,
    protocol: &str,
) -> Result<(LinearProbeResult, LinearClassifier)> {
    let (train_x, train_y) = train;
    let device = train_x.device();
    let (val_x, val_y) = (val.0.to_device(device), val.1.to_device(device));
    let [n, dim] = train_x.size()[..] else { bail!("training features must be [N, D], got {:?}", train_x.size()) };
    let [n_val, val_dim] = val_x.size()[..] else { bail!("held-out features must be [N, D], got {:?}", val_x.size()) };
    if train_y.size() != [n] || val_y.size() != [n_val] {
        bail!("labels {:?} / {:?} do not match features [{n}, _] / [{n_val}, _]", train_y.size(), val_y.size());
    }
    if val_dim != dim {
        bail!("held-out features have width {val_dim}, training features {dim}");
    }
    if n == 0 || n_val == 0 {
        bail!("a linear probe needs training and held-out samples (got {n} and {n_val})");
    }
    if config.lr_grid.is_empty() || config.epochs == 0 {
        bail!("a linear probe needs at least one learning rate and one epoch");
    }
    let train_labels = Vec::<i64>::try_from(train_y.to_device(Device::Cpu).to_kind(Kind::Int64))?;
    let val_labels = Vec::<i64>::try_from(val_y.to_device(Device::Cpu).to_kind(Kind::Int64))?;
    let largest = train_labels.iter().chain(&val_labels).copied().max().unwrap_or(0);
    if let Some(bad) = train_labels.iter().chain(&val_labels).find(|&&l| l < 0) {
        bail!("label {bad} is negative");
    }
    let n_classes = n_classes.unwrap_or(largest as usize + 1);
    if largest as usize >= n_classes {
        bail!("label {largest} is out of range for {n_classes} classes");
    }
    let c = n_classes as i64;
    let k = config.lr_grid.len() as i64;
    let batch = (config.batch_size.max(1) as i64).min(n);
    let iters_per_epoch = n / batch;
    let total_iters = (config.epochs as i64 * iters_per_epoch) as f64;
    let scaled: Vec<f64> = config.lr_grid.iter().map(|lr| lr * batch as f64 / 256.0).collect();
    let lr_base = Tensor::from_slice(&scaled).to_kind(Kind::Float).view([k, 1, 1]).to_device(device);

    let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
    let init: Vec<f32> = (0..k * dim * c).map(|_| (gaussian(&mut rng) * INIT_STD) as f32).collect();
    let mut w = Tensor::from_slice(&init).view([k, dim, c]).to_device(device).set_requires_grad(true);
    let mut b = Tensor::zeros([k, 1, c], (Kind::Float, device)).set_requires_grad(true);
    let (mut buf_w, mut buf_b): (Option<Tensor>, Option<Tensor>) = (None, None);

    let x = train_x.to_kind(Kind::Float);
    let y = Tensor::from_slice(&train_labels).to_device(device);
    let val_xf = val_x.to_kind(Kind::Float);
    let mut best_per_lr = vec![(0usize, 0usize); scaled.len()]; // (hits, epoch)
    let mut order: Vec<i64> = (0..n).collect();
    let mut t = 0i64;
    for epoch in 1..=config.epochs {
        order.shuffle(&mut rng);
        let perm = Tensor::from_slice(&order).to_device(device);
        for i in 0..iters_per_epoch {
            let idx = perm.narrow(0, i * batch, batch);
            let (xb, yb) = (x.index_select(0, &idx), y.index_select(0, &idx));
            w.zero_grad();
            b.zero_grad();
            // Autograd on even when the caller (e.g. an evaluation command) runs under no-grad.
            tch::with_grad(|| {
                let logits = xb.unsqueeze(0).matmul(&w) + &b; // [K, B, C]
                let loss = logits.view([k * batch, c]).cross_entropy_for_logits(&yb.repeat([k])) * k as f64;
                loss.backward();
            });
            let factor = 0.5 * (1.0 + (PI * t as f64 / total_iters).cos());
            let lr = &lr_base * factor;
            tch::no_grad(|| {
                sgd_step(&mut w, &mut buf_w, &lr);
                sgd_step(&mut b, &mut buf_b, &lr);
            });
            t += 1;
        }
        let hits = tch::no_grad(|| count_hits(&val_xf, &val_labels, &w, &b));
        for (best, h) in best_per_lr.iter_mut().zip(hits) {
            if h > best.0 {
                *best = (h, epoch);
            }
        }
    }
    let percent = |h: usize| 100.0 * h as f64 / n_val as f64;
    let (winner, &(best_hits, best_epoch)) = best_per_lr
        .iter()
        .enumerate()
        .max_by(|(ia, a), (ib, b)| a.0.cmp(&b.0).then(b.1.cmp(&a.1)).then(ib.cmp(ia)))
        .ok_or_else(|| anyhow!("empty learning-rate grid"))?;
    let classifier = LinearClassifier {
        weight: w.get(winner as i64).detach().copy(),
        bias: b.get(winner as i64).squeeze_dim(0).detach().copy(),
    };
    let result = LinearProbeResult {
        protocol: format!(
            "{protocol}; {k} linear classifiers (lr grid × {batch}/256), SGD momentum 0.9, cosine, \
             {} epochs × batch {batch}, frozen un-augmented features, max held-out top-1 over lrs × epochs",
            config.epochs
        ),
        top1: percent(best_hits),
        best_lr: scaled[winner],
        best_base_lr: config.lr_grid[winner],
        best_epoch: best_epoch.max(1),
        top1_per_lr: scaled.iter().zip(&best_per_lr).map(|(&lr, &(h, _))| (lr, percent(h))).collect(),
        n_train: n as usize,
        n_val: n_val as usize,
        feature_dim: dim as usize,
        n_classes,
        epochs: config.epochs,
        batch_size: batch as usize,
    };
    Ok((result, classifier))
}

/// One PyTorch SGD step with momentum 0.9, no dampening, no weight decay, per-classifier `lr [K, 1, 1]`.
fn sgd_step(p: &mut Tensor, buf: &mut Option<Tensor>, lr: &Tensor) {
    let g = p.grad();
    let next = match buf.take() {
        None => g.detach().copy(),
        Some(prev) => prev * MOMENTUM + g,
    };
    let _ = p.f_sub_(&(lr * &next)).map(|_| ());
    *buf = Some(next);
}

/// Per classifier, how many held-out rows its argmax gets right (in chunks of rows).
fn count_hits(x: &Tensor, labels: &[i64], w: &Tensor, b: &Tensor) -> Vec<usize> {
    let k = w.size()[0] as usize;
    let mut hits = vec![0usize; k];
    let n = x.size()[0];
    let chunk = 1024i64;
    let mut start = 0i64;
    while start < n {
        let len = chunk.min(n - start);
        let pred = (x.narrow(0, start, len).unsqueeze(0).matmul(w) + b).argmax(-1, false); // [K, len]
        let pred = Vec::<i64>::try_from(pred.to_device(Device::Cpu).contiguous().view([-1]))
            .expect("argmax gives int64 values");
        let truth = &labels[start as usize..(start + len) as usize];
        for (ki, h) in hits.iter_mut().enumerate() {
            let row = &pred[ki * len as usize..(ki + 1) * len as usize];
            *h += row.iter().zip(truth).filter(|(p, t)| p == t).count();
        }
        start += len;
    }
    hits
}

/// A standard normal draw (Box–Muller on two uniforms of `rng`).
fn gaussian(rng: &mut ChaCha8Rng) -> f64 {
    let u1: f64 = 1.0 - rng.random::<f64>(); // (0, 1]
    let u2: f64 = rng.random::<f64>();
    (-2.0 * u1.ln()).sqrt() * (2.0 * PI * u2).cos()
}

/// §5.2's eval transform: `Resize(resize, bicubic)` of the short side (long side `int(resize · long /
/// short)`, as torchvision), `CenterCrop(crop)` (torchvision's rounded offsets), ToTensor + ImageNet
/// normalisation. Official sizes: [`PROBE_RESIZE`] / [`PROBE_CROP`].
///
/// An image whose short side already is `resize` is not resampled; otherwise the `image` crate's
/// Catmull-Rom filter (Pillow's bicubic kernel, support scaled when downsampling) is used, which may
/// differ from Pillow's 8-bit fixed-point resampling by a level in some pixels.
pub fn resize_center_crop(img: &RgbImage, resize: u32, crop: u32) -> Result<ImageTensor> {
    let (w, h) = img.dimensions();
    if w == 0 || h == 0 {
        bail!("image is empty ({w}x{h})");
    }
    if crop == 0 || crop > resize {
        bail!("crop {crop} must be positive and at most the resize {resize}");
    }
    let (short, long) = (w.min(h), w.max(h));
    let resized = if short == resize {
        img.clone()
    } else {
        let new_long = ((f64::from(resize) * f64::from(long) / f64::from(short)) as u32).max(resize);
        let (nw, nh) = if w <= h { (resize, new_long) } else { (new_long, resize) };
        image::imageops::resize(img, nw, nh, FilterType::CatmullRom)
    };
    let (rw, rh) = resized.dimensions();
    let offset = |full: u32| (f64::from(full - crop) / 2.0).round_ties_even() as u32;
    let cropped = image::imageops::crop_imm(&resized, offset(rw), offset(rh), crop, crop).to_image();
    prepare_rgb(&cropped, 1, Fit::CropToMultiple)
}
