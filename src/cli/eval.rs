//! `vtp eval`: zero-shot classification (§5.1), linear probing (§5.2) and reconstruction metrics
//! (§5.3) of a tokenizer on a labelled source; prints a table and writes a JSON report in which every
//! number names its protocol, data set, image count and the model's checksum.
use super::fid::InceptionArgs;
use super::images::progress;
use super::ModelArgs;
use crate::eval::classnames::{self, ResolvedClassSet};
use crate::eval::linear_probe::{FeatureCache, ProbeConfig, Protocol, PROBE_CROP};
use crate::eval::lpips::{self, Lpips};
use crate::eval::probe_pipeline::{linear_probes, ProbeOutcome, ProbeSetup};
use crate::eval::recon::{self, ReconMetrics, ReconResult};
use crate::eval::report::{ClassesSummary, EvalReport};
use crate::eval::zero_shot::{self, ZeroShotResult};
use crate::model::fingerprint::model_fingerprint;
use crate::model::VtpModel;
use anyhow::{bail, Result};
use clap::Args;
use indicatif::ProgressFinish;
use std::path::PathBuf;
use tch::Device;

/// Arguments of `vtp eval`.
#[derive(Args, Debug)]
pub struct EvalArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Evaluation data (source SPEC, see `vtp data --help`); the synthetic held-out split by default.
    #[arg(long, default_value = "synthetic:heldout?n=200&res=256")]
    data: String,
    /// Comma-separated tasks: zero-shot, linear-probe, recon.
    #[arg(long, default_value = "zero-shot,linear-probe,recon")]
    tasks: String,
    /// Class set of zero-shot and linear probing: imagenet, cifar10, synthetic-shape, synthetic-color,
    /// synthetic-shape_color, or folder: the class sub-folders of class-folder --data
    /// (DIR/<class>/<image>), in sorted name order like their labels, '_' read as a space in the
    /// prompts (the 80 OpenAI ImageNet templates); the linear probe then needs --train-data class
    /// folders with the same class names.
    #[arg(long, default_value = "synthetic-shape")]
    classes: String,
    /// Linear-probe training data (SPEC); the probe is evaluated on --data.
    #[arg(long, default_value = "synthetic:train?n=1000&res=256")]
    train_data: String,
    /// Linear-probe feature protocols: official-n1, official-n4, last-cls, bottleneck.
    #[arg(long, default_value = "official-n1,official-n4,last-cls,bottleneck")]
    protocols: String,
    /// Linear-probe epochs.
    #[arg(long, default_value_t = 10)]
    epochs: usize,
    /// Linear-probe crop side (docs/design.md §5.2: 224, after a resize to 256; another crop resizes to
    /// `crop·256/224`, e.g. 64 for models trained at 64²).
    #[arg(long, default_value_t = PROBE_CROP)]
    probe_crop: u32,
    /// At most this many images per data set.
    #[arg(long, default_value_t = 1000)]
    limit: usize,
    /// Image side of the zero-shot and reconstruction protocols (docs/design.md §5.1, §5.3: 256; use the
    /// training resolution for models trained smaller, e.g. 64 for `vtp pretrain --preset tiny`).
    #[arg(long, default_value_t = 256)]
    size: u32,
    /// Images per forward pass.
    #[arg(long, default_value_t = 16)]
    batch: usize,
    #[command(flatten)]
    inception: InceptionArgs,
    /// LPIPS backbone: torchvision's `vgg16-397923af.pth` (default: `$VTP_WEIGHTS` or ~/.cache/vtp/weights/).
    #[arg(long)]
    lpips_backbone: Option<PathBuf>,
    /// LPIPS heads: the `lpips` PyPI package's `weights/v0.1/vgg.pth` (default: as --lpips-backbone).
    #[arg(long)]
    lpips_heads: Option<PathBuf>,
    /// Folder of cached linear-probe features.
    #[arg(long, default_value = "out/eval/cache")]
    cache: PathBuf,
    /// JSON report path.
    #[arg(long, short = 'o', default_value = "out/eval/report.json")]
    out: PathBuf,
}

fn zero_shot(model: &VtpModel, a: &EvalArgs, classes: &ResolvedClassSet) -> Result<ZeroShotResult> {
    let bar = progress(a.limit, "zero-shot");
    let result =
        zero_shot::evaluate_set(model, &a.data, classes, a.limit, a.batch, a.size, |n| bar.set_position(n as u64));
    bar.finish_and_clear();
    result
}

/// The class set of --train-data, which must name the classes of --data (`classes`) in the same order:
/// for `--classes folder`, the class folders of both.
fn train_classes(a: &EvalArgs, classes: &ResolvedClassSet) -> Result<ResolvedClassSet> {
    let train = classnames::resolve_for_data(&a.classes, &a.train_data)?;
    if train.class_names != classes.class_names {
        bail!(
            "the {} classes of --train-data '{}' are not the {} classes of --data '{}' (same names, same order)",
            train.class_names.len(),
            a.train_data,
            classes.class_names.len(),
            a.data
        );
    }
    Ok(train)
}

/// The class sets the tasks need, resolved before the model loads so that a bad --classes, --data or
/// --train-data fails at once: that of --data for zero-shot and linear probing, that of --train-data
/// for linear probing.
fn class_sets(a: &EvalArgs, tasks: &[&str]) -> Result<(Option<ResolvedClassSet>, Option<ResolvedClassSet>)> {
    if !tasks.contains(&"zero-shot") && !tasks.contains(&"linear-probe") {
        return Ok((None, None));
    }
    let classes = classnames::resolve_for_data(&a.classes, &a.data)?;
    let train = if tasks.contains(&"linear-probe") { Some(train_classes(a, &classes)?) } else { None };
    Ok((Some(classes), train))
}

