//! The stream of one epoch's samples for one rank, read by worker threads.
//!
//! The stream ([`SampleStream`], opened by [`super::source::open`]) splits the epoch's samples over
//! `world_size × workers` readers so that all ranks together see every sample exactly once: the
//! global unit is the synthetic / image index, or for WebDataset the shard (when there are at least
//! as many shards as readers, the epoch's shard order is dealt round-robin) or else the sample index
//! within each shard modulo the reader count. With shuffling, the order of shards (indexed sources:
//! of all samples) is a permutation drawn from (seed, epoch), and each reader passes its samples
//! through a shuffle buffer seeded by (seed, epoch, reader). Each worker reads and decodes on its
//! own thread; the stream takes one sample from each worker in turn, so its order is deterministic
//! and [`SampleStream::position`] / [`super::source::open_at`] resume it exactly.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;

use anyhow::{anyhow, bail, Context, Result};
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::reader::{EpochOrder, Reader, ReaderPlan, SkipCounts};
use super::Sample;

/// Decoded samples each worker may hold ready ahead of the consumer.
const PREFETCH_PER_WORKER: usize = 8;

/// RNG stream of reader `r`'s shuffle buffer is `BUFFER_STREAM + r`.
const BUFFER_STREAM: u64 = 1;

/// How a stream reads its source: which part of the data this process sees, and in what order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct StreamOptions {
    /// This process's rank, `< world_size`.
    pub rank: usize,
    /// Number of processes reading the source together.
    pub world_size: usize,
    /// Reader threads in this process (each reads and decodes its share), at least 1.
    pub workers: usize,
    /// Shuffle-buffer slots per reader; 0 reads in stored order without any shuffling.
    pub shuffle_buffer: usize,
    /// Seed of the shuffling.
    pub seed: u64,
    /// Epoch to read; with shuffling, each epoch has its own order.
    pub epoch: u64,
}

impl Default for StreamOptions {
    /// Rank 0 of 1, one worker, no shuffling, seed 0, epoch 0.
    fn default() -> Self {
        StreamOptions { rank: 0, world_size: 1, workers: 1, shuffle_buffer: 0, seed: 0, epoch: 0 }
    }
}

impl StreamOptions {
    /// Checks rank, world size and worker count.
    fn validate(&self) -> Result<()> {
        if self.world_size == 0 || self.workers == 0 {
            bail!("world size and workers must be at least 1 (got {} and {})", self.world_size, self.workers);
        }
        if self.rank >= self.world_size {
            bail!("rank {} is out of range for world size {}", self.rank, self.world_size);
        }
        Ok(())
    }

    /// The order of the epoch being read.
    fn order(&self, epoch: u64) -> EpochOrder {
        EpochOrder::new(self.shuffle_buffer > 0, self.seed, epoch)
    }
}

/// Where a stream is in its epoch: enough to continue it exactly with [`super::source::open_at`] (given the same
/// source and options).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamState {
    /// The epoch being read.
    pub epoch: u64,
    /// The worker the next sample comes from.
    pub next_worker: usize,
    /// How far each worker got.
    pub workers: Vec<WorkerState>,
}

impl StreamState {
    /// The state at the start of `epoch` with `workers` workers.
    pub(crate) fn start(epoch: u64, workers: usize) -> Self {
        StreamState { epoch, next_worker: 0, workers: vec![WorkerState::default(); workers] }
    }

    /// Checks `opts` and that this state was saved by a stream with as many workers.
    pub(crate) fn check(&self, opts: &StreamOptions) -> Result<()> {
        opts.validate()?;
        if self.workers.len() != opts.workers {
            bail!("the saved stream position is for {} workers, the options have {}", self.workers.len(), opts.workers);
        }
        if self.next_worker >= opts.workers {
            bail!("the saved stream position names worker {} of {}", self.next_worker, opts.workers);
        }
        Ok(())
    }
}

/// How far one worker got in its epoch.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerState {
    /// Samples it has taken from its shuffle buffer (yielded or skipped).
    pub consumed: u64,
    /// Samples it skipped among those.
    pub skipped: SkipCounts,
    /// Whether it has no samples left this epoch.
    pub finished: bool,
}

