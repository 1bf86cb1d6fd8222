//! `vtp data`: export any source to WebDataset shards, inspect a source (statistics and contact
//! sheets of samples and of each branch's augmentations), and time the multi-crop pipeline.
use super::images::to_vec;
use crate::data::augment::{sample_rng, Augment, ClipCrop, DinoMultiCrop, ReconCrop};
use crate::data::contact_sheet::{contact_sheet, Tile};
use crate::data::image::{to_rgb_image, write_png};
use crate::data::source;
use crate::data::stream::StreamOptions;
use crate::data::synthetic::{SyntheticConfig, SyntheticDataset};
use crate::data::Sample;
use anyhow::Result;
use clap::{Args, Subcommand};
use rayon::prelude::*;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;
use tch::Tensor;

/// Source specs, as `--help` explains them.
const SPEC_HELP: &str = "Source SPEC: `synthetic[:train|heldout|novel][?n=N&res=R&seed=S&zoom=Z&colorless=P]` (built-in scenes; zoom scales the objects, colorless = share of captions without colours), \
    shard list / brace pattern / glob (sorted; no match is an error) / URL (`shards/{000..099}.tar`, `shards/*.tar`, `https://…/{0..9}.tar`), or a folder \
    (images + captions.csv|captions.jsonl, or ImageNet-style class folders)";

/// `vtp data` sub-commands.
#[derive(Subcommand, Debug)]
pub enum DataCommand {
    /// Export a source (the synthetic one included) to WebDataset shards (KEY.png, .txt, .cls, .json).
    WriteShards(WriteShardsArgs),
    /// Print counts, caption statistics and skipped samples; write contact sheets of samples and of
    /// every branch's augmentations.
    Inspect(InspectArgs),
    /// Time the DINOv2 multi-crop pipeline (samples/s) on synthetic images; prints one JSON line.
    Bench(DataBenchArgs),
}

/// Arguments of `vtp data write-shards`.
#[derive(Args, Debug)]
pub struct WriteShardsArgs {
    #[arg(long, help = SPEC_HELP)]
    source: String,
    /// Output folder (must not already hold .tar files).
    #[arg(long, short = 'o')]
    out: PathBuf,
    /// Samples per shard.
    #[arg(long, default_value_t = 1000)]
    per_shard: usize,
    /// Reader/decoder threads.
    #[arg(long, default_value_t = 2)]
    workers: usize,
}

/// Arguments of `vtp data inspect`.
#[derive(Args, Debug)]
pub struct InspectArgs {
    #[arg(default_value = "synthetic", help = SPEC_HELP)]
    spec: String,
    /// Read at most this many samples for the statistics.
    #[arg(long, default_value_t = 1000)]
    limit: usize,
    /// Output folder for `samples.png` and `augmentations.png`.
    #[arg(long, short = 'o', default_value = "out/inspect")]
    out: PathBuf,
    /// Samples on the sample sheet.
    #[arg(long, default_value_t = 16)]
    grid: usize,
    /// Global (and CLIP / reconstruction) crop side of the augmentation sheet.
    #[arg(long, default_value_t = 224)]
    global_size: i64,
    /// Local crop side.
    #[arg(long, default_value_t = 96)]
    local_size: i64,
    /// Seed of the augmentations.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

/// Arguments of `vtp data bench`.
#[derive(Args, Debug)]
pub struct DataBenchArgs {
    /// Source images (synthetic scenes, generated before timing).
    #[arg(long, default_value_t = 256)]
    images: usize,
    /// Source image side.
    #[arg(long, default_value_t = 256)]
    size: u32,
    /// Global crop side (the `small` preset trains at 224, docs/design.md §4.2).
    #[arg(long, default_value_t = 224)]
    global_size: i64,
    /// Local crop side.
    #[arg(long, default_value_t = 96)]
    local_size: i64,
    /// Local crops per image.
    #[arg(long, default_value_t = 8)]
    n_local: usize,
    /// Worker threads (each runs libtorch single-threaded).
    #[arg(long, default_value_t = 2)]
    workers: usize,
}

/// Runs one `vtp data` sub-command.
pub fn run(command: &DataCommand) -> Result<()> {
    match command {
        DataCommand::WriteShards(a) => write_shards(a),
        DataCommand::Inspect(a) => inspect(a),
        DataCommand::Bench(a) => bench(a),
    }
}

fn write_shards(a: &WriteShardsArgs) -> Result<()> {
    let report = source::write_shards(&a.source, &a.out, a.per_shard, a.workers)?;
    println!(
        "wrote {} samples in {} shards to {} (skipped: {})",
        report.samples,
        report.shards.len(),
        a.out.display(),
        report.skipped
    );
    Ok(())
}

/// Running statistics of `inspect`.
#[derive(Default)]
struct Stats {
    count: usize,
    words: Vec<usize>,
    sizes: BTreeMap<(u32, u32), usize>,
    labels: BTreeMap<String, usize>,
}

impl Stats {
    fn add(&mut self, s: &Sample) {
        self.count += 1;
        self.words.push(s.caption.split_whitespace().count());
        *self.sizes.entry(s.image.dimensions()).or_default() += 1;
        for key in s.labels.keys() {
            *self.labels.entry(key.clone()).or_default() += 1;
        }
    }

