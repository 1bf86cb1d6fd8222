//! Image–text contrastive losses (docs/design.md §4.6; OpenCLIP `open_clip/loss.py`, world size 1).
//!
//! CLIP InfoNCE (`ClipLoss`): `logits_per_image = s · I Tᵀ`, `logits_per_text = s · T Iᵀ` (its own matmul),
//! `L = (CE(logits_per_image, arange B) + CE(logits_per_text, arange B)) / 2` with mean cross-entropy and the
//! exponentiated scale `s = exp(log_scale)`, `log_scale` initialised to `ln(1/0.07)` and clamped to
//! `[0, ln 100]` after every optimiser step. SigLIP (`SigLipLoss`): `logits = s · I Tᵀ + b`, labels `2·eye - 1`,
//! `L = -Σ_ij log σ(y_ij · logits_ij) / B`. Features are L2-normalised `[B, D]` rows.
//!
//! Over several processes (OpenCLIP `local_loss=True, gather_with_grad=True`): each rank scores its own
//! `b` rows against the features of every rank (gathered with gradients) with labels offset by
//! `rank · b`; the mean of the ranks' losses is the loss of the global batch.
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
    clip_loss_local(image_features, text_features, image_features, text_features, logit_scale, 0)
}

/// OpenCLIP's local loss on one rank: this rank's `[b, D]` features against every rank's (`all_*`,
/// `[N, D]`), `logits_per_image = s · I Tₐₗₗᵀ`, `logits_per_text = s · T Iₐₗₗᵀ`, labels `offset + arange b`.
pub fn clip_loss_local(
    image_features: &Tensor,
    text_features: &Tensor,
    all_image_features: &Tensor,
    all_text_features: &Tensor,
    logit_scale: &Tensor,
    offset: i64,
) -> Tensor {
    let logits_per_image = (logit_scale * image_features).matmul(&all_text_features.tr());
    let logits_per_text = (logit_scale * text_features).matmul(&all_image_features.tr());
    let labels = Tensor::arange(logits_per_image.size()[0], (Kind::Int64, logits_per_image.device())) + offset;
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
    siglip_loss_local(image_features, text_features, logit_scale, logit_bias, 0)
}

/// SigLIP on one rank: its `[b, D]` image features against every rank's text features (`[N, D]`),
/// `y = +1` at `(i, offset + i)`, `-Σ log σ(y · logits) / b`.
pub fn siglip_loss_local(
    image_features: &Tensor,
    all_text_features: &Tensor,
    logit_scale: &Tensor,
    logit_bias: &Tensor,
    offset: i64,
) -> Tensor {
    let logits = siglip_logits(image_features, all_text_features, logit_scale, logit_bias);
    let (n, all) = (logits.size()[0], logits.size()[1]);
    let (rows, cols) =
        (Tensor::arange(n, (Kind::Int64, logits.device())), Tensor::arange(all, (Kind::Int64, logits.device())));
    let labels = cols.unsqueeze(0).eq_tensor(&(rows + offset).unsqueeze(1)).to_kind(logits.kind()) * 2 - 1;
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
