//! The training data feed: a source read epoch after epoch in batches, with a position that a
//! checkpoint stores so a resumed run reads exactly the samples the uninterrupted run would have.
use crate::data::source::{self, SampleStream, SkipCounts, SourceSpec, StreamOptions, StreamState};
use crate::data::Sample;
use crate::dist::DataParallel;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

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

/// The data positions of every rank of a job (rank order), as a checkpoint stores them: each rank
/// reads its own slice of the source, so each resumes from its own position.
#[derive(Debug, Default, Clone)]
pub struct RankPositions {
    positions: Vec<serde_json::Value>,
}

impl RankPositions {
    /// Gathers every rank's position of `feed` (a collective: every rank calls it).
    pub fn gather(feed: &DataFeed, dp: &DataParallel) -> Result<Self> {
        Ok(Self { positions: dp.gather_json(&serde_json::to_value(feed.position())?)? })
    }

    /// The checkpoint-state fields: `feed` (rank 0's, as single-process checkpoints have it), `feeds`
    /// (every rank's) and `world`.
    pub fn state(&self, feed: &DataFeed, dp: &DataParallel) -> serde_json::Value {
        serde_json::json!({ "feed": feed.position(), "feeds": self.positions, "world": dp.world() })
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
