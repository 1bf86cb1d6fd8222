//! Reading and writing `model.safetensors` in the released layout (docs/design.md §2.3): official key names,
//! every parameter F32, the two RoPE `periods` buffers BF16, header metadata `{"format": "pt"}`.
use super::VtpModel;
use crate::io::{read_safetensors, write_safetensors};
use anyhow::Result;
use std::collections::BTreeMap;
use std::path::Path;
use tch::{Kind, Tensor};

/// Every tensor the file must hold: parameters plus persistent buffers, by official name.
fn expected(model: &VtpModel) -> BTreeMap<String, Tensor> {
    let mut all: BTreeMap<String, Tensor> = model.vs.variables().into_iter().collect();
    for (name, t) in model.buffers() {
        all.insert(name, t.shallow_clone());
    }
    all
}

/// Loads `path` into `model`; one error lists every missing, unexpected and mis-shaped key.
pub fn load(model: &mut VtpModel, path: &Path) -> Result<()> {
    let file: BTreeMap<String, Tensor> = read_safetensors(path)?.into_iter().collect();
    crate::io::load_matching(expected(model), &file, path, "its config.json")
}

/// Writes every parameter (F32) and the RoPE periods (BF16), sorted by name, with `{"format": "pt"}`.
pub fn save(model: &VtpModel, path: &Path) -> Result<()> {
    let tensors: Vec<(String, Tensor)> = expected(model)
        .into_iter()
        .map(|(name, t)| {
            let kind = if name.ends_with("rope_embed.periods") { Kind::BFloat16 } else { Kind::Float };
            (name, t.detach().to_kind(kind))
        })
        .collect();
    write_safetensors(path, &tensors, &[("format", "pt")])
}
