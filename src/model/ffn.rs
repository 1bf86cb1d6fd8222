//! Feed-forward networks (docs/design.md §1.3 "Feed-forwards", §9.3): GELU MLP and SwiGLU with the official
//! hidden-width rule.
use crate::config::FfnLayer;
use tch::{nn, nn::Module, Tensor};

/// The block FFN.
#[derive(Debug)]
pub enum Ffn {
    /// `fc2(GELU_erf(fc1 x))`.
    Mlp { fc1: nn::Linear, fc2: nn::Linear },
    /// `w3(silu(w1 x) · w2 x)`: `w1` is the gated branch, `w2` the linear one.
    SwiGlu { w1: nn::Linear, w2: nn::Linear, w3: nn::Linear },
}

/// SwiGLU hidden width: `d = int(hidden·2/3)` rounded up to a multiple of `align` (docs/design.md §9.3).
pub fn swiglu_hidden(hidden: i64, align: i64) -> i64 {
    let d = (hidden * 2) / 3;
    d + (-d).rem_euclid(align)
}

/// The hidden width `int(dim·ratio)` and, for SwiGLU, its alignment.
pub fn ffn_hidden(kind: FfnLayer, dim: i64, ratio: f64) -> i64 {
    let hidden = (dim as f64 * ratio) as i64;
    match kind {
        FfnLayer::Mlp => hidden,
        FfnLayer::SwiGlu => swiglu_hidden(hidden, 8),
        FfnLayer::SwiGlu32 => swiglu_hidden(hidden, 32),
        FfnLayer::SwiGlu64 => swiglu_hidden(hidden, 64),
        FfnLayer::SwiGlu128 => swiglu_hidden(hidden, 128),
    }
}

/// `nn.Linear` with the docs/design.md §1.1 init (trunc-normal std 0.02 with ±2 bounds ≈ normal, zero bias).
pub fn linear(p: nn::Path, inp: i64, out: i64, bias: bool) -> nn::Linear {
    linear_std(p, inp, out, bias, 0.02)
}

/// `nn.Linear` with weights `~ N(0, std)` and zero bias.
pub fn linear_std(p: nn::Path, inp: i64, out: i64, bias: bool, std: f64) -> nn::Linear {
    let config = nn::LinearConfig {
        ws_init: nn::Init::Randn { mean: 0.0, stdev: std },
        bs_init: bias.then_some(nn::Init::Const(0.0)),
        bias,
    };
    nn::linear(p, inp, out, config)
}

impl Ffn {
    /// Builds the FFN of `kind` for width `dim` and ratio `ratio`.
    pub fn new(p: nn::Path, kind: FfnLayer, dim: i64, ratio: f64) -> Self {
        let hidden = ffn_hidden(kind, dim, ratio);
        match kind {
            FfnLayer::Mlp => {
                Self::Mlp { fc1: linear(&p / "fc1", dim, hidden, true), fc2: linear(&p / "fc2", hidden, dim, true) }
            }
            _ => Self::SwiGlu {
                w1: linear(&p / "w1", dim, hidden, true),
                w2: linear(&p / "w2", dim, hidden, true),
                w3: linear(&p / "w3", hidden, dim, true),
            },
        }
    }

    /// Applies the FFN token-wise.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        match self {
            Self::Mlp { fc1, fc2 } => fc2.forward(&fc1.forward(x).gelu("none")),
            Self::SwiGlu { w1, w2, w3 } => w3.forward(&(w1.forward(x).silu() * w2.forward(x))),
        }
    }
}
