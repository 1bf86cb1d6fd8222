//! Multi-head self-attention of the ViT blocks (docs/design.md §1.3 "Attention", Q3): packed qkv Linear,
//! optional per-head QK RMSNorm, bf16 2-D RoPE, fused scaled-dot-product attention, output Linear.
use super::ffn::linear;
use super::norm::Norm;
use super::rope::RopeTables;
use tch::{nn, nn::Module, Tensor};

/// `SelfAttention` (keys `qkv`, `proj`, optional `q_norm`, `k_norm`).
#[derive(Debug)]
pub struct SelfAttention {
    qkv: nn::Linear,
    proj: nn::Linear,
    qk_norm: Option<(Norm, Norm)>,
    num_heads: i64,
}

impl SelfAttention {
    /// Builds attention over `dim` channels with `num_heads` heads.
    pub fn new(p: nn::Path, dim: i64, num_heads: i64, use_qk_norm: bool) -> Self {
        let head_dim = dim / num_heads;
        let qk_norm =
            use_qk_norm.then(|| (Norm::rms(&p / "q_norm", head_dim, 1e-5), Norm::rms(&p / "k_norm", head_dim, 1e-5)));
        Self {
            qkv: linear(&p / "qkv", dim, 3 * dim, true),
            proj: linear(&p / "proj", dim, dim, true),
            qk_norm,
            num_heads,
        }
    }

    /// `x [B, T, D]` -> `[B, T, D]`; RoPE rotates the last `rope.len()` tokens.
    pub fn forward(&self, x: &Tensor, rope: &RopeTables) -> Tensor {
        let (b, t, d) = x.size3().expect("attention input is [B, T, D]");
        let qkv = self.qkv.forward(x).reshape([b, t, 3, self.num_heads, d / self.num_heads]);
        let [q, k, v] = [0, 1, 2].map(|i| qkv.select(2, i).transpose(1, 2));
        let (q, k) = match &self.qk_norm {
            Some((qn, kn)) => (qn.forward(&q), kn.forward(&k)),
            None => (q, k),
        };
        let (q, k) = (rope.apply(&q), rope.apply(&k));
        let o = Tensor::scaled_dot_product_attention(&q, &k, &v, None::<Tensor>, 0.0, false, None, false);
        self.proj.forward(&o.transpose(1, 2).reshape([b, t, d]))
    }
}
