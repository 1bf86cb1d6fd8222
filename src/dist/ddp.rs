//! Data parallelism as PyTorch DDP does it, on a c10d [`ProcessGroup`]: parameters broadcast from rank
//! 0 at the start, gradients averaged over the ranks in buckets of `bucket_mib`, either while the
//! backward pass runs (DDP's own `c10d::Reducer`, `overlap`) or after it (all started, then awaited),
//! every rank owning an equal slice of the global batch. A single process is the same type without a
//! group: every operation is then the identity.
use super::{DistEnv, GroupOptions, ProcessGroup, Reducer};
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use std::sync::Mutex;
use std::time::Duration;
use tch::{Kind, Tensor};

/// The `[dist]` settings of a run (also `vtp dist-check`'s flags).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, clap::Args, documented::DocumentedFields)]
#[serde(deny_unknown_fields, default)]
pub struct DistConfig {
    /// Seconds one collective of a multi-process run may wait for the other ranks before the run fails
    /// (rank 0's evaluation runs while the others wait) [PyTorch's process-group timeout: 1800].
    #[arg(long, default_value_t = 1800.0)]
    pub timeout_s: f64,
    /// Seconds a multi-process run waits for every rank to join at the start (a rank that never starts
    /// fails after it).
    #[arg(long, default_value_t = 300.0)]
    pub join_timeout_s: f64,
    /// Gradient all-reduce bucket size in MiB of a multi-process run [DDP bucket_cap_mb: 25].
    #[arg(long, default_value_t = 25.0)]
    pub bucket_mib: f64,
    /// Multi-process runs: all-reduce each gradient bucket as soon as the backward pass has produced it
    /// (DDP's `c10d::Reducer`), instead of all of them after the pass.
    #[arg(long, default_value_t = false)]
    pub overlap: bool,
}

impl Default for DistConfig {
    fn default() -> Self {
        Self { timeout_s: 1800.0, join_timeout_s: 300.0, bucket_mib: 25.0, overlap: false }
    }
}

/// This process's part in a data-parallel job (or the whole job when alone).
pub struct DataParallel {
    group: Option<ProcessGroup>,
    bucket_bytes: usize,
    overlap: bool,
    /// The Reducers of `overlap`, one per parameter list (keyed by the parameters' storage).
    reducers: Mutex<Vec<(Vec<usize>, Reducer)>>,
}

impl DataParallel {
    /// A job of one process.
    pub fn single() -> Self {
        Self { group: None, bucket_bytes: usize::MAX, overlap: false, reducers: Mutex::default() }
    }

    /// Joins the job the launcher's environment describes ([`DistEnv`]); a single process without one.
    pub fn join(config: &DistConfig) -> Result<Self> {
        let Some(env) = DistEnv::from_process()? else { return Ok(Self::single()) };
        if !(config.timeout_s > 0.0 && config.join_timeout_s > 0.0 && config.bucket_mib > 0.0) {
            bail!("dist.timeout_s, dist.join_timeout_s and dist.bucket_mib must be positive");
        }
        let opts = GroupOptions {
            env,
            join_timeout: Duration::from_secs_f64(config.join_timeout_s),
            timeout: Duration::from_secs_f64(config.timeout_s),
        };
        let group = ProcessGroup::gloo(&opts)?;
        Ok(Self {
            group: Some(group),
            bucket_bytes: (config.bucket_mib * 1024.0 * 1024.0) as usize,
            overlap: config.overlap,
            reducers: Mutex::default(),
        })
    }

    /// The process group (`None` when alone).
    pub fn group(&self) -> Option<&ProcessGroup> {
        self.group.as_ref()
    }

    /// This process's rank (0 when alone).
    pub fn rank(&self) -> usize {
        self.group.as_ref().map_or(0, ProcessGroup::rank)
    }

    /// The number of processes.
    pub fn world(&self) -> usize {
        self.group.as_ref().map_or(1, ProcessGroup::world)
    }

    /// Rank 0: the process that logs, evaluates and writes checkpoints.
    pub fn is_main(&self) -> bool {
        self.rank() == 0
    }

    /// This rank's rows `(start, len)` of a global batch of `n` (which the world must divide).
    pub fn local_rows(&self, n: i64) -> Result<(i64, i64)> {
        let w = self.world() as i64;
        if n % w != 0 {
            bail!("the global batch of {n} does not split evenly over {w} processes");
        }
        Ok((self.rank() as i64 * n / w, n / w))
    }

    /// This rank's slice (dim 0) of a global-batch tensor.
    pub fn shard(&self, t: &Tensor) -> Result<Tensor> {
        let (start, len) = self.local_rows(t.size()[0])?;
        Ok(t.narrow(0, start, len))
    }

