//! Resolving the CLI's `--model` argument to a local directory holding `config.json` and
//! `model.safetensors`: either a plain path, or a Hugging Face repo `hf:ORG/NAME[@REVISION]`
//! looked up in (and, when online, downloaded into) the Hugging Face cache.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Result};
use hf_hub::api::sync::ApiBuilder;
use hf_hub::{Cache, Repo, RepoType};

/// The files a released-format model directory must contain.
const MODEL_FILES: [&str; 2] = ["config.json", "model.safetensors"];
/// Prefix marking a Hugging Face repo id in a model spec.
const HF_PREFIX: &str = "hf:";
/// Revision used when a spec names none.
const DEFAULT_REVISION: &str = "main";
/// Hub used when `HF_ENDPOINT` is unset.
const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

/// A model location: a released-format directory, or a Hugging Face repo id `hf:ORG/NAME[@REVISION]`.
///
/// Hugging Face repos are looked up in the cache at `$HF_HUB_CACHE`, else `$HF_HOME/hub`, else
/// `$XDG_CACHE_HOME/huggingface/hub`, else `~/.cache/huggingface/hub`, and downloaded there
/// unless `HF_HUB_OFFLINE` is set to a true value (`1`, `true`, `yes`, `on`).
pub fn resolve_model_dir(spec: &str) -> Result<PathBuf> {
    match parse_spec(spec)? {
        None => check_model_dir(Path::new(spec)),
        Some(hf) => resolve_hf(&hf, &default_cache_dir()?, offline_from_env()),
    }
}

/// [`resolve_model_dir`] with an explicit Hugging Face cache directory and offline flag.
pub fn resolve_model_dir_with_cache(spec: &str, cache_dir: &Path, offline: bool) -> Result<PathBuf> {
    match parse_spec(spec)? {
        None => check_model_dir(Path::new(spec)),
        Some(hf) => resolve_hf(&hf, cache_dir, offline),
    }
}

/// A parsed `hf:ORG/NAME[@REVISION]` spec.
#[derive(Debug, PartialEq)]
struct HfSpec {
    /// `ORG/NAME`.
    repo_id: String,
    /// Branch, tag or commit hash.
    revision: String,
}

impl HfSpec {
    /// The hf-hub repo handle.
    fn repo(&self) -> Repo {
        Repo::with_revision(self.repo_id.clone(), RepoType::Model, self.revision.clone())
    }
}

impl std::fmt::Display for HfSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "'{}' (revision {})", self.repo_id, self.revision)
    }
}

/// `Ok(None)` for a plain path, `Ok(Some(..))` for a valid `hf:` spec, an error for a bad one.
fn parse_spec(spec: &str) -> Result<Option<HfSpec>> {
    let Some(rest) = spec.strip_prefix(HF_PREFIX) else {
        return Ok(None);
    };
    let bad = || anyhow!("invalid Hugging Face model '{spec}': expected hf:ORG/NAME[@REVISION]");
    let (repo_id, revision) = match rest.split_once('@') {
        Some((id, rev)) => (id, rev),
        None => (rest, DEFAULT_REVISION),
    };
    let valid_part = |s: &str| !s.is_empty() && !s.contains(char::is_whitespace);
    let id_ok =
        repo_id.split_once('/').is_some_and(|(org, name)| valid_part(org) && valid_part(name) && !name.contains('/'));
    if !id_ok || !valid_part(revision) {
        return Err(bad());
    }
    Ok(Some(HfSpec { repo_id: repo_id.to_string(), revision: revision.to_string() }))
}

/// Checks that `dir` is a directory holding every file of [`MODEL_FILES`].
fn check_model_dir(dir: &Path) -> Result<PathBuf> {
    if !dir.is_dir() {
        bail!("model directory '{}' does not exist or is not a directory", dir.display());
    }
    let missing: Vec<&str> = MODEL_FILES.into_iter().filter(|f| !dir.join(f).is_file()).collect();
    if !missing.is_empty() {
        bail!("model directory '{}' has no {}", dir.display(), missing.join(" and no "));
    }
    Ok(dir.to_path_buf())
}

/// The snapshot directory of `hf` from the cache, downloading it first when allowed.
fn resolve_hf(hf: &HfSpec, cache_dir: &Path, offline: bool) -> Result<PathBuf> {
    if let Some(dir) = cached_snapshot(hf, cache_dir) {
        return Ok(dir);
    }
    if offline {
        bail!(
            "Hugging Face model {hf} is not in the cache at '{}' and offline mode is on; \
             fetch it with `huggingface-cli download {}{}` or go online (unset HF_HUB_OFFLINE)",
            cache_dir.display(),
            hf.repo_id,
            revision_flag(hf)
        );
    }
    download(hf, cache_dir, &endpoint_from_env())
}

/// ` --revision REV` for non-default revisions, for the download hint.
fn revision_flag(hf: &HfSpec) -> String {
    if hf.revision == DEFAULT_REVISION {
        String::new()
    } else {
        format!(" --revision {}", hf.revision)
    }
}

