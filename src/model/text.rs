//! The OpenCLIP text tower flattened onto `VTPModel` (docs/design.md §1.5, §9.4–§9.8, Q10): token + positional
//! embeddings, residual attention blocks (`nn.MultiheadAttention` layout), `ln_final`, pooling and the
//! text projection.
use super::block::{scale, LayerScale};
use super::ffn::{linear, linear_std};
use super::norm::Norm;
use crate::config::{TextPool, TextProj, VtpConfig};
use anyhow::{bail, Result};
use tch::{nn, nn::Module, Kind, Tensor};

/// `nn.MultiheadAttention` with packed `in_proj_weight` rows `[q; k; v]`.
#[derive(Debug)]
struct MultiheadAttention {
    in_proj_weight: Tensor,
    in_proj_bias: Tensor,
    out_proj: nn::Linear,
    num_heads: i64,
}

impl MultiheadAttention {
    fn new(p: nn::Path, width: i64, num_heads: i64, layers: i64) -> Self {
        let std = (width as f64).powf(-0.5);
        let out_std = std * ((2 * layers) as f64).powf(-0.5);
        Self {
            in_proj_weight: p.var("in_proj_weight", &[3 * width, width], nn::Init::Randn { mean: 0.0, stdev: std }),
            in_proj_bias: p.zeros("in_proj_bias", &[3 * width]),
            out_proj: linear_std(&p / "out_proj", width, width, true, out_std),
            num_heads,
        }
    }

    /// Self-attention of `x [B, L, W]` with an optional additive mask `[L, L]`.
    fn forward(&self, x: &Tensor, mask: Option<&Tensor>) -> Tensor {
        match mask {
            None if !autograd_recording(&self.in_proj_bias) => self.forward_fused(x),
            _ => self.forward_sdpa(x, mask),
        }
    }

    /// PyTorch's unmasked inference fast path (`torch._native_multi_head_attention`); using it
    /// where PyTorch does keeps bidirectional-text outputs bit-identical to the reference.
    fn forward_fused(&self, x: &Tensor) -> Tensor {
        let (w, out_bias) = (x.size()[2], self.out_proj.bs.as_ref().expect("out_proj has a bias"));
        Tensor::internal_native_multi_head_attention(
            x,
            x,
            x,
            w,
            self.num_heads,
            &self.in_proj_weight,
            &self.in_proj_bias,
            &self.out_proj.ws,
            out_bias,
            None::<Tensor>,
            false,
            true,
            None,
        )
        .0
    }

    /// Packed in-projection, SDPA with the additive mask, out-projection (the masked and training path).
    fn forward_sdpa(&self, x: &Tensor, mask: Option<&Tensor>) -> Tensor {
        let (b, t, w) = x.size3().expect("text tokens are [B, L, W]");
        let heads = |y: &Tensor| y.reshape([b, t, self.num_heads, w / self.num_heads]).transpose(1, 2);
        let qkv = x.linear(&self.in_proj_weight, Some(&self.in_proj_bias)).chunk(3, -1);
        let (q, k, v) = (heads(&qkv[0]), heads(&qkv[1]), heads(&qkv[2]));
        let o = Tensor::scaled_dot_product_attention(&q, &k, &v, mask, 0.0, false, None, false);
        self.out_proj.forward(&o.transpose(1, 2).reshape([b, t, w]))
    }
}

/// Whether autograd records operations on `param` (grad mode on and the parameter trainable): the
/// condition under which PyTorch's `nn.MultiheadAttention` leaves its fused inference fast path.
fn autograd_recording(param: &Tensor) -> bool {
    (param.narrow(0, 0, 1) * 1.0).requires_grad()
}

/// `ResidualAttentionBlock`: `x += ls_1(attn(ln_1 x))`, `x += ls_2(mlp(ln_2 x))`.
#[derive(Debug)]
struct ResidualBlock {
    ln_1: Norm,
    attn: MultiheadAttention,
    ls_1: Option<LayerScale>,
    ln_2: Norm,
    c_fc: nn::Linear,
    c_proj: nn::Linear,
    ls_2: Option<LayerScale>,
    quick_gelu: bool,
}

impl ResidualBlock {
    fn new(p: nn::Path, c: &VtpConfig) -> Self {
        let w = c.text_embed_dim;
        let hidden = (w as f64 * c.text_mlp_ratio) as i64;
        let std = (w as f64).powf(-0.5);
        let out_std = std * ((2 * c.text_depth) as f64).powf(-0.5);
        let ls = |name: &str| c.text_ls_init_value.map(|v| LayerScale::new(&p / name, w, v));
        Self {
            ln_1: Norm::layer(&p / "ln_1", w, 1e-5),
            attn: MultiheadAttention::new(&p / "attn", w, c.text_num_heads, c.text_depth),
            ls_1: ls("ls_1"),
            ln_2: Norm::layer(&p / "ln_2", w, 1e-5),
            c_fc: linear_std(&p / "mlp" / "c_fc", w, hidden, true, (2.0 * w as f64).powf(-0.5)),
            c_proj: linear_std(&p / "mlp" / "c_proj", hidden, w, true, out_std),
            ls_2: ls("ls_2"),
            quick_gelu: c.text_quick_gelu,
        }
    }

