//! Loss parity of the pre-training objectives (`vtp::train::pretrain::objectives`) with the golden values of
//! `../shared/fixtures/losses.safetensors` (LOSSES.md §1–§6: OpenCLIP CLIP/SigLIP, DINOv2 DINO, iBOT and KoLeo,
//! DINOv2 mask collation). Bounds: relative error ≤ 1e-5 on losses, targets and centres, absolute error ≤ 1e-4
//! on gradients; every compared value's error is printed (`--nocapture`). The mask collation itself
//! (`MaskBatch::from_masks` against `mask.*`) is tested in `tests/data_augment.rs`; here only the gather of the
//! masked patch logits. The reconstruction loss has no fixture: it is checked against `Lpips` directly, with a
//! random LPIPS network.
//!
//! Checked under both CPU kernel sets: the default dispatch and with `ONEDNN_MAX_CPU_ISA=AVX2
//! ATEN_CPU_CAPABILITY=avx2` exported; both pass.
mod common;

use std::collections::HashMap;
use tch::{Device, Kind, Tensor};
use vtp::data::masking::MaskBatch;
use vtp::dist::DataParallel;
use vtp::eval::lpips::Lpips;
use vtp::eval::recon::denormalise;
use vtp::io::read_safetensors_map;
use vtp::model::l2_normalize;
use vtp::train::pretrain::objectives::clip::{
    clamp_logit_scale, clip_logits, clip_loss, siglip_logits, siglip_loss, LOGIT_SCALE_MAX,
};
use vtp::train::pretrain::objectives::dino::{DinoLoss, TeacherCentering};
use vtp::train::pretrain::objectives::ibot::IbotPatchLoss;
use vtp::train::pretrain::objectives::koleo::{koleo_loss, koleo_per_crop, nearest_neighbours, KOLEO_EPS};
use vtp::train::pretrain::objectives::recon::ReconLoss;

/// Bound on the relative error of losses, targets and centres.
const LOSS_REL: f64 = 1e-5;
/// Bound on the absolute error of gradients.
const GRAD_ABS: f64 = 1e-4;
/// The reference temperatures and momentum (Python floats in the generator).
const TEACHER_TEMP: f64 = 0.07;
const STUDENT_TEMP: f64 = 0.1;
const CENTER_MOMENTUM: f64 = 0.9;

type Fixtures = HashMap<String, Tensor>;

fn load() -> Fixtures {
    read_safetensors_map(&common::fixture("losses.safetensors")).expect("losses.safetensors loads")
}

fn get<'a>(fx: &'a Fixtures, key: &str) -> &'a Tensor {
    fx.get(key).unwrap_or_else(|| panic!("fixture key '{key}' is missing"))
}

/// A fresh leaf copy of a fixture tensor that records gradients.
fn leaf(fx: &Fixtures, key: &str) -> Tensor {
    get(fx, key).copy().set_requires_grad(true)
}

/// `max |a - b|` (f64).
fn max_abs(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size(), "shapes differ");
    (a.to_kind(Kind::Double) - b.to_kind(Kind::Double)).abs().max().double_value(&[])
}

/// Relative error `max |a - b| / max |b|` (for a scalar, `|a - b| / |b|`).
fn rel(a: &Tensor, b: &Tensor) -> f64 {
    max_abs(a, b) / b.to_kind(Kind::Double).abs().max().double_value(&[])
}

/// Asserts `rel(ours, fixture[key]) ≤ 1e-5`.
fn check_rel(fx: &Fixtures, key: &str, ours: &Tensor) {
    let err = rel(ours, get(fx, key));
    println!("{key}: rel err {err:.3e}");
    assert!(err <= LOSS_REL, "{key}: relative error {err:.3e} > {LOSS_REL:e}");
}

/// Asserts `max_abs(ours, fixture[key]) ≤ 1e-4`.
fn check_grad(fx: &Fixtures, key: &str, ours: &Tensor) {
    let err = max_abs(ours, get(fx, key));
    println!("{key}: abs err {err:.3e}");
    assert!(err <= GRAD_ABS, "{key}: absolute error {err:.3e} > {GRAD_ABS:e}");
}

