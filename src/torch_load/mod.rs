//! Reading PyTorch `torch.save` files without Python: state dicts in the zip format (PyTorch >= 1.6: `data.pkl`
//! plus `data/<key>` storage entries) and the legacy pre-1.6 format (five pickles, then each storage's raw bytes;
//! torchvision's older ImageNet checkpoints, lpips' heads and pytorch-fid's Inception weights use it), which
//! libtorch's own `Tensor::loadz_multi` rejects, and `.safetensors` files; plus [`is_torchscript`] to tell a
//! TorchScript archive (for `tch::CModule`) from a `torch.save` zip. Zip archives are read with the `zip` crate;
//! the pickles by the machine in [`pickle`], which interprets only the opcodes and globals of such files
//! (`collections.OrderedDict`, `torch._utils._rebuild_tensor[_v2]`, `torch.*Storage`): no code runs. No buffer
//! is sized by a length the file declares beyond the file's own size: a larger storage or member is refused.
use crate::io::read_safetensors;
use anyhow::{bail, Context, Result};
use pickle::{pv_int, pv_str, state_dict_tensors, Pv, TensorRef, Unpickler};
use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::Path;
use std::rc::Rc;
use tch::{Device, Tensor};
use zip::result::ZipError;
use zip::{CompressionMethod, ZipArchive};

mod pickle;

/// Reads a state dict (name → tensor, on the CPU, as stored) from a PyTorch `torch.save` file — zip archive
/// (PyTorch ≥ 1.6) or the legacy pre-1.6 format (torchvision's older ImageNet checkpoints and lpips' heads use
/// it), both read here without running any Python code, libtorch's `Tensor::loadz_multi` rejecting the
/// legacy format and zipped `module.state_dict()`s — or from a `.safetensors` file. Nested dicts are flattened with
/// `.`-joined keys; non-tensor entries are dropped. Errors are one line and name the file.
pub fn read_state_dict(path: &Path) -> Result<Vec<(String, Tensor)>> {
    read_state_dict_filtered(path, &|_| true)
}

/// [`read_state_dict`] keeping only the tensors whose names pass `keep` (the other storages of a `.pth` are
/// skipped, not read).
pub fn read_state_dict_filtered(path: &Path, keep: &dyn Fn(&str) -> bool) -> Result<Vec<(String, Tensor)>> {
    let mut magic = [0u8; 8];
    let n = File::open(path)
        .and_then(|mut f| f.read(&mut magic))
        .with_context(|| format!("cannot read '{}'", path.display()))?;
    let magic = &magic[..n];
    let filter = |v: Vec<(String, Tensor)>| v.into_iter().filter(|(k, _)| keep(k)).collect::<Vec<_>>();
    if path.extension().is_some_and(|e| e == "safetensors") {
        return read_safetensors(path).map(filter);
    }
    if magic.starts_with(b"PK\x03\x04") {
        // libtorch's loader fails on `module.state_dict()` (an OrderedDict with `_metadata`), hence our reader
        // first; libtorch's as the fallback for archives ours does not understand.
        return read_zip(path, keep).or_else(|ours| {
            Tensor::loadz_multi(path)
                .map(filter)
                .map_err(|_| anyhow::anyhow!("'{}': cannot read the torch.save zip archive: {ours:#}", path.display()))
        });
    }
    if magic.first() == Some(&0x80) {
        return read_legacy(path, keep).map_err(|e| anyhow::anyhow!("'{}': {e:#}", path.display()));
    }
    if n == 8 && u64::from_le_bytes(magic.try_into().unwrap()) < 100_000_000 {
        // A safetensors file with another extension: an 8-byte header length, then '{'.
        if let Ok(t) = read_safetensors(path) {
            return Ok(filter(t));
        }
    }
    bail!(
        "'{}' is not a PyTorch state dict (zip or legacy torch.save) or a safetensors file (very old tar-format \
         checkpoints must first be re-saved with torch.save in PyTorch >= 1.6)",
        path.display()
    )
}

/// Whether the zip archive at `path` is a TorchScript module (it has `code/` entries or a `constants.pkl`), as
/// opposed to a `torch.save`d state dict. Errors (not a readable zip) are one line and name the file.
pub fn is_torchscript(path: &Path) -> Result<bool> {
    let archive = Archive::open(path)
        .map_err(|e| anyhow::anyhow!("'{}' is not a readable zip archive: {e:#}", path.display()))?;
    let torchscript = archive.names().any(|n| n.ends_with("/constants.pkl") || n.contains("/code/"));
    Ok(torchscript)
}

/// The legacy protocol's magic number, `0x1950a86a20f9469cfc6c`, little-endian.
const LEGACY_MAGIC: [u8; 10] = [0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19];

