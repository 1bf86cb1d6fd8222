//! vtp-rs: the VTP visual tokenizer ("Towards Scalable Pre-training of Visual Tokenizers for
//! Generation", MiniMax + HUST Vision Lab, 2025) on libtorch through tch.
pub mod check;
pub mod cli;
pub mod config;
pub mod data;
pub mod dist;
pub mod dit;
pub mod eval;
pub mod experiments;
pub mod hub;
pub mod io;
pub mod kernels;
pub mod model;
pub mod tokenizer;
pub mod torch_load;
pub mod train;
