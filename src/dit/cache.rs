//! The latent cache of `vtp dit extract` (docs/design.md §5.4 "Latent extraction"): a data set encoded once by a
//! tokenizer into safetensors shards of `latents`, `latents_flip` (the horizontally flipped image's
//! latents, as the reference stores them) and `labels`, with a manifest naming the tokenizer (by
//! weight fingerprint), the source and the label set, and the per-channel latent statistics
//! ([`LatentStats`]) that training and sampling apply.
//!
//! Extraction is resumable: shards of `per_shard` samples are written atomically in stream order and
//! the manifest after each, so a restarted extraction skips the samples of the shards it has.
use super::stats::LatentStats;
use crate::data::image::{prepare_rgb, Fit};
use crate::data::source;
use crate::data::stream::StreamOptions;
use crate::data::Sample;
use crate::io::{read_safetensors_map, write_atomic, write_safetensors};
use crate::model::fingerprint::model_fingerprint;
use crate::model::VtpModel;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

/// The manifest file of a cache folder.
pub const MANIFEST: &str = "cache.json";
/// The latent statistics file of a cache folder (and of a DiT checkpoint / export).
pub const STATS: &str = "latent_stats.safetensors";

/// What a cache holds and how it was made.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CacheManifest {
    /// The tokenizer as given (`--model`), so later commands can decode.
    pub tokenizer: String,
    /// [`model_fingerprint`] of the tokenizer's weights and config.
    pub fingerprint: String,
    /// The data source spec.
    pub source: String,
    /// The label set the class labels come from (`shape`, `cls`, …).
    pub label_set: String,
    /// Number of classes: labels are in `0..num_classes`.
    pub num_classes: i64,
    /// Image side the tokenizer encoded (ADM centre crop).
    pub image_size: i64,
    /// `[C, h, w]` of one latent.
    pub latent_shape: [i64; 3],
    /// Samples per shard.
    pub per_shard: usize,
    /// The `--limit` of the extraction (`None`: the whole source).
    #[serde(default)]
    pub limit: Option<usize>,
    /// Samples in each written shard, in order (`shard-00000.safetensors`, …).
    pub shards: Vec<usize>,
    /// Whether the source was read to its end (or `limit` reached).
    pub complete: bool,
}

impl CacheManifest {
    /// Total cached samples.
    pub fn samples(&self) -> usize {
        self.shards.iter().sum()
    }

    /// The file of shard `i`.
    pub fn shard_path(dir: &Path, i: usize) -> PathBuf {
        dir.join(format!("shard-{i:05}.safetensors"))
    }

    /// Reads `dir/cache.json`.
    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join(MANIFEST);
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("'{}' is not a latent cache (no readable {MANIFEST})", dir.display()))?;
        serde_json::from_str(&text).with_context(|| format!("'{}': malformed cache manifest", path.display()))
    }

    fn write(&self, dir: &Path) -> Result<()> {
        write_atomic(&dir.join(MANIFEST), serde_json::to_string_pretty(self)?.as_bytes())
    }
}

/// What `vtp dit extract` reads and how.
#[derive(Clone, Debug)]
pub struct ExtractOptions {
    /// Data source spec (`synthetic:train?n=4096&res=64`, shards, a folder).
    pub source: String,
    /// Label set of the class labels.
    pub label_set: String,
    /// Number of classes of that label set.
    pub num_classes: i64,
    /// Image side (ADM centre crop) the tokenizer encodes.
    pub image_size: u32,
    /// Images per encoder batch.
    pub batch: usize,
    /// Samples per shard.
    pub per_shard: usize,
    /// Stop after this many samples (`None`: the whole source).
    pub limit: Option<usize>,
    /// Reader threads.
    pub workers: usize,
}

/// Encodes `opts.source` with `model` into `out`, continuing a partial cache of the same tokenizer,
/// source and label set; `progress(done)` after every batch. Writes the statistics when complete.
pub fn extract(
    model: &VtpModel,
    tokenizer: &str,
    opts: &ExtractOptions,
    out: &Path,
    mut progress: impl FnMut(usize),
) -> Result<CacheManifest> {
    if opts.batch == 0 || opts.per_shard == 0 {
        bail!("batch and per-shard sizes must be at least 1");
    }
    std::fs::create_dir_all(out).with_context(|| format!("cannot create cache folder '{}'", out.display()))?;
    let mut manifest = fresh_manifest(model, tokenizer, opts)?;
    if out.join(MANIFEST).exists() {
        let existing = CacheManifest::read(out)?;
        check_same_cache(&existing, &manifest, out)?;
        manifest = existing;
    }
    if !manifest.complete {
        encode_shards(model, opts, out, &mut manifest, &mut progress)?;
    }
    if manifest.samples() == 0 {
        bail!("the source '{}' yields no images", opts.source);
    }
    if !out.join(STATS).exists() {
        LatentStats::compute(&LatentCache::load_latents(out, &manifest)?)?.save(&out.join(STATS))?;
    }
    Ok(manifest)
}

