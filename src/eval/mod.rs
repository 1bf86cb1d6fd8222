//! Evaluation (docs/design.md §5): zero-shot classification, linear probing, and reconstruction metrics
//! (PSNR, SSIM, LPIPS, rFID with the FID Inception network and pytorch-fid's Fréchet distance),
//! gathered in one typed report.
pub mod classnames;
pub mod fid_stats;
pub mod frechet;
pub mod inception;
pub mod linear_probe;
pub mod lpips;
pub mod metrics;
pub mod probe_pipeline;
pub mod recon;
pub mod report;
pub mod zero_shot;
