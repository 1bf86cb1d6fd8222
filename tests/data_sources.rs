//! Data sources: WebDataset shards (local, brace and glob patterns, HTTP), image folders, class folders and
//! the synthetic scenes; splitting over ranks and workers, shuffling, resume and bad-data handling.

use std::collections::BTreeMap;
use std::fs;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use image::{ImageFormat, Rgb, RgbImage};
use vtp::data::reader::SkipCounts;
use vtp::data::source::{self, SourceSpec};
use vtp::data::stream::{SampleStream, StreamOptions, StreamState};
use vtp::data::synthetic::{Split, SyntheticConfig, SyntheticDataset};
use vtp::data::webdataset::{expand_braces, expand_shard_list, ShardWriter};
use vtp::data::Sample;

/// A small image whose pixels depend on `seed`.
fn picture(seed: u32) -> RgbImage {
    RgbImage::from_fn(6, 5, |x, y| Rgb([(x * 40 + seed) as u8, (y * 50 + seed * 3) as u8, (seed * 17) as u8]))
}

/// `img` encoded as PNG.
fn png(img: &RgbImage) -> Vec<u8> {
    let mut bytes = std::io::Cursor::new(Vec::new());
    img.write_to(&mut bytes, ImageFormat::Png).unwrap();
    bytes.into_inner()
}

/// A sample with a `"cls"` label.
fn sample(key: &str, seed: u32) -> Sample {
    let labels = BTreeMap::from([("cls".to_string(), i64::from(seed % 5))]);
    Sample { key: key.to_string(), image: picture(seed), caption: format!("caption of {key}"), labels }
}

/// Writes `shards` shards of `per_shard` samples into `dir`; returns the samples in order.
fn write_clean_shards(dir: &Path, shards: usize, per_shard: usize) -> Vec<Sample> {
    let mut writer = ShardWriter::new(dir, per_shard).unwrap();
    let samples: Vec<Sample> = (0..shards * per_shard).map(|i| sample(&format!("{i:05}"), i as u32)).collect();
    for s in &samples {
        writer.write(s).unwrap();
    }
    assert_eq!(writer.finish().unwrap().len(), shards);
    samples
}

/// Writes a tar of raw (member name, bytes).
fn write_tar(path: &Path, members: &[(String, Vec<u8>)]) {
    let mut builder = tar::Builder::new(fs::File::create(path).unwrap());
    for (name, bytes) in members {
        let mut header = tar::Header::new_gnu();
        header.set_size(bytes.len() as u64);
        header.set_mode(0o644);
        builder.append_data(&mut header, name, bytes.as_slice()).unwrap();
    }
    builder.finish().unwrap();
}

/// All samples of a stream (panics on a stream error).
fn collect(stream: SampleStream) -> Vec<Sample> {
    stream.map(|s| s.unwrap()).collect()
}

/// The keys of `samples`.
fn keys(samples: &[Sample]) -> Vec<String> {
    samples.iter().map(|s| s.key.clone()).collect()
}

/// The shard pattern of `n` shards written by [`ShardWriter`] into `dir`.
fn shard_pattern(dir: &Path, n: usize) -> String {
    format!("{}/{{000000..{:06}}}.tar", dir.display(), n - 1)
}

fn options(rank: usize, world_size: usize, workers: usize, shuffle_buffer: usize, epoch: u64) -> StreamOptions {
    StreamOptions { rank, world_size, workers, shuffle_buffer, seed: 11, epoch }
}

