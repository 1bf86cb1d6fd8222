//! A c10d process group (libtorch's `TCPStore` + `ProcessGroupGloo`, through `shim.cpp`) and its
//! collectives on tch tensors: all-reduce (sum), broadcast, all-gather (with or without gradients) and
//! barrier. Asynchronous collectives return a [`Work`] handle; every C++ error comes back as an
//! `anyhow` error naming the operation.
use super::env::DistEnv;
use anyhow::{bail, Result};
use std::ffi::{c_char, c_void, CStr, CString};
use std::sync::Arc;
use std::time::Duration;
use tch::Tensor;

#[repr(C)]
struct RawGroup {
    _private: [u8; 0],
}

#[repr(C)]
struct RawWork {
    _private: [u8; 0],
}

#[repr(C)]
struct RawReducer {
    _private: [u8; 0],
}

type Tensor_ = c_void;

extern "C" {
    fn vtp_dist_free_error(error: *mut c_char);
    #[allow(clippy::too_many_arguments)]
    fn vtp_dist_new_gloo(
        host: *const c_char,
        port: u16,
        rank: i32,
        size: i32,
        serve_store: bool,
        store_timeout_ms: i64,
        timeout_ms: i64,
        hostname: *const c_char,
        out: *mut *mut RawGroup,
    ) -> *mut c_char;
    fn vtp_dist_free_group(group: *mut RawGroup);
    fn vtp_dist_free_work(work: *mut RawWork);
    fn vtp_dist_wait(work: *mut RawWork) -> *mut c_char;
    fn vtp_dist_all_reduce_sum(
        g: *mut RawGroup,
        t: *const *mut Tensor_,
        n: usize,
        out: *mut *mut RawWork,
    ) -> *mut c_char;
    fn vtp_dist_broadcast(
        g: *mut RawGroup,
        t: *const *mut Tensor_,
        n: usize,
        root: i32,
        out: *mut *mut RawWork,
    ) -> *mut c_char;
    fn vtp_dist_all_gather(g: *mut RawGroup, input: *mut Tensor_, out: *mut *mut Tensor_) -> *mut c_char;
    fn vtp_dist_gather_with_grad(g: *mut RawGroup, input: *mut Tensor_, out: *mut *mut Tensor_) -> *mut c_char;
    fn vtp_dist_barrier(g: *mut RawGroup) -> *mut c_char;
    fn vtp_dist_new_reducer(
        g: *mut RawGroup,
        params: *const *mut Tensor_,
        n: usize,
        bucket_bytes: i64,
        out: *mut *mut RawReducer,
    ) -> *mut c_char;
    fn vtp_dist_free_reducer(r: *mut RawReducer);
    fn vtp_dist_prepare_for_backward(r: *mut RawReducer, loss: *mut Tensor_) -> *mut c_char;
    fn vtp_dist_backward(loss: *mut Tensor_) -> *mut c_char;
}

/// Turns the shim's error (a malloc'd message or null) into a `Result`, naming `what` failed.
fn check(error: *mut c_char, what: &str) -> Result<()> {
    if error.is_null() {
        return Ok(());
    }
    // SAFETY: a non-null error is a NUL-terminated string the shim allocated for us to free.
    let message = unsafe { CStr::from_ptr(error) }.to_string_lossy().into_owned();
    unsafe { vtp_dist_free_error(error) };
    let first = message.lines().next().unwrap_or("").trim();
    // Gloo prefixes its source location and appends advice: keep the message between.
    let first = match first.strip_prefix('[').and_then(|r| r.split_once("] ")) {
        Some((location, rest)) if location.contains(".cc:") || location.contains(".cpp:") => rest,
        _ => first,
    };
    let first = first.split(" This is typically caused").next().unwrap_or(first).trim_end_matches('.');
    bail!("distributed {what} failed: {first}")
}

/// Whether process `pid` has ended (no such process, or a zombie not yet reaped by its parent).
fn process_gone(pid: i32) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    if unsafe { libc::kill(pid, 0) } != 0 {
        return true;
    }
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let state = stat.rsplit_once(") ").and_then(|(_, rest)| rest.chars().next());
    matches!(state, Some('Z' | 'X'))
}

/// Every rank's process id and machine (a hash of its hostname), gathered when the group forms, so
/// that a failed collective can name the ranks of this machine that are gone.
#[derive(Debug, Default)]
struct Peers {
    host: u64,
    list: Vec<(i32, u64)>,
}

impl Peers {
    /// A hash of this machine's hostname.
    fn this_host() -> u64 {
        use std::hash::{Hash, Hasher};
        let mut buf = [0u8; 256];
        // SAFETY: gethostname writes at most `buf.len()` bytes into `buf`.
        unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
        let mut h = std::collections::hash_map::DefaultHasher::new();
        buf.hash(&mut h);
        h.finish() >> 1
    }

