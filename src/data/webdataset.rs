//! WebDataset tar shards as img2dataset writes them: members `KEY.jpg|jpeg|png|webp` + `KEY.txt`,
//! optionally `KEY.cls` and `KEY.json`, grouped by key in archive order. Shards are local files
//! (`.tar`, or gzip-compressed `.tar.gz` / `.tgz`) or `http(s)://` URLs streamed without a full
//! download. [`ShardWriter`] writes such shards deterministically.
//!
//! Reading is driven by [`super::stream`], which splits the shards over ranks and workers,
//! shuffles them and counts skipped samples.

use std::collections::{BTreeMap, HashSet};
use std::fs::{self, File};
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::image::{decode_image, encode_png};
use super::reader::{EpochOrder, Reader, ReaderPlan, Skip};
use super::Sample;
use anyhow::{anyhow, bail, Context, Result};

/// Integer labels by label set, as in [`Sample::labels`].
type Labels = BTreeMap<String, i64>;

/// Member extensions (lower case) that hold the image, in order of preference.
const IMAGE_MEMBERS: [&str; 4] = ["png", "jpg", "jpeg", "webp"];

/// Seconds to wait for an HTTP shard server to accept the connection.
const HTTP_CONNECT_TIMEOUT_S: u64 = 30;

/// Seconds an HTTP shard read may stall before it fails.
const HTTP_READ_TIMEOUT_S: u64 = 120;

/// Bytes buffered between a shard's file or socket and the tar reader.
const READ_BUFFER_BYTES: usize = 1 << 16;

/// Whether a shard location is an `http://` or `https://` URL.
pub fn is_url(location: &str) -> bool {
    location.starts_with("http://") || location.starts_with("https://")
}

/// Expands a comma-separated list of shard locations, each with optional brace patterns
/// (see [`expand_braces`]) and then, for local paths, glob patterns (see [`expand_glob`]); commas
/// inside braces belong to the pattern. One item's expansion keeps each path once.
pub fn expand_shard_list(list: &str) -> Result<Vec<String>> {
    let mut shards = Vec::new();
    for item in split_top_level(list)? {
        if item.trim().is_empty() {
            bail!("empty shard name in '{list}'");
        }
        let mut seen = HashSet::new();
        for location in expand_braces(item.trim())? {
            shards.extend(expand_glob(&location)?.into_iter().filter(|path| seen.insert(path.clone())));
        }
    }
    Ok(shards)
}

/// Whether a location is a local glob pattern (`*`, `?`, `[...]`; URLs are never globbed).
pub fn is_glob(location: &str) -> bool {
    !is_url(location) && location.contains(['*', '?', '['])
}

/// The files a local glob pattern matches (`*` and `?` within a name, `[abc]` / `[!abc]` / `[a-z]`
/// a character class, `**` any number of folders), sorted by path; a pattern that matches no file
/// is a one-line error naming it. A location that is not a glob is returned as it is.
pub fn expand_glob(location: &str) -> Result<Vec<String>> {
    if !is_glob(location) {
        return Ok(vec![location.to_string()]);
    }
    let bad = |e: &dyn std::fmt::Display| anyhow!("bad glob pattern '{location}': {e}");
    let mut files = Vec::new();
    for entry in glob::glob(location).map_err(|e| bad(&e))? {
        let path = entry.map_err(|e| bad(&e))?;
        if path.is_file() {
            files.push(path.to_string_lossy().into_owned());
        }
    }
    if files.is_empty() {
        bail!("no shard file matches the glob pattern '{location}'");
    }
    files.sort();
    Ok(files)
}

/// Brace expansion as the `braceexpand` package does it for WebDataset: `{000..099}` is a numeric
/// range (zero-padded to the wider bound when either bound has a leading zero; a backwards range such
/// as `{5..1}` is an error rather than a descending list), `{a,b,c}` lists alternatives (which may
/// nest), several braces give every combination in order.
pub fn expand_braces(pattern: &str) -> Result<Vec<String>> {
    let Some(open) = pattern.find('{') else {
        if pattern.contains('}') {
            bail!("unbalanced '}}' in shard pattern '{pattern}'");
        }
        return Ok(vec![pattern.to_string()]);
    };
    let close = matching_brace(pattern, open).ok_or_else(|| anyhow!("unbalanced '{{' in shard pattern '{pattern}'"))?;
    let (prefix, body, rest) = (&pattern[..open], &pattern[open + 1..close], &pattern[close + 1..]);
    let alternatives = match numeric_range(body) {
        Some(range) => range.with_context(|| format!("bad range '{{{body}}}' in shard pattern '{pattern}'"))?,
        None => brace_alternatives(body, pattern)?,
    };
    let tails = expand_braces(rest)?;
    Ok(alternatives.iter().flat_map(|alt| tails.iter().map(move |tail| format!("{prefix}{alt}{tail}"))).collect())
}

