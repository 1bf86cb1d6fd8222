//! LightningDiT (docs/design.md §8; VTP's generator, §5.4): the flow-matching diffusion transformer of
//! hustvl/LightningDiT `models/lightningdit.py`, with its state-dict key names, init and the official
//! `forward` / `forward_with_cfg` semantics, plus loading and saving its `config.json` (constructor
//! arguments, [`DitConfig`] in `dit::config`) + `model.safetensors` (official keys) layout.
//!
//! Operations follow the official code (and `../shared/bench/pytorch_dit.py`) op by op, so that a
//! libtorch forward is bit-identical to PyTorch's on the same kernels.
use super::config::DitConfig;
use crate::io::{read_safetensors_map, write_safetensors};
use crate::model::norm::Norm;
use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use std::path::Path;
use tch::{nn, nn::Module, Device, Kind, Tensor};

/// Width of the sinusoidal timestep features (`frequency_embedding_size`, docs/design.md §8.2).
pub const FREQUENCY_EMBEDDING_SIZE: i64 = 256;
/// `max_period` of the timestep features and base of the 2-D sin-cos table and the RoPE (docs/design.md §8.2–§8.3).
pub const SINCOS_BASE: f64 = 10000.0;
/// eps of the token norms (RMSNorm or affine-free LayerNorm) and of the RMSNorm q/k-norm (docs/design.md §8.4).
pub const NORM_EPS: f64 = 1e-6;
/// eps of the affine LayerNorm q/k-norm used when `use_qknorm` and not `use_rmsnorm` (docs/design.md §8.4).
pub const QK_LAYER_NORM_EPS: f64 = 1e-5;
/// Std of the label table and t-MLP weights at init (docs/design.md §8.5 "Init").
pub const INIT_STD: f64 = 0.02;
/// The fixed (non-trainable) tables stored in the checkpoint beside the parameters (docs/design.md §8.2–§8.3).
pub const BUFFER_NAMES: [&str; 3] = ["pos_embed", "feat_rope.freqs_cos", "feat_rope.freqs_sin"];

/// Which output channels `forward_with_cfg` guides (docs/design.md §8.6).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuidedChannels {
    /// Every channel, interval checked per sample: the sane variant our sampler uses.
    All,
    /// The official DiT-legacy quirk: only channels 0..2 guided, the interval looks at `t[0]` only.
    FirstThree,
}

/// Intermediates of one forward (the fixtures' `debug.*` tensors, docs/design.md §8.2–§8.5).
#[derive(Debug)]
pub struct DitTrace {
    /// Sinusoidal timestep features `[B, 256]` (`[cos | sin]`).
    pub t_freq: Tensor,
    /// `t_embedder(t)` `[B, hidden]`.
    pub t_emb: Tensor,
    /// `y_embedder(y)` `[B, hidden]` (after label dropout when training).
    pub y_emb: Tensor,
    /// Conditioning `c = t_emb + y_emb` `[B, hidden]`.
    pub c: Tensor,
    /// Patch tokens `[B, T, hidden]` before the position table.
    pub x_embedder_out: Tensor,
    /// Patch tokens + `pos_embed`.
    pub x_embedder_plus_pos: Tensor,
    /// The residual stream after each block `[B, T, hidden]`.
    pub block_outs: Vec<Tensor>,
    /// Final-layer tokens `[B, T, p²·out_channels]` before unpatchify.
    pub final_layer_out: Tensor,
    /// The model output `[B, in_channels, H, W]`.
    pub out: Tensor,
}

/// Linear with xavier-uniform weight and zero bias (docs/design.md §8.5 "Init").
fn xavier_linear(p: nn::Path, inp: i64, out: i64) -> nn::Linear {
    let bound = (6.0 / (inp + out) as f64).sqrt();
    let config = nn::LinearConfig {
        ws_init: nn::Init::Uniform { lo: -bound, up: bound },
        bs_init: Some(nn::Init::Const(0.0)),
        bias: true,
    };
    nn::linear(p, inp, out, config)
}

/// Linear with weight `ws_init` and zero bias.
fn linear_init(p: nn::Path, inp: i64, out: i64, ws_init: nn::Init) -> nn::Linear {
    nn::linear(p, inp, out, nn::LinearConfig { ws_init, bs_init: Some(nn::Init::Const(0.0)), bias: true })
}

