//! KoLeo spreading regulariser (docs/design.md §4.4; DINOv2 `dinov2/loss/koleo_loss.py::KoLeoLoss`, Sablayrolles et al.
//! 2019), applied per global crop to the student's pre-head CLS tokens with weight 0.1 (the trainer's).
//!
//! `x ← x / max(‖x‖, ε)`, nearest neighbour `I_i = argmax_{j ≠ i} x_i·x_j`, `d_i = ‖x_i - x_{I_i} + ε‖₂`
//! (`nn.PairwiseDistance` adds ε to the difference), `L = -mean_i log(d_i + ε)`, with `ε = 1e-8`.
use tch::Tensor;

/// The ε of DINOv2's normalisation, `PairwiseDistance` and logarithm.
pub const KOLEO_EPS: f64 = 1e-8;

/// DINOv2 `pairwise_NNs_inner`: for L2-normalised rows `x` (`[n, d]`), the index of each row's nearest other
/// row by maximum dot product (`[n]` int64; the diagonal is set to −1; no autograd).
pub fn nearest_neighbours(x: &Tensor) -> Tensor {
    tch::no_grad(|| {
        let mut dots = x.mm(&x.tr());
        let _ = dots.fill_diagonal_(-1, false);
        dots.max_dim(1, false).1
    })
}

/// `KoLeoLoss()(x)` for the rows of `x` (`[n, d]`, `n ≥ 2`): differentiable w.r.t. `x`.
pub fn koleo_loss(x: &Tensor) -> Tensor {
    let norm = x.linalg_norm(2.0, [-1i64].as_slice(), true, None).clamp_min(KOLEO_EPS);
    let x = x / norm.expand_as(x);
    let neighbours = x.index_select(0, &nearest_neighbours(&x));
    let distances = Tensor::pairwise_distance(&x, &neighbours, 2.0, KOLEO_EPS, false);
    -(distances + KOLEO_EPS).log().mean(None)
}

/// `Σ_c KoLeo(chunk_c)` over the `n_global_crops` crop-major chunks of `cls_tokens` (`[n_global_crops · B, D]`),
/// as `ssl_meta_arch` sums it before applying `koleo_loss_weight`.
pub fn koleo_per_crop(cls_tokens: &Tensor, n_global_crops: i64) -> Tensor {
    let mut terms = cls_tokens.chunk(n_global_crops, 0).into_iter().map(|crop| koleo_loss(&crop));
    let first = terms.next().expect("at least one crop");
    terms.fold(first, |total, term| total + term)
}