/// Splits `list` at the commas outside braces.
fn split_top_level(list: &str) -> Result<Vec<&str>> {
    let mut items = Vec::new();
    let (mut depth, mut start) = (0usize, 0usize);
    for (i, c) in list.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth = depth.checked_sub(1).ok_or_else(|| anyhow!("unbalanced '}}' in shard list '{list}'"))?,
            ',' if depth == 0 => {
                items.push(&list[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if depth != 0 {
        bail!("unbalanced '{{' in shard list '{list}'");
    }
    items.push(&list[start..]);
    Ok(items)
}

/// Byte index of the `}` closing the `{` at `open`.
fn matching_brace(text: &str, open: usize) -> Option<usize> {
    let mut depth = 0usize;
    for (i, c) in text[open..].char_indices() {
        match c {
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    return Some(open + i);
                }
            }
            _ => {}
        }
    }
    None
}

/// `a..b` with decimal bounds as zero-padded numbers; `None` when `body` is not of that form.
fn numeric_range(body: &str) -> Option<Result<Vec<String>>> {
    let (first, last) = body.split_once("..")?;
    let is_number = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !is_number(first) || !is_number(last) {
        return None;
    }
    let parse = |s: &str| s.parse::<u64>().map_err(|e| anyhow!("{e}"));
    Some((|| {
        let (a, b) = (parse(first)?, parse(last)?);
        let padded = |s: &str| s.len() > 1 && s.starts_with('0');
        let width = if padded(first) || padded(last) { first.len().max(last.len()) } else { 0 };
        if a > b {
            bail!("the range runs backwards ({first} > {last}); write {{{last}..{first}}}");
        }
        let values: Vec<u64> = (a..=b).collect();
        Ok(values.into_iter().map(|v| format!("{v:0width$}")).collect())
    })())
}

/// The comma-separated alternatives of a brace body, each expanded in turn.
fn brace_alternatives(body: &str, pattern: &str) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for alt in split_top_level(body).with_context(|| format!("in shard pattern '{pattern}'"))? {
        out.extend(expand_braces(alt)?);
    }
    Ok(out)
}

/// A list of WebDataset shards read as one source.
#[derive(Clone, Debug)]
pub struct WebDataset {
    shards: Vec<String>,
}

impl WebDataset {
    /// A source over `shards` (paths or URLs). Every local shard must be a readable file: the
    /// first one that is not is a one-line error naming it. URLs are checked when read.
    pub fn new(shards: Vec<String>) -> Result<Self> {
        if shards.is_empty() {
            bail!("no WebDataset shards given");
        }
        for shard in shards.iter().filter(|s| !is_url(s)) {
            let meta = fs::metadata(shard).map_err(|e| anyhow!("cannot open shard '{shard}': {e}"))?;
            if !meta.is_file() {
                bail!("cannot open shard '{shard}': not a file");
            }
        }
        Ok(Self { shards })
    }

    /// The shard locations, in the order given.
    pub fn shards(&self) -> &[String] {
        &self.shards
    }

    /// The shards `reader` reads this epoch (indices into [`Self::shards`]) and whether it keeps
    /// only every `count`-th sample of each: with at least as many shards as readers, the
    /// epoch's shard order is dealt round-robin; otherwise every reader reads every shard and keeps
    /// the samples whose index within the shard is its own modulo the reader count.
    fn assignment(&self, reader: Reader, order: &EpochOrder) -> (Vec<usize>, bool) {
        let shard_order = order.permutation(self.shards.len());
        if self.shards.len() >= reader.count {
            (shard_order.into_iter().skip(reader.index).step_by(reader.count).collect(), false)
        } else {
            (shard_order, true)
        }
    }
}

impl ReaderPlan for WebDataset {
    type Record = RawSample;

    fn for_each_record(
        &self,
        reader: Reader,
        order: &EpochOrder,
        visit: &mut dyn FnMut(RawSample) -> Result<()>,
    ) -> Result<()> {
        let (shards, split_samples) = self.assignment(reader, order);
        let owns = |index: usize| !split_samples || reader.owns(index);
        for shard in shards {
            read_shard(&self.shards[shard], &owns, visit)?;
        }
        Ok(())
    }

