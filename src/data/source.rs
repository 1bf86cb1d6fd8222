//! Sample sources behind one SPEC string, and the sharded, shuffled, resumable stream over them.
//!
//! SPEC forms ([`parse`]):
//! - `synthetic[:train|heldout|novel][?n=10000&res=64&seed=0&zoom=1&colorless=0&group=1]`: the built-in
//!   synthetic scenes (`zoom`: a factor on the object sizes; `colorless`: the share of captions without
//!   colour words; `group`: hard-negative groups of consecutive scenes that differ only in the main shape);
//! - a `.tar` / `.tar.gz` / `.tgz` path, a brace pattern (`shards/{000..099}.tar`), a comma list
//!   of these, or `http(s)://` URL(s): WebDataset shards ([`super::webdataset`]);
//! - a directory `DIR[?captions=FILE&template=T]`: images with a captions file (`?captions=`, else
//!   `captions.csv` / `captions.jsonl` inside it); without one, class sub-folders (ImageNet
//!   layout) captioned with `template` (default `a photo of a {}.`); without either, the `.tar`
//!   shards it holds. (A folder named `synthetic` is written `./synthetic`.)
//!
//! The stream ([`open`]) splits the epoch's samples over `world_size × workers` readers so that all
//! ranks together see every sample exactly once: the global unit is the synthetic / image index, or
//! for WebDataset the shard (when there are at least as many shards as readers, the epoch's shard
//! order is dealt round-robin) or else the sample index within each shard modulo the reader count.
//! With shuffling, the order of shards (indexed sources: of all samples) is a permutation drawn from
//! (seed, epoch), and each reader passes its samples through a shuffle buffer seeded by (seed,
//! epoch, reader). Each worker reads and decodes on its own thread; the stream takes one sample
//! from each worker in turn, so its order is deterministic and [`SampleStream::position`] /
//! [`open_at`] resume it exactly.

use std::fmt;
use std::ops::AddAssign;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;

use anyhow::{anyhow, bail, Context, Result};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::folder::{
    find_captions_file, has_class_folders, missing_class_folders, CaptionFolder, ClassFolder, CLASS_CAPTION_TEMPLATE,
};
use super::synthetic::{Split, SyntheticConfig, SyntheticDataset, MAX_GROUP, MAX_ZOOM};
use super::webdataset::{expand_shard_list, is_url, ShardWriter, WebDataset};
use super::Sample;

/// Decoded samples each worker may hold ready ahead of the consumer.
const PREFETCH_PER_WORKER: usize = 8;

/// RNG stream of the epoch permutation (shared by all readers).
const PERMUTATION_STREAM: u64 = 0;

/// RNG stream of reader `r`'s shuffle buffer is `BUFFER_STREAM + r`.
const BUFFER_STREAM: u64 = 1;

/// Why a sample was skipped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Skip {
    /// Its image (or another member) is missing, unreadable or does not decode.
    Corrupt,
    /// It has no caption, or a blank one.
    NoCaption,
}

/// How many samples a stream skipped, by reason.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SkipCounts {
    /// Samples with a missing, unreadable or undecodable image or label member.
    pub corrupt: u64,
    /// Samples without a (non-blank) caption.
    pub no_caption: u64,
}

impl SkipCounts {
    /// All skipped samples.
    pub fn total(&self) -> u64 {
        self.corrupt + self.no_caption
    }

    /// Counts one skipped sample.
    fn count(&mut self, skip: Skip) {
        match skip {
            Skip::Corrupt => self.corrupt += 1,
            Skip::NoCaption => self.no_caption += 1,
        }
    }
}

impl AddAssign for SkipCounts {
    fn add_assign(&mut self, other: SkipCounts) {
        self.corrupt += other.corrupt;
        self.no_caption += other.no_caption;
    }
}

impl fmt::Display for SkipCounts {
    /// `N corrupt, M without caption`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} corrupt, {} without caption", self.corrupt, self.no_caption)
    }
}

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
        EpochOrder { shuffle: self.shuffle_buffer > 0, seed: self.seed, epoch }
    }
}