#[test]
fn write_shards_then_read_gives_the_same_samples() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("shards");
    let report = source::write_shards("synthetic?n=20&res=32&seed=3", &out, 8, 2).unwrap();
    let names: Vec<_> = report.shards.iter().map(|p| p.file_name().unwrap().to_string_lossy().into_owned()).collect();
    assert_eq!(names, ["000000.tar", "000001.tar", "000002.tar"]);
    assert_eq!((report.samples, report.skipped), (20, SkipCounts::default()));

    let config = SyntheticConfig { seed: 3, resolution: 32, split: Split::Train, len: 20, ..Default::default() };
    let dataset = SyntheticDataset::new(config);
    let expected: Vec<Sample> = (0..20).map(|i| dataset.get(i)).collect();
    let read = collect(source::open(&shard_pattern(&out, 3), &StreamOptions::default()).unwrap());
    assert_eq!(read, expected);
    let from_dir = collect(source::open(&out.to_string_lossy(), &StreamOptions::default()).unwrap());
    assert_eq!(from_dir, expected);

    // Deterministic bytes whatever the worker count; members in the documented order.
    let again = dir.path().join("again");
    source::write_shards("synthetic?n=20&res=32&seed=3", &again, 8, 1).unwrap();
    for name in &names {
        assert_eq!(fs::read(out.join(name)).unwrap(), fs::read(again.join(name)).unwrap(), "{name}");
    }
    let mut archive = tar::Archive::new(fs::File::open(out.join("000000.tar")).unwrap());
    let mut members = Vec::new();
    for entry in archive.entries().unwrap() {
        let mut entry = entry.unwrap();
        assert_eq!(entry.header().mtime().unwrap(), 0);
        let mut text = String::new();
        let name = entry.path().unwrap().to_string_lossy().into_owned();
        if name.ends_with(".cls") {
            entry.read_to_string(&mut text).unwrap();
            assert_eq!(text, expected[members.len() / 4].labels["shape_color"].to_string());
        }
        members.push(name);
    }
    let key = &expected[0].key;
    assert_eq!(members[..4], [format!("{key}.png"), format!("{key}.txt"), format!("{key}.cls"), format!("{key}.json")]);
    assert_eq!(members.len(), 4 * 8);
}

#[test]
fn brace_patterns_and_lists_expand() {
    assert_eq!(expand_braces("s/{000..003}.tar").unwrap(), ["s/000.tar", "s/001.tar", "s/002.tar", "s/003.tar"]);
    assert_eq!(expand_braces("{8..10}").unwrap(), ["8", "9", "10"]);
    assert_eq!(expand_braces("{08..10}").unwrap(), ["08", "09", "10"]);
    let reversed = format!("{:#}", expand_braces("s/{5..1}.tar").unwrap_err());
    assert!(reversed.contains("{5..1}") && reversed.contains("backwards"), "{reversed}");
    assert_eq!(expand_braces("{a,b}-{1..2}").unwrap(), ["a-1", "a-2", "b-1", "b-2"]);
    assert_eq!(expand_braces("x{a,{b,c}d}").unwrap(), ["xa", "xbd", "xcd"]);
    assert_eq!(expand_shard_list("a/{0..1}.tar, b.tar").unwrap(), ["a/0.tar", "a/1.tar", "b.tar"]);
    for bad in ["s/{000..003.tar", "s/000}.tar", "a.tar,,b.tar"] {
        let err = expand_shard_list(bad).unwrap_err().to_string();
        assert!(err.contains(bad) && !err.contains('\n'), "{err}");
    }
    match source::parse("https://host/s-{0..2}.tar").unwrap() {
        SourceSpec::WebDataset(shards) => assert_eq!(shards.len(), 3),
        other => panic!("{other:?}"),
    }
}

/// The shard list a SPEC parses to.
fn parsed_shards(spec: &str) -> Vec<String> {
    match source::parse(spec).unwrap() {
        SourceSpec::WebDataset(shards) => shards,
        other => panic!("{spec}: {other:?}"),
    }
}

