//! Training (spec §4): the objectives, the optimiser and schedules, and the run machinery
//! (config, checkpoints, metrics, plots) shared by every trainer (`vtp pretrain`,
//! `vtp finetune-decoder`, and later `vtp dit train`).
pub mod batch;
pub mod checkpoint;
pub mod config;
pub mod diagnostics;
pub mod dino_head;
pub mod discriminator;
pub mod ema;
pub mod feed;
pub mod finetune;
pub mod metrics;
pub mod objectives;
pub mod online;
pub mod optim;
pub mod passes;
pub mod plots;
pub mod precision;
pub mod pretrain;
pub mod profile;
pub mod run;
pub mod schedule;
pub mod teacher;
