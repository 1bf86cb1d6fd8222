//! `loss.merge_trunk_passes` pinned to one trunk pass per objective: the merged student passes give
//! the same features, and one whole pre-training step the same losses and state, to ≤ 1e-5 relative
//! (the bound for a batched path). Exact agreement with PyTorch doing the same merge is
//! `tests/train_step_parity.rs`'s.
mod common;
use std::collections::HashMap;
use tch::{Device, Kind, Tensor};
use vtp::model::VtpModel;
use vtp::train::pretrain::config::PretrainConfig;
use vtp::train::pretrain::objectives::recon::ReconLoss;
use vtp::train::pretrain::passes::{run_trunk_passes, TrunkPass};
use vtp::train::pretrain::Pretrainer;
use vtp::train::schedule::Schedules;

const TOL: f64 = 1e-5;

/// The tiny preset at test size: CLIP and local crops at 32², global crops and reconstruction at 64²
/// (two merged groups, one with iBOT masks, one mixing bottlenecked and full-width rows).
fn config(merge: bool) -> PretrainConfig {
    let mut overrides: Vec<String> = common::PRETRAIN_STEP_SMALL.iter().map(|o| o.to_string()).collect();
    overrides.extend(
        [
            "model.vision_depth=2",
            "data.global_size=64",
            "data.local_size=32",
            "loss.ssl_drop_path=0.0",
            "loss.lpips=false",
        ]
        .map(String::from),
    );
    overrides.push(format!("loss.merge_trunk_passes={merge}"));
    PretrainConfig::load("tiny", None, &overrides).unwrap()
}

/// `‖a − b‖ / ‖b‖` in f64 (0 when equal).
fn rel_l2(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size());
    let (a, b) = (a.to_kind(Kind::Double), b.to_kind(Kind::Double));
    let diff = (&a - &b).norm().double_value(&[]);
    if diff == 0.0 {
        0.0
    } else {
        diff / b.norm().double_value(&[])
    }
}

#[test]
fn merged_trunk_passes_give_each_objective_its_own_features() {
    let _generator = common::torch_generator();
    tch::set_num_threads(2);
    let c = config(true);
    tch::manual_seed(0);
    let model = VtpModel::new(c.model.clone(), Device::Cpu).unwrap();
    let b = common::pretrain_batch(&c, 5);
    let ssl = b.ssl.as_ref().unwrap();
    assert!(ssl.masks.masks.any().int64_value(&[]) == 1, "some patches are masked");
    let pass = |images, masks, bottleneck| TrunkPass { images, masks, drop_path: 0.0, bottleneck };
    let passes = [
        pass(b.clip_images.as_ref().unwrap(), None, false),
        pass(&ssl.global, Some(&ssl.masks.masks), false),
        pass(&ssl.local, None, false),
        pass(&b.recon, None, true),
    ];
    let merged = tch::no_grad(|| run_trunk_passes(&model.trunk, &passes, true));
    let separate = tch::no_grad(|| run_trunk_passes(&model.trunk, &passes, false));
    for (i, (m, s)) in merged.iter().zip(&separate).enumerate() {
        assert_eq!(m.grid, s.grid);
        let (cls, patches) = (rel_l2(&m.cls, &s.cls), rel_l2(&m.patches, &s.patches));
        println!("pass {i}: cls {cls:.3e}, patches {patches:.3e}");
        assert!(cls <= TOL && patches <= TOL, "pass {i}: cls {cls:.3e}, patches {patches:.3e}");
    }
    // The bottlenecked pass really went through the 64-d bottleneck, the others did not.
    assert_eq!(merged[3].patches.size()[2], c.model.vision_feature_bottleneck);
    assert_eq!(merged[0].patches.size()[2], c.model.vision_embed_dim);
}

#[test]
fn a_step_with_merged_trunk_passes_matches_one_pass_per_objective() {
    let _generator = common::torch_generator();
    tch::set_num_threads(2);
    let run = |merge: bool| {
        let c = config(merge);
        let single = vtp::dist::DataParallel::single().into();
        let mut trainer = Pretrainer::new(c.clone(), ReconLoss::new(None), Device::Cpu, single).unwrap();
        let sv = Schedules::new(&c.schedule, c.train.steps).unwrap().at(60);
        let (losses, grad_norm, skipped) =
            tch::with_grad(|| trainer.step(&common::pretrain_batch(&c, 5), &sv, false)).unwrap();
        assert!(!skipped);
        let mut scalars: Vec<(String, f64)> =
            losses.terms.iter().map(|(n, t)| (n.to_string(), t.double_value(&[]))).collect();
        scalars.push(("grad_norm".into(), grad_norm));
        (scalars, trainer.state_tensors().into_iter().collect::<HashMap<_, _>>())
    };
    let (merged_losses, merged_state) = run(true);
    let (separate_losses, separate_state) = run(false);
    for ((name, m), (_, s)) in merged_losses.iter().zip(&separate_losses) {
        let rel = if m == s { 0.0 } else { (m - s).abs() / s.abs() };
        assert!(rel <= TOL, "{name}: merged {m} vs separate {s} (relative {rel:.3e})");
    }
    let mut worst = (0.0f64, String::new());
    assert_eq!(merged_state.len(), separate_state.len());
    for (name, m) in &merged_state {
        let rel = rel_l2(m, &separate_state[name]);
        assert!(rel <= TOL, "{name}: relative L2 {rel:.3e}");
        if rel > worst.0 {
            worst = (rel, name.clone());
        }
    }
    println!("{} state tensors; worst relative L2 {:.3e} ({})", merged_state.len(), worst.0, worst.1);
}