#[test]
fn glob_patterns_expand_sorted_and_read_like_the_explicit_list() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().display().to_string();
    // Written `b` first, so that the glob's order is its own sorting, not creation order.
    let (b, a) = (write_clean_shards(&dir.path().join("b"), 2, 3), write_clean_shards(&dir.path().join("a"), 3, 2));
    fs::write(dir.path().join("a/notes.txt"), "not a shard").unwrap();
    fs::create_dir(dir.path().join("a/folder.tar")).unwrap();
    let explicit =
        format!("{root}/a/000000.tar,{root}/a/000001.tar,{root}/a/000002.tar,{root}/b/000000.tar,{root}/b/000001.tar");
    let listed = parsed_shards(&explicit);
    assert_eq!(parsed_shards(&format!("{root}/*/*.tar")), listed, "sorted by path; folders are not shards");
    assert_eq!(parsed_shards(&format!("{root}/**/0000[0-9]?.tar")), listed);
    let mut everything = listed.clone();
    everything.insert(3, format!("{root}/a/notes.txt"));
    assert_eq!(parsed_shards(&format!("{root}/[ab]/*")), everything, "a glob takes any file it matches");
    // Braces expand first, in their order; each glob is sorted; one item keeps each path once.
    let b_then_a: Vec<String> = listed[3..].iter().chain(&listed[..3]).cloned().collect();
    assert_eq!(parsed_shards(&format!("{root}/{{b,a}}/*.tar")), b_then_a);
    assert_eq!(parsed_shards(&format!("{root}/{{b,a,b}}/00000{{0..1}}.tar,{root}/a/*2.tar")), b_then_a);
    let read = collect(source::open(&format!("{root}/*/*.tar"), &StreamOptions::default()).unwrap());
    assert_eq!(read, [a, b].concat());
    // An empty match (also of one brace alternative) and a malformed pattern: one line naming the pattern.
    for (spec, pattern, problem) in [
        (format!("{root}/*/*.tgz"), format!("{root}/*/*.tgz"), "no shard file matches"),
        (format!("{root}/{{a,c}}/*.tar"), format!("{root}/c/*.tar"), "no shard file matches"),
        (format!("{root}/[a/*.tar"), format!("{root}/[a/*.tar"), "bad glob pattern"),
    ] {
        let err = format!("{:#}", source::parse(&spec).unwrap_err());
        assert!(err.contains(problem) && err.contains(&pattern) && !err.contains('\n'), "{err}");
    }
}

#[test]
fn corrupt_and_captionless_samples_are_skipped_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let good = png(&picture(1));
    let text = |s: &str| s.as_bytes().to_vec();
    let members = [
        ("k0.png", good.clone()),
        ("k0.txt", text("first\n")),
        ("k1.jpg", text("not a jpeg at all")),
        ("k1.txt", text("corrupt image")),
        ("k2.png", good.clone()),
        ("k3.png", good.clone()),
        ("k3.txt", text("  \n")),
        ("k4.txt", text("no image")),
        ("k5.png", good.clone()),
        ("k5.txt", text("with class")),
        ("k5.cls", text("7")),
        ("k6.png", good.clone()),
        ("k6.txt", text("bad json")),
        ("k6.json", text("{oops")),
        ("k7.png", good[..good.len() / 2].to_vec()),
        ("k7.txt", text("truncated image")),
    ];
    let members: Vec<(String, Vec<u8>)> = members.into_iter().map(|(n, b)| (n.to_string(), b)).collect();
    write_tar(&dir.path().join("a.tar"), &members);
    let renamed: Vec<_> = members.iter().map(|(n, b)| (format!("b{n}"), b.clone())).collect();
    write_tar(&dir.path().join("b.tar"), &renamed);

    let mut stream = source::open(&format!("{}/a.tar", dir.path().display()), &StreamOptions::default()).unwrap();
    let read: Vec<Sample> = stream.by_ref().map(|s| s.unwrap()).collect();
    assert_eq!(keys(&read), ["k0", "k5"]);
    assert_eq!((read[0].caption.as_str(), read[0].image.clone()), ("first", picture(1)));
    assert_eq!(read[1].labels, BTreeMap::from([("cls".to_string(), 7)]));
    assert_eq!(stream.skipped(), SkipCounts { corrupt: 4, no_caption: 2 });

    // Split over 2 ranks x 2 workers with shuffling, the counts add up to the same totals.
    let spec = format!("{}/{{a,b}}.tar", dir.path().display());
    let mut total = SkipCounts::default();
    let mut seen = Vec::new();
    for rank in 0..2 {
        let mut stream = source::open(&spec, &options(rank, 2, 2, 3, 0)).unwrap();
        seen.extend(keys(&stream.by_ref().map(|s| s.unwrap()).collect::<Vec<_>>()));
        let skipped = stream.skipped();
        total.corrupt += skipped.corrupt;
        total.no_caption += skipped.no_caption;
    }
    seen.sort();
    assert_eq!(seen, ["bk0", "bk5", "k0", "k5"]);
    assert_eq!(total, SkipCounts { corrupt: 8, no_caption: 4 });
    assert_eq!(total.to_string(), "8 corrupt, 4 without caption");
}

