//! Reading PyTorch `torch.save` files without Python: state dicts in the zip format (PyTorch >= 1.6: `data.pkl`
//! plus `data/<key>` storage entries) and the legacy pre-1.6 format (five pickles, then each storage's raw bytes;
//! torchvision's older ImageNet checkpoints, lpips' heads and pytorch-fid's Inception weights use it), which
//! libtorch's own `Tensor::loadz_multi` rejects, and `.safetensors` files; plus [`is_torchscript`] to tell a
//! TorchScript archive (for `tch::CModule`) from a `torch.save` zip. Only the pickle opcodes and globals of such
//! files are interpreted (`collections.OrderedDict`, `torch._utils._rebuild_tensor[_v2]`, `torch.*Storage`); no
//! code runs.
use crate::io::read_safetensors;
use anyhow::{bail, Context, Result};
use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom};
use std::path::Path;
use std::rc::Rc;
use tch::{Device, Kind, Tensor};

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
    let entries = File::open(path)
        .context("cannot open")
        .and_then(|mut f| zip_entries(&mut f))
        .map_err(|e| anyhow::anyhow!("'{}' is not a readable zip archive: {e:#}", path.display()))?;
    Ok(entries.keys().any(|n| n.ends_with("/constants.pkl") || n.contains("/code/")))
}

/// The legacy protocol's magic number, `0x1950a86a20f9469cfc6c`, little-endian.
const LEGACY_MAGIC: [u8; 10] = [0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19];

/// A value of the pickle machine (only what state dicts contain).
#[derive(Clone, Debug)]
enum Pv {
    None,
    Bool(bool),
    Int(i64),
    BigInt(Vec<u8>),
    /// A float (its value is not needed).
    Float,
    Str(String),
    Bytes(Vec<u8>),
    Tuple(Rc<Vec<Pv>>),
    List(Rc<RefCell<Vec<Pv>>>),
    Dict(Rc<RefCell<Vec<(Pv, Pv)>>>),
    Global(String, String),
    Storage(Rc<StorageRef>),
    Tensor(Rc<TensorRef>),
    /// Anything else a `REDUCE` / `NEWOBJ` built; its contents are not needed.
    Opaque,
}

/// A (view of a) storage named by the legacy persistent id `('storage', type, key, location, numel, view)`.
#[derive(Debug)]
struct StorageRef {
    key: String,
    kind: Kind,
    /// Element offset of a legacy storage view into its root storage.
    offset: i64,
}

/// `torch._utils._rebuild_tensor[_v2](storage, offset, size, stride, ...)`.
#[derive(Debug)]
struct TensorRef {
    storage: Rc<StorageRef>,
    offset: i64,
    size: Vec<i64>,
    stride: Vec<i64>,
}

fn storage_kind(name: &str) -> Option<Kind> {
    Some(match name {
        "FloatStorage" => Kind::Float,
        "DoubleStorage" => Kind::Double,
        "HalfStorage" => Kind::Half,
        "BFloat16Storage" => Kind::BFloat16,
        "LongStorage" => Kind::Int64,
        "IntStorage" => Kind::Int,
        "ShortStorage" => Kind::Int16,
        "CharStorage" => Kind::Int8,
        "ByteStorage" => Kind::Uint8,
        "BoolStorage" => Kind::Bool,
        _ => return None,
    })
}

fn pv_int(v: &Pv) -> Result<i64> {
    match v {
        Pv::Int(i) => Ok(*i),
        Pv::Bool(b) => Ok(*b as i64),
        other => bail!("expected an integer, found {other:?}"),
    }
}

fn pv_ints(v: &Pv) -> Result<Vec<i64>> {
    match v {
        Pv::Tuple(t) => t.iter().map(pv_int).collect(),
        Pv::List(l) => l.borrow().iter().map(pv_int).collect(),
        // torch.Size pickles as a REDUCE of torch.Size over a tuple; it is handled in `reduce`.
        other => bail!("expected a tuple of integers, found {other:?}"),
    }
}

fn pv_str(v: &Pv) -> Option<String> {
    match v {
        Pv::Str(s) => Some(s.clone()),
        Pv::Bytes(b) => Some(String::from_utf8_lossy(b).into_owned()),
        Pv::Int(i) => Some(i.to_string()),
        _ => None,
    }
}

