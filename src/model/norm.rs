//! Normalisation layers (docs/design.md §1.3 "Norms", §7.4): RMSNorm (eps 1e-5) and LayerNorm (eps 1e-6 or 1e-5).
use crate::config::NormLayer;
use tch::{nn, Kind, Tensor};

/// A norm over the last dimension, holding its learned parameters.
#[derive(Debug)]
pub enum Norm {
    /// `(x·rsqrt(mean(x²)+eps)).to(x.dtype) · weight`, normalisation computed in f32.
    Rms { weight: Tensor, eps: f64 },
    /// `F.layer_norm(x, [D], weight, bias, eps)`, computed and returned in f32 (a bf16 input under
    /// autocast is widened first, as OpenCLIP's `LayerNormFp32`).
    Layer { weight: Tensor, bias: Tensor, eps: f64 },
}

impl Norm {
    /// Builds the norm of `kind` over `dim` channels under `p` (keys `weight` [, `bias`]).
    pub fn new(p: nn::Path, kind: NormLayer, dim: i64) -> Self {
        match kind {
            NormLayer::RmsNorm => Self::rms(p, dim, 1e-5),
            NormLayer::LayerNorm => Self::layer(p, dim, 1e-6),
            NormLayer::LayerNormBf16 => Self::layer(p, dim, 1e-5),
        }
    }

    /// RMSNorm with weight initialised to 1.
    pub fn rms(p: nn::Path, dim: i64, eps: f64) -> Self {
        Self::Rms { weight: p.ones("weight", &[dim]), eps }
    }

    /// LayerNorm with weight 1 and bias 0.
    pub fn layer(p: nn::Path, dim: i64, eps: f64) -> Self {
        Self::Layer { weight: p.ones("weight", &[dim]), bias: p.zeros("bias", &[dim]), eps }
    }

    /// Normalises `x` over its last dimension.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        match self {
            Self::Rms { weight, eps } => {
                let xf = x.to_kind(Kind::Float);
                let inv = (xf.pow_tensor_scalar(2).mean_dim(-1, true, None::<Kind>) + *eps).rsqrt();
                (xf * inv).to_kind(x.kind()) * weight
            }
            Self::Layer { weight, bias, eps } => {
                let dim = weight.size()[0];
                x.to_kind(Kind::Float).layer_norm([dim], Some(weight), Some(bias), *eps, true)
            }
        }
    }
}