/// Reads PyTorch's legacy `torch.save` format: the pickles of the magic number, the protocol version (1001),
/// `sys_info` and the object, then a pickled list of storage keys, then each storage in that order as an
/// int64 element count and its raw little-endian bytes.
fn read_legacy(path: &Path, keep: &dyn Fn(&str) -> bool) -> Result<Vec<(String, Tensor)>> {
    let file = File::open(path).context("cannot open")?;
    let file_len = file.metadata().context("cannot open")?.len();
    let mut r = BufReader::with_capacity(1 << 20, file);
    let mut up = Unpickler::new(&mut r);
    match up.load().context("not a legacy torch.save file")? {
        Pv::BigInt(b) if b == LEGACY_MAGIC => {}
        other => bail!("not a legacy torch.save file (magic number {other:?})"),
    }
    let version = pv_int(&up.load()?)?;
    if version != 1001 {
        bail!("unsupported legacy torch.save protocol version {version}");
    }
    if let Pv::Dict(info) = up.load()? {
        for (k, v) in info.borrow().iter() {
            if pv_str(k).as_deref() == Some("little_endian") && matches!(v, Pv::Bool(false)) {
                bail!("big-endian checkpoints are not supported");
            }
        }
    }
    let obj = up.load().context("cannot read the pickled object")?;
    let kinds = std::mem::take(&mut up.storage_kinds);
    let keys = match up.load().context("cannot read the storage keys")? {
        Pv::List(l) => l.borrow().iter().map(|k| pv_str(k).context("bad storage key")).collect::<Result<Vec<_>>>()?,
        other => bail!("bad storage key list {other:?}"),
    };
    let mut tensors = state_dict_tensors(&obj)?;
    tensors.retain(|(k, _)| keep(k));
    let wanted: HashSet<&str> = tensors.iter().map(|(_, t)| t.storage.key.as_str()).collect();
    let mut storages: HashMap<String, Tensor> = HashMap::new();
    for key in &keys {
        let numel = {
            let mut b = [0u8; 8];
            r.read_exact(&mut b).with_context(|| format!("truncated at storage '{key}'"))?;
            i64::from_le_bytes(b)
        };
        let kind = *kinds.get(key.as_str()).with_context(|| format!("storage '{key}' of unknown type"))?;
        let nbytes = numel
            .checked_mul(kind.elt_size_in_bytes() as i64)
            .filter(|n| *n >= 0)
            .with_context(|| format!("bad size of storage '{key}'"))?;
        // A storage cannot be larger than the file: a corrupt size is refused, not allocated.
        if nbytes as u64 > file_len {
            bail!("truncated in storage '{key}'");
        }
        if wanted.contains(key.as_str()) {
            let mut data = vec![0u8; nbytes as usize];
            r.read_exact(&mut data).with_context(|| format!("truncated in storage '{key}'"))?;
            storages.insert(key.clone(), Tensor::from_data_size(&data, &[numel], kind));
        } else {
            r.seek_relative(nbytes).with_context(|| format!("truncated in storage '{key}'"))?;
        }
    }
    build_tensors(tensors, &storages)
}

/// Materialises each tensor from its (flat) storage: `as_strided` view, then a contiguous copy.
fn build_tensors(
    tensors: Vec<(String, Rc<TensorRef>)>,
    storages: &HashMap<String, Tensor>,
) -> Result<Vec<(String, Tensor)>> {
    let mut out = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        let storage = storages.get(&t.storage.key).with_context(|| format!("'{name}': storage missing"))?;
        let numel = storage.size()[0];
        let offset = t.storage.offset.checked_add(t.offset).filter(|o| *o >= 0);
        let Some(offset) =
            offset.filter(|_| t.size.len() == t.stride.len() && !t.size.iter().chain(&t.stride).any(|&d| d < 0))
        else {
            bail!("'{name}': bad size/stride");
        };
        let empty = t.size.contains(&0);
        // The last element the view reads; `None` when the declared sizes overflow.
        let last =
            t.size.iter().zip(&t.stride).try_fold(offset, |at, (s, st)| at.checked_add((s - 1).checked_mul(*st)?));
        if !empty && last.is_none_or(|last| last >= numel) {
            bail!("'{name}': extends past its storage");
        }
        let tensor = if empty {
            Tensor::zeros(t.size.as_slice(), (t.storage.kind, Device::Cpu))
        } else {
            storage
                .f_as_strided(t.size.as_slice(), t.stride.as_slice(), offset)
                .and_then(|view| view.f_contiguous())
                .map_err(|e| anyhow::anyhow!("'{name}': {}", e.to_string().lines().next().unwrap_or_default()))?
        };
        out.push((name, tensor));
    }
    Ok(out)
}

