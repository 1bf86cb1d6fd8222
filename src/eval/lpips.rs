//! LPIPS-VGG (Zhang et al. 2018), the perceptual distance of VTP's reconstruction evaluation
//! (docs/design.md §5.3) and of the pre-training reconstruction loss `L_rec = L1 + LPIPS`
//! (docs/design.md §4.1).
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
//! libtorch's own loader rejects, so [`read_state_dict`] (from [`crate::torch_load`]) reads it (and zip archives,
//! and safetensors) itself. [`convert_to_safetensors`] packs both into one safetensors file
//! ([`CONVERTED_FILE`]) that [`Lpips::load`] accepts in place of either.
//!
//! [`default_weight_paths`] looks in `$VTP_WEIGHTS`, then `~/.cache/vtp/weights/` (and, for the backbone only,
//! torchvision's own download cache `$TORCH_HOME/hub/checkpoints/`, default `~/.cache/torch/hub/checkpoints/`).
use crate::io::write_safetensors;
pub use crate::torch_load::read_state_dict;
use crate::torch_load::read_state_dict_filtered;
use anyhow::{bail, Context, Result};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
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
pub const CONVS: [(usize, i64, i64); 13] = [
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
            read_state_dict_filtered(backbone, &|k| is_backbone_key(k) || is_head_key(k))?
        } else {
            read_state_dict_filtered(backbone, &is_backbone_key)?
        };
        let heads_tensors = if heads == backbone { None } else { Some(read_state_dict_filtered(heads, &is_head_key)?) };
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
    let convs =
        backbone_from(read_state_dict_filtered(backbone, &is_backbone_key)?.iter(), &backbone.display().to_string())?;
    let lins = heads_from(read_state_dict_filtered(heads, &is_head_key)?.iter(), &heads.display().to_string())?;
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
