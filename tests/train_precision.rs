//! bf16 mixed precision (`train.precision = "bf16"`, scale issue): the autocast region casts matmuls
//! to bf16 and is left cleanly; master weights, gradients and exports stay f32; and short bf16 runs
//! of pre-training, stage 2 and LightningDiT track the f32 run on the same data within
//! [`TOLERANCE`] (relative to the f32 loss) at every step ([`GAN_TOLERANCE`] for the GAN terms).
mod common;
use common::s;
use std::path::Path;
use std::sync::Arc;
use tch::{Device, Kind, Tensor};
use vtp::dist::DataParallel;
use vtp::dit::config::DitConfig;
use vtp::dit::model::LightningDit;
use vtp::dit::train::{dit_optimizer, flow_step, FlowRecipe};
use vtp::dit::transport::TimeSampling;
use vtp::io::read_safetensors_map;
use vtp::train::optim::AdamWConfig;
use vtp::train::precision::{autocast_enabled, Precision};

/// The largest relative gap allowed between a bf16 run's loss and the f32 run's at the same step:
/// bf16 keeps 8 significant bits (relative rounding 2^-9 ≈ 0.2 % per op), and the two runs drift
/// apart as their updates differ; 5 % over a short run is far tighter than a wrong path (a missing
/// f32 cast of the logits or a bf16 weight update shows as tens of percent or NaN).
const TOLERANCE: f64 = 0.05;

/// The same for stage 2's adversarial terms: the discriminator and the adaptive GAN weight feed each
/// run's differences back into the next step (measured: up to 5.2 % of the mean |g| after 4 GAN steps).
const GAN_TOLERANCE: f64 = 0.10;

#[test]
fn the_autocast_region_casts_matmuls_to_bf16_and_restores_f32() {
    let _generator = common::torch_generator();
    let a = Tensor::randn([4, 8], (Kind::Float, Device::Cpu));
    let b = Tensor::randn([8, 3], (Kind::Float, Device::Cpu));
    assert_eq!(Precision::F32.autocast(Device::Cpu, || a.matmul(&b)).unwrap().kind(), Kind::Float);
    let (inner, outer) = Precision::Bf16
        .autocast(Device::Cpu, || {
            let nested = Precision::Bf16.autocast(Device::Cpu, || autocast_enabled(Device::Cpu)).unwrap();
            (a.matmul(&b).kind(), nested && autocast_enabled(Device::Cpu))
        })
        .unwrap();
    assert_eq!(inner, Kind::BFloat16);
    assert!(outer, "a nested region leaves the outer one open");
    assert!(!autocast_enabled(Device::Cpu), "the region is closed after it");
    assert_eq!(a.matmul(&b).kind(), Kind::Float);
}

/// The gap of every step's value of `key` between two runs (both must log the same steps),
/// relative to the f32 run's mean magnitude of that term (a term passing near 0, such as the GAN
/// generator loss, has no meaningful per-step relative error).
fn gaps(f32_run: &Path, bf16_run: &Path, key: &str) -> Vec<f64> {
    let (a, b) = (common::series(f32_run, key), common::series(bf16_run, key));
    assert!(!a.is_empty() && a.len() == b.len(), "{key}: {} vs {} logged steps", a.len(), b.len());
    let scale = common::mean(&a.iter().map(|x| x.abs()).collect::<Vec<_>>());
    a.iter().zip(&b).map(|(x, y)| (x - y).abs() / scale).collect()
}

fn assert_tracks(f32_run: &Path, bf16_run: &Path, keys: &[&str], tolerance: f64) {
    for key in keys {
        let g = gaps(f32_run, bf16_run, key);
        let worst = g.iter().cloned().fold(0.0, f64::max);
        println!("{key}: largest relative gap bf16 vs f32 over {} steps {worst:.4}", g.len());
        assert!(worst <= tolerance, "{key}: bf16 strays {worst:.4} from f32 (steps: {g:?})");
    }
}

/// Every tensor of an exported tokenizer is stored in f32 (except the bf16 RoPE periods).
fn assert_f32_export(dir: &Path) {
    let weights = read_safetensors_map(&dir.join("model.safetensors")).unwrap();
    for (name, t) in weights.iter().filter(|(k, _)| !k.ends_with("rope_embed.periods")) {
        assert_eq!(t.kind(), Kind::Float, "{name}");
    }
}

