//! The pre-norm transformer block shared by the encoder and the pixel decoder (docs/design.md §1.3, Q4):
//! `x = x + ls1(attn(norm1(x)))`, `x = x + ls2(mlp(norm2(x)))`.
use super::attention::SelfAttention;
use super::ffn::Ffn;
use super::norm::Norm;
use super::rope::RopeTables;
use crate::config::StackConfig;
use tch::{nn, Tensor};

/// `LayerScale`: a per-channel multiply by `gamma` (absent when the init value is null).
#[derive(Debug)]
pub struct LayerScale {
    gamma: Tensor,
}

impl LayerScale {
    /// `gamma` initialised to `init` (key `gamma`).
    pub fn new(p: nn::Path, dim: i64, init: f64) -> Self {
        Self { gamma: p.var("gamma", &[dim], nn::Init::Const(init)) }
    }

    /// `x · gamma`.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        x * &self.gamma
    }
}

/// Applies an optional LayerScale.
pub fn scale(ls: &Option<LayerScale>, x: Tensor) -> Tensor {
    match ls {
        Some(ls) => ls.forward(&x),
        None => x,
    }
}

/// `SelfAttentionBlock`.
#[derive(Debug)]
pub struct Block {
    norm1: Norm,
    attn: SelfAttention,
    ls1: Option<LayerScale>,
    norm2: Norm,
    mlp: Ffn,
    ls2: Option<LayerScale>,
}

impl Block {
    /// Builds one block of the stack `s`.
    pub fn new(p: nn::Path, s: &StackConfig) -> Self {
        let d = s.embed_dim;
        let ls = |name: &str| s.layer_scale().then(|| LayerScale::new(&p / name, d, s.init_values.unwrap_or(0.0)));
        Self {
            norm1: Norm::new(&p / "norm1", s.norm_layer, d),
            attn: SelfAttention::new(&p / "attn", d, s.num_heads, s.use_qk_norm),
            ls1: ls("ls1"),
            norm2: Norm::new(&p / "norm2", s.norm_layer, d),
            mlp: Ffn::new(&p / "mlp", s.ffn_layer, d, s.mlp_ratio),
            ls2: ls("ls2"),
        }
    }

    /// One block step on the residual stream `x [B, T, D]`.
    pub fn forward(&self, x: &Tensor, rope: &RopeTables) -> Tensor {
        self.forward_train(x, rope, 0.0)
    }

    /// One training step with stochastic depth: each residual branch goes through [`drop_path`]
    /// with rate `drop_path_rate` (0 is [`Self::forward`]).
    pub fn forward_train(&self, x: &Tensor, rope: &RopeTables, drop_path_rate: f64) -> Tensor {
        let x = x + drop_path(scale(&self.ls1, self.attn.forward(&self.norm1.forward(x), rope)), drop_path_rate);
        &x + drop_path(scale(&self.ls2, self.mlp.forward(&self.norm2.forward(&x))), drop_path_rate)
    }
}

/// Stochastic depth (timm `drop_path`, DINOv2's `DropPath`): each sample's residual branch is zeroed
/// with probability `rate` and the kept ones scaled by `1 / (1 - rate)`; identity at rate 0. Draws from
/// libtorch's generator (the trainer seeds it per step).
pub fn drop_path(x: Tensor, rate: f64) -> Tensor {
    if rate <= 0.0 {
        return x;
    }
    let keep = 1.0 - rate;
    let mut shape = vec![1i64; x.dim()];
    shape[0] = x.size()[0];
    let mask = Tensor::empty(shape.as_slice(), (x.kind(), x.device())).bernoulli_float_(keep) / keep;
    x * mask
}

/// The `depth` blocks of a stack under `p / "blocks"`.
pub fn blocks(p: nn::Path, s: &StackConfig) -> Vec<Block> {
    (0..s.depth).map(|i| Block::new(&p / "blocks" / i, s)).collect()
}
