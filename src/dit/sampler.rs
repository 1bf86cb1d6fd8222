//! ODE sampling of the flow-matching model from t = 0 (noise) to t = 1 (data) (docs/design.md §5.4 "Sampler", §8.7;
//! LightningDiT `transport/integrators.py::ode` with `torchdiffeq.odeint` on a fixed grid).
//!
//! Grid: `t_n = linspace(0, 1, steps)` (`steps` grid **points**, so `steps - 1` integration steps), then,
//! when `shift > 0`, `t ← s·t / (1 + (s - 1)·t)` (with s < 1 the points crowd near t = 0, the noise end).
//! Euler: `x_{n+1} = x_n + (t_{n+1} - t_n)·v(x_n, t_n)`; Heun: the explicit trapezoid. The VTP configs
//! use Euler, 250 points, shift 0.075, no CFG.
//!
//! Classifier-free guidance is not part of the sampler's maths: the sampler calls a velocity closure, and
//! the caller composes the DiT's `forward_with_cfg` (docs/design.md §8.6) from [`SamplerConfig::cfg_scale`] and
//! [`SamplerConfig::cfg_interval_start`] when [`SamplerConfig::uses_cfg`].
use anyhow::{ensure, Result};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

/// The fixed-grid ODE integrator.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    /// torchdiffeq `euler` (the VTP configs' `sampling_method: euler`): one velocity call per step.
    #[default]
    Euler,
    /// torchdiffeq `heun2` (Butcher tableau α = [1], β = [[1]], b = [½, ½]), the explicit trapezoid: two
    /// velocity calls per step. Same maths as torchdiffeq, not bit-identical to it.
    Heun,
}

/// Sampler settings (`sample:` block of the LightningDiT configs); defaults are the VTP XL configs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, documented::DocumentedFields)]
#[serde(deny_unknown_fields, default)]
pub struct SamplerConfig {
    /// ODE integrator (`sampling_method`) of the sample grids and `vtp dit sample`: euler or heun [VTP: euler].
    pub method: Method,
    /// Time-grid points linspace(0, 1, steps) including both ends (`num_sampling_steps`): steps − 1
    /// integration steps, at least 2 [VTP: 250]. (The bench script's `sample_euler(steps=k)` takes the
    /// step count, i.e. k + 1 points.)
    pub steps: i64,
    /// Timestep shift s (`timestep_shift`): t ← s·t / (1 + (s − 1)·t) on every grid point, 0 = off
    /// [VTP: 0.075].
    pub shift: f64,
    /// Classifier-free guidance scale; guidance runs only when it is above 1 (`inference.py`), 1 = off
    /// [VTP: 1].
    pub cfg_scale: f64,
    /// Guidance is switched off while t < this (`forward_with_cfg(..., cfg_interval=True,
    /// cfg_interval_start)`) [VTP: 0].
    pub cfg_interval_start: f64,
}

impl Default for SamplerConfig {
    /// `train_vtp_{s,b,l}_dit_xl.yaml`: Euler, 250 points, shift 0.075, CFG scale 1 (off), interval start 0.
    fn default() -> Self {
        SamplerConfig { method: Method::Euler, steps: 250, shift: 0.075, cfg_scale: 1.0, cfg_interval_start: 0.0 }
    }
}

impl SamplerConfig {
    /// Whether the caller should run the doubled-batch CFG path (`cfg_scale > 1`, as `inference.py`).
    pub fn uses_cfg(&self) -> bool {
        self.cfg_scale > 1.0
    }

    /// Number of velocity-model calls one [`sample`] makes (per batch): `steps - 1` for Euler,
    /// `2·(steps - 1)` for Heun.
    pub fn model_calls(&self) -> i64 {
        let steps = (self.steps - 1).max(0);
        match self.method {
            Method::Euler => steps,
            Method::Heun => 2 * steps,
        }
    }