/// A minimal pickle machine (protocols 0–4 opcodes that `torch.save` and Python 2/3 pickles of state dicts
/// use), with torch's legacy persistent ids.
struct Unpickler<'r, R: BufRead> {
    r: &'r mut R,
    stack: Vec<Pv>,
    marks: Vec<usize>,
    memo: HashMap<u64, Pv>,
    /// The element kind of every storage a persistent id named (legacy files need it to skip storages).
    storage_kinds: HashMap<String, Kind>,
}

impl<'r, R: BufRead> Unpickler<'r, R> {
    fn new(r: &'r mut R) -> Self {
        Unpickler { r, stack: Vec::new(), marks: Vec::new(), memo: HashMap::new(), storage_kinds: HashMap::new() }
    }

    fn bytes(&mut self, n: usize) -> Result<Vec<u8>> {
        let mut b = vec![0u8; n];
        self.r.read_exact(&mut b).context("truncated pickle")?;
        Ok(b)
    }

    fn u8(&mut self) -> Result<u8> {
        Ok(self.bytes(1)?[0])
    }

    fn u16(&mut self) -> Result<u16> {
        Ok(u16::from_le_bytes(self.bytes(2)?.try_into().unwrap()))
    }

    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.bytes(4)?.try_into().unwrap()))
    }

    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.bytes(8)?.try_into().unwrap()))
    }

    fn line(&mut self) -> Result<String> {
        let mut buf = Vec::new();
        self.r.read_until(b'\n', &mut buf).context("truncated pickle")?;
        if buf.pop() != Some(b'\n') {
            bail!("truncated pickle");
        }
        if buf.last() == Some(&b'\r') {
            buf.pop();
        }
        Ok(String::from_utf8_lossy(&buf).into_owned())
    }

    fn pop(&mut self) -> Result<Pv> {
        self.stack.pop().context("pickle stack underflow")
    }

    fn pop_mark(&mut self) -> Result<Vec<Pv>> {
        let m = self.marks.pop().context("pickle mark missing")?;
        if m > self.stack.len() {
            bail!("corrupt pickle mark");
        }
        Ok(self.stack.split_off(m))
    }

    fn top(&mut self) -> Result<&mut Pv> {
        self.stack.last_mut().context("pickle stack underflow")
    }

    fn long(bytes: &[u8]) -> Pv {
        if bytes.is_empty() {
            return Pv::Int(0);
        }
        if bytes.len() > 8 {
            return Pv::BigInt(bytes.to_vec());
        }
        let fill = if bytes[bytes.len() - 1] & 0x80 != 0 { 0xff } else { 0 };
        let mut b = [fill; 8];
        b[..bytes.len()].copy_from_slice(bytes);
        Pv::Int(i64::from_le_bytes(b))
    }

    fn persistent_load(&mut self, pid: Pv) -> Result<Pv> {
        let Pv::Tuple(t) = &pid else { bail!("unsupported persistent id {pid:?}") };
        // Legacy: ('storage', type, key, location, numel, view); zip: ('storage', type, key, location, numel).
        if t.len() < 5 || pv_str(&t[0]).as_deref() != Some("storage") {
            bail!("unsupported persistent id {pid:?} (only torch.save storages are read)");
        }
        let kind = match &t[1] {
            Pv::Global(_, name) => storage_kind(name).with_context(|| format!("unsupported storage type {name}"))?,
            other => bail!("unsupported storage type {other:?}"),
        };
        let key = pv_str(&t[2]).context("storage key is not a string")?;
        let (key, offset) = match t.get(5).unwrap_or(&Pv::None) {
            Pv::None => (key, 0),
            Pv::Tuple(view) if view.len() == 3 => (key, pv_int(&view[1])?),
            other => bail!("unsupported storage view {other:?}"),
        };
        self.storage_kinds.insert(key.clone(), kind);
        Ok(Pv::Storage(Rc::new(StorageRef { key, kind, offset })))
    }

    fn reduce(callable: Pv, args: Pv) -> Result<Pv> {
        let Pv::Global(module, name) = &callable else { return Ok(Pv::Opaque) };
        let args: Vec<Pv> = match &args {
            Pv::Tuple(t) => t.to_vec(),
            _ => return Ok(Pv::Opaque),
        };
        Ok(match (module.as_str(), name.as_str()) {
            ("collections", "OrderedDict") => {
                let mut items = Vec::new();
                if let Some(Pv::List(l)) = args.first() {
                    // OrderedDict([(k, v), ...]); Python 2 pickles the pairs as lists.
                    for item in l.borrow().iter() {
                        let kv: Vec<Pv> = match item {
                            Pv::Tuple(t) => t.to_vec(),
                            Pv::List(l) => l.borrow().clone(),
                            _ => continue,
                        };
                        if let [k, v] = kv.as_slice() {
                            items.push((k.clone(), v.clone()));
                        }
                    }
                }
                Pv::Dict(Rc::new(RefCell::new(items)))
            }
            ("torch._utils", "_rebuild_tensor" | "_rebuild_tensor_v2") => {
                if args.len() < 4 {
                    bail!("{name} with {} arguments", args.len());
                }
                let Pv::Storage(storage) = &args[0] else { bail!("{name} without a storage") };
                Pv::Tensor(Rc::new(TensorRef {
                    storage: storage.clone(),
                    offset: pv_int(&args[1])?,
                    size: pv_ints(&args[2])?,
                    stride: pv_ints(&args[3])?,
                }))
            }
            ("torch._utils", "_rebuild_parameter" | "_rebuild_parameter_with_state") => {
                args.into_iter().next().unwrap_or(Pv::None)
            }
            ("torch", "Size") => args.into_iter().next().unwrap_or(Pv::None),
            _ => Pv::Opaque,
        })
    }

    /// Runs one pickle to its STOP.
    fn load(&mut self) -> Result<Pv> {
        self.stack.clear();
        self.marks.clear();
        self.memo.clear();
        loop {
            let op = self.u8()?;
            match op {
                0x80 => {
                    self.u8()?;
                } // PROTO
                0x95 => {
                    self.u64()?;
                } // FRAME
                b'.' => return self.pop(),
                b'(' => self.marks.push(self.stack.len()),
                b')' => self.stack.push(Pv::Tuple(Rc::new(Vec::new()))),
                b't' => {
                    let items = self.pop_mark()?;
                    self.stack.push(Pv::Tuple(Rc::new(items)));
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    if self.stack.len() < n {
                        bail!("pickle stack underflow");
                    }
                    let items = self.stack.split_off(self.stack.len() - n);
                    self.stack.push(Pv::Tuple(Rc::new(items)));
                }
                b']' => self.stack.push(Pv::List(Rc::new(RefCell::new(Vec::new())))),
                b'l' => {
                    let items = self.pop_mark()?;
                    self.stack.push(Pv::List(Rc::new(RefCell::new(items))));
                }
                b'a' => {
                    let v = self.pop()?;
                    match self.top()? {
                        Pv::List(l) => l.borrow_mut().push(v),
                        _ => bail!("APPEND to a non-list"),
                    }
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    match self.top()? {
                        Pv::List(l) => l.borrow_mut().extend(items),
                        _ => bail!("APPENDS to a non-list"),
                    }
                }
                b'}' => self.stack.push(Pv::Dict(Rc::new(RefCell::new(Vec::new())))),
                b'd' => {
                    let items = self.pop_mark()?;
                    let pairs = items.chunks_exact(2).map(|c| (c[0].clone(), c[1].clone())).collect();
                    self.stack.push(Pv::Dict(Rc::new(RefCell::new(pairs))));
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    match self.top()? {
                        Pv::Dict(d) => d.borrow_mut().push((k, v)),
                        Pv::Opaque => {}
                        _ => bail!("SETITEM on a non-dict"),
                    }
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    match self.top()? {
                        Pv::Dict(d) => {
                            d.borrow_mut().extend(items.chunks_exact(2).map(|c| (c[0].clone(), c[1].clone())))
                        }
                        Pv::Opaque => {}
                        _ => bail!("SETITEMS on a non-dict"),
                    }
                }
                b'J' => {
                    let v = self.u32()? as i32;
                    self.stack.push(Pv::Int(v as i64));
                }
                b'K' => {
                    let v = self.u8()?;
                    self.stack.push(Pv::Int(v as i64));
                }
                b'M' => {
                    let v = self.u16()?;
                    self.stack.push(Pv::Int(v as i64));
                }
                0x8a => {
                    let n = self.u8()? as usize;
                    let b = self.bytes(n)?;
                    self.stack.push(Self::long(&b));
                }
                0x8b => {
                    let n = self.u32()? as usize;
                    let b = self.bytes(n)?;
                    self.stack.push(Self::long(&b));
                }
                b'I' | b'L' => {
                    let line = self.line()?;
                    let t = line.trim_end_matches('L');
                    self.stack.push(match t {
                        "00" => Pv::Bool(false),
                        "01" => Pv::Bool(true),
                        _ => Pv::Int(t.parse().with_context(|| format!("bad integer {line:?}"))?),
                    });
                }
                b'G' => {
                    self.bytes(8)?;
                    self.stack.push(Pv::Float);
                }
                b'F' => {
                    self.line()?;
                    self.stack.push(Pv::Float);
                }
                b'N' => self.stack.push(Pv::None),
                0x88 => self.stack.push(Pv::Bool(true)),
                0x89 => self.stack.push(Pv::Bool(false)),
                b'U' => {
                    let n = self.u8()? as usize;
                    let b = self.bytes(n)?;
                    self.stack.push(Pv::Str(String::from_utf8_lossy(&b).into_owned()));
                }
                b'T' => {
                    let n = self.u32()? as usize;
                    let b = self.bytes(n)?;
                    self.stack.push(Pv::Str(String::from_utf8_lossy(&b).into_owned()));
                }
                b'X' => {
                    let n = self.u32()? as usize;
                    let b = self.bytes(n)?;
                    self.stack.push(Pv::Str(String::from_utf8(b).context("bad UTF-8 in pickle")?));
                }
                0x8c => {
                    let n = self.u8()? as usize;
                    let b = self.bytes(n)?;
                    self.stack.push(Pv::Str(String::from_utf8(b).context("bad UTF-8 in pickle")?));
                }
                0x8d => {
                    let n = self.u64()? as usize;
                    let b = self.bytes(n)?;
                    self.stack.push(Pv::Str(String::from_utf8(b).context("bad UTF-8 in pickle")?));
                }
                b'B' => {
                    let n = self.u32()? as usize;
                    let b = self.bytes(n)?;
                    self.stack.push(Pv::Bytes(b));
                }
                b'C' => {
                    let n = self.u8()? as usize;
                    let b = self.bytes(n)?;
                    self.stack.push(Pv::Bytes(b));
                }
                0x8e => {
                    let n = self.u64()? as usize;
                    let b = self.bytes(n)?;
                    self.stack.push(Pv::Bytes(b));
                }
                b'c' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    self.stack.push(Pv::Global(module, name));
                }
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    match (pv_str(&module), pv_str(&name)) {
                        (Some(m), Some(n)) => self.stack.push(Pv::Global(m, n)),
                        _ => bail!("STACK_GLOBAL with non-string names"),
                    }
                }
                b'R' => {
                    let args = self.pop()?;
                    let callable = self.pop()?;
                    self.stack.push(Self::reduce(callable, args)?);
                }
                0x81 => {
                    self.pop()?;
                    self.pop()?;
                    self.stack.push(Pv::Opaque);
                }
                b'b' => {
                    self.pop()?; // BUILD: the state (e.g. an OrderedDict's `_metadata`) is not needed
                }
                b'q' => {
                    let i = self.u8()? as u64;
                    let v = self.top()?.clone();
                    self.memo.insert(i, v);
                }
                b'r' => {
                    let i = self.u32()? as u64;
                    let v = self.top()?.clone();
                    self.memo.insert(i, v);
                }
                b'p' => {
                    let i: u64 = self.line()?.parse().context("bad PUT index")?;
                    let v = self.top()?.clone();
                    self.memo.insert(i, v);
                }
                0x94 => {
                    let i = self.memo.len() as u64;
                    let v = self.top()?.clone();
                    self.memo.insert(i, v);
                }
                b'h' | b'j' | b'g' => {
                    let i = match op {
                        b'h' => self.u8()? as u64,
                        b'j' => self.u32()? as u64,
                        _ => self.line()?.parse().context("bad GET index")?,
                    };
                    let v = self.memo.get(&i).with_context(|| format!("pickle memo {i} missing"))?.clone();
                    self.stack.push(v);
                }
                b'Q' => {
                    let pid = self.pop()?;
                    let v = self.persistent_load(pid)?;
                    self.stack.push(v);
                }
                b'P' => bail!("text persistent ids are not supported"),
                b'0' => {
                    self.pop()?;
                }
                b'1' => {
                    self.pop_mark()?;
                }
                b'2' => {
                    let v = self.top()?.clone();
                    self.stack.push(v);
                }
                other => bail!("unsupported pickle opcode 0x{other:02x}"),
            }
        }
    }
}

