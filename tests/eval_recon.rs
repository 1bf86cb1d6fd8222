//! Reconstruction metrics: rFID does not depend on the batch size (docs/design.md §5.3, issue acceptance: batch
//! sizes 1, 7 and 32 agree to 1e-6), and the 8-bit quantisation and de-normalisation rules.
mod common;
use tch::{Device, Kind, Tensor};
use vtp::eval::inception::{FidInception, InputConvention};
use vtp::eval::recon::{as_uint8_image, denormalise, rfid};

#[test]
fn rfid_is_independent_of_the_batch_size() {
    let _generator = common::torch_generator();
    let inception = FidInception::load(&common::fid_helper_weights(), Device::Cpu)
        .unwrap()
        .with_convention(InputConvention::PytorchFid);
    let images = |seed: i64, n: i64| -> Vec<Tensor> {
        tch::manual_seed(seed);
        (0..n).map(|_| as_uint8_image(&Tensor::rand([3, 48, 64], (Kind::Float, Device::Cpu)))).collect()
    };
    let (reference, reconstructed) = (images(1, 17), images(2, 17));
    let values: Vec<f64> =
        [1, 7, 32].iter().map(|&b| rfid(&inception, &reference, &reconstructed, b).unwrap()).collect();
    println!("rFID at batch 1, 7, 32: {values:?}");
    assert!(values[0] > 1.0, "distinct random image sets have a clearly positive rFID: {values:?}");
    for v in &values[1..] {
        assert!(((v - values[0]) / values[0]).abs() <= 1e-6, "{values:?}");
    }
}

#[test]
fn quantisation_truncates_and_denormalisation_inverts_imagenet_normalisation() {
    let _generator = common::torch_generator();
    let x = Tensor::from_slice(&[0.0f32, 0.5, 0.999, 1.0]).view([1, 1, 2, 2]).repeat([1, 3, 1, 1]);
    let q = Vec::<f32>::try_from(as_uint8_image(&x).reshape([-1]).narrow(0, 0, 4)).unwrap();
    assert_eq!(q, [0.0, 127.0 / 255.0, 254.0 / 255.0, 1.0], "(x·255).astype(uint8): truncation");
    let mean = Tensor::from_slice(&[0.485f32, 0.456, 0.406]).view([1, 3, 1, 1]);
    let std = Tensor::from_slice(&[0.229f32, 0.224, 0.225]).view([1, 3, 1, 1]);
    let img = Tensor::rand([2, 3, 4, 4], (Kind::Float, Device::Cpu));
    let back = denormalise(&((&img - &mean) / &std));
    assert!((back - img).abs().max().double_value(&[]) < 1e-6);
    let clamped = denormalise(&Tensor::full([1, 3, 1, 1], 100.0, (Kind::Float, Device::Cpu)));
    assert_eq!(clamped.max().double_value(&[]), 1.0);
}
