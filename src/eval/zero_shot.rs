//! Zero-shot classification exactly as VTP's `tools/test_zero_shot_hf.py` does it (docs/design.md §5.1, §7.8, §7.19):
//! per class, every template filled with the class name is encoded with
//! `get_clip_text_feature(tokens, normalize=True)`, the features are averaged over the templates and
//! L2-normalised again; the columns form `W [Wt, C]`; an image's logits are `100 · I @ W` with
//! `I = get_clip_image_feature(image, normalize=True)`; top-1 / top-5 accuracy in percent.
//!
//! Data come in as [`LabelledBatch`]es (ImageNet-normalised `[B, 3, H, W]` + labels); [`labelled_batches`]
//! makes them from any sample stream ([`crate::data::source::open`]) with a preprocessing function such as
//! [`squash_resize`] (§5.1's `Resize((256, 256))`). Runs in f32 (the official script defaults to bf16
//! autocast).

use anyhow::{bail, Context, Result};
use image::imageops::FilterType;
use image::RgbImage;
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use crate::data::image::{prepare_rgb, Fit, ImageTensor};
use crate::data::source;
use crate::data::stream::StreamOptions;
use crate::data::Sample;
use crate::model::text::token_ids;
use crate::model::VtpModel;
use crate::tokenizer::ClipTokenizer;

use super::classnames::{self, prompts, ResolvedClassSet, CLASS_PLACEHOLDER};

/// The fixed logit scale of the zero-shot tool (docs/design.md §5.1, §7.19), not `exp(logit_scale)`.
pub const LOGIT_SCALE: f64 = 100.0;

/// The square side §5.1 squashes every image to.
pub const ZERO_SHOT_IMAGE_SIZE: u32 = 256;

/// Classes encoded per text batch when building the classifier (the tool's 10; docs/design.md §5.1).
pub const DEFAULT_CLASS_BATCH: usize = 10;

/// One batch of evaluation data: ImageNet-normalised images `[B, 3, H, W]` (any device) and their labels.
pub type LabelledBatch = (Tensor, Vec<i64>);

/// Zero-shot accuracy on a labelled set (docs/design.md §5.1). Accuracies are percentages.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ZeroShotResult {
    /// What was measured, e.g. `zero-shot §5.1 (1000 classes × 80 templates, ...)`.
    pub protocol: String,
    /// Top-1 accuracy, percent.
    pub top1: f64,
    /// Top-5 accuracy, percent (100 when there are at most 5 classes).
    pub top5: f64,
    /// Images evaluated.
    pub n_images: usize,
    /// Classes of the classifier.
    pub n_classes: usize,
    /// Templates per class.
    pub n_templates: usize,
}

/// The zero-shot classifier of docs/design.md §5.1: one unit-norm text-feature column per class.
#[derive(Debug)]
pub struct ZeroShotClassifier {
    /// `W [Wt, C]` (f32, on the model's device): column `c` is class `c`'s template-mean, renormalised
    /// text feature.
    pub weights: Tensor,
    /// Class names, index = label.
    pub class_names: Vec<String>,
    /// Templates per class.
    pub n_templates: usize,
}

