//! Atomic, resumable checkpoints shared by every trainer (docs/design.md §4: the run state a resumed run needs —
//! student, teacher, heads, optimiser moments, centres — plus the trainer's JSON state).
//!
//! A checkpoint is the folder `run_dir/checkpoints/step-<step:08>/` holding `tensors.safetensors` (every
//! named tensor the trainer passes) and `state.json`. It is written in a temporary sibling folder, whose
//! files and folder are fsynced, then renamed into place and the parent fsynced: a crash at any point
//! leaves the earlier checkpoints intact and never a half-written folder under a final name.
//!
//! The header metadata of `tensors.safetensors` carries [`Checksums`] (CRC-32C) of every tensor and of
//! `state.json`, verified by [`load`], so a truncated, bit-flipped or incomplete checkpoint is detected;
//! [`load_newest_intact`] then falls back to the newest checkpoint that reads back intact.
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use tch::Tensor;

/// The tensors file of a checkpoint folder.
pub const TENSORS_FILE: &str = "tensors.safetensors";
/// The JSON state file of a checkpoint folder.
pub const STATE_FILE: &str = "state.json";
/// Name prefix of a checkpoint being written (ignored by `latest`, removed by the next `save`).
const TEMP_PREFIX: &str = ".tmp-";
/// Name prefix of a checkpoint being replaced by a new save of the same step.
const OLD_PREFIX: &str = ".old-";
/// Key of the [`Checksums`] (as JSON) in the tensors file's header metadata.
const CHECKSUMS_KEY: &str = "crc32c";

/// CRC-32C checksums of a checkpoint's contents. CRC-32C (Castagnoli) is the checksum storage systems
/// use against the same failure (iSCSI, ext4 metadata, TFRecord, cloud object stores): it catches every
/// error burst up to 32 bits and any other corruption but with odds 2^-32, runs on the CPU's CRC
/// instruction, and is already the crate's TensorBoard checksum. One per tensor lets a mismatch name
/// the tensor.
#[derive(Debug, Serialize, Deserialize)]
struct Checksums {
    /// Of each tensor: its dtype and shape, then its bytes.
    tensors: BTreeMap<String, u32>,
    /// Of the bytes of `state.json`.
    state: u32,
}

impl Checksums {
    /// The checksums of `tensors` and of the `state.json` bytes `state`.
    fn of<'a>(tensors: impl Iterator<Item = (&'a String, &'a Tensor)>, state: &[u8]) -> Self {
        Self { tensors: tensors.map(|(name, t)| (name.clone(), tensor_crc(t))).collect(), state: crc32c::crc32c(state) }
    }

    /// Checks `computed` (from the files of `dir` as read) against these stored checksums: the first
    /// difference is a one-line error naming the file (and tensor).
    fn verify(&self, computed: &Self, dir: &Path) -> Result<()> {
        if self.state != computed.state {
            bail!("checksum mismatch in '{}'", dir.join(STATE_FILE).display());
        }
        let tensors_path = dir.join(TENSORS_FILE);
        if !self.tensors.keys().eq(computed.tensors.keys()) {
            bail!("'{}' does not hold the tensors its checksums list", tensors_path.display());
        }
        match self.tensors.iter().find(|(name, crc)| computed.tensors[*name] != **crc) {
            Some((name, _)) => bail!("checksum mismatch in tensor '{name}' of '{}'", tensors_path.display()),
            None => Ok(()),
        }
    }
}

/// CRC-32C of a tensor's dtype and shape, then of its bytes.
fn tensor_crc(t: &Tensor) -> u32 {
    let layout = crc32c::crc32c(format!("{:?}{:?}", t.kind(), t.size()).as_bytes());
    crc32c::crc32c_append(layout, &crate::io::tensor_bytes(t))
}

/// The [`Checksums`] in the header metadata of the tensors file `path` (already read as a valid
/// safetensors file); `None` for a checkpoint written before checksums.
fn stored_checksums(path: &Path) -> Result<Option<Checksums>> {
    let bad = || format!("'{}': unreadable checkpoint header", path.display());
    let mut file = File::open(path).with_context(bad)?;
    let mut len = [0u8; 8];
    file.read_exact(&mut len).with_context(bad)?;
    let mut header = Vec::new();
    file.take(u64::from_le_bytes(len)).read_to_end(&mut header).with_context(bad)?;
    let header: serde_json::Value = serde_json::from_slice(&header).with_context(bad)?;
    match header["__metadata__"][CHECKSUMS_KEY].as_str() {
        Some(json) => Ok(Some(serde_json::from_str(json).with_context(bad)?)),
        None => Ok(None),
    }
}

/// `run_dir/checkpoints`.
fn checkpoints_dir(run_dir: &Path) -> PathBuf {
    run_dir.join("checkpoints")
}

