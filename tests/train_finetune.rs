//! `vtp finetune-decoder` end to end (stage 2, docs/design.md §4.7) on a tiny random tokenizer and the built-in
//! synthetic data: the decoder learns and the adversarial terms are logged from `disc_start` on, a
//! non-finite step is skipped, the latents stay bit-identical, resume is bit-identical, and bad input
//! is a one-line error.
mod common;
use common::{assert_one_line_error, s, stderr};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use tch::{Device, Tensor};
use vtp::io::read_safetensors_map;
use vtp::model::VtpModel;
use vtp::train::metrics::read_jsonl;

/// A tiny, fast run: 32-px crops, a 16-channel discriminator, L1 only, no evaluation until the end.
const FAST: &[&str] = &[
    "loss.lpips=false",
    "loss.disc_channels=16",
    "batch.size=8",
    "data.recon_size=32",
    "data.source=synthetic:train?res=32",
    "data.eval_source=synthetic:heldout?n=16&res=32",
    "schedule.lr=2e-3",
    "schedule.min_lr=2e-4",
    "schedule.warmup_steps=2",
    "eval.every=0",
    "eval.samples=16",
    "eval.grid_every=0",
    "eval.grid_images=2",
    "log.every=1",
    "checkpoint.every=1000",
    "train.deterministic=true",
];

/// `vtp --threads 2 finetune-decoder --model MODEL --out OUT` with the fast settings, then `extra`.
fn finetune(model: &Path, out: &Path, extra: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vtp"))
        .args(["--threads", "2", "finetune-decoder", "--model", s(model), "--out", s(out)])
        .args(FAST)
        .args(extra)
        .output()
        .expect("vtp runs")
}

fn assert_ok(o: &Output) {
    common::assert_success(o, "vtp finetune-decoder");
}

/// `(step, value)` of every metrics.jsonl record that has `key`.
fn series(run: &Path, key: &str) -> Vec<(u64, f64)> {
    read_jsonl(&run.join("metrics.jsonl"))
        .unwrap()
        .iter()
        .filter_map(|r| Some((r.get("step")?.as_u64()?, r.get(key)?.as_f64()?)))
        .collect()
}

fn mean(v: &[(u64, f64)]) -> f64 {
    v.iter().map(|x| x.1).sum::<f64>() / v.len() as f64
}

fn model_tensors(dir: &Path) -> std::collections::HashMap<String, Tensor> {
    read_safetensors_map(&dir.join("model.safetensors")).unwrap()
}

/// The latents of a fixed random batch.
fn latents(model_dir: &Path) -> Tensor {
    let model = VtpModel::load(model_dir, Device::Cpu).unwrap();
    tch::manual_seed(7);
    let images = Tensor::randn([2, 3, 32, 32], (tch::Kind::Float, Device::Cpu));
    tch::no_grad(|| model.get_reconstruction_latents(&images).unwrap())
}

fn tiny_model(tmp: &Path) -> PathBuf {
    common::init_tiny_model(tmp, 1)
}