impl ZeroShotClassifier {
    /// Builds `W` as OpenCLIP's `build_zero_shot_classifier` / the VTP tool do (docs/design.md §5.1): for each batch
    /// of `class_batch` classes, tokenises `class_batch × T` prompts (`{c}` of each template replaced by
    /// the class name; context length of the model), encodes them with
    /// `get_clip_text_feature(normalize=True)`, reshapes to `[b, T, Wt]`, averages over the templates,
    /// divides by the L2 norm, and stacks the rows as columns of `W [Wt, C]`.
    pub fn build(model: &VtpModel, class_names: &[String], templates: &[String], class_batch: usize) -> Result<Self> {
        if class_names.is_empty() {
            bail!("zero-shot classification needs at least one class name");
        }
        if templates.is_empty() {
            bail!("zero-shot classification needs at least one prompt template");
        }
        if let Some(t) = templates.iter().find(|t| !t.contains(CLASS_PLACEHOLDER)) {
            bail!("prompt template '{t}' has no '{CLASS_PLACEHOLDER}' placeholder for the class name");
        }
        let tokenizer = ClipTokenizer::new();
        let context_length = usize::try_from(model.config.text_context_length).context("bad text context length")?;
        let n_templates = templates.len() as i64;
        let rows = tch::no_grad(|| -> Result<Vec<Tensor>> {
            let mut rows = Vec::new();
            for chunk in class_names.chunks(class_batch.max(1)) {
                let texts: Vec<String> = chunk.iter().flat_map(|c| prompts(templates, c)).collect();
                let texts: Vec<&str> = texts.iter().map(String::as_str).collect();
                let tokens = token_ids(&tokenizer, &texts, context_length).to_device(model.device());
                let features = model.get_clip_text_feature(&tokens, true)?.to_kind(Kind::Float);
                let width = features.size()[1];
                let mean = features.view([chunk.len() as i64, n_templates, width]).mean_dim(1, false, None::<Kind>);
                // `class_embeddings / class_embeddings.norm(dim=1, keepdim=True)` (no epsilon).
                let norm = mean.norm_scalaropt_dim(2, [1i64].as_slice(), true);
                rows.push(mean / norm);
            }
            Ok(rows)
        })?;
        let weights = Tensor::cat(&rows, 0).tr().contiguous();
        Ok(Self { weights, class_names: class_names.to_vec(), n_templates: templates.len() })
    }

    /// Number of classes `C`.
    pub fn n_classes(&self) -> usize {
        self.class_names.len()
    }

    /// `100 · I @ W` for already normalised image features `[B, Wt]` ([`classify`]).
    pub fn logits(&self, image_features: &Tensor) -> Tensor {
        classify(image_features, &self.weights)
    }

    /// The protocol label every reported number carries.
    pub fn protocol(&self) -> String {
        format!(
            "zero-shot §5.1 ({} classes × {} templates, template-mean renormalised text features, \
             top-k of 100·I·W, I = normalised CLIP image features, f32)",
            self.n_classes(),
            self.n_templates
        )
    }

    /// Top-1 / top-5 accuracy over every batch of `images` (docs/design.md §5.1): image features from
    /// `get_clip_image_feature(normalize=True)` (images moved to the model's device), logits
    /// [`classify`], hits [`topk_hits`]. A label outside `0..C` is an error.
    pub fn evaluate<I>(&self, model: &VtpModel, images: I) -> Result<ZeroShotResult>
    where
        I: IntoIterator<Item = Result<LabelledBatch>>,
    {
        let (mut n, mut hits1, mut hits5) = (0usize, 0usize, 0usize);
        for batch in images {
            let (image, labels) = batch?;
            if image.size()[0] != labels.len() as i64 {
                bail!("a batch holds {} images but {} labels", image.size()[0], labels.len());
            }
            let logits = tch::no_grad(|| -> Result<Tensor> {
                let features = model.get_clip_image_feature(&image.to_device(model.device()), true)?;
                Ok(self.logits(&features.to_kind(Kind::Float)))
            })?;
            let hits = topk_hits(&logits, &labels, &[1, 5])?;
            hits1 += hits[0];
            hits5 += hits[1];
            n += labels.len();
        }
        let percent = |h: usize| if n == 0 { 0.0 } else { 100.0 * h as f64 / n as f64 };
        Ok(ZeroShotResult {
            protocol: self.protocol(),
            top1: percent(hits1),
            top5: percent(hits5),
            n_images: n,
            n_classes: self.n_classes(),
            n_templates: self.n_templates,
        })
    }
}

