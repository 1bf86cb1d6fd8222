//! Generation (docs/design.md §5.4, §8): LightningDiT trained by flow matching on VTP latents — the latent
//! cache and its statistics, the model, the transport (linear path, time sampling, loss), the ODE
//! sampler, and the training run.
pub mod cache;
pub mod config;
pub mod generate;
pub mod model;
mod released_stats;
pub mod sampler;
pub mod stats;
pub mod train;
pub mod transport;
