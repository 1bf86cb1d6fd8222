//! `VTPConfig` (docs/design.md §2.1): every field of the released `config.json`, with the official defaults,
//! the named presets of the released checkpoints (§2.2) and validation.
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::path::Path;

/// Feed-forward kind (`*_ffn_layer`, docs/design.md §1.3): GELU MLP or SwiGLU with a hidden-width alignment.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum FfnLayer {
    /// `fc2(GELU(fc1 x))`, hidden `int(D·ratio)`.
    #[serde(rename = "mlp")]
    Mlp,
    /// SwiGLU, hidden rounded up to a multiple of 8.
    #[serde(rename = "swiglu")]
    SwiGlu,
    /// SwiGLU, hidden rounded up to a multiple of 32.
    #[serde(rename = "swiglu32")]
    SwiGlu32,
    /// SwiGLU, hidden rounded up to a multiple of 64.
    #[serde(rename = "swiglu64")]
    SwiGlu64,
    /// SwiGLU, hidden rounded up to a multiple of 128.
    #[serde(rename = "swiglu128")]
    SwiGlu128,
}

/// Normalisation kind (`*_norm_layer`, docs/design.md §1.3 / §9.12).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum NormLayer {
    /// RMSNorm, eps 1e-5, weight only.
    #[serde(rename = "rmsnorm")]
    RmsNorm,
    /// LayerNorm, eps 1e-6.
    #[serde(rename = "layernorm")]
    LayerNorm,
    /// LayerNorm, eps 1e-5, computed in the activation dtype (the name is the official one).
    #[serde(rename = "layernormbf16")]
    LayerNormBf16,
}

/// Which token feeds the CLIP image projection (`vision_clip_feat`, docs/design.md §9.9).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClipFeat {
    /// The final-norm CLS token.
    #[serde(rename = "cls")]
    Cls,
    /// The mean of the final-norm patch tokens.
    #[serde(rename = "pooled")]
    Pooled,
}

/// Text pooling (`text_pool_type`, docs/design.md §9.7).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum TextPool {
    /// The position of the first maximum token id (the EOT token).
    #[serde(rename = "argmax")]
    Argmax,
    /// Position 0.
    #[serde(rename = "first")]
    First,
    /// Position L-1, even when it is padding.
    #[serde(rename = "last")]
    Last,
    /// No pooling (unsupported by `VTPModel`; rejected by validation).
    #[serde(rename = "none")]
    None,
}

/// Text projection kind (`text_proj_type`).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum TextProj {
    /// A `[Wt, Wt]` projection (bare matrix, or `nn.Linear` with `text_proj_bias`).
    #[serde(rename = "linear")]
    Linear,
    /// No projection.
    #[serde(rename = "none")]
    None,
}