/// The manifest of a new cache of `model` over `opts` (no shards yet).
fn fresh_manifest(model: &VtpModel, tokenizer: &str, opts: &ExtractOptions) -> Result<CacheManifest> {
    let c = &model.config;
    let grid = opts.image_size as i64 / c.vision_patch_size;
    Ok(CacheManifest {
        tokenizer: tokenizer.to_string(),
        fingerprint: model_fingerprint(model)?,
        source: opts.source.clone(),
        label_set: opts.label_set.clone(),
        num_classes: opts.num_classes,
        image_size: opts.image_size as i64,
        latent_shape: [c.vision_feature_bottleneck, grid, grid],
        per_shard: opts.per_shard,
        limit: opts.limit,
        shards: Vec::new(),
        complete: false,
    })
}

/// A partial cache is continued only by the same extraction.
fn check_same_cache(existing: &CacheManifest, new: &CacheManifest, dir: &Path) -> Result<()> {
    let same = existing.fingerprint == new.fingerprint
        && existing.source == new.source
        && existing.label_set == new.label_set
        && existing.num_classes == new.num_classes
        && existing.image_size == new.image_size
        && existing.per_shard == new.per_shard
        && existing.limit == new.limit;
    if !same {
        bail!(
            "'{}' holds a cache of another extraction (tokenizer {}, source '{}', labels '{}' of {} classes, \
             {} px, {} per shard, limit {:?}); choose another --out",
            dir.display(),
            existing.fingerprint,
            existing.source,
            existing.label_set,
            existing.num_classes,
            existing.image_size,
            existing.per_shard,
            existing.limit
        );
    }
    Ok(())
}

/// Reads the source past the shards already written and encodes the rest, shard by shard.
fn encode_shards(
    model: &VtpModel,
    opts: &ExtractOptions,
    out: &Path,
    manifest: &mut CacheManifest,
    progress: &mut impl FnMut(usize),
) -> Result<()> {
    let stream_opts = StreamOptions { workers: opts.workers.max(1), ..StreamOptions::default() };
    let mut stream = source::open(&opts.source, &stream_opts)?;
    let done = manifest.samples();
    for skipped in stream.by_ref().take(done) {
        skipped?;
    }
    progress(done);
    let limit = opts.limit.unwrap_or(usize::MAX);
    while manifest.samples() < limit {
        let want = opts.per_shard.min(limit - manifest.samples());
        let samples: Vec<Sample> = stream.by_ref().take(want).collect::<Result<_>>()?;
        if samples.is_empty() {
            break;
        }
        let (n, start) = (samples.len(), manifest.samples());
        write_shard(model, opts, &samples, &CacheManifest::shard_path(out, manifest.shards.len()), progress, start)?;
        manifest.shards.push(n);
        manifest.write(out)?;
        progress(manifest.samples());
        if n < want {
            break;
        }
    }
    manifest.complete = true;
    manifest.write(out)
}

/// Encodes one shard's samples (and their flipped copies) and writes it atomically.
fn write_shard(
    model: &VtpModel,
    opts: &ExtractOptions,
    samples: &[Sample],
    path: &Path,
    progress: &mut impl FnMut(usize),
    offset: usize,
) -> Result<()> {
    let _guard = tch::no_grad_guard();
    let (mut latents, mut flipped, mut labels) = (Vec::new(), Vec::new(), Vec::new());
    for (i, chunk) in samples.chunks(opts.batch).enumerate() {
        let x = image_batch(chunk, model.config.vision_patch_size as u32, opts.image_size)?.to_device(model.device());
        latents.push(model.get_reconstruction_latents(&x)?.to_device(Device::Cpu));
        flipped.push(model.get_reconstruction_latents(&x.flip([3]))?.to_device(Device::Cpu));
        for s in chunk {
            labels.push(label_of(s, &opts.label_set, opts.num_classes)?);
        }
        progress(offset + i * opts.batch + chunk.len());
    }
    let tensors = vec![
        ("latents".to_string(), Tensor::cat(&latents, 0)),
        ("latents_flip".to_string(), Tensor::cat(&flipped, 0)),
        ("labels".to_string(), Tensor::from_slice(&labels)),
    ];
    write_safetensors(path, &tensors, &[("format", "vtp-latent-cache")])
}

/// `[B, 3, S, S]` ImageNet-normalised, ADM-centre-cropped images of `samples`.
fn image_batch(samples: &[Sample], patch: u32, size: u32) -> Result<Tensor> {
    let images: Vec<Tensor> = samples
        .iter()
        .map(|s| {
            let img = prepare_rgb(&s.image, patch, Fit::AdmCenterCrop(size))
                .with_context(|| format!("sample '{}'", s.key))?;
            Ok(Tensor::from_slice(&img.data).view([3, img.height as i64, img.width as i64]))
        })
        .collect::<Result<_>>()?;
    Ok(Tensor::stack(&images, 0))
}

