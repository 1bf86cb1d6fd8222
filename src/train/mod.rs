//! Training: the machinery every trainer shares, and one folder per trainer holding only what is its
//! own. Shared: the run loop with its [`run::Trainer`] trait and [`run::RunConfig`], the step core
//! ([`step`]: the guarded backward pass and the step seed), the common config sections and the TOML
//! machinery, checkpoints, metrics, plots, the optimiser, schedules, precision, EMA, the data feed,
//! online evaluation and step profiles. Trainers: [`pretrain`] (stage 1, `vtp pretrain`) and
//! [`finetune`] (stage 2, `vtp finetune-decoder`); the DiT trainer lives with its model in `crate::dit`.
//! A new trainer is one folder: a config implementing [`run::RunConfig`] and a [`run::Trainer`].
pub mod checkpoint;
pub mod config;
pub mod ema;
pub mod feed;
pub mod finetune;
pub mod metrics;
pub mod online;
pub mod optim;
pub mod plots;
pub mod precision;
pub mod pretrain;
pub mod profile;
pub mod run;
pub mod schedule;
pub mod step;