#[test]
fn clip_loss_and_gradients_match_open_clip() {
    let _generator = common::torch_generator();
    let fx = load();
    let image = leaf(&fx, "clip.image_features");
    let text = leaf(&fx, "clip.text_features");
    let log_scale = leaf(&fx, "clip.log_logit_scale");
    let scale = log_scale.exp();
    check_rel(&fx, "clip.logit_scale", &scale);
    let (per_image, per_text) = clip_logits(&image, &text, &scale);
    check_rel(&fx, "clip.logits_per_image", &per_image);
    check_rel(&fx, "clip.logits_per_text", &per_text);
    let loss = clip_loss(&image, &text, &scale);
    check_rel(&fx, "clip.loss", &loss);
    loss.backward();
    check_grad(&fx, "clip.grad_image_features", &image.grad());
    check_grad(&fx, "clip.grad_text_features", &text.grad());
    check_grad(&fx, "clip.grad_log_logit_scale", &log_scale.grad());

    let image_raw = leaf(&fx, "clip.image_features_raw");
    let text_raw = leaf(&fx, "clip.text_features_raw");
    let (image_n, text_n) = (l2_normalize(&image_raw), l2_normalize(&text_raw));
    check_rel(&fx, "clip.image_features", &image_n);
    check_rel(&fx, "clip.text_features", &text_n);
    let loss = clip_loss(&image_n, &text_n, &get(&fx, "clip.log_logit_scale").exp());
    check_rel(&fx, "clip.loss", &loss);
    loss.backward();
    check_grad(&fx, "clip.grad_image_features_raw", &image_raw.grad());
    check_grad(&fx, "clip.grad_text_features_raw", &text_raw.grad());
}

#[test]
fn logit_scale_clamp_is_zero_to_ln_100_in_place() {
    let _generator = common::torch_generator();
    assert_eq!(LOGIT_SCALE_MAX, 100f64.ln());
    let log_scale = Tensor::from_slice(&[5.0f32, -1.0, 2.5]).set_requires_grad(true);
    clamp_logit_scale(&log_scale);
    let expected = Tensor::from_slice(&[LOGIT_SCALE_MAX as f32, 0.0, 2.5]);
    assert!(log_scale.equal(&expected), "clamped to {log_scale:?}");
    assert!(log_scale.requires_grad(), "the parameter stays trainable");
}

#[test]
fn siglip_loss_and_gradients_match_open_clip() {
    let _generator = common::torch_generator();
    let fx = load();
    for prefix in ["siglip", "siglip2"] {
        let image = leaf(&fx, "clip.image_features");
        let text = leaf(&fx, "clip.text_features");
        let log_scale = leaf(&fx, &format!("{prefix}.log_logit_scale"));
        let bias = leaf(&fx, &format!("{prefix}.logit_bias"));
        let scale = log_scale.exp();
        if prefix == "siglip" {
            check_rel(&fx, "siglip.logit_scale", &scale);
            check_rel(&fx, "siglip.logits", &siglip_logits(&image, &text, &scale, &bias));
        }
        let loss = siglip_loss(&image, &text, &scale, &bias);
        check_rel(&fx, &format!("{prefix}.loss"), &loss);
        loss.backward();
        check_grad(&fx, &format!("{prefix}.grad_image_features"), &image.grad());
        check_grad(&fx, &format!("{prefix}.grad_text_features"), &text.grad());
        check_grad(&fx, &format!("{prefix}.grad_log_logit_scale"), &log_scale.grad());
        check_grad(&fx, &format!("{prefix}.grad_logit_bias"), &bias.grad());
    }
}

