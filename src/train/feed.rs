//! The training data feed: a source read epoch after epoch in batches, with a position that a
//! checkpoint stores so a resumed run reads exactly the samples the uninterrupted run would have;
//! and the [`BatchQueue`] that reads and builds the next step's batch on a thread of its own while
//! the current step computes (PyTorch's `DataLoader` workers with `prefetch_factor`, for one batch).
use crate::data::reader::SkipCounts;
use crate::data::source::{self, SourceSpec};
use crate::data::stream::{SampleStream, StreamOptions, StreamState};
use crate::data::Sample;
use crate::dist::DataParallel;
use anyhow::{anyhow, bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;
use std::thread::JoinHandle;

/// The stream options of a trainer's source for rank `dp.rank()` of `dp.world()`: `workers` reader
/// threads, a shuffle buffer of `shuffle_buffer` samples, every draw from `seed`.
pub fn stream_options(workers: usize, shuffle_buffer: usize, seed: u64, dp: &DataParallel) -> StreamOptions {
    StreamOptions { rank: dp.rank(), world_size: dp.world(), workers, shuffle_buffer, seed, ..StreamOptions::default() }
}

/// Where a feed is: the stream position and the samples skipped in earlier epochs.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct FeedPosition {
    pub stream: StreamState,
    pub skipped_before: SkipCounts,
}

/// An endless sample feed over the epochs of one source.
pub struct DataFeed {
    spec: SourceSpec,
    name: String,
    opts: StreamOptions,
    stream: SampleStream,
    skipped_before: SkipCounts,
}

impl DataFeed {
    /// Opens `spec` with `opts`, at `position` when resuming.
    pub fn open(spec: &str, opts: StreamOptions, position: Option<&FeedPosition>) -> Result<Self> {
        let parsed = source::parse(spec).with_context(|| format!("data source '{spec}'"))?;
        let (stream, skipped_before) = match position {
            Some(p) => (parsed.open_at(&opts, &p.stream)?, p.skipped_before),
            None => (parsed.open(&opts)?, SkipCounts::default()),
        };
        Ok(Self { spec: parsed, name: spec.to_string(), opts, stream, skipped_before })
    }

    /// The next `n` samples, continuing into the next epoch when one ends.
    pub fn next_batch(&mut self, n: usize) -> Result<Vec<Sample>> {
        let mut out = Vec::with_capacity(n);
        let mut empty_epochs = 0;
        while out.len() < n {
            match self.stream.next() {
                Some(sample) => {
                    out.push(sample?);
                    empty_epochs = 0;
                }
                None => {
                    empty_epochs += 1;
                    if empty_epochs > 1 {
                        bail!("data source '{}' yields no samples", self.name);
                    }
                    self.skipped_before += self.stream.skipped();
                    let epoch = self.stream.position().epoch + 1;
                    self.stream = self.spec.open(&StreamOptions { epoch, ..self.opts.clone() })?;
                }
            }
        }
        Ok(out)
    }

    /// Samples skipped so far (corrupt or without caption), over every epoch.
    pub fn skipped(&self) -> SkipCounts {
        let mut total = self.skipped_before;
        total += self.stream.skipped();
        total
    }

    /// The position to store in a checkpoint.
    pub fn position(&self) -> FeedPosition {
        FeedPosition { stream: self.stream.position(), skipped_before: self.skipped_before }
    }
}

/// Builds step `step`'s batch from its samples: a function of the step and the samples only (its
/// random draws seeded by the step), so building it early on another thread changes nothing.
pub type BuildFn<B> = Arc<dyn Fn(u64, &[Sample]) -> B + Send + Sync>;

/// One step's batch as the producer thread hands it over, with the feed's state after its samples.
struct Prepared<B> {
    step: u64,
    batch: B,
    samples: usize,
    position: FeedPosition,
    skipped: SkipCounts,
}

/// The producer thread of a [`BatchQueue`]: it builds step `s + 1`'s batch while step `s` computes,
/// and waits to hand it over (a rendezvous channel: one batch ahead, never more).
struct Producer<B> {
    rx: Option<Receiver<Result<Prepared<B>>>>,
    handle: Option<JoinHandle<()>>,
}

impl<B: Send + 'static> Producer<B> {
    fn start(mut feed: DataFeed, first_step: u64, size: usize, build: BuildFn<B>) -> Result<Self> {
        let (tx, rx) = sync_channel(0);
        let produce = move || {
            crate::kernels::serial_kernels_on_this_thread();
            for step in first_step.. {
                let prepared = feed.next_batch(size).map(|samples| Prepared {
                    step,
                    batch: build(step, &samples),
                    samples: samples.len(),
                    position: feed.position(),
                    skipped: feed.skipped(),
                });
                let failed = prepared.is_err();
                if tx.send(prepared).is_err() || failed {
                    return;
                }
            }
        };
        let handle = std::thread::Builder::new()
            .name("vtp-batches".into())
            .spawn(produce)
            .context("cannot start the batch-building thread")?;
        Ok(Self { rx: Some(rx), handle: Some(handle) })
    }
}

