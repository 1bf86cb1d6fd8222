//! `vtp launch` (torchrun's single-node job, without Python) and `vtp dist-check` (every collective of
//! the c10d process group checked against its exact result, and the all-reduce bandwidth).
use crate::dist::{DataParallel, DistConfig};
use anyhow::{bail, Context, Result};
use clap::Args;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, Command, ExitStatus};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tch::{Kind, Tensor};

#[derive(Args, Debug)]
pub struct LaunchArgs {
    /// Processes to start on this machine (ranks 0..N).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..))]
    nproc_per_node: u32,
    /// Port of rank 0's rendezvous store on 127.0.0.1 (default: a free port).
    #[arg(long)]
    master_port: Option<u16>,
    /// After a rank fails, seconds the others get to exit on their own before they are terminated.
    #[arg(long, default_value_t = 30)]
    grace_s: u64,
    /// The `vtp` command every rank runs, after `--`, e.g. `-- pretrain --preset tiny --out runs/x`.
    #[arg(last = true, required = true, value_name = "COMMAND")]
    command: Vec<String>,
}

/// A free TCP port on 127.0.0.1 (bound and released; the store binds it right after).
fn free_port() -> Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("cannot find a free port")?;
    Ok(listener.local_addr()?.port())
}

/// How a rank ended, in words.
fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with code {code}"),
        (None, Some(9)) => "was killed by signal 9 (SIGKILL)".into(),
        (None, Some(s)) => format!("was killed by signal {s}"),
        _ => "ended".into(),
    }
}

fn signal(children: &[(usize, Child)], sig: i32) {
    for (_, c) in children {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(c.id() as i32, sig) };
    }
}

/// Starts `nproc_per_node` ranks of `vtp COMMAND` with torchrun's environment (`RANK`, `LOCAL_RANK`,
/// `WORLD_SIZE`, `LOCAL_WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT`; `OMP_NUM_THREADS` = cores / N unless
/// set), forwards SIGINT / SIGTERM to them, and fails when any rank fails, naming it; the others get
/// `--grace-s` seconds to exit on their own (reporting the lost peer), then are terminated.
pub fn launch(a: &LaunchArgs) -> Result<()> {
    let exe = std::env::current_exe()?;
    let n = a.nproc_per_node as usize;
    let port = match a.master_port {
        Some(p) => p,
        None => free_port()?,
    };
    let cores = std::thread::available_parallelism().map_or(1, |c| c.get());
    let threads = (cores / n).max(1).to_string();
    let received = Arc::new(AtomicUsize::new(0));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        let r = received.clone();
        // SAFETY: the handler only stores to an atomic.
        unsafe { signal_hook::low_level::register(sig, move || r.store(sig as usize, Ordering::SeqCst)) }
            .context("cannot install the signal handler")?;
    }
    let mut children = Vec::with_capacity(n);
    for rank in 0..n {
        let mut cmd = Command::new(&exe);
        cmd.args(&a.command)
            .env("RANK", rank.to_string())
            .env("LOCAL_RANK", rank.to_string())
            .env("WORLD_SIZE", n.to_string())
            .env("LOCAL_WORLD_SIZE", n.to_string())
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", port.to_string())
            .env_remove("TORCHELASTIC_USE_AGENT_STORE")
            .process_group(0);
        if std::env::var_os("OMP_NUM_THREADS").is_none() {
            cmd.env("OMP_NUM_THREADS", &threads);
        }
        let child = cmd.spawn().with_context(|| format!("cannot start rank {rank} ('{}')", exe.display()))?;
        eprintln!("launch: rank {rank} pid {}", child.id());
        children.push((rank, child));
    }
    supervise(children, &received, Duration::from_secs(a.grace_s))
}

