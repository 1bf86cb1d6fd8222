//! What tells a user whether the self-supervised branch learns: the entropy of the teacher's targets next
//! to its ceiling `ln K`, and an alarm raised once when the targets stay at the uniform solution.
//!
//! DINO and iBOT are cross-entropies against the teacher's targets. When those targets are uniform over
//! the `K` prototypes (a random head at a warm temperature, or Sinkhorn–Knopp spreading a small batch over
//! many prototypes), their entropy is `ln K`, the loss sits at `ln K`, and the student learns to output
//! uniform distributions: the "uniform collapse" of DINO (Caron et al. 2021, §5.3), which centring without
//! sharpening also produces. The alarm watches the DINO targets' mean entropy.
use tch::{Kind, Tensor};

/// Targets whose mean entropy is at least this fraction of `ln K` count as uniform.
pub const UNIFORM_FRACTION: f64 = 0.95;

/// Consecutive uniform steps, after the teacher temperature has warmed up, that raise the alarm.
pub const PATIENCE: u64 = 20;

/// Mean over the rows of `targets` (`[rows, K]`, each a distribution) of the entropy `-Σ_k t_k ln t_k`,
/// in nats (`0 ln 0 = 0`); NaN without rows.
pub fn mean_entropy(targets: &Tensor) -> f64 {
    tch::no_grad(|| {
        let t = targets.to_kind(Kind::Float);
        let plogp = &t * t.clamp_min(1e-30).log();
        -plogp.sum_dim_intlist(-1, false, None).mean(None).double_value(&[])
    })
}

/// Raises one warning when the DINO teacher targets stay uniform (entropy ≥ [`UNIFORM_FRACTION`] · `ln K`)
/// for [`PATIENCE`] steps in a row once the teacher temperature has reached its final value.
#[derive(Debug, Clone)]
pub struct CollapseAlarm {
    ln_k: f64,
    watch_from: u64,
    uniform_steps: u64,
    fired: bool,
}

impl CollapseAlarm {
    /// An alarm for `k` prototypes that starts watching at step `watch_from` (the end of the teacher
    /// temperature warm-up).
    pub fn new(k: i64, watch_from: u64) -> Self {
        Self { ln_k: (k as f64).ln(), watch_from, uniform_steps: 0, fired: false }
    }

    /// `ln K`, the entropy of uniform targets and the DINO loss they give.
    pub fn ln_k(&self) -> f64 {
        self.ln_k
    }

    /// Records step `step`'s mean target entropy; returns the warning the first time the alarm fires.
    pub fn observe(&mut self, step: u64, entropy: f64) -> Option<String> {
        let uniform = step >= self.watch_from && entropy >= UNIFORM_FRACTION * self.ln_k;
        self.uniform_steps = if uniform { self.uniform_steps + 1 } else { 0 };
        if self.fired || self.uniform_steps < PATIENCE {
            return None;
        }
        self.fired = true;
        Some(format!(
            "SSL collapse: the DINO teacher targets have stayed uniform for {PATIENCE} steps (entropy {entropy:.3} \
             of ln K = {:.3} at step {}): DINO and iBOT learn nothing. Fewer prototypes (dino_head.out_dim), \
             a larger batch.ssl or a colder schedule.teacher_temp help (README \"Pre-training\")",
            self.ln_k,
            step + 1
        ))
    }
}
