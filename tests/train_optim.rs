//! The optimiser and schedules (docs/design.md §4.5) against PyTorch and numpy in the same run: AdamW (fused and
//! single-tensor) + `clip_grad_norm` + scheduled lr / weight decay against
//! `torch.optim.AdamW(fused=True)` and `torch.optim.AdamW(foreach=False)` +
//! `torch.nn.utils.clip_grad_norm_` (project venv, torch 2.13), DINOv2's `CosineScheduler` against its numpy
//! original, DINOv2's parameter-group rules on real VTP names, and a bit-identical resume from the
//! optimiser state. Checked under both CPU kernel sets — natively (AVX-512 here) and with
//! `ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2` exported: the AdamW parameters and the gradient norms
//! are bit-identical to PyTorch under both, the schedules equal numpy's to within 1 ulp.
mod common;

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;
use tch::{Kind, Tensor};
use vtp::io::{read_safetensors_map, write_safetensors};
use vtp::train::optim::{clip_grad_norm, dinov2_multipliers, AdamW, AdamWConfig, ParamSpec};
use vtp::train::schedule::{CosineScheduler, ScheduleConfig, Schedules};

/// Runs a Python snippet in the project venv with `args`; returns its stdout (a failure fails the test).
fn python(script: &str, args: &[&str]) -> String {
    let out = Command::new(common::venv_python()).arg("-c").arg(script).args(args).output().expect("run python");
    assert!(out.status.success(), "python failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// Name, shape, and whether it gets a gradient, of the test parameters: layer-decayed, patch-embedding,
/// no-weight-decay bias, last layer (large enough for the multi-threaded kernels), no gradient, 0-dim.
const PARAMS: [(&str, &[i64], bool); 7] = [
    ("trunk.blocks.1.attn.qkv.weight", &[96, 32], true),
    ("trunk.patch_embed.proj.weight", &[8, 3, 4, 4], true),
    ("trunk.blocks.1.attn.qkv.bias", &[96], true),
    ("dino_head.last_layer.weight_v", &[300, 200], true),
    ("trunk.mask_token", &[1, 8], false),
    ("logit_scale", &[], true),
    ("visual_proj.weight", &[16, 33], true),
];
const DEPTH: i64 = 4;
const STEPS: u64 = 4;
/// Gradient scale per step: clipped, not clipped (total norm below 3), clipped.
const GRAD_SCALE: [f64; STEPS as usize] = [5.0, 0.01, 1.0, 2.0];

/// Fresh parameters (deep copies of `init`) with DINOv2 multipliers.
fn param_specs(init: &HashMap<String, Tensor>) -> Vec<ParamSpec> {
    PARAMS
        .iter()
        .map(|(name, shape, _)| {
            let (lr_mult, wd_mult, is_last_layer) = dinov2_multipliers(name, shape.len(), DEPTH, 0.9, 0.2);
            let tensor = init[*name].copy().set_requires_grad(true);
            ParamSpec { name: name.to_string(), tensor, lr_mult, wd_mult, is_last_layer }
        })
        .collect()
}

/// Seeded initial values and per-step gradients (`g<step>.<name>`, only for parameters with a gradient).
fn inputs() -> (HashMap<String, Tensor>, HashMap<String, Tensor>) {
    tch::manual_seed(7);
    let init = PARAMS.iter().map(|(n, s, _)| (n.to_string(), Tensor::randn(*s, (Kind::Float, tch::Device::Cpu))));
    let init: HashMap<_, _> = init.collect();
    let mut grads = HashMap::new();
    for (step, scale) in GRAD_SCALE.iter().enumerate() {
        for (name, shape, _) in PARAMS.iter().filter(|p| p.2) {
            grads.insert(format!("g{step}.{name}"), Tensor::randn(*shape, (Kind::Float, tch::Device::Cpu)) * *scale);
        }
    }
    (init, grads)
}

/// Sets each parameter's gradient to exactly `grads[g<step>.<name>]` (the backward of `sum(p * g)`).
fn set_grads(opt: &mut AdamW, grads: &HashMap<String, Tensor>, step: u64) {
    opt.zero_grad();
    let terms: Vec<Tensor> = opt
        .params()
        .iter()
        .filter_map(|p| grads.get(&format!("g{step}.{}", p.name)).map(|g| (&p.tensor * g).sum(Kind::Float)))
        .collect();
    Tensor::stack(&terms, 0).sum(Kind::Float).backward();
}

fn test_schedules() -> Schedules {
    let config = ScheduleConfig {
        lr: 1e-2,
        min_lr: 1e-4,
        warmup_steps: 2,
        weight_decay: 0.04,
        weight_decay_end: 0.4,
        freeze_last_layer_steps: 2,
        ..ScheduleConfig::default()
    };
    Schedules::new(&config, 6).unwrap()
}

/// One clip + AdamW step at `step`; returns the total gradient norm.
fn train_step(opt: &mut AdamW, grads: &HashMap<String, Tensor>, sched: &Schedules, step: u64) -> f64 {
    set_grads(opt, grads, step);
    let tensors: Vec<Tensor> = opt.params().iter().map(|p| p.tensor.shallow_clone()).collect();
    let norm = clip_grad_norm(&tensors, 3.0);
    let v = sched.at(step);
    opt.step(v.lr, v.wd, v.last_layer_lr).unwrap();
    norm
}

const TORCH_ADAMW: &str = r#"
import json, sys, torch
from safetensors.torch import load_file, save_file
d = sys.argv[1]
cfg = json.load(open(f"{d}/cfg.json"))
torch.set_num_threads(cfg["threads"])
t = load_file(f"{d}/in.safetensors")
params, groups = {}, []
for g in cfg["params"]:
    p = t["p0." + g["name"]].clone().requires_grad_(True)
    params[g["name"]] = p
    groups.append({"params": [p], "lr_mult": g["lr_mult"], "wd_mult": g["wd_mult"], "is_last_layer": g["is_last_layer"]})
opt = torch.optim.AdamW(groups, betas=(0.9, 0.999), eps=1e-8, **({"fused": True} if cfg["fused"] else {"foreach": False}))
out = {}
for s, v in enumerate(cfg["steps"]):
    for name, p in params.items():
        p.grad = t[f"g{s}.{name}"].clone() if f"g{s}.{name}" in t else None
    out[f"norm{s}"] = torch.nn.utils.clip_grad_norm_(list(params.values()), 3.0)
    for group in opt.param_groups:  # DINOv2 apply_optim_scheduler
        group["weight_decay"] = v["wd"] * group["wd_mult"]
        group["lr"] = (v["last_layer_lr"] if group["is_last_layer"] else v["lr"]) * group["lr_mult"]
    opt.step()
    for name, p in params.items():
        out[f"p{s}.{name}"] = p.detach().clone()
save_file(out, f"{d}/out.safetensors")
"#;

/// Runs `TORCH_ADAMW` (`fused=True`, or `foreach=False`) on the same inputs; returns its per-step
/// parameters and norms.
fn torch_reference(
    dir: &Path,
    init: &HashMap<String, Tensor>,
    grads: &HashMap<String, Tensor>,
    fused: bool,
) -> HashMap<String, Tensor> {
    let mut tensors: Vec<(String, Tensor)> = init.iter().map(|(n, t)| (format!("p0.{n}"), t.shallow_clone())).collect();
    tensors.extend(grads.iter().map(|(n, t)| (n.clone(), t.shallow_clone())));
    write_safetensors(&dir.join("in.safetensors"), &tensors, &[]).unwrap();
    let sched = test_schedules();
    let params: Vec<_> = param_specs(init)
        .iter()
        .map(|p| serde_json::json!({"name": p.name, "lr_mult": p.lr_mult, "wd_mult": p.wd_mult, "is_last_layer": p.is_last_layer}))
        .collect();
    let steps: Vec<_> = (0..STEPS)
        .map(|s| sched.at(s))
        .map(|v| serde_json::json!({"lr": v.lr, "wd": v.wd, "last_layer_lr": v.last_layer_lr}))
        .collect();
    let cfg = serde_json::json!({"threads": tch::get_num_threads(), "params": params, "steps": steps, "fused": fused});
    std::fs::write(dir.join("cfg.json"), cfg.to_string()).unwrap();
    python(TORCH_ADAMW, &[dir.to_str().unwrap()]);
    read_safetensors_map(&dir.join("out.safetensors")).unwrap()
}

/// max |a - b| / max |b|.
fn max_rel(a: &Tensor, b: &Tensor) -> f64 {
    let scale = b.abs().max().double_value(&[]).max(f64::MIN_POSITIVE);
    (a - b).abs().max().double_value(&[]) / scale
}

/// The optimiser of `fused` after `STEPS` steps against torch's: gradient norms equal, and every
/// parameter tensor bit-identical to `torch.optim.AdamW(fused=True)` / `(foreach=False)` at every step.
fn adamw_and_clipping_match_pytorch(fused: bool) -> AdamW {
    let (init, grads) = inputs();
    let tmp = tempfile::tempdir().unwrap();
    let reference = torch_reference(tmp.path(), &init, &grads, fused);
    let sched = test_schedules();
    let mut opt = AdamW::new(param_specs(&init), AdamWConfig { fused, ..AdamWConfig::default() });
    let (mut worst, mut identical, mut total) = (0f64, 0, 0);
    for step in 0..STEPS {
        let norm = train_step(&mut opt, &grads, &sched, step);
        let torch_norm = reference[&format!("norm{step}")].double_value(&[]);
        assert_eq!(norm, torch_norm, "step {step}: grad norm {norm} vs torch {torch_norm}");
        assert_eq!(norm > 3.0, step != 1, "step {step}: norm {norm} should be clipped except at step 1");
        for p in opt.params() {
            let theirs = &reference[&format!("p{step}.{}", p.name)];
            worst = worst.max(max_rel(&p.tensor, theirs));
            identical += usize::from(p.tensor.equal(theirs));
            total += 1;
        }
    }
    eprintln!(
        "AdamW (fused: {fused}) vs torch over {STEPS} steps: {identical}/{total} parameter tensors bit-identical, \
         max rel {worst:e}"
    );
    assert_eq!(identical, total, "AdamW (fused: {fused}) differs from torch by up to {worst:e} relative");
    // The parameter without a gradient never moves; the frozen last layer only moves after the freeze.
    let by_name: HashMap<&str, &ParamSpec> = opt.params().iter().map(|p| (p.name.as_str(), p)).collect();
    assert!(by_name["trunk.mask_token"].tensor.equal(&init["trunk.mask_token"]));
    let last = "dino_head.last_layer.weight_v";
    assert!(reference[&format!("p1.{last}")].equal(&init[last]), "last layer moved while frozen");
    assert!(!reference[&format!("p2.{last}")].equal(&init[last]), "last layer did not move after the freeze");
    opt
}

#[test]
fn fused_adamw_matches_pytorch_fused_and_the_single_tensor_update_to_1e_5() {
    let _generator = common::torch_generator();
    let fused = adamw_and_clipping_match_pytorch(true);
    let single = adamw_and_clipping_match_pytorch(false);
    for (a, b) in fused.params().iter().zip(single.params()) {
        let err = max_rel(&a.tensor, &b.tensor);
        assert!(err <= 1e-5, "{}: the fused update is {err:e} from the single-tensor one", a.name);
    }
}

#[test]
fn clip_grad_norm_without_gradients_and_below_threshold() {
    let _generator = common::torch_generator();
    let p = Tensor::ones([3], (Kind::Float, tch::Device::Cpu)).set_requires_grad(true);
    assert_eq!(clip_grad_norm(&[p.shallow_clone()], 1.0), 0.0);
    (&p * 0.1).sum(Kind::Float).backward();
    let norm = clip_grad_norm(&[p.shallow_clone()], 1.0);
    assert!((norm - 0.03f64.sqrt()).abs() < 1e-6, "{norm}");
    assert!(p.grad().allclose(&Tensor::full([3], 0.1, (Kind::Float, tch::Device::Cpu)), 0.0, 0.0, false));
}

#[test]
fn state_round_trip_resumes_bit_identically() {
    let _generator = common::torch_generator();
    let (init, grads) = inputs();
    let sched = test_schedules();
    let mut original = AdamW::new(param_specs(&init), AdamWConfig::default());
    for step in 0..3 {
        train_step(&mut original, &grads, &sched, step);
    }
    // A "resumed" optimiser: parameters and state copied out (as a checkpoint would) and loaded fresh.
    let saved: HashMap<String, Tensor> = original.state_tensors().into_iter().map(|(n, t)| (n, t.copy())).collect();
    assert_eq!(saved.len(), 3 * PARAMS.len());
    assert_eq!(saved["optim.trunk.mask_token.step"].double_value(&[]), 0.0, "no gradient, no step");
    assert_eq!(saved["optim.logit_scale.step"].double_value(&[]), 3.0);
    let current: HashMap<String, Tensor> =
        original.params().iter().map(|p| (p.name.clone(), p.tensor.detach().copy())).collect();
    let mut resumed = AdamW::new(param_specs(&current), AdamWConfig::default());
    resumed.load_state_tensors(&saved).unwrap();
    train_step(&mut original, &grads, &sched, 3);
    train_step(&mut resumed, &grads, &sched, 3);
    for (a, b) in original.params().iter().zip(resumed.params()) {
        assert!(a.tensor.equal(&b.tensor), "{} differs after resume", a.name);
    }
}

#[test]
fn load_state_tensors_names_missing_and_misshaped_entries() {
    let _generator = common::torch_generator();
    let (init, _) = inputs();
    let mut opt = AdamW::new(param_specs(&init), AdamWConfig::default());
    let mut saved: HashMap<String, Tensor> = opt.state_tensors().into_iter().collect();
    saved.remove("optim.logit_scale.exp_avg");
    saved.insert("optim.visual_proj.weight.exp_avg_sq".into(), Tensor::zeros([2], (Kind::Float, tch::Device::Cpu)));
    let err = opt.load_state_tensors(&saved).unwrap_err().to_string();
    assert!(!err.contains('\n'), "{err}");
    assert!(err.contains("optim.logit_scale.exp_avg missing"), "{err}");
    assert!(err.contains("optim.visual_proj.weight.exp_avg_sq has shape [2], expected [16, 33]"), "{err}");
}

#[test]
fn zero_grad_sets_gradients_to_none() {
    let _generator = common::torch_generator();
    let (init, grads) = inputs();
    let mut opt = AdamW::new(param_specs(&init), AdamWConfig::default());
    set_grads(&mut opt, &grads, 0);
    assert!(opt.params()[0].tensor.grad().defined());
    opt.zero_grad();
    assert!(opt.params().iter().all(|p| !p.tensor.grad().defined()));
}

#[test]
fn dinov2_multipliers_on_real_names() {
    let _generator = common::torch_generator();
    let d = 0.9f64;
    // (name, ndim, lr_mult, wd_mult, is_last_layer) for depth 4, layer decay 0.9, patch-embed lr x 0.2.
    let table: &[(&str, usize, f64, f64, bool)] = &[
        ("trunk.patch_embed.proj.weight", 4, d.powi(5) * 0.2, 1.0, false),
        ("trunk.patch_embed.proj.bias", 1, d.powi(5) * 0.2, 0.0, false),
        ("trunk.cls_token", 3, d.powi(5), 0.0, false),
        ("trunk.mask_token", 2, d.powi(5), 0.0, false),
        ("trunk.blocks.0.attn.qkv.weight", 2, d.powi(4), 1.0, false),
        ("trunk.blocks.3.attn.qkv.weight", 2, d, 1.0, false),
        ("trunk.blocks.3.attn.qkv.bias", 1, d, 0.0, false),
        ("trunk.blocks.3.norm1.weight", 1, d, 0.0, false),
        ("trunk.blocks.2.attn.q_norm.weight", 1, d * d, 0.0, false),
        ("trunk.blocks.2.ls1.gamma", 1, d * d, 0.0, false),
        ("trunk.blocks.1.mlp.w1.weight", 2, d.powi(3), 1.0, false),
        ("trunk.norm.weight", 1, 1.0, 0.0, false),
        ("trunk.feature_bottleneck.weight", 2, 1.0, 1.0, false),
        ("visual_proj.weight", 2, 1.0, 1.0, false),
        ("pixel_decoder.proj_in.weight", 4, 1.0, 1.0, false),
        ("pixel_decoder.blocks.0.attn.qkv.weight", 2, 1.0, 1.0, false),
        ("pixel_decoder.blocks.0.norm1.bias", 1, 1.0, 0.0, false),
        ("token_embedding.weight", 2, 1.0, 1.0, false),
        ("positional_embedding", 2, 1.0, 0.0, false),
        ("text_transformer.resblocks.0.ln_1.weight", 1, 1.0, 0.0, false),
        ("text_transformer.resblocks.0.attn.in_proj_weight", 2, 1.0, 1.0, false),
        ("text_transformer.resblocks.0.attn.in_proj_bias", 1, 1.0, 0.0, false),
        ("ln_final.weight", 1, 1.0, 0.0, false),
        ("text_projection", 2, 1.0, 1.0, false),
        ("logit_scale", 0, 1.0, 0.0, false),
        ("logit_bias", 0, 1.0, 0.0, false),
        ("dino_head.mlp.0.weight", 2, 1.0, 1.0, false),
        ("dino_head.mlp.0.bias", 1, 1.0, 0.0, false),
        ("dino_head.last_layer.weight_g", 2, 1.0, 1.0, true),
        ("dino_head.last_layer.weight_v", 2, 1.0, 1.0, true),
    ];
    for &(name, ndim, lr, wd, last) in table {
        let (got_lr, got_wd, got_last) = dinov2_multipliers(name, ndim, 4, 0.9, 0.2);
        assert!((got_lr - lr).abs() <= 1e-15 * lr, "{name}: lr_mult {got_lr} != {lr}");
        assert_eq!((got_wd, got_last), (wd, last), "{name}");
    }
}

/// DINOv2's `CosineScheduler`, verbatim, printing `[schedule[it] for it in range(total + 3)]` per config.
const NUMPY_SCHEDULER: &str = r#"
import json, sys
import numpy as np
class CosineScheduler(object):
    def __init__(self, base_value, final_value, total_iters, warmup_iters=0, start_warmup_value=0, freeze_iters=0):
        super().__init__()
        self.final_value = final_value
        self.total_iters = total_iters
        freeze_schedule = np.zeros((freeze_iters))
        warmup_schedule = np.linspace(start_warmup_value, base_value, warmup_iters)
        iters = np.arange(total_iters - warmup_iters - freeze_iters)
        schedule = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * iters / len(iters)))
        self.schedule = np.concatenate((freeze_schedule, warmup_schedule, schedule))
        assert len(self.schedule) == self.total_iters
    def __getitem__(self, it):
        if it >= self.total_iters:
            return self.final_value
        else:
            return self.schedule[it]