#[test]
fn a_missing_shard_is_a_one_line_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    // 20 samples per shard: the worker is still blocked in the first shard when the second goes.
    write_clean_shards(dir.path(), 2, 20);
    let spec = shard_pattern(dir.path(), 3);
    let err = source::open(&spec, &StreamOptions::default()).err().unwrap().to_string();
    assert!(err.contains("000002.tar") && err.starts_with("cannot open shard") && !err.contains('\n'), "{err}");

    // A shard that disappears after opening: one error naming it, then the stream ends.
    let mut stream = source::open(&shard_pattern(dir.path(), 2), &StreamOptions::default()).unwrap();
    fs::remove_file(dir.path().join("000001.tar")).unwrap();
    let results: Vec<_> = stream.by_ref().collect();
    let err = results.last().unwrap().as_ref().unwrap_err().to_string();
    assert!(err.contains("000001.tar") && !err.contains('\n'), "{err}");
    assert_eq!(results.iter().filter(|r| r.is_err()).count(), 1);
    assert!(stream.next().is_none());

    let garbage = dir.path().join("garbage.tar");
    fs::write(&garbage, vec![b'x'; 1536]).unwrap();
    let results: Vec<_> = source::open(&garbage.to_string_lossy(), &StreamOptions::default()).unwrap().collect();
    let err = results[0].as_ref().unwrap_err().to_string();
    assert!(results.len() == 1 && err.contains("cannot read shard") && err.contains("garbage.tar"), "{err}");

    let missing = dir.path().join("nothing-here");
    let err = source::parse(&missing.to_string_lossy()).unwrap_err().to_string();
    assert!(err.contains("nothing-here") && err.contains("not found") && !err.contains('\n'), "{err}");
}

/// A loopback HTTP server serving the files of a folder, one thread per connection; it stops
/// when dropped or after 30 s.
struct FileServer {
    port: u16,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl FileServer {
    fn start(root: PathBuf) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(30);
            while !flag.load(Ordering::Relaxed) && Instant::now() < deadline {
                match listener.accept() {
                    Ok((connection, _)) => {
                        let root = root.clone();
                        std::thread::spawn(move || Self::respond(connection, &root));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        FileServer { port, stop, thread: Some(thread) }
    }

    /// Answers one GET with the file's bytes (in small chunks) or a 404.
    fn respond(mut connection: TcpStream, root: &Path) {
        connection.set_nonblocking(false).unwrap();
        connection.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut request = Vec::new();
        let mut byte = [0u8; 1];
        while !request.ends_with(b"\r\n\r\n") && connection.read(&mut byte).unwrap_or(0) == 1 {
            request.push(byte[0]);
        }
        let request = String::from_utf8_lossy(&request);
        let path = request.split_whitespace().nth(1).unwrap_or("/").trim_start_matches('/');
        let _ = match fs::read(root.join(path)) {
            Ok(body) => {
                let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len());
                connection.write_all(head.as_bytes()).and_then(|()| {
                    body.chunks(1000)
                        .try_for_each(|chunk| connection.write_all(chunk).and_then(|()| connection.flush()))
                })
            }
            Err(_) => connection.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"),
        };
    }
}

impl Drop for FileServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            thread.join().unwrap();
        }
    }
}

#[test]
fn shards_stream_from_a_loopback_http_server() {
    let dir = tempfile::tempdir().unwrap();
    let samples = write_clean_shards(dir.path(), 3, 4);
    let server = FileServer::start(dir.path().to_path_buf());
    let spec = format!("http://127.0.0.1:{}/{{000000..000002}}.tar", server.port);
    assert_eq!(collect(source::open(&spec, &StreamOptions::default()).unwrap()), samples);
    let local = shard_pattern(dir.path(), 3);
    let opts = options(0, 1, 2, 5, 1);
    assert_eq!(collect(source::open(&spec, &opts).unwrap()), collect(source::open(&local, &opts).unwrap()));

    let missing = format!("http://127.0.0.1:{}/000009.tar", server.port);
    let results: Vec<_> = source::open(&missing, &StreamOptions::default()).unwrap().collect();
    assert_eq!(results.len(), 1);
    let err = results[0].as_ref().unwrap_err().to_string();
    assert!(err.contains(&missing) && err.contains("404") && !err.contains('\n'), "{err}");
}