    /// The ranks on this machine whose process no longer exists, as `rank R (pid P)`.
    fn gone_now(&self) -> Vec<String> {
        (self.list.iter().enumerate())
            .filter(|(_, (pid, host))| *host == self.host && process_gone(*pid))
            .map(|(rank, (pid, _))| format!("rank {rank} (pid {pid})"))
            .collect()
    }

    /// `"; lost rank 1 (pid 123): its process is gone"` for the ranks of [`Self::gone_now`]. A killed
    /// peer's sockets close while it is still exiting, so this looks again for up to a second before
    /// naming nobody.
    fn lost(&self) -> String {
        let mut gone = self.gone_now();
        for _ in 0..20 {
            if !gone.is_empty() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
            gone = self.gone_now();
        }
        match gone.len() {
            0 => String::new(),
            1 => format!("; lost {}: its process is gone", gone[0]),
            _ => format!("; lost {}: their processes are gone", gone.join(", ")),
        }
    }

    /// [`check`], naming the lost ranks in the error.
    fn check(&self, error: *mut c_char, what: &str) -> Result<()> {
        check(error, what).map_err(|e| anyhow::anyhow!("{e}{}", self.lost()))
    }
}

fn raw(t: &Tensor) -> *mut Tensor_ {
    t.as_ptr() as *mut Tensor_
}

/// How a process joins its group: where the store is, and how long to wait.
#[derive(Debug, Clone)]
pub struct GroupOptions {
    /// The rendezvous: rank, world size, store address.
    pub env: DistEnv,
    /// How long to wait for every rank to join (a rank that never starts fails after this).
    pub join_timeout: Duration,
    /// How long one collective may take (a stalled peer fails after this).
    pub timeout: Duration,
}

/// A c10d process group of `world` processes (Gloo over TCP); this process is `rank`.
pub struct ProcessGroup {
    raw: *mut RawGroup,
    rank: usize,
    world: usize,
    peers: Arc<Peers>,
}

// SAFETY: the c10d backend is thread-safe (its collectives are queued under its own lock); the handle
// is only freed on drop. Collectives must still be issued in the same order on every rank.
unsafe impl Send for ProcessGroup {}
unsafe impl Sync for ProcessGroup {}

impl ProcessGroup {
    /// Joins the group described by `opts` (rank 0 serves the store unless torchrun's agent does).
    pub fn gloo(opts: &GroupOptions) -> Result<Self> {
        let e = &opts.env;
        let host = CString::new(e.master_addr.clone())?;
        // One machine: Gloo binds the loopback address; several: its default interface.
        let device = CString::new(if e.is_loopback() { e.master_addr.as_str() } else { "" })?;
        let mut raw = std::ptr::null_mut();
        // SAFETY: the strings outlive the call; `raw` is written on success only.
        let error = unsafe {
            vtp_dist_new_gloo(
                host.as_ptr(),
                e.master_port,
                e.rank as i32,
                e.world_size as i32,
                e.serves_store(),
                opts.join_timeout.as_millis() as i64,
                opts.timeout.as_millis() as i64,
                device.as_ptr(),
                &mut raw,
            )
        };
        let what = format!("rendezvous at {}:{} (rank {} of {})", e.master_addr, e.master_port, e.rank, e.world_size);
        check(error, &what).map_err(|err| {
            let text = err.to_string();
            if text.contains("timed out") || text.contains("timeout") {
                let secs = opts.join_timeout.as_secs_f64();
                anyhow::anyhow!("distributed {what} failed: a rank did not join within {secs} s (dist.join_timeout_s)")
            } else {
                err
            }
        })?;
        let mut group = Self { raw, rank: e.rank, world: e.world_size, peers: Arc::new(Peers::default()) };
        let host = Peers::this_host();
        let me = Tensor::from_slice(&[std::process::id() as i64, host as i64]);
        let all = Vec::<i64>::try_from(&group.all_gather(&me)?)?;
        let list = all.chunks(2).map(|p| (p[0] as i32, p[1] as u64)).collect();
        group.peers = Arc::new(Peers { host, list });
        Ok(group)
    }

    /// This process's rank.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// The number of processes.
    pub fn world(&self) -> usize {
        self.world
    }

    /// Starts the in-place sum of `tensors` over the group (contiguous, same shapes on every rank).
    pub fn all_reduce_sum(&self, tensors: &[Tensor]) -> Result<Work> {
        let ptrs: Vec<*mut Tensor_> = tensors.iter().map(raw).collect();
        let mut work = std::ptr::null_mut();
        // SAFETY: the tensors are live for the call; c10d keeps its own references until the work ends.
        let error = unsafe { vtp_dist_all_reduce_sum(self.raw, ptrs.as_ptr(), ptrs.len(), &mut work) };
        self.peers.check(error, "all-reduce")?;
        Ok(Work { raw: work, what: "all-reduce", peers: self.peers.clone() })
    }

