//! LPIPS-VGG (Zhang et al. 2018), the perceptual distance of VTP's reconstruction evaluation (spec §5.3) and of
//! the pre-training reconstruction loss `L_rec = L1 + LPIPS` (spec §4.1).
//!
//! Semantics of the PyPI package `lpips` 0.1.4, `lpips.LPIPS(net='vgg', version='0.1')` in eval mode:
//! inputs in `[-1, 1]` go through the scaling layer `(x - shift) / scale`, torchvision's VGG16 `features`
//! up to relu1_2, relu2_2, relu3_3, relu4_3 and relu5_3; each feature map is unit-normalised over channels
//! (`f / (sqrt(Σ f²) + 1e-10)`), the two images' normalised maps are subtracted and squared, weighted by the
//! 1×1 linear heads of v0.1 (no bias), averaged over space and summed over the five layers.
//!
//! Weights: the VGG16 backbone is torchvision's ImageNet checkpoint [`BACKBONE_FILE`] (keys
//! `features.N.weight/bias`, from [`BACKBONE_URL`]); the linear heads are the `lpips` package's
//! `lpips/weights/v0.1/vgg.pth` (keys `lin0.model.1.weight` … `lin4.model.1.weight`), kept here under the
//! name [`HEADS_FILE`]. Both files are PyTorch's *legacy* (pre-1.6, non-zip) `torch.save` format, which
//! libtorch's own loader rejects, so [`read_state_dict`] reads it (and zip archives, and safetensors) itself. [`convert_to_safetensors`] packs both into one safetensors file
//! ([`CONVERTED_FILE`]) that [`Lpips::load`] accepts in place of either.
//!
//! [`default_weight_paths`] looks in `$VTP_WEIGHTS`, then `~/.cache/vtp/weights/` (and, for the backbone only,
//! torchvision's own download cache `$TORCH_HOME/hub/checkpoints/`, default `~/.cache/torch/hub/checkpoints/`).
use crate::io::{read_safetensors, write_safetensors};
use anyhow::{bail, Context, Result};
use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use tch::{Device, Kind, Tensor};

/// File name of torchvision's ImageNet VGG16 weights (`VGG16_Weights.IMAGENET1K_V1`), as torchvision
/// downloads it.
pub const BACKBONE_FILE: &str = "vgg16-397923af.pth";
/// Where torchvision downloads [`BACKBONE_FILE`] from.
pub const BACKBONE_URL: &str = "https://download.pytorch.org/models/vgg16-397923af.pth";
/// File name under which the weight folders hold the `lpips` PyPI package's `lpips/weights/v0.1/vgg.pth`
/// (the v0.1 linear heads; md5 `d507d7349b931f0638a25a48a722f98a`).
pub const HEADS_FILE: &str = "lpips_vgg_v0.1.pth";
/// File name of the single safetensors file written by [`convert_to_safetensors`] (backbone and heads);
/// found in a weight folder, it is used in place of the two `.pth` files.
pub const CONVERTED_FILE: &str = "lpips_vgg_v0.1.safetensors";
/// lpips' `normalize_tensor` epsilon.
pub const EPS: f64 = 1e-10;

/// lpips' `ScalingLayer` constants: `x ↦ (x - SHIFT) / SCALE` per RGB channel.
pub const SHIFT: [f32; 3] = [-0.030, -0.088, -0.188];
/// See [`SHIFT`].
pub const SCALE: [f32; 3] = [0.458, 0.448, 0.450];

/// Channels of the five tapped VGG16 layers (relu1_2, relu2_2, relu3_3, relu4_3, relu5_3).
pub const CHANNELS: [i64; 5] = [64, 128, 256, 512, 512];

/// The 13 convolutions of torchvision's VGG16 `features`: (index in `features`, in channels, out channels).
const CONVS: [(usize, i64, i64); 13] = [
    (0, 3, 64),
    (2, 64, 64),
    (5, 64, 128),
    (7, 128, 128),
    (10, 128, 256),
    (12, 256, 256),
    (14, 256, 256),
    (17, 256, 512),
    (19, 512, 512),
    (21, 512, 512),
    (24, 512, 512),
    (26, 512, 512),
    (28, 512, 512),
];

/// lpips' `vgg16` slices: `features[0:4]`, `[4:9]`, `[9:16]`, `[16:23]`, `[23:30]`.
const SLICES: [(usize, usize); 5] = [(0, 4), (4, 9), (9, 16), (16, 23), (23, 30)];