/// Where a stream is in its epoch: enough to continue it exactly with [`open_at`] (given the same
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
    fn start(epoch: u64, workers: usize) -> Self {
        StreamState { epoch, next_worker: 0, workers: vec![WorkerState::default(); workers] }
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

/// A parsed SPEC (see the module doc).
#[derive(Clone, Debug, PartialEq)]
pub enum SourceSpec {
    /// The built-in synthetic scenes.
    Synthetic(SyntheticConfig),
    /// WebDataset shards: paths or URLs, brace patterns expanded.
    WebDataset(Vec<String>),
    /// Images under a folder with a captions file.
    CaptionFolder {
        /// The image folder.
        dir: PathBuf,
        /// The captions file (CSV or JSONL).
        captions: PathBuf,
    },
    /// Class sub-folders of a folder, captioned from a template.
    ClassFolder {
        /// The folder holding one sub-folder per class.
        dir: PathBuf,
        /// The caption template; `{}` is replaced by the class name.
        template: String,
    },
}

/// Parses a SPEC (see the module doc). Directories are inspected to tell the folder kinds apart;
/// local shards are checked when opened.
pub fn parse(spec: &str) -> Result<SourceSpec> {
    let spec = spec.trim();
    if let Some(rest) = spec.strip_prefix("synthetic").filter(|r| r.is_empty() || r.starts_with([':', '?'])) {
        return parse_synthetic(rest).with_context(|| format!("bad source '{spec}'"));
    }
    if spec.is_empty() {
        bail!("empty source");
    }
    if spec.split(',').any(|item| is_url(item.trim())) {
        return Ok(SourceSpec::WebDataset(expand_shard_list(spec)?));
    }
    let (base, query) = spec.split_once('?').unwrap_or((spec, ""));
    let looks_like_shards = base.contains(['{', ',']) || is_shard_name(base);
    if looks_like_shards {
        if !query.is_empty() {
            bail!("bad source '{spec}': shards take no '?' options");
        }
        return Ok(SourceSpec::WebDataset(expand_shard_list(base)?));
    }
    let dir = Path::new(base);
    if dir.is_dir() {
        return parse_folder(dir, query).with_context(|| format!("bad source '{spec}'"));
    }
    if dir.exists() {
        bail!("source '{base}' is neither a directory nor a .tar shard");
    }
    bail!("source '{base}' not found (expected synthetic[:split][?...], .tar shards, URLs or a directory)")
}

/// Whether a path names a tar shard by its extension.
fn is_shard_name(path: &str) -> bool {
    [".tar", ".tar.gz", ".tgz"].iter().any(|ext| path.ends_with(ext))
}

/// The `[:split][?n=..&res=..&seed=..]` part of a synthetic SPEC.
fn parse_synthetic(rest: &str) -> Result<SourceSpec> {
    let (split, query) = rest.split_once('?').unwrap_or((rest, ""));
    let mut config = SyntheticConfig::default();
    if let Some(split) = split.strip_prefix(':') {
        config.split = split.parse::<Split>()?;
    }
    for (key, value) in query_pairs(query)? {
        let number = || format!("'{key}' must be a non-negative integer, got '{value}'");
        match key {
            "n" => config.len = value.parse().with_context(number)?,
            "res" => config.resolution = value.parse().with_context(number)?,
            "seed" => config.seed = value.parse().with_context(number)?,
            "zoom" => config.zoom = parse_zoom(value)?,
            "colorless" => config.colorless = parse_probability(key, value)?,
            "group" => config.group = parse_group(value)?,
            _ => bail!("unknown option '{key}' (expected n, res, seed, zoom, colorless, group)"),
        }
    }
    if config.group > 1 && config.split == Split::Novel {
        bail!("'group' needs the train or heldout split: a novel scene's main shape is its held-out pair");
    }
    Ok(SourceSpec::Synthetic(config))
}

/// The `zoom` option of a synthetic SPEC: a factor on the object sizes in `[0.25, MAX_ZOOM]`.
fn parse_zoom(value: &str) -> Result<f32> {
    match value.parse::<f32>() {
        Ok(z) if (0.25..=MAX_ZOOM).contains(&z) => Ok(z),
        _ => bail!("'zoom' must be a number from 0.25 to {MAX_ZOOM}, got '{value}'"),
    }
}

/// The `group` option of a synthetic SPEC: a hard-negative group size in `[1, MAX_GROUP]`.
fn parse_group(value: &str) -> Result<usize> {
    match value.parse::<usize>() {
        Ok(g) if (1..=MAX_GROUP).contains(&g) => Ok(g),
        _ => bail!("'group' must be an integer from 1 to {MAX_GROUP}, got '{value}'"),
    }
}

/// A probability option of a synthetic SPEC, in `[0, 1]`.
fn parse_probability(key: &str, value: &str) -> Result<f32> {
    match value.parse::<f32>() {
        Ok(p) if (0.0..=1.0).contains(&p) => Ok(p),
        _ => bail!("'{key}' must be a probability from 0 to 1, got '{value}'"),
    }
}

/// A directory SPEC with its `?captions=..&template=..` options.
fn parse_folder(dir: &Path, query: &str) -> Result<SourceSpec> {
    let (mut captions, mut template) = (None, None);
    for (key, value) in query_pairs(query)? {
        match key {
            "captions" => captions = Some(PathBuf::from(value)),
            "template" => template = Some(value.to_string()),
            _ => bail!("unknown option '{key}' (expected captions, template)"),
        }
    }
    let dir = dir.to_path_buf();
    if let Some(captions) = captions.or_else(|| find_captions_file(&dir)) {
        return Ok(SourceSpec::CaptionFolder { dir, captions });
    }
    if has_class_folders(&dir)? {
        let template = template.unwrap_or_else(|| CLASS_CAPTION_TEMPLATE.to_string());
        return Ok(SourceSpec::ClassFolder { dir, template });
    }
    let shards = tar_files(&dir)?;
    if shards.is_empty() {
        bail!(
            "'{}' has no captions file (captions.csv, captions.jsonl), class sub-folders or .tar shards",
            dir.display()
        );
    }
    Ok(SourceSpec::WebDataset(shards))
}

/// The `.tar` / `.tar.gz` / `.tgz` files directly in `dir`, sorted.
fn tar_files(dir: &Path) -> Result<Vec<String>> {
    let fail = |e: std::io::Error| anyhow!("cannot list directory '{}': {e}", dir.display());
    let mut shards = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(fail)? {
        let path = entry.map_err(fail)?.path();
        let name = path.to_string_lossy().into_owned();
        if path.is_file() && is_shard_name(&name) {
            shards.push(name);
        }
    }
    shards.sort();
    Ok(shards)
}

/// `k=v&k=v` pairs (no percent-decoding); a pair without `=` is an error.
fn query_pairs(query: &str) -> Result<Vec<(&str, &str)>> {
    query
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| pair.split_once('=').ok_or_else(|| anyhow!("option '{pair}' has no '=value'")))
        .collect()
}