/// The step of a final checkpoint folder name `step-<digits>`.
fn parse_step(name: &str) -> Option<u64> {
    let digits = name.strip_prefix("step-")?;
    digits.bytes().all(|b| b.is_ascii_digit()).then(|| digits.parse().ok()).flatten()
}

/// fsyncs a file or folder.
fn sync_path(path: &Path) -> Result<()> {
    File::open(path).and_then(|f| f.sync_all()).with_context(|| format!("cannot sync '{}' to disk", path.display()))
}

/// Removes a folder tree if it exists.
fn remove_dir_if_present(path: &Path) -> Result<()> {
    match std::fs::remove_dir_all(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("cannot remove '{}'", path.display()))
        }
        _ => Ok(()),
    }
}

/// A one-line error when two tensors share a name.
fn check_unique_names(tensors: &[(String, Tensor)]) -> Result<()> {
    let mut seen = HashSet::new();
    match tensors.iter().find(|(name, _)| !seen.insert(name.as_str())) {
        Some((name, _)) => bail!("checkpoint tensor name '{name}' is given twice"),
        None => Ok(()),
    }
}

/// Writes both files into `dir` and fsyncs them and `dir`.
fn write_contents(dir: &Path, tensors: &[(String, Tensor)], state: &serde_json::Value) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create folder '{}'", dir.display()))?;
    let json = serde_json::to_vec_pretty(state).context("cannot serialise the checkpoint state")?;
    let checksums = Checksums::of(tensors.iter().map(|(name, t)| (name, t)), &json);
    let checksums = serde_json::to_string(&checksums).context("cannot serialise the checkpoint checksums")?;
    let tensors_path = dir.join(TENSORS_FILE);
    crate::io::write_safetensors(&tensors_path, tensors, &[("format", "pt"), (CHECKSUMS_KEY, &checksums)])?;
    let state_path = dir.join(STATE_FILE);
    crate::io::write_atomic(&state_path, &json)?;
    sync_path(&tensors_path)?;
    sync_path(&state_path)?;
    sync_path(dir)
}

/// Renames the finished temporary folder to `target` (moving an existing checkpoint of the same step
/// aside first, since a folder cannot be renamed over a non-empty one) and fsyncs the parent.
fn publish(tmp: &Path, target: &Path, parent: &Path) -> Result<()> {
    let name = target.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let old = parent.join(format!("{OLD_PREFIX}{name}"));
    if target.exists() {
        remove_dir_if_present(&old)?;
        std::fs::rename(target, &old).with_context(|| format!("cannot move '{}' aside", target.display()))?;
    }
    std::fs::rename(tmp, target).with_context(|| format!("cannot rename '{}' into place", tmp.display()))?;
    sync_path(parent)?;
    remove_dir_if_present(&old)
}

/// The final checkpoint folders under `run_dir/checkpoints`, sorted by step.
fn list_checkpoints(run_dir: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let dir = checkpoints_dir(run_dir);
    let entries = match std::fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("cannot list '{}'", dir.display())),
    };
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry.with_context(|| format!("cannot list '{}'", dir.display()))?;
        let step = parse_step(&entry.file_name().to_string_lossy());
        if let Some(step) = step.filter(|_| entry.path().is_dir()) {
            out.push((step, entry.path()));
        }
    }
    out.sort();
    Ok(out)
}

/// Removes leftovers of interrupted saves (temporary and moved-aside folders).
fn remove_leftovers(dir: &Path) -> Result<()> {
    let entries = std::fs::read_dir(dir).with_context(|| format!("cannot list '{}'", dir.display()))?;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with(TEMP_PREFIX) || name.starts_with(OLD_PREFIX) {
            remove_dir_if_present(&entry.path())?;
        }
    }
    Ok(())
}

/// Saves checkpoint `step` of `run_dir` atomically and returns its folder, then deletes the oldest
/// checkpoints beyond the newest `keep_last` (0 keeps every checkpoint) and leftovers of interrupted saves.
/// The new checkpoint itself is never deleted, even when newer ones (left by a run resumed past a
/// corrupt checkpoint) outnumber `keep_last`: an intact one always remains. Tensors are written on the
/// CPU with their dtypes, with their [`Checksums`]; names must be unique.
pub fn save(
    run_dir: &Path,
    step: u64,
    tensors: &[(String, Tensor)],
    state: &serde_json::Value,
    keep_last: usize,
) -> Result<PathBuf> {
    check_unique_names(tensors)?;
    let parent = checkpoints_dir(run_dir);
    std::fs::create_dir_all(&parent).with_context(|| format!("cannot create folder '{}'", parent.display()))?;
    remove_leftovers(&parent)?;
    let name = format!("step-{step:08}");
    let tmp = parent.join(format!("{TEMP_PREFIX}{name}-{}", std::process::id()));
    write_contents(&tmp, tensors, state)?;
    let target = parent.join(&name);
    publish(&tmp, &target, &parent)?;
    let all = list_checkpoints(run_dir)?;
    if keep_last > 0 && all.len() > keep_last {
        for (_, old) in all[..all.len() - keep_last].iter().filter(|(_, dir)| *dir != target) {
            remove_dir_if_present(old)?;
        }
    }
    Ok(target)
}

