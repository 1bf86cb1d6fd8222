//! Image-folder sources: a folder of images with a captions file (CSV or JSONL), and class
//! folders in the ImageNet layout (`DIR/<class>/<image>`) captioned from a template.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};

use super::image::{decode_image, list_images};
use super::reader::{IndexedSource, Skip};
use super::Sample;

/// Caption template of class folders: `{}` is replaced by the class (folder) name.
pub const CLASS_CAPTION_TEMPLATE: &str = "a photo of a {}.";

/// Names of the captions file looked for inside an image folder, in order.
pub const CAPTION_FILES: [&str; 2] = ["captions.csv", "captions.jsonl"];

/// Accepted names (lower case) of the image-path column / field of a captions file.
const FILE_COLUMNS: [&str; 4] = ["file", "filename", "image", "path"];

/// Accepted names of the caption column / field.
const CAPTION_COLUMNS: [&str; 2] = ["caption", "text"];

/// Accepted names of the optional integer class column / field (stored as the `"cls"` label).
const CLASS_COLUMNS: [&str; 2] = ["cls", "label"];

/// The first of [`CAPTION_FILES`] present in `dir`.
pub fn find_captions_file(dir: &Path) -> Option<PathBuf> {
    CAPTION_FILES.iter().map(|name| dir.join(name)).find(|path| path.is_file())
}