/// LPIPS-VGG v0.1 with frozen weights (no tensor of it requires grad).
///
/// [`Lpips::forward`] is built from ordinary differentiable ops, so with grad enabled it back-propagates to
/// its inputs (perceptual loss); [`Lpips::distance`] runs it under `no_grad` for evaluation. Every image pair
/// is computed independently of the others in the batch.
pub struct Lpips {
    /// `(weight [out, in, 3, 3], bias [out])` of the 13 VGG16 convolutions, in order.
    convs: Vec<(Tensor, Tensor)>,
    /// The five heads, `[1, C, 1, 1]`.
    lins: Vec<Tensor>,
    shift: Tensor,
    scale: Tensor,
    device: Device,
}

impl std::fmt::Debug for Lpips {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lpips").field("net", &"vgg16").field("version", &"0.1").field("device", &self.device).finish()
    }
}

impl Lpips {
    /// Loads the backbone (torchvision's VGG16 state dict, keys `features.N.weight/bias`; an `lpips.LPIPS`
    /// state dict's `net.sliceK.N.*` keys are accepted too) and the heads (`lin{k}.model.1.weight`) onto
    /// `device`, in f32. Each file may be a `.pth` (zip or legacy) or a `.safetensors`; both may be the same
    /// [`convert_to_safetensors`] output. A missing file, key or shape is a one-line error naming the file.
    pub fn load(backbone: &Path, heads: &Path, device: Device) -> Result<Lpips> {
        let backbone_tensors = if heads == backbone {
            read_filtered(backbone, &|k| is_backbone_key(k) || is_head_key(k))?
        } else {
            read_filtered(backbone, &is_backbone_key)?
        };
        let heads_tensors = if heads == backbone { None } else { Some(read_filtered(heads, &is_head_key)?) };
        let heads_tensors = heads_tensors.as_deref().unwrap_or(&backbone_tensors);
        let convs = backbone_from(backbone_tensors.iter(), &backbone.display().to_string())?;
        let lins = heads_from(heads_tensors.iter(), &heads.display().to_string())?;
        Self::from_parts(convs, lins, device)
    }

    /// Loads the weights found by [`default_weight_paths`].
    pub fn load_default(device: Device) -> Result<Lpips> {
        let paths = default_weight_paths()?;
        Self::load(&paths.backbone, &paths.heads, device)
    }

    /// Builds the model from in-memory state dicts: `backbone` with `features.N.weight/bias` (or
    /// `net.sliceK.N.*`) keys, `heads` with `lin{k}.model.1.weight` keys; `source` names them in errors.
    pub fn from_state_dicts(
        backbone: &[(String, Tensor)],
        heads: &[(String, Tensor)],
        source: &str,
        device: Device,
    ) -> Result<Lpips> {
        let convs = backbone_from(backbone.iter(), source)?;
        let lins = heads_from(heads.iter(), source)?;
        Self::from_parts(convs, lins, device)
    }

    fn from_parts(convs: Vec<(Tensor, Tensor)>, lins: Vec<Tensor>, device: Device) -> Result<Lpips> {
        let prep = |t: Tensor| t.to_kind(Kind::Float).to_device(device).contiguous().set_requires_grad(false);
        Ok(Lpips {
            convs: convs.into_iter().map(|(w, b)| (prep(w), prep(b))).collect(),
            lins: lins.into_iter().map(prep).collect(),
            shift: prep(Tensor::from_slice(&SHIFT).reshape([1, 3, 1, 1])),
            scale: prep(Tensor::from_slice(&SCALE).reshape([1, 3, 1, 1])),
            device,
        })
    }

    /// The device the weights live on (inputs are moved there).
    pub fn device(&self) -> Device {
        self.device
    }

    /// The VGG16 features of `x` (`[B, 3, H, W]` in `[-1, 1]`) after the scaling layer: relu1_2, relu2_2,
    /// relu3_3, relu4_3, relu5_3 (`[B, C_k, H/2^k, W/2^k]`), un-normalised.
    pub fn features(&self, x: &Tensor) -> Vec<Tensor> {
        let mut h = (x.to_device(self.device).to_kind(Kind::Float) - &self.shift) / &self.scale;
        let mut conv = self.convs.iter();
        let mut out = Vec::with_capacity(SLICES.len());
        for (k, &(lo, hi)) in SLICES.iter().enumerate() {
            let mut i = lo;
            if k > 0 {
                h = h.max_pool2d([2, 2], [2, 2], [0, 0], [1, 1], false);
                i += 1;
            }
            while i < hi {
                let (w, b) = conv.next().expect("13 convolutions");
                h = h.conv2d(w, Some(b), [1, 1], [1, 1], [1, 1], 1).relu();
                i += 2;
            }
            out.push(h.shallow_clone());
        }
        out
    }