/// The cached snapshot directory holding all [`MODEL_FILES`] of `hf`, if there is one.
///
/// The revision is resolved through `refs/<revision>`; a full commit hash with no ref file
/// (as `huggingface-cli download --revision <hash>` leaves it) is looked up directly.
fn cached_snapshot(hf: &HfSpec, cache_dir: &Path) -> Option<PathBuf> {
    let cache_repo = Cache::new(cache_dir.to_path_buf()).repo(hf.repo());
    let via_ref: Option<Vec<PathBuf>> = MODEL_FILES.iter().map(|f| cache_repo.get(f)).collect();
    if let Some(dir) = via_ref.and_then(|paths| paths[0].parent().map(Path::to_path_buf)) {
        return Some(dir);
    }
    if !is_commit_hash(&hf.revision) {
        return None;
    }
    let dir = cache_dir.join(hf.repo().folder_name()).join("snapshots").join(&hf.revision);
    MODEL_FILES.iter().all(|f| dir.join(f).is_file()).then_some(dir)
}

/// Whether `rev` is a full 40-hex-digit commit hash.
fn is_commit_hash(rev: &str) -> bool {
    rev.len() == 40 && rev.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Downloads [`MODEL_FILES`] of `hf` from `endpoint` into `cache_dir` and returns the snapshot.
fn download(hf: &HfSpec, cache_dir: &Path, endpoint: &str) -> Result<PathBuf> {
    let fail = |what: String| anyhow!("cannot download Hugging Face model {hf}: {what}");
    let mut builder = ApiBuilder::from_cache(Cache::new(cache_dir.to_path_buf())).with_endpoint(endpoint.to_string());
    if let Some(token) = env_value("HF_TOKEN") {
        builder = builder.with_token(Some(token));
    }
    let api = builder.build().map_err(|e| fail(one_line(&e)))?;
    let repo = api.repo(hf.repo());
    for file in MODEL_FILES {
        repo.get(file).map_err(|e| fail(format!("{file}: {}", one_line(&e))))?;
    }
    cached_snapshot(hf, cache_dir).ok_or_else(|| fail("the downloaded files are not in one snapshot; try again".into()))
}

/// The Hugging Face hub cache directory from the environment (see [`resolve_model_dir`]).
fn default_cache_dir() -> Result<PathBuf> {
    cache_dir_from(env_value, std::env::home_dir())
}

/// [`default_cache_dir`] with the environment lookup and home directory supplied.
fn cache_dir_from(var: impl Fn(&str) -> Option<String>, home: Option<PathBuf>) -> Result<PathBuf> {
    if let Some(dir) = var("HF_HUB_CACHE") {
        return Ok(dir.into());
    }
    if let Some(dir) = var("HF_HOME") {
        return Ok(PathBuf::from(dir).join("hub"));
    }
    let cache = match var("XDG_CACHE_HOME") {
        Some(dir) => PathBuf::from(dir),
        None => home
            .ok_or_else(|| anyhow!("cannot locate the Hugging Face cache: no home directory; set HF_HUB_CACHE"))?
            .join(".cache"),
    };
    Ok(cache.join("huggingface").join("hub"))
}

/// Whether `HF_HUB_OFFLINE` is set to a true value.
fn offline_from_env() -> bool {
    env_value("HF_HUB_OFFLINE").is_some_and(|v| is_true(&v))
}

/// huggingface_hub's truthy strings: `1`, `on`, `yes`, `true` (any case).
fn is_true(value: &str) -> bool {
    ["1", "on", "yes", "true"].iter().any(|t| value.trim().eq_ignore_ascii_case(t))
}

/// `HF_ENDPOINT`, or the public hub.
fn endpoint_from_env() -> String {
    env_value("HF_ENDPOINT").unwrap_or_else(|| DEFAULT_ENDPOINT.to_string())
}

/// A non-empty environment variable.
fn env_value(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// An error message on one line, without control characters.
fn one_line(e: &dyn std::fmt::Display) -> String {
    let text: String = e.to_string().chars().map(|c| if c.is_control() { ' ' } else { c }).collect();
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    const HASH: &str = "0123456789abcdef0123456789abcdef01234567";

    /// A cache with `models--Org--Name` at commit [`HASH`], `refs/main` pointing to it.
    fn fake_cache(files: &[&str]) -> tempfile::TempDir {
        let cache = tempfile::tempdir().unwrap();
        let repo = cache.path().join("models--Org--Name");
        fs::create_dir_all(repo.join("refs")).unwrap();
        fs::write(repo.join("refs/main"), HASH).unwrap();
        let snapshot = repo.join("snapshots").join(HASH);
        fs::create_dir_all(&snapshot).unwrap();
        for f in files {
            fs::write(snapshot.join(f), b"{}").unwrap();
        }
        cache
    }

    fn snapshot(cache: &tempfile::TempDir) -> PathBuf {
        cache.path().join("models--Org--Name/snapshots").join(HASH)
    }

    #[test]
    fn resolves_cached_repo_offline() {
        let cache = fake_cache(&MODEL_FILES);
        for spec in ["hf:Org/Name", "hf:Org/Name@main", &format!("hf:Org/Name@{HASH}")] {
            let dir = resolve_model_dir_with_cache(spec, cache.path(), true).unwrap();
            assert_eq!(dir, snapshot(&cache), "{spec}");
        }
    }

    #[test]
    fn missing_repo_offline_is_an_error_naming_it() {
        let cache = fake_cache(&MODEL_FILES);
        for spec in ["hf:Org/Other", "hf:Org/Name@v2"] {
            let err = resolve_model_dir_with_cache(spec, cache.path(), true).unwrap_err().to_string();
            assert!(err.contains("is not in the cache at"), "{err}");
            assert!(err.contains("huggingface-cli download Org/"), "{err}");
            assert!(!err.contains('\n'), "{err}");
        }
        let err = resolve_model_dir_with_cache("hf:Org/Name@v2", cache.path(), true).unwrap_err();
        assert!(err.to_string().contains("--revision v2"), "{err}");
    }

    #[test]
    fn partial_snapshot_is_not_cached() {
        let cache = fake_cache(&["config.json"]);
        let err = resolve_model_dir_with_cache("hf:Org/Name", cache.path(), true).unwrap_err();
        assert!(err.to_string().contains("'Org/Name' (revision main)"), "{err}");
    }

    #[test]
    fn failed_download_is_one_line_naming_the_repo() {
        let cache = tempfile::tempdir().unwrap();
        let hf = parse_spec("hf:Org/Name").unwrap().unwrap();
        // Nothing listens on the discard port of the loopback address.
        let err = download(&hf, cache.path(), "http://127.0.0.1:9").unwrap_err().to_string();
        assert!(err.starts_with("cannot download Hugging Face model 'Org/Name'"), "{err}");
        assert!(!err.contains('\n'), "{err}");
    }

    #[test]
    fn bad_specs_are_errors() {
        for spec in ["hf:", "hf:noslash", "hf:/Name", "hf:Org/", "hf:a/b/c", "hf:Org/Name@", "hf:Org /Name"] {
            let err = resolve_model_dir_with_cache(spec, Path::new("/nonexistent"), true).unwrap_err();
            assert!(err.to_string().starts_with("invalid Hugging Face model"), "{spec}: {err}");
        }
    }

    #[test]
    fn parses_specs() {
        let hf = parse_spec("hf:Org/Name@v1.0").unwrap().unwrap();
        assert_eq!((hf.repo_id.as_str(), hf.revision.as_str()), ("Org/Name", "v1.0"));
        assert_eq!(parse_spec("Org/Name").unwrap(), None);
    }

    #[test]
    fn plain_directory_must_hold_both_files() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("config.json"), b"{}").unwrap();
        let spec = dir.path().to_str().unwrap();
        let err = resolve_model_dir(spec).unwrap_err().to_string();
        assert!(err.contains(spec) && err.ends_with("has no model.safetensors"), "{err}");
        fs::write(dir.path().join("model.safetensors"), b"").unwrap();
        assert_eq!(resolve_model_dir(spec).unwrap(), dir.path());
        let missing = dir.path().join("nope");
        let err = resolve_model_dir(missing.to_str().unwrap()).unwrap_err().to_string();
        assert!(err.contains("nope' does not exist"), "{err}");
    }

    #[test]
    fn cache_dir_precedence() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |name: &str| pairs.iter().find(|(k, _)| *k == name).map(|(_, v)| v.to_string())
        };
        let home = Some(PathBuf::from("/home/u"));
        let all = env(&[("HF_HUB_CACHE", "/c"), ("HF_HOME", "/h"), ("XDG_CACHE_HOME", "/x")]);
        assert_eq!(cache_dir_from(all, home.clone()).unwrap(), Path::new("/c"));
        let hf_home = env(&[("HF_HOME", "/h"), ("XDG_CACHE_HOME", "/x")]);
        assert_eq!(cache_dir_from(hf_home, home.clone()).unwrap(), Path::new("/h/hub"));
        let xdg = env(&[("XDG_CACHE_HOME", "/x")]);
        assert_eq!(cache_dir_from(xdg, home.clone()).unwrap(), Path::new("/x/huggingface/hub"));
        let none = env(&[]);
        assert_eq!(cache_dir_from(none, home).unwrap(), Path::new("/home/u/.cache/huggingface/hub"));
        assert!(cache_dir_from(env(&[]), None).is_err());
    }

    #[test]
    fn truthy_offline_values() {
        for v in ["1", "true", "YES", "On"] {
            assert!(is_true(v), "{v}");
        }
        for v in ["0", "false", "no", ""] {
            assert!(!is_true(v), "{v}");
        }
    }
}