#[test]
fn dino_losses_match_dinov2_with_centering_and_sinkhorn() {
    let _generator = common::torch_generator();
    let fx = load();
    assert_eq!(get(&fx, "dino.teacher_temp").double_value(&[]), TEACHER_TEMP as f32 as f64);
    assert_eq!(get(&fx, "dino.student_temp").double_value(&[]), STUDENT_TEMP as f32 as f64);
    assert_eq!(get(&fx, "dino.center_momentum").double_value(&[]), CENTER_MOMENTUM as f32 as f64);
    let teacher = get(&fx, "dino.teacher_logits");
    for (name, centering) in [("centering", TeacherCentering::Centering), ("sinkhorn", TeacherCentering::SinkhornKnopp)]
    {
        let key = |k: &str| format!("dino.{name}.{k}");
        let mut dino = DinoLoss::new(32, STUDENT_TEMP, CENTER_MOMENTUM, Device::Cpu);
        dino.center = get(&fx, "dino.center_in").copy();
        let targets = dino.teacher_targets(teacher, TEACHER_TEMP, centering, &DataParallel::single()).unwrap();
        check_rel(&fx, &key("targets"), &targets);
        match centering {
            TeacherCentering::Centering => check_rel(&fx, "dino.center_out", &dino.center),
            TeacherCentering::SinkhornKnopp => assert!(dino.center.equal(get(&fx, "dino.center_in"))),
        }

        let global = leaf(&fx, "dino.student_global_logits");
        let local = leaf(&fx, "dino.student_local_logits");
        let local_raw = dino.forward(&local.chunk(2, 0), &targets.chunk(2, 0));
        check_rel(&fx, &key("loss_local_raw"), &local_raw);
        let global_raw = dino.forward(&[global.shallow_clone()], &[targets.shallow_clone()]);
        check_rel(&fx, &key("loss_global_raw"), &global_raw);

        let terms = dino.dino_crops_loss(&global, &local, &targets, 2, 2);
        check_rel(&fx, &key("dino_local_crops_loss"), &terms.local);
        check_rel(&fx, &key("dino_global_crops_loss"), &terms.global);
        let total = terms.total();
        check_rel(&fx, &key("total"), &total);
        total.backward();
        check_grad(&fx, &key("grad_student_global_logits"), &global.grad());
        check_grad(&fx, &key("grad_student_local_logits"), &local.grad());

        // Without local crops: no local term, and the global term is `raw · 2 / 2`.
        let no_local = dino.dino_crops_loss(&global, &local, &targets, 2, 0);
        assert_eq!(no_local.local.double_value(&[]), 0.0);
        check_rel(&fx, &key("loss_global_raw"), &no_local.global);
    }
}

