//! Where a training step's time goes: wall time by phase (`vtp bench --profile`), measured at the
//! same boundaries as `benches/pytorch_pretrain.py --bench --profile`.
use std::time::Instant;

/// Seconds per named phase, one entry per step that ran it, phases in first-seen order.
#[derive(Debug, Default)]
pub struct StepProfile {
    phases: Vec<(&'static str, Vec<f64>)>,
}

impl StepProfile {
    /// Records the time since `*since` under `phase` and restarts `*since` (the next phase's start).
    pub fn lap(&mut self, phase: &'static str, since: &mut Instant) {
        let seconds = since.elapsed().as_secs_f64();
        match self.phases.iter_mut().find(|(name, _)| *name == phase) {
            Some((_, times)) => times.push(seconds),
            None => self.phases.push((phase, vec![seconds])),
        }
        *since = Instant::now();
    }

    /// The median seconds of every phase, in first-seen order.
    pub fn medians(&self) -> Vec<(&'static str, f64)> {
        self.phases
            .iter()
            .map(|(name, times)| {
                let mut sorted = times.clone();
                sorted.sort_by(f64::total_cmp);
                (*name, sorted[sorted.len() / 2])
            })
            .collect()
    }

    /// Forgets every recorded step (after a warm-up).
    pub fn clear(&mut self) {
        self.phases.clear();
    }
}
