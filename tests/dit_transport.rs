//! The flow-matching transport (docs/design.md §5.4, LOSSES.md §8) against `lightningdit-tiny/transport.safetensors`
//! (LightningDiT `transport.training_losses` with the VTP settings, `t` and `x0` fixed): the linear path
//! `x_t`, `u_t` and every loss term; plus the training-time samplers' statistics and their config form.
//! `x_t`, `u_t` and the cosine term are bit-identical; the MSE reductions differ from the fixture by ~1 ulp
//! (rel. 8e-8), as PyTorch 2.13's own CPU `mean` does here (AVX-512 and AVX2 kernels alike).
mod common;

use std::collections::HashMap;
use tch::{Device, Kind, Tensor};
use vtp::dit::transport::{interpolate, loss, sample_t, training_loss, TimeSampling};
use vtp::io::read_safetensors_map;

/// Issue bound on the relative error against the fixture.
const TOL: f64 = 1e-5;

fn fixture() -> HashMap<String, Tensor> {
    read_safetensors_map(&common::fixture("lightningdit-tiny/transport.safetensors")).unwrap()
}

/// `‖a − b‖ / ‖b‖` in f64 (0 when equal); prints it with whether the two are bit-identical.
fn check(name: &str, a: &Tensor, b: &Tensor) {
    assert_eq!(a.size(), b.size(), "{name}: shapes differ");
    assert_eq!(a.kind(), b.kind(), "{name}: dtypes differ");
    let (a64, b64) = (a.to_kind(Kind::Double), b.to_kind(Kind::Double));
    let diff = (&a64 - &b64).norm().double_value(&[]);
    let rel = if diff == 0.0 { 0.0 } else { diff / b64.norm().double_value(&[]) };
    println!("{name:<22} rel err {rel:.3e} bit-identical {}", a.equal(b));
    assert!(rel <= TOL, "{name}: relative error {rel:.3e} > {TOL}");
}

#[test]
fn path_matches_fixture() {
    let _generator = common::torch_generator();
    let f = fixture();
    let (xt, ut) = interpolate(&f["x0"], &f["x1"], &f["t"]);
    check("xt", &xt, &f["xt"]);
    check("ut", &ut, &f["ut"]);
}

#[test]
fn loss_terms_match_fixture() {
    let _generator = common::torch_generator();
    let f = fixture();
    let l = loss(&f["pred"], &f["ut"], true);
    check("loss_mse_per_sample", &l.mse_per_sample, &f["loss_mse_per_sample"]);
    check("cos_loss_per_sample", &l.cos_per_sample, &f["cos_loss_per_sample"]);
    check("loss_mse", &l.mse, &f["loss_mse"]);
    check("loss_total", &l.total, &f["loss_total"]);
    let no_cos = loss(&f["pred"], &f["ut"], false);
    assert!(no_cos.total.equal(&l.mse), "without the cosine term the total is the MSE");
    assert!(l.total.equal(&(&l.cos + &l.mse)), "total = mean(cos) + mean(mse)");
}

/// `training_loss` composes the path, the model call (here: the fixture's prediction, checking what the
/// model is given) and the loss.
#[test]
fn training_loss_composes_path_model_and_loss() {
    let _generator = common::torch_generator();
    let f = fixture();
    let mut calls = 0;
    let l = training_loss(
        |xt: &Tensor, t: &Tensor| {
            calls += 1;
            check("model input xt", xt, &f["xt"]);
            assert!(t.equal(&f["t"]), "the model gets the raw t");
            f["pred"].shallow_clone()
        },
        &f["x1"],
        &f["x0"],
        &f["t"],
        true,
    );
    assert_eq!(calls, 1);
    check("training loss_total", &l.total, &f["loss_total"]);
}

/// Gradients flow through the total loss to the prediction.
#[test]
fn loss_is_differentiable() {
    let _generator = common::torch_generator();
    let f = fixture();
    let pred = f["pred"].copy().set_requires_grad(true);
    loss(&pred, &f["ut"], true).total.backward();
    let g = pred.grad();
    assert!(g.defined() && g.abs().sum(Kind::Double).double_value(&[]) > 0.0);
}

/// Mean and std of `logit(t)` over `n` draws, and the range of `t`.
fn logit_stats(t: &Tensor) -> (f64, f64, f64, f64) {
    let t = t.to_kind(Kind::Double);
    let logit = (&t / t.rsub_scalar(1.0)).log();
    let (mean, std) = (logit.mean(Kind::Double).double_value(&[]), logit.std(true).double_value(&[]));
    (mean, std, t.min().double_value(&[]), t.max().double_value(&[]))
}