/// The class folders (ImageNet layout, `DIR/<class>/<image>`) named by `spec`, whose images carry
/// the `"cls"` label of [`ClassFolder`] (sorted class-name order). Any other source, and a folder
/// that is empty, holds its images without class sub-folders, or has a captions file, is a one-line
/// error naming the path and the problem.
pub fn open_class_folder(spec: &str) -> Result<ClassFolder> {
    match parse(spec) {
        Ok(SourceSpec::ClassFolder { dir, template }) => ClassFolder::open_labelled(&dir, &template),
        Ok(other) => bail!("'{}' is {}, not class folders (DIR/<class>/<image>)", spec.trim(), other.describe()),
        Err(e) => match missing_class_folders(Path::new(spec_base(spec)))? {
            Some(problem) => bail!(problem),
            None => Err(e),
        },
    }
}

/// The path part of a SPEC (before its `?` options).
fn spec_base(spec: &str) -> &str {
    spec.trim().split_once('?').map_or(spec.trim(), |(base, _)| base)
}

/// Opens the source named by `spec` as a stream from the start of `opts.epoch`.
pub fn open(spec: &str, opts: &StreamOptions) -> Result<SampleStream> {
    parse(spec)?.open(opts)
}

/// Opens the source named by `spec` as a stream continuing from `state` (from
/// [`SampleStream::position`] of a stream with the same source and options): it yields exactly
/// what that stream would have yielded next.
pub fn open_at(spec: &str, opts: &StreamOptions, state: &StreamState) -> Result<SampleStream> {
    parse(spec)?.open_at(opts, state)
}

