//! The flow-matching ODE sampler (docs/design.md §5.4 "Sampler"): the shifted time grid, Euler and Heun on fields with
//! known solutions (constant, linear-in-x, affine-in-t), their convergence orders, and bit-identical parity
//! of the grid and of Euler with the bench `sample_euler` (shared/bench/pytorch_dit.py, project venv) on a
//! toy velocity closure.
mod common;

use std::process::Command;
use tch::{Device, Kind, Tensor};
use vtp::dit::sampler::{sample, sample_with_progress, time_grid, Method, SamplerConfig};
use vtp::io::{read_safetensors_map, write_safetensors};

fn config(method: Method, steps: i64, shift: f64) -> SamplerConfig {
    SamplerConfig { method, steps, shift, ..SamplerConfig::default() }
}

fn x0_f64() -> Tensor {
    tch::manual_seed(5);
    Tensor::randn([3, 4, 2, 2], (Kind::Double, Device::Cpu))
}

/// Max |a − b|.
fn max_abs(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

#[test]
fn grid_endpoints_monotone_and_shift() {
    let _generator = common::torch_generator();
    let plain = time_grid(&config(Method::Euler, 250, 0.0));
    assert_eq!(plain.len(), 250);
    assert_eq!((plain[0], plain[249]), (0.0, 1.0), "unshifted endpoints are exact");
    assert!((plain[125] - 125.0 / 249.0).abs() < 1e-7);
    let shifted = time_grid(&SamplerConfig::default());
    assert_eq!(shifted.len(), 250);
    assert_eq!(shifted[0], 0.0);
    // The reference's f32 arithmetic gives s/(1 + (s - 1)) = 1 + 2^-22 for s = 0.075 (kept for parity).
    assert!((shifted[249] - 1.0).abs() <= 2f64.powi(-22), "last point {}", shifted[249]);
    assert!(shifted.windows(2).all(|w| w[1] > w[0]), "monotone");
    let mid = shifted[125];
    let expect = 0.075 * plain[125] / (1.0 + (0.075 - 1.0) * plain[125]);
    println!("shift 0.075: midpoint {mid:.6} (analytic {expect:.6}), last {:.9}", shifted[249]);
    assert!(mid < 0.5 && (mid - expect).abs() < 1e-6, "points crowd near t = 0");
    // The first step is ~13x smaller than the plain one, the last ~13x larger (1/s).
    assert!(shifted[1] < plain[1] / 10.0 && shifted[249] - shifted[248] > 10.0 * plain[1]);
    for s in [0.3, 0.5, 2.0, 3.0] {
        let g = time_grid(&config(Method::Euler, 50, s));
        assert_eq!((g[0], g[49]), (0.0, 1.0), "shift {s}: endpoints exact");
        assert!(g.windows(2).all(|w| w[1] > w[0]));
        assert!((g[25] < 0.5) == (s < 1.0), "s < 1 crowds near 0, s > 1 near 1");
    }
}

/// A constant field is integrated exactly by both methods on any grid: `x(T) = x0 + c·T`.
#[test]
fn constant_field_exact() {
    let _generator = common::torch_generator();
    let x0 = x0_f64();
    let c = Tensor::randn([1, 4, 1, 1], (Kind::Double, Device::Cpu));
    for method in [Method::Euler, Method::Heun] {
        for (steps, shift) in [(2, 0.0), (10, 0.0), (250, 0.075), (37, 3.0)] {
            let cfg = config(method, steps, shift);
            let end = *time_grid(&cfg).last().unwrap();
            let x = sample(&x0, &cfg, |x, _| c.expand_as(x));
            let err = max_abs(&x, &(&x0 + &c * end));
            println!("constant {method:?} steps {steps} shift {shift}: max err {err:.2e}");
            assert!(err < 1e-12, "{method:?} steps {steps} shift {shift}: {err:.2e}");
        }
    }
}

/// Error at t = T of `dx/dt = a·x` (solution `e^{a·T}·x0`, one rate per channel).
fn linear_field_error(method: Method, steps: i64, shift: f64) -> f64 {
    let x0 = x0_f64();
    let a = Tensor::from_slice(&[-2.0f64, -0.5, 0.7, 1.5]).view([1, 4, 1, 1]);
    let cfg = config(method, steps, shift);
    let end = *time_grid(&cfg).last().unwrap();
    let x = sample(&x0, &cfg, |x, _| x * &a);
    max_abs(&x, &((&a * end).exp() * &x0))
}

/// `dx/dt = a·x`: Euler converges at O(h), Heun at O(h²), Heun far more accurate; also on a shifted grid.
#[test]
fn linear_field_convergence_orders() {
    let _generator = common::torch_generator();
    for shift in [0.0, 0.075] {
        // Points 41, 401, 4001 (the shifted grid's largest step is ~h/s, so fewer points are pre-asymptotic).
        let points = [41, 401, 4001];
        let e: Vec<f64> = points.iter().map(|&n| linear_field_error(Method::Euler, n, shift)).collect();
        let h: Vec<f64> = points.iter().map(|&n| linear_field_error(Method::Heun, n, shift)).collect();
        let sci = |v: &[f64]| v.iter().map(|x| format!("{x:.3e}")).collect::<Vec<_>>().join(", ");
        println!("shift {shift}: points {points:?}: euler errors [{}], heun errors [{}]", sci(&e), sci(&h));
        for i in 0..2 {
            let (re, rh) = (e[i] / e[i + 1], h[i] / h[i + 1]);
            println!("  10x points: euler error / {re:.1}, heun error / {rh:.1}");
            assert!((6.0..16.0).contains(&re), "Euler first order: ratio {re}");
            assert!(rh > 60.0, "Heun second order: ratio {rh}");
        }
        for i in 0..3 {
            assert!(h[i] < e[i] / 10.0, "Heun beats Euler: {} vs {}", h[i], e[i]);
        }
        assert!(h[2] < 1e-4 && e[2] < 0.02);
    }
}

/// `v(x, t) = b + m·t`: the trapezoid is exact (`x(T) = x0 + b·T + m·T²/2`) on any grid, Euler is not.
#[test]
fn heun_exact_for_affine_in_t() {
    let _generator = common::torch_generator();
    let x0 = x0_f64();
    let b = Tensor::from_slice(&[0.3f64, -1.0, 2.0, 0.5]).view([1, 4, 1, 1]);
    let m = Tensor::from_slice(&[1.0f64, 4.0, -3.0, 0.25]).view([1, 4, 1, 1]);
    let field = |x: &Tensor, t: &Tensor| {
        assert_eq!((t.size(), t.kind()), (vec![x.size()[0]], Kind::Float), "t is an f32 [B]");
        &b + &m * t.to_kind(Kind::Double).view([-1, 1, 1, 1])
    };
    for (steps, shift) in [(7, 0.075), (250, 0.075), (20, 0.0), (13, 2.5)] {
        let cfg = config(Method::Heun, steps, shift);
        let end = *time_grid(&cfg).last().unwrap();
        let exact = &x0 + &b * end + &m * (end * end / 2.0);
        let heun = max_abs(&sample(&x0, &cfg, field), &exact);
        let euler = max_abs(&sample(&x0, &config(Method::Euler, steps, shift), field), &exact);
        println!("affine-in-t steps {steps} shift {shift}: heun err {heun:.2e}, euler err {euler:.2e}");
        assert!(heun < 1e-12, "Heun exact: {heun:.2e}");
        assert!(euler > 1e-4, "Euler is not exact here: {euler:.2e}");
    }
}

/// `progress(done, total)` after every step; the model is called once (Euler) or twice (Heun) per step, with
/// the node times; sampling runs without autograd.
#[test]
fn progress_calls_and_no_grad() {
    let _generator = common::torch_generator();
    let x0 = Tensor::randn([2, 3], (Kind::Float, Device::Cpu));
    let w = Tensor::ones([1], (Kind::Float, Device::Cpu)).set_requires_grad(true);
    for method in [Method::Euler, Method::Heun] {
        let cfg = config(method, 6, 0.3);
        let grid = time_grid(&cfg);
        let (mut times, mut ticks) = (Vec::new(), Vec::new());
        let x = sample_with_progress(
            &x0,
            &cfg,
            |x, t| {
                times.push(t.double_value(&[0]));
                x * &w
            },
            |done, total| ticks.push((done, total)),
        );
        assert!(!x.requires_grad(), "no autograd while sampling");
        assert_eq!(ticks, (1..=5).map(|d| (d, 5)).collect::<Vec<_>>());
        assert_eq!(times.len() as i64, cfg.model_calls());
        let expect: Vec<f64> = match method {
            Method::Euler => grid[..5].to_vec(),
            Method::Heun => grid.windows(2).flat_map(|w| [w[0], w[1]]).collect(),
        };
        assert_eq!(times, expect, "{method:?} evaluates at the grid nodes");
    }
}

#[test]
fn config_defaults_validation_and_toml() {
    let _generator = common::torch_generator();
    let d = SamplerConfig::default();
    assert_eq!((d.method, d.steps, d.shift, d.cfg_scale, d.cfg_interval_start), (Method::Euler, 250, 0.075, 1.0, 0.0));
    assert!(!d.uses_cfg() && d.validate().is_ok() && d.model_calls() == 249);
    assert!(config(Method::Euler, 1, 0.0).validate().is_err());
    assert!(config(Method::Euler, 10, -1.0).validate().is_err());
    let c: SamplerConfig = toml::from_str("method = \"heun\"\nsteps = 50\nshift = 0.0\ncfg_scale = 4.0").unwrap();
    assert_eq!((c.method, c.steps, c.shift, c.cfg_interval_start), (Method::Heun, 50, 0.0, 0.0));
    assert!(c.uses_cfg());
    assert!(toml::from_str::<SamplerConfig>("method = \"rk4\"").is_err());
    assert!(toml::from_str::<SamplerConfig>("num_steps = 3").is_err());
}

/// Grid and Euler samples bit-identical to the bench `sample_euler` (its `steps` = our points − 1) on a toy
/// closure `v = sin(x)·t − 0.5·x`, f32, with and without shift; Heun checked against a direct PyTorch loop.
#[test]
fn euler_matches_bench_sample_euler() {
    let _generator = common::torch_generator();
    let dir = tempfile::tempdir().unwrap();
    tch::manual_seed(11);
    let x0 = Tensor::randn([2, 4, 3, 3], (Kind::Float, Device::Cpu));
    write_safetensors(&dir.path().join("in.safetensors"), &[("x0".to_string(), x0.shallow_clone())], &[]).unwrap();
    let cases = [(2, 0.0), (11, 0.0), (250, 0.075), (40, 0.3)];
    let script = r#"
import sys, torch
from safetensors.torch import load_file, save_file
sys.path.insert(0, sys.argv[1])
from pytorch_dit import sample_euler
x0 = load_file(sys.argv[2] + "/in.safetensors")["x0"]
toy = lambda z, t, y: torch.sin(z) * t.view(-1, 1, 1, 1) - 0.5 * z
out = {}
for case in sys.argv[3:]:
    n, s = case.split(":"); n, s = int(n), float(s)
    ts = torch.linspace(0, 1, n)
    if s > 0:
        ts = s * ts / (1 + (s - 1) * ts)
    out[f"grid.{case}"] = ts
    out[f"euler.{case}"] = sample_euler(toy, x0, None, n - 1, shift=s)
    x = x0
    for i in range(n - 1):  # explicit trapezoid, as the Rust Heun orders it
        h = ts[i + 1] - ts[i]
        k1 = toy(x, torch.ones(len(x)) * ts[i], None)
        k2 = toy(x + k1 * h, torch.ones(len(x)) * ts[i + 1], None)
        x = x + (k1 + k2) * (h / 2)
    out[f"heun.{case}"] = x
save_file(out, sys.argv[2] + "/out.safetensors")
"#;
    let args: Vec<String> = cases.iter().map(|(n, s)| format!("{n}:{s}")).collect();
    let o = Command::new(common::venv_python())
        .arg("-c")
        .arg(script)
        .arg(common::s(&common::shared_bench()))
        .arg(common::s(dir.path()))
        .args(&args)
        .output()
        .unwrap();
    common::assert_success(&o, "python sample_euler");
    let torch = read_safetensors_map(&dir.path().join("out.safetensors")).unwrap();
    let toy = |x: &Tensor, t: &Tensor| x.sin() * t.view([-1, 1, 1, 1]) - x * 0.5;
    for ((n, s), case) in cases.iter().zip(&args) {
        let grid: Vec<f32> = time_grid(&config(Method::Euler, *n, *s)).into_iter().map(|t| t as f32).collect();
        assert_eq!(grid, Vec::<f32>::try_from(&torch[&format!("grid.{case}")]).unwrap(), "grid {case}");
        for (method, key) in [(Method::Euler, "euler"), (Method::Heun, "heun")] {
            let x = sample(&x0, &config(method, *n, *s), toy);
            let reference = &torch[&format!("{key}.{case}")];
            let err = max_abs(&x, reference);
            println!("{key} {case}: max |rust - torch| {err:.3e}, bit-identical {}", x.equal(reference));
            assert!(x.equal(reference), "{key} {case}: not bit-identical (max err {err:.3e})");
        }
    }
}
