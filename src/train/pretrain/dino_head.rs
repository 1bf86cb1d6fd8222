//! The DINO head shared by the DINO (CLS) and iBOT (patch) losses (docs/design.md §4.4; VTP's
//! `vtp/models/heads/dino_head.py` = DINOv2's `DINOHead`): a 3-layer MLP
//! `Linear(in, hidden) → GELU → Linear(hidden, hidden) → GELU → Linear(hidden, bottleneck)`,
//! `F.normalize(dim=-1, eps=1e-12)`, then the weight-normalised `last_layer`
//! `Linear(bottleneck, K, bias=False)` with `weight = g · v / ‖v‖` per prototype.
use super::config::DinoHeadConfig;
use crate::model::ffn::linear;
use crate::model::l2_normalize;
use tch::{nn, nn::Module, Tensor};

/// `DINOHead` (keys `mlp.{0,2,4}.{weight,bias}`, `last_layer.weight_g`, `last_layer.weight_v`).
#[derive(Debug)]
pub struct DinoHead {
    mlp: [nn::Linear; 3],
    weight_g: Tensor,
    weight_v: Tensor,
}

impl DinoHead {
    /// Builds the head over `in_dim` features under `p` (normally `root / "dino_head"`): MLP weights
    /// trunc-normal(0.02) with zero biases; `last_layer.weight_v` PyTorch's default `nn.Linear` init
    /// `U(±1/√bottleneck)` and `weight_g` filled with 1, as DINOv2 does.
    pub fn new(p: nn::Path, in_dim: i64, c: &DinoHeadConfig) -> Self {
        let mlp = [
            linear(&p / "mlp" / 0, in_dim, c.hidden_dim, true),
            linear(&p / "mlp" / 2, c.hidden_dim, c.hidden_dim, true),
            linear(&p / "mlp" / 4, c.hidden_dim, c.bottleneck_dim, true),
        ];
        let bound = 1.0 / (c.bottleneck_dim as f64).sqrt();
        let last = &p / "last_layer";
        let weight_v =
            last.var("weight_v", &[c.out_dim, c.bottleneck_dim], nn::Init::Uniform { lo: -bound, up: bound });
        let weight_g = last.var("weight_g", &[c.out_dim, 1], nn::Init::Const(1.0));
        Self { mlp, weight_g, weight_v }
    }

    /// `[.., in_dim]` features → `[.., K]` prototype logits.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let x = self.mlp[0].forward(x).gelu("none");
        let x = self.mlp[1].forward(&x).gelu("none");
        let x = l2_normalize(&self.mlp[2].forward(&x));
        x.linear::<Tensor>(&Tensor::internal_weight_norm(&self.weight_v, &self.weight_g, 0), None)
    }
}
