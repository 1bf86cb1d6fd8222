//! iBOT block masking for the student's global crops (docs/design.md §4.3): DINOv2's `MaskingGenerator`
//! (`dinov2/data/masking.py`) and the mask part of `collate_data_and_cast` (`dinov2/data/collate.py`),
//! as `../shared/fixtures/LOSSES.md` §6 specifies them.
//!
//! Every random draw comes from the caller's RNG (Python's `random` module cannot be reproduced, so
//! masks match the reference in distribution, not draw for draw); the collation arithmetic
//! (`float32` `linspace`, truncating `int()`) is reproduced exactly, so [`mask_upperbound`] and
//! [`MaskBatch::from_masks`] give the reference's numbers bit for bit.

use rand::seq::SliceRandom;
use rand::Rng;
use tch::{Device, Kind, Tensor};

/// DINOv2 `mask_ratio_tuple`: the per-crop masked fraction ranges over `[0.1, 0.5]` (docs/design.md §4.3).
pub const MASK_RATIO_MIN_MAX: (f64, f64) = (0.1, 0.5);
/// DINOv2 `mask_probability` (`mask_sample_probability`): the fraction of global crops that get a
/// mask (docs/design.md §4.3).
pub const MASK_SAMPLE_PROBABILITY: f64 = 0.5;
/// DINOv2 `MaskingGenerator` default `min_num_patches` (docs/design.md §4.3).
pub const MIN_NUM_PATCHES: f64 = 4.0;
/// DINOv2 `MaskingGenerator` default `min_aspect`; `max_aspect = 1 / min_aspect` (docs/design.md §4.3).
pub const MIN_ASPECT: f64 = 0.3;
/// Attempts per `_mask` call before giving up (LOSSES.md §6).
const ATTEMPTS_PER_BLOCK: usize = 10;

/// One accepted rectangle of a mask, in patch-grid cells.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Block {
    pub top: usize,
    pub left: usize,
    pub height: usize,
    pub width: usize,
}

/// DINOv2 `MaskingGenerator` for a `grid_h`×`grid_w` patch grid (docs/design.md §4.3, LOSSES.md §6): masks
/// are unions of random rectangles (area `U(min_num_patches, max_mask)`, log-uniform aspect ratio in
/// `[0.3, 1/0.3]`), each strictly narrower and shorter than the grid.
#[derive(Clone, Debug, PartialEq)]
pub struct MaskingGenerator {
    pub grid_h: usize,
    pub grid_w: usize,
    /// Largest area one `_mask` call may add; DINOv2 passes `0.5 * g * g` (a float, e.g. 128.0).
    pub max_num_patches: f64,
    pub min_num_patches: f64,
    /// `(ln min_aspect, ln max_aspect)`.
    pub log_aspect_ratio: (f64, f64),
}

impl MaskingGenerator {
    /// The generator with DINOv2's defaults (`min_num_patches` 4, aspect `[0.3, 1/0.3]`).
    pub fn new(grid_h: usize, grid_w: usize, max_num_patches: f64) -> Self {
        let log_aspect_ratio = (MIN_ASPECT.ln(), (1.0 / MIN_ASPECT).ln());
        Self { grid_h, grid_w, max_num_patches, min_num_patches: MIN_NUM_PATCHES, log_aspect_ratio }
    }

    /// The generator `dinov2/train/train.py` builds for a `grid`×`grid` patch grid:
    /// `max_num_patches = 0.5 · grid · grid`.
    pub fn dinov2(grid: usize) -> Self {
        Self::new(grid, grid, 0.5 * (grid * grid) as f64)
    }

    /// Number of cells (tokens) of the grid.
    pub fn num_patches(&self) -> usize {
        self.grid_h * self.grid_w
    }

    /// `gen(n)`: a row-major `grid_h·grid_w` mask with at most `n` (almost always exactly `n`) cells set.
    pub fn generate(&self, n: usize, rng: &mut impl Rng) -> Vec<bool> {
        self.generate_blocks(n, rng).0
    }

    /// [`Self::generate`] that also returns the accepted rectangles, in order (their union is the mask).
    pub fn generate_blocks(&self, n: usize, rng: &mut impl Rng) -> (Vec<bool>, Vec<Block>) {
        let mut mask = vec![false; self.num_patches()];
        let mut blocks = Vec::new();
        let mut count = 0;
        while count < n {
            let max_mask = ((n - count) as f64).min(self.max_num_patches);
            match self.try_block(&mut mask, max_mask, rng) {
                Some((block, delta)) => {
                    blocks.push(block);
                    count += delta;
                }
                None => break,
            }
        }
        (mask, blocks)
    }

    /// DINOv2 `_mask`: up to 10 attempts; the first rectangle that adds `0 < new <= max_mask` cells
    /// is set, and it is returned with the number of newly set cells.
    fn try_block(&self, mask: &mut [bool], max_mask: f64, rng: &mut impl Rng) -> Option<(Block, usize)> {
        for _ in 0..ATTEMPTS_PER_BLOCK {
            let target_area = uniform(rng, self.min_num_patches, max_mask);
            let aspect = uniform(rng, self.log_aspect_ratio.0, self.log_aspect_ratio.1).exp();
            let height = (target_area * aspect).sqrt().round_ties_even() as usize;
            let width = (target_area / aspect).sqrt().round_ties_even() as usize;
            if width >= self.grid_w || height >= self.grid_h {
                continue;
            }
            let top = rng.random_range(0..=self.grid_h - height);
            let left = rng.random_range(0..=self.grid_w - width);
            let block = Block { top, left, height, width };
            let new = self.cells(block).filter(|&i| !mask[i]).count();
            if new > 0 && new as f64 <= max_mask {
                self.cells(block).for_each(|i| mask[i] = true);
                return Some((block, new));
            }
        }
        None
    }

