//! Per-step schedules of every trainer (docs/design.md §4.4–§4.5, [default DINOv2]): DINOv2's `CosineScheduler`
//! (`dinov2/utils/utils.py`, also shipped as `vtp/models/utils/utils.py`) reproduced in f64 exactly as
//! numpy computes it, and DINOv2's `build_schedulers` set: learning rate (linear warm-up from 0, cosine to
//! `min_lr`), weight decay (cosine), teacher EMA momentum (cosine), teacher temperature (linear warm-up,
//! then constant) and the last-layer learning rate (the lr schedule, 0 while the last layer is frozen).
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

/// DINOv2's `CosineScheduler`: `freeze_iters` zeros, then `np.linspace(start_warmup_value, base_value,
/// warmup_iters)`, then `final + 0.5 (base - final) (1 + cos(pi i / n))` over the remaining `n` iterations;
/// `final_value` from `total_iters` on. Values are computed on the fly with numpy's formulas.
#[derive(Clone, Debug, PartialEq)]
pub struct CosineScheduler {
    base_value: f64,
    final_value: f64,
    total_iters: u64,
    warmup_iters: u64,
    start_warmup_value: f64,
    freeze_iters: u64,
}

impl CosineScheduler {
    /// DINOv2's constructor; warm-up and freeze iterations longer than the schedule are an error (DINOv2's
    /// length assertion).
    pub fn new(
        base_value: f64,
        final_value: f64,
        total_iters: u64,
        warmup_iters: u64,
        start_warmup_value: f64,
        freeze_iters: u64,
    ) -> Result<Self> {
        if warmup_iters + freeze_iters > total_iters {
            bail!("schedule of {total_iters} steps is shorter than its {warmup_iters} warm-up + {freeze_iters} frozen steps");
        }
        Ok(Self { base_value, final_value, total_iters, warmup_iters, start_warmup_value, freeze_iters })
    }

    /// The value at iteration `it` (`schedule[it]`, or `final_value` for `it >= total_iters`).
    pub fn value(&self, it: u64) -> f64 {
        if it >= self.total_iters {
            self.final_value
        } else if it < self.freeze_iters {
            0.0
        } else if it < self.freeze_iters + self.warmup_iters {
            linspace_at(self.start_warmup_value, self.base_value, self.warmup_iters, it - self.freeze_iters)
        } else {
            let n = (self.total_iters - self.warmup_iters - self.freeze_iters) as f64;
            let i = (it - self.freeze_iters - self.warmup_iters) as f64;
            let cos = (std::f64::consts::PI * i / n).cos();
            self.final_value + 0.5 * (self.base_value - self.final_value) * (1.0 + cos)
        }
    }
}

/// Element `i < num` of `np.linspace(start, stop, num)`: `i * step + start` with
/// `step = (stop - start) / (num - 1)`, the last element exactly `stop`; numpy's special cases for one
/// element and for a step that underflows to 0 included.
fn linspace_at(start: f64, stop: f64, num: u64, i: u64) -> f64 {
    let delta = stop - start;
    if num == 1 {
        return 0.0 * delta + start;
    }
    if i == num - 1 {
        return stop;
    }
    let div = (num - 1) as f64;
    let step = delta / div;
    if step == 0.0 {
        i as f64 / div * delta + start
    } else {
        i as f64 * step + start
    }
}

/// `[schedule]`: the per-step schedules (DINOv2 defaults; its epochs are 1250 steps).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, documented::DocumentedFields)]
#[serde(deny_unknown_fields, default)]
pub struct ScheduleConfig {
    /// Peak learning rate after warm-up [DINOv2: 0.004 * sqrt(batch / 1024)].
    pub lr: f64,
    /// Final learning rate of the cosine decay [DINOv2: 1e-6].
    pub min_lr: f64,
    /// Steps of the linear lr warm-up from 0 [DINOv2: 10 epochs of 1250 steps].
    pub warmup_steps: u64,
    /// Weight decay at the start of its cosine schedule [DINOv2: 0.04].
    pub weight_decay: f64,
    /// Weight decay at the end of the run [DINOv2: 0.4].
    pub weight_decay_end: f64,
    /// Teacher EMA momentum at the start of its cosine schedule [DINOv2: 0.992].
    pub momentum_teacher: f64,
    /// Teacher EMA momentum at the end of the run [DINOv2: 1.0].
    pub momentum_teacher_end: f64,
    /// Teacher temperature after its warm-up [DINOv2: 0.07].
    pub teacher_temp: f64,
    /// Teacher temperature at the start of its linear warm-up [DINOv2: 0.04].
    pub warmup_teacher_temp: f64,
    /// Steps of the linear teacher-temperature warm-up [DINOv2: 30 epochs].
    pub warmup_teacher_temp_steps: u64,
    /// Steps with the DINO head's last layer frozen (lr 0) [DINOv2: 1 epoch].
    pub freeze_last_layer_steps: u64,
}

/// DINOv2's "epoch" (`OFFICIAL_EPOCH_LENGTH`) in steps.
const DINOV2_EPOCH: u64 = 1250;