    /// LPIPS between each pair `in0[b]`, `in1[b]` (`[B, 3, H, W]`, same shape, values in `[-1, 1]`, H and W at
    /// least 16): `[B]`. Differentiable w.r.t. both inputs when grad is enabled (no `no_grad` inside).
    pub fn forward(&self, in0: &Tensor, in1: &Tensor) -> Result<Tensor> {
        let (s0, s1) = (in0.size(), in1.size());
        if s0.len() != 4 || s0[1] != 3 || s0 != s1 {
            bail!("LPIPS needs two [B, 3, H, W] tensors of the same shape, got {s0:?} and {s1:?}");
        }
        if s0[2] < 16 || s0[3] < 16 {
            bail!("LPIPS-VGG needs images of at least 16×16 pixels, got {}×{}", s0[2], s0[3]);
        }
        let (f0, f1) = (self.features(in0), self.features(in1));
        let mut val: Option<Tensor> = None;
        for ((a, b), lin) in f0.iter().zip(&f1).zip(&self.lins) {
            let diff = (normalize_tensor(a) - normalize_tensor(b)).pow_tensor_scalar(2);
            let res =
                diff.conv2d(lin, None::<Tensor>, [1, 1], [0, 0], [1, 1], 1).mean_dim([2i64, 3].as_slice(), true, None);
            val = Some(match val {
                None => res,
                Some(v) => v + res,
            });
        }
        Ok(val.expect("five layers").reshape([-1]))
    }

    /// [`Lpips::forward`] without autograd (evaluation): `[B]` distances, detached.
    pub fn distance(&self, in0: &Tensor, in1: &Tensor) -> Result<Tensor> {
        tch::no_grad(|| self.forward(in0, in1))
    }

    /// LPIPS between images in `[0, 1]` (VTP's evaluation calls it with `2·img − 1`), without autograd: `[B]`.
    pub fn distance01(&self, img0: &Tensor, img1: &Tensor) -> Result<Tensor> {
        tch::no_grad(|| self.forward(&(img0 * 2.0 - 1.0), &(img1 * 2.0 - 1.0)))
    }
}

/// lpips' `normalize_tensor`: `x / (sqrt(Σ_c x²) + 1e-10)`.
fn normalize_tensor(x: &Tensor) -> Tensor {
    let norm = x.pow_tensor_scalar(2).sum_dim_intlist([1i64].as_slice(), true, None).sqrt();
    x / (norm + EPS)
}

/// Checks `t`'s shape, naming `source` and `key` in the error.
fn expect_shape(t: &Tensor, shape: &[i64], source: &str, key: &str) -> Result<()> {
    if t.size() != shape {
        bail!("'{source}': '{key}' has shape {:?}, expected {shape:?}", t.size());
    }
    Ok(())
}

/// The 13 `(weight, bias)` pairs of a VGG16 state dict.
fn backbone_from<'a>(
    tensors: impl Iterator<Item = &'a (String, Tensor)>,
    source: &str,
) -> Result<Vec<(Tensor, Tensor)>> {
    let mut map: HashMap<String, &Tensor> = HashMap::new();
    for (name, t) in tensors {
        let key = backbone_key(name).unwrap_or_else(|| name.clone());
        map.insert(key, t);
    }
    let mut out = Vec::with_capacity(CONVS.len());
    for &(i, cin, cout) in &CONVS {
        let get = |p: &str, shape: &[i64]| -> Result<Tensor> {
            let key = format!("features.{i}.{p}");
            let t = map.get(&key).with_context(|| {
                format!("'{source}': missing key '{key}' (expected torchvision's VGG16 state dict, {BACKBONE_FILE})")
            })?;
            expect_shape(t, shape, source, &key)?;
            Ok(t.shallow_clone())
        };
        out.push((get("weight", &[cout, cin, 3, 3])?, get("bias", &[cout])?));
    }
    Ok(out)
}

/// Whether a state-dict key can be part of the backbone (the rest of a VGG16 file, `classifier.*`, is not read).
fn is_backbone_key(k: &str) -> bool {
    k.starts_with("features.") || k.starts_with("net.slice")
}

/// Whether a state-dict key can be one of the heads.
fn is_head_key(k: &str) -> bool {
    k.starts_with("lin")
}