#[test]
fn logit_normal_statistics() {
    let _generator = common::torch_generator();
    const N: i64 = 20_000;
    for sampling in [TimeSampling::OFFICIAL, TimeSampling::VTP_S_B_STATED, TimeSampling::VTP_L_STATED] {
        let TimeSampling::LogitNormal { mu, sigma } = sampling else { unreachable!() };
        tch::manual_seed(0);
        let t = sample_t(N, &sampling, Device::Cpu);
        assert_eq!((t.size(), t.kind()), (vec![N], Kind::Float));
        let (mean, std, min, max) = logit_stats(&t);
        println!("logit-normal({mu}, {sigma}): logit mean {mean:.4} std {std:.4}, t in [{min:.3e}, {max:.6}]");
        // 20k draws: the std error of the mean is sigma/141 ≈ 0.009, of the std ≈ 0.006.
        assert!((mean - mu).abs() < 0.04, "mean of logit(t) {mean} vs mu {mu}");
        assert!((std - sigma).abs() < 0.03, "std of logit(t) {std} vs sigma {sigma}");
        assert!(min > 0.0 && max < 1.0, "t in (0, 1): [{min}, {max}]");
        tch::manual_seed(0);
        assert!(sample_t(N, &sampling, Device::Cpu).equal(&t), "seeded draws repeat");
    }
    // (0, 1) is exactly the reference `torch.sigmoid(torch.randn(n))` on the same generator.
    tch::manual_seed(3);
    let t = sample_t(64, &TimeSampling::OFFICIAL, Device::Cpu);
    tch::manual_seed(3);
    assert!(t.equal(&Tensor::randn([64], (Kind::Float, Device::Cpu)).sigmoid()));
}

#[test]
fn uniform_statistics() {
    let _generator = common::torch_generator();
    const N: i64 = 20_000;
    tch::manual_seed(1);
    let t = sample_t(N, &TimeSampling::Uniform, Device::Cpu).to_kind(Kind::Double);
    let (mean, var) = (t.mean(Kind::Double).double_value(&[]), t.var(true).double_value(&[]));
    let (min, max) = (t.min().double_value(&[]), t.max().double_value(&[]));
    println!("uniform: mean {mean:.4} var {var:.4}, t in [{min:.3e}, {max:.6}]");
    assert!((mean - 0.5).abs() < 0.01 && (var - 1.0 / 12.0).abs() < 0.005);
    assert!(min >= 0.0 && max < 1.0 && min < 0.01 && max > 0.99);
}

/// The TOML form a config uses: `kind` plus optional `mu`/`sigma` (defaults 0 and 1).
#[test]
fn time_sampling_config_form() {
    let _generator = common::torch_generator();
    #[derive(serde::Deserialize, serde::Serialize)]
    struct C {
        t: TimeSampling,
    }
    let parse = |s: &str| toml::from_str::<C>(s).map(|c| c.t);
    assert_eq!(parse(r#"t = { kind = "uniform" }"#).unwrap(), TimeSampling::Uniform);
    assert_eq!(parse(r#"t = { kind = "logit-normal" }"#).unwrap(), TimeSampling::OFFICIAL);
    let stated = parse(r#"t = { kind = "logit-normal", mu = -0.5, sigma = 1.25 }"#).unwrap();
    assert_eq!(stated, TimeSampling::VTP_S_B_STATED);
    assert!(parse(r#"t = { kind = "logit-normal", mean = 0.0 }"#).is_err(), "unknown field");
    assert!(parse(r#"t = { kind = "normal" }"#).is_err(), "unknown kind");
    assert_eq!(TimeSampling::default(), TimeSampling::OFFICIAL);
    let text = toml::to_string(&C { t: TimeSampling::VTP_L_STATED }).unwrap();
    assert_eq!(parse(&text).unwrap(), TimeSampling::VTP_L_STATED, "round trip: {text}");
}

/// The whole `training_losses` call with the fixture's LightningDiT: the model's prediction on the
/// fixture's `x_t` is its `pred`, and the composed loss its `loss_total` / `loss_mse`.
#[test]
fn training_loss_with_the_fixture_model_matches() {
    let _generator = common::torch_generator();
    let f = fixture();
    let model = vtp::dit::model::LightningDit::load_dir(&common::fixture("lightningdit-tiny"), Device::Cpu).unwrap();
    let y = f["y"].shallow_clone();
    let pred = tch::no_grad(|| model.forward(&f["xt"], &f["t"], &y, false));
    check("pred (model)", &pred, &f["pred"]);
    let velocity = |xt: &Tensor, t: &Tensor| model.forward(xt, t, &y, false);
    let l = tch::no_grad(|| training_loss(velocity, &f["x1"], &f["x0"], &f["t"], true));
    check("loss_total (model)", &l.total, &f["loss_total"]);
    check("loss_mse (model)", &l.mse, &f["loss_mse"]);
}