/// The class label of `sample` in `label_set`, checked against the class count.
fn label_of(sample: &Sample, label_set: &str, num_classes: i64) -> Result<i64> {
    let label = *sample.labels.get(label_set).with_context(|| {
        let sets: Vec<&str> = sample.labels.keys().map(String::as_str).collect();
        format!("sample '{}' has no '{label_set}' label (it has: {})", sample.key, sets.join(", "))
    })?;
    if !(0..num_classes).contains(&label) {
        bail!("sample '{}': label {label} is outside the class range 0..{num_classes}", sample.key);
    }
    Ok(label)
}

/// A cache loaded into memory for training: every latent, its flipped copy and its label.
pub struct LatentCache {
    /// The cache's manifest.
    pub manifest: CacheManifest,
    /// The statistics stored with the cache.
    pub stats: LatentStats,
    /// `[N, C, h, w]` f32.
    pub latents: Tensor,
    /// `[N, C, h, w]` f32, of the flipped images.
    pub latents_flip: Tensor,
    /// `[N]` int64.
    pub labels: Tensor,
}

impl LatentCache {
    /// Opens a complete cache folder, checking every shard against the manifest.
    pub fn open(dir: &Path) -> Result<Self> {
        let manifest = CacheManifest::read(dir)?;
        if !manifest.complete {
            bail!("'{}' is an unfinished latent cache: run `vtp dit extract` again to complete it", dir.display());
        }
        let stats_path = dir.join(STATS);
        let stats = LatentStats::load(&stats_path)
            .with_context(|| format!("latent cache '{}': statistics missing or unreadable", dir.display()))?;
        let (mut latents, mut flipped, mut labels) = (Vec::new(), Vec::new(), Vec::new());
        for (i, &n) in manifest.shards.iter().enumerate() {
            let [l, f, y] = read_shard(&CacheManifest::shard_path(dir, i), &manifest, n)?;
            latents.push(l);
            flipped.push(f);
            labels.push(y);
        }
        let labels = Tensor::cat(&labels, 0);
        let (lo, hi) = (labels.min().int64_value(&[]), labels.max().int64_value(&[]));
        if lo < 0 || hi >= manifest.num_classes {
            bail!("latent cache '{}': labels {lo}..={hi} fall outside 0..{}", dir.display(), manifest.num_classes);
        }
        Ok(Self { latents: Tensor::cat(&latents, 0), latents_flip: Tensor::cat(&flipped, 0), labels, manifest, stats })
    }

    /// Every non-flipped latent of a cache, `[N, C, h, w]` (for the statistics).
    fn load_latents(dir: &Path, manifest: &CacheManifest) -> Result<Tensor> {
        let shards = manifest.shards.iter().enumerate();
        let parts: Vec<Tensor> = shards
            .map(|(i, &n)| Ok(read_shard(&CacheManifest::shard_path(dir, i), manifest, n)?[0].shallow_clone()))
            .collect::<Result<_>>()?;
        Ok(Tensor::cat(&parts, 0))
    }

    /// The cache with its tensors on `device`.
    pub fn to_device(self, device: Device) -> Self {
        Self {
            latents: self.latents.to_device(device),
            latents_flip: self.latents_flip.to_device(device),
            labels: self.labels.to_device(device),
            ..self
        }
    }

    /// Number of cached samples.
    pub fn len(&self) -> i64 {
        self.labels.size()[0]
    }

    /// Whether the cache holds no sample.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The normalised training batch of `indices` (`[B]` int64): each sample's latent or, where
    /// `flip` (`[B]` bool) is set, its flipped copy, then `(z − mean)/std`; with the labels.
    pub fn batch(&self, indices: &Tensor, flip: &Tensor) -> (Tensor, Tensor) {
        let plain = self.latents.index_select(0, indices);
        let flipped = self.latents_flip.index_select(0, indices);
        let z = flipped.where_self(&flip.view([-1, 1, 1, 1]), &plain);
        (self.stats.normalise(&z), self.labels.index_select(0, indices))
    }
}

/// `[latents, latents_flip, labels]` of one shard, checked for shape, count and dtype.
fn read_shard(path: &Path, manifest: &CacheManifest, n: usize) -> Result<[Tensor; 3]> {
    let mut map = read_safetensors_map(path)?;
    let [c, h, w] = manifest.latent_shape;
    let mut take = |name: &str, shape: &[i64], kind: Kind| -> Result<Tensor> {
        let t = map.remove(name).with_context(|| format!("'{}' has no '{name}' tensor", path.display()))?;
        if t.size() != shape || t.kind() != kind {
            bail!("'{}': '{name}' is {:?} {:?}, expected {kind:?} {shape:?}", path.display(), t.kind(), t.size());
        }
        Ok(t)
    };
    let n = n as i64;
    Ok([
        take("latents", &[n, c, h, w], Kind::Float)?,
        take("latents_flip", &[n, c, h, w], Kind::Float)?,
        take("labels", &[n], Kind::Int64)?,
    ])
}