    /// Starts the in-place broadcast of `tensors` from rank `root`.
    pub fn broadcast(&self, tensors: &[Tensor], root: usize) -> Result<Work> {
        let ptrs: Vec<*mut Tensor_> = tensors.iter().map(raw).collect();
        let mut work = std::ptr::null_mut();
        // SAFETY: as in `all_reduce_sum`.
        let error = unsafe { vtp_dist_broadcast(self.raw, ptrs.as_ptr(), ptrs.len(), root as i32, &mut work) };
        self.peers.check(error, "broadcast")?;
        Ok(Work { raw: work, what: "broadcast", peers: self.peers.clone() })
    }

    /// Every rank's `input` concatenated along dim 0 in rank order (same shape on every rank); no
    /// gradient flows through it.
    pub fn all_gather(&self, input: &Tensor) -> Result<Tensor> {
        self.gather(input, vtp_dist_all_gather, "all-gather")
    }

    /// OpenCLIP's `gather_with_grad`: as [`Self::all_gather`], but differentiable: the gradient of this
    /// rank's rows is the sum over ranks of the gradients their copies receive.
    pub fn gather_with_grad(&self, input: &Tensor) -> Result<Tensor> {
        self.gather(input, vtp_dist_gather_with_grad, "all-gather with gradients")
    }

    fn gather(
        &self,
        input: &Tensor,
        f: unsafe extern "C" fn(*mut RawGroup, *mut Tensor_, *mut *mut Tensor_) -> *mut c_char,
        what: &str,
    ) -> Result<Tensor> {
        let mut out = std::ptr::null_mut();
        // SAFETY: `input` is live; on success `out` is a new at::Tensor we own.
        self.peers.check(unsafe { f(self.raw, raw(input), &mut out) }, what)?;
        Ok(unsafe { Tensor::from_ptr(out.cast()) })
    }

    /// Waits until every rank reaches this point.
    pub fn barrier(&self) -> Result<()> {
        // SAFETY: a live group.
        self.peers.check(unsafe { vtp_dist_barrier(self.raw) }, "barrier")
    }

    /// DDP's gradient reducer over `params` (the same list, in the same order, on every rank) with
    /// buckets of `bucket_bytes`: see [`Reducer`].
    pub fn reducer(&self, params: &[Tensor], bucket_bytes: usize) -> Result<Reducer> {
        let ptrs: Vec<*mut Tensor_> = params.iter().map(raw).collect();
        let mut out = std::ptr::null_mut();
        // SAFETY: the tensors are live for the call; the Reducer keeps its own references to them.
        let error = unsafe { vtp_dist_new_reducer(self.raw, ptrs.as_ptr(), ptrs.len(), bucket_bytes as i64, &mut out) };
        self.peers.check(error, "gradient reducer setup")?;
        Ok(Reducer { raw: out, peers: self.peers.clone() })
    }
}

/// DDP's `c10d::Reducer` over a fixed list of parameters: their gradients are bucketed as DDP buckets
/// them (reverse parameter order, a first bucket of 1 MiB), each bucket's all-reduce starts as soon as
/// autograd has produced its gradients, overlapping the rest of the backward pass, and when the pass
/// ends each gradient is its mean over the ranks. Parameters a step leaves unused are found from the
/// loss (`find_unused_parameters`) and keep no gradient.
pub struct Reducer {
    raw: *mut RawReducer,
    peers: Arc<Peers>,
}

// SAFETY: the Reducer guards its state with its own mutex; the handle is only freed on drop.
unsafe impl Send for Reducer {}
unsafe impl Sync for Reducer {}

impl Reducer {
    /// `loss.backward()` with the parameters' gradients averaged over the ranks while it runs.
    pub fn backward(&self, loss: &Tensor) -> Result<()> {
        // SAFETY: a live reducer and loss; errors (a lost rank during a bucket's all-reduce) come back.
        self.peers.check(unsafe { vtp_dist_prepare_for_backward(self.raw, raw(loss)) }, "gradient reducer")?;
        self.peers.check(unsafe { vtp_dist_backward(raw(loss)) }, "backward with gradient all-reduce")
    }
}

impl Drop for Reducer {
    fn drop(&mut self) {
        // SAFETY: created by `vtp_dist_new_reducer`, freed once.
        unsafe { vtp_dist_free_reducer(self.raw) }
    }
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        // SAFETY: created by `vtp_dist_new_gloo`, freed once.
        unsafe { vtp_dist_free_group(self.raw) }
    }
}

/// A running collective; [`Work::wait`] returns its result (bounded by the group's timeout).
pub struct Work {
    raw: *mut RawWork,
    what: &'static str,
    peers: Arc<Peers>,
}

impl Work {
    /// Blocks until the collective finished; its error (a lost peer, a timeout) if it failed.
    pub fn wait(self) -> Result<()> {
        // SAFETY: a live work handle, freed on drop.
        self.peers.check(unsafe { vtp_dist_wait(self.raw) }, self.what)
    }
}

impl Drop for Work {
    fn drop(&mut self) {
        // SAFETY: released by the shim to us, freed once.
        unsafe { vtp_dist_free_work(self.raw) }
    }
}