#[test]
fn decoder_learns_adversarial_terms_are_logged_and_latents_are_unchanged() {
    let _generator = common::torch_generator();
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path());
    let run = tmp.path().join("run");
    let o = finetune(&model, &run, &["train.steps=40", "loss.disc_start=20", "debug.nan_at_steps=[30]"]);
    assert_ok(&o);
    assert!(stderr(&o).contains("step 31: non-finite"), "the injected step is reported: {}", stderr(&o));
    assert_eq!(series(&run, "skipped_step").len(), 1);

    let l1 = series(&run, "loss/rec_l1");
    assert_eq!(l1.len(), 39, "one L1 per step but the skipped one");
    let (first, last) = (mean(&l1[..5]), mean(&l1[l1.len() - 5..]));
    eprintln!("L1: first 5 steps {first:.4}, last 5 steps {last:.4}");
    assert!(last < first, "the decoder's L1 falls: first {first:.4}, last {last:.4}");
    for key in ["loss/d", "loss/g", "d_weight", "disc/logits_real", "disc_grad_norm"] {
        let steps: Vec<u64> = series(&run, key).iter().map(|x| x.0).collect();
        assert_eq!(steps.len(), 19, "{key} from disc_start (step 21) on, skipped step aside: {steps:?}");
        assert!(steps.iter().all(|&s| s > 20), "{key} before disc_start: {steps:?}");
    }
    let d = series(&run, "loss/d");
    eprintln!("d_loss: first {:.4}, last {:.4}; g: last {:.4}", d[0].1, d[d.len() - 1].1, series(&run, "loss/g")[18].1);
    assert!(!series(&run, "eval/psnr").is_empty() && run.join("samples/recon-00000040.png").is_file());

    // The exported tokenizer loads, only its decoder changed, and it encodes bit-identically.
    let exported = run.join("model");
    let (before, after) = (model_tensors(&model), model_tensors(&exported));
    assert_eq!(before.len(), after.len());
    let mut changed = 0;
    for (name, t) in &before {
        let same = t.equal(&after[name]);
        if name.starts_with("pixel_decoder.") {
            changed += usize::from(!same);
        } else {
            assert!(same, "frozen tensor '{name}' changed");
        }
    }
    assert!(changed > 0, "the decoder was trained");
    assert!(latents(&model).equal(&latents(&exported)), "latents before and after are bit-identical");
}

#[test]
fn resume_is_bit_identical() {
    let _generator = common::torch_generator();
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path());
    let steps = ["train.steps=8", "loss.disc_start=2"];
    let full = tmp.path().join("full");
    assert_ok(&finetune(&model, &full, &steps));
    let split = tmp.path().join("split");
    let first = finetune(&model, &split, &[&steps[..], &["--stop-after", "4"][..]].concat());
    assert_ok(&first);
    assert!(!split.join("model").exists(), "an interrupted run exports nothing");
    let resume = Command::new(env!("CARGO_BIN_EXE_vtp"))
        .args(["--threads", "2", "finetune-decoder", "--out", s(&split), "--resume"])
        .output()
        .unwrap();
    assert_ok(&resume);
    let (a, b) = (model_tensors(&full.join("model")), model_tensors(&split.join("model")));
    assert_eq!(a.len(), b.len());
    for (name, t) in &a {
        assert!(t.equal(&b[name]), "'{name}' differs between the resumed and the uninterrupted run");
    }
    assert_eq!(series(&full, "loss/d"), series(&split, "loss/d"), "the same discriminator losses");
}

#[test]
fn print_config_comments_every_key_and_bad_input_is_one_line() {
    let _generator = common::torch_generator();
    let text = common::print_config("finetune-decoder");
    assert!(text.contains("[loss]") && text.contains("disc_weight = 0.5"), "{text}");
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let nowhere = tmp.path().join("no-such-model");
    assert_one_line_error(&finetune(&nowhere, &out, &[]), &["no-such-model", "does not exist"]);
    let o = Command::new(env!("CARGO_BIN_EXE_vtp")).args(["finetune-decoder", "--out", s(&out)]).output().unwrap();
    assert_one_line_error(&o, &["--model"]);
    let model = tiny_model(tmp.path());
    assert_one_line_error(&finetune(&model, &out, &["loss.disc_strat=3"]), &["unknown config key 'loss.disc_strat'"]);
    assert_one_line_error(&finetune(&model, &out, &["data.recon_size=40"]), &["data.recon_size = 40", "patch size"]);
    assert_one_line_error(&finetune(&model, &out, &["data.recon_size=16"]), &["too small", "discriminator"]);
    assert_one_line_error(&finetune(&model, &out, &["batch.size=0"]), &["batch.size must be at least 1"]);
    assert!(!out.join("config.toml").exists(), "nothing is recorded for a run that cannot start");
}