impl SourceSpec {
    /// What the source is, for messages: `the synthetic scenes`, `3 WebDataset shards`, `an image
    /// folder with the captions file 'F'`, `the class folders of 'DIR'`.
    pub fn describe(&self) -> String {
        match self {
            SourceSpec::Synthetic(_) => "the synthetic scenes".into(),
            SourceSpec::WebDataset(shards) => format!("{} WebDataset shard(s)", shards.len()),
            SourceSpec::CaptionFolder { captions, .. } => {
                format!("an image folder with the captions file '{}'", captions.display())
            }
            SourceSpec::ClassFolder { dir, .. } => format!("the class folders of '{}'", dir.display()),
        }
    }

    /// A stream from the start of `opts.epoch`.
    pub fn open(&self, opts: &StreamOptions) -> Result<SampleStream> {
        self.open_at(opts, &StreamState::start(opts.epoch, opts.workers))
    }

    /// A stream continuing from `state` (its epoch overrides `opts.epoch`).
    pub fn open_at(&self, opts: &StreamOptions, state: &StreamState) -> Result<SampleStream> {
        opts.validate()?;
        if state.workers.len() != opts.workers {
            bail!(
                "the saved stream position is for {} workers, the options have {}",
                state.workers.len(),
                opts.workers
            );
        }
        if state.next_worker >= opts.workers {
            bail!("the saved stream position names worker {} of {}", state.next_worker, opts.workers);
        }
        match self {
            SourceSpec::Synthetic(config) => {
                SampleStream::start(Arc::new(Indexed(SyntheticDataset::new(config.clone()))), opts, state)
            }
            SourceSpec::WebDataset(shards) => {
                SampleStream::start(Arc::new(WebDataset::new(shards.clone())?), opts, state)
            }
            SourceSpec::CaptionFolder { dir, captions } => {
                SampleStream::start(Arc::new(Indexed(CaptionFolder::open(dir, captions)?)), opts, state)
            }
            SourceSpec::ClassFolder { dir, template } => {
                SampleStream::start(Arc::new(Indexed(ClassFolder::open(dir, template)?)), opts, state)
            }
        }
    }
}

/// One of `count` readers over all ranks and workers (`index = rank × workers + worker`).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Reader {
    pub(crate) index: usize,
    pub(crate) count: usize,
}

impl Reader {
    /// Whether unit `unit` (an index counted over all readers) is this reader's.
    pub(crate) fn owns(&self, unit: usize) -> bool {
        unit % self.count == self.index
    }
}

/// The order of one epoch: a deterministic function of (seed, epoch).
#[derive(Clone, Copy, Debug)]
pub(crate) struct EpochOrder {
    shuffle: bool,
    seed: u64,
    epoch: u64,
}

impl EpochOrder {
    /// The epoch's permutation of `0..n` (the identity without shuffling), the same for every reader.
    pub(crate) fn permutation(&self, n: usize) -> Vec<usize> {
        let mut order: Vec<usize> = (0..n).collect();
        if self.shuffle {
            order.shuffle(&mut self.rng(PERMUTATION_STREAM));
        }
        order
    }

    /// A generator for random stream `stream` of this epoch.
    fn rng(&self, stream: u64) -> ChaCha8Rng {
        let mut seed = [0u8; 32];
        for (chunk, word) in seed.chunks_exact_mut(8).zip([self.seed, self.epoch, stream, 0x5654_505f_6461_7461]) {
            chunk.copy_from_slice(&word.to_le_bytes());
        }
        ChaCha8Rng::from_seed(seed)
    }
}