/// The keys that 2 ranks x 2 workers see together in `epoch`, sorted, and rank 0's order.
fn keys_over_ranks(spec: &str, shuffle_buffer: usize, epoch: u64) -> (Vec<String>, Vec<String>) {
    let per_rank: Vec<Vec<String>> = (0..2)
        .map(|rank| keys(&collect(source::open(spec, &options(rank, 2, 2, shuffle_buffer, epoch)).unwrap())))
        .collect();
    let mut all: Vec<String> = per_rank.concat();
    all.sort();
    (all, per_rank[0].clone())
}

#[test]
fn ranks_and_workers_together_see_every_sample_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let many = dir.path().join("many");
    let few = dir.path().join("few");
    let many_keys = keys(&write_clean_shards(&many, 6, 5));
    let few_keys = keys(&write_clean_shards(&few, 3, 7));
    let synthetic_keys: Vec<String> = {
        let dataset = SyntheticDataset::new(SyntheticConfig { resolution: 16, len: 23, ..SyntheticConfig::default() });
        let mut k: Vec<String> = (0..23).map(|i| dataset.get(i).key).collect();
        k.sort();
        k
    };
    let cases = [
        (shard_pattern(&many, 6), many_keys),
        (shard_pattern(&few, 3), few_keys),
        ("synthetic?n=23&res=16".to_string(), synthetic_keys),
    ];
    for (spec, expected) in &cases {
        for shuffle_buffer in [0, 4] {
            let (epoch0, order0) = keys_over_ranks(spec, shuffle_buffer, 0);
            let (epoch1, order1) = keys_over_ranks(spec, shuffle_buffer, 1);
            assert_eq!(&epoch0, expected, "{spec}, buffer {shuffle_buffer}");
            assert_eq!(&epoch1, expected, "{spec}, buffer {shuffle_buffer}");
            assert_eq!(shuffle_buffer == 0, order0 == order1, "{spec}: epochs differ only with shuffling");
        }
    }
}

/// Takes `n` samples from the front of a stream.
fn take(stream: &mut SampleStream, n: usize) -> Vec<Sample> {
    stream.by_ref().take(n).map(|s| s.unwrap()).collect()
}

/// Checks that stopping after 37 samples and reopening at the saved position continues exactly;
/// returns the epoch's skip counts.
fn check_resume(spec: &str, opts: &StreamOptions) -> SkipCounts {
    let mut uninterrupted = source::open(spec, opts).unwrap();
    let full: Vec<Sample> = uninterrupted.by_ref().map(|s| s.unwrap()).collect();
    assert!(full.len() >= 87, "{spec}: only {} samples", full.len());

    let mut first = source::open(spec, opts).unwrap();
    assert_eq!(take(&mut first, 37), full[..37]);
    let saved = serde_json::to_string(&first.position()).unwrap();
    let skipped_at_37 = first.skipped();
    drop(first);
    let state: StreamState = serde_json::from_str(&saved).unwrap();
    let mut resumed = source::open_at(spec, opts, &state).unwrap();
    assert_eq!(resumed.skipped(), skipped_at_37);
    assert_eq!(take(&mut resumed, 50), full[37..87], "{spec}");
    let rest: Vec<Sample> = resumed.by_ref().map(|s| s.unwrap()).collect();
    assert_eq!(rest, full[87..]);
    assert_eq!(resumed.skipped(), uninterrupted.skipped());
    assert!(source::open_at(spec, opts, &resumed.position()).unwrap().next().is_none());
    resumed.skipped()
}

#[test]
fn a_saved_position_resumes_the_same_sequence() {
    let dir = tempfile::tempdir().unwrap();
    write_clean_shards(dir.path(), 10, 30);
    // A shard with a corrupt and a caption-less sample, so that skips are part of the position.
    let bad = [
        ("x0.png".to_string(), b"garbage".to_vec()),
        ("x0.txt".to_string(), b"bad image".to_vec()),
        ("x1.png".to_string(), png(&picture(9))),
        ("x2.png".to_string(), png(&picture(8))),
        ("x2.txt".to_string(), b"good".to_vec()),
    ];
    write_tar(&dir.path().join("000010.tar"), &bad);
    let spec = shard_pattern(dir.path(), 11);
    check_resume(&spec, &StreamOptions { rank: 1, world_size: 2, workers: 3, shuffle_buffer: 16, seed: 5, epoch: 2 });
    let whole = StreamOptions { rank: 0, world_size: 1, workers: 2, shuffle_buffer: 7, seed: 0, epoch: 0 };
    assert_eq!(check_resume(&spec, &whole), SkipCounts { corrupt: 1, no_caption: 1 });
    check_resume(&spec, &StreamOptions { shuffle_buffer: 0, ..whole });
    check_resume(
        "synthetic?n=150&res=16",
        &StreamOptions { workers: 3, shuffle_buffer: 10, seed: 1, ..Default::default() },
    );

    let opts = StreamOptions { workers: 2, ..Default::default() };
    let stale = StreamState { epoch: 0, next_worker: 0, workers: vec![Default::default(); 3] };
    let err = source::open_at(&spec, &opts, &stale).err().unwrap().to_string();
    assert!(err.contains("3 workers") && err.contains("2"), "{err}");
}

