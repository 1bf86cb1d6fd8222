//! `vtp bench`: images/s of `reconstruct` (encode + decode under no-grad) on random input, printed as
//! one JSON line in the format of `../shared/bench/pytorch_vtp.py` so both can be compared.
use super::ModelArgs;
use anyhow::Result;
use clap::Args;
use std::time::Instant;
use tch::{Device, Kind, Tensor};

/// Arguments of `vtp bench`.
#[derive(Args, Debug)]
pub struct BenchArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Image side.
    #[arg(long, default_value_t = 256)]
    size: i64,
    /// Batch size.
    #[arg(long, default_value_t = 4)]
    batch: i64,
    /// Timed iterations (the median is reported).
    #[arg(long, default_value_t = 5)]
    iters: usize,
    /// Untimed warm-up iterations.
    #[arg(long, default_value_t = 1)]
    warmup: usize,
}

/// Run the benchmark and print one JSON line.
pub fn bench(a: &BenchArgs, device: Device) -> Result<()> {
    let model = a.model.load(device)?;
    tch::manual_seed(a.model.seed + 1);
    let x = Tensor::randn([a.batch, 3, a.size, a.size], (Kind::Float, device));
    let mut times = Vec::with_capacity(a.iters);
    for i in 0..a.warmup + a.iters {
        let t0 = Instant::now();
        let y = model.get_latents_decoded_images(&model.get_reconstruction_latents(&x)?)?;
        if let Device::Cuda(_) = device {
            tch::Cuda::synchronize(0);
        }
        drop(y);
        if i >= a.warmup {
            times.push(t0.elapsed().as_secs_f64());
        }
    }
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    let line = serde_json::json!({
        "impl": "vtp-rs", "preset": a.model.model.clone().unwrap_or(a.model.preset.clone()), "mode": "reconstruct",
        "size": a.size, "batch": a.batch, "threads": tch::get_num_threads(), "device": format!("{device:?}"),
        "img_per_s": a.batch as f64 / median, "s_per_iter": median, "s_per_iter_min": times[0],
        "iters": a.iters, "warmup": a.warmup,
    });
    println!("{line}");
    Ok(())
}