    fn decode(&self, record: RawSample) -> Result<Sample, Skip> {
        record.decode()
    }
}

/// The undecoded members of one WebDataset sample.
#[derive(Debug)]
pub(crate) struct RawSample {
    key: String,
    /// (extension, bytes) in archive order.
    members: Vec<(String, Vec<u8>)>,
}

impl RawSample {
    /// The bytes of the first member with extension `ext`.
    fn member(&self, ext: &str) -> Option<&[u8]> {
        self.members.iter().find(|(e, _)| e == ext).map(|(_, bytes)| bytes.as_slice())
    }

    /// Decodes the sample: no usable `.txt` is [`Skip::NoCaption`]; a missing or undecodable
    /// image, a caption that is not UTF-8, or a malformed `.cls` / `.json` is [`Skip::Corrupt`].
    /// Labels come from the `.json`'s `"labels"` object when it has one, else `.cls` is `"cls"`.
    fn decode(self) -> Result<Sample, Skip> {
        let caption = self.caption()?;
        let bytes = IMAGE_MEMBERS.iter().find_map(|ext| self.member(ext)).ok_or(Skip::Corrupt)?;
        let image = decode_image(bytes).ok_or(Skip::Corrupt)?;
        let labels = self.labels()?;
        Ok(Sample { key: self.key, image, caption, labels })
    }

    /// The `.txt` member without trailing line breaks; missing or blank is no caption.
    fn caption(&self) -> Result<String, Skip> {
        let bytes = self.member("txt").ok_or(Skip::NoCaption)?;
        let text = std::str::from_utf8(bytes).map_err(|_| Skip::Corrupt)?.trim_end_matches(['\r', '\n']);
        if text.trim().is_empty() {
            return Err(Skip::NoCaption);
        }
        Ok(text.to_string())
    }

    /// Labels from `.json` `"labels"`, else from `.cls`.
    fn labels(&self) -> Result<Labels, Skip> {
        if let Some(labels) = self.member("json").map(json_labels).transpose()?.flatten() {
            return Ok(labels);
        }
        let mut labels = Labels::new();
        if let Some(bytes) = self.member("cls") {
            let text = std::str::from_utf8(bytes).map_err(|_| Skip::Corrupt)?;
            labels.insert("cls".to_string(), text.trim().parse().map_err(|_| Skip::Corrupt)?);
        }
        Ok(labels)
    }
}

/// The integer `"labels"` object of a `.json` member, `None` when it has none.
fn json_labels(bytes: &[u8]) -> Result<Option<Labels>, Skip> {
    let value: serde_json::Value = serde_json::from_slice(bytes).map_err(|_| Skip::Corrupt)?;
    let Some(labels) = value.get("labels") else { return Ok(None) };
    let object = labels.as_object().ok_or(Skip::Corrupt)?;
    object
        .iter()
        .map(|(name, v)| Ok((name.clone(), v.as_i64().ok_or(Skip::Corrupt)?)))
        .collect::<Result<_, _>>()
        .map(Some)
}

/// Splits a member name into (key, lower-case extension) at the first `.` of its file name;
/// `None` for names without one and hidden files.
fn split_member(name: &str) -> Option<(&str, String)> {
    let base_start = name.rfind('/').map_or(0, |i| i + 1);
    let dot = name[base_start..].find('.').filter(|&d| d > 0)? + base_start;
    Some((&name[..dot], name[dot + 1..].to_ascii_lowercase()))
}

/// Reads one shard, grouping consecutive members by key, and passes the samples whose index
/// within the shard satisfies `owns` to `visit` (the others' bytes are not kept).
fn read_shard(
    location: &str,
    owns: &dyn Fn(usize) -> bool,
    visit: &mut dyn FnMut(RawSample) -> Result<()>,
) -> Result<()> {
    let fail = |e: std::io::Error| anyhow!("cannot read shard '{location}': {}", one_line(&e));
    let mut archive = tar::Archive::new(open_shard(location)?);
    let mut current: Option<(String, Option<RawSample>)> = None;
    let mut started = 0usize;
    for entry in archive.entries().map_err(fail)? {
        let mut entry = entry.map_err(fail)?;
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let name = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        let Some((key, ext)) = split_member(&name) else { continue };
        if current.as_ref().is_none_or(|(k, _)| k != key) {
            if let Some((_, Some(sample))) = current.take() {
                visit(sample)?;
            }
            let kept = owns(started).then(|| RawSample { key: key.to_string(), members: Vec::new() });
            current = Some((key.to_string(), kept));
            started += 1;
        }
        if let Some((_, Some(sample))) = current.as_mut() {
            let mut bytes = Vec::with_capacity(entry.size().min(1 << 26) as usize);
            entry.read_to_end(&mut bytes).map_err(fail)?;
            sample.members.push((ext, bytes));
        }
    }
    match current {
        Some((_, Some(sample))) => visit(sample),
        _ => Ok(()),
    }
}