/// The newest complete checkpoint folder of `run_dir` (`None` when there is none); temporary folders of
/// interrupted saves are ignored.
pub fn latest(run_dir: &Path) -> Result<Option<PathBuf>> {
    let all = list_checkpoints(run_dir)?;
    let complete =
        all.into_iter().rev().find(|(_, dir)| dir.join(TENSORS_FILE).is_file() && dir.join(STATE_FILE).is_file());
    Ok(complete.map(|(_, dir)| dir))
}

/// Reads a checkpoint folder: its tensors (CPU, stored dtypes) and its JSON state, verified against
/// their [`Checksums`] (a checkpoint written before checksums loads unverified). A missing, corrupt or
/// mismatching file is a one-line error naming it.
pub fn load(dir: &Path) -> Result<(HashMap<String, Tensor>, serde_json::Value)> {
    let tensors_path = dir.join(TENSORS_FILE);
    let tensors = crate::io::read_safetensors_map(&tensors_path)?;
    let state_path = dir.join(STATE_FILE);
    let text = std::fs::read(&state_path).with_context(|| format!("cannot read '{}'", state_path.display()))?;
    if let Some(stored) = stored_checksums(&tensors_path)? {
        stored.verify(&Checksums::of(tensors.iter(), &text), dir)?;
    }
    let state = serde_json::from_slice(&text)
        .map_err(|e| anyhow::anyhow!("'{}' is not valid JSON: {e}", state_path.display()))?;
    Ok((tensors, state))
}

/// The checkpoint a resumed run starts from, and the newer ones that could not be read.
pub struct Intact {
    /// Its folder.
    pub dir: PathBuf,
    /// Its tensors, as [`load`] returns them.
    pub tensors: HashMap<String, Tensor>,
    /// Its JSON state.
    pub state: serde_json::Value,
    /// Each newer checkpoint folder, newest first, with why it could not be read.
    pub unreadable: Vec<(PathBuf, anyhow::Error)>,
}

/// Loads the newest checkpoint of `run_dir` that reads back intact ([`load`]: complete, parsable and
/// matching its checksums), trying them newest first. No checkpoint, or none intact, is a one-line
/// error (listing each one's problem); nothing is deleted.
pub fn load_newest_intact(run_dir: &Path) -> Result<Intact> {
    let all = list_checkpoints(run_dir)?;
    if all.is_empty() {
        bail!("no checkpoint under '{}'", checkpoints_dir(run_dir).display());
    }
    let mut unreadable = Vec::new();
    for (_, dir) in all.into_iter().rev() {
        match load(&dir) {
            Ok((tensors, state)) => return Ok(Intact { dir, tensors, state, unreadable }),
            Err(e) => unreadable.push((dir, e)),
        }
    }
    // Each error names its file, and so its checkpoint.
    let problems: Vec<String> = unreadable.iter().map(|(_, e)| format!("{e:#}")).collect();
    bail!("no intact checkpoint under '{}': {}", checkpoints_dir(run_dir).display(), problems.join("; "))
}

/// Copies `saved[prefix + name]` into every live tensor of `target` in place (no grad; converted to the
/// live dtype and device). Every name is checked first: missing or mis-shaped ones are one error line
/// listing them, and nothing is copied.
pub fn restore_into(target: &[(String, Tensor)], saved: &HashMap<String, Tensor>, prefix: &str) -> Result<()> {
    let mut missing = Vec::new();
    let mut misshaped = Vec::new();
    for (name, live) in target {
        let key = format!("{prefix}{name}");
        match saved.get(&key) {
            None => missing.push(key),
            Some(t) if t.size() != live.size() => {
                misshaped.push(format!("{key} (saved {:?}, expected {:?})", t.size(), live.size()))
            }
            Some(_) => {}
        }
    }
    if !missing.is_empty() || !misshaped.is_empty() {
        bail!(
            "checkpoint does not match: missing [{}]; mis-shaped [{}]",
            crate::io::name_list(&missing),
            crate::io::name_list(&misshaped)
        );
    }
    tch::no_grad(|| {
        for (name, live) in target {
            live.shallow_clone().copy_(&saved[&format!("{prefix}{name}")]);
        }
    });
    Ok(())
}
