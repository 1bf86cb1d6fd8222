//! Multi-process data parallelism on libtorch's c10d (the engine PyTorch DDP runs on): the launcher's
//! environment ([`env`]), process groups, collectives and DDP's gradient `Reducer` through a small C++
//! shim ([`group`]), and DDP's parameter broadcast and bucketed gradient averaging ([`ddp`]).
pub mod ddp;
pub mod env;
pub mod group;

pub use ddp::{DataParallel, DistConfig};
pub use env::DistEnv;
pub use group::{GroupOptions, ProcessGroup, Reducer, Work};