/// The token norm of docs/design.md §8.4: RMSNorm (eps 1e-6, weight) or LayerNorm without affine (eps 1e-6),
/// both computed in f32.
#[derive(Debug)]
enum TokenNorm {
    Rms(Norm),
    Plain,
}

impl TokenNorm {
    fn new(p: nn::Path, c: &DitConfig) -> Self {
        if c.use_rmsnorm {
            Self::Rms(Norm::rms(p, c.hidden_size, NORM_EPS))
        } else {
            Self::Plain
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        match self {
            Self::Rms(n) => n.forward(x),
            Self::Plain => {
                let d = x.size()[x.dim() - 1];
                x.to_kind(Kind::Float).layer_norm([d], None::<Tensor>, None::<Tensor>, NORM_EPS, true)
            }
        }
    }
}

/// `modulate(x, shift, scale)` = `x·(1 + scale) + shift` (no shift term when `shift` is `None`).
fn modulate(x: &Tensor, shift: Option<&Tensor>, scale: &Tensor) -> Tensor {
    let y = x * (scale.unsqueeze(1) + 1.0);
    match shift {
        Some(s) => y + s.unsqueeze(1),
        None => y,
    }
}

/// The fixed 2-D sin-cos position table `[T, dim]` of docs/design.md §8.2 (f64, cast to f32): the first half
/// encodes the column, the second half the row, each `[sin | cos]`, `ω_k = 1/10000^(k/(dim/4))`.
pub fn sincos_pos_embed(dim: i64, grid: i64) -> Tensor {
    let opts = (Kind::Double, Device::Cpu);
    let axis = Tensor::arange(grid, (Kind::Float, Device::Cpu)).to_kind(Kind::Double);
    let quarter = dim / 4;
    let omega = Tensor::pow_scalar(SINCOS_BASE, &(Tensor::arange(quarter, opts) / (dim as f64 / 4.0))).reciprocal();
    let one = |pos: &Tensor| {
        let a = pos.unsqueeze(1) * omega.unsqueeze(0);
        Tensor::cat(&[a.sin(), a.cos()], 1)
    };
    let rows = axis.unsqueeze(1).expand([grid, grid], false).reshape([-1]);
    let cols = axis.unsqueeze(0).expand([grid, grid], false).reshape([-1]);
    Tensor::cat(&[one(&cols), one(&rows)], 1).to_kind(Kind::Float)
}

/// The LightningDiT RoPE tables `(freqs_cos, freqs_sin)`, each `[grid², head_dim]` f32 (docs/design.md §8.3,
/// EVA `VisionRotaryEmbeddingFast(head_dim/2, grid)`): head channels `[0, hd/2)` rotate by `row·f`,
/// `[hd/2, hd)` by `col·f`, `f_j = 1/10000^(2j/(hd/2))`, each frequency used by an adjacent pair.
pub fn rope_tables(head_dim: i64, grid: i64) -> (Tensor, Tensor) {
    let d = head_dim / 2;
    let cpu = Device::Cpu;
    let exps = Tensor::arange_start_step(0, d, 2, (Kind::Int64, cpu)).narrow(0, 0, d / 2).to_kind(Kind::Float) / d;
    let inv = Tensor::pow_scalar(SINCOS_BASE, &exps).reciprocal();
    let pos = Tensor::arange(grid, (Kind::Int64, cpu)) / grid * grid;
    let ang = (pos.unsqueeze(1) * inv.unsqueeze(0)).repeat_interleave_self_int(2, -1, None);
    let rows = ang.unsqueeze(1).expand([grid, grid, d], false);
    let cols = ang.unsqueeze(0).expand([grid, grid, d], false);
    let full = Tensor::cat(&[rows, cols], -1).reshape([grid * grid, 2 * d]);
    (full.cos(), full.sin())
}

/// `feat_rope`: the fixed cos/sin tables (keys `feat_rope.freqs_cos`, `feat_rope.freqs_sin`).
#[derive(Debug)]
struct FeatRope {
    cos: Tensor,
    sin: Tensor,
}

impl FeatRope {
    /// `x·cos + rotate_half(x)·sin` with the interleaved pairing `(x₂ᵢ, x₂ᵢ₊₁) → (−x₂ᵢ₊₁, x₂ᵢ)`.
    fn apply(&self, x: &Tensor) -> Tensor {
        let pairs = x.unflatten(-1, [-1, 2]);
        let rot = Tensor::stack(&[-pairs.select(-1, 1), pairs.select(-1, 0)], -1).flatten(-2, -1);
        x * &self.cos + rot * &self.sin
    }
}

/// Attention (docs/design.md §8.4): packed qkv, optional q/k-norm, RoPE, fused SDPA, output projection.
#[derive(Debug)]
struct Attention {
    qkv: nn::Linear,
    proj: nn::Linear,
    qk_norm: Option<(Norm, Norm)>,
    num_heads: i64,
}

impl Attention {
    fn new(p: nn::Path, c: &DitConfig) -> Self {
        let (dim, hd) = (c.hidden_size, c.head_dim());
        let qk_norm = c.use_qknorm.then(|| {
            let make = |q: nn::Path| {
                if c.use_rmsnorm {
                    Norm::rms(q, hd, NORM_EPS)
                } else {
                    Norm::layer(q, hd, QK_LAYER_NORM_EPS)
                }
            };
            (make(&p / "q_norm"), make(&p / "k_norm"))
        });
        Self {
            qkv: xavier_linear(&p / "qkv", dim, 3 * dim),
            proj: xavier_linear(&p / "proj", dim, dim),
            qk_norm,
            num_heads: c.num_heads,
        }
    }

