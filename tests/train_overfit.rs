//! The cheapest guard against a training path that silently learns nothing (issue 23, item 0): each
//! objective of the `tiny` preset, trained by `Pretrainer::step` (the real step: losses, parameter
//! groups, clipping, AdamW, schedules) on **one fixed batch**, must fit that batch:
//! - reconstruction (`objectives = ae`, L1 + L2): PSNR ≥ 30 dB on its 16 images (the patch-mean solution
//!   that L1 alone stalls at is ≈ 19–20 dB; a linear 64-component PCA per patch gives 27.4 dB);
//! - CLIP (`clip+ae`): every image's own caption ranked first among the batch's captions (and back);
//! - DINO (`ssl+ae`): the DINO loss below 0.6 `ln K` (`ln K` is the uniform solution's value).
//!
//! Each trains one objective for 300–1000 steps on 16 synthetic 64² scenes (about two minutes in all on
//! 2 cores).
mod common;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::sync::Arc;
use tch::{Device, Kind, Tensor};
use vtp::data::source;
use vtp::data::stream::StreamOptions;
use vtp::data::Sample;
use vtp::dist::DataParallel;
use vtp::eval::metrics::psnr;
use vtp::eval::recon::denormalise;
use vtp::model::l2_normalize;
use vtp::train::pretrain::batch::{BatchBuilder, PretrainBatch};
use vtp::train::pretrain::config::PretrainConfig;
use vtp::train::pretrain::objectives::recon::ReconLoss;
use vtp::train::pretrain::{Losses, Pretrainer};
use vtp::train::schedule::Schedules;

/// Images of the fixed batch.
const N: usize = 16;

/// The tiny preset with `objectives` over `steps` steps, on a batch of [`N`] images for every branch.
fn config(objectives: &str, steps: u64) -> PretrainConfig {
    let o = [
        format!("objectives={objectives}"),
        format!("train.steps={steps}"),
        format!("batch.clip={N}"),
        format!("batch.ssl={N}"),
        format!("batch.recon={N}"),
        "loss.lpips=false".into(),
    ];
    PretrainConfig::load("tiny", None, &o).unwrap()
}

/// The one batch every step of a test sees: [`N`] training scenes, cropped once.
fn fixed_batch(c: &PretrainConfig) -> PretrainBatch {
    let spec = format!("synthetic:train?n={N}&res=64");
    let samples: Vec<Sample> =
        source::open(&spec, &StreamOptions::default()).unwrap().collect::<anyhow::Result<_>>().unwrap();
    let builder = BatchBuilder::new(c, &c.batch);
    builder.build(&samples, &mut ChaCha8Rng::seed_from_u64(3))
}

/// Trains a fresh tiny student for `c.train.steps` steps on `batch` with the preset's schedules; returns
/// it and the losses of its first and last steps.
fn overfit(c: &PretrainConfig, batch: &PretrainBatch) -> (Pretrainer, Losses, Losses) {
    tch::set_num_threads(2);
    let mut trainer =
        Pretrainer::new(c.clone(), ReconLoss::new(None), Device::Cpu, Arc::new(DataParallel::single())).unwrap();
    let schedules = Schedules::new(&c.schedule, c.train.steps).unwrap();
    let mut step = |s: u64| {
        tch::manual_seed(s as i64);
        let (losses, _, skipped) = trainer.step(batch, &schedules.at(s), false).unwrap();
        assert!(!skipped, "step {s} was skipped");
        losses
    };
    let first = step(0);
    let mut last = step(1);
    for s in 2..c.train.steps {
        last = step(s);
    }
    (trainer, first, last)
}

fn term(losses: &Losses, name: &str) -> f64 {
    losses.terms.iter().find(|(k, _)| *k == name).unwrap().1.double_value(&[])
}

#[test]
fn the_tiny_autoencoder_memorises_one_batch() {
    let _generator = common::torch_generator();
    let c = config("ae", 1000);
    let batch = fixed_batch(&c);
    let (trainer, first, last) = overfit(&c, &batch);
    let model = &trainer.model;
    let out =
        tch::no_grad(|| model.get_latents_decoded_images(&model.get_reconstruction_latents(&batch.recon).unwrap()))
            .unwrap();
    let db = psnr(&denormalise(&batch.recon), &denormalise(&out)).mean(Kind::Double).double_value(&[]);
    println!("ae: L1 {:.4} -> {:.4}, PSNR on the batch {db:.2} dB", term(&first, "rec_l1"), term(&last, "rec_l1"));
    assert!(db >= 30.0, "the tiny autoencoder reaches only {db:.2} dB on the batch it trains on (needs 30)");
}

#[test]
fn clip_matches_every_image_of_one_batch_to_its_caption() {
    let _generator = common::torch_generator();
    let c = config("clip+ae", 300);
    let batch = fixed_batch(&c);
    let (trainer, first, last) = overfit(&c, &batch);
    let model = &trainer.model;
    let (images, tokens) = (batch.clip_images.as_ref().unwrap(), batch.tokens.as_ref().unwrap());
    let logits = tch::no_grad(|| {
        let i = l2_normalize(&model.get_clip_image_feature(images, false).unwrap());
        let t = l2_normalize(&model.get_clip_text_feature(tokens, false).unwrap());
        i.matmul(&t.tr())
    });
    let truth = Tensor::arange(N as i64, (Kind::Int64, Device::Cpu));
    let accuracy = |l: &Tensor| l.argmax(1, false).eq_tensor(&truth).to_kind(Kind::Double).mean(Kind::Double);
    let (i2t, t2i) = (accuracy(&logits).double_value(&[]), accuracy(&logits.tr()).double_value(&[]));
    println!(
        "clip: loss {:.3} -> {:.3}, batch top-1 image->text {i2t:.3} text->image {t2i:.3}",
        term(&first, "clip"),
        term(&last, "clip")
    );
    // Two scenes of one batch may share a caption word for word; every other pair must be told apart.
    assert!(i2t >= 0.9 && t2i >= 0.9, "CLIP fits its batch at only {i2t:.3} / {t2i:.3} top-1");
}

#[test]
fn dino_leaves_the_uniform_solution_on_one_batch() {
    let _generator = common::torch_generator();
    let c = config("ssl+ae", 300);
    let batch = fixed_batch(&c);
    let (_, first, last) = overfit(&c, &batch);
    let ln_k = (c.dino_head.out_dim as f64).ln();
    let (start, end) = (term(&first, "dino"), term(&last, "dino"));
    println!("dino: loss {start:.3} -> {end:.3} (ln K = {ln_k:.3}), last iBOT {:.3}", term(&last, "ibot"));
    assert!(end < 0.6 * ln_k, "the DINO loss ends at {end:.3}, not well below ln K = {ln_k:.3}");
}
