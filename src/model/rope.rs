//! 2-D axial RoPE of the VTP encoder and pixel decoder (docs/design.md §1.2, §9.13–§9.14), computed exactly the
//! official way: periods, coordinates, angles, sin and cos are bfloat16 tensors with a bf16 rounding
//! after every op, and q/k are rounded to bf16 for the rotation even inside an f32 model.
use tch::{Device, Kind, Tensor};

/// RoPE base (`pos_embed_rope_base`).
pub const ROPE_BASE: f64 = 100.0;
/// The dtype of the whole RoPE path (`pos_embed_rope_dtype = "bf16"`).
pub const ROPE_KIND: Kind = Kind::BFloat16;

/// The `rope_embed` module: its only state is the persistent bf16 `periods` buffer `[Dh/4]`.
#[derive(Debug)]
pub struct RopeEmbedding {
    /// `periods[j] = 100^(2j/(Dh/2))`, bf16 (key `*.rope_embed.periods`).
    pub periods: Tensor,
}

/// The per-forward `(sin, cos)` tables, each `[H·W, Dh]` bf16.
#[derive(Debug)]
pub struct RopeTables {
    pub sin: Tensor,
    pub cos: Tensor,
}

impl RopeEmbedding {
    /// Computes the periods for head dimension `head_dim` in bf16, as the official init does.
    pub fn new(head_dim: i64, device: Device) -> Self {
        Self { periods: rope_periods(head_dim, device) }
    }

    /// `rope_embed(H, W)`: the bf16 sin/cos tables for an `h × w` token grid ("separate" coords).
    pub fn tables(&self, h: i64, w: i64) -> RopeTables {
        let periods = self.periods.to_kind(ROPE_KIND);
        let device = periods.device();
        let coords = grid_coords(h, w, device);
        let two_pi = 2.0 * std::f64::consts::PI;
        let angles = (coords.unsqueeze(-1) * two_pi) / periods.view([1, 1, -1]);
        let angles = angles.flatten(1, 2).tile([2]);
        RopeTables { sin: angles.sin(), cos: angles.cos() }
    }
}

/// `periods = base ** (2·arange(Dh/4) / (Dh/2))`, every op in bf16.
pub fn rope_periods(head_dim: i64, device: Device) -> Tensor {
    let j = Tensor::arange(head_dim / 4, (ROPE_KIND, device));
    Tensor::pow_scalar(ROPE_BASE, &((j * 2) / (head_dim / 2)))
}

/// Normalised token-centre coordinates `[H·W, 2]` (row, column) in [-1, 1], bf16, row-major tokens.
pub fn grid_coords(h: i64, w: i64, device: Device) -> Tensor {
    let ch = Tensor::arange_start_step(0.5, h as f64, 1.0, (ROPE_KIND, device)) / h;
    let cw = Tensor::arange_start_step(0.5, w as f64, 1.0, (ROPE_KIND, device)) / w;
    let grid = Tensor::meshgrid_indexing(&[ch, cw], "ij");
    let coords = Tensor::stack(&grid, -1).flatten(0, 1);
    coords * 2.0 - 1.0
}

impl RopeTables {
    /// Number of rotated tokens (`H·W`).
    pub fn len(&self) -> i64 {
        self.sin.size()[0]
    }

    /// Whether the grid is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// `apply_rope` for one of q/k `[B, heads, T, Dh]`: rounds every token to bf16, rotates the last
    /// `H·W` tokens with the half-split `rotate_half`, leaves the `T − H·W` prefix tokens as they are,
    /// and casts back to the input dtype.
    pub fn apply(&self, x: &Tensor) -> Tensor {
        let src = x.kind();
        let t = x.to_kind(ROPE_KIND);
        let tokens = t.size()[2];
        let prefix = tokens - self.len();
        let body = t.narrow(2, prefix, self.len());
        let halves = body.chunk(2, -1);
        let rotated = Tensor::cat(&[-&halves[1], halves[0].shallow_clone()], -1);
        let body = &body * &self.cos + rotated * &self.sin;
        let out = if prefix == 0 { body } else { Tensor::cat(&[t.narrow(2, 0, prefix), body], 2) };
        out.to_kind(src)
    }
}
