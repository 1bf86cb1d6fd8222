//! The stage-2 adversarial loss (docs/design.md §4.7): the PatchGAN discriminator, its hinge loss, the
//! generator term and the adaptive weight of LightningDiT's `LPIPSWithDiscriminator`
//! (`vavae/ldm/modules/losses/contperceptual.py`, itself LDM's / taming-transformers' loss; the
//! discriminator is taming's `NLayerDiscriminator`, `taming/modules/discriminator/model.py`).
//!
//! * Discriminator `D` (`n_layers = 3`, `ndf = 64`): `Conv4×4 s2 (3→ndf) + LeakyReLU(0.2)`, then for
//!   `n = 1..n_layers` `Conv4×4 (s2, s1 for the last) + BatchNorm + LeakyReLU(0.2)` with
//!   `ndf·min(2ⁿ, 8)` channels, then `Conv4×4 s1 → 1` channel of patch logits; every conv padding 1,
//!   the convs before a norm without bias. Init (`weights_init`): conv weights `N(0, 0.02)`, norm
//!   weights `N(1, 0.02)`, norm biases 0; conv biases keep PyTorch's default `U(±1/√fan_in)`.
//! * Norm: BatchNorm in train mode (LDM's default, `use_actnorm = False`), i.e. batch statistics on
//!   every call. The trainer never runs `D` in eval mode, so no running statistics are kept (they
//!   would be unused state); ActNorm was not chosen because its data-dependent first-batch
//!   initialisation adds state to checkpoint and resume for no benefit in the reference recipe.
//! * Hinge loss: `L_D = ½·(mean(relu(1 − D(x))) + mean(relu(1 + D(x̂))))`.
//! * Generator term: `L_G = −mean(D(x̂))`.
//! * Adaptive weight on the decoder's last layer `W` (`pixel_decoder.proj_out.weight`):
//!   `w = clamp(‖∇_W L_rec‖ / (‖∇_W L_G‖ + 1e-4), 0, 1e4) · disc_weight`, detached; the generator
//!   loss is `L_rec + w · disc_factor · L_G` with `disc_factor = 0` before `disc_start`.
use tch::{nn, Kind, Tensor};

/// The PatchGAN kernel side and padding (taming: `kw = 4`, `padw = 1`).
const KERNEL: i64 = 4;
const PADDING: i64 = 1;
/// LeakyReLU negative slope.
const SLOPE: f64 = 0.2;
/// BatchNorm epsilon (PyTorch's default).
const BN_EPS: f64 = 1e-5;

/// One conv of the discriminator, followed (except the last) by an optional norm and a LeakyReLU.
#[derive(Debug)]
struct Layer {
    conv: nn::Conv2D,
    stride: i64,
    /// BatchNorm `(weight, bias)`.
    norm: Option<(Tensor, Tensor)>,
    activation: bool,
}

/// taming-transformers' `NLayerDiscriminator` (PatchGAN) with BatchNorm in train mode; parameters
/// under PyTorch's names `main.<index>.{weight,bias}` of its `nn.Sequential`.
#[derive(Debug)]
pub struct NLayerDiscriminator {
    layers: Vec<Layer>,
}

/// A 4×4 conv with `N(0, 0.02)` weights and, if `bias`, PyTorch's default bias init.
fn conv(p: nn::Path, inp: i64, out: i64, stride: i64, bias: bool) -> nn::Conv2D {
    let bound = 1.0 / ((inp * KERNEL * KERNEL) as f64).sqrt();
    let config = nn::ConvConfig {
        stride,
        padding: PADDING,
        bias,
        ws_init: nn::Init::Randn { mean: 0.0, stdev: 0.02 },
        bs_init: nn::Init::Uniform { lo: -bound, up: bound },
        ..Default::default()
    };
    nn::conv2d(p, inp, out, KERNEL, config)
}

impl NLayerDiscriminator {
    /// The discriminator of `in_channels` images with `ndf` base channels and `n_layers` strided
    /// layers (taming: 3, 64, 3), under `p`.
    pub fn new(p: nn::Path, in_channels: i64, ndf: i64, n_layers: i64) -> Self {
        let mut layers = Vec::new();
        let mut index = 0;
        let mut push = |inp: i64, out: i64, stride: i64, norm: bool, activation: bool| {
            let conv = conv(&p / "main" / index, inp, out, stride, !norm);
            let norm = norm.then(|| {
                let q = &p / "main" / (index + 1);
                (q.var("weight", &[out], nn::Init::Randn { mean: 1.0, stdev: 0.02 }), q.zeros("bias", &[out]))
            });
            index += 1 + i64::from(norm.is_some()) + i64::from(activation);
            layers.push(Layer { conv, stride, norm, activation });
        };
        push(in_channels, ndf, 2, false, true);
        let mult = |n: i64| ndf * 2i64.pow(n as u32).min(8);
        for n in 1..n_layers {
            push(mult(n - 1), mult(n), 2, true, true);
        }
        push(mult(n_layers - 1), mult(n_layers), 1, true, true);
        push(mult(n_layers), 1, 1, false, false);
        Self { layers }
    }

    /// Patch logits `[B, 1, h, w]` of images `[B, C, H, W]` (batch statistics in every norm).
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let mut x = x.shallow_clone();
        for l in &self.layers {
            x = x.apply(&l.conv);
            if let Some((w, b)) = &l.norm {
                x = x.batch_norm(Some(w), Some(b), None::<&Tensor>, None::<&Tensor>, true, 0.1, BN_EPS, true);
            }
            if l.activation {
                x = x.where_self(&x.gt(0.0), &(&x * SLOPE));
            }
        }
        x
    }

    /// The side of the patch-logit map for a square input of side `size` (< 1: too small for `D`).
    pub fn output_size(&self, size: i64) -> i64 {
        self.layers.iter().fold(size, |s, l| (s + 2 * PADDING - KERNEL).div_euclid(l.stride) + 1)
    }
}

/// The hinge loss of the discriminator: `½·(mean(relu(1 − real)) + mean(relu(1 + fake)))`.
pub fn hinge_d_loss(logits_real: &Tensor, logits_fake: &Tensor) -> Tensor {
    let real = (-logits_real + 1.0).relu().mean(Kind::Float);
    let fake = (logits_fake + 1.0).relu().mean(Kind::Float);
    (real + fake) * 0.5
}

/// The generator's adversarial term `−mean(D(x̂))`.
pub fn generator_loss(logits_fake: &Tensor) -> Tensor {
    -logits_fake.mean(Kind::Float)
}

/// LDM's `calculate_adaptive_weight`: `clamp(‖∇_W rec‖ / (‖∇_W g‖ + 1e-4), 0, 1e4) · disc_weight`
/// with the gradients taken on `last_layer` alone (`torch.autograd.grad`, graph kept for the
/// backward pass that follows); a detached scalar.
pub fn adaptive_weight(rec: &Tensor, g: &Tensor, last_layer: &Tensor, disc_weight: f64) -> Tensor {
    let grad_norm = |loss: &Tensor| Tensor::run_backward(&[loss], &[last_layer], true, false)[0].norm();
    let rec_norm = grad_norm(rec);
    let g_norm = grad_norm(g);
    (rec_norm / (g_norm + 1e-4)).clamp(0.0, 1e4).detach() * disc_weight
}