/// Waits for every rank; the first failure (by time) is the error.
fn supervise(mut running: Vec<(usize, Child)>, received: &AtomicUsize, grace: Duration) -> Result<()> {
    let mut first_failure: Option<(usize, u32, ExitStatus, Instant)> = None;
    let mut forwarded = 0usize;
    let mut terminated = false;
    while !running.is_empty() {
        let sig = received.load(Ordering::SeqCst);
        if sig != 0 && sig != forwarded {
            signal(&running, sig as i32);
            forwarded = sig;
        }
        let mut still = Vec::with_capacity(running.len());
        for (rank, mut child) in running {
            match child.try_wait()? {
                Some(status) if !status.success() && first_failure.is_none() => {
                    first_failure = Some((rank, child.id(), status, Instant::now()));
                }
                Some(_) => {}
                None => still.push((rank, child)),
            }
        }
        running = still;
        if let Some((_, _, _, at)) = first_failure {
            if !terminated && at.elapsed() > grace {
                signal(&running, libc::SIGTERM);
                terminated = true;
            } else if terminated && at.elapsed() > grace + Duration::from_secs(10) {
                signal(&running, libc::SIGKILL);
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    match first_failure {
        Some((rank, pid, status, _)) => bail!("rank {rank} (pid {pid}) {}", describe(status)),
        None => Ok(()),
    }
}

#[derive(Args, Debug)]
pub struct DistCheckArgs {
    /// Size of the all-reduce whose bandwidth is measured, in MiB.
    #[arg(long, default_value_t = 16.0)]
    mib: f64,
    /// Timed all-reduces of that size.
    #[arg(long, default_value_t = 5)]
    iters: usize,
    /// Afterwards, keep all-reducing a small tensor for this many seconds (a soak test; a lost peer
    /// ends it with an error).
    #[arg(long, default_value_t = 0.0)]
    hold_s: f64,
    #[command(flatten)]
    dist: DistConfig,
}

/// The largest absolute difference between `got` and `want`.
fn max_error(got: &Tensor, want: &Tensor) -> f64 {
    (got - want).abs().max().double_value(&[])
}

/// `vtp dist-check`: joins the group from the launcher's environment, checks all-reduce, broadcast,
/// all-gather, the all-gather's gradient and barrier against their exact results, times the
/// all-reduce, and prints one JSON line per rank. Fails when any result is off.
pub fn dist_check(a: &DistCheckArgs) -> Result<()> {
    let dp = DataParallel::join(&a.dist)?;
    let group = dp.group().context("dist-check needs a launcher (vtp launch, torchrun or srun) with WORLD_SIZE > 1")?;
    let (r, w) = (group.rank() as f64, group.world() as f64);
    let opts = (Kind::Float, tch::Device::Cpu);
    let sum_of_ranks_plus_one = w * (w + 1.0) / 2.0;

    let t = Tensor::full([1000], r + 1.0, opts);
    group.all_reduce_sum(&[t.shallow_clone()])?.wait()?;
    let all_reduce = max_error(&t, &Tensor::full([1000], sum_of_ranks_plus_one, opts));

    let root = group.world() - 1;
    let t = Tensor::full([7], r, opts);
    group.broadcast(&[t.shallow_clone()], root)?.wait()?;
    let broadcast = max_error(&t, &Tensor::full([7], root as f64, opts));

    let rows = |rank: f64| Tensor::arange(6, opts).view([3, 2]) + 10.0 * rank;
    let gathered = group.all_gather(&rows(r))?;
    let want = Tensor::cat(&(0..group.world()).map(|q| rows(q as f64)).collect::<Vec<_>>(), 0);
    let all_gather = max_error(&gathered, &want);

    // loss_r = Σ (r + 1) · w ⊙ gather(x): the gradient of this rank's rows is Σ_r (r + 1) · w[rows].
    let x = rows(r).set_requires_grad(true);
    let weights = Tensor::arange(6 * group.world() as i64, opts).view([-1, 2]);
    let g = tch::with_grad(|| group.gather_with_grad(&x))?;
    tch::with_grad(|| (&g * &weights * (r + 1.0)).sum(None).backward());
    let mine = weights.narrow(0, 3 * group.rank() as i64, 3) * sum_of_ranks_plus_one;
    let gather_grad = max_error(&x.grad(), &mine);

    group.barrier()?;
    let n = ((a.mib * 1024.0 * 1024.0 / 4.0) as i64).max(1);
    let big = Tensor::ones([n], opts);
    let start = Instant::now();
    for _ in 0..a.iters {
        group.all_reduce_sum(&[big.shallow_clone()])?.wait()?;
    }
    let secs = start.elapsed().as_secs_f64().max(1e-9);
    let gbps = (n * 4) as f64 * a.iters as f64 / secs / 1e9;

    let hold = Instant::now();
    let small = Tensor::ones([16], opts);
    eprintln!("rank {} ready", group.rank());
    while hold.elapsed().as_secs_f64() < a.hold_s {
        group.all_reduce_sum(&[small.shallow_clone()])?.wait()?;
        std::thread::sleep(Duration::from_millis(10));
    }
    let report = serde_json::json!({
        "rank": group.rank(), "world": group.world(), "all_reduce_error": all_reduce,
        "broadcast_error": broadcast, "all_gather_error": all_gather, "gather_grad_error": gather_grad,
        "all_reduce_mib": a.mib, "all_reduce_gb_per_s": gbps,
    });
    println!("{report}");
    if [all_reduce, broadcast, all_gather, gather_grad].iter().any(|e| *e != 0.0) {
        bail!("rank {}: a collective returned a wrong result: {report}", group.rank());
    }
    Ok(())
}
