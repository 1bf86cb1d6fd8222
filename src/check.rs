//! Parity check against a reference dump in the fixtures' key convention
//! (`../shared/fixtures/README.md` §2): `in.*` tensors are inputs, every `out.<method>.<options>`
//! tensor is recomputed with the same method of [`VtpModel`] and compared.
use crate::model::encoder::tokens_to_map;
use crate::model::{Layers, VtpModel};
use anyhow::{bail, Context, Result};
use std::collections::HashMap;
use tch::{Kind, Tensor};

/// One reference output compared with ours.
#[derive(Debug, Clone)]
pub struct Comparison {
    /// The `out.*` key.
    pub key: String,
    /// `‖ours − ref‖₂ / ‖ref‖₂` (0 when both are zero).
    pub rel_l2: f64,
    /// `max |ours − ref|`.
    pub max_abs: f64,
}

/// Relative L2 error `‖a − b‖ / ‖b‖` in f64.
pub fn rel_l2(ours: &Tensor, reference: &Tensor) -> f64 {
    let a = ours.to_kind(Kind::Double).to_device(tch::Device::Cpu);
    let b = reference.to_kind(Kind::Double);
    let diff = (&a - &b).norm().double_value(&[]);
    let base = b.norm().double_value(&[]);
    if base == 0.0 {
        diff
    } else {
        diff / base
    }
}

/// Recomputes every `out.*` tensor of `io` with `model` (under no-grad) and compares.
pub fn check_reference(model: &VtpModel, io: &HashMap<String, Tensor>) -> Result<Vec<Comparison>> {
    let _guard = tch::no_grad_guard();
    let mut keys: Vec<&String> = io.keys().filter(|k| k.starts_with("out.")).collect();
    keys.sort();
    if keys.is_empty() {
        bail!("the reference holds no 'out.*' tensors");
    }
    keys.into_iter()
        .map(|key| {
            let reference = &io[key];
            let ours = compute(model, key, io).with_context(|| format!("reference key '{key}'"))?;
            if ours.size() != reference.size() {
                bail!("reference key '{key}': shape {:?}, reference {:?}", ours.size(), reference.size());
            }
            let max_abs = (ours.to_kind(Kind::Double).to_device(tch::Device::Cpu) - reference.to_kind(Kind::Double))
                .abs()
                .max()
                .double_value(&[]);
            Ok(Comparison { key: key.clone(), rel_l2: rel_l2(&ours, reference), max_abs })
        })
        .collect()
}

fn input(io: &HashMap<String, Tensor>, key: &str, model: &VtpModel) -> Result<Tensor> {
    let t = io.get(key).with_context(|| format!("input '{key}' is missing"))?;
    Ok(t.to_device(model.device()))
}

fn flag(part: &str, name: &str) -> Result<bool> {
    match part.strip_prefix(name) {
        Some("true") => Ok(true),
        Some("false") => Ok(false),
        _ => bail!("expected '{name}true' or '{name}false', got '{part}'"),
    }
}

/// Computes the output named by one `out.*` key.
fn compute(model: &VtpModel, key: &str, io: &HashMap<String, Tensor>) -> Result<Tensor> {
    let parts: Vec<&str> = key.split('.').skip(1).collect();
    let image = |size: &str| input(io, &format!("in.image.{size}"), model);
    match parts[..] {
        ["forward", "clip", "logit_scale"] => Ok(model.logit_params()?.scale),
        ["forward", "clip", "logit_bias"] => model.logit_params()?.bias.context("the model has no logit_bias"),
        ["get_clip_text_feature", norm] => {
            model.get_clip_text_feature(&input(io, "in.text", model)?, flag(norm, "normalize_")?)
        }
        ["get_reconstruction_latents", size] => model.get_reconstruction_latents(&image(size)?),
        ["get_latents_decoded_images", "from_reconstruction", size] => {
            // Decode our own latents: their strided layout (a view of the patch tokens) is what the
            // reference decoded, and it decides the summation order of the 1x1 convolution.
            model.get_latents_decoded_images(&model.get_reconstruction_latents(&image(size)?)?)
        }
        ["get_latents_decoded_images", "from_random", size] => {
            model.get_latents_decoded_images(&input(io, &format!("in.latent.{size}"), model)?)
        }
        ["get_last_layer_feature", bottleneck, which, size] => {
            let f = model.get_last_layer_feature(&image(size)?, flag(bottleneck, "use_bottleneck_")?)?;
            match which {
                "cls_token" => Ok(f.cls),
                "patch_tokens" => Ok(f.patches),
                _ => bail!("unknown feature '{which}'"),
            }
        }
        ["get_intermediate_layers_feature", n, reshape, class_token, norm, size, index, ref rest @ ..] => {
            let layers = match n {
                "n_1" | "n_2" | "n_3" | "n_4" => Layers::Last(n[2..].parse()?),
                _ => match n.strip_prefix("n_list") {
                    Some(list) => Layers::Indices(list.split('_').map(str::parse).collect::<Result<_, _>>()?),
                    None => bail!("unknown layer selection '{n}'"),
                },
            };
            let (reshape, with_cls) = (flag(reshape, "reshape_")?, flag(class_token, "class_token_")?);
            let features = model.get_intermediate_layers_feature(&image(size)?, &layers, flag(norm, "norm_")?)?;
            let f = features.into_iter().nth(index.parse()?).context("layer index out of range")?;
            let patches = if reshape { tokens_to_map(&f.patches, f.grid) } else { f.patches };
            match (with_cls, rest) {
                (false, []) | (true, ["patch"]) => Ok(patches),
                (true, ["cls"]) => Ok(f.cls),
                _ => bail!("unexpected suffix {rest:?}"),
            }
        }
        ["get_clip_image_feature", norm, size] => {
            model.get_clip_image_feature(&image(size)?, flag(norm, "normalize_")?)
        }
        ["get_clip_logits", which, size] => {
            let (per_image, per_text) = model.get_clip_logits(&image(size)?, &input(io, "in.text", model)?)?;
            match which {
                "logits_per_image" => Ok(per_image),
                "logits_per_text" => Ok(per_text),
                _ => bail!("unknown logits '{which}'"),
            }
        }
        _ => bail!("unknown reference key"),
    }
}
