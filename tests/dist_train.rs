//! Data-parallel training on 2 Gloo processes over 127.0.0.1 (issue 15): a DiT step of 2 ranks equals
//! the 1-process step on the same global batch (every parameter, EMA and optimiser moment to 1e-5
//! relative), a 2-process checkpoint resumes with 1 process and the reverse to the same continuation,
//! and a rank killed mid-run stops the job with an error naming it while the last checkpoint resumes.
mod common;
use common::*;
use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};
use tch::Tensor;
use vtp::train::checkpoint;

const DATA: &str = "synthetic:train?n=64&res=32";

/// A tiny tokenizer's latent cache under `dir`.
fn cache(dir: &Path) -> PathBuf {
    let model = init_tiny_model(dir, 1);
    let cache = dir.join("cache");
    assert_success(&dit_extract(&model, DATA, &cache, "32", &[]), "vtp dit extract");
    cache
}

/// `vtp launch --nproc-per-node 2 -- --threads 1 ARGS…`.
fn launch2(args: &[&str]) -> Output {
    vtp(&[&["launch", "--nproc-per-node", "2", "--", "--threads", "1"][..], args].concat())
}

/// `vtp dit train` of the tiny DiT on `cache` into `run` with `extra` overrides, on `ranks` processes.
fn dit_train_on(ranks: usize, cache: &Path, run: &Path, extra: &[&str]) -> Output {
    let args = [&["dit", "train", "--cache", s(cache), "--out", s(run)][..], DIT_TINY, extra].concat();
    match ranks {
        1 => vtp(&args),
        _ => launch2(&args),
    }
}

/// The newest checkpoint of `run`: its tensors and step.
fn newest_checkpoint(run: &Path) -> (HashMap<String, Tensor>, u64) {
    let dir = checkpoint::latest(run).unwrap().expect("a checkpoint");
    let (tensors, state) = checkpoint::load(&dir).unwrap();
    (tensors, state["step"].as_u64().unwrap())
}

/// Every tensor of `a` within `tol` of `b`'s in relative L2 error (absolute where `b` is 0); returns
/// the worst error.
fn assert_close(a: &HashMap<String, Tensor>, b: &HashMap<String, Tensor>, tol: f64, what: &str) -> f64 {
    let mut keys: Vec<&String> = a.keys().collect();
    keys.sort();
    assert_eq!(keys.len(), b.len(), "{what}: tensor names");
    let mut worst: f64 = 0.0;
    for k in keys {
        let (x, y) = (a[k].to_kind(tch::Kind::Double), b[k].to_kind(tch::Kind::Double));
        let denom = y.norm().double_value(&[]);
        let diff = (&x - &y).norm().double_value(&[]);
        let err = if denom > 0.0 { diff / denom } else { diff };
        assert!(err <= tol, "{what}: '{k}' differs by {err:e} (tolerance {tol:e})");
        worst = worst.max(err);
    }
    worst
}

#[test]
fn a_two_process_dit_step_equals_the_one_process_step() {
    let dir = tempfile::tempdir().unwrap();
    let cache = cache(dir.path());
    let steps = ["train.steps=1", "batch.size=64"];
    let one = dir.path().join("one");
    assert_success(&dit_train_on(1, &cache, &one, &steps), "1-process dit train");
    // Gradients all-reduced after the backward pass, then during it (DDP's Reducer).
    for overlap in ["false", "true"] {
        let two = dir.path().join(format!("two-overlap-{overlap}"));
        let o = dit_train_on(2, &cache, &two, &[&steps[..], &[&format!("dist.overlap={overlap}")]].concat());
        assert_success(&o, "2-process dit train");
        let ((a, sa), (b, sb)) = (newest_checkpoint(&two), newest_checkpoint(&one));
        assert_eq!((sa, sb), (1, 1));
        let worst = assert_close(&a, &b, 1e-5, "2 ranks vs 1 process after one step");
        eprintln!("overlap {overlap}: worst relative error of {} tensors: {worst:e}", a.len());
        // The logged loss is the global batch's, on rank 0 only (one metrics file, one line per step).
        let (la, lb) = (series(&two, "loss/total"), series(&one, "loss/total"));
        assert_eq!(la.len(), 1);
        for (x, y) in la.iter().zip(&lb) {
            assert!((x - y).abs() <= 1e-5 * y.abs(), "loss {x} vs {y}");
        }
    }
}

