//! The training data feed: a source read epoch after epoch in batches, with a position that a
//! checkpoint stores so a resumed run reads exactly the samples the uninterrupted run would have.
use crate::data::source::{self, SampleStream, SkipCounts, SourceSpec, StreamOptions, StreamState};
use crate::data::Sample;
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
