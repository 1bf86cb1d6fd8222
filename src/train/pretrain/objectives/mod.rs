//! The pre-training objectives (docs/design.md §4.1, §4.4, §4.6), one per file, as DINOv2's `loss/` folder.
pub mod clip;
pub mod dino;
pub mod ibot;
pub mod koleo;
pub mod recon;
