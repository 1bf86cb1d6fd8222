//! Fréchet distance against pytorch-fid's values (`frechet.safetensors`, LOSSES.md §7), and PSNR /
//! SSIM on hand-computable cases.
mod common;
use tch::{Device, Kind, Tensor};
use vtp::eval::frechet::{frechet_distance, GaussianStats, FID_EPS};
use vtp::eval::metrics::{psnr, ssim};
use vtp::io::read_safetensors_map;

fn scalar(t: &Tensor) -> f64 {
    t.double_value(&[])
}

#[test]
fn frechet_distance_matches_pytorch_fid() {
    let _generator = common::torch_generator();
    let fx = read_safetensors_map(&common::fixture("frechet.safetensors")).unwrap();
    assert_eq!(scalar(&fx["eps"]), FID_EPS);
    for case in ["a", "b", "c"] {
        let get = |k: &str| fx[&format!("{case}.{k}")].shallow_clone();
        let (s1, s2) =
            (GaussianStats::from_features(&get("x1")).unwrap(), GaussianStats::from_features(&get("x2")).unwrap());
        let stat_err = [(&s1.mu, "mu1"), (&s2.mu, "mu2"), (&s1.sigma, "sigma1"), (&s2.sigma, "sigma2")]
            .iter()
            .map(|(t, k)| (*t - get(k)).abs().max().double_value(&[]))
            .fold(0.0, f64::max);
        assert!(stat_err < 1e-12, "{case}: statistics differ by {stat_err}");
        let r = frechet_distance(&s1, &s2, FID_EPS).unwrap();
        let eps_expected = get("eps_branch_taken").int64_value(&[]) == 1;
        assert_eq!(r.eps_branch, eps_expected, "{case}: eps branch");
        let reference = scalar(&get("fid"));
        let rel = (r.fid - reference).abs() / reference.abs();
        println!("case {case}: fid {:.12} reference {reference:.12} rel {rel:.2e} eps_branch {}", r.fid, r.eps_branch);
        assert!(rel <= 1e-6, "{case}: relative error {rel:.3e}");
        if eps_expected {
            let forced = scalar(&get("fid_forced_eps_offset"));
            assert!((r.fid - forced).abs() / forced <= 1e-6, "{case}: eps branch value");
        }
        assert!((r.diff_sq - scalar(&get("diff_sq"))).abs() < 1e-9);
    }
}

#[test]
fn frechet_distance_of_identical_sets_is_zero_and_shapes_are_checked() {
    let _generator = common::torch_generator();
    tch::manual_seed(0);
    let x = Tensor::randn([200, 16], (Kind::Double, Device::Cpu));
    let s = GaussianStats::from_features(&x).unwrap();
    assert!(frechet_distance(&s, &s, FID_EPS).unwrap().fid.abs() < 1e-9);
    let other = GaussianStats::from_features(&Tensor::randn([50, 8], (Kind::Double, Device::Cpu))).unwrap();
    assert!(frechet_distance(&s, &other, FID_EPS).is_err());
    assert!(GaussianStats::from_features(&Tensor::zeros([1, 4], (Kind::Double, Device::Cpu))).is_err());
}

#[test]
fn psnr_of_hand_computable_cases() {
    let _generator = common::torch_generator();
    let a = Tensor::zeros([2, 3, 4, 4], (Kind::Float, Device::Cpu));
    let b = a.copy();
    let _ = b.get(0).fill_(0.1); // mse 0.01 -> 20 dB
    let _ = b.get(1).fill_(0.5); // mse 0.25 -> 6.0206 dB
    let p = Vec::<f64>::try_from(psnr(&a, &b)).unwrap();
    assert!((p[0] - 20.0).abs() < 1e-5, "{p:?}");
    assert!((p[1] - 10.0 * 4f64.log10()).abs() < 1e-6, "{p:?}");
    assert!(psnr(&a, &a).double_value(&[0]).is_infinite());
    // Black against white: mse 1 -> 0 dB; half of the values differing: mse 0.5 -> 3.0103 dB.
    let white = Tensor::ones([1, 3, 2, 2], (Kind::Float, Device::Cpu));
    let black = Tensor::zeros([1, 3, 2, 2], (Kind::Float, Device::Cpu));
    assert_eq!(psnr(&black, &white).double_value(&[0]), 0.0);
    let half = Tensor::from_slice(&[1.0f32, 0.0]).repeat([6]).view([1, 3, 2, 2]);
    assert!((psnr(&black, &half).double_value(&[0]) - 10.0 * 2f64.log10()).abs() < 1e-12);
}