/// A `torch.save` zip archive, read with the `zip` crate.
struct Archive {
    zip: ZipArchive<File>,
    /// The archive's size in bytes, the bound on any member read from it.
    len: u64,
}

impl Archive {
    /// Opens the archive at `path`, reading its central directory.
    fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).context("cannot open")?;
        let len = file.metadata().context("cannot open")?.len();
        Ok(Archive { zip: ZipArchive::new(file)?, len })
    }

    /// The names of its members.
    fn names(&self) -> impl Iterator<Item = Cow<'_, str>> {
        self.zip.file_names().filter_map(|name| name.ok())
    }

    /// The bytes of the stored (uncompressed, as `torch.save` writes them) member `name`, or `None` when there
    /// is no such member. A member cannot be larger than the archive, so a corrupt size is refused, not
    /// allocated.
    fn read(&mut self, name: &str) -> Result<Option<Vec<u8>>> {
        let mut member = match self.zip.by_name(name) {
            Ok(member) => member,
            Err(ZipError::FileNotFound) => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("bad zip member '{name}'")),
        };
        if member.compression() != CompressionMethod::Stored {
            bail!("'{name}' is compressed ({}); torch.save archives store their members", member.compression());
        }
        if member.size() > self.len {
            bail!("zip member '{name}' is larger than the archive");
        }
        let mut data = Vec::with_capacity(member.size() as usize);
        member.read_to_end(&mut data).with_context(|| format!("truncated zip member '{name}'"))?;
        if data.len() as u64 != member.size() {
            bail!("truncated zip member '{name}'");
        }
        Ok(Some(data))
    }
}