/// The released `VTPConfig` (docs/design.md §2.1), each field documented with its official default in brackets.
/// Unknown keys of a `config.json` are kept in `extra` and written back unchanged, so a round trip
/// preserves `architectures`, `model_type`, `dtype`, ….
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, documented::DocumentedFields)]
#[serde(default)]
pub struct VtpConfig {
    /// Nominal image side: `patch_embed.img_size` (bookkeeping) and the tools' resize [256].
    pub image_size: i64,
    /// Build the CLIP parts: `visual_proj`, the text tower and `logit_scale` [true].
    pub train_clip: bool,
    /// Build the pixel decoder [true].
    pub train_reconstruction: bool,
    /// Patch size P = the latent's downsampling factor [16].
    pub vision_patch_size: i64,
    /// Width D of the vision encoder [768].
    pub vision_embed_dim: i64,
    /// Blocks of the vision encoder [12].
    pub vision_depth: i64,
    /// Attention heads h of the vision encoder; head width D/h, a multiple of 4 for the RoPE [12].
    pub vision_num_heads: i64,
    /// FFN hidden width int(D·ratio) of the vision encoder, then the SwiGLU rounding [4.0].
    pub vision_mlp_ratio: f64,
    /// Vision FFN: "mlp", "swiglu", "swiglu32", "swiglu64" or "swiglu128" (SwiGLU hidden rounded up to 8, 32, 64, 128)
    /// ["swiglu"].
    pub vision_ffn_layer: FfnLayer,
    /// Vision norms: "rmsnorm" (eps 1e-5), "layernorm" (eps 1e-6) or "layernormbf16" (eps 1e-5) ["rmsnorm"].
    pub vision_norm_layer: NormLayer,
    /// LayerScale init of the vision blocks; absent or 0 = no LayerScale [none].
    pub vision_init_values: Option<f64>,
    /// Per-head RMSNorm on q and k in the vision encoder [false].
    pub vision_use_qk_norm: bool,
    /// Latent channels (also the pixel decoder's input and the DiT's in_channels); = D means no bottleneck layer [64].
    pub vision_feature_bottleneck: i64,
    /// Only reconstruction sees the bottleneck; CLIP and SSL see the full-width tokens [true].
    pub vision_bottleneck_ae_only: bool,
    /// Token of the CLIP image feature: "cls", or "pooled" (mean of the normalised patch tokens) ["cls"].
    pub vision_clip_feat: ClipFeat,
    /// Text length: positional table and causal mask size, and the tokenizer's [77].
    pub text_context_length: i64,
    /// Token embedding rows of the text tower [49408].
    pub text_vocab_size: i64,
    /// Width Wt of the text tower = the CLIP embedding width (also `visual_proj`'s output) [768].
    pub text_embed_dim: i64,
    /// Attention heads of the text tower [12].
    pub text_num_heads: i64,
    /// Layers of the text tower [12].
    pub text_depth: i64,
    /// MLP hidden width int(Wt·ratio) of the text tower [4.0].
    pub text_mlp_ratio: f64,
    /// LayerScale init of the text tower; absent = none [none].
    pub text_ls_init_value: Option<f64>,
    /// Append a learned CLS embedding (CoCa style); true is not supported, as in the official code [false].
    pub text_embed_cls: bool,
    /// Pad token id (only used by the CLS-embedding mask) [0].
    pub text_pad_id: i64,
    /// Text attention without the causal mask [false].
    pub text_no_causal_mask: bool,
    /// Text pooling: "argmax" (the EOT token), "first" or "last"; "none" is not supported ["argmax"].
    pub text_pool_type: TextPool,
    /// Text projection: "linear" (a Wt × Wt projection) or "none" ["linear"].
    pub text_proj_type: TextProj,
    /// The text projection is an `nn.Linear(Wt, Wt)` with bias instead of a bare matrix [false].
    pub text_proj_bias: bool,
    /// Return the text tokens too (not used by `VTPModel`) [false].
    pub text_output_tokens: bool,
    /// QuickGELU x·σ(1.702x) instead of exact GELU in the text tower [false].
    pub text_quick_gelu: bool,
    /// Width Dd of the pixel decoder [768].
    pub decoder_embed_dim: i64,
    /// Attention heads of the pixel decoder [12].
    pub decoder_num_heads: i64,
    /// Blocks of the pixel decoder [12].
    pub decoder_depth: i64,
    /// Pixel-decoder FFN, as vision_ffn_layer (its ratio is fixed at 4) ["swiglu"].
    pub decoder_ffn_layer: FfnLayer,
    /// Pixel-decoder norms, as vision_norm_layer ["layernorm"].
    pub decoder_norm_layer: NormLayer,
    /// LayerScale init of the pixel-decoder blocks; absent or 0 = none [none].
    pub decoder_init_values: Option<f64>,
    /// Per-head RMSNorm on q and k in the pixel decoder [false].
    pub decoder_use_qk_norm: bool,
    /// Initial CLIP logit scale; absent = ln(1/0.07) [none].
    pub init_logit_scale: Option<f64>,
    /// Initial CLIP logit bias; present = a SigLIP-style `logit_bias` parameter [none].
    pub init_logit_bias: Option<f64>,
    /// `logit_scale` of shape [1] instead of a scalar [false].
    pub nonscalar_logit_scale: bool,
    /// Not a `VTPConfig` field: metadata of the released `config.json` (architectures, model_type,
    /// torch_dtype, …), kept verbatim on a round trip.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl Default for VtpConfig {
    /// The `VTPConfig` defaults of docs/design.md §2.1.
    fn default() -> Self {
        Self {
            image_size: 256,
            train_clip: true,
            train_reconstruction: true,
            vision_patch_size: 16,
            vision_embed_dim: 768,
            vision_depth: 12,
            vision_num_heads: 12,
            vision_mlp_ratio: 4.0,
            vision_ffn_layer: FfnLayer::SwiGlu,
            vision_norm_layer: NormLayer::RmsNorm,
            vision_init_values: None,
            vision_use_qk_norm: false,
            vision_feature_bottleneck: 64,
            vision_bottleneck_ae_only: true,
            vision_clip_feat: ClipFeat::Cls,
            text_context_length: 77,
            text_vocab_size: 49408,
            text_embed_dim: 768,
            text_num_heads: 12,
            text_depth: 12,
            text_mlp_ratio: 4.0,
            text_ls_init_value: None,
            text_embed_cls: false,
            text_pad_id: 0,
            text_no_causal_mask: false,
            text_pool_type: TextPool::Argmax,
            text_proj_type: TextProj::Linear,
            text_proj_bias: false,
            text_output_tokens: false,
            text_quick_gelu: false,
            decoder_embed_dim: 768,
            decoder_num_heads: 12,
            decoder_depth: 12,
            decoder_ffn_layer: FfnLayer::SwiGlu,
            decoder_norm_layer: NormLayer::LayerNorm,
            decoder_init_values: None,
            decoder_use_qk_norm: false,
            init_logit_scale: None,
            init_logit_bias: None,
            nonscalar_logit_scale: false,
            extra: Map::new(),
        }
    }
}

