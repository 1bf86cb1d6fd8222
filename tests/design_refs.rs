//! The design reference the code cites is in the repository: every `docs/design.md §N.M` that a
//! source file, test, benchmark, script or the README cites names a section (a `§N.M` heading) or a
//! numbered item (`**§N.M …**`) of `docs/design.md`.
use std::path::{Path, PathBuf};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// Every file under `dir`, recursively.
fn files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap().map(Result::unwrap) {
        let path = entry.path();
        if path.is_dir() {
            files(&path, out);
        } else {
            out.push(path);
        }
    }
}

/// The section numbers cited in `text`: each `§N.M` in a run that starts at `docs/design.md `.
fn citations(text: &str) -> Vec<String> {
    let mut cited = Vec::new();
    for (start, _) in text.match_indices("docs/design.md §") {
        let run = &text[start + "docs/design.md ".len()..];
        let end = run.find(|c: char| !(c.is_ascii_digit() || "§.,–- and".contains(c))).unwrap_or(run.len());
        for part in run[..end].split('§').skip(1) {
            let number = part.split(|c: char| !(c.is_ascii_digit() || c == '.')).next().unwrap().trim_end_matches('.');
            if !number.is_empty() {
                cited.push(number.to_string());
            }
        }
    }
    cited
}

#[test]
fn every_cited_design_section_exists() {
    let design = std::fs::read_to_string(Path::new(ROOT).join("docs/design.md")).unwrap();
    let anchors: Vec<&str> = design
        .lines()
        .filter_map(|l| l.trim_start_matches('#').trim_start().strip_prefix('§').filter(|_| l.starts_with('#')))
        .chain(design.lines().filter_map(|l| l.split("**§").nth(1)))
        .map(|rest| rest.split(|c: char| !(c.is_ascii_digit() || c == '.')).next().unwrap().trim_end_matches('.'))
        .collect();
    let mut paths = vec![Path::new(ROOT).join("README.md")];
    for dir in ["src", "tests", "benches", "scripts"] {
        files(&Path::new(ROOT).join(dir), &mut paths);
    }
    let mut cited = 0;
    let mut missing = Vec::new();
    for path in paths {
        let Ok(text) = std::fs::read_to_string(&path) else { continue };
        for number in citations(&text) {
            cited += 1;
            if !anchors.contains(&number.as_str()) {
                missing.push(format!("{}: §{number}", path.strip_prefix(ROOT).unwrap().display()));
            }
        }
    }
    println!("{cited} citations, {} sections and items", anchors.len());
    assert!(cited > 100, "the code cites the design reference ({cited} citations found)");
    assert!(missing.is_empty(), "cited sections missing from docs/design.md: {missing:?}");
}

#[test]
fn citations_are_read_from_runs_of_section_numbers() {
    let text = "see docs/design.md §4.1–§4.5 and docs/design.md §9.2, §9.10. Not §3.";
    assert_eq!(citations(text), ["4.1", "4.5", "9.2", "9.10"]);
}