#[test]
fn ssim_of_hand_computable_cases() {
    let _generator = common::torch_generator();
    tch::manual_seed(1);
    let x = Tensor::rand([3, 3, 24, 24], (Kind::Float, Device::Cpu));
    let same = Vec::<f64>::try_from(ssim(&x, &x)).unwrap();
    assert!(same.iter().all(|v| (v - 1.0).abs() < 1e-12), "{same:?}");
    // Constant images a, b: SSIM = (2ab + c1) / (a² + b² + c1) (both variances zero).
    let (a, b) = (0.3, 0.7);
    let ca = Tensor::full([1, 3, 16, 16], a, (Kind::Float, Device::Cpu));
    let cb = Tensor::full([1, 3, 16, 16], b, (Kind::Float, Device::Cpu));
    let c1 = 0.01f64.powi(2);
    let (a, b) = (a as f32 as f64, b as f32 as f64);
    let expected = (2.0 * a * b + c1) / (a * a + b * b + c1);
    assert!((ssim(&ca, &cb).double_value(&[0]) - expected).abs() < 1e-9);
    // Batch-size independence: per-image values do not depend on the other images in the batch.
    let batch = ssim(&x, &x.flip([3]));
    for i in 0..3 {
        let single = ssim(&x.narrow(0, i, 1), &x.narrow(0, i, 1).flip([3]));
        assert_eq!(batch.double_value(&[i]), single.double_value(&[0]));
    }
    let noisy = ssim(&x, &(&x * 0.5 + 0.25)).double_value(&[0]);
    assert!(noisy > 0.0 && noisy < 1.0, "{noisy}");
}

#[test]
fn fid_stats_npz_round_trips_through_numpy() {
    let _generator = common::torch_generator();
    use vtp::eval::fid_stats::{read_npz, write_npz};
    let python = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python");
    assert!(python.exists(), "the project venv is missing: run scripts/setup.sh");
    let tmp = tempfile::tempdir().unwrap();
    tch::manual_seed(3);
    let stats = GaussianStats::from_features(&Tensor::randn([20, 5], (Kind::Double, Device::Cpu))).unwrap();
    let ours = tmp.path().join("ours.npz");
    write_npz(&ours, &stats).unwrap();
    let theirs = tmp.path().join("theirs.npz");
    let script = "import sys, numpy as np\nf = np.load(sys.argv[1])\n\
        np.savez_compressed(sys.argv[2], mu=f['mu'].astype(np.float32), sigma=f['sigma'])\n\
        print(f['mu'].dtype, f['mu'].shape, f['sigma'].shape, float(f['sigma'].sum()))";
    let out = std::process::Command::new(&python).args(["-c", script]).arg(&ours).arg(&theirs).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.starts_with("float64 (5,) (5, 5)"), "{text}");
    let sum: f64 = text.split_whitespace().last().unwrap().parse().unwrap();
    assert!((sum - stats.sigma.sum(Kind::Double).double_value(&[])).abs() < 1e-12);
    let back = read_npz(&theirs).unwrap();
    assert!((back.sigma - &stats.sigma).abs().max().double_value(&[]) == 0.0);
    assert!((back.mu - &stats.mu).abs().max().double_value(&[]) < 1e-6, "mu went through float32");
    std::fs::write(tmp.path().join("bad.npz"), b"nope").unwrap();
    let err = read_npz(&tmp.path().join("bad.npz")).unwrap_err().to_string();
    assert!(err.contains("bad.npz") && !err.contains('\n'), "{err}");
}