/// Whether `dir` has a (non-hidden) sub-folder that holds images directly.
pub fn has_class_folders(dir: &Path) -> Result<bool> {
    for class_dir in sub_folders(dir)? {
        if !list_images(&class_dir)?.is_empty() {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Why `dir` holds no class folders whose images carry labels, as a phrase naming it (`'DIR' is
/// empty: ...`, `'DIR' holds N images but no class sub-folders, ...`, `no sub-folder of 'DIR' holds
/// images`); `None` when it is no directory or has class folders ([`has_class_folders`]).
pub fn missing_class_folders(dir: &Path) -> Result<Option<String>> {
    if !dir.is_dir() || has_class_folders(dir)? {
        return Ok(None);
    }
    let images = list_images(dir)?.len();
    let shown = dir.display();
    Ok(Some(match (images, sub_folders(dir)?.is_empty()) {
        (0, true) => format!("'{shown}' is empty: no class sub-folders, no images"),
        (0, false) => no_class_images(dir),
        (n, _) => format!("'{shown}' holds {n} images but no class sub-folders, so its images carry no labels"),
    }))
}

/// The message for class folders without a single image directly in them.
fn no_class_images(dir: &Path) -> String {
    format!("no sub-folder of '{}' holds images directly (expected {}/<class>/<image>)", dir.display(), dir.display())
}

/// A folder of images with a captions file mapping image paths (relative to the folder, `/`
/// separated) to captions and optional `"cls"` labels.
///
/// The samples are the images found anywhere under the folder together with the paths the
/// captions file names, sorted by path; the key is the path without its extension. An image with
/// no (or a blank) caption is [`Skip::NoCaption`]; a named path that cannot be read or decoded is
/// [`Skip::Corrupt`].
///
/// CSV: a header row naming a path column (`file`, `filename`, `image` or `path`), a caption
/// column (`caption` or `text`) and optionally `cls` / `label`; fields may be quoted (`""`
/// escapes a quote). JSONL: one object per line with the same field names.
#[derive(Clone, Debug)]
pub struct CaptionFolder {
    dir: PathBuf,
    images: Vec<(String, Option<CaptionRow>)>,
}

/// One row of a captions file.
#[derive(Clone, Debug, PartialEq)]
struct CaptionRow {
    caption: String,
    cls: Option<i64>,
}

impl CaptionFolder {
    /// Lists `dir` and reads `captions`; an unreadable folder or a malformed captions file is a
    /// one-line error naming it (and the line).
    pub fn open(dir: &Path, captions: &Path) -> Result<Self> {
        let mut rows = read_captions(captions)?;
        let found = walk_images(dir)?;
        let paths: BTreeSet<String> = found.into_iter().chain(rows.keys().cloned()).collect();
        let images = paths.into_iter().map(|path| (path.clone(), rows.remove(&path))).collect();
        Ok(Self { dir: dir.to_path_buf(), images })
    }

    /// Number of samples (including those that will be skipped).
    pub fn len(&self) -> usize {
        self.images.len()
    }

    /// Whether there are no samples.
    pub fn is_empty(&self) -> bool {
        self.images.is_empty()
    }

    /// Reads and decodes sample `index` (`< len()`).
    pub fn get(&self, index: usize) -> Result<Sample, Skip> {
        let (path, row) = &self.images[index];
        let row = row.as_ref().filter(|r| !r.caption.trim().is_empty()).ok_or(Skip::NoCaption)?;
        let image = read_image(&self.dir.join(path))?;
        let labels = row.cls.map(|cls| ("cls".to_string(), cls)).into_iter().collect();
        Ok(Sample { key: strip_extension(path).to_string(), image, caption: row.caption.clone(), labels })
    }
}

impl IndexedSource for CaptionFolder {
    fn len(&self) -> usize {
        self.len()
    }

    fn get(&self, index: usize) -> Result<Sample, Skip> {
        self.get(index)
    }
}

/// Class folders in the ImageNet layout: every non-hidden sub-folder of the root is a class
/// (label `"cls"` = its index in name order), its images (searched recursively) its samples.
/// The caption is the template with `{}` replaced by the class name; the key is
/// `<class>/<path without extension>`. An undecodable image is [`Skip::Corrupt`].
#[derive(Clone, Debug)]
pub struct ClassFolder {
    dir: PathBuf,
    classes: Vec<String>,
    images: Vec<(String, usize)>,
    template: String,
}

impl ClassFolder {
    /// Lists the classes and images under `dir`; an unreadable folder is an error naming it.
    pub fn open(dir: &Path, template: &str) -> Result<Self> {
        let mut classes = Vec::new();
        let mut images = Vec::new();
        for class_dir in sub_folders(dir)? {
            let name = class_dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            for path in walk_images(&class_dir)? {
                images.push((format!("{name}/{path}"), classes.len()));
            }
            classes.push(name);
        }
        Ok(Self { dir: dir.to_path_buf(), classes, images, template: template.to_string() })
    }

    /// [`ClassFolder::open`], and an error naming `dir` when not one image was found.
    pub fn open_labelled(dir: &Path, template: &str) -> Result<Self> {
        let folder = Self::open(dir, template)?;
        if folder.is_empty() {
            bail!(no_class_images(dir));
        }
        Ok(folder)
    }

    /// The class names, in label order.
    pub fn classes(&self) -> &[String] {
        &self.classes
    }

    /// Number of samples.
    pub fn len(&self) -> usize {
        self.images.len()
    }

    /// Whether there are no samples.
    pub fn is_empty(&self) -> bool {
        self.images.is_empty()
    }

    /// Reads and decodes sample `index` (`< len()`).
    pub fn get(&self, index: usize) -> Result<Sample, Skip> {
        let (path, class) = &self.images[index];
        let image = read_image(&self.dir.join(path))?;
        let caption = self.template.replace("{}", &self.classes[*class]);
        let labels = [("cls".to_string(), *class as i64)].into_iter().collect();
        Ok(Sample { key: strip_extension(path).to_string(), image, caption, labels })
    }
}

impl IndexedSource for ClassFolder {
    fn len(&self) -> usize {
        self.len()
    }

    fn get(&self, index: usize) -> Result<Sample, Skip> {
        self.get(index)
    }
}

/// Reads and decodes an image file; any failure is [`Skip::Corrupt`].
fn read_image(path: &Path) -> Result<::image::RgbImage, Skip> {
    let bytes = fs::read(path).map_err(|_| Skip::Corrupt)?;
    decode_image(&bytes).ok_or(Skip::Corrupt)
}

/// `path` without the extension of its file name.
fn strip_extension(path: &str) -> &str {
    let base_start = path.rfind('/').map_or(0, |i| i + 1);
    match path[base_start..].rfind('.').filter(|&d| d > 0) {
        Some(dot) => &path[..base_start + dot],
        None => path,
    }
}

/// The non-hidden sub-folders of `dir`, sorted.
fn sub_folders(dir: &Path) -> Result<Vec<PathBuf>> {
    let fail = |e: std::io::Error| anyhow!("cannot list directory '{}': {e}", dir.display());
    let mut folders = Vec::new();
    for entry in fs::read_dir(dir).map_err(fail)? {
        let path = entry.map_err(fail)?.path();
        let hidden = path.file_name().is_some_and(|n| n.to_string_lossy().starts_with('.'));
        if path.is_dir() && !hidden {
            folders.push(path);
        }
    }
    folders.sort();
    Ok(folders)
}

/// The images under `dir` (recursively, hidden folders skipped) as sorted `/`-separated paths
/// relative to it.
fn walk_images(dir: &Path) -> Result<Vec<String>> {
    let mut out = Vec::new();
    walk_into(dir, "", &mut out)?;
    out.sort();
    Ok(out)
}

/// Appends the images under `dir` to `out`, each prefixed with `prefix`.
fn walk_into(dir: &Path, prefix: &str, out: &mut Vec<String>) -> Result<()> {
    for image in list_images(dir)? {
        let hidden = image.file_name().is_some_and(|n| n.to_string_lossy().starts_with('.'));
        if let (Some(name), false) = (image.file_name(), hidden) {
            out.push(format!("{prefix}{}", name.to_string_lossy()));
        }
    }
    for sub in sub_folders(dir)? {
        let name = sub.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        walk_into(&sub, &format!("{prefix}{name}/"), out)?;
    }
    Ok(())
}

/// Reads a captions file (`.csv` or `.jsonl`) into rows by normalised relative path.
fn read_captions(path: &Path) -> Result<BTreeMap<String, CaptionRow>> {
    let text = fs::read_to_string(path).map_err(|e| anyhow!("cannot read captions file '{}': {e}", path.display()))?;
    let extension = path.extension().map(|e| e.to_string_lossy().to_ascii_lowercase()).unwrap_or_default();
    let rows = match extension.as_str() {
        "csv" => csv_rows(&text),
        "jsonl" => jsonl_rows(&text),
        _ => bail!("captions file '{}' must end in .csv or .jsonl", path.display()),
    };
    rows.with_context(|| format!("bad captions file '{}'", path.display()))
}

/// Rows of a CSV captions file.
fn csv_rows(text: &str) -> Result<BTreeMap<String, CaptionRow>> {
    let records = parse_csv(text)?;
    let Some((header, body)) = records.split_first() else { bail!("no header row") };
    let column = |names: &[&str]| header.iter().position(|h| names.contains(&h.trim().to_ascii_lowercase().as_str()));
    let file = column(&FILE_COLUMNS).ok_or_else(|| anyhow!("no path column ({})", FILE_COLUMNS.join(", ")))?;
    let caption =
        column(&CAPTION_COLUMNS).ok_or_else(|| anyhow!("no caption column ({})", CAPTION_COLUMNS.join(", ")))?;
    let cls = column(&CLASS_COLUMNS);
    let mut rows = BTreeMap::new();
    for (i, record) in body.iter().enumerate() {
        let field = |c: usize| record.get(c).map_or("", String::as_str);
        let cls = cls.map(|c| field(c).trim()).filter(|v| !v.is_empty()).map(str::parse::<i64>).transpose();
        let cls = cls.with_context(|| format!("record {}: class is not an integer", i + 2))?;
        rows.insert(normalise_path(field(file)), CaptionRow { caption: field(caption).to_string(), cls });
    }
    Ok(rows)
}

/// Records of RFC 4180 CSV text (quoted fields may hold commas, quotes as `""`, and line breaks);
/// blank lines are skipped.
fn parse_csv(text: &str) -> Result<Vec<Vec<String>>> {
    let mut records = Vec::new();
    let (mut record, mut field) = (Vec::new(), String::new());
    let mut chars = text.chars().peekable();
    let mut quoted = false;
    while let Some(c) = chars.next() {
        match (quoted, c) {
            (true, '"') if chars.peek() == Some(&'"') => {
                chars.next();
                field.push('"');
            }
            (true, '"') => quoted = false,
            (true, _) => field.push(c),
            (false, '"') if field.is_empty() => quoted = true,
            (false, ',') => record.push(std::mem::take(&mut field)),
            (false, '\r') if chars.peek() == Some(&'\n') => {}
            (false, '\n') => end_record(&mut records, &mut record, &mut field),
            (false, _) => field.push(c),
        }
    }
    if quoted {
        bail!("unterminated quoted field");
    }
    end_record(&mut records, &mut record, &mut field);
    Ok(records)
}

/// Closes the current CSV record (dropping blank lines).
fn end_record(records: &mut Vec<Vec<String>>, record: &mut Vec<String>, field: &mut String) {
    record.push(std::mem::take(field));
    let record = std::mem::take(record);
    if !(record.len() == 1 && record[0].trim().is_empty()) {
        records.push(record);
    }
}

/// Rows of a JSONL captions file.
fn jsonl_rows(text: &str) -> Result<BTreeMap<String, CaptionRow>> {
    let mut rows = BTreeMap::new();
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let value: serde_json::Value = serde_json::from_str(line).with_context(|| format!("line {}", i + 1))?;
        let field = |names: &[&str]| names.iter().find_map(|n| value.get(n));
        let file = field(&FILE_COLUMNS).and_then(|v| v.as_str());
        let file = file.ok_or_else(|| anyhow!("line {}: no path field ({})", i + 1, FILE_COLUMNS.join(", ")))?;
        let caption = field(&CAPTION_COLUMNS).and_then(|v| v.as_str()).unwrap_or_default().to_string();
        let cls = match field(&CLASS_COLUMNS) {
            None | Some(serde_json::Value::Null) => None,
            Some(v) => Some(v.as_i64().ok_or_else(|| anyhow!("line {}: class is not an integer", i + 1))?),
        };
        rows.insert(normalise_path(file), CaptionRow { caption, cls });
    }
    Ok(rows)
}

/// A captions-file path as a `/`-separated path relative to the folder.
fn normalise_path(path: &str) -> String {
    let path = path.trim().replace('\\', "/");
    path.trim_start_matches("./").to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_handles_quotes_commas_and_line_breaks() {
        let text = "file,caption\r\na.png,\"a cat, \"\"sitting\"\"\non a mat\"\n\nb.png,plain\n";
        let records = parse_csv(text).unwrap();
        assert_eq!(
            records,
            [vec!["file", "caption"], vec!["a.png", "a cat, \"sitting\"\non a mat"], vec!["b.png", "plain"]]
        );
        assert!(parse_csv("a,\"open\n").is_err());
    }

    #[test]
    fn extensions_are_stripped_from_the_file_name_only() {
        assert_eq!(strip_extension("a.b/c.png"), "a.b/c");
        assert_eq!(strip_extension("dir/noext"), "dir/noext");
        assert_eq!(strip_extension(".hidden"), ".hidden");
    }
}
