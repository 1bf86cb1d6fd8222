//! Multi-process c10d (issue 15): the collectives on 2 Gloo ranks over 127.0.0.1 (`vtp dist-check`,
//! launched by `vtp launch` and by the wheel's `torchrun`), the launcher environment, a rank killed
//! mid-collective and a rank that never starts.
mod common;
use common::*;
use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};
use vtp::dist::DistEnv;

/// The JSON line of each rank in `vtp dist-check`'s stdout, by rank.
fn dist_check_reports(o: &Output) -> HashMap<u64, serde_json::Value> {
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .map(|v| (v["rank"].as_u64().unwrap(), v))
        .collect()
}

/// Both ranks report every collective exact (error 0) and a positive all-reduce bandwidth.
fn assert_exact_collectives(o: &Output) {
    assert_success(o, "dist-check");
    let reports = dist_check_reports(o);
    assert_eq!(reports.len(), 2, "one report per rank: {}", String::from_utf8_lossy(&o.stdout));
    for (rank, r) in &reports {
        assert_eq!(r["world"], 2);
        for key in ["all_reduce_error", "broadcast_error", "all_gather_error", "gather_grad_error"] {
            assert_eq!(r[key].as_f64(), Some(0.0), "rank {rank}: {key} in {r}");
        }
        assert!(r["all_reduce_gb_per_s"].as_f64().unwrap() > 0.0);
    }
}

#[test]
fn collectives_are_exact_under_vtp_launch() {
    let o = vtp(&["launch", "--nproc-per-node", "2", "--", "dist-check", "--mib", "1", "--iters", "2"]);
    assert_exact_collectives(&o);
    let err = stderr(&o);
    assert!(err.contains("launch: rank 0 pid") && err.contains("launch: rank 1 pid"), "{err}");
}

#[test]
fn collectives_are_exact_under_torchrun() {
    // torchrun serves the store itself (TORCHELASTIC_USE_AGENT_STORE): rank 0 must join as a client.
    let torchrun = venv_python().with_file_name("torchrun");
    let o = Command::new(torchrun)
        .args(["--nproc-per-node", "2", "--no-python", env!("CARGO_BIN_EXE_vtp"), "--threads", "1"])
        .args(["dist-check", "--mib", "1", "--iters", "2"])
        .output()
        .unwrap();
    assert_exact_collectives(&o);
}

/// Waits until `child`'s stderr has printed `ready` lines of both ranks; returns everything read.
fn read_until_ready(stderr: &mut impl BufRead) -> Vec<String> {
    let mut lines = Vec::new();
    while lines.iter().filter(|l: &&String| l.ends_with("ready")).count() < 2 {
        let mut line = String::new();
        assert!(stderr.read_line(&mut line).unwrap() > 0, "the job ended before both ranks were ready: {lines:?}");
        lines.push(line.trim_end().to_string());
    }
    lines
}

#[test]
fn a_killed_rank_is_named_and_the_others_exit() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_vtp"))
        .args(["--threads", "1", "launch", "--nproc-per-node", "2", "--grace-s", "20", "--"])
        .args(["dist-check", "--mib", "1", "--iters", "1", "--hold-s", "120"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let lines = read_until_ready(&mut err);
    let pid: i32 = lines.iter().find_map(|l| l.strip_prefix("launch: rank 1 pid ")).unwrap().parse().unwrap();
    let killed = Instant::now();
    // SAFETY: SIGKILL to the rank this test's launcher started.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut err, &mut rest).unwrap();
    let status = child.wait().unwrap();
    // Rank 0 notices the lost peer itself, well inside the launcher's 20 s grace period.
    assert!(killed.elapsed() < Duration::from_secs(15), "took {:?}", killed.elapsed());
    assert!(!status.success());
    let errors: Vec<&str> = rest.lines().filter(|l| l.starts_with("error: ")).collect();
    assert_eq!(errors.len(), 2, "rank 0's error and the launcher's: {rest}");
    assert!(
        errors.iter().any(|l| l.contains("all-reduce failed") && l.contains(&format!("lost rank 1 (pid {pid})"))),
        "{rest}"
    );
    assert!(
        errors.iter().any(|l| l.contains(&format!("rank 1 (pid {pid}) was killed by signal 9 (SIGKILL)"))),
        "{rest}"
    );
}

#[test]
fn a_rank_that_never_starts_times_out() {
    let start = Instant::now();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let o = Command::new(env!("CARGO_BIN_EXE_vtp"))
        .args(["--threads", "1", "dist-check", "--join-timeout-s", "2"])
        .envs([("RANK", "0"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "127.0.0.1")])
        .env("MASTER_PORT", port.to_string())
        .output()
        .unwrap();
    assert!(start.elapsed() < Duration::from_secs(30), "took {:?}", start.elapsed());
    // libtorch logs its own `[W…] socket.cpp` warning before the error line.
    assert_one_line_error_skipping(&o, &["[W"], &["rendezvous at 127.0.0.1", "rank 0 of 2", "did not join within 2 s"]);
}

fn vars(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

#[test]
fn the_launcher_environment_is_read_as_env_does() {
    let torchrun = vars(&[
        ("RANK", "3"),
        ("WORLD_SIZE", "4"),
        ("LOCAL_RANK", "1"),
        ("MASTER_ADDR", "10.0.0.2"),
        ("MASTER_PORT", "1234"),
        ("TORCHELASTIC_USE_AGENT_STORE", "True"),
    ]);
    let e = DistEnv::from_vars(&torchrun).unwrap().unwrap();
    assert_eq!((e.rank, e.world_size, e.local_rank, e.master_port), (3, 4, 1, 1234));
    assert!(e.agent_store && !e.serves_store() && !e.is_loopback());
    let slurm = vars(&[
        ("SLURM_PROCID", "0"),
        ("SLURM_NTASKS", "8"),
        ("SLURM_LOCALID", "0"),
        ("SLURM_LAUNCH_NODE_IPADDR", "127.0.0.1"),
    ]);
    let e = DistEnv::from_vars(&slurm).unwrap().unwrap();
    assert_eq!((e.rank, e.world_size, e.master_addr.as_str(), e.master_port), (0, 8, "127.0.0.1", 29500));
    assert!(e.serves_store() && e.is_loopback());
    assert_eq!(DistEnv::from_vars(&vars(&[])).unwrap(), None);
    assert_eq!(DistEnv::from_vars(&vars(&[("RANK", "0"), ("WORLD_SIZE", "1")])).unwrap(), None);
    let bad = |pairs: &[(&str, &str)], needle: &str| {
        let e = DistEnv::from_vars(&vars(pairs)).unwrap_err().to_string();
        assert!(e.contains(needle), "{e:?} should mention {needle:?}");
    };
    bad(&[("RANK", "2"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "h")], "outside the world of 2");
    bad(&[("RANK", "x"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "h")], "RANK=\"x\"");
    bad(&[("RANK", "0"), ("WORLD_SIZE", "2")], "MASTER_ADDR is not set");
    bad(&[("RANK", "0"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "h"), ("MASTER_PORT", "99999")], "MASTER_PORT");
}
