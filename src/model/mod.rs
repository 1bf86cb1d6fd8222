//! The VTP tokenizer model (`VTPModel`, docs/design.md §1): vision encoder, pixel decoder, CLIP text tower,
//! projections and logit scale, with the released model's public methods (docs/design.md §1.6).
pub mod attention;
pub mod block;
pub mod decoder;
pub mod encoder;
pub mod ffn;
pub mod fingerprint;
pub mod norm;
pub mod rope;
pub mod text;
pub mod weights;

use crate::config::{ClipFeat, VtpConfig};
use anyhow::{bail, Context, Result};
use decoder::PixelDecoder;
use encoder::{Features, VisionEncoder};
use std::path::Path;
use tch::{nn, nn::Module, Device, Kind, Tensor};
use text::TextTower;

/// Which encoder blocks `get_intermediate_layers_feature` returns (its `n` argument).
#[derive(Clone, Debug, PartialEq)]
pub enum Layers {
    /// The last `n` blocks.
    Last(i64),
    /// These 0-based block indices.
    Indices(Vec<i64>),
}

/// `VTPModel`: all parameters live in `vs` under the official state-dict names (docs/design.md §2.3).
#[derive(Debug)]
pub struct VtpModel {
    pub config: VtpConfig,
    pub vs: nn::VarStore,
    pub trunk: VisionEncoder,
    pub visual_proj: Option<nn::Linear>,
    pub pixel_decoder: Option<PixelDecoder>,
    pub text: Option<TextTower>,
    pub logit_scale: Option<Tensor>,
    pub logit_bias: Option<Tensor>,
}

/// The CLIP logits' scale and bias as `forward("clip")` returns them (docs/design.md §9.10).
#[derive(Debug)]
pub struct LogitParams {
    /// `exp(logit_scale)`, stored shape.
    pub scale: Tensor,
    /// `logit_bias` if the model has one.
    pub bias: Option<Tensor>,
}

impl VtpModel {
    /// A randomly initialised model (docs/design.md §1.1/§1.5 init) for a validated `config` on `device`.
    pub fn new(config: VtpConfig, device: Device) -> Result<Self> {
        config.validate()?;
        let vs = nn::VarStore::new(device);
        let root = vs.root();
        let trunk = VisionEncoder::new(&root / "trunk", &config);
        let pixel_decoder = config.train_reconstruction.then(|| PixelDecoder::new(&root / "pixel_decoder", &config));
        let clip = config.train_clip;
        let visual_proj =
            clip.then(|| ffn::linear(&root / "visual_proj", config.clip_input_dim(), config.text_embed_dim, false));
        let text = clip.then(|| TextTower::new(&root, &config));
        let shape: &[i64] = if config.nonscalar_logit_scale { &[1] } else { &[] };
        let init_scale = config.init_logit_scale.filter(|v| *v != 0.0).unwrap_or((1.0f64 / 0.07).ln());
        let logit_scale = clip.then(|| root.var("logit_scale", shape, nn::Init::Const(init_scale)));
        let logit_bias =
            config.init_logit_bias.filter(|_| clip).map(|b| root.var("logit_bias", shape, nn::Init::Const(b)));
        Ok(Self { config, vs, trunk, visual_proj, pixel_decoder, text, logit_scale, logit_bias })
    }

    /// Loads a released-format directory (`config.json` + `model.safetensors`).
    pub fn load(dir: &Path, device: Device) -> Result<Self> {
        if !dir.is_dir() {
            bail!("model directory '{}' does not exist", dir.display());
        }
        let config = VtpConfig::from_file(&dir.join("config.json"))?;
        let mut model = Self::new(config, device)?;
        weights::load(&mut model, &dir.join("model.safetensors"))?;
        Ok(model)
    }

    /// Writes `config.json` + `model.safetensors` in exactly the released format.
    pub fn save(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create '{}'", dir.display()))?;
        weights::save(self, &dir.join("model.safetensors"))?;
        self.config.to_file(&dir.join("config.json"))
    }

    /// The device the weights live on.
    pub fn device(&self) -> Device {
        self.vs.device()
    }

    /// Persistent buffers that are not parameters: the two bf16 RoPE `periods` (docs/design.md §2.3).
    pub fn buffers(&self) -> Vec<(String, &Tensor)> {
        let mut out = vec![("trunk.rope_embed.periods".to_string(), &self.trunk.rope.periods)];
        if let Some(d) = &self.pixel_decoder {
            out.push(("pixel_decoder.rope_embed.periods".to_string(), &d.rope.periods));
        }
        out
    }

    /// Checks an image batch `[B, 3, H, W]` with H, W positive multiples of the patch size.
    fn check_image(&self, image: &Tensor) -> Result<()> {
        let p = self.config.vision_patch_size;
        match image.size()[..] {
            [_, 3, h, w] if h >= p && w >= p && h % p == 0 && w % p == 0 => Ok(()),
            ref s => bail!("images must be [B, 3, H, W] with H and W positive multiples of {p}, got {s:?}"),
        }
    }

