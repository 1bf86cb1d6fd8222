//! Evaluation (spec §5): zero-shot classification, linear probing, and reconstruction metrics
//! (PSNR, SSIM, LPIPS, rFID with the FID Inception network and pytorch-fid's Fréchet distance).
pub mod fid_stats;
pub mod frechet;
pub mod metrics;