impl<B> Drop for Producer<B> {
    /// Hangs up (the thread's next hand-over fails and it returns), then waits for the thread.
    fn drop(&mut self) {
        drop(self.rx.take());
        if let Some(handle) = self.handle.take() {
            let _ = handle.join();
        }
    }
}

/// A [`DataFeed`] and a batch builder on a thread of their own: [`Self::next`] returns step `s`'s
/// batch, built while step `s − 1` computed. [`Self::position`] is the feed's position after the
/// last batch handed out (what a checkpoint stores), not after the one being built.
pub struct BatchQueue<B: Send + 'static> {
    size: usize,
    build: BuildFn<B>,
    /// The feed until the first [`Self::next`] starts the thread at that step.
    idle: Option<DataFeed>,
    producer: Option<Producer<B>>,
    position: FeedPosition,
    skipped: SkipCounts,
    /// Seconds the last [`Self::next`] waited for its batch (0 when it was ready).
    wait_s: f64,
}

impl<B: Send + 'static> BatchQueue<B> {
    /// A queue of batches of `size` samples of `feed`, each built by `build`.
    pub fn new(feed: DataFeed, size: usize, build: BuildFn<B>) -> Self {
        let (position, skipped) = (feed.position(), feed.skipped());
        Self { size, build, idle: Some(feed), producer: None, position, skipped, wait_s: 0.0 }
    }

    /// Step `step`'s batch and its number of samples; steps are asked for in order from the first.
    pub fn next(&mut self, step: u64) -> Result<(B, usize)> {
        if let Some(feed) = self.idle.take() {
            self.producer = Some(Producer::start(feed, step, self.size, self.build.clone())?);
        }
        let rx = self.producer.as_ref().and_then(|p| p.rx.as_ref()).context("the batch-building thread has stopped")?;
        let started = std::time::Instant::now();
        let prepared = rx.recv().map_err(|_| anyhow!("the batch-building thread has stopped"))??;
        self.wait_s = started.elapsed().as_secs_f64();
        ensure!(prepared.step == step, "batch of step {} handed to step {step}", prepared.step);
        (self.position, self.skipped) = (prepared.position, prepared.skipped);
        Ok((prepared.batch, prepared.samples))
    }

    /// Continues from `feed` (a restored position): the batch being built is dropped.
    pub fn restart(&mut self, feed: DataFeed) {
        self.producer = None;
        *self = Self::new(feed, self.size, self.build.clone());
    }

    /// The feed's position after the last batch handed out.
    pub fn position(&self) -> &FeedPosition {
        &self.position
    }

    /// Seconds the training thread waited for the last batch handed out (`data/wait_s`).
    pub fn wait_s(&self) -> f64 {
        self.wait_s
    }

    /// Samples skipped up to the last batch handed out.
    pub fn skipped(&self) -> SkipCounts {
        self.skipped
    }
}

/// The data positions of every rank of a job (rank order), as a checkpoint stores them: each rank
/// reads its own slice of the source, so each resumes from its own position.
#[derive(Debug, Default, Clone)]
pub struct RankPositions {
    positions: Vec<serde_json::Value>,
}

impl RankPositions {
    /// Gathers every rank's `position` (a collective: every rank calls it).
    pub fn gather(position: &FeedPosition, dp: &DataParallel) -> Result<Self> {
        Ok(Self { positions: dp.gather_json(&serde_json::to_value(position)?)? })
    }

    /// The checkpoint-state fields: `feed` (this rank's `position`; rank 0's, as single-process
    /// checkpoints have it), `feeds` (every rank's) and `world`.
    pub fn state(&self, position: &FeedPosition, dp: &DataParallel) -> serde_json::Value {
        serde_json::json!({ "feed": position, "feeds": self.positions, "world": dp.world() })
    }

    /// This rank's position in a checkpoint `state` written by [`Self::state`] (or a single-process
    /// one); a checkpoint of another world size is refused.
    pub fn saved(state: &serde_json::Value, dp: &DataParallel) -> Result<FeedPosition> {
        let world = dp.world();
        let saved_world = state["world"].as_u64().unwrap_or(1) as usize;
        if saved_world != world {
            bail!(
                "this checkpoint was written by {saved_world} processes; resume it with {saved_world} \
                 (each process's data readers resume where they stopped)"
            );
        }
        let own = state["feeds"].get(dp.rank()).filter(|_| world > 1).unwrap_or(&state["feed"]);
        serde_json::from_value(own.clone()).context("the checkpoint's data position is unreadable")
    }
}