/// Opens a shard for streaming: a local file or an HTTP(S) response body, gunzipped when the
/// name ends in `.gz` or `.tgz`.
fn open_shard(location: &str) -> Result<Box<dyn Read + Send>> {
    let raw: Box<dyn Read + Send> = if is_url(location) {
        Box::new(BufReader::with_capacity(READ_BUFFER_BYTES, fetch(location)?))
    } else {
        let file = File::open(location).map_err(|e| anyhow!("cannot open shard '{location}': {e}"))?;
        Box::new(BufReader::with_capacity(READ_BUFFER_BYTES, file))
    };
    let name = location.split(['?', '#']).next().unwrap_or(location);
    if name.ends_with(".gz") || name.ends_with(".tgz") {
        return Ok(Box::new(flate2::read::GzDecoder::new(raw)));
    }
    Ok(raw)
}

/// The body of a GET of `url`, as a stream.
fn fetch(url: &str) -> Result<Box<dyn Read + Send + Sync>> {
    let agent = ureq::AgentBuilder::new()
        .timeout_connect(Duration::from_secs(HTTP_CONNECT_TIMEOUT_S))
        .timeout_read(Duration::from_secs(HTTP_READ_TIMEOUT_S))
        .build();
    match agent.get(url).call() {
        Ok(response) => Ok(response.into_reader()),
        Err(ureq::Error::Status(code, response)) => {
            bail!("cannot fetch shard '{url}': HTTP {code} {}", one_line(&response.status_text()))
        }
        Err(e) => bail!("cannot fetch shard '{url}': {}", one_line(&e)),
    }
}