/// `net.sliceK.N.P` (an `lpips.LPIPS` state dict) → `features.N.P`; `features.N.P` stays.
fn backbone_key(name: &str) -> Option<String> {
    let rest = name.strip_prefix("net.slice")?;
    let (_, tail) = rest.split_once('.')?;
    Some(format!("features.{tail}"))
}

/// The five `[1, C, 1, 1]` heads of an lpips v0.1 state dict.
fn heads_from<'a>(tensors: impl Iterator<Item = &'a (String, Tensor)>, source: &str) -> Result<Vec<Tensor>> {
    let map: HashMap<&str, &Tensor> = tensors.map(|(n, t)| (n.as_str(), t)).collect();
    let mut out = Vec::with_capacity(CHANNELS.len());
    for (k, &c) in CHANNELS.iter().enumerate() {
        let candidates =
            [format!("lin{k}.model.1.weight"), format!("lins.{k}.model.1.weight"), format!("lin{k}.model.0.weight")];
        let (key, t) =
            candidates.iter().find_map(|key| map.get(key.as_str()).map(|t| (key, *t))).with_context(|| {
                format!("'{source}': missing key '{}' (expected the lpips v0.1 VGG heads, {HEADS_FILE})", candidates[0])
            })?;
        expect_shape(t, &[1, c, 1, 1], source, key)?;
        out.push(t.shallow_clone());
    }
    Ok(out)
}

/// Writes the backbone and heads as one safetensors file (`features.N.weight/bias` and
/// `lin{k}.model.1.weight`, f32) that [`Lpips::load`] reads in place of either `.pth` file; the inputs are
/// validated as [`Lpips::load`] does.
pub fn convert_to_safetensors(backbone: &Path, heads: &Path, out: &Path) -> Result<()> {
    let convs = backbone_from(read_filtered(backbone, &is_backbone_key)?.iter(), &backbone.display().to_string())?;
    let lins = heads_from(read_filtered(heads, &is_head_key)?.iter(), &heads.display().to_string())?;
    let mut tensors = Vec::new();
    for (&(i, _, _), (w, b)) in CONVS.iter().zip(convs) {
        tensors.push((format!("features.{i}.weight"), w.to_kind(Kind::Float).contiguous()));
        tensors.push((format!("features.{i}.bias"), b.to_kind(Kind::Float).contiguous()));
    }
    for (k, lin) in lins.into_iter().enumerate() {
        tensors.push((format!("lin{k}.model.1.weight"), lin.to_kind(Kind::Float).contiguous()));
    }
    write_safetensors(out, &tensors, &[("format", "lpips-vgg"), ("version", "0.1")])
}

/// Where the LPIPS weights are: the backbone file and the heads file (the same file for a
/// [`CONVERTED_FILE`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LpipsWeightPaths {
    /// VGG16 backbone ([`BACKBONE_FILE`] or [`CONVERTED_FILE`]).
    pub backbone: PathBuf,
    /// lpips v0.1 heads ([`HEADS_FILE`] or [`CONVERTED_FILE`]).
    pub heads: PathBuf,
}

/// The weight folders searched, in order: `$VTP_WEIGHTS` (when set and non-empty), then
/// `~/.cache/vtp/weights`.
pub fn weight_dirs() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(d) = std::env::var_os("VTP_WEIGHTS").filter(|d| !d.is_empty()) {
        dirs.push(PathBuf::from(d));
    }
    if let Some(home) = std::env::var_os("HOME").filter(|d| !d.is_empty()) {
        dirs.push(PathBuf::from(home).join(".cache/vtp/weights"));
    }
    dirs
}

/// torchvision's download cache: `$TORCH_HOME/hub/checkpoints`, default `~/.cache/torch/hub/checkpoints`.
fn torch_hub_checkpoints() -> Option<PathBuf> {
    if let Some(t) = std::env::var_os("TORCH_HOME").filter(|d| !d.is_empty()) {
        return Some(PathBuf::from(t).join("hub/checkpoints"));
    }
    let cache = match std::env::var_os("XDG_CACHE_HOME").filter(|d| !d.is_empty()) {
        Some(x) => PathBuf::from(x),
        None => PathBuf::from(std::env::var_os("HOME").filter(|d| !d.is_empty())?).join(".cache"),
    };
    Some(cache.join("torch/hub/checkpoints"))
}