/// Writes `picture(seed)` as PNG at `dir/name`.
fn save_picture(dir: &Path, name: &str, seed: u32) {
    let path = dir.join(name);
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(path, png(&picture(seed))).unwrap();
}

/// An image folder: a.png, b.png, sub/c.png (captioned), d.png (no caption), bad.png (corrupt).
fn image_folder(dir: &Path) {
    for (name, seed) in [("a.png", 1), ("b.png", 2), ("sub/c.png", 3), ("d.png", 4)] {
        save_picture(dir, name, seed);
    }
    fs::write(dir.join("bad.png"), b"not a png").unwrap();
}

/// Checks the samples and skip counts read from [`image_folder`].
fn check_image_folder(spec: &str) {
    let mut stream = source::open(spec, &StreamOptions { workers: 2, ..Default::default() }).unwrap();
    let read: Vec<Sample> = stream.by_ref().map(|s| s.unwrap()).collect();
    assert_eq!(keys(&read), ["a", "b", "sub/c"], "{spec}");
    assert_eq!(read[0].caption, "a cat, \"sitting\"");
    assert_eq!(read[1].caption, "plain");
    assert_eq!(read[2].image, picture(3));
    assert_eq!(read[0].labels, BTreeMap::from([("cls".to_string(), 4)]));
    assert!(read[1].labels.is_empty());
    // Corrupt: bad.png and the missing gone.png; no caption: d.png.
    assert_eq!(stream.skipped(), SkipCounts { corrupt: 2, no_caption: 1 }, "{spec}");
}

#[test]
fn image_folder_with_a_csv_captions_file() {
    let dir = tempfile::tempdir().unwrap();
    image_folder(dir.path());
    let csv = "file,caption,cls\na.png,\"a cat, \"\"sitting\"\"\",4\nb.png,plain,\nsub/c.png,third,1\n\
               bad.png,corrupt,\ngone.png,missing file,\n";
    fs::write(dir.path().join("captions.csv"), csv).unwrap();
    check_image_folder(&dir.path().to_string_lossy());
    let spec = source::parse(&dir.path().to_string_lossy()).unwrap();
    assert_eq!(
        spec,
        SourceSpec::CaptionFolder { dir: dir.path().to_path_buf(), captions: dir.path().join("captions.csv") }
    );
}

#[test]
fn image_folder_with_a_jsonl_captions_file() {
    let dir = tempfile::tempdir().unwrap();
    let images = dir.path().join("images");
    image_folder(&images);
    let jsonl = [
        r#"{"file": "a.png", "caption": "a cat, \"sitting\"", "cls": 4}"#,
        r#"{"image": "b.png", "text": "plain"}"#,
        "",
        r#"{"file": "./sub/c.png", "caption": "third"}"#,
        r#"{"file": "bad.png", "caption": "corrupt"}"#,
        r#"{"file": "gone.png", "caption": "missing file"}"#,
    ];
    let captions = dir.path().join("elsewhere.jsonl");
    fs::write(&captions, jsonl.join("\n")).unwrap();
    check_image_folder(&format!("{}?captions={}", images.display(), captions.display()));

    fs::write(&captions, "{\"file\": \"a.png\"}\nnot json\n").unwrap();
    let spec = format!("{}?captions={}", images.display(), captions.display());
    let err = format!("{:#}", source::open(&spec, &StreamOptions::default()).err().unwrap());
    assert!(err.contains("elsewhere.jsonl") && err.contains("line 2") && !err.contains('\n'), "{err}");
}

