//! The vision encoder `trunk` (docs/design.md §1.1, Q7): conv patch embedding, CLS token, pre-norm RoPE blocks,
//! one final norm on all tokens, and the bias-free 64-d `feature_bottleneck` applied after the norm.
use super::block::{blocks, Block};
use super::ffn::linear;
use super::norm::Norm;
use super::rope::{RopeEmbedding, RopeTables};
use crate::config::VtpConfig;
use tch::{nn, nn::Module, Tensor};

/// Final-norm encoder features: CLS `[B, C]` and patch tokens `[B, N, C]` on an `h × w` grid.
#[derive(Debug)]
pub struct Features {
    pub cls: Tensor,
    pub patches: Tensor,
    pub grid: (i64, i64),
}

/// `DinoVisionTransformerWithBottleneck` (keys under `trunk.`).
#[derive(Debug)]
pub struct VisionEncoder {
    patch_embed: nn::Conv2D,
    cls_token: Tensor,
    /// Used by iBOT masking during training; kept so checkpoints round-trip.
    pub mask_token: Tensor,
    /// The RoPE module (its bf16 `periods` buffer is saved as `trunk.rope_embed.periods`).
    pub rope: RopeEmbedding,
    blocks: Vec<Block>,
    norm: Norm,
    feature_bottleneck: Option<nn::Linear>,
    patch_size: i64,
}

impl VisionEncoder {
    /// Builds the encoder of `c` under `p` (normally `root / "trunk"`), with the docs/design.md §1.1 init.
    pub fn new(p: nn::Path, c: &VtpConfig) -> Self {
        let s = c.vision();
        let d = s.embed_dim;
        let bound = (1.0 / (3 * c.vision_patch_size * c.vision_patch_size) as f64).sqrt();
        let uniform = nn::Init::Uniform { lo: -bound, up: bound };
        let conv =
            nn::ConvConfig { stride: c.vision_patch_size, ws_init: uniform, bs_init: uniform, ..Default::default() };
        Self {
            patch_embed: nn::conv2d(&p / "patch_embed" / "proj", 3, d, c.vision_patch_size, conv),
            cls_token: p.var("cls_token", &[1, 1, d], nn::Init::Randn { mean: 0.0, stdev: 0.02 }),
            mask_token: p.zeros("mask_token", &[1, d]),
            rope: RopeEmbedding::new(s.head_dim(), p.device()),
            blocks: blocks(p.clone(), &s),
            norm: Norm::new(&p / "norm", s.norm_layer, d),
            feature_bottleneck: c
                .has_bottleneck()
                .then(|| linear(&p / "feature_bottleneck", d, c.vision_feature_bottleneck, false)),
            patch_size: c.vision_patch_size,
        }
    }

    /// Patch embedding + CLS (`prepare_tokens_with_masks`): `[B, 3, H, W]` -> tokens `[B, 1 + N, D]`,
    /// the grid and its RoPE tables; patches where `masks` (`[B, N]` bool) is set become `mask_token`.
    fn prepare_tokens(&self, image: &Tensor, masks: Option<&Tensor>) -> (Tensor, (i64, i64), RopeTables) {
        let x = self.patch_embed.forward(image);
        let (b, d, h, w) = x.size4().expect("patch embedding is [B, D, h, w]");
        let mut patches = x.flatten(2, 3).transpose(1, 2);
        if let Some(m) = masks {
            let token = self.mask_token.to_kind(patches.kind()).unsqueeze(0);
            patches = token.where_self(&m.unsqueeze(-1), &patches);
        }
        let cls = self.cls_token.expand([b, 1, d], false);
        (Tensor::cat(&[cls, patches], 1), (h, w), self.rope.tables(h, w))
    }

    /// Runs every block; returns the residual stream after each block listed in `take` (in block
    /// order) and after the last block.
    fn run_blocks(&self, image: &Tensor, take: &[i64]) -> (Tensor, Vec<Tensor>, (i64, i64)) {
        self.run_blocks_train(image, take, None, 0.0)
    }

    /// [`Self::run_blocks`] with iBOT masks and a stochastic-depth rate (training).
    fn run_blocks_train(
        &self,
        image: &Tensor,
        take: &[i64],
        masks: Option<&Tensor>,
        drop_path_rate: f64,
    ) -> (Tensor, Vec<Tensor>, (i64, i64)) {
        let (mut x, grid, rope) = self.prepare_tokens(image, masks);
        let mut taken = Vec::with_capacity(take.len());
        for (i, block) in self.blocks.iter().enumerate() {
            x = block.forward_train(&x, &rope, drop_path_rate);
            if take.contains(&(i as i64)) {
                taken.push(x.shallow_clone());
            }
        }
        (x, taken, grid)
    }

    /// Splits normalised tokens into CLS and patches.
    fn split(x: Tensor, grid: (i64, i64)) -> Features {
        let n = x.size()[1];
        Features { cls: x.select(1, 0), patches: x.narrow(1, 1, n - 1), grid }
    }

    /// `forward_features`: final-norm CLS and patch tokens, bottlenecked when `use_bottleneck` and the
    /// bottleneck layer exists.
    pub fn forward_features(&self, image: &Tensor, use_bottleneck: bool) -> Features {
        self.forward_train(image, None, 0.0, use_bottleneck)
    }

    /// The training forward of one objective (docs/design.md §4.1 legacy meta-arch: the trunk runs once per
    /// objective): optional iBOT `masks` (`[B, N]` bool, masked patches become `mask_token`), stochastic
    /// depth at `drop_path_rate`, final norm, bottleneck when `use_bottleneck`.
    pub fn forward_train(
        &self,
        image: &Tensor,
        masks: Option<&Tensor>,
        drop_path_rate: f64,
        use_bottleneck: bool,
    ) -> Features {
        let (x, _, grid) = self.run_blocks_train(image, &[], masks, drop_path_rate);
        let f = Self::split(self.norm.forward(&x), grid);
        if use_bottleneck {
            Features { cls: self.bottleneck(&f.cls), patches: self.bottleneck(&f.patches), grid }
        } else {
            f
        }
    }

    /// `feature_bottleneck` (identity when the bottleneck width equals the encoder width).
    pub fn bottleneck(&self, x: &Tensor) -> Tensor {
        match &self.feature_bottleneck {
            Some(l) => l.forward(x),
            None => x.shallow_clone(),
        }
    }

    /// `get_intermediate_layers`: the outputs of the given 0-based blocks, optionally final-normed,
    /// split into CLS and patches, shallow to deep.
    pub fn intermediate_layers(&self, image: &Tensor, layers: &[i64], norm: bool) -> Vec<Features> {
        let (_, taken, grid) = self.run_blocks(image, layers);
        taken.into_iter().map(|x| Self::split(if norm { self.norm.forward(&x) } else { x }, grid)).collect()
    }

    /// Number of blocks.
    pub fn depth(&self) -> i64 {
        self.blocks.len() as i64
    }

    /// The patch size (spatial downsampling factor).
    pub fn patch_size(&self) -> i64 {
        self.patch_size
    }
}

/// Patch tokens `[B, N, C]` -> a 4-D map `[B, C, h, w]` (`_patch_tokens_to_4d`).
pub fn tokens_to_map(tokens: &Tensor, grid: (i64, i64)) -> Tensor {
    let (b, _, c) = tokens.size3().expect("tokens are [B, N, C]");
    tokens.transpose(1, 2).reshape([b, c, grid.0, grid.1])
}
