//! FID statistics files compatible with pytorch-fid: an `.npz` archive holding `mu` `[d]` and
//! `sigma` `[d, d]` (what `python -m pytorch_fid --save-stats` writes and `calculate_fid_given_paths`
//! reads), written with `np.savez_compressed`'s layout (deflated `.npy` members, little-endian f64).
use super::frechet::GaussianStats;
use anyhow::{bail, Context, Result};
use std::io::{Read, Write};
use std::path::Path;
use tch::{Kind, Tensor};

/// Writes `stats` as `mu.npy` + `sigma.npy` in a deflated zip (atomically).
pub fn write_npz(path: &Path, stats: &GaussianStats) -> Result<()> {
    let mut buffer = std::io::Cursor::new(Vec::new());
    {
        let mut zip = zip::ZipWriter::new(&mut buffer);
        let options = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Deflated);
        for (name, t) in [("mu.npy", &stats.mu), ("sigma.npy", &stats.sigma)] {
            zip.start_file(name, options)?;
            zip.write_all(&npy_bytes(t))?;
        }
        zip.finish()?;
    }
    crate::io::write_atomic(path, buffer.get_ref())
}

/// Reads `mu` and `sigma` from a pytorch-fid `.npz` (f32 or f64, C order); errors name the file.
pub fn read_npz(path: &Path) -> Result<GaussianStats> {
    let fail = |what: String| anyhow::anyhow!("'{}': {what}", path.display());
    let file = std::fs::File::open(path).with_context(|| format!("cannot open '{}'", path.display()))?;
    let mut zip = zip::ZipArchive::new(file).map_err(|e| fail(format!("not an .npz archive ({e})")))?;
    let mut member = |name: &str| -> Result<Tensor> {
        let mut entry = zip.by_name(name).map_err(|_| fail(format!("has no '{name}' array")))?;
        let mut bytes = Vec::new();
        entry.read_to_end(&mut bytes)?;
        parse_npy(&bytes).map_err(|e| fail(format!("{name}: {e}")))
    };
    let (mu, sigma) = (member("mu.npy")?, member("sigma.npy")?);
    let d = mu.size()[0];
    if mu.dim() != 1 || sigma.size() != [d, d] {
        return Err(fail(format!("mu {:?} and sigma {:?} do not fit together", mu.size(), sigma.size())));
    }
    Ok(GaussianStats { mu, sigma })
}

/// A `.npy` (format 1.0) of a tensor as little-endian f64, C order.
fn npy_bytes(t: &Tensor) -> Vec<u8> {
    let t = t.to_kind(Kind::Double).to_device(tch::Device::Cpu).contiguous();
    let shape: Vec<String> = t.size().iter().map(|d| d.to_string()).collect();
    let shape = if shape.len() == 1 { format!("({},)", shape[0]) } else { format!("({})", shape.join(", ")) };
    let mut header = format!("{{'descr': '<f8', 'fortran_order': False, 'shape': {shape}, }}");
    let unpadded = 10 + header.len() + 1;
    header.push_str(&" ".repeat((64 - unpadded % 64) % 64));
    header.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    let values = Vec::<f64>::try_from(t.reshape([-1])).expect("a f64 CPU tensor converts");
    out.extend(values.iter().flat_map(|v| v.to_le_bytes()));
    out
}

/// Parses a C-order little-endian f4/f8 `.npy` into an f64 tensor.
fn parse_npy(bytes: &[u8]) -> Result<Tensor> {
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
        bail!("not a .npy array");
    }
    let (header_len, start) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 => (u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize, 12),
        v => bail!("unsupported .npy version {v}"),
    };
    let header = std::str::from_utf8(bytes.get(start..start + header_len).context("truncated header")?)?;
    if header.contains("'fortran_order': True") {
        bail!("Fortran-ordered arrays are not supported");
    }
    let shape: Vec<i64> = header
        .split("'shape':")
        .nth(1)
        .and_then(|s| s.split(['(', ')']).nth(1))
        .context("no shape in header")?
        .split(',')
        .filter(|s| !s.trim().is_empty())
        .map(|s| s.trim().parse::<i64>())
        .collect::<Result<_, _>>()?;
    let data = &bytes[start + header_len..];
    let kind = match () {
        _ if header.contains("'<f8'") => Kind::Double,
        _ if header.contains("'<f4'") => Kind::Float,
        _ => bail!("unsupported dtype (expected little-endian float32/float64): {header}"),
    };
    let numel: i64 = shape.iter().product();
    let width = if kind == Kind::Double { 8 } else { 4 };
    if data.len() != numel as usize * width {
        bail!("expected {numel} values of {width} bytes, found {} bytes", data.len());
    }
    Ok(Tensor::from_data_size(data, &shape, kind).to_kind(Kind::Double))
}
