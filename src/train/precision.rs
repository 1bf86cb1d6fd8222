//! Mixed precision (`[train] precision`, `tf32`): the forward passes of a `bf16` run execute under
//! libtorch's autocast (`torch.autocast(device_type, dtype=torch.bfloat16)`, through
//! `aten.cpp`), so matmuls, convolutions and attention run in bf16 while the master weights,
//! their gradients and the optimiser stay f32. Norms compute in f32 ([`crate::model::norm`]), and
//! every trainer takes its model outputs back to f32 ([`f32`]) before the losses, the softmax
//! statistics of the teacher targets and KoLeo (the recipe of DINOv2's and OpenCLIP's AMP training).
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

extern "C" {
    fn vtp_autocast_enter(cuda: bool, was_enabled: *mut bool, was_dtype: *mut i32) -> bool;
    fn vtp_autocast_exit(cuda: bool, was_enabled: bool, was_dtype: i32) -> bool;
    fn vtp_set_tf32(allow: bool) -> bool;
    fn vtp_autocast_enabled(cuda: bool) -> bool;
}

/// The arithmetic of a run's forward passes.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// Everything in float32 (the default; bit-exact with the PyTorch references).
    #[default]
    F32,
    /// bf16 autocast forward passes, f32 master weights, norms, losses and optimiser.
    Bf16,
}

/// An open autocast region; leaving it (drop) restores the state before it.
struct AutocastRegion {
    cuda: bool,
    was_enabled: bool,
    was_dtype: i32,
}

impl AutocastRegion {
    fn enter(device: Device) -> Result<Self> {
        let cuda = device.is_cuda();
        let (mut was_enabled, mut was_dtype) = (false, 0);
        // SAFETY: the shim writes the two out-parameters and catches every C++ exception.
        if !unsafe { vtp_autocast_enter(cuda, &mut was_enabled, &mut was_dtype) } {
            bail!("libtorch refused a bf16 autocast region on {device:?}");
        }
        Ok(Self { cuda, was_enabled, was_dtype })
    }
}

impl Drop for AutocastRegion {
    fn drop(&mut self) {
        // SAFETY: restores the flags read on entry; the shim catches every C++ exception.
        unsafe { vtp_autocast_exit(self.cuda, self.was_enabled, self.was_dtype) };
    }
}

impl Precision {
    /// The config value (`f32`, `bf16`).
    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::Bf16 => "bf16",
        }
    }

    /// Runs `forward` (a model's forward pass on `device`) in this precision: as it is in `f32`,
    /// under bf16 autocast in `bf16`. Its outputs may then be bf16: see [`f32`].
    pub fn autocast<T>(self, device: Device, forward: impl FnOnce() -> T) -> Result<T> {
        match self {
            Self::F32 => Ok(forward()),
            Self::Bf16 => {
                let _region = AutocastRegion::enter(device)?;
                Ok(forward())
            }
        }
    }
}

/// `t` in float32 (the same tensor when it already is), where the losses take a model's output.
pub fn f32(t: &Tensor) -> Tensor {
    t.to_kind(Kind::Float)
}

/// Whether an autocast region is open on `device` (this thread).
pub fn autocast_enabled(device: Device) -> bool {
    // SAFETY: reads a thread-local flag.
    unsafe { vtp_autocast_enabled(device.is_cuda()) }
}

/// Lets CUDA float32 matmuls and convolutions run on TF32 tensor cores (`train.tf32`; PyTorch's
/// `torch.backends.{cuda.matmul,cudnn}.allow_tf32`). No effect on the CPU.
pub fn set_tf32(allow: bool) -> Result<()> {
    // SAFETY: sets two global flags; the shim catches every C++ exception.
    if !unsafe { vtp_set_tf32(allow) } {
        bail!("libtorch refused to set the TF32 flags");
    }
    Ok(())
}
