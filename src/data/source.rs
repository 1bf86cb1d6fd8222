//! Sample sources behind one SPEC string: the one place that parses a SPEC and knows every source.
//!
//! SPEC forms ([`parse`]):
//! - `synthetic[:train|heldout|novel][?n=10000&res=64&seed=0&zoom=1&colorless=0&group=1]`: the built-in
//!   synthetic scenes (`zoom`: a factor on the object sizes; `colorless`: the share of captions without
//!   colour words; `group`: hard-negative groups of consecutive scenes that differ only in the main shape);
//! - a `.tar` / `.tar.gz` / `.tgz` path, a brace pattern (`shards/{000..099}.tar`), a glob pattern
//!   (`shards/*.tar`, `shards/train-??.tar`, `shards/[ab]*.tar`, `shards/**/*.tar`; matches sorted by
//!   path, braces expanded first), a comma list of these, or `http(s)://` URL(s): WebDataset shards
//!   ([`super::webdataset`]). A SPEC ending in a shard extension takes no options, so a `?` in it is
//!   the glob wildcard;
//! - a directory `DIR[?captions=FILE&template=T]`: images with a captions file (`?captions=`, else
//!   `captions.csv` / `captions.jsonl` inside it); without one, class sub-folders (ImageNet
//!   layout) captioned with `template` (default `a photo of a {}.`); without either, the `.tar`
//!   shards it holds. (A folder named `synthetic` is written `./synthetic`.)
//!
//! [`open`] / [`open_at`] read the source as a [`SampleStream`] (see [`super::stream`] for how the
//! epoch is split over ranks and workers, shuffled and resumed).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use serde::Serialize;

use super::folder::{
    find_captions_file, has_class_folders, missing_class_folders, CaptionFolder, ClassFolder, CLASS_CAPTION_TEMPLATE,
};
use super::reader::{Indexed, SkipCounts};
use super::stream::{SampleStream, StreamOptions, StreamState};
use super::synthetic::{Split, SyntheticConfig, SyntheticDataset, MAX_GROUP, MAX_ZOOM};
use super::webdataset::{expand_shard_list, is_glob, is_url, ShardWriter, WebDataset};

/// A parsed SPEC (see the module doc).
#[derive(Clone, Debug, PartialEq)]
pub enum SourceSpec {
    /// The built-in synthetic scenes.
    Synthetic(SyntheticConfig),
    /// WebDataset shards: paths or URLs, brace and glob patterns expanded.
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
    let (base, query) = split_options(spec);
    let looks_like_shards =
        base.contains(['{', ',']) || is_shard_name(base) || (is_glob(base) && !Path::new(base).is_dir());
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

/// A SPEC's path and its `?` options; a SPEC ending in a shard extension is all path (its `?` is
/// the glob wildcard).
fn split_options(spec: &str) -> (&str, &str) {
    match spec.split_once('?') {
        Some(parts) if !is_shard_name(spec) => parts,
        _ => (spec, ""),
    }
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
    split_options(spec.trim()).0
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
        state.check(opts)?;
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
