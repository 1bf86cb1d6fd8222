//! `vtp zero-shot` and `vtp tokenize`: the CLIP side of the tokenizer.
use super::images::{batches, to_tensor, ImageInputs};
use super::ModelArgs;
use crate::model::text::token_ids;
use crate::tokenizer::{ClipTokenizer, DEFAULT_CONTEXT_LENGTH};
use anyhow::{bail, Result};
use clap::Args;
use tch::{Device, Kind};

/// The fixed logit scale of VTP's zero-shot tool (docs/design.md §5.1, §7.19), not `exp(logit_scale)`.
pub const ZERO_SHOT_LOGIT_SCALE: f64 = 100.0;

/// Arguments of `vtp zero-shot`.
#[derive(Args, Debug)]
pub struct ZeroShotArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    images: ImageInputs,
    /// Comma-separated class labels, e.g. "a dog,a cat".
    #[arg(long, required = true)]
    labels: String,
    /// Prompt template; `{}` is replaced by each label.
    #[arg(long, default_value = "{}")]
    template: String,
}

/// Arguments of `vtp tokenize`.
#[derive(Args, Debug)]
pub struct TokenizeArgs {
    /// Row length: truncated rows end with the end-of-text id, shorter rows are padded with 0.
    #[arg(long, default_value_t = DEFAULT_CONTEXT_LENGTH)]
    context_length: usize,
    /// Texts to tokenize.
    #[arg(required = true)]
    texts: Vec<String>,
}

/// Print one line of ids per text.
pub fn tokenize(a: &TokenizeArgs) -> Result<()> {
    if a.context_length < 2 {
        bail!("--context-length must be at least 2 (start and end tokens)");
    }
    let tokenizer = ClipTokenizer::new();
    let texts: Vec<&str> = a.texts.iter().map(String::as_str).collect();
    for row in tokenizer.tokenize(&texts, a.context_length) {
        let ids: Vec<String> = row.iter().map(i64::to_string).collect();
        println!("{}", ids.join(" "));
    }
    Ok(())
}

/// Classify every input image among the labels; prints the probabilities.
pub fn zero_shot(a: &ZeroShotArgs, device: Device) -> Result<()> {
    let model = a.model.load(device)?;
    let labels: Vec<&str> = a.labels.split(',').map(str::trim).filter(|s| !s.is_empty()).collect();
    if labels.is_empty() {
        bail!("--labels holds no label");
    }
    if a.images.inputs.is_empty() {
        bail!("no input images given");
    }
    let prompts: Vec<String> = labels.iter().map(|l| a.template.replace("{}", l)).collect();
    let prompts: Vec<&str> = prompts.iter().map(String::as_str).collect();
    let context_length = model.config.text_context_length as usize;
    let text = token_ids(&ClipTokenizer::new(), &prompts, context_length).to_device(device);
    let text_features = model.get_clip_text_feature(&text, true)?;
    let images = a.images.load(model.config.vision_patch_size)?;
    for chunk in batches(&images, a.images.batch) {
        let image_features = model.get_clip_image_feature(&to_tensor(chunk, device), true)?;
        let probs = (image_features.matmul(&text_features.tr()) * ZERO_SHOT_LOGIT_SCALE).softmax(-1, Kind::Float);
        for (i, named) in chunk.iter().enumerate() {
            let p = Vec::<f32>::try_from(probs.get(i as i64).to_device(Device::Cpu))?;
            let best = (0..labels.len()).max_by(|&x, &y| p[x].total_cmp(&p[y])).unwrap_or(0);
            let cells: Vec<String> = labels.iter().zip(&p).map(|(l, v)| format!("{l}: {v:.4}")).collect();
            println!("{}: {} (top: {})", named.name, cells.join(", "), labels[best]);
        }
    }
    Ok(())
}