    /// Checks `steps ≥ 2`, a finite `shift ≥ 0` and finite CFG settings.
    pub fn validate(&self) -> Result<()> {
        ensure!(self.steps >= 2, "sampler steps (grid points) must be at least 2, got {}", self.steps);
        ensure!(self.shift.is_finite() && self.shift >= 0.0, "sampler shift must be ≥ 0, got {}", self.shift);
        ensure!(self.cfg_scale.is_finite(), "cfg_scale must be finite, got {}", self.cfg_scale);
        ensure!(self.cfg_interval_start.is_finite(), "cfg_interval_start must be finite");
        Ok(())
    }
}

/// The time shift `s·t / (1 + (s - 1)·t)` applied to an f32 grid tensor in the reference's operation order
/// (`integrators.py` `compute_tm`, bench `sample_euler`).
fn shift_grid(t: &Tensor, s: f64) -> Tensor {
    (t * s) / ((t * (s - 1.0)) + 1.0)
}

/// The integration grid of `config`: f32 `linspace(0, 1, steps)` on the CPU, shifted when `shift > 0`, each
/// value exactly the f32 the reference computes (widened to f64). Monotone, first point 0; the last is
/// `1` up to f32 rounding of the shift (s = 0.075 gives `1 + 2⁻²²`, as in the reference).
pub fn time_grid(config: &SamplerConfig) -> Vec<f64> {
    let t = Tensor::linspace(0.0, 1.0, config.steps, (Kind::Float, Device::Cpu));
    let t = if config.shift > 0.0 { shift_grid(&t, config.shift) } else { t };
    Vec::<f32>::try_from(&t).expect("an f32 CPU grid").into_iter().map(f64::from).collect()
}

/// [`sample_with_progress`] without a progress callback.
pub fn sample(x0: &Tensor, config: &SamplerConfig, velocity: impl FnMut(&Tensor, &Tensor) -> Tensor) -> Tensor {
    sample_with_progress(x0, config, velocity, |_, _| {})
}

/// Integrates `dx/dt = velocity(x, t)` from `x0` (noise, t = 0) over [`time_grid`] and returns the last state
/// (the sample, `x0`'s shape). `velocity` gets the state and an f32 `[B]` tensor filled with the node time
/// (`torch.ones(B) * t_n`); `progress(done, total)` runs after each of the `steps - 1` steps. Runs without
/// autograd. Euler is op-for-op the bench `sample_euler` / torchdiffeq fixed-grid `euler`
/// (`x + (t_{n+1} - t_n)·v`, `dt` an f32), so bit-identical in f32. Heun:
/// `k1 = v(x, t_n)`, `x̃ = x + h·k1`, `k2 = v(x̃, t_{n+1})`, `x + (h/2)·(k1 + k2)`.
///
/// Panics when the config is invalid ([`SamplerConfig::validate`]).
pub fn sample_with_progress(
    x0: &Tensor,
    config: &SamplerConfig,
    mut velocity: impl FnMut(&Tensor, &Tensor) -> Tensor,
    mut progress: impl FnMut(usize, usize),
) -> Tensor {
    if let Err(e) = config.validate() {
        panic!("{e}");
    }
    let grid: Vec<f32> = time_grid(config).into_iter().map(|t| t as f32).collect();
    let (batch, device) = (x0.size()[0], x0.device());
    let t_batch = |t: f32| Tensor::full([batch], f64::from(t), (Kind::Float, device));
    let total = grid.len() - 1;
    tch::no_grad(|| {
        let mut x = x0.shallow_clone();
        for (n, pair) in grid.windows(2).enumerate() {
            let (t0, t1) = (pair[0], pair[1]);
            let h = t1 - t0;
            let k1 = velocity(&x, &t_batch(t0));
            x = match config.method {
                Method::Euler => &x + k1 * f64::from(h),
                Method::Heun => {
                    let x_euler = &x + &k1 * f64::from(h);
                    let k2 = velocity(&x_euler, &t_batch(t1));
                    &x + (k1 + k2) * f64::from(h / 2.0)
                }
            };
            progress(n + 1, total);
        }
        x
    })
}
