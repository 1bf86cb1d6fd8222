//! Shared test helpers: the fixtures folder (never silently skipped).
#![allow(dead_code)]
use std::path::PathBuf;

/// `../shared/fixtures` (or `$VTP_FIXTURES`); panics with a clear message when it is missing.
pub fn fixtures() -> PathBuf {
    let dir = std::env::var_os("VTP_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/fixtures")));
    assert!(dir.is_dir(), "fixtures folder '{}' is missing: tests need ../shared/fixtures", dir.display());
    dir
}

/// One fixture file or folder, which must exist.
pub fn fixture(name: &str) -> PathBuf {
    let path = fixtures().join(name);
    assert!(path.exists(), "fixture '{}' is missing", path.display());
    path
}