/// The zero-shot protocol (docs/design.md §5.1) on a data source, as `vtp eval` and the pre-training run's online
/// evaluation both run it: class set `classes` resolved for `spec` ([`classnames::resolve_for_data`]:
/// `folder` reads the class folders of `spec`), then [`evaluate_set`].
pub fn evaluate_source(
    model: &VtpModel,
    spec: &str,
    classes: &str,
    limit: usize,
    batch: usize,
    size: u32,
    progress: impl FnMut(usize),
) -> Result<ZeroShotResult> {
    let set = classnames::resolve_for_data(classes, spec)?;
    evaluate_set(model, spec, &set, limit, batch, size, progress)
}

/// The zero-shot protocol (docs/design.md §5.1) with a resolved class set: the first `limit` samples of `spec`
/// (see [`crate::data::source`]), ground truth `set.label_key`, images squash-resized to `size`,
/// `batch` images per forward; `progress` gets the number of images read so far.
pub fn evaluate_set(
    model: &VtpModel,
    spec: &str,
    set: &ResolvedClassSet,
    limit: usize,
    batch: usize,
    size: u32,
    mut progress: impl FnMut(usize),
) -> Result<ZeroShotResult> {
    let classifier = ZeroShotClassifier::build(model, &set.class_names, &set.templates, DEFAULT_CLASS_BATCH)?;
    let mut read = 0;
    let stream = source::open(spec, &StreamOptions::default())?.take(limit).inspect(|_| {
        read += 1;
        progress(read);
    });
    let batches = labelled_batches(stream, &set.label_key, batch, |img| squash_resize(img, size));
    let mut result = classifier.evaluate(model, batches)?;
    result.protocol = format!("{} on '{spec}' ({})", result.protocol, set.name);
    Ok(result)
}

/// The zero-shot logits `100 · I @ W` (docs/design.md §5.1, §7.19): `image_features [B, Wt]` (normalised),
/// `weights [Wt, C]` -> `[B, C]`. Evaluated as Python does `100.0 * image_features @ W`, left to right.
pub fn classify(image_features: &Tensor, weights: &Tensor) -> Tensor {
    (image_features * LOGIT_SCALE).matmul(weights)
}

/// How many rows of `logits [B, C]` have their label among the `k` largest, for each `k` of `ks`
/// (`k` capped at `C`; ties broken by `topk`'s order, as OpenCLIP's `accuracy`). Labels must lie in `0..C`.
pub fn topk_hits(logits: &Tensor, labels: &[i64], ks: &[i64]) -> Result<Vec<usize>> {
    let size = logits.size();
    let [b, c] = size[..] else { bail!("logits must be [B, C], got {size:?}") };
    if b != labels.len() as i64 {
        bail!("{b} rows of logits but {} labels", labels.len());
    }
    if let Some(bad) = labels.iter().find(|&&l| !(0..c).contains(&l)) {
        bail!("label {bad} is out of range for {c} classes");
    }
    let max_k = ks.iter().copied().max().unwrap_or(1).clamp(1, c.max(1));
    if b == 0 || c == 0 {
        return Ok(vec![0; ks.len()]);
    }
    let (_, top) = logits.to_device(Device::Cpu).to_kind(Kind::Float).topk(max_k, 1, true, true);
    let top = Vec::<i64>::try_from(top.contiguous().view([-1]))?;
    Ok(ks
        .iter()
        .map(|&k| {
            let k = k.clamp(0, max_k) as usize;
            labels
                .iter()
                .enumerate()
                .filter(|(i, l)| top[i * max_k as usize..i * max_k as usize + k].contains(l))
                .count()
        })
        .collect())
}