/// How a source is read by one reader: its records in order (cheap to produce, not decoded) and
/// how a record becomes a sample.
pub(crate) trait ReaderPlan: Send + Sync + 'static {
    /// One undecoded sample.
    type Record: Send;

    /// Passes `reader`'s records of the epoch to `visit`, in order; stops at `visit`'s first error.
    fn for_each_record(
        &self,
        reader: Reader,
        order: &EpochOrder,
        visit: &mut dyn FnMut(Self::Record) -> Result<()>,
    ) -> Result<()>;

    /// Decodes a record, or says why it is skipped.
    fn decode(&self, record: Self::Record) -> Result<Sample, Skip>;
}

/// A random-access source of samples.
pub(crate) trait IndexedSource: Send + Sync + 'static {
    /// Number of samples in an epoch.
    fn len(&self) -> usize;

    /// Sample `index`, or why it is skipped.
    fn get(&self, index: usize) -> Result<Sample, Skip>;
}

impl IndexedSource for SyntheticDataset {
    fn len(&self) -> usize {
        self.len()
    }

    fn get(&self, index: usize) -> Result<Sample, Skip> {
        Ok(self.get(index))
    }
}

/// Reads an [`IndexedSource`]: the epoch permutation of all indices, dealt round-robin to readers.
struct Indexed<S>(S);

impl<S: IndexedSource> ReaderPlan for Indexed<S> {
    type Record = usize;

    fn for_each_record(
        &self,
        reader: Reader,
        order: &EpochOrder,
        visit: &mut dyn FnMut(usize) -> Result<()>,
    ) -> Result<()> {
        let permutation = order.permutation(self.0.len());
        permutation.into_iter().skip(reader.index).step_by(reader.count).try_for_each(visit)
    }

    fn decode(&self, index: usize) -> Result<Sample, Skip> {
        self.0.get(index)
    }
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
    /// Starts one thread per worker of this rank, each resuming from its state in `state`.
    fn start<P: ReaderPlan>(plan: Arc<P>, opts: &StreamOptions, state: &StreamState) -> Result<Self> {
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

    /// The read position after the last sample yielded, for [`open_at`].
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

/// What [`write_shards`] wrote.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct WriteReport {
    /// The shards, in order.
    pub shards: Vec<PathBuf>,
    /// Samples written.
    pub samples: u64,
    /// Samples skipped while reading the source.
    pub skipped: SkipCounts,
}

/// Exports the source `spec` (one epoch, stored order, read by `workers` threads) as WebDataset
/// shards of `per_shard` samples in `out` (see [`ShardWriter`]); `vtp data write-shards`.
pub fn write_shards(spec: &str, out: &Path, per_shard: usize, workers: usize) -> Result<WriteReport> {
    let opts = StreamOptions { workers: workers.max(1), ..StreamOptions::default() };
    let mut stream = open(spec, &opts)?;
    let mut writer = ShardWriter::new(out, per_shard)?;
    let mut samples = 0u64;
    for sample in stream.by_ref() {
        writer.write(&sample?)?;
        samples += 1;
    }
    Ok(WriteReport { shards: writer.finish()?, samples, skipped: stream.skipped() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shuffle_buffer_releases_every_item_once() {
        let mut buffer = ShuffleBuffer::new(4, EpochOrder { shuffle: true, seed: 1, epoch: 2 }.rng(3));
        let mut out: Vec<u32> = (0..20).filter_map(|i| buffer.push(i)).collect();
        out.extend(std::iter::from_fn(|| buffer.pop()));
        assert_ne!(out, (0..20).collect::<Vec<_>>());
        out.sort();
        assert_eq!(out, (0..20).collect::<Vec<_>>());
    }

    #[test]
    fn permutation_depends_on_seed_and_epoch_only() {
        let order = |seed, epoch| EpochOrder { shuffle: true, seed, epoch }.permutation(50);
        assert_eq!(order(1, 2), order(1, 2));
        assert_ne!(order(1, 2), order(1, 3));
        assert_ne!(order(1, 2), order(2, 2));
        assert_eq!(EpochOrder { shuffle: false, seed: 1, epoch: 2 }.permutation(3), [0, 1, 2]);
    }
}