    fn forward(&self, x: &Tensor, rope: Option<&FeatRope>) -> Tensor {
        let (b, n, d) = x.size3().expect("attention input is [B, T, D]");
        let qkv = self.qkv.forward(x).reshape([b, n, 3, self.num_heads, d / self.num_heads]).permute([2, 0, 3, 1, 4]);
        let (q, k, v) = (qkv.get(0), qkv.get(1), qkv.get(2));
        let (q, k) = match &self.qk_norm {
            Some((qn, kn)) => (qn.forward(&q), kn.forward(&k)),
            None => (q, k),
        };
        let (q, k) = match rope {
            Some(r) => (r.apply(&q), r.apply(&k)),
            None => (q, k),
        };
        let o = Tensor::scaled_dot_product_attention(&q, &k, &v, None::<Tensor>, 0.0, false, None, false);
        self.proj.forward(&o.transpose(1, 2).reshape([b, n, d]))
    }
}

/// The block FFN (docs/design.md §8.4): SwiGLU `w3(silu(a)·b)`, `[a | b] = w12(x)`, or `fc2(GELU_tanh(fc1 x))`.
#[derive(Debug)]
enum Mlp {
    SwiGlu { w12: nn::Linear, w3: nn::Linear },
    Gelu { fc1: nn::Linear, fc2: nn::Linear },
}

impl Mlp {
    fn new(p: nn::Path, c: &DitConfig) -> Self {
        let dim = c.hidden_size;
        if c.use_swiglu {
            let h = c.swiglu_hidden();
            Self::SwiGlu { w12: xavier_linear(&p / "w12", dim, 2 * h), w3: xavier_linear(&p / "w3", h, dim) }
        } else {
            let h = c.mlp_hidden();
            Self::Gelu { fc1: xavier_linear(&p / "fc1", dim, h), fc2: xavier_linear(&p / "fc2", h, dim) }
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        match self {
            Self::SwiGlu { w12, w3 } => {
                let ab = w12.forward(x).chunk(2, -1);
                w3.forward(&(ab[0].silu() * &ab[1]))
            }
            Self::Gelu { fc1, fc2 } => fc2.forward(&fc1.forward(x).gelu("tanh")),
        }
    }
}

/// `LightningDiTBlock` (adaLN-Zero, docs/design.md §8.4).
#[derive(Debug)]
struct Block {
    norm1: TokenNorm,
    norm2: TokenNorm,
    attn: Attention,
    mlp: Mlp,
    ada_ln: nn::Linear,
    wo_shift: bool,
}

impl Block {
    fn new(p: nn::Path, c: &DitConfig) -> Self {
        let n_mod = if c.wo_shift { 4 } else { 6 };
        Self {
            norm1: TokenNorm::new(&p / "norm1", c),
            norm2: TokenNorm::new(&p / "norm2", c),
            attn: Attention::new(&p / "attn", c),
            mlp: Mlp::new(&p / "mlp", c),
            ada_ln: linear_init(
                &p / "adaLN_modulation" / "1",
                c.hidden_size,
                n_mod * c.hidden_size,
                nn::Init::Const(0.0),
            ),
            wo_shift: c.wo_shift,
        }
    }

