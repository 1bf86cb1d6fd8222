//! The training run's metrics: one JSON object per logged step in `metrics.jsonl` (what the plots
//! and tests read) and the same scalars as TensorBoard event files, written natively: TFRecord
//! framing with masked CRC32C checksums around hand-encoded `Event` protobufs.
use anyhow::{ensure, Context, Result};
use serde_json::{Map, Value};
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

/// The JSONL log's file name inside a run directory.
pub const METRICS_FILE: &str = "metrics.jsonl";
/// The folder inside a run directory that holds the TensorBoard event files.
pub const TENSORBOARD_DIR: &str = "tensorboard";

/// Everything a run records per step, in its run directory: `metrics.jsonl` and TensorBoard events.
pub struct MetricsLog {
    jsonl: BufWriter<File>,
    events: EventWriter,
}

impl MetricsLog {
    /// Opens `run_dir/metrics.jsonl` for appending and a new TensorBoard event file in
    /// `run_dir/tensorboard`. On resume, the lines logged after `resume_from_step` are dropped
    /// first (the file is rewritten atomically), so the resumed run logs no step twice.
    pub fn open(run_dir: &Path, resume_from_step: Option<u64>) -> Result<Self> {
        std::fs::create_dir_all(run_dir).with_context(|| format!("cannot create folder '{}'", run_dir.display()))?;
        let path = run_dir.join(METRICS_FILE);
        if let (Some(step), true) = (resume_from_step, path.exists()) {
            keep_steps_up_to(&path, step)?;
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("cannot open '{}'", path.display()))?;
        Ok(Self { jsonl: BufWriter::new(file), events: EventWriter::create(&run_dir.join(TENSORBOARD_DIR))? })
    }

    /// Records `scalars` at `step`: one JSON line `{"step": N, "<key>": value, ...}` in the given
    /// order (non-finite values as `null`) and one TensorBoard scalar per key, tagged with the key.
    pub fn log(&mut self, step: u64, scalars: &[(&str, f64)]) -> Result<()> {
        let mut line = Map::new();
        line.insert("step".into(), step.into());
        for &(key, value) in scalars {
            ensure!(key != "step", "a metric cannot be called 'step'");
            line.insert(key.into(), serde_json::Number::from_f64(value).map_or(Value::Null, Value::Number));
        }
        writeln!(self.jsonl, "{}", Value::Object(line)).context("cannot write metrics.jsonl")?;
        let wall_time = unix_time();
        for &(key, value) in scalars {
            self.events.add_scalar(key, value as f32, step as i64, wall_time)?;
        }
        Ok(())
    }

    /// Writes everything logged so far to disk.
    pub fn flush(&mut self) -> Result<()> {
        self.jsonl.flush().context("cannot write metrics.jsonl")?;
        self.events.flush()
    }
}

/// Reads a JSONL file into one map per non-empty line; a malformed line is an error naming the
/// file and the line number.
pub fn read_jsonl(path: &Path) -> Result<Vec<Map<String, Value>>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read '{}'", path.display()))?;
    let lines = text.lines().enumerate().filter(|(_, line)| !line.trim().is_empty());
    lines.map(|(i, line)| parse_line(path, i + 1, line)).collect()
}

/// One JSONL line as a JSON object.
fn parse_line(path: &Path, line_no: usize, line: &str) -> Result<Map<String, Value>> {
    serde_json::from_str(line).map_err(|e| anyhow::anyhow!("'{}' line {line_no}: {e}", path.display()))
}

/// Rewrites the JSONL log at `path` without the lines whose `step` is greater than `step`; a last
/// line torn by a crash (no newline, not JSON) is dropped too.
fn keep_steps_up_to(path: &Path, step: u64) -> Result<()> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read '{}'", path.display()))?;
    let mut lines: Vec<&str> = text.lines().collect();
    if !text.ends_with('\n') && lines.last().is_some_and(|l| serde_json::from_str::<Value>(l).is_err()) {
        lines.pop();
    }
    let mut kept = String::new();
    for (i, line) in lines.iter().enumerate().filter(|(_, line)| !line.trim().is_empty()) {
        let object = parse_line(path, i + 1, line)?;
        let line_step = object.get("step").and_then(Value::as_u64);
        let line_step = line_step.with_context(|| format!("'{}' line {}: no integer 'step'", path.display(), i + 1))?;
        if line_step <= step {
            kept.push_str(line);
            kept.push('\n');
        }
    }
    crate::io::write_atomic(path, kept.as_bytes())
}