    fn act(&self, h: Tensor) -> Tensor {
        if self.quick_gelu {
            &h * (&h * 1.702).sigmoid()
        } else {
            h.gelu("none")
        }
    }

    fn forward(&self, x: &Tensor, mask: Option<&Tensor>) -> Tensor {
        let x = x + scale(&self.ls_1, self.attn.forward(&self.ln_1.forward(x), mask));
        let h = self.c_fc.forward(&self.ln_2.forward(&x));
        &x + scale(&self.ls_2, self.c_proj.forward(&self.act(h)))
    }
}

/// The text projection: a bare matrix used as `x @ P`, an `nn.Linear`, or nothing.
#[derive(Debug)]
enum Projection {
    Matrix(Tensor),
    Linear(nn::Linear),
    Identity,
}

/// The CLIP text encoder.
#[derive(Debug)]
pub struct TextTower {
    token_embedding: nn::Embedding,
    positional_embedding: Tensor,
    blocks: Vec<ResidualBlock>,
    ln_final: Norm,
    projection: Projection,
    /// Causal additive mask `[L, L]` (−inf above the diagonal), rebuilt here, never stored (Q1).
    attn_mask: Option<Tensor>,
    pool: TextPool,
    context_length: i64,
}

impl TextTower {
    /// Builds the tower of `c` under the model root `root` (its keys are top-level, docs/design.md §2.3).
    pub fn new(root: &nn::Path, c: &VtpConfig) -> Self {
        let (w, l) = (c.text_embed_dim, c.text_context_length);
        let emb = nn::EmbeddingConfig { ws_init: nn::Init::Randn { mean: 0.0, stdev: 0.02 }, ..Default::default() };
        let projection = match (c.text_proj_type, c.text_proj_bias) {
            (TextProj::None, _) => Projection::Identity,
            (TextProj::Linear, true) => Projection::Linear(linear(root / "text_projection", w, w, true)),
            (TextProj::Linear, false) => Projection::Matrix(root.var(
                "text_projection",
                &[w, w],
                nn::Init::Randn { mean: 0.0, stdev: (w as f64).powf(-0.5) },
            )),
        };
        let attn_mask = (!c.text_no_causal_mask)
            .then(|| Tensor::full([l, l], f64::NEG_INFINITY, (Kind::Float, root.device())).triu(1));
        let resblocks = root / "text_transformer" / "resblocks";
        Self {
            token_embedding: nn::embedding(root / "token_embedding", c.text_vocab_size, w, emb),
            positional_embedding: root.var("positional_embedding", &[l, w], nn::Init::Randn { mean: 0.0, stdev: 0.01 }),
            blocks: (0..c.text_depth).map(|i| ResidualBlock::new(&resblocks / i, c)).collect(),
            ln_final: Norm::layer(root / "ln_final", w, 1e-5),
            projection,
            attn_mask,
            pool: c.text_pool_type,
            context_length: l,
        }
    }

    /// `get_clip_text_feature` before normalisation: token ids `[B, L]` (int64) -> `[B, Wt]`.
    pub fn forward(&self, text: &Tensor) -> Result<Tensor> {
        let size = text.size();
        if size.len() != 2 || size[1] != self.context_length {
            bail!("text must be token ids [B, {}], got {:?}", self.context_length, size);
        }
        let vocab = self.token_embedding.ws.size()[0];
        let (lo, hi) = (text.min().int64_value(&[]), text.max().int64_value(&[]));
        if lo < 0 || hi >= vocab {
            bail!("token ids must lie in [0, {vocab}) for this text tower, got ids in [{lo}, {hi}]");
        }
        let mut x = self.token_embedding.forward(text) + &self.positional_embedding;
        let mask = self.attn_mask.as_ref().map(|m| m.to_kind(x.kind()));
        for block in &self.blocks {
            x = block.forward(&x, mask.as_ref());
        }
        let x = self.ln_final.forward(&x);
        let pooled = match self.pool {
            TextPool::Argmax => {
                let rows = Tensor::arange(size[0], (Kind::Int64, x.device()));
                x.index(&[Some(rows), Some(text.argmax(-1, false))])
            }
            TextPool::First => x.select(1, 0),
            TextPool::Last => x.select(1, size[1] - 1),
            TextPool::None => bail!("text_pool_type 'none' is not supported"),
        };
        Ok(match &self.projection {
            Projection::Matrix(p) => pooled.matmul(p),
            Projection::Linear(l) => l.forward(&pooled),
            Projection::Identity => pooled,
        })
    }
}

/// Token ids of `texts` as the text tower's int64 input `[N, context_length]` (docs/design.md §3).
pub fn token_ids(tokenizer: &crate::tokenizer::ClipTokenizer, texts: &[&str], context_length: usize) -> Tensor {
    let flat: Vec<i64> = tokenizer.tokenize(texts, context_length).concat();
    Tensor::from_slice(&flat).view([texts.len() as i64, context_length as i64])
}