    fn forward(&self, x: &Tensor, c: &Tensor, rope: Option<&FeatRope>) -> Tensor {
        let m = self.ada_ln.forward(&c.silu()).chunk(if self.wo_shift { 4 } else { 6 }, 1);
        let (sh1, sc1, g1, sh2, sc2, g2) = if self.wo_shift {
            (None, &m[0], &m[1], None, &m[2], &m[3])
        } else {
            (Some(&m[0]), &m[1], &m[2], Some(&m[3]), &m[4], &m[5])
        };
        let x = x + g1.unsqueeze(1) * self.attn.forward(&modulate(&self.norm1.forward(x), sh1, sc1), rope);
        &x + g2.unsqueeze(1) * self.mlp.forward(&modulate(&self.norm2.forward(&x), sh2, sc2))
    }
}

/// `FinalLayer` (docs/design.md §8.5): `linear(norm_final(x)·(1 + scale) + shift)`, shift first in the chunk.
#[derive(Debug)]
struct FinalLayer {
    norm_final: TokenNorm,
    linear: nn::Linear,
    ada_ln: nn::Linear,
}

impl FinalLayer {
    fn new(p: nn::Path, c: &DitConfig) -> Self {
        let (h, out) = (c.hidden_size, c.patch_size * c.patch_size * c.out_channels());
        let zero = nn::Init::Const(0.0);
        Self {
            norm_final: TokenNorm::new(&p / "norm_final", c),
            linear: linear_init(&p / "linear", h, out, zero),
            ada_ln: linear_init(&p / "adaLN_modulation" / "1", h, 2 * h, zero),
        }
    }

    fn forward(&self, x: &Tensor, c: &Tensor) -> Tensor {
        let m = self.ada_ln.forward(&c.silu()).chunk(2, 1);
        self.linear.forward(&modulate(&self.norm_final.forward(x), Some(&m[0]), &m[1]))
    }
}

/// Sinusoidal timestep features `[B, 256]` = `[cos(t·f), sin(t·f)]`, `f_i = exp(−ln(10000)·i/128)`
/// computed in f32 on the CPU (docs/design.md §8.2); `t` is the raw flow time, not ×1000.
pub fn timestep_features(t: &Tensor) -> Tensor {
    let half = FREQUENCY_EMBEDDING_SIZE / 2;
    let freqs = (Tensor::arange(half, (Kind::Float, Device::Cpu)) * (-SINCOS_BASE.ln()) / half as f64).exp();
    let args = t.unsqueeze(1).to_kind(Kind::Float) * freqs.to_device(t.device()).unsqueeze(0);
    Tensor::cat(&[args.cos(), args.sin()], -1)
}

/// The LightningDiT model (docs/design.md §8). Every tensor lives in [`Self::vs`] under its official state-dict
/// name; `pos_embed` and the RoPE tables are non-trainable variables there ([`BUFFER_NAMES`]).
#[derive(Debug)]
pub struct LightningDit {
    config: DitConfig,
    vs: nn::VarStore,
    x_embedder: nn::Conv2D,
    pos_embed: Tensor,
    t_mlp: (nn::Linear, nn::Linear),
    y_table: Tensor,
    rope: Option<FeatRope>,
    blocks: Vec<Block>,
    final_layer: FinalLayer,
}

impl LightningDit {
    /// A model for a validated `config` on `device` with the training init of docs/design.md §8.5: xavier-uniform
    /// linears and patch conv (flattened `[hidden, C·p²]` view) with zero biases, label table and t-MLP
    /// weights N(0, 0.02), adaLN modulations and the final linear zero, RMSNorm weights 1, fixed
    /// sin-cos `pos_embed` and RoPE tables. Draws from torch's global generator.
    pub fn new(config: DitConfig, device: Device) -> Result<Self> {
        config.validate()?;
        let c = &config;
        let vs = nn::VarStore::new(device);
        let root = vs.root();
        let (h, p) = (c.hidden_size, c.patch_size);
        let bound = (6.0 / (c.in_channels * p * p + h) as f64).sqrt();
        let conv = nn::ConvConfig {
            stride: p,
            ws_init: nn::Init::Uniform { lo: -bound, up: bound },
            bs_init: nn::Init::Const(0.0),
            ..Default::default()
        };
        let x_embedder = nn::conv2d(&root / "x_embedder" / "proj", c.in_channels, h, p, conv);
        let table = sincos_pos_embed(h, c.grid()).unsqueeze(0).to_device(device);
        let pos_embed = root.add("pos_embed", table, false);
        let normal = nn::Init::Randn { mean: 0.0, stdev: INIT_STD };
        let t_path = &root / "t_embedder" / "mlp";
        let t_mlp =
            (linear_init(&t_path / "0", FREQUENCY_EMBEDDING_SIZE, h, normal), linear_init(&t_path / "2", h, h, normal));
        let y_table = (&root / "y_embedder" / "embedding_table").var("weight", &[c.label_rows(), h], normal);
        let rope = c.use_rope.then(|| {
            let (cos, sin) = rope_tables(c.head_dim(), c.grid());
            let rp = &root / "feat_rope";
            FeatRope {
                cos: rp.add("freqs_cos", cos.to_device(device), false),
                sin: rp.add("freqs_sin", sin.to_device(device), false),
            }
        });
        let blocks = (0..c.depth).map(|i| Block::new(&root / "blocks" / i, c)).collect();
        let final_layer = FinalLayer::new(&root / "final_layer", c);
        Ok(Self { config, vs, x_embedder, pos_embed, t_mlp, y_table, rope, blocks, final_layer })
    }