#[test]
fn class_folders_are_captioned_from_a_template() {
    let dir = tempfile::tempdir().unwrap();
    for (name, seed) in [("dog/1.png", 1), ("cat/2.png", 2), ("cat/1.png", 3), ("bird/x.png", 4)] {
        save_picture(dir.path(), name, seed);
    }
    fs::write(dir.path().join("cat/broken.png"), b"nope").unwrap();
    let mut stream = source::open(&dir.path().to_string_lossy(), &StreamOptions::default()).unwrap();
    let read: Vec<Sample> = stream.by_ref().map(|s| s.unwrap()).collect();
    assert_eq!(keys(&read), ["bird/x", "cat/1", "cat/2", "dog/1"]);
    let captions: Vec<&str> = read.iter().map(|s| s.caption.as_str()).collect();
    assert_eq!(captions, ["a photo of a bird.", "a photo of a cat.", "a photo of a cat.", "a photo of a dog."]);
    let classes: Vec<i64> = read.iter().map(|s| s.labels["cls"]).collect();
    assert_eq!(classes, [0, 1, 1, 2]);
    assert_eq!(read[1].image, picture(3));
    assert_eq!(stream.skipped(), SkipCounts { corrupt: 1, no_caption: 0 });

    let spec = format!("{}?template=an image of {{}}", dir.path().display());
    let first = source::open(&spec, &StreamOptions::default()).unwrap().next().unwrap().unwrap();
    assert_eq!(first.caption, "an image of bird");

    // Class folders export to shards with their "cls" label.
    let out = tempfile::tempdir().unwrap();
    let report = source::write_shards(&dir.path().to_string_lossy(), out.path(), 3, 2).unwrap();
    assert_eq!((report.samples, report.skipped.corrupt, report.shards.len()), (4, 1, 2));
    assert_eq!(collect(source::open(&out.path().to_string_lossy(), &StreamOptions::default()).unwrap()), read);
}

#[test]
fn specs_parse() {
    let parsed = source::parse("synthetic").unwrap();
    assert_eq!(parsed, SourceSpec::Synthetic(SyntheticConfig::default()));
    let parsed = source::parse("synthetic:novel?n=5&res=32&seed=7").unwrap();
    let expected = SyntheticConfig { seed: 7, resolution: 32, split: Split::Novel, len: 5, ..Default::default() };
    assert_eq!(parsed, SourceSpec::Synthetic(expected));
    assert_eq!(
        source::parse("synthetic:val").unwrap(),
        SourceSpec::Synthetic(SyntheticConfig { split: Split::HeldOut, ..SyntheticConfig::default() })
    );
    let parsed = source::parse("synthetic?zoom=2&colorless=0.25").unwrap();
    let expected = SyntheticConfig { zoom: 2.0, colorless: 0.25, ..SyntheticConfig::default() };
    assert_eq!(parsed, SourceSpec::Synthetic(expected));
    let parsed = source::parse("synthetic:heldout?group=4").unwrap();
    let expected = SyntheticConfig { group: 4, split: Split::HeldOut, ..SyntheticConfig::default() };
    assert_eq!(parsed, SourceSpec::Synthetic(expected));
    for bad in [
        "synthetic?zoom=3",
        "synthetic?zoom=0.1",
        "synthetic?colorless=1.5",
        "synthetic?colorless=x",
        "synthetic?group=0",
        "synthetic?group=7",
        "synthetic:novel?group=2",
    ] {
        let e = format!("{:#}", source::parse(bad).unwrap_err());
        assert!(["zoom", "colorless", "group"].iter().any(|k| e.contains(k)) && !e.contains('\n'), "{bad}: {e}");
    }
    for bad in ["synthetic:nope", "synthetic?n=-1", "synthetic?size=3", "synthetic?n", "a.tar?x=1"] {
        let err = source::parse(bad).unwrap_err();
        let text = format!("{err:#}");
        assert!(text.contains(bad) && !text.contains('\n'), "{text}");
    }
    let empty = tempfile::tempdir().unwrap();
    let err = format!("{:#}", source::parse(&empty.path().to_string_lossy()).unwrap_err());
    assert!(err.contains("no captions file") && !err.contains('\n'), "{err}");
    let opts = StreamOptions { rank: 2, world_size: 2, ..Default::default() };
    let err = source::open("synthetic?n=4", &opts).err().unwrap().to_string();
    assert!(err.contains("rank 2"), "{err}");
}