#[test]
fn checkpoints_resume_at_another_world_size() {
    let dir = tempfile::tempdir().unwrap();
    let cache = cache(dir.path());
    let steps = ["train.steps=2", "batch.size=64"];
    let straight = dir.path().join("straight");
    assert_success(&dit_train_on(1, &cache, &straight, &steps), "uninterrupted run");
    let (want, _) = newest_checkpoint(&straight);
    for (first, second) in [(2, 1), (1, 2)] {
        let run = dir.path().join(format!("{first}-then-{second}"));
        let head = [&steps[..], &["--stop-after", "1"]].concat();
        assert_success(&dit_train_on(first, &cache, &run, &head), "first half");
        assert_eq!(newest_checkpoint(&run).1, 1);
        let tail = [&steps[..], &["--resume"]].concat();
        assert_success(&dit_train_on(second, &cache, &run, &tail), "resumed half");
        let (got, step) = newest_checkpoint(&run);
        assert_eq!(step, 2);
        let worst = assert_close(&got, &want, 1e-5, &format!("{first} then {second} processes vs uninterrupted"));
        eprintln!("{first} then {second}: worst {worst:e}");
    }
}

#[test]
fn a_killed_rank_stops_the_job_and_the_last_checkpoint_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let cache = cache(dir.path());
    // Killed between the collectives of a step or inside the backward pass's bucket all-reduces.
    for overlap in ["false", "true"] {
        kill_a_rank_and_resume(&cache, &dir.path().join(format!("run-overlap-{overlap}")), overlap);
    }
}

/// A 2-process DiT run into `run` (`dist.overlap = overlap`) whose rank 1 is killed at step 5: the job
/// fails naming it within 25 s and its last checkpoint resumes on one process.
fn kill_a_rank_and_resume(cache: &Path, run: &Path, overlap: &str) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_vtp"))
        .args(["launch", "--nproc-per-node", "2", "--grace-s", "30", "--", "--threads", "1"])
        .args(["dit", "train", "--cache", s(cache), "--out", s(run)])
        .args(DIT_TINY)
        .args(["train.steps=100000", "checkpoint.every=2", "eval.every=0", "eval.grid_every=0"])
        .arg(format!("dist.overlap={overlap}"))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let mut lines = Vec::new();
    // Rank 0 logs every step (log.every = 1) when stderr is not a terminal: wait for step 5.
    while !lines.iter().any(|l: &String| l.starts_with("step 5/")) {
        let mut line = String::new();
        assert!(err.read_line(&mut line).unwrap() > 0, "the job ended early: {lines:?}");
        lines.push(line.trim_end().to_string());
    }
    let pid: i32 = lines.iter().find_map(|l| l.strip_prefix("launch: rank 1 pid ")).unwrap().parse().unwrap();
    let killed = Instant::now();
    // SAFETY: SIGKILL to the rank this test's launcher started.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut err, &mut rest).unwrap();
    assert!(!child.wait().unwrap().success());
    assert!(killed.elapsed() < Duration::from_secs(25), "took {:?}", killed.elapsed());
    let errors: Vec<&str> = rest.lines().filter(|l| l.starts_with("error: ")).collect();
    assert!(errors.iter().any(|l| l.contains(&format!("lost rank 1 (pid {pid})"))), "{rest}");
    assert!(errors.iter().any(|l| l.contains(&format!("rank 1 (pid {pid}) was killed by signal 9"))), "{rest}");
    let (_, step) = newest_checkpoint(run);
    assert!(step >= 4, "checkpoint at step {step}");
    // The last checkpoint is intact: one process resumes it and finishes a shortened run.
    let o = vtp(&["dit", "train", "--out", s(run), "--resume", &format!("train.steps={}", step + 2)]);
    assert_success(&o, "resume after the lost rank");
    assert_eq!(newest_checkpoint(run).1, step + 2);
}

#[test]
fn pretraining_runs_on_two_processes_and_resumes_with_two() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let base =
        [&["pretrain", "--preset", "tiny", "--out", s(&run)][..], PRETRAIN_STEP_SMALL, common::PRETRAIN_FAST].concat();
    assert_success(&launch2(&[&base[..], &["train.steps=2"]].concat()), "2-process pretrain");
    assert_eq!(series(&run, "loss/total").len(), 2, "rank 0 alone logs, one line per step");
    assert_eq!(newest_checkpoint(&run).1, 2);
    // Each process's data readers are in the checkpoint: another world size is refused clearly.
    let more = [&base[..], &["train.steps=3", "--resume"]].concat();
    assert_run_error(&vtp(&more), &["written by 2 processes", "resume it with 2"]);
    assert_success(&launch2(&more), "2-process resume");
    assert_eq!(newest_checkpoint(&run).1, 3);
}