/// Names of the presets accepted by [`VtpConfig::preset`].
pub const PRESETS: [&str; 3] = ["small", "base", "large"];

/// Settings of one transformer stack (encoder or pixel decoder), derived from the config.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StackConfig {
    pub embed_dim: i64,
    pub depth: i64,
    pub num_heads: i64,
    pub mlp_ratio: f64,
    pub ffn_layer: FfnLayer,
    pub norm_layer: NormLayer,
    /// LayerScale init value; `None` (or 0, which Python treats as false) means no LayerScale.
    pub init_values: Option<f64>,
    pub use_qk_norm: bool,
}

impl StackConfig {
    /// Head dimension `D / heads`.
    pub fn head_dim(&self) -> i64 {
        self.embed_dim / self.num_heads
    }

    /// Whether LayerScale gammas exist (`init_values` truthy in Python).
    pub fn layer_scale(&self) -> bool {
        self.init_values.is_some_and(|v| v != 0.0)
    }
}

impl VtpConfig {
    /// A released checkpoint's configuration (docs/design.md §2.2): `small` = VTP-S, `base` = VTP-B, `large` = VTP-L.
    pub fn preset(name: &str) -> Result<Self> {
        let (dim, depth, heads) = match name {
            "small" => (384, 12, 6),
            "base" => (768, 12, 12),
            "large" => (1024, 24, 16),
            _ => bail!("unknown preset '{name}' (expected one of {})", PRESETS.join(", ")),
        };
        let mut c = Self {
            vision_embed_dim: dim,
            vision_depth: depth,
            vision_num_heads: heads,
            decoder_embed_dim: dim,
            decoder_depth: depth,
            decoder_num_heads: heads,
            ..Self::default()
        };
        c.extra.insert("architectures".into(), Value::from(vec!["VTPModel"]));
        c.extra.insert("model_type".into(), Value::from("vtp"));
        c.extra.insert("torch_dtype".into(), Value::from("float32"));
        Ok(c)
    }