out = []
for c in json.loads(sys.argv[1]):
    s = CosineScheduler(*c)
    out.append([float(s[it]) for it in range(c[2] + 3)])
print(json.dumps(out))
"#;

#[test]
fn cosine_scheduler_matches_numpy() {
    let _generator = common::torch_generator();
    // (base, final, total, warmup, start_warmup, freeze): lr-like, wd-like, freeze + warm-up, teacher-temp
    // warm-up only, one warm-up step, constant warm-up.
    let configs: [(f64, f64, u64, u64, f64, u64); 6] = [
        (1e-2, 1e-6, 100, 10, 0.0, 0),
        (0.04, 0.4, 50, 0, 0.0, 0),
        (0.5, 0.1, 40, 7, 0.05, 5),
        (0.07, 0.07, 30, 30, 0.04, 0),
        (1.0, 0.0, 10, 1, 0.3, 0),
        (0.2, 0.2, 10, 3, 0.2, 2),
    ];
    let json = serde_json::to_string(&configs.map(|c| serde_json::json!([c.0, c.1, c.2, c.3, c.4, c.5]))).unwrap();
    let numpy: Vec<Vec<f64>> = serde_json::from_str(&python(NUMPY_SCHEDULER, &[&json])).unwrap();
    let (mut worst, mut equal, mut total) = (0f64, 0, 0);
    for (c, expected) in configs.iter().zip(&numpy) {
        let s = CosineScheduler::new(c.0, c.1, c.2, c.3, c.4, c.5).unwrap();
        for (it, &want) in expected.iter().enumerate() {
            let got = s.value(it as u64);
            assert!((got - want).abs() <= 1e-12, "{c:?} at {it}: {got} vs numpy {want}");
            worst = worst.max((got - want).abs());
            equal += usize::from(got == want);
            total += 1;
        }
    }
    eprintln!("CosineScheduler vs numpy: {equal}/{total} values identical, max abs diff {worst:e}");
    assert!(CosineScheduler::new(1.0, 0.0, 10, 8, 0.0, 3).is_err(), "warm-up + freeze longer than the schedule");
}

