//! File helpers shared by every command: atomic writes, typed JSON reads and safetensors <-> tch tensors.
use anyhow::{bail, Context, Result};
use safetensors::{Dtype, SafeTensors};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use tch::{Device, Kind, Tensor};

/// Writes `bytes` to `path` atomically (a temporary file in the same folder, then a rename), creating
/// parent folders, so an interrupted write never leaves a half-written file behind.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let parent = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).with_context(|| format!("cannot create folder '{}'", parent.display()))?;
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = parent.join(format!(".{name}.tmp{}", std::process::id()));
    std::fs::write(&tmp, bytes).with_context(|| format!("cannot write '{}'", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write '{}'", path.display()))
}

/// The JSON file at `path` read as a `T` (e.g. a report another command wrote).
pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read '{}'", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("'{}' is malformed", path.display()))
}

fn kind_of(dtype: Dtype) -> Option<Kind> {
    Some(match dtype {
        Dtype::F32 => Kind::Float,
        Dtype::F64 => Kind::Double,
        Dtype::BF16 => Kind::BFloat16,
        Dtype::F16 => Kind::Half,
        Dtype::I64 => Kind::Int64,
        Dtype::I32 => Kind::Int,
        Dtype::I16 => Kind::Int16,
        Dtype::I8 => Kind::Int8,
        Dtype::U8 => Kind::Uint8,
        Dtype::BOOL => Kind::Bool,
        _ => return None,
    })
}

fn dtype_of(kind: Kind) -> Result<Dtype> {
    Ok(match kind {
        Kind::Float => Dtype::F32,
        Kind::Double => Dtype::F64,
        Kind::BFloat16 => Dtype::BF16,
        Kind::Half => Dtype::F16,
        Kind::Int64 => Dtype::I64,
        Kind::Int => Dtype::I32,
        Kind::Int16 => Dtype::I16,
        Kind::Int8 => Dtype::I8,
        Kind::Uint8 => Dtype::U8,
        Kind::Bool => Dtype::BOOL,
        other => bail!("cannot store tensors of kind {other:?} in safetensors"),
    })
}

/// Reads every tensor of a safetensors file onto the CPU, keeping its stored dtype.
/// A missing, truncated or corrupt file is a one-line error naming it.
pub fn read_safetensors(path: &Path) -> Result<Vec<(String, Tensor)>> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read '{}'", path.display()))?;
    let file = SafeTensors::deserialize(&bytes)
        .map_err(|e| anyhow::anyhow!("'{}' is not a valid safetensors file: {e}", path.display()))?;
    let mut out = Vec::with_capacity(file.len());
    for (name, view) in file.tensors() {
        let kind = kind_of(view.dtype()).with_context(|| {
            format!("'{}': tensor '{name}' has unsupported dtype {:?}", path.display(), view.dtype())
        })?;
        let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
        out.push((name, Tensor::from_data_size(view.data(), &shape, kind)));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

/// Reads a safetensors file into a name -> tensor map.
pub fn read_safetensors_map(path: &Path) -> Result<HashMap<String, Tensor>> {
    Ok(read_safetensors(path)?.into_iter().collect())
}

/// Raw little-endian bytes of a tensor (moved to the CPU, made contiguous).
pub fn tensor_bytes(t: &Tensor) -> Vec<u8> {
    let flat = t.to_device(Device::Cpu).contiguous().reshape([-1]).view_dtype(Kind::Uint8);
    Vec::<u8>::try_from(&flat).expect("a uint8 CPU tensor converts to bytes")
}

/// Writes tensors as safetensors with the given header metadata, atomically; dtypes are kept.
pub fn write_safetensors(path: &Path, tensors: &[(String, Tensor)], metadata: &[(&str, &str)]) -> Result<()> {
    let mut owned = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        let dtype = dtype_of(t.kind())?;
        let shape: Vec<usize> = t.size().iter().map(|&d| d as usize).collect();
        owned.push((name.clone(), dtype, shape, tensor_bytes(t)));
    }
    let views: Vec<(String, safetensors::tensor::TensorView)> = owned
        .iter()
        .map(|(n, d, s, b)| Ok((n.clone(), safetensors::tensor::TensorView::new(*d, s.clone(), b)?)))
        .collect::<Result<_, safetensors::SafeTensorError>>()?;
    let meta: HashMap<String, String> = metadata.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    let bytes = safetensors::serialize(views, Some(meta))?;
    write_atomic(path, &bytes)
}

/// At most 8 of `items`, comma-separated, with a count of the rest (keeps error messages short).
pub fn name_list(items: &[String]) -> String {
    const SHOWN: usize = 8;
    let mut out = items.iter().take(SHOWN).cloned().collect::<Vec<_>>().join(", ");
    if items.len() > SHOWN {
        out.push_str(&format!(" (+{} more)", items.len() - SHOWN));
    }
    out
}

/// Copies the tensors of a weight file (`file`, as read from `path`) into a model's `want` (its
/// parameters and buffers by name) after checking that the names and shapes match exactly and every
/// stored tensor is floating point; otherwise one error listing the missing, unexpected, mis-shaped
/// and non-float names, saying that `path` does not match `against` (e.g. "its config.json").
pub fn load_matching(
    want: BTreeMap<String, Tensor>,
    file: &BTreeMap<String, Tensor>,
    path: &Path,
    against: &str,
) -> Result<()> {
    let missing: Vec<String> = want.keys().filter(|k| !file.contains_key(*k)).cloned().collect();
    let unexpected: Vec<String> = file.keys().filter(|k| !want.contains_key(*k)).cloned().collect();
    let misshaped: Vec<String> = want
        .iter()
        .filter_map(|(k, t)| {
            let f = file.get(k)?;
            (f.size() != t.size()).then(|| format!("{k} (file {:?}, config {:?})", f.size(), t.size()))
        })
        .collect();
    let non_float: Vec<String> = file
        .iter()
        .filter(|(_, t)| !matches!(t.kind(), Kind::Float | Kind::BFloat16 | Kind::Half | Kind::Double))
        .map(|(k, t)| format!("{k} ({:?})", t.kind()))
        .collect();
    let groups =
        [("missing", &missing), ("unexpected", &unexpected), ("mis-shaped", &misshaped), ("non-float", &non_float)];
    let parts: Vec<String> = groups
        .iter()
        .filter(|(_, names)| !names.is_empty())
        .map(|(what, names)| format!("{} {what}: {}", names.len(), name_list(names)))
        .collect();
    if !parts.is_empty() {
        bail!("'{}' does not match {against}: {}", path.display(), parts.join("; "));
    }
    tch::no_grad(|| {
        for (name, mut dst) in want {
            dst.copy_(&file[&name]);
        }
    });
    Ok(())
}