    /// `get_last_layer_feature(image, use_bottleneck)`: final-norm CLS `[B, C]` and patches `[B, N, C]`.
    pub fn get_last_layer_feature(&self, image: &Tensor, use_bottleneck: bool) -> Result<Features> {
        self.check_image(image)?;
        Ok(self.trunk.forward_features(image, use_bottleneck))
    }

    /// `get_reconstruction_latents(image)`: bottlenecked patch tokens as `[B, C, H/16, W/16]`.
    pub fn get_reconstruction_latents(&self, image: &Tensor) -> Result<Tensor> {
        let f = self.get_last_layer_feature(image, true)?;
        Ok(encoder::tokens_to_map(&f.patches, f.grid))
    }

    /// `get_latents_decoded_images(latents)`: `[B, C, h, w]` -> ImageNet-normalised `[B, 3, 16h, 16w]`.
    pub fn get_latents_decoded_images(&self, latents: &Tensor) -> Result<Tensor> {
        let decoder = self.pixel_decoder.as_ref().context("reconstruction is not enabled in this model")?;
        match latents.size()[..] {
            [_, c, h, w] if c == self.config.vision_feature_bottleneck && h > 0 && w > 0 => {}
            ref s => bail!("latents must be [B, {}, h, w], got {s:?}", self.config.vision_feature_bottleneck),
        }
        Ok(decoder.forward(latents))
    }

    /// `get_intermediate_layers_feature(image, n, norm)`: per selected block (shallow to deep) the CLS
    /// and patch tokens, never bottlenecked. `reshape=True` is [`encoder::tokens_to_map`] on `patches`.
    pub fn get_intermediate_layers_feature(
        &self,
        image: &Tensor,
        layers: &Layers,
        norm: bool,
    ) -> Result<Vec<Features>> {
        self.check_image(image)?;
        let depth = self.trunk.depth();
        let indices: Vec<i64> = match layers {
            Layers::Last(n) if (1..=depth).contains(n) => (depth - n..depth).collect(),
            Layers::Indices(v) if v.iter().all(|i| (0..depth).contains(i)) => v.clone(),
            other => bail!("layers {other:?} out of range for an encoder of depth {depth}"),
        };
        Ok(self.trunk.intermediate_layers(image, &indices, norm))
    }

    fn clip_parts(&self) -> Result<(&nn::Linear, &TextTower)> {
        match (&self.visual_proj, &self.text) {
            (Some(p), Some(t)) => Ok((p, t)),
            _ => bail!("CLIP is not enabled in this model (train_clip = false)"),
        }
    }

    /// `get_clip_image_feature(image, normalize)`: `[B, text_embed_dim]` (docs/design.md §9.9).
    pub fn get_clip_image_feature(&self, image: &Tensor, normalize: bool) -> Result<Tensor> {
        let (proj, _) = self.clip_parts()?;
        let f = self.get_last_layer_feature(image, !self.config.vision_bottleneck_ae_only)?;
        let feat = match self.config.vision_clip_feat {
            ClipFeat::Cls => f.cls,
            ClipFeat::Pooled => f.patches.mean_dim(1, false, None::<Kind>),
        };
        let out = proj.forward(&feat);
        Ok(if normalize { l2_normalize(&out) } else { out })
    }

    /// `get_clip_text_feature(text, normalize)`: token ids `[B, L]` -> `[B, text_embed_dim]`.
    pub fn get_clip_text_feature(&self, text: &Tensor, normalize: bool) -> Result<Tensor> {
        let (_, tower) = self.clip_parts()?;
        let out = tower.forward(text)?;
        Ok(if normalize { l2_normalize(&out) } else { out })
    }

    /// `forward("clip")`'s `logit_scale` (exponentiated) and `logit_bias`.
    pub fn logit_params(&self) -> Result<LogitParams> {
        let scale = self.logit_scale.as_ref().context("CLIP is not enabled in this model (train_clip = false)")?;
        Ok(LogitParams { scale: scale.exp(), bias: self.logit_bias.as_ref().map(Tensor::shallow_clone) })
    }

    /// `get_clip_logits(image, text)`: `(logits_per_image [Bi, Bt], logits_per_text [Bt, Bi])`.
    pub fn get_clip_logits(&self, image: &Tensor, text: &Tensor) -> Result<(Tensor, Tensor)> {
        let image_features = self.get_clip_image_feature(image, true)?;
        let text_features = self.get_clip_text_feature(text, true)?;
        let LogitParams { scale, bias } = self.logit_params()?;
        // Python evaluates `exp(s) * I @ T.T` left to right: the scale multiplies the image features first.
        let mut logits = (scale * image_features).matmul(&text_features.tr());
        if let Some(b) = bias {
            logits += b;
        }
        let per_text = logits.tr();
        Ok((logits, per_text))
    }
}

/// `F.normalize(x, dim=-1)`: `x / max(‖x‖₂, 1e-12)`.
pub fn l2_normalize(x: &Tensor) -> Tensor {
    let norm = x.linalg_norm(2.0, [-1i64].as_slice(), true, None::<Kind>).clamp_min(1e-12);
    x / norm.expand_as(x)
}
