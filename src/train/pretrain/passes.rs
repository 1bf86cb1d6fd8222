//! The student trunk's passes of one pre-training step. Each objective asks for the features of its
//! own images (CLIP images, SSL global crops with their iBOT masks, SSL local crops, reconstruction
//! images), each with its own drop-path rate (the legacy meta-arch: one trunk pass per objective).
//! With `loss.merge_trunk_passes`, requests of the same image size and drop-path rate run as one
//! batch, as DINOv2 runs its crop list through the trunk: one launch per layer instead of one per
//! objective, the same mathematics (every row's tokens only attend within their row), rounding aside.
use crate::model::encoder::{Features, VisionEncoder};
use tch::{Kind, Tensor};

/// One objective's request of the student trunk.
pub struct TrunkPass<'a> {
    /// `[B, 3, H, W]` images.
    pub images: &'a Tensor,
    /// iBOT masks `[B, N]` (bool): masked patches become `mask_token`.
    pub masks: Option<&'a Tensor>,
    /// Stochastic-depth rate.
    pub drop_path: f64,
    /// Through the feature bottleneck (CLS and patches).
    pub bottleneck: bool,
}

/// The final-norm features of every pass, in order. With `merge`, passes with the same image size
/// and drop-path rate share one trunk call: their images concatenated, the masks of unmasked passes
/// all false, the output split back by rows and the bottleneck applied to the rows that ask for it.
pub fn run_trunk_passes(trunk: &VisionEncoder, passes: &[TrunkPass], merge: bool) -> Vec<Features> {
    let mut groups: Vec<Vec<usize>> = Vec::new();
    for (i, pass) in passes.iter().enumerate() {
        let joins = |group: &Vec<usize>| {
            let first = &passes[group[0]];
            merge && first.images.size()[1..] == pass.images.size()[1..] && first.drop_path == pass.drop_path
        };
        match groups.iter_mut().find(|g| joins(g)) {
            Some(group) => group.push(i),
            None => groups.push(vec![i]),
        }
    }
    let mut features: Vec<Option<Features>> = passes.iter().map(|_| None).collect();
    for group in groups {
        for (i, f) in run_group(trunk, passes, &group) {
            features[i] = Some(f);
        }
    }
    features.into_iter().map(|f| f.expect("every pass belongs to a group")).collect()
}

/// One trunk call over the passes `group` (indices into `passes`), split back per pass.
fn run_group(trunk: &VisionEncoder, passes: &[TrunkPass], group: &[usize]) -> Vec<(usize, Features)> {
    if let [only] = group {
        let p = &passes[*only];
        return vec![(*only, trunk.forward_train(p.images, p.masks, p.drop_path, p.bottleneck))];
    }
    let images: Vec<&Tensor> = group.iter().map(|&i| passes[i].images).collect();
    let masks = group.iter().any(|&i| passes[i].masks.is_some()).then(|| {
        let patches = group.iter().find_map(|&i| passes[i].masks).expect("a masked pass").size()[1];
        let rows: Vec<Tensor> = group
            .iter()
            .map(|&i| match passes[i].masks {
                Some(m) => m.shallow_clone(),
                None => Tensor::zeros([passes[i].images.size()[0], patches], (Kind::Bool, passes[i].images.device())),
            })
            .collect();
        Tensor::cat(&rows, 0)
    });
    let all = trunk.forward_train(&Tensor::cat(&images, 0), masks.as_ref(), passes[group[0]].drop_path, false);
    let mut start = 0;
    group
        .iter()
        .map(|&i| {
            let n = passes[i].images.size()[0];
            let (cls, patches) = (all.cls.narrow(0, start, n), all.patches.narrow(0, start, n));
            start += n;
            let f = if passes[i].bottleneck {
                Features { cls: trunk.bottleneck(&cls), patches: trunk.bottleneck(&patches), grid: all.grid }
            } else {
                Features { cls, patches, grid: all.grid }
            };
            (i, f)
        })
        .collect()
}