/// Collects `(name, tensor)` from a (nested) dict.
fn collect_tensors(v: &Pv, prefix: &str, out: &mut Vec<(String, Rc<TensorRef>)>) {
    if let Pv::Dict(d) = v {
        for (k, v) in d.borrow().iter() {
            let Some(k) = pv_str(k) else { continue };
            let name = if prefix.is_empty() { k } else { format!("{prefix}.{k}") };
            match v {
                Pv::Tensor(t) => out.push((name, t.clone())),
                Pv::Dict(_) => collect_tensors(v, &name, out),
                _ => {}
            }
        }
    }
}

/// Reads PyTorch's legacy `torch.save` format: the pickles of the magic number, the protocol version (1001),
/// `sys_info` and the object, then a pickled list of storage keys, then each storage in that order as an
/// int64 element count and its raw little-endian bytes.
fn read_legacy(path: &Path, keep: &dyn Fn(&str) -> bool) -> Result<Vec<(String, Tensor)>> {
    let file = File::open(path).context("cannot open")?;
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
        let offset = t.storage.offset + t.offset;
        if t.size.len() != t.stride.len() || t.size.iter().chain(&t.stride).any(|&d| d < 0) || offset < 0 {
            bail!("'{name}': bad size/stride");
        }
        let empty = t.size.contains(&0);
        let last = offset + t.size.iter().zip(&t.stride).map(|(s, st)| (s - 1) * st).sum::<i64>();
        if !empty && last >= numel {
            bail!("'{name}': extends past its storage");
        }
        let tensor = if empty {
            Tensor::zeros(t.size.as_slice(), (t.storage.kind, Device::Cpu))
        } else {
            storage.as_strided(t.size.as_slice(), t.stride.as_slice(), offset).contiguous()
        };
        out.push((name, tensor));
    }
    Ok(out)
}

