//! Image–text contrastive losses (spec §4.6; OpenCLIP `open_clip/loss.py`, world size 1).
//!
//! CLIP InfoNCE (`ClipLoss`): `logits_per_image = s · I Tᵀ`, `logits_per_text = s · T Iᵀ` (its own matmul),
//! `L = (CE(logits_per_image, arange B) + CE(logits_per_text, arange B)) / 2` with mean cross-entropy and the
//! exponentiated scale `s = exp(log_scale)`, `log_scale` initialised to `ln(1/0.07)` and clamped to
//! `[0, ln 100]` after every optimiser step. SigLIP (`SigLipLoss`): `logits = s · I Tᵀ + b`, labels `2·eye - 1`,
//! `L = -Σ_ij log σ(y_ij · logits_ij) / B`. Features are L2-normalised `[B, D]` rows.
use tch::{Kind, Tensor};

/// Upper clamp of the learnable log-scale, `ln 100` (OpenCLIP `logit_scale.clamp_(0, math.log(100))`).
pub const LOGIT_SCALE_MAX: f64 = 2.0 * std::f64::consts::LN_10;

/// OpenCLIP `ClipLoss.get_logits`: `(s · I @ Tᵀ, s · T @ Iᵀ)`, each `[B, B]`; `logit_scale` is `exp` of the
/// learnable log-scale (a scalar tensor).
pub fn clip_logits(image_features: &Tensor, text_features: &Tensor, logit_scale: &Tensor) -> (Tensor, Tensor) {
    let logits_per_image = (logit_scale * image_features).matmul(&text_features.tr());
    let logits_per_text = (logit_scale * text_features).matmul(&image_features.tr());
    (logits_per_image, logits_per_text)
}

/// OpenCLIP `ClipLoss()(image_features, text_features, logit_scale)`: the mean of the image→text and
/// text→image cross-entropies with the matching pair as the label.
pub fn clip_loss(image_features: &Tensor, text_features: &Tensor, logit_scale: &Tensor) -> Tensor {
    let (logits_per_image, logits_per_text) = clip_logits(image_features, text_features, logit_scale);
    let labels = Tensor::arange(logits_per_image.size()[0], (Kind::Int64, logits_per_image.device()));
    (logits_per_image.cross_entropy_for_logits(&labels) + logits_per_text.cross_entropy_for_logits(&labels)) / 2
}

/// OpenCLIP `SigLipLoss.get_logits`: `s · I @ Tᵀ + b` (`[B, B]`).
pub fn siglip_logits(
    image_features: &Tensor,
    text_features: &Tensor,
    logit_scale: &Tensor,
    logit_bias: &Tensor,
) -> Tensor {
    (logit_scale * image_features).matmul(&text_features.tr()) + logit_bias
}

/// OpenCLIP `SigLipLoss()(image_features, text_features, logit_scale, logit_bias)`: `-Σ log σ(y · logits) / B`
/// over all `B²` pairs, `y = +1` on the diagonal and `-1` elsewhere.
pub fn siglip_loss(
    image_features: &Tensor,
    text_features: &Tensor,
    logit_scale: &Tensor,
    logit_bias: &Tensor,
) -> Tensor {
    let logits = siglip_logits(image_features, text_features, logit_scale, logit_bias);
    let n = logits.size()[0];
    let labels = Tensor::eye(n, (logits.kind(), logits.device())) * 2 - 1;
    -(labels * logits).log_sigmoid().sum(None) / n
}

/// Clamps the learnable log-scale parameter in place to `[0, ln 100]`, without autograd (OpenCLIP does this
/// after every optimiser step).
pub fn clamp_logit_scale(log_scale: &Tensor) {
    let mut param = log_scale.shallow_clone();
    tch::no_grad(|| {
        let _ = param.clamp_(0.0, LOGIT_SCALE_MAX);
    });
}