    /// Loads a directory in the official layout: `config.json` (constructor arguments) +
    /// `model.safetensors` (official keys, buffers included).
    pub fn load_dir(dir: &Path, device: Device) -> Result<Self> {
        if !dir.is_dir() {
            bail!("model directory '{}' does not exist", dir.display());
        }
        let config = DitConfig::from_file(&dir.join("config.json"))?;
        let mut model = Self::new(config, device)?;
        model.load_weights(&dir.join("model.safetensors"))?;
        Ok(model)
    }

    /// Writes `config.json` + `model.safetensors` as `pytorch_dit.py`'s `save_dir` does (the official
    /// state-dict tensor set, metadata `{"format": "pt"}`).
    pub fn save_dir(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create '{}'", dir.display()))?;
        self.save_weights(&dir.join("model.safetensors"))?;
        self.config.to_file(&dir.join("config.json"))
    }

    /// Loads an official-key `model.safetensors` into this model; one error names the file and lists
    /// every missing, unexpected and mis-shaped key (and non-float tensors).
    pub fn load_weights(&mut self, path: &Path) -> Result<()> {
        let file: BTreeMap<String, Tensor> = read_safetensors_map(path)?.into_iter().collect();
        crate::io::load_matching(self.state_dict(), &file, path, "its LightningDiT config")
    }

    /// Writes every tensor of [`Self::state_dict`] (stored dtype) with `{"format": "pt"}`.
    pub fn save_weights(&self, path: &Path) -> Result<()> {
        let tensors: Vec<(String, Tensor)> = self.state_dict().into_iter().map(|(k, t)| (k, t.detach())).collect();
        write_safetensors(path, &tensors, &[("format", "pt")])
    }

    /// The official `state_dict()`: parameters and the fixed tables, by name (sorted).
    pub fn state_dict(&self) -> BTreeMap<String, Tensor> {
        self.vs.variables().into_iter().collect()
    }

    /// The trainable parameters by name, sorted (everything but [`BUFFER_NAMES`]).
    pub fn named_parameters(&self) -> Vec<(String, Tensor)> {
        self.state_dict().into_iter().filter(|(k, _)| !BUFFER_NAMES.contains(&k.as_str())).collect()
    }

    /// The trainable parameters (what an optimiser updates; excludes the fixed tables).
    pub fn trainable_variables(&self) -> Vec<Tensor> {
        self.vs.trainable_variables()
    }

    /// Number of trainable parameter values, as `pytorch_dit.py`'s `param_count`. The docs/design.md §8.1 counts
    /// (B/1 130.61 M, XL/1 675.33 M) also include `pos_embed` (`T·hidden` more).
    pub fn num_parameters(&self) -> i64 {
        self.named_parameters().iter().map(|(_, t)| t.numel() as i64).sum()
    }

    /// The VarStore holding every tensor under its official name.
    pub fn vs(&self) -> &nn::VarStore {
        &self.vs
    }