/// Collects the tensors of a pickled object, failing when there are none.
fn state_dict_tensors(obj: &Pv) -> Result<Vec<(String, Rc<TensorRef>)>> {
    let mut tensors = Vec::new();
    collect_tensors(obj, "", &mut tensors);
    if tensors.is_empty() {
        bail!("holds no state dict of tensors");
    }
    Ok(tensors)
}

/// One member of a zip archive.
struct ZipEntry {
    /// Offset of its local header.
    header: u64,
    size: u64,
    method: u16,
}

fn le_u16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

fn le_u64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

fn read_at(f: &mut File, offset: u64, len: usize) -> Result<Vec<u8>> {
    f.seek(SeekFrom::Start(offset))?;
    let mut b = vec![0u8; len];
    f.read_exact(&mut b).context("truncated zip archive")?;
    Ok(b)
}

/// The central directory of a zip archive (zip64 included), name → entry.
fn zip_entries(f: &mut File) -> Result<HashMap<String, ZipEntry>> {
    let len = f.metadata()?.len();
    let tail_len = len.min(22 + 65535) as usize;
    let tail = read_at(f, len - tail_len as u64, tail_len)?;
    let eocd = (0..=tail_len.saturating_sub(22))
        .rev()
        .find(|&i| tail[i..i + 4] == [0x50, 0x4b, 0x05, 0x06])
        .context("no zip end-of-central-directory record")?;
    let eocd_pos = len - tail_len as u64 + eocd as u64;
    let mut count = le_u16(&tail, eocd + 10) as u64;
    let mut cd_size = le_u32(&tail, eocd + 12) as u64;
    let mut cd_offset = le_u32(&tail, eocd + 16) as u64;
    if count == 0xffff || cd_size == 0xffff_ffff || cd_offset == 0xffff_ffff {
        let locator = read_at(f, eocd_pos.checked_sub(20).context("bad zip64 locator")?, 20)?;
        if le_u32(&locator, 0) != 0x0706_4b50 {
            bail!("bad zip64 locator");
        }
        let z = read_at(f, le_u64(&locator, 8), 56)?;
        if le_u32(&z, 0) != 0x0606_4b50 {
            bail!("bad zip64 end-of-central-directory record");
        }
        (count, cd_size, cd_offset) = (le_u64(&z, 32), le_u64(&z, 40), le_u64(&z, 48));
    }
    if cd_offset.checked_add(cd_size).is_none_or(|end| end > len) {
        bail!("bad zip central directory");
    }
    let cd = read_at(f, cd_offset, cd_size as usize)?;
    let mut entries = HashMap::new();
    let mut at = 0usize;
    for _ in 0..count {
        if at + 46 > cd.len() || le_u32(&cd, at) != 0x0201_4b50 {
            bail!("bad zip central directory entry");
        }
        let method = le_u16(&cd, at + 10);
        let mut size = le_u32(&cd, at + 24) as u64;
        let (name_len, extra_len, comment_len) =
            (le_u16(&cd, at + 28) as usize, le_u16(&cd, at + 30) as usize, le_u16(&cd, at + 32) as usize);
        let mut header = le_u32(&cd, at + 42) as u64;
        let compressed = le_u32(&cd, at + 20);
        let end = at + 46 + name_len + extra_len;
        if end + comment_len > cd.len() {
            bail!("bad zip central directory entry");
        }
        let name = String::from_utf8_lossy(&cd[at + 46..at + 46 + name_len]).into_owned();
        // zip64 extra field: the 64-bit uncompressed size, compressed size and header offset, each present only
        // when its 32-bit field is 0xffffffff.
        let mut x = at + 46 + name_len;
        while x + 4 <= end {
            let (id, n) = (le_u16(&cd, x), le_u16(&cd, x + 2) as usize);
            if id == 1 {
                let mut p = x + 4;
                let mut next = || -> Result<u64> {
                    if p + 8 > x + 4 + n || p + 8 > end {
                        bail!("bad zip64 extra field");
                    }
                    p += 8;
                    Ok(le_u64(&cd, p - 8))
                };
                if size == 0xffff_ffff {
                    size = next()?;
                }
                if compressed == 0xffff_ffff {
                    next()?;
                }
                if header == 0xffff_ffff {
                    header = next()?;
                }
            }
            x += 4 + n;
        }
        entries.insert(name, ZipEntry { header, size, method });
        at = end + comment_len;
    }
    Ok(entries)
}

