//! The linear-probe protocol (docs/design.md §5.2) on data sources, as `vtp eval` runs it: for each feature
//! [`Protocol`], the features of the training and held-out sources (resized and centre-cropped,
//! [`resize_center_crop`]) are extracted once and cached ([`FeatureCache`], keyed by the model
//! fingerprint, the data and the protocol), then [`train_linear_probe`] trains on the first and
//! scores on the second.
use super::classnames::ResolvedClassSet;
use super::linear_probe::{
    extract_features, resize_center_crop, train_linear_probe, CacheKey, FeatureCache, LinearProbeResult, ProbeConfig,
    Protocol, PROBE_CROP, PROBE_RESIZE,
};
use super::zero_shot::labelled_batches;
use crate::data::source;
use crate::data::stream::StreamOptions;
use crate::model::VtpModel;
use anyhow::Result;
use tch::Tensor;

/// A labelled data source: its SPEC (see [`crate::data::source`]) and the class set whose labels
/// (`label_key`) the probe predicts.
pub type LabelledSource<'a> = (&'a str, &'a ResolvedClassSet);

/// What a linear-probe evaluation reads and how.
pub struct ProbeSetup<'a> {
    /// The probe's training data.
    pub train: LabelledSource<'a>,
    /// The held-out data it is scored on; its class set gives the output width.
    pub val: LabelledSource<'a>,
    /// At most this many samples of each source.
    pub limit: usize,
    /// Images per forward pass.
    pub batch: usize,
    /// Centre-crop side, after a resize to [`probe_resize`]`(crop)`.
    pub crop: u32,
    /// How the classifiers train.
    pub config: ProbeConfig,
    /// Where features are cached.
    pub cache: FeatureCache,
}

/// The linear probes of a list of protocols.
#[derive(Debug, Default)]
pub struct ProbeOutcome {
    /// One result per protocol that applies to the model, in the given order.
    pub results: Vec<LinearProbeResult>,
    /// `linear-probe <name>: <reason>` for each protocol the model lacks (e.g. too few blocks).
    pub skipped: Vec<String>,
}

/// The resize before a `crop` centre crop: §5.2's [`PROBE_RESIZE`] for [`PROBE_CROP`], else
/// `round(crop·256/224)`.
pub fn probe_resize(crop: u32) -> u32 {
    if crop == PROBE_CROP {
        PROBE_RESIZE
    } else {
        (f64::from(crop) * f64::from(PROBE_RESIZE) / f64::from(PROBE_CROP)).round() as u32
    }
}

/// The linear probe of every protocol of `protocols` (docs/design.md §5.2) under `setup`; `fingerprint` names
/// the model in the cache keys. `stage(what)` is called as each feature extraction starts (not on a
/// cache hit) and returns the callback that gets the number of samples read so far; it is dropped
/// when the extraction ends.
pub fn linear_probes<S, P>(
    model: &VtpModel,
    fingerprint: &str,
    protocols: &[Protocol],
    setup: &ProbeSetup,
    mut stage: S,
) -> Result<ProbeOutcome>
where
    S: FnMut(&str) -> P,
    P: FnMut(usize),
{
    let mut outcome = ProbeOutcome::default();
    for &protocol in protocols {
        if let Err(e) = protocol.check(model) {
            outcome.skipped.push(format!("linear-probe {}: {e}", protocol.name()));
            continue;
        }
        let train = probe_features(model, fingerprint, setup.train, protocol, setup, &mut stage)?;
        let val = probe_features(model, fingerprint, setup.val, protocol, setup, &mut stage)?;
        let n_classes = Some(setup.val.1.class_names.len());
        let description = protocol.description();
        let mut r = train_linear_probe((&train.0, &train.1), (&val.0, &val.1), n_classes, &setup.config, &description)?;
        r.protocol = format!("{} (train '{}', eval '{}')", r.protocol, setup.train.0, setup.val.0);
        outcome.results.push(r);
    }
    Ok(outcome)
}

/// The `protocol` features and labels of the first `setup.limit` samples of `source`, from the cache
/// or extracted (then cached).
fn probe_features<S, P>(
    model: &VtpModel,
    fingerprint: &str,
    (spec, set): LabelledSource,
    protocol: Protocol,
    setup: &ProbeSetup,
    stage: &mut S,
) -> Result<(Tensor, Tensor)>
where
    S: FnMut(&str) -> P,
    P: FnMut(usize),
{
    let (limit, crop, resize) = (setup.limit, setup.crop, probe_resize(setup.crop));
    let key = CacheKey {
        model: fingerprint.to_string(),
        data: format!("{spec}|n{limit}|resize{resize}crop{crop}|{}", set.label_key),
        protocol: protocol.name(),
    };
    setup.cache.get_or_compute(&key, || {
        let mut progress = stage(&format!("features {}", protocol.name()));
        let mut read = 0;
        let stream = source::open(spec, &StreamOptions::default())?.take(limit).inspect(|_| {
            read += 1;
            progress(read);
        });
        let batches =
            labelled_batches(stream, &set.label_key, setup.batch, |img| resize_center_crop(img, resize, crop));
        extract_features(model, batches, protocol)
    })
}