/// §5.1's image preprocessing: squash to `size`×`size` (`Resize((size, size))`, no aspect-preserving
/// resize, no crop) with bilinear antialiased resampling, then ToTensor + ImageNet normalisation.
///
/// An image already `size`×`size` (e.g. the synthetic scenes at that resolution) is not resampled, as in
/// Pillow. Other sizes use the `image` crate's triangle (bilinear, support scaled when downsampling) filter,
/// which may differ from Pillow's 8-bit fixed-point bilinear by a level in some pixels.
pub fn squash_resize(img: &RgbImage, size: u32) -> Result<ImageTensor> {
    if size == 0 {
        bail!("cannot resize to 0x0");
    }
    if img.width() == 0 || img.height() == 0 {
        bail!("image is empty ({}x{})", img.width(), img.height());
    }
    if img.dimensions() == (size, size) {
        return prepare_rgb(img, 1, Fit::CropToMultiple);
    }
    let resized = image::imageops::resize(img, size, size, FilterType::Triangle);
    prepare_rgb(&resized, 1, Fit::CropToMultiple)
}

/// [`labelled_batches`]' iterator.
pub struct LabelledBatches<I, F> {
    samples: I,
    label_key: String,
    batch_size: usize,
    prepare: F,
    failed: bool,
}

/// Groups a sample stream (e.g. [`crate::data::source::open`]) into [`LabelledBatch`]es of up to
/// `batch_size`: each image goes through `prepare` (e.g. `|img| squash_resize(img, 256)`), its label is
/// `sample.labels[label_key]` (`cls` for WebDataset `.cls` / class folders, `shape` / `color` /
/// `shape_color` for the synthetic scenes). A stream error, a sample without that label, a failed
/// `prepare` or images of different sizes in one batch end the iteration with an error.
/// Limit the number of samples with `Iterator::take` on the stream.
pub fn labelled_batches<I, F>(samples: I, label_key: &str, batch_size: usize, prepare: F) -> LabelledBatches<I, F>
where
    I: Iterator<Item = Result<Sample>>,
    F: FnMut(&RgbImage) -> Result<ImageTensor>,
{
    LabelledBatches { samples, label_key: label_key.to_string(), batch_size: batch_size.max(1), prepare, failed: false }
}

impl<I, F> LabelledBatches<I, F>
where
    I: Iterator<Item = Result<Sample>>,
    F: FnMut(&RgbImage) -> Result<ImageTensor>,
{
    /// The next batch, or `None` at the end of the stream.
    fn next_batch(&mut self) -> Result<Option<LabelledBatch>> {
        let mut images: Vec<ImageTensor> = Vec::with_capacity(self.batch_size);
        let mut labels = Vec::with_capacity(self.batch_size);
        while images.len() < self.batch_size {
            let Some(sample) = self.samples.next() else { break };
            let sample = sample?;
            let label = *sample.labels.get(&self.label_key).with_context(|| {
                format!(
                    "sample '{}' has no label '{}' (it has: {:?})",
                    sample.key,
                    self.label_key,
                    sample.labels.keys()
                )
            })?;
            let image = (self.prepare)(&sample.image).with_context(|| format!("sample '{}'", sample.key))?;
            if let Some(first) = images.first() {
                if (first.height, first.width) != (image.height, image.width) {
                    bail!(
                        "sample '{}' prepares to {}x{}, the batch's images to {}x{}",
                        sample.key,
                        image.width,
                        image.height,
                        first.width,
                        first.height
                    );
                }
            }
            images.push(image);
            labels.push(label);
        }
        if images.is_empty() {
            return Ok(None);
        }
        let (h, w) = (images[0].height as i64, images[0].width as i64);
        let flat: Vec<f32> = images.into_iter().flat_map(|t| t.data).collect();
        let batch = Tensor::from_slice(&flat).view([labels.len() as i64, 3, h, w]);
        Ok(Some((batch, labels)))
    }
}

impl<I, F> Iterator for LabelledBatches<I, F>
where
    I: Iterator<Item = Result<Sample>>,
    F: FnMut(&RgbImage) -> Result<ImageTensor>,
{
    type Item = Result<LabelledBatch>;

    fn next(&mut self) -> Option<Result<LabelledBatch>> {
        if self.failed {
            return None;
        }
        match self.next_batch() {
            Ok(batch) => batch.map(Ok),
            Err(e) => {
                self.failed = true;
                Some(Err(e))
            }
        }
    }
}