    /// Row-major indices of the cells of `block`.
    fn cells(&self, block: Block) -> impl Iterator<Item = usize> + '_ {
        (block.top..block.top + block.height)
            .flat_map(move |y| (block.left..block.left + block.width).map(move |x| y * self.grid_w + x))
    }
}

/// Python `random.uniform(a, b) = a + (b - a) · random()` (`a > b` allowed).
fn uniform(rng: &mut impl Rng, a: f64, b: f64) -> f64 {
    a + (b - a) * rng.random::<f64>()
}

/// The masks of one SSL batch and what the iBOT loss reads from them (docs/design.md §4.2–§4.3; the
/// `collated_masks`, `mask_indices_list`, `masks_weight`, `n_masked_patches` and `upperbound`
/// of DINOv2's `collate_data_and_cast`).
#[derive(Debug)]
pub struct MaskBatch {
    /// `[B, N]` bool, one row per global crop (crop-major).
    pub masks: Tensor,
    /// `[M]` int64: `masks.flatten().nonzero()`, ascending.
    pub mask_indices_list: Tensor,
    /// `[M]` f32: `1 / max(masked count of its row, 1)` per masked token, in `mask_indices_list` order.
    pub masks_weight: Tensor,
    /// `[1]` int64: `M`.
    pub n_masked_patches: Tensor,
    /// Sizes the teacher's zero-padded buffers: `Σ int(N · probs[i+1])` ([`mask_upperbound`]).
    pub upperbound: i64,
}

impl MaskBatch {
    /// Indices, weights and count of `masks` (`[B, N]` bool) exactly as DINOv2's collate computes them.
    pub fn from_masks(masks: Tensor, upperbound: i64) -> Self {
        let mask_indices_list = masks.flatten(0, -1).nonzero().flatten(0, -1);
        let per_row = masks.sum_dim_intlist(-1, true, Kind::Float).clamp_min(1.0);
        let masks_weight = per_row.reciprocal().expand_as(&masks).masked_select(&masks);
        let n_masked_patches = Tensor::from_slice(&[mask_indices_list.size()[0]]).to_device(masks.device());
        Self { masks, mask_indices_list, masks_weight, n_masked_patches, upperbound }
    }
}

/// DINOv2 `probs = torch.linspace(0.1, 0.5, n_samples_masked + 1)` as the `float32` values torch computes.
fn mask_probs(n_samples_masked: usize) -> Vec<f32> {
    let (lo, hi) = MASK_RATIO_MIN_MAX;
    let steps = n_samples_masked as i64 + 1;
    Vec::<f32>::try_from(Tensor::linspace(lo, hi, steps, (Kind::Float, Device::Cpu))).expect("f32 linspace")
}

/// DINOv2 `n_samples_masked = int(B · mask_probability)`.
fn n_samples_masked(n_rows: usize) -> usize {
    (n_rows as f64 * MASK_SAMPLE_PROBABILITY) as usize
}

/// `int(N · p)` with DINOv2's `float32` tensor product and truncation.
fn truncated_count(n_tokens: usize, p: f32) -> usize {
    (n_tokens as f32 * p) as usize
}

/// DINOv2's `upperbound = Σ_{i < n_samples_masked} int(N · probs[i+1])` for `n_rows` global crops of
/// `n_tokens` tokens (88 for 8×64, 4941 for DINOv2's 128×256; LOSSES.md §6).
pub fn mask_upperbound(n_rows: usize, n_tokens: usize) -> i64 {
    let probs = mask_probs(n_samples_masked(n_rows));
    probs[1..].iter().map(|&p| truncated_count(n_tokens, p) as i64).sum()
}

/// DINOv2 `collate_data_and_cast`'s masks for `n_rows` global crops (`B = 2 ×` images) on the grid of
/// `generator` (LOSSES.md §6): the first `int(B/2)` crops get `gen(int(N · U(probs[i], probs[i+1])))`
/// (`float32` arithmetic), the others empty masks, then the rows are shuffled.
pub fn collate_masks(generator: &MaskingGenerator, n_rows: usize, rng: &mut impl Rng) -> MaskBatch {
    let n_tokens = generator.num_patches();
    let n_masked = n_samples_masked(n_rows);
    let probs = mask_probs(n_masked);
    let mut rows: Vec<Vec<bool>> = probs
        .windows(2)
        .map(|p| {
            let ratio = p[0] + (p[1] - p[0]) * rng.random::<f64>() as f32;
            generator.generate(truncated_count(n_tokens, ratio), rng)
        })
        .collect();
    rows.resize(n_rows, vec![false; n_tokens]);
    rows.shuffle(rng);
    let flat: Vec<bool> = rows.concat();
    let masks = Tensor::from_slice(&flat).view([n_rows as i64, n_tokens as i64]);
    MaskBatch::from_masks(masks, mask_upperbound(n_rows, n_tokens))
}