impl Default for ScheduleConfig {
    /// DINOv2's `ssl_default_config.yaml` values, epochs converted to steps.
    fn default() -> Self {
        Self {
            lr: 0.004,
            min_lr: 1e-6,
            warmup_steps: 10 * DINOV2_EPOCH,
            weight_decay: 0.04,
            weight_decay_end: 0.4,
            momentum_teacher: 0.992,
            momentum_teacher_end: 1.0,
            teacher_temp: 0.07,
            warmup_teacher_temp: 0.04,
            warmup_teacher_temp_steps: 30 * DINOV2_EPOCH,
            freeze_last_layer_steps: DINOV2_EPOCH,
        }
    }
}

/// The scheduled values at one step.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ScheduleValues {
    /// Learning rate (before the per-parameter multipliers).
    pub lr: f64,
    /// Weight decay (before the per-parameter multipliers).
    pub wd: f64,
    /// Teacher EMA momentum.
    pub momentum: f64,
    /// Teacher softmax temperature.
    pub teacher_temp: f64,
    /// Learning rate of the DINO head's last layer (0 while frozen).
    pub last_layer_lr: f64,
}

/// DINOv2's `build_schedulers` for a run of `total_steps`.
#[derive(Clone, Debug, PartialEq)]
pub struct Schedules {
    /// Learning rate: linear warm-up from 0, then cosine to `min_lr`.
    pub lr: CosineScheduler,
    /// Weight decay: cosine over the run.
    pub wd: CosineScheduler,
    /// Teacher momentum: cosine over the run.
    pub momentum: CosineScheduler,
    /// Teacher temperature: linear warm-up, then constant.
    pub teacher_temp: CosineScheduler,
    /// Steps at the start during which the last-layer lr is 0.
    pub freeze_last_layer_steps: u64,
}

impl Schedules {
    /// The schedules of `config` over `total_steps`; a warm-up longer than the run is an error.
    pub fn new(config: &ScheduleConfig, total_steps: u64) -> Result<Self> {
        let c = config;
        Ok(Self {
            lr: CosineScheduler::new(c.lr, c.min_lr, total_steps, c.warmup_steps, 0.0, 0)?,
            wd: CosineScheduler::new(c.weight_decay, c.weight_decay_end, total_steps, 0, 0.0, 0)?,
            momentum: CosineScheduler::new(c.momentum_teacher, c.momentum_teacher_end, total_steps, 0, 0.0, 0)?,
            teacher_temp: CosineScheduler::new(
                c.teacher_temp,
                c.teacher_temp,
                c.warmup_teacher_temp_steps,
                c.warmup_teacher_temp_steps,
                c.warmup_teacher_temp,
                0,
            )?,
            freeze_last_layer_steps: c.freeze_last_layer_steps,
        })
    }

    /// Every scheduled value at `step` (0-based); the last-layer lr is DINOv2's copy of the lr schedule
    /// with its first `freeze_last_layer_steps` entries set to 0.
    pub fn at(&self, step: u64) -> ScheduleValues {
        let lr = self.lr.value(step);
        let frozen = step < self.freeze_last_layer_steps && step < self.lr.total_iters;
        ScheduleValues {
            lr,
            wd: self.wd.value(step),
            momentum: self.momentum.value(step),
            teacher_temp: self.teacher_temp.value(step),
            last_layer_lr: if frozen { 0.0 } else { lr },
        }
    }
}

/// A warm-up or freeze length of a run's config, as [`fit_warmups`] scales it.
pub struct WarmupLength<'a> {
    /// What the note calls it, e.g. `lr warm-up`.
    pub name: &'static str,
    /// Its value in the run's config, in steps.
    pub steps: &'a mut u64,
    /// Its value in the preset the config comes from.
    pub preset: u64,
}

/// Fits the warm-up and freeze lengths to a run of `steps` that is shorter than one of them and than
/// the preset's run of `preset_steps`: every length still at its preset value keeps its ratio to the
/// run, `round(preset · steps / preset_steps)`, at least 1 step (0 stays 0); a length the config
/// set itself is kept. Returns the one-line note saying what changed, `None` when nothing did.
pub fn fit_warmups(steps: u64, preset_steps: u64, lengths: &mut [WarmupLength]) -> Option<String> {
    if steps >= preset_steps || lengths.iter().all(|l| *l.steps <= steps) {
        return None;
    }
    let ratio = steps as f64 / preset_steps as f64;
    let mut changed = Vec::new();
    for length in lengths.iter_mut().filter(|l| *l.steps == l.preset && l.preset > 0) {
        let scaled = ((length.preset as f64 * ratio).round() as u64).max(1);
        if scaled != *length.steps {
            changed.push(format!("{} {} → {scaled}", length.name, length.preset));
            *length.steps = scaled;
        }
    }
    (!changed.is_empty()).then(|| {
        format!(
            "train.steps = {steps} is shorter than the warm-ups of the preset's {preset_steps} steps; scaled to the run \
             (recorded in config.toml): {}",
            changed.join(", ")
        )
    })
}

/// A learning-rate warm-up (config key `key`) that fits a run of `steps`; longer is a one-line error
/// naming the key to lower.
pub fn check_lr_warmup(key: &str, warmup: u64, steps: u64) -> Result<()> {
    if warmup > steps {
        bail!("{key} = {warmup} is longer than train.steps = {steps}; set {key} to at most {steps}");
    }
    Ok(())
}