    /// Runs a collective over the tensors in buckets of at most `bucket_bytes`: each bucket is
    /// flattened into one contiguous tensor and handed to `start`; once every bucket has started, each
    /// is awaited, mapped by `finish` (e.g. divided by the world size) and copied back into its tensors.
    fn bucketed(
        &self,
        tensors: &[Tensor],
        start: impl Fn(&ProcessGroup, &Tensor) -> Result<super::Work>,
        finish: impl Fn(&Tensor) -> Tensor,
    ) -> Result<()> {
        let Some(group) = &self.group else { return Ok(()) };
        let mut buckets: Vec<Vec<&Tensor>> = vec![vec![]];
        let mut bytes = 0usize;
        for t in tensors {
            let size = t.numel() * t.kind().elt_size_in_bytes();
            if bytes + size > self.bucket_bytes && !buckets.last().expect("non-empty").is_empty() {
                buckets.push(vec![]);
                bytes = 0;
            }
            buckets.last_mut().expect("non-empty").push(t);
            bytes += size;
        }
        let mut pending = Vec::with_capacity(buckets.len());
        for bucket in buckets.into_iter().filter(|b| !b.is_empty()) {
            let flat = Tensor::cat(&bucket.iter().map(|t| t.reshape([-1])).collect::<Vec<_>>(), 0);
            pending.push((start(group, &flat)?, flat, bucket));
        }
        tch::no_grad(|| {
            for (work, flat, bucket) in pending {
                work.wait()?;
                let flat = finish(&flat);
                let mut offset = 0;
                for t in bucket {
                    let n = t.numel() as i64;
                    t.shallow_clone().copy_(&flat.narrow(0, offset, n).view(t.size().as_slice()));
                    offset += n;
                }
            }
            Ok(())
        })
    }

    /// Sets every tensor to rank 0's value (the parameters and buffers at the start of a run).
    pub fn broadcast_from_main(&self, tensors: &[Tensor]) -> Result<()> {
        self.bucketed(tensors, |g, flat| g.broadcast(&[flat.shallow_clone()], 0), |flat| flat.shallow_clone())
    }

    /// `loss.backward()`, after which the gradient of every parameter of `params` that has one is its
    /// mean over the ranks: all-reduced bucket by bucket during the pass (`overlap`, DDP's Reducer
    /// for this list of parameters, made on first use) or after it ([`Self::average_gradients`]).
    pub fn backward(&self, loss: &Tensor, params: &[Tensor]) -> Result<()> {
        let Some(group) = self.group.as_ref().filter(|_| self.overlap) else {
            loss.f_backward()?;
            return self.average_gradients(params);
        };
        let key: Vec<usize> = params.iter().map(|p| p.data_ptr() as usize).collect();
        let mut reducers = self.reducers.lock().map_err(|_| anyhow::anyhow!("a gradient reducer panicked"))?;
        let index = match reducers.iter().position(|(k, _)| *k == key) {
            Some(i) => i,
            None => {
                reducers.push((key, group.reducer(params, self.bucket_bytes)?));
                reducers.len() - 1
            }
        };
        reducers[index].1.backward(loss)
    }

    /// Replaces the gradient of every parameter that has one by its mean over the ranks (DDP's
    /// all-reduce; every rank must hold gradients for the same parameters).
    fn average_gradients(&self, params: &[Tensor]) -> Result<()> {
        let grads: Vec<Tensor> = params.iter().map(Tensor::grad).filter(Tensor::defined).collect();
        let w = self.world() as f64;
        self.bucketed(&grads, |g, flat| g.all_reduce_sum(&[flat.shallow_clone()]), |flat| flat / w)
    }

    /// The sum over the ranks of each tensor, in place (e.g. the DINO centre's batch sums).
    pub fn sum(&self, tensors: &[Tensor]) -> Result<()> {
        self.bucketed(tensors, |g, flat| g.all_reduce_sum(&[flat.shallow_clone()]), |flat| flat.shallow_clone())
    }

    /// Every rank's `value`, in rank order (e.g. the data readers' positions a checkpoint stores).
    pub fn gather_json(&self, value: &serde_json::Value) -> Result<Vec<serde_json::Value>> {
        let Some(group) = &self.group else { return Ok(vec![value.clone()]) };
        let bytes = serde_json::to_vec(value)?;
        let longest = self.max(bytes.len() as f64)? as usize;
        let mut padded = bytes;
        padded.resize(longest, b' ');
        let gathered = Vec::<u8>::try_from(&group.all_gather(&Tensor::from_slice(&padded))?)?;
        gathered.chunks(longest.max(1)).take(self.world()).map(|c| Ok(serde_json::from_slice(c)?)).collect()
    }

    /// The largest of the ranks' `value`s.
    fn max(&self, value: f64) -> Result<f64> {
        let Some(group) = &self.group else { return Ok(value) };
        let all = Vec::<f64>::try_from(&group.all_gather(&Tensor::from_slice(&[value]))?)?;
        Ok(all.into_iter().fold(f64::MIN, f64::max))
    }

    /// The seed of this rank's random draws from the run's `seed`: `seed` itself on rank 0 (a
    /// single-process run draws as before), a distinct mix on the others.
    pub fn rank_seed(&self, seed: u64) -> u64 {
        match self.rank() {
            0 => seed,
            r => seed ^ (r as u64).wrapping_mul(0xD1B5_4A32_D192_ED03),
        }
    }

    /// The mean over the ranks of each value (each rank's loss terms → the global batch's).
    pub fn mean(&self, values: &[f64]) -> Result<Vec<f64>> {
        if self.group.is_none() {
            return Ok(values.to_vec());
        }
        let t = Tensor::from_slice(values).to_kind(Kind::Double);
        self.sum(&[t.shallow_clone()])?;
        let w = self.world() as f64;
        Ok(Vec::<f64>::try_from(&t)?.into_iter().map(|v| v / w).collect())
    }

    /// Whether any rank's `flag` is set (so that every rank stops at the same step).
    pub fn any(&self, flag: bool) -> Result<bool> {
        Ok(self.mean(&[if flag { 1.0 } else { 0.0 }])?[0] > 0.0)
    }
}