    fn print(&self) {
        let (min, max) = (self.words.iter().min().unwrap_or(&0), self.words.iter().max().unwrap_or(&0));
        let mean = self.words.iter().sum::<usize>() as f64 / self.count.max(1) as f64;
        let sizes: Vec<String> = self.sizes.iter().take(8).map(|((w, h), n)| format!("{w}x{h} ({n})")).collect();
        let labels: Vec<String> = self.labels.iter().map(|(k, n)| format!("{k} ({n})")).collect();
        println!("caption words: min {min}, mean {mean:.1}, max {max}");
        println!("image sizes: {}{}", sizes.join(", "), if self.sizes.len() > 8 { ", …" } else { "" });
        println!("labels: {}", if labels.is_empty() { "none".into() } else { labels.join(", ") });
    }
}

fn inspect(a: &InspectArgs) -> Result<()> {
    let mut stream = source::open(&a.spec, &StreamOptions::default())?;
    let mut stats = Stats::default();
    let mut shown = Vec::new();
    for sample in stream.by_ref().take(a.limit) {
        let sample = sample?;
        stats.add(&sample);
        if shown.len() < a.grid {
            shown.push(sample);
        }
    }
    println!("source: {}", a.spec);
    println!("samples read: {} (limit {}), skipped: {}", stats.count, a.limit, stream.skipped());
    stats.print();
    let tiles: Vec<Tile> = shown.iter().map(|s| Tile { image: s.image.clone(), caption: s.caption.clone() }).collect();
    let samples_png = a.out.join("samples.png");
    write_png(&samples_png, &contact_sheet(&tiles, 4, 128, 7))?;
    let augment_png = a.out.join("augmentations.png");
    write_png(&augment_png, &augmentation_sheet(&shown[..shown.len().min(4)], a)?)?;
    println!("wrote {} and {}", samples_png.display(), augment_png.display());
    Ok(())
}

/// An ImageNet-normalised `[3, H, W]` tensor back to 8-bit RGB.
fn tensor_image(t: &Tensor) -> Result<image::RgbImage> {
    let (_, h, w) = t.size3()?;
    to_rgb_image(&to_vec(t), h as usize, w as usize)
}

/// One row per sample: the original, the CLIP crop, the reconstruction crop, DINOv2's two global
/// crops and its first three local crops.
fn augmentation_sheet(samples: &[Sample], a: &InspectArgs) -> Result<image::RgbImage> {
    let clip = ClipCrop::new(a.global_size);
    let recon = ReconCrop::new(a.global_size);
    let multi = DinoMultiCrop::dinov2(a.global_size, a.local_size, 8);
    let mut tiles = Vec::new();
    for (i, s) in samples.iter().enumerate() {
        let mut rng = sample_rng(a.seed, i as u64);
        let crops = multi.apply(&s.image, &mut rng);
        let mut views = vec![("original".to_string(), s.image.clone())];
        views.push(("clip crop".into(), tensor_image(&clip.apply(&s.image, &mut rng))?));
        views.push(("recon crop".into(), tensor_image(&recon.apply(&s.image, &mut rng))?));
        for g in 0..2 {
            views.push((format!("dino global {}", g + 1), tensor_image(&crops.global.get(g))?));
        }
        for l in 0..3 {
            views.push((format!("dino local {}", l + 1), tensor_image(&crops.local.get(l))?));
        }
        tiles.extend(views.into_iter().map(|(caption, image)| Tile { image, caption }));
    }
    Ok(contact_sheet(&tiles, 8, 112, 2))
}

fn bench(a: &DataBenchArgs) -> Result<()> {
    let dataset = SyntheticDataset::new(SyntheticConfig { resolution: a.size, len: a.images, ..Default::default() });
    let images: Vec<image::RgbImage> = (0..a.images).map(|i| dataset.get(i).image).collect();
    let multi = DinoMultiCrop::dinov2(a.global_size, a.local_size, a.n_local);
    let pool = rayon::ThreadPoolBuilder::new().num_threads(a.workers).build()?;
    tch::set_num_threads(1);
    let t0 = Instant::now();
    let crops: usize = pool.install(|| {
        images
            .par_iter()
            .enumerate()
            .map(|(i, img)| {
                let out = multi.apply(img, &mut sample_rng(0, i as u64));
                out.global.size()[0] as usize + out.local.size()[0] as usize
            })
            .sum()
    });
    let dt = t0.elapsed().as_secs_f64();
    let line = serde_json::json!({
        "impl": "vtp-rs", "workers": a.workers, "images": a.images, "size": a.size,
        "global_size": a.global_size, "local_size": a.local_size, "n_local": a.n_local,
        "crops": crops, "samples_per_s": a.images as f64 / dt, "wall_s": dt,
    });
    println!("{line}");
    Ok(())
}
