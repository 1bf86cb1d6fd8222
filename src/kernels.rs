//! Which CPU kernels libtorch runs: the machine's own (`native`) or pinned to AVX2 (`avx2`).
//!
//! float32 results depend on the kernels: on an AVX-512 CPU, oneDNN's matmul and ATen's vectorised
//! kernels round differently from AVX2 (~1e-7 relative), and the official model's bf16 RoPE rotation
//! (docs/design.md §1, §9) amplifies those ulps to ~1e-4 in decoded images. The fixtures and most reference dumps
//! come from AVX2 machines; with both variables of [`AVX2_PIN`] set before libtorch starts, any x86-64
//! CPU computes exactly what an AVX2 CPU computes (error 0 on every fixture). libtorch reads them once,
//! at start, so pinning a running process means re-executing it with them set ([`Kernels::apply`]).
use anyhow::{bail, Context, Result};
use std::str::FromStr;

/// The environment that pins libtorch to AVX2: oneDNN's ISA cap and ATen's dispatch capability
/// (`ONEDNN_MAX_CPU_ISA` alone leaves 2.3e-7 differences on AVX-512; both are needed).
pub const AVX2_PIN: [(&str, &str); 2] = [("ONEDNN_MAX_CPU_ISA", "AVX2"), ("ATEN_CPU_CAPABILITY", "avx2")];

/// Kernel selection of a `vtp` process (`--kernels`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernels {
    /// Whatever libtorch picks on this CPU (and the environment says): the fastest.
    Native,
    /// oneDNN and ATen capped at AVX2: bit-identical to an AVX2 machine.
    Avx2,
}

impl FromStr for Kernels {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "native" => Ok(Kernels::Native),
            "avx2" => Ok(Kernels::Avx2),
            other => bail!("unknown --kernels value '{other}' (expected native or avx2)"),
        }
    }
}

/// Makes libtorch run every kernel called from the calling thread on that thread alone: its
/// OpenMP thread count becomes 1, so it never starts a parallel region (a team of its own).
///
/// For the threads that help the training thread (data readers, the batch builder, rayon's pool).
/// With libgomp, a live thread that once started a parallel region keeps its own team, and as soon
/// as more threads are managed than there are CPUs libgomp stops spinning between parallel regions
/// in *every* team (100 spins, then a futex sleep): the training thread's thousands of small
/// kernels per step then each pay a sleep and a wake-up. Measured on 2 cores, the tiny pre-training
/// step: 0.32 s with 11 k context switches/s instead of 0.15 s, and plain PyTorch slows the same way
/// when one of its threads keeps a team (README "Performance"). A no-op without OpenMP.
pub fn serial_kernels_on_this_thread() {
    // ATen sets a thread's OpenMP count from the global intra-op count on its first use there;
    // trigger that now so that it cannot undo the count set below.
    let _ = tch::get_num_threads();
    // SAFETY: `dlsym` with a NUL-terminated name; the symbol, when present, is OpenMP's
    // `void omp_set_num_threads(int)`, which only sets the calling thread's count.
    unsafe {
        let symbol = libc::dlsym(libc::RTLD_DEFAULT, c"omp_set_num_threads".as_ptr());
        if !symbol.is_null() {
            let set_num_threads: unsafe extern "C" fn(libc::c_int) = std::mem::transmute(symbol);
            set_num_threads(1);
        }
    }
}

/// Whether both variables of [`AVX2_PIN`] already hold their pinned values in this process.
pub fn is_pinned() -> bool {
    AVX2_PIN.iter().all(|(key, value)| std::env::var(key).is_ok_and(|v| v.eq_ignore_ascii_case(value)))
}

/// Whether this CPU can run AVX2 kernels.
pub fn cpu_has_avx2() -> bool {
    #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
    {
        std::arch::is_x86_feature_detected!("avx2")
    }
    #[cfg(not(any(target_arch = "x86", target_arch = "x86_64")))]
    {
        false
    }
}

/// Refuses AVX2 pinning on a CPU without AVX2 (`has_avx2` = [`cpu_has_avx2`]).
pub fn require_avx2(has_avx2: bool) -> Result<()> {
    if !has_avx2 {
        bail!(
            "--kernels avx2 needs a CPU with AVX2, and this one has none: compare with --kernels native \
             against a dump made on this machine"
        );
    }
    Ok(())
}

impl Kernels {
    /// Makes this process run on the selected kernels; call before anything touches libtorch.
    /// `Native` changes nothing; `Avx2` re-executes the program with [`AVX2_PIN`] set (same arguments,
    /// same pid, so signals and the exit status are the program's own) unless already pinned.
    pub fn apply(self) -> Result<()> {
        if self == Kernels::Native || is_pinned() {
            return Ok(());
        }
        require_avx2(cpu_has_avx2())?;
        reexec_pinned()
    }
}

#[cfg(unix)]
fn reexec_pinned() -> Result<()> {
    use std::os::unix::process::CommandExt;
    let exe = std::env::current_exe().context("cannot find the running executable to pin its kernels")?;
    let err = std::process::Command::new(&exe).args(std::env::args_os().skip(1)).envs(AVX2_PIN).exec();
    Err(err).with_context(|| format!("cannot re-execute '{}' with AVX2 kernels", exe.display()))
}

#[cfg(not(unix))]
fn reexec_pinned() -> Result<()> {
    bail!("--kernels avx2 re-executes the program and is only supported on Unix; set {AVX2_PIN:?} instead")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_two_kernel_sets_and_names_a_bad_one() {
        assert_eq!("native".parse::<Kernels>().unwrap(), Kernels::Native);
        assert_eq!("avx2".parse::<Kernels>().unwrap(), Kernels::Avx2);
        let err = "avx512".parse::<Kernels>().unwrap_err().to_string();
        assert!(err.contains("'avx512'") && err.contains("native or avx2"), "{err}");
    }

    #[test]
    fn avx2_is_refused_on_a_cpu_without_it_in_one_line() {
        let err = require_avx2(false).unwrap_err().to_string();
        assert!(err.contains("needs a CPU with AVX2") && !err.contains('\n'), "{err}");
        assert!(require_avx2(true).is_ok());
    }
}