/// Reads PyTorch's zip `torch.save` format: `<archive>/data.pkl` (the object, storages as persistent ids
/// `('storage', type, key, location, numel)`) and each storage's raw little-endian bytes in
/// `<archive>/data/<key>`.
fn read_zip(path: &Path, keep: &dyn Fn(&str) -> bool) -> Result<Vec<(String, Tensor)>> {
    let mut archive = Archive::open(path)?;
    let pkl = archive
        .names()
        .filter(|n| n == "data.pkl" || n.ends_with("/data.pkl"))
        .min_by_key(|n| n.len())
        .context("no data.pkl in the archive (a TorchScript or non-PyTorch zip?)")?
        .into_owned();
    let prefix = &pkl[..pkl.len() - "data.pkl".len()];
    if archive.read(&format!("{prefix}byteorder"))?.is_some_and(|order| order != b"little") {
        bail!("big-endian checkpoints are not supported");
    }
    let bytes = archive.read(&pkl)?.context("data.pkl missing")?;
    let obj = Unpickler::new(&mut bytes.as_slice()).load().context("cannot read data.pkl")?;
    let mut tensors = state_dict_tensors(&obj)?;
    tensors.retain(|(k, _)| keep(k));
    let mut storages: HashMap<String, Tensor> = HashMap::new();
    for (_, t) in &tensors {
        let key = &t.storage.key;
        if storages.contains_key(key) {
            continue;
        }
        let name = format!("{prefix}data/{key}");
        let data = archive.read(&name)?.with_context(|| format!("storage '{name}' missing from the archive"))?;
        let elt = t.storage.kind.elt_size_in_bytes();
        if data.len() % elt != 0 {
            bail!("storage '{name}' is not a whole number of {:?} elements", t.storage.kind);
        }
        storages.insert(key.clone(), Tensor::from_data_size(&data, &[(data.len() / elt) as i64], t.storage.kind));
    }
    build_tensors(tensors, &storages)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use zip::write::SimpleFileOptions;

    /// `{'w': _rebuild_tensor_v2(storage '0' of 6 floats, offset, size, stride, False, OrderedDict())}` as
    /// protocol 2 pickles it.
    fn data_pkl(offset: u8, size: [u8; 2], stride: [u8; 2]) -> Vec<u8> {
        let mut p =
            b"\x80\x02}X\x01\x00\x00\x00wctorch._utils\n_rebuild_tensor_v2\n((X\x07\x00\x00\x00storage".to_vec();
        p.extend(b"ctorch\nFloatStorage\nX\x01\x00\x00\x000X\x03\x00\x00\x00cpuK\x06tQ");
        p.extend([b'K', offset, b'K', size[0], b'K', size[1], 0x86, b'K', stride[0], b'K', stride[1], 0x86, 0x89]);
        p.extend(b"ccollections\nOrderedDict\n)RtRs.");
        p
    }

    /// A `torch.save`-layout zip archive of `members` (name, bytes, stored or deflated).
    fn archive(members: &[(&str, &[u8], CompressionMethod)]) -> tempfile::NamedTempFile {
        let file = tempfile::NamedTempFile::new().unwrap();
        let mut zip = zip::ZipWriter::new(file.reopen().unwrap());
        for (name, bytes, method) in members {
            zip.start_file(*name, SimpleFileOptions::default().compression_method(*method)).unwrap();
            zip.write_all(bytes).unwrap();
        }
        zip.finish().unwrap();
        file
    }

    fn floats(n: usize) -> Vec<u8> {
        (0..n).flat_map(|i| (i as f32).to_le_bytes()).collect()
    }

    #[test]
    fn zip_archive_tensors_and_views() {
        let stored = CompressionMethod::Stored;
        for (pkl, want) in [
            (data_pkl(0, [2, 3], [3, 1]), [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]),
            (data_pkl(0, [2, 3], [1, 2]), [[0.0, 2.0, 4.0], [1.0, 3.0, 5.0]]),
        ] {
            let data = floats(6);
            let file = archive(&[
                ("archive/data.pkl", &pkl, stored),
                ("archive/byteorder", b"little", stored),
                ("archive/data/0", &data, stored),
            ]);
            assert!(!is_torchscript(file.path()).unwrap());
            let tensors = read_zip(file.path(), &|_| true).unwrap();
            assert_eq!(tensors.len(), 1);
            assert_eq!(tensors[0].0, "w");
            assert!(tensors[0].1.equal(&Tensor::from_slice2(&want)), "{:?}", tensors[0].1);
            assert!(read_zip(file.path(), &|k| k != "w").unwrap().is_empty());
        }
    }

    #[test]
    fn zip_archive_errors() {
        let (stored, deflated) = (CompressionMethod::Stored, CompressionMethod::Deflated);
        let pkl = data_pkl(0, [2, 3], [3, 1]);
        let error = |members: &[(&str, &[u8], CompressionMethod)]| {
            format!("{:#}", read_zip(archive(members).path(), &|_| true).unwrap_err())
        };
        let data = floats(6);
        let err = error(&[("archive/data.pkl", &pkl, stored), ("archive/data/0", &data, deflated)]);
        assert!(err.contains("'archive/data/0' is compressed"), "{err}");
        let err = error(&[("archive/data.pkl", &pkl, stored)]);
        assert!(err.contains("storage 'archive/data/0' missing"), "{err}");
        let short = floats(5);
        let err = error(&[("archive/data.pkl", &pkl, stored), ("archive/data/0", &short, stored)]);
        assert!(err.contains("'w': extends past its storage"), "{err}");
        let err = error(&[("archive/data.pkl", &pkl, stored), ("archive/byteorder", b"big", stored)]);
        assert!(err.contains("big-endian"), "{err}");
        let err = error(&[("archive/constants.pkl", b"", stored), ("archive/code/m.py", b"", stored)]);
        assert!(err.contains("no data.pkl"), "{err}");
        let script = archive(&[("archive/constants.pkl", b"", stored), ("archive/code/m.py", b"", stored)]);
        assert!(is_torchscript(script.path()).unwrap());
        let junk = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(junk.path(), b"PK\x03\x04 but no archive").unwrap();
        let err = is_torchscript(junk.path()).unwrap_err().to_string();
        assert!(err.contains("is not a readable zip archive") && !err.contains('\n'), "{err}");
    }

    /// A legacy `torch.save` file of [`data_pkl`]'s object whose storage '0' declares `numel` elements.
    fn legacy_file(numel: i64) -> tempfile::NamedTempFile {
        let mut bytes = b"\x80\x02\x8a\x0a".to_vec();
        bytes.extend(LEGACY_MAGIC);
        bytes.extend(b".\x80\x02M\xe9\x03.\x80\x02}.");
        bytes.extend(data_pkl(0, [2, 3], [3, 1]));
        bytes.extend(b"\x80\x02]X\x01\x00\x00\x000a.");
        bytes.extend(numel.to_le_bytes());
        bytes.extend(floats(6));
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), bytes).unwrap();
        file
    }

    #[test]
    fn declared_sizes_beyond_the_file_are_refused_not_allocated() {
        let tensors = read_legacy(legacy_file(6).path(), &|_| true).unwrap();
        assert!(tensors[0].1.equal(&Tensor::from_slice2(&[[0f32, 1.0, 2.0], [3.0, 4.0, 5.0]])));
        let err = read_legacy(legacy_file(1 << 40).path(), &|_| true).unwrap_err().to_string();
        assert!(err.contains("truncated in storage '0'"), "{err}");
        // A BINBYTES8 of 2^62 bytes in a few-byte pickle.
        let pkl = b"\x80\x02\x8e\x00\x00\x00\x00\x00\x00\x00\x40.";
        let err = Unpickler::new(&mut pkl.as_slice()).load().unwrap_err().to_string();
        assert!(err.contains("truncated pickle"), "{err}");
    }
}