/// Seconds since the Unix epoch, as TensorBoard's `wall_time`.
fn unix_time() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

/// This machine's host name for event file names (`localhost` when unknown), limited to
/// characters safe in a file name.
fn hostname() -> String {
    let name = ["/proc/sys/kernel/hostname", "/etc/hostname"]
        .iter()
        .find_map(|p| std::fs::read_to_string(p).ok().map(|s| s.trim().to_string()).filter(|s| !s.is_empty()))
        .unwrap_or_else(|| "localhost".into());
    name.chars().map(|c| if c.is_ascii_alphanumeric() || "-_.".contains(c) { c } else { '_' }).collect()
}

/// A TensorBoard event file writer: TFRecord records of `Event` protobufs.
pub struct EventWriter {
    file: BufWriter<File>,
    path: PathBuf,
}

impl EventWriter {
    /// Creates `dir/events.out.tfevents.<unix_secs>.<hostname>` (appending, should that file
    /// already exist) and writes the leading `file_version` event.
    pub fn create(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create folder '{}'", dir.display()))?;
        let now = unix_time();
        let path = dir.join(format!("events.out.tfevents.{}.{}", now as u64, hostname()));
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("cannot open '{}'", path.display()))?;
        let mut writer = Self { file: BufWriter::new(file), path };
        let mut event = Vec::new();
        put_double(&mut event, 1, now);
        put_bytes(&mut event, 3, b"brain.Event:2");
        writer.write_record(&event)?;
        Ok(writer)
    }

    /// Appends one scalar event: `Event { wall_time, step, summary { value { tag, simple_value } } }`.
    pub fn add_scalar(&mut self, tag: &str, value: f32, step: i64, wall_time: f64) -> Result<()> {
        let mut summary_value = Vec::new();
        put_bytes(&mut summary_value, 1, tag.as_bytes());
        put_key(&mut summary_value, 2, WIRE_FIXED32);
        summary_value.extend_from_slice(&value.to_le_bytes());
        let mut summary = Vec::new();
        put_bytes(&mut summary, 1, &summary_value);
        let mut event = Vec::new();
        put_double(&mut event, 1, wall_time);
        put_key(&mut event, 2, WIRE_VARINT);
        put_varint(&mut event, step as u64);
        put_bytes(&mut event, 5, &summary);
        self.write_record(&event)
    }

    /// Writes the buffered events to disk.
    pub fn flush(&mut self) -> Result<()> {
        self.file.flush().with_context(|| format!("cannot write '{}'", self.path.display()))
    }

    /// One TFRecord: length, masked CRC of the length, data, masked CRC of the data.
    fn write_record(&mut self, data: &[u8]) -> Result<()> {
        let len = (data.len() as u64).to_le_bytes();
        let mut record = Vec::with_capacity(data.len() + 16);
        record.extend_from_slice(&len);
        record.extend_from_slice(&masked_crc32c(&len).to_le_bytes());
        record.extend_from_slice(data);
        record.extend_from_slice(&masked_crc32c(data).to_le_bytes());
        self.file.write_all(&record).with_context(|| format!("cannot write '{}'", self.path.display()))
    }
}

/// TFRecord's checksum: the Castagnoli CRC, rotated and offset.
fn masked_crc32c(bytes: &[u8]) -> u32 {
    let crc = crc32c::crc32c(bytes);
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

/// Protobuf wire types used by `Event`.
const WIRE_VARINT: u8 = 0;
const WIRE_FIXED64: u8 = 1;
const WIRE_LEN: u8 = 2;
const WIRE_FIXED32: u8 = 5;

/// A protobuf base-128 varint.
fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push(value as u8 | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

/// A protobuf field key.
fn put_key(out: &mut Vec<u8>, field: u32, wire: u8) {
    put_varint(out, u64::from(field) << 3 | u64::from(wire));
}

/// A `double` field.
fn put_double(out: &mut Vec<u8>, field: u32, value: f64) {
    put_key(out, field, WIRE_FIXED64);
    out.extend_from_slice(&value.to_le_bytes());
}

/// A length-delimited field (string, bytes or embedded message).
fn put_bytes(out: &mut Vec<u8>, field: u32, bytes: &[u8]) {
    put_key(out, field, WIRE_LEN);
    put_varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_matches_the_standard_check_value() {
        assert_eq!(crc32c::crc32c(b"123456789"), 0xE306_9283);
    }

    #[test]
    fn varints_encode_in_base_128() {
        let mut out = Vec::new();
        put_varint(&mut out, 300);
        assert_eq!(out, [0xac, 0x02]);
    }
}