/// An error message on one line, without control characters.
fn one_line(e: &dyn std::fmt::Display) -> String {
    let text: String = e.to_string().chars().map(|c| if c.is_control() { ' ' } else { c }).collect();
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Writes samples as WebDataset shards `000000.tar`, `000001.tar`, … of `per_shard` samples each.
///
/// Each sample becomes the members `KEY.png` (lossless), `KEY.txt` (the caption), `KEY.cls` (the
/// `"cls"` label, else `"shape_color"`, when there is one) and `KEY.json` (`{"key", "caption",
/// "labels"}`), in that order. `KEY` is the sample key with the dots of its last path component
/// replaced by `_` (WebDataset splits member names at the first dot). Headers are fixed (mode
/// 0644, mtime 0, uid/gid 0), so the same samples give byte-identical shards. A shard is written
/// under a temporary name and renamed when complete.
pub struct ShardWriter {
    dir: PathBuf,
    per_shard: usize,
    current: Option<OpenShard>,
    written: Vec<PathBuf>,
}

/// The shard being filled.
struct OpenShard {
    builder: tar::Builder<BufWriter<File>>,
    temp: PathBuf,
    path: PathBuf,
    samples: usize,
}

impl ShardWriter {
    /// A writer into `dir` (created when missing), which must not already hold `.tar` files.
    pub fn new(dir: &Path, per_shard: usize) -> Result<Self> {
        if per_shard == 0 {
            bail!("samples per shard must be at least 1");
        }
        fs::create_dir_all(dir).with_context(|| format!("cannot create folder '{}'", dir.display()))?;
        let listing = fs::read_dir(dir).with_context(|| format!("cannot list folder '{}'", dir.display()))?;
        for entry in listing {
            let path = entry.with_context(|| format!("cannot list folder '{}'", dir.display()))?.path();
            if path.extension().is_some_and(|e| e == "tar") {
                bail!("'{}' already holds shards ('{}'); choose an empty folder", dir.display(), path.display());
            }
        }
        Ok(Self { dir: dir.to_path_buf(), per_shard, current: None, written: Vec::new() })
    }

    /// Appends one sample, starting a new shard when the current one is full.
    pub fn write(&mut self, sample: &Sample) -> Result<()> {
        let members = encode_members(sample)?;
        let shard = match self.current.take() {
            Some(shard) => shard,
            None => self.start_shard()?,
        };
        let shard = self.current.insert(shard);
        for (name, bytes) in &members {
            append_member(&mut shard.builder, name, bytes)
                .with_context(|| format!("cannot write shard '{}'", shard.path.display()))?;
        }
        shard.samples += 1;
        if shard.samples == self.per_shard {
            self.close_shard()?;
        }
        Ok(())
    }

    /// Completes the last shard and returns the paths of all shards written, in order.
    pub fn finish(mut self) -> Result<Vec<PathBuf>> {
        self.close_shard()?;
        Ok(std::mem::take(&mut self.written))
    }

    /// Opens the temporary file of the next shard.
    fn start_shard(&self) -> Result<OpenShard> {
        let name = format!("{:06}.tar", self.written.len());
        let path = self.dir.join(&name);
        let temp = self.dir.join(format!(".{name}.tmp{}", std::process::id()));
        let file = File::create(&temp).with_context(|| format!("cannot create '{}'", temp.display()))?;
        Ok(OpenShard { builder: tar::Builder::new(BufWriter::new(file)), temp, path, samples: 0 })
    }

    /// Finishes the open shard (if any) and renames it into place.
    fn close_shard(&mut self) -> Result<()> {
        let Some(shard) = self.current.take() else { return Ok(()) };
        let fail = || format!("cannot write shard '{}'", shard.path.display());
        let mut writer = shard.builder.into_inner().with_context(fail)?;
        writer.flush().with_context(fail)?;
        drop(writer);
        fs::rename(&shard.temp, &shard.path).with_context(fail)?;
        self.written.push(shard.path);
        Ok(())
    }
}

impl Drop for ShardWriter {
    /// Removes the temporary file of a shard left unfinished.
    fn drop(&mut self) {
        if let Some(shard) = self.current.take() {
            drop(shard.builder);
            let _ = fs::remove_file(&shard.temp);
        }
    }
}

/// The (member name, bytes) of one sample, in writing order.
fn encode_members(sample: &Sample) -> Result<Vec<(String, Vec<u8>)>> {
    let key = member_key(&sample.key)?;
    let png = encode_png(&sample.image).with_context(|| format!("cannot encode sample '{}' as PNG", sample.key))?;
    let mut members = vec![(format!("{key}.png"), png), (format!("{key}.txt"), sample.caption.clone().into_bytes())];
    if let Some(cls) = sample.labels.get("cls").or_else(|| sample.labels.get("shape_color")) {
        members.push((format!("{key}.cls"), cls.to_string().into_bytes()));
    }
    let json = serde_json::json!({ "key": sample.key, "caption": sample.caption, "labels": sample.labels });
    members.push((format!("{key}.json"), serde_json::to_vec(&json)?));
    Ok(members)
}

/// `key` with the dots of its last path component replaced by `_`.
fn member_key(key: &str) -> Result<String> {
    let base_start = key.rfind('/').map_or(0, |i| i + 1);
    if key[base_start..].is_empty() {
        bail!("cannot write sample with key '{key}': empty file name");
    }
    Ok(format!("{}{}", &key[..base_start], key[base_start..].replace('.', "_")))
}

/// Appends a regular file with fixed metadata.
fn append_member(builder: &mut tar::Builder<BufWriter<File>>, name: &str, bytes: &[u8]) -> std::io::Result<()> {
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(tar::EntryType::Regular);
    header.set_size(bytes.len() as u64);
    header.set_mode(0o644);
    header.set_mtime(0);
    header.set_uid(0);
    header.set_gid(0);
    builder.append_data(&mut header, name, bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn member_names_split_at_the_first_dot_of_the_file_name() {
        assert_eq!(split_member("dir.v1/000123.seg.PNG"), Some(("dir.v1/000123", "seg.png".to_string())));
        assert_eq!(split_member("000123.txt"), Some(("000123", "txt".to_string())));
        assert_eq!(split_member("dir/.hidden"), None);
        assert_eq!(split_member("noext"), None);
    }

    #[test]
    fn member_keys_lose_their_dots() {
        assert_eq!(member_key("a.b/c.d.e").unwrap(), "a.b/c_d_e");
        assert!(member_key("dir/").is_err());
    }
}