/// How to obtain the weights (the tail of every "not found" error).
pub fn how_to_get_weights() -> String {
    format!(
        "get the VGG16 backbone from {BACKBONE_URL} (torchvision's ImageNet weights) and the linear heads from the \
         `lpips` PyPI package (`pip download lpips==0.1.4 --no-deps`, file lpips/weights/v0.1/vgg.pth), and save \
         them as {BACKBONE_FILE} and {HEADS_FILE} in $VTP_WEIGHTS or ~/.cache/vtp/weights/ (or pass their paths)"
    )
}

/// Finds the weights: in each of [`weight_dirs`], [`CONVERTED_FILE`], else [`BACKBONE_FILE`] and
/// [`HEADS_FILE`]; the backbone is also taken from torchvision's download cache. When they are not found, a
/// one-line error lists the places searched and says how to obtain the files.
pub fn default_weight_paths() -> Result<LpipsWeightPaths> {
    resolve_weight_paths(None, None)
}

/// Like [`default_weight_paths`], with explicit paths (e.g. from command-line flags) taking precedence; an
/// explicit path that does not exist is an error naming it.
pub fn resolve_weight_paths(backbone: Option<&Path>, heads: Option<&Path>) -> Result<LpipsWeightPaths> {
    resolve_in(backbone, heads, &weight_dirs(), torch_hub_checkpoints())
}

/// Looks for the weights in the given folders only (in order; see [`default_weight_paths`] for the names).
pub fn find_weights_in(dirs: &[PathBuf]) -> Result<LpipsWeightPaths> {
    resolve_in(None, None, dirs, None)
}

fn resolve_in(
    backbone: Option<&Path>,
    heads: Option<&Path>,
    dirs: &[PathBuf],
    backbone_cache: Option<PathBuf>,
) -> Result<LpipsWeightPaths> {
    for p in [backbone, heads].into_iter().flatten() {
        if !p.is_file() {
            bail!("LPIPS weight file '{}' does not exist; {}", p.display(), how_to_get_weights());
        }
    }
    let find = |name: &str, extra: Option<&PathBuf>| -> Option<PathBuf> {
        dirs.iter().chain(extra).map(|d| d.join(name)).find(|p| p.is_file())
    };
    let converted = find(CONVERTED_FILE, None);
    let backbone = backbone
        .map(Path::to_path_buf)
        .or_else(|| converted.clone())
        .or_else(|| find(BACKBONE_FILE, backbone_cache.as_ref()));
    let heads = heads.map(Path::to_path_buf).or(converted).or_else(|| find(HEADS_FILE, None));
    match (backbone, heads) {
        (Some(backbone), Some(heads)) => Ok(LpipsWeightPaths { backbone, heads }),
        (b, h) => {
            let missing: Vec<&str> = [(b.is_none(), BACKBONE_FILE), (h.is_none(), HEADS_FILE)]
                .into_iter()
                .filter_map(|(m, n)| m.then_some(n))
                .collect();
            let mut searched: Vec<String> = dirs.iter().map(|d| format!("'{}'", d.display())).collect();
            if let (None, Some(cache)) = (&b, &backbone_cache) {
                searched.push(format!("'{}' (backbone only)", cache.display()));
            }
            let searched = if searched.is_empty() {
                "no folder ($VTP_WEIGHTS and $HOME unset)".into()
            } else {
                searched.join(", ")
            };
            bail!("LPIPS weights not found: no {} in {searched}; {}", missing.join(" or "), how_to_get_weights())
        }
    }
}

// ---------------------------------------------------------------------------------------------------------
// Reading PyTorch `torch.save` state dicts.

/// Reads a state dict (name → tensor, on the CPU, as stored) from a PyTorch `torch.save` file — zip archive
/// (PyTorch ≥ 1.6) or the legacy pre-1.6 format (torchvision's older ImageNet checkpoints and lpips' heads use
/// it), both read here without running any Python code, libtorch's `Tensor::loadz_multi` rejecting the
/// legacy format and zipped `module.state_dict()`s — or from a `.safetensors` file. Nested dicts are flattened with
/// `.`-joined keys; non-tensor entries are dropped. Errors are one line and name the file.
pub fn read_state_dict(path: &Path) -> Result<Vec<(String, Tensor)>> {
    read_filtered(path, &|_| true)
}

/// [`read_state_dict`] keeping only the tensors whose names pass `keep` (the other storages of a `.pth` are
/// skipped, not read).
fn read_filtered(path: &Path, keep: &dyn Fn(&str) -> bool) -> Result<Vec<(String, Tensor)>> {
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