    /// Mutable access to the VarStore (e.g. `copy` for an EMA, `freeze`, dtype casts).
    pub fn vs_mut(&mut self) -> &mut nn::VarStore {
        &mut self.vs
    }

    /// The constructor arguments.
    pub fn config(&self) -> &DitConfig {
        &self.config
    }

    /// The device the weights live on.
    pub fn device(&self) -> Device {
        self.vs.device()
    }

    /// Checks `x [B, in_channels, input_size, input_size]`, `t [B]` float and `y [B]` int64 in
    /// `[0, label_rows)` (docs/design.md §8.2). `forward` does not check (it panics inside libtorch on bad
    /// shapes or labels); call this where inputs come from outside.
    pub fn check_inputs(&self, x: &Tensor, t: &Tensor, y: &Tensor) -> Result<()> {
        let c = &self.config;
        let s = c.input_size;
        let b = match x.size()[..] {
            [b, ch, h, w] if ch == c.in_channels && h == s && w == s => b,
            ref other => bail!("x must be [B, {}, {s}, {s}], got {other:?}", c.in_channels),
        };
        if t.size() != [b] || !t.is_floating_point() {
            bail!("t must be a float [{b}] tensor, got {:?} {:?}", t.kind(), t.size());
        }
        if y.size() != [b] || y.kind() != Kind::Int64 {
            bail!("y must be an int64 [{b}] tensor, got {:?} {:?}", y.kind(), y.size());
        }
        if b > 0 {
            let (lo, hi) = (y.min().int64_value(&[]), y.max().int64_value(&[]));
            if lo < 0 || hi >= c.label_rows() {
                bail!("labels must be in [0, {}), got [{lo}, {hi}]", c.label_rows());
            }
        }
        Ok(())
    }

    /// Label dropout for classifier-free guidance: each label of `y` `[B]` becomes the null class with
    /// probability `class_dropout_prob` (one `Tensor::rand([B])` on torch's global generator, as the
    /// official `LabelEmbedder.token_drop`); `y` itself when the probability is 0.
    pub fn drop_labels(&self, y: &Tensor) -> Tensor {
        let c = &self.config;
        if c.class_dropout_prob <= 0.0 {
            return y.shallow_clone();
        }
        let drop = Tensor::rand([y.size()[0]], (Kind::Float, y.device())).lt(c.class_dropout_prob);
        y.masked_fill(&drop, c.null_class())
    }

    /// `forward(x, t, y)` (docs/design.md §8.2–§8.5): velocity `[B, in_channels, H, W]` for latents `x`
    /// `[B, C, H, W]`, flow times `t` `[B]` in [0, 1] (0 = noise, 1 = data; unscaled) and labels `y`
    /// `[B]` int64. With `train`, each label becomes the null class with probability
    /// `class_dropout_prob` (`Tensor::rand` on torch's global generator).
    pub fn forward(&self, x: &Tensor, t: &Tensor, y: &Tensor, train: bool) -> Tensor {
        self.forward_trace(x, t, y, train).out
    }

    /// [`Self::forward`] keeping every intermediate ([`DitTrace`]).
    pub fn forward_trace(&self, x: &Tensor, t: &Tensor, y: &Tensor, train: bool) -> DitTrace {
        let c = &self.config;
        let b = x.size()[0];
        let x_embedder_out = self.x_embedder.forward(x).flatten(2, 3).transpose(1, 2);
        let x_embedder_plus_pos = &x_embedder_out + &self.pos_embed;
        let y = if train { self.drop_labels(y) } else { y.shallow_clone() };
        let t_freq = timestep_features(t).to_kind(x_embedder_plus_pos.kind());
        let t_emb = self.t_mlp.1.forward(&self.t_mlp.0.forward(&t_freq).silu());
        let y_emb = Tensor::embedding(&self.y_table, &y, -1, false, false);
        let cond = &t_emb + &y_emb;
        let mut h = x_embedder_plus_pos.shallow_clone();
        let mut block_outs = Vec::with_capacity(self.blocks.len());
        for block in &self.blocks {
            h = block.forward(&h, &cond, self.rope.as_ref());
            block_outs.push(h.shallow_clone());
        }
        let final_layer_out = self.final_layer.forward(&h, &cond);
        let (g, p, oc) = (c.grid(), c.patch_size, c.out_channels());
        let out =
            final_layer_out.reshape([b, g, g, p, p, oc]).permute([0, 5, 1, 3, 2, 4]).reshape([b, oc, g * p, g * p]);
        let out = if c.learn_sigma { out.narrow(1, 0, c.in_channels) } else { out };
        DitTrace {
            t_freq,
            t_emb,
            y_emb,
            c: cond,
            x_embedder_out,
            x_embedder_plus_pos,
            block_outs,
            final_layer_out,
            out,
        }
    }