/// A shuffle buffer: holds up to `capacity` records and releases a random one for each new one
/// once full (capacity 0 or 1 passes records straight through).
struct ShuffleBuffer<T> {
    items: Vec<T>,
    capacity: usize,
    rng: ChaCha8Rng,
}

impl<T> ShuffleBuffer<T> {
    /// An empty buffer.
    fn new(capacity: usize, rng: ChaCha8Rng) -> Self {
        ShuffleBuffer { items: Vec::with_capacity(capacity), capacity, rng }
    }

    /// Adds `item`; returns the one released, if any.
    fn push(&mut self, item: T) -> Option<T> {
        if self.capacity <= 1 {
            return Some(item);
        }
        if self.items.len() < self.capacity {
            self.items.push(item);
            return None;
        }
        let slot = self.rng.random_range(0..self.items.len());
        Some(std::mem::replace(&mut self.items[slot], item))
    }

    /// Releases a random remaining item (at the end of the input).
    fn pop(&mut self) -> Option<T> {
        if self.items.is_empty() {
            return None;
        }
        let slot = self.rng.random_range(0..self.items.len());
        Some(self.items.swap_remove(slot))
    }
}

/// What a worker thread sends to the stream.
enum Message {
    /// A decoded sample and the worker's state just after it.
    Sample(Sample, WorkerState),
    /// The worker has no samples left; its final state.
    Done(WorkerState),
    /// Reading failed (a missing or unreadable shard).
    Failed(anyhow::Error),
}

/// A worker's side of the stream: replays the records before its resume point without decoding
/// them, then decodes, counts skips and sends samples.
struct WorkerOutput {
    tx: SyncSender<Message>,
    replay: u64,
    pulled: u64,
    state: WorkerState,
}

impl WorkerOutput {
    /// Handles the next record out of the shuffle buffer.
    fn take<P: ReaderPlan>(&mut self, plan: &P, record: P::Record) -> Result<()> {
        self.pulled += 1;
        if self.pulled <= self.replay {
            return Ok(());
        }
        self.state.consumed = self.pulled;
        match plan.decode(record) {
            Ok(sample) => {
                self.tx.send(Message::Sample(sample, self.state.clone())).map_err(|_| anyhow!("stream closed"))
            }
            Err(skip) => {
                self.state.skipped.count(skip);
                Ok(())
            }
        }
    }
}

/// Body of a worker thread: reads `reader`'s records from the resume point and sends the samples.
fn run_worker<P: ReaderPlan>(
    plan: Arc<P>,
    reader: Reader,
    order: EpochOrder,
    buffer_slots: usize,
    resume: WorkerState,
    tx: SyncSender<Message>,
    stop: Arc<AtomicBool>,
) {
    let mut buffer = ShuffleBuffer::new(buffer_slots, order.rng(BUFFER_STREAM + reader.index as u64));
    let mut output = WorkerOutput { tx: tx.clone(), replay: resume.consumed, pulled: 0, state: resume };
    let read = plan.for_each_record(reader, &order, &mut |record| {
        if stop.load(Ordering::Relaxed) {
            bail!("stream closed");
        }
        buffer.push(record).map_or(Ok(()), |released| output.take(&*plan, released))
    });
    let drained =
        read.and_then(|()| std::iter::from_fn(|| buffer.pop()).try_for_each(|released| output.take(&*plan, released)));
    let message = match drained {
        Ok(()) => Message::Done(WorkerState { finished: true, ..output.state }),
        Err(e) => Message::Failed(e),
    };
    // The receiver is gone when the stream was dropped: nothing left to tell.
    let _ = tx.send(message);
}