/// The linear probes of every --protocols feature protocol (docs/design.md §5.2), trained on --train-data
/// (`train_classes`) and evaluated on --data (`classes`), with a progress bar per feature extraction.
fn linear_probe(
    model: &VtpModel,
    a: &EvalArgs,
    (classes, train_classes): (&ResolvedClassSet, &ResolvedClassSet),
    fingerprint: &str,
) -> Result<ProbeOutcome> {
    let protocols: Vec<Protocol> =
        a.protocols.split(',').map(str::trim).filter(|s| !s.is_empty()).map(str::parse).collect::<Result<_>>()?;
    let setup = ProbeSetup {
        train: (&a.train_data, train_classes),
        val: (&a.data, classes),
        limit: a.limit,
        batch: a.batch,
        crop: a.probe_crop,
        config: ProbeConfig { epochs: a.epochs, ..ProbeConfig::default() },
        cache: FeatureCache::new(&a.cache),
    };
    linear_probes(model, fingerprint, &protocols, &setup, |what| {
        let bar = progress(a.limit, what).with_finish(ProgressFinish::AndClear);
        move |n| bar.set_position(n as u64)
    })
}

fn reconstruction(model: &VtpModel, a: &EvalArgs, device: Device, skipped: &mut Vec<String>) -> Result<ReconResult> {
    let inception = match a.inception.path() {
        Some(_) => Some(a.inception.load(device)?),
        None => {
            skipped.push(format!("rFID: {}", crate::eval::inception::WEIGHTS_HELP));
            None
        }
    };
    let lpips = match lpips::resolve_weight_paths(a.lpips_backbone.as_deref(), a.lpips_heads.as_deref()) {
        Ok(p) => Some(Lpips::load(&p.backbone, &p.heads, device)?),
        Err(e) => {
            skipped.push(format!("LPIPS: {e}"));
            None
        }
    };
    let bar = progress(a.limit, "reconstruct");
    let metrics = ReconMetrics { inception: inception.as_ref(), lpips: lpips.as_ref(), size: a.size, batch: a.batch };
    let result = recon::evaluate_source(model, &a.data, a.limit, &metrics, |n| bar.set_position(n as u64));
    bar.finish_and_clear();
    result
}

fn print_table(r: &EvalReport) {
    println!("{:<44} {:>10} {:>8}  protocol", "metric", "value", "images");
    let row = |name: &str, v: f64, n: usize, p: &str| println!("{name:<44} {v:>10.4} {n:>8}  {p}");
    if let Some(z) = &r.zero_shot {
        row("zero-shot top-1 (%)", z.top1, z.n_images, &z.protocol);
        row("zero-shot top-5 (%)", z.top5, z.n_images, &z.protocol);
    }
    for p in &r.linear_probe {
        row(&format!("linear probe top-1 (%) lr {:.0e}", p.best_lr), p.top1, p.n_val, &p.protocol);
    }
    if let Some(rc) = &r.reconstruction {
        row("PSNR (dB)", rc.psnr, rc.n_images, &rc.protocol);
        row("SSIM", rc.ssim, rc.n_images, &rc.protocol);
        for (name, v) in [("LPIPS-VGG", rc.lpips), ("rFID", rc.rfid)] {
            if let Some(v) = v {
                row(name, v, rc.n_images, &rc.protocol);
            }
        }
    }
    for s in &r.skipped {
        println!("skipped: {s}");
    }
}

/// Runs the requested tasks and writes the report.
pub fn eval(a: &EvalArgs, device: Device) -> Result<()> {
    let tasks: Vec<&str> = a.tasks.split(',').map(str::trim).filter(|s| !s.is_empty()).collect();
    if let Some(t) = tasks.iter().find(|t| !["zero-shot", "linear-probe", "recon"].contains(t)) {
        bail!("unknown task '{t}' (expected zero-shot, linear-probe, recon)");
    }
    let (classes, train_classes) = class_sets(a, &tasks)?;
    let model = a.model.load(device)?;
    let fingerprint = model_fingerprint(&model)?;
    let summary = classes.as_ref().map(|c| ClassesSummary { name: c.name.clone(), n_classes: c.class_names.len() });
    let mut report = EvalReport::new(a.model.describe(), fingerprint.clone(), a.data.clone(), summary);
    if let (true, Some(classes)) = (tasks.contains(&"zero-shot"), &classes) {
        if model.config.train_clip {
            report.zero_shot = Some(zero_shot(&model, a, classes)?);
        } else {
            report.skipped.push("zero-shot: the model has no CLIP text tower (train_clip = false)".into());
        }
    }
    if let (Some(classes), Some(train_classes)) = (&classes, &train_classes) {
        let probes = linear_probe(&model, a, (classes, train_classes), &fingerprint)?;
        report.linear_probe = probes.results;
        report.skipped.extend(probes.skipped);
        report.linear_probe_train_data = Some(a.train_data.clone());
    }
    if tasks.contains(&"recon") {
        if model.config.train_reconstruction {
            report.reconstruction = Some(reconstruction(&model, a, device, &mut report.skipped)?);
        } else {
            report.skipped.push("recon: the model has no pixel decoder".into());
        }
    }
    print_table(&report);
    report.write(&a.out)?;
    println!("wrote {}", a.out.display());
    Ok(())
}