#[test]
fn schedules_freeze_last_layer_and_warm_up_teacher_temp() {
    let _generator = common::torch_generator();
    let config = ScheduleConfig {
        warmup_steps: 10,
        warmup_teacher_temp_steps: 20,
        freeze_last_layer_steps: 5,
        ..ScheduleConfig::default()
    };
    let s = Schedules::new(&config, 100).unwrap();
    for step in 0..5 {
        assert_eq!(s.at(step).last_layer_lr, 0.0, "step {step}");
    }
    for step in [5, 50, 99, 100, 150] {
        let v = s.at(step);
        assert!(v.last_layer_lr > 0.0 && v.last_layer_lr == v.lr, "step {step}: {v:?}");
    }
    assert_eq!(s.at(0).lr, 0.0);
    assert_eq!(s.at(9).lr, 0.004, "the warm-up ends exactly at the peak");
    assert!((s.at(10).lr - 0.004).abs() < 1e-15, "the cosine starts at the peak");
    assert_eq!(s.at(100).lr, 1e-6);
    assert_eq!((s.at(0).teacher_temp, s.at(19).teacher_temp, s.at(20).teacher_temp), (0.04, 0.07, 0.07));
    assert!(s.at(10).teacher_temp > 0.04 && s.at(10).teacher_temp < 0.07);
    assert_eq!((s.at(0).momentum, s.at(100).momentum), (0.992, 1.0));
    assert!((s.at(0).wd - 0.04).abs() < 1e-15 && s.at(100).wd == 0.4);
    assert!(Schedules::new(&config, 5).is_err(), "a warm-up longer than the run is an error");
}

#[test]
fn schedule_config_defaults_and_unknown_fields() {
    let _generator = common::torch_generator();
    let c: ScheduleConfig = serde_json::from_str(r#"{"lr": 0.1}"#).unwrap();
    assert_eq!(c, ScheduleConfig { lr: 0.1, ..ScheduleConfig::default() });
    assert_eq!((c.warmup_steps, c.warmup_teacher_temp_steps, c.freeze_last_layer_steps), (12_500, 37_500, 1250));
    assert!(serde_json::from_str::<ScheduleConfig>(r#"{"learning_rate": 0.1}"#).is_err());
    let a: AdamWConfig = serde_json::from_str("{}").unwrap();
    assert_eq!((a.beta1, a.beta2, a.eps), (0.9, 0.999, 1e-8));
}
