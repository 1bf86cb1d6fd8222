//! What every sample source implements to be read by the stream ([`super::stream`]): one reader's
//! share of an epoch ([`Reader`]), the epoch's order ([`EpochOrder`]), how a source lists and decodes
//! its records ([`ReaderPlan`], or [`IndexedSource`] for random-access sources), and why and how
//! often samples are skipped ([`Skip`], [`SkipCounts`]).

use std::fmt;
use std::ops::AddAssign;

use anyhow::Result;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::Sample;

/// RNG stream of the epoch permutation (shared by all readers).
const PERMUTATION_STREAM: u64 = 0;

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
    pub(crate) fn count(&mut self, skip: Skip) {
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
    /// The order of `epoch`: shuffled from `seed` when `shuffle`, else stored order.
    pub(crate) fn new(shuffle: bool, seed: u64, epoch: u64) -> Self {
        EpochOrder { shuffle, seed, epoch }
    }

    /// The epoch's permutation of `0..n` (the identity without shuffling), the same for every reader.
    pub(crate) fn permutation(&self, n: usize) -> Vec<usize> {
        let mut order: Vec<usize> = (0..n).collect();
        if self.shuffle {
            order.shuffle(&mut self.rng(PERMUTATION_STREAM));
        }
        order
    }

    /// A generator for random stream `stream` of this epoch.
    pub(crate) fn rng(&self, stream: u64) -> ChaCha8Rng {
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

/// Reads an [`IndexedSource`]: the epoch permutation of all indices, dealt round-robin to readers.
pub(crate) struct Indexed<S>(pub(crate) S);

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permutation_depends_on_seed_and_epoch_only() {
        let order = |seed, epoch| EpochOrder { shuffle: true, seed, epoch }.permutation(50);
        assert_eq!(order(1, 2), order(1, 2));
        assert_ne!(order(1, 2), order(1, 3));
        assert_ne!(order(1, 2), order(2, 2));
        assert_eq!(EpochOrder { shuffle: false, seed: 1, epoch: 2 }.permutation(3), [0, 1, 2]);
    }
}