#[test]
fn teacher_centering_names_match_the_dinov2_config() {
    let _generator = common::torch_generator();
    let names = serde_json::to_string(&[TeacherCentering::Centering, TeacherCentering::SinkhornKnopp]).unwrap();
    assert_eq!(names, r#"["centering","sinkhorn_knopp"]"#);
    let parsed: TeacherCentering = serde_json::from_str(r#""sinkhorn_knopp""#).unwrap();
    assert_eq!(parsed, TeacherCentering::SinkhornKnopp);
}

#[test]
fn ibot_patch_loss_matches_dinov2_with_centering_and_sinkhorn() {
    let _generator = common::torch_generator();
    let fx = load();
    let masks = get(&fx, "mask.collated_masks");
    let masks_weight = get(&fx, "mask.masks_weight");
    let default_weights = MaskBatch::from_masks(masks.shallow_clone(), 88).masks_weight;
    let teacher = get(&fx, "ibot.teacher_patch_logits_masked");
    for (name, centering) in [("centering", TeacherCentering::Centering), ("sinkhorn", TeacherCentering::SinkhornKnopp)]
    {
        let key = |k: &str| format!("ibot.{name}.{k}");
        let mut ibot = IbotPatchLoss::new(32, STUDENT_TEMP, CENTER_MOMENTUM, Device::Cpu);
        ibot.center = get(&fx, "ibot.center_in").copy();
        let targets = ibot.teacher_targets(teacher, TEACHER_TEMP, centering, &DataParallel::single()).unwrap();
        check_rel(&fx, &key("targets"), &targets);
        match centering {
            TeacherCentering::Centering => check_rel(&fx, "ibot.center_out", &ibot.center),
            TeacherCentering::SinkhornKnopp => assert!(ibot.center.equal(get(&fx, "ibot.center_in"))),
        }

        let student = leaf(&fx, "ibot.student_patch_logits_masked");
        check_rel(&fx, &key("loss_raw"), &ibot.forward_masked(&student, &targets, masks, masks_weight));
        let with_default = ibot.forward_masked(&student, &targets, masks, &default_weights);
        check_rel(&fx, &key("loss_raw_default_weights"), &with_default);
        let loss = ibot.ibot_patch_loss(&student, &targets, masks, masks_weight, 2);
        check_rel(&fx, &key("ibot_patch_loss"), &loss);
        loss.backward();
        check_grad(&fx, &key("grad_student_patch_logits_masked"), &student.grad());
    }
}

#[test]
fn masked_patch_logits_are_gathered_at_the_mask_indices() {
    let _generator = common::torch_generator();
    let fx = load();
    let batch = MaskBatch::from_masks(get(&fx, "mask.collated_masks").shallow_clone(), 88);
    for who in ["teacher", "student"] {
        let all = get(&fx, &format!("ibot.{who}_patch_logits_all"));
        let masked = all.flatten(0, 1).index_select(0, &batch.mask_indices_list);
        let reference = get(&fx, &format!("ibot.{who}_patch_logits_masked"));
        println!("ibot.{who}_patch_logits_masked: abs err {:.3e}", max_abs(&masked, reference));
        assert!(masked.equal(reference), "{who} masked logits differ");
    }
}

#[test]
fn koleo_matches_dinov2() {
    let _generator = common::torch_generator();
    let fx = load();
    let x = leaf(&fx, "koleo.x");
    let normalised = tch::no_grad(|| &x / x.linalg_norm(2.0, [-1i64].as_slice(), true, None).clamp_min(KOLEO_EPS));
    let nn = nearest_neighbours(&normalised);
    assert!(nn.equal(get(&fx, "koleo.nn_index")), "nearest neighbours {nn:?}");
    let loss = koleo_loss(&x);
    check_rel(&fx, "koleo.loss", &loss);
    loss.backward();
    check_grad(&fx, "koleo.grad_x", &x.grad());
    check_rel(&fx, "koleo.loss_trainloop", &(koleo_per_crop(get(&fx, "koleo.x"), 2) * 0.1));
    check_rel(&fx, "koleo.loss_dup", &koleo_loss(get(&fx, "koleo.x_dup")));
}

/// An LPIPS network with seeded random VGG16 weights and non-negative heads.
fn random_lpips() -> Lpips {
    tch::manual_seed(0);
    let mut backbone = Vec::new();
    for (i, cin, cout) in vtp::eval::lpips::CONVS {
        let std = (2.0 / (9 * cin) as f64).sqrt();
        backbone
            .push((format!("features.{i}.weight"), Tensor::randn([cout, cin, 3, 3], (Kind::Float, Device::Cpu)) * std));
        backbone.push((format!("features.{i}.bias"), Tensor::randn([cout], (Kind::Float, Device::Cpu)) * 0.01));
    }
    let heads: Vec<_> = vtp::eval::lpips::CHANNELS
        .iter()
        .enumerate()
        .map(|(k, &c)| (format!("lin{k}.model.1.weight"), Tensor::rand([1, c, 1, 1], (Kind::Float, Device::Cpu))))
        .collect();
    Lpips::from_state_dicts(&backbone, &heads, "random", Device::Cpu).unwrap()
}

/// ImageNet-normalised `[2, 3, 16, 16]` images whose pixels lie in `[0.05, 0.95]`.
fn normalised_images() -> Tensor {
    let u = Tensor::rand([2, 3, 16, 16], (Kind::Float, Device::Cpu)) * 0.9 + 0.05;
    let mean = Tensor::from_slice(&vtp::data::image::IMAGENET_MEAN).view([1, 3, 1, 1]);
    let std = Tensor::from_slice(&vtp::data::image::IMAGENET_STD).view([1, 3, 1, 1]);
    (u - mean) / std
}

#[test]
fn recon_loss_is_l1_plus_lpips_with_gradients_to_the_reconstruction() {
    let _generator = common::torch_generator();
    let target = normalised_images();
    let reconstruction = normalised_images().set_requires_grad(true);
    let loss = ReconLoss::new(Some(random_lpips()));
    assert!(loss.has_lpips());
    let terms = loss.forward(&target, &reconstruction).unwrap();
    let l1 = tch::no_grad(|| (&reconstruction - &target).abs().mean(None));
    let lpips = terms.lpips.as_ref().expect("an LPIPS term");
    let reference = random_lpips().distance01(&denormalise(&target), &denormalise(&reconstruction)).unwrap().mean(None);
    let (l1_err, lpips_err) = (rel(&terms.l1, &l1), rel(lpips, &reference));
    let total_err = rel(&terms.total, &(&l1 + &reference));
    println!("recon: l1 rel err {l1_err:.3e}, lpips rel err {lpips_err:.3e}, total rel err {total_err:.3e}");
    assert!(l1_err <= LOSS_REL && lpips_err <= LOSS_REL && total_err <= LOSS_REL);
    assert!(lpips.double_value(&[]) > 0.0);

    lpips.backward();
    let grad = reconstruction.grad();
    let grad_norm = grad.abs().max().double_value(&[]);
    assert!(grad_norm > 0.0 && grad.isfinite().all().int64_value(&[]) == 1, "LPIPS gradient {grad_norm}");

    let l1_only = ReconLoss::new(None);
    assert!(!l1_only.has_lpips());
    let terms = l1_only.forward(&target, &reconstruction).unwrap();
    assert!(terms.lpips.is_none() && terms.total.equal(&terms.l1));
    let (default, note) = ReconLoss::load_default(Device::Cpu);
    assert_eq!(default.has_lpips(), note.is_none(), "note: {note:?}");

    // The L2 term (`loss.l2_weight`): the mean squared error of the normalised tensors, weighted into the total.
    let with_l2 = ReconLoss::new(None).with_l2(0.5).forward(&target, &reconstruction).unwrap();
    let mse = (&reconstruction - &target).square().mean(tch::Kind::Float);
    let l2 = with_l2.l2.as_ref().expect("an L2 term");
    assert!(l2.allclose(&mse, 1e-6, 1e-7, false), "L2 {l2} vs MSE {mse}");
    assert!(with_l2.total.allclose(&(&with_l2.l1 + &mse * 0.5), 1e-6, 1e-7, false));
    assert!(terms.l2.is_none(), "no L2 term without a weight");
}

/// A step without masked patches (a few images per process) leaves the iBOT centre as it was, finite,
/// instead of averaging an empty set into NaN; with patches it moves.
#[test]
fn ibot_centre_survives_a_step_without_masked_patches() {
    let _generator = common::torch_generator();
    let dp = DataParallel::single();
    let mut ibot = IbotPatchLoss::new(8, 0.1, 0.9, Device::Cpu);
    ibot.center = Tensor::full([1, 1, 8], 0.5, (Kind::Float, Device::Cpu));
    let before = ibot.center.copy();
    let none = Tensor::zeros([0, 8], (Kind::Float, Device::Cpu));
    let targets = ibot.teacher_targets(&none, 0.04, TeacherCentering::Centering, &dp).unwrap();
    assert_eq!(targets.size(), [0, 8]);
    assert!(ibot.center.equal(&before), "centre {} after an empty step", ibot.center);
    ibot.update_center(&Tensor::ones([3, 8], (Kind::Float, Device::Cpu)), &dp).unwrap();
    let want = Tensor::full([1, 1, 8], 0.55, (Kind::Float, Device::Cpu));
    assert!(ibot.center.allclose(&want, 1e-6, 1e-7, false), "centre {}", ibot.center);
}