    /// Reads and validates a `config.json`; errors name the file.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read config '{}'", path.display()))?;
        let config: Self =
            serde_json::from_str(&text).with_context(|| format!("invalid config '{}'", path.display()))?;
        config.validate().with_context(|| format!("invalid config '{}'", path.display()))?;
        Ok(config)
    }

    /// Writes the config as pretty JSON (sorted keys, like `save_pretrained`).
    pub fn to_file(&self, path: &Path) -> Result<()> {
        let value = serde_json::to_value(self)?;
        let sorted: std::collections::BTreeMap<String, Value> = match value {
            Value::Object(map) => map.into_iter().collect(),
            _ => unreachable!("a struct serialises to an object"),
        };
        let text = serde_json::to_string_pretty(&sorted)? + "\n";
        crate::io::write_atomic(path, text.as_bytes())
    }

    /// The vision encoder stack (docs/design.md §1.1).
    pub fn vision(&self) -> StackConfig {
        StackConfig {
            embed_dim: self.vision_embed_dim,
            depth: self.vision_depth,
            num_heads: self.vision_num_heads,
            mlp_ratio: self.vision_mlp_ratio,
            ffn_layer: self.vision_ffn_layer,
            norm_layer: self.vision_norm_layer,
            init_values: self.vision_init_values,
            use_qk_norm: self.vision_use_qk_norm,
        }
    }

    /// The pixel decoder stack (docs/design.md §1.4; its FFN ratio is hard-wired to 4).
    pub fn decoder(&self) -> StackConfig {
        StackConfig {
            embed_dim: self.decoder_embed_dim,
            depth: self.decoder_depth,
            num_heads: self.decoder_num_heads,
            mlp_ratio: 4.0,
            ffn_layer: self.decoder_ffn_layer,
            norm_layer: self.decoder_norm_layer,
            init_values: self.decoder_init_values,
            use_qk_norm: self.decoder_use_qk_norm,
        }
    }

    /// Whether a bottleneck Linear exists (it does not when the bottleneck equals the width, spec Q7).
    pub fn has_bottleneck(&self) -> bool {
        self.vision_feature_bottleneck != self.vision_embed_dim
    }

    /// Width of the features CLIP and SSL see (docs/design.md §9.9).
    pub fn clip_input_dim(&self) -> i64 {
        if self.vision_bottleneck_ae_only {
            self.vision_embed_dim
        } else {
            self.vision_feature_bottleneck
        }
    }

    /// Checks the combinations the official code cannot run, with a one-line reason.
    pub fn validate(&self) -> Result<()> {
        check_stack("vision", &self.vision())?;
        if self.train_reconstruction {
            check_stack("decoder", &self.decoder())?;
        }
        if self.vision_patch_size <= 0 {
            bail!("vision_patch_size must be positive, got {}", self.vision_patch_size);
        }
        if self.vision_feature_bottleneck <= 0 {
            bail!("vision_feature_bottleneck must be positive, got {}", self.vision_feature_bottleneck);
        }
        if self.train_clip {
            self.validate_text()?;
        }
        Ok(())
    }

    fn validate_text(&self) -> Result<()> {
        for (name, v) in [
            ("text_embed_dim", self.text_embed_dim),
            ("text_num_heads", self.text_num_heads),
            ("text_context_length", self.text_context_length),
            ("text_vocab_size", self.text_vocab_size),
        ] {
            if v <= 0 {
                bail!("{name} must be positive, got {v}");
            }
        }
        if self.text_embed_dim % self.text_num_heads != 0 {
            bail!("text_num_heads ({}) does not divide text_embed_dim ({})", self.text_num_heads, self.text_embed_dim);
        }
        if self.text_embed_cls {
            bail!("text_embed_cls=true is not supported (the official VTPModel fails on it, spec Q14)");
        }
        if self.text_pool_type == TextPool::None {
            bail!("text_pool_type 'none' is not supported by VTPModel");
        }
        Ok(())
    }
}

fn check_stack(name: &str, s: &StackConfig) -> Result<()> {
    if s.embed_dim <= 0 || s.num_heads <= 0 || s.depth < 0 {
        bail!("{name}: embed_dim, num_heads must be positive and depth non-negative");
    }
    if s.embed_dim % s.num_heads != 0 {
        bail!("{name}_num_heads ({}) does not divide {name}_embed_dim ({})", s.num_heads, s.embed_dim);
    }
    if s.head_dim() % 4 != 0 {
        bail!("{name} head dim {} is not a multiple of 4, which 2-D RoPE needs", s.head_dim());
    }
    if s.mlp_ratio <= 0.0 {
        bail!("{name}_mlp_ratio must be positive, got {}", s.mlp_ratio);
    }
    Ok(())
}
