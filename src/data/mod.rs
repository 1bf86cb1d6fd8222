//! Data: the stream of captioned samples every stage reads (pre-training, evaluation, generation),
//! its sources (built-in synthetic scenes, WebDataset shards, image folders) and the per-branch
//! augmentations and iBOT masking (docs/design.md §4.2–§4.3).
//!
//! Imports run one way: [`reader`] (the traits a source implements) ← the sources ([`synthetic`],
//! [`folder`], [`webdataset`], which decode and encode through [`image`]) ← [`source`] (parses a
//! SPEC, the only module that knows every source) → [`stream`] (the worker threads).
pub mod augment;
pub mod contact_sheet;
pub mod folder;
pub mod image;
pub mod masking;
pub mod reader;
pub mod source;
pub mod stream;
pub mod synthetic;
pub mod webdataset;

use std::collections::BTreeMap;

/// One sample: an RGB image, its caption and optional integer class labels by label set
/// (`"cls"` for a WebDataset `.cls` / class folder; `"shape"`, `"color"`, `"shape_color"` for the
/// synthetic scenes).
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    /// Unique key within its source (the WebDataset `__key__`, a file stem, or `synthetic-<split>-<seed>-<index>`).
    pub key: String,
    pub image: ::image::RgbImage,
    pub caption: String,
    pub labels: BTreeMap<String, i64>,
}