    /// The doubled CFG batch as the official `inference.py` builds it (docs/design.md §8.6): `[x; x]`, `[t; t]`,
    /// `[y; null]`. Panics when the model has no null class (`class_dropout_prob` 0).
    pub fn cfg_batch(&self, x: &Tensor, t: &Tensor, y: &Tensor) -> (Tensor, Tensor, Tensor) {
        assert!(self.config.has_null_class(), "classifier-free guidance needs class_dropout_prob > 0 (a null class)");
        let null = y.full_like(self.config.null_class());
        (Tensor::cat(&[x, x], 0), Tensor::cat(&[t, t], 0), Tensor::cat(&[y, &null], 0))
    }

    /// `forward_with_cfg(x, t, y, scale, cfg_interval, cfg_interval_start)` (docs/design.md §8.6) on a doubled
    /// batch (`[cond; uncond]` halves, see [`Self::cfg_batch`]); `interval_start = Some(s)` is
    /// `cfg_interval=True, cfg_interval_start=s` (guidance off while t < s). As the official code, only
    /// `x[:n/2]` is used (duplicated) with the full `t`, `y`; the output has both halves.
    /// `FirstThree` is the official code bit for bit: channels 0..2 get
    /// `uncond + scale·(cond − uncond)` (or cond when `t[0] < s`) in both halves, channels 3.. stay the
    /// conditional / unconditional predictions. `All` guides every channel and checks the interval per
    /// sample (the cond half's `t`).
    pub fn forward_with_cfg(
        &self,
        x: &Tensor,
        t: &Tensor,
        y: &Tensor,
        scale: f64,
        interval_start: Option<f64>,
        guided: GuidedChannels,
    ) -> Tensor {
        let n = x.size()[0];
        assert!(n % 2 == 0, "forward_with_cfg needs a doubled batch, got {n} samples");
        let half = n / 2;
        let first = x.narrow(0, 0, half);
        let out = self.forward(&Tensor::cat(&[&first, &first], 0), t, y, false);
        match guided {
            GuidedChannels::FirstThree => {
                let channels = out.size()[1];
                let k = channels.min(3);
                let (eps, rest) = (out.narrow(1, 0, k), out.narrow(1, k, channels - k));
                let (cond, uncond) = (eps.narrow(0, 0, half), eps.narrow(0, half, half));
                let mut mix = &uncond + (&cond - &uncond) * scale;
                if let Some(s) = interval_start {
                    if t.get(0).lt(s).int64_value(&[]) != 0 {
                        mix = cond;
                    }
                }
                Tensor::cat(&[Tensor::cat(&[&mix, &mix], 0), rest], 1)
            }
            GuidedChannels::All => {
                let (cond, uncond) = (out.narrow(0, 0, half), out.narrow(0, half, half));
                let mix = &uncond + (&cond - &uncond) * scale;
                let mix = match interval_start {
                    Some(s) => {
                        let off = t.narrow(0, 0, half).lt(s).view([-1, 1, 1, 1]);
                        cond.where_self(&off, &mix)
                    }
                    None => mix,
                };
                Tensor::cat(&[&mix, &mix], 0)
            }
        }
    }

    /// Guided velocity `[B, …]` for an un-doubled batch: builds [`Self::cfg_batch`], runs
    /// [`Self::forward_with_cfg`] and returns the conditional half (what a CFG sampler integrates).
    pub fn guided_forward(
        &self,
        x: &Tensor,
        t: &Tensor,
        y: &Tensor,
        scale: f64,
        interval_start: Option<f64>,
        guided: GuidedChannels,
    ) -> Tensor {
        let (x2, t2, y2) = self.cfg_batch(x, t, y);
        self.forward_with_cfg(&x2, &t2, &y2, scale, interval_start, guided).narrow(0, 0, x.size()[0])
    }
}
