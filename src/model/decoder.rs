//! The pixel decoder (docs/design.md §1.4, Q8): 1×1 conv in, RoPE blocks on the latent grid (no prefix token),
//! norm, 1×1 conv out to 3·16·16 channels, `PixelShuffle(16)`. Output is ImageNet-normalised.
use super::block::{blocks, Block};
use super::norm::Norm;
use super::rope::RopeEmbedding;
use crate::config::VtpConfig;
use tch::{nn, nn::Module, Tensor};

/// The decoder's hard-wired upscale factor.
pub const UPSCALE: i64 = 16;

/// `DinoV3PixelDecoder` (keys under `pixel_decoder.`).
#[derive(Debug)]
pub struct PixelDecoder {
    proj_in: nn::Conv2D,
    /// The RoPE module (`pixel_decoder.rope_embed.periods`).
    pub rope: RopeEmbedding,
    blocks: Vec<Block>,
    norm: Norm,
    proj_out: nn::Conv2D,
}

fn conv1x1(p: nn::Path, inp: i64, out: i64) -> nn::Conv2D {
    let config = nn::ConvConfig {
        ws_init: nn::Init::Randn { mean: 0.0, stdev: 0.02 },
        bs_init: nn::Init::Const(0.0),
        ..Default::default()
    };
    nn::conv2d(p, inp, out, 1, config)
}

impl PixelDecoder {
    /// Builds the decoder of `c` under `p` (normally `root / "pixel_decoder"`).
    pub fn new(p: nn::Path, c: &VtpConfig) -> Self {
        let s = c.decoder();
        Self {
            proj_in: conv1x1(&p / "proj_in", c.vision_feature_bottleneck, s.embed_dim),
            rope: RopeEmbedding::new(s.head_dim(), p.device()),
            blocks: blocks(p.clone(), &s),
            norm: Norm::new(&p / "norm", s.norm_layer, s.embed_dim),
            proj_out: conv1x1(&p / "proj_out", s.embed_dim, 3 * UPSCALE * UPSCALE),
        }
    }

    /// Latents `[B, C, h, w]` -> images `[B, 3, 16h, 16w]` (ImageNet-normalised).
    pub fn forward(&self, latents: &Tensor) -> Tensor {
        let (b, _, h, w) = latents.size4().expect("latents are [B, C, h, w]");
        let mut x = self.proj_in.forward(latents).flatten(2, 3).transpose(1, 2);
        let rope = self.rope.tables(h, w);
        for block in &self.blocks {
            x = block.forward(&x, &rope);
        }
        let d = x.size()[2];
        let x = self.norm.forward(&x).transpose(1, 2).reshape([b, d, h, w]);
        self.proj_out.forward(&x).pixel_shuffle(UPSCALE)
    }
}