#[test]
fn a_bf16_pretraining_run_tracks_the_f32_run() {
    let _generator = common::torch_generator();
    let dir = tempfile::tempdir().unwrap();
    let run = |precision: &str| {
        let out = dir.path().join(precision);
        let steps = ["train.steps=12", "schedule.warmup_steps=2", "schedule.warmup_teacher_temp_steps=2"];
        let quiet = ["log.every=1", "checkpoint.every=100", "eval.every=0", "eval.grid_every=0"];
        let args =
            [&["pretrain", "--preset", "tiny", "--out", s(&out)][..], common::PRETRAIN_STEP_SMALL, &steps, &quiet];
        let precision = format!("train.precision={precision}");
        let o = common::vtp(&[&args.concat()[..], &["model.vision_depth=2", &precision]].concat());
        common::assert_success(&o, "vtp pretrain");
        out
    };
    let (f32_run, bf16_run) = (run("f32"), run("bf16"));
    let terms = ["loss/total", "loss/clip", "loss/dino", "loss/ibot", "loss/koleo", "loss/rec"];
    assert_tracks(&f32_run, &bf16_run, &terms, TOLERANCE);
    assert_f32_export(&bf16_run.join("model"));
}

#[test]
fn a_bf16_stage_2_run_tracks_the_f32_run() {
    let _generator = common::torch_generator();
    let dir = tempfile::tempdir().unwrap();
    let model = common::init_tiny_model(dir.path(), 1);
    let run = |precision: &str| {
        let out = dir.path().join(precision);
        let precision = format!("train.precision={precision}");
        let args = ["finetune-decoder", "--model", s(&model), "--out", s(&out), "loss.lpips=false"];
        let set = [
            "train.steps=8",
            "schedule.warmup_steps=2",
            "loss.disc_start=4",
            "loss.disc_channels=16",
            "batch.size=4",
            "data.recon_size=32",
        ];
        let quiet = ["log.every=1", "eval.every=0", "eval.grid_every=0", "checkpoint.every=100"];
        let o = common::vtp(&[&args[..], &set, &quiet, &["data.source=synthetic:train?res=32", &precision]].concat());
        common::assert_success(&o, "vtp finetune-decoder");
        out
    };
    let (f32_run, bf16_run) = (run("f32"), run("bf16"));
    assert_tracks(&f32_run, &bf16_run, &["loss/rec_l1"], TOLERANCE);
    assert_tracks(&f32_run, &bf16_run, &["loss/g", "loss/d"], GAN_TOLERANCE);
    assert_f32_export(&bf16_run.join("model"));
}

#[test]
fn bf16_lightningdit_steps_track_f32_steps() {
    let _generator = common::torch_generator();
    tch::set_num_threads(2);
    let losses = |precision: Precision| {
        tch::manual_seed(3);
        let model = LightningDit::new(DitConfig::preset("tiny").unwrap(), Device::Cpu).unwrap();
        // Off the zero-initialised output layer, so that the prediction depends on every block.
        tch::no_grad(|| {
            model.named_parameters().iter().for_each(|(_, p)| drop(p.shallow_clone().g_add_(&(p.randn_like() * 0.05))))
        });
        let c = model.config().clone();
        let x1 = Tensor::randn([8, c.in_channels, c.input_size, c.input_size], (Kind::Float, Device::Cpu));
        let y = Tensor::randint(c.num_classes, [8], (Kind::Int64, Device::Cpu));
        let mut optim = dit_optimizer(&model, AdamWConfig { beta1: 0.9, beta2: 0.95, ..AdamWConfig::default() });
        let recipe = FlowRecipe {
            time: TimeSampling::OFFICIAL,
            cosine_loss: true,
            precision,
            lr: 1e-3,
            weight_decay: 0.0,
            clip_grad: 1.0,
        };
        let single = Arc::new(DataParallel::single());
        let steps: Vec<f64> = (0..8)
            .map(|i| {
                tch::manual_seed(100 + i);
                let r = tch::with_grad(|| flow_step(&model, &mut optim, (&x1, &y), &recipe, false, &single)).unwrap();
                assert!(!r.skipped);
                r.total
            })
            .collect();
        for (name, p) in model.named_parameters() {
            assert_eq!(p.kind(), Kind::Float, "{name} stays an f32 master weight");
        }
        steps
    };
    let (a, b) = (losses(Precision::F32), losses(Precision::Bf16));
    for (step, (x, y)) in a.iter().zip(&b).enumerate() {
        let gap = (x - y).abs() / x.abs();
        println!("DiT step {step}: f32 {x:.5} bf16 {y:.5} gap {gap:.4}");
        assert!(gap <= TOLERANCE, "step {step}: bf16 {y} vs f32 {x}");
    }
    assert!(a != b, "the bf16 steps differ from the f32 ones (autocast took effect)");
}