/// The stream of one epoch's samples for one rank: an iterator of `Result<Sample>`.
///
/// Corrupt and caption-less samples are skipped and counted ([`Self::skipped`]). A missing or
/// unreadable shard is yielded once as an `Err` naming it, after which the stream ends. The
/// stream ends after the epoch; open the next epoch with a new stream. Dropping it stops its
/// worker threads.
pub struct SampleStream {
    epoch: u64,
    next_worker: usize,
    workers: Vec<WorkerLink>,
    failed: bool,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

/// The stream's end of one worker.
struct WorkerLink {
    /// `None` once the worker finished (or was never started because it had).
    rx: Option<Receiver<Message>>,
    state: WorkerState,
}

impl SampleStream {
    /// Starts one thread per worker of this rank, each resuming from its state in `state`
    /// (checked with [`StreamState::check`]).
    pub(crate) fn start<P: ReaderPlan>(plan: Arc<P>, opts: &StreamOptions, state: &StreamState) -> Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let order = opts.order(state.epoch);
        let mut stream = SampleStream {
            epoch: state.epoch,
            next_worker: state.next_worker,
            workers: Vec::new(),
            failed: false,
            stop: stop.clone(),
            threads: Vec::new(),
        };
        for (worker, resume) in state.workers.iter().enumerate() {
            let reader = Reader { index: opts.rank * opts.workers + worker, count: opts.world_size * opts.workers };
            let mut link = WorkerLink { rx: None, state: resume.clone() };
            if !resume.finished {
                let (tx, rx) = sync_channel(PREFETCH_PER_WORKER);
                let (plan, resume, stop) = (plan.clone(), resume.clone(), stop.clone());
                let buffer_slots = opts.shuffle_buffer;
                let thread = std::thread::Builder::new()
                    .name(format!("vtp-data-{worker}"))
                    .spawn(move || {
                        crate::kernels::serial_kernels_on_this_thread();
                        run_worker(plan, reader, order, buffer_slots, resume, tx, stop)
                    })
                    .context("cannot start a data worker thread")?;
                stream.threads.push(thread);
                link.rx = Some(rx);
            }
            stream.workers.push(link);
        }
        Ok(stream)
    }

    /// Samples skipped so far (up to the last one yielded), by reason.
    pub fn skipped(&self) -> SkipCounts {
        let mut total = SkipCounts::default();
        for link in &self.workers {
            total += link.state.skipped;
        }
        total
    }

    /// The read position after the last sample yielded, for [`super::source::open_at`].
    pub fn position(&self) -> StreamState {
        StreamState {
            epoch: self.epoch,
            next_worker: self.next_worker,
            workers: self.workers.iter().map(|link| link.state.clone()).collect(),
        }
    }

    /// The first unfinished worker from `next_worker` on, cyclically.
    fn next_unfinished(&self) -> Option<usize> {
        let n = self.workers.len();
        (0..n).map(|i| (self.next_worker + i) % n).find(|&w| !self.workers[w].state.finished)
    }
}

impl Iterator for SampleStream {
    type Item = Result<Sample>;

    fn next(&mut self) -> Option<Result<Sample>> {
        if self.failed {
            return None;
        }
        while let Some(worker) = self.next_unfinished() {
            self.next_worker = worker;
            let link = &mut self.workers[worker];
            let message = link.rx.as_ref().and_then(|rx| rx.recv().ok());
            match message {
                Some(Message::Sample(sample, state)) => {
                    link.state = state;
                    self.next_worker = (worker + 1) % self.workers.len();
                    return Some(Ok(sample));
                }
                Some(Message::Done(state)) => {
                    link.state = state;
                    link.rx = None;
                }
                Some(Message::Failed(e)) => {
                    self.failed = true;
                    return Some(Err(e));
                }
                None => {
                    self.failed = true;
                    return Some(Err(anyhow!("data worker {worker} stopped unexpectedly")));
                }
            }
        }
        None
    }
}

impl Drop for SampleStream {
    /// Stops the workers and waits for their threads.
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for link in &mut self.workers {
            link.rx = None;
        }
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shuffle_buffer_releases_every_item_once() {
        let mut buffer = ShuffleBuffer::new(4, EpochOrder::new(true, 1, 2).rng(3));
        let mut out: Vec<u32> = (0..20).filter_map(|i| buffer.push(i)).collect();
        out.extend(std::iter::from_fn(|| buffer.pop()));
        assert_ne!(out, (0..20).collect::<Vec<_>>());
        out.sort();
        assert_eq!(out, (0..20).collect::<Vec<_>>());
    }
}
