//! The pickle machine of [`super`]: the protocol 0–4 opcodes that `torch.save` and Python 2/3 pickles of state
//! dicts use, torch's storage persistent ids, and the few globals such files name (`collections.OrderedDict`,
//! `torch._utils._rebuild_tensor[_v2]`, `torch._utils._rebuild_parameter`, `torch.Size`, `torch.*Storage`).
//! Globals are names, never imported or called: anything else a pickle builds is [`Pv::Opaque`]. Every
//! allocation grows with the bytes actually read, never with a length the pickle declares.
use anyhow::{bail, Context, Result};
use std::cell::RefCell;
use std::collections::HashMap;
use std::io::{BufRead, Read};
use std::rc::Rc;
use tch::Kind;

/// A value of the pickle machine (only what state dicts contain).
#[derive(Clone, Debug)]
pub(super) enum Pv {
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
pub(super) struct StorageRef {
    pub(super) key: String,
    pub(super) kind: Kind,
    /// Element offset of a legacy storage view into its root storage.
    pub(super) offset: i64,
}

/// `torch._utils._rebuild_tensor[_v2](storage, offset, size, stride, ...)`.
#[derive(Debug)]
pub(super) struct TensorRef {
    pub(super) storage: Rc<StorageRef>,
    pub(super) offset: i64,
    pub(super) size: Vec<i64>,
    pub(super) stride: Vec<i64>,
}

/// The element kind of the storage class `torch.<name>`.
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

/// An integer (or bool) value.
pub(super) fn pv_int(v: &Pv) -> Result<i64> {
    match v {
        Pv::Int(i) => Ok(*i),
        Pv::Bool(b) => Ok(*b as i64),
        other => bail!("expected an integer, found {other:?}"),
    }
}

/// A tuple or list of integers.
fn pv_ints(v: &Pv) -> Result<Vec<i64>> {
    match v {
        Pv::Tuple(t) => t.iter().map(pv_int).collect(),
        Pv::List(l) => l.borrow().iter().map(pv_int).collect(),
        // torch.Size pickles as a REDUCE of torch.Size over a tuple; it is handled in `reduce`.
        other => bail!("expected a tuple of integers, found {other:?}"),
    }
}

/// A string, bytes or integer value as a string (dict keys and storage keys are any of these).
pub(super) fn pv_str(v: &Pv) -> Option<String> {
    match v {
        Pv::Str(s) => Some(s.clone()),
        Pv::Bytes(b) => Some(String::from_utf8_lossy(b).into_owned()),
        Pv::Int(i) => Some(i.to_string()),
        _ => None,
    }
}

/// A minimal pickle machine (protocols 0–4 opcodes that `torch.save` and Python 2/3 pickles of state dicts
/// use), with torch's legacy persistent ids.
pub(super) struct Unpickler<'r, R: BufRead> {
    r: &'r mut R,
    stack: Vec<Pv>,
    marks: Vec<usize>,
    memo: HashMap<u64, Pv>,
    /// The element kind of every storage a persistent id named (legacy files need it to skip storages).
    pub(super) storage_kinds: HashMap<String, Kind>,
}

impl<'r, R: BufRead> Unpickler<'r, R> {
    /// A machine reading pickles from `r`.
    pub(super) fn new(r: &'r mut R) -> Self {
        Unpickler { r, stack: Vec::new(), marks: Vec::new(), memo: HashMap::new(), storage_kinds: HashMap::new() }
    }

    /// A byte string after its length, a little-endian integer of `width` (1, 4 or 8) bytes. The buffer grows
    /// with the bytes read, so a corrupt length fails as truncated rather than being allocated.
    fn counted(&mut self, width: usize) -> Result<Vec<u8>> {
        let mut len = [0u8; 8];
        self.r.read_exact(&mut len[..width]).context("truncated pickle")?;
        let len = u64::from_le_bytes(len);
        let mut b = Vec::new();
        self.r.by_ref().take(len).read_to_end(&mut b).context("truncated pickle")?;
        if b.len() as u64 != len {
            bail!("truncated pickle");
        }
        Ok(b)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        let mut b = [0u8; N];
        self.r.read_exact(&mut b).context("truncated pickle")?;
        Ok(b)
    }

    fn u8(&mut self) -> Result<u8> {
        Ok(self.array::<1>()?[0])
    }

    fn u16(&mut self) -> Result<u16> {
        self.array().map(u16::from_le_bytes)
    }

    fn u32(&mut self) -> Result<u32> {
        self.array().map(u32::from_le_bytes)
    }

    fn u64(&mut self) -> Result<u64> {
        self.array().map(u64::from_le_bytes)
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
    pub(super) fn load(&mut self) -> Result<Pv> {
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
                    let b = self.counted(1)?;
                    self.stack.push(Self::long(&b));
                }
                0x8b => {
                    let b = self.counted(4)?;
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
                    self.u64()?;
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
                    let b = self.counted(1)?;
                    self.stack.push(Pv::Str(String::from_utf8_lossy(&b).into_owned()));
                }
                b'T' => {
                    let b = self.counted(4)?;
                    self.stack.push(Pv::Str(String::from_utf8_lossy(&b).into_owned()));
                }
                b'X' => {
                    let b = self.counted(4)?;
                    self.stack.push(Pv::Str(String::from_utf8(b).context("bad UTF-8 in pickle")?));
                }
                0x8c => {
                    let b = self.counted(1)?;
                    self.stack.push(Pv::Str(String::from_utf8(b).context("bad UTF-8 in pickle")?));
                }
                0x8d => {
                    let b = self.counted(8)?;
                    self.stack.push(Pv::Str(String::from_utf8(b).context("bad UTF-8 in pickle")?));
                }
                b'B' => {
                    let b = self.counted(4)?;
                    self.stack.push(Pv::Bytes(b));
                }
                b'C' => {
                    let b = self.counted(1)?;
                    self.stack.push(Pv::Bytes(b));
                }
                0x8e => {
                    let b = self.counted(8)?;
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

/// Collects the tensors of a pickled object, failing when there are none.
pub(super) fn state_dict_tensors(obj: &Pv) -> Result<Vec<(String, Rc<TensorRef>)>> {
    let mut tensors = Vec::new();
    collect_tensors(obj, "", &mut tensors);
    if tensors.is_empty() {
        bail!("holds no state dict of tensors");
    }
    Ok(tensors)
}