/// The bytes of a stored (uncompressed, as `torch.save` writes them) zip member.
fn zip_read(f: &mut File, name: &str, e: &ZipEntry) -> Result<Vec<u8>> {
    if e.method != 0 {
        bail!("'{name}' is compressed (method {}); torch.save archives store their members", e.method);
    }
    let h = read_at(f, e.header, 30)?;
    if le_u32(&h, 0) != 0x0403_4b50 {
        bail!("bad zip local header for '{name}'");
    }
    let data = e.header + 30 + le_u16(&h, 26) as u64 + le_u16(&h, 28) as u64;
    let size = usize::try_from(e.size).context("zip member too large")?;
    read_at(f, data, size).with_context(|| format!("truncated zip member '{name}'"))
}

/// Reads PyTorch's zip `torch.save` format: `<archive>/data.pkl` (the object, storages as persistent ids
/// `('storage', type, key, location, numel)`) and each storage's raw little-endian bytes in
/// `<archive>/data/<key>`.
fn read_zip(path: &Path, keep: &dyn Fn(&str) -> bool) -> Result<Vec<(String, Tensor)>> {
    let mut f = File::open(path).context("cannot open")?;
    let entries = zip_entries(&mut f)?;
    let pkl = entries
        .keys()
        .filter(|n| *n == "data.pkl" || n.ends_with("/data.pkl"))
        .min_by_key(|n| n.len())
        .context("no data.pkl in the archive (a TorchScript or non-PyTorch zip?)")?
        .clone();
    let prefix = &pkl[..pkl.len() - "data.pkl".len()];
    if let Some(e) = entries.get(&format!("{prefix}byteorder")) {
        if zip_read(&mut f, "byteorder", e)? != b"little" {
            bail!("big-endian checkpoints are not supported");
        }
    }
    let bytes = zip_read(&mut f, &pkl, &entries[&pkl])?;
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
        let e = entries.get(&name).with_context(|| format!("storage '{name}' missing from the archive"))?;
        let data = zip_read(&mut f, &name, e)?;
        let elt = t.storage.kind.elt_size_in_bytes();
        if data.len() % elt != 0 {
            bail!("storage '{name}' is not a whole number of {:?} elements", t.storage.kind);
        }
        storages.insert(key.clone(), Tensor::from_data_size(&data, &[(data.len() / elt) as i64], t.storage.kind));
    }
    build_tensors(tensors, &storages)
}
