//! Per-image reconstruction metrics on `[0, 1]` images `[B, 3, H, W]` (docs/design.md §5.3): PSNR over all
//! values, and SSIM as `torchmetrics.StructuralSimilarityIndexMeasure(data_range=1.0)` computes it
//! (11×11 Gaussian window, σ = 1.5, k₁ = 0.01, k₂ = 0.03, reflect padding, padded border cropped).
//! Both return one value per image, so averages do not depend on the batch size.
use tch::{Kind, Tensor};

/// SSIM window side and standard deviation (torchmetrics defaults).
const SSIM_KERNEL: i64 = 11;
const SSIM_SIGMA: f64 = 1.5;
const SSIM_K1: f64 = 0.01;
const SSIM_K2: f64 = 0.03;

/// PSNR per image: `20·log10(255 / √mean((255a − 255b)²))` = `10·log10(1 / mse)` on `[0, 1]` values.
pub fn psnr(a: &Tensor, b: &Tensor) -> Tensor {
    let mse =
        (a.to_kind(Kind::Double) - b.to_kind(Kind::Double)).square().flatten(1, -1).mean_dim(1, false, Kind::Double);
    mse.reciprocal().log10() * 10.0
}

/// The normalised 2-D Gaussian window `[C, 1, k, k]` of torchmetrics' `_gaussian_kernel_2d`.
fn gaussian_window(channels: i64, kind: Kind, device: tch::Device) -> Tensor {
    let half = (SSIM_KERNEL - 1) as f64 / 2.0;
    let dist = Tensor::arange_start_step(-half, half + 0.5, 1.0, (kind, device));
    let gauss = (-(dist / SSIM_SIGMA).square() / 2.0).exp();
    let gauss = &gauss / gauss.sum(kind);
    let kernel = gauss.unsqueeze(1).matmul(&gauss.unsqueeze(0));
    kernel.expand([channels, 1, SSIM_KERNEL, SSIM_KERNEL], false).contiguous()
}

/// SSIM per image with `data_range = 1` (torchmetrics `_ssim_update`), computed in f64.
pub fn ssim(a: &Tensor, b: &Tensor) -> Tensor {
    let (a, b) = (a.to_kind(Kind::Double), b.to_kind(Kind::Double));
    let (batch, channels) = (a.size()[0], a.size()[1]);
    let pad = (SSIM_KERNEL - 1) / 2;
    let padded = |x: &Tensor| x.pad([pad, pad, pad, pad], "reflect", None);
    let (pa, pb) = (padded(&a), padded(&b));
    let inputs = Tensor::cat(&[&pa, &pb, &(&pa * &pa), &(&pb * &pb), &(&pa * &pb)], 0);
    let window = gaussian_window(channels, Kind::Double, a.device());
    let out = inputs.conv2d(&window, None::<Tensor>, [1, 1], [0, 0], [1, 1], channels).split(batch, 0);
    let (mu_a, mu_b) = (&out[0], &out[1]);
    let (mu_a2, mu_b2, mu_ab) = (mu_a.square(), mu_b.square(), mu_a * mu_b);
    let var_a = (&out[2] - &mu_a2).clamp_min(0.0);
    let var_b = (&out[3] - &mu_b2).clamp_min(0.0);
    let cov = &out[4] - &mu_ab;
    let (c1, c2) = ((SSIM_K1).powi(2), (SSIM_K2).powi(2));
    let map = ((&mu_ab * 2.0 + c1) * (cov * 2.0 + c2)) / ((mu_a2 + mu_b2 + c1) * (var_a + var_b + c2));
    let (h, w) = (map.size()[2], map.size()[3]);
    map.narrow(2, pad, h - 2 * pad).narrow(3, pad, w - 2 * pad).flatten(1, -1).mean_dim(1, false, Kind::Double)
}
