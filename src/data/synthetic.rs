//! The built-in synthetic captioned dataset, the default data source of every command (zero
//! downloads): procedural scenes of one to three coloured shapes on a flat, gradient, striped or
//! checkered background with mild pixel noise, each with a caption in varied wordings and class
//! labels of its main object.
//!
//! A sample is a pure function of (seed, split, index), and of the resolution for its pixels: the
//! scene, the caption and the noise are drawn from a `ChaCha8Rng` seeded from a hash of
//! (seed, split, index), never from a thread-local or global generator, so every run and every
//! thread sees the same bytes. Scenes are laid out in resolution-independent coordinates: the same
//! sample at 64 and at 256 pixels shows the same scene under the same caption.
//!
//! The main object (the first one a caption mentions, and the largest of its scene) gives the labels.
//! A fixed ~15% of the colour-shape pairs ([`is_held_out`]) never appear in [`Split::Train`] or
//! [`Split::HeldOut`]; [`Split::Novel`] gives every main object one of them, to probe
//! compositional generalisation.

use std::collections::BTreeMap;
use std::f32::consts::TAU;
use std::fmt;
use std::str::FromStr;

use anyhow::{bail, Error};
use image::RgbImage;
use rand::seq::SliceRandom;
use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::reader::{IndexedSource, Skip};
use super::Sample;

/// Canonical shape names; a shape's id is its index here.
pub const SHAPES: &[&str] = &["circle", "square", "triangle", "star", "cross", "ring", "diamond", "heart"];

/// Canonical colour names; a colour's id is its index here.
pub const COLORS: &[&str] = &["red", "green", "blue", "yellow", "purple", "orange", "white", "black"];

/// The label sets every synthetic sample carries, all about its main object.
pub const LABEL_SETS: [&str; 3] = ["shape", "color", "shape_color"];

/// Canonical size words, by size id (small objects have the smallest radius).
const SIZES: [&str; 3] = ["small", "medium", "large"];

/// Caption words for each shape (canonical name first); [`parse_caption`] maps each back.
const SHAPE_WORDS: [&[&str]; 8] = [
    &["circle", "disc", "round shape", "dot"],
    &["square", "box", "block"],
    &["triangle", "three-sided shape"],
    &["star", "five-pointed star"],
    &["cross", "plus sign", "plus"],
    &["ring", "hollow circle", "donut"],
    &["diamond", "rhombus", "lozenge"],
    &["heart", "heart shape", "love heart"],
];

/// Caption words for each colour (canonical name first).
const COLOR_WORDS: [&[&str]; 8] = [
    &["red", "scarlet"],
    &["green"],
    &["blue"],
    &["yellow"],
    &["purple", "violet"],
    &["orange"],
    &["white"],
    &["black"],
];

/// Caption words for each size (canonical name first).
const SIZE_WORDS: [&[&str]; 3] = [&["small", "little", "tiny"], &["medium", "medium-sized"], &["large", "big"]];

/// sRGB value of each colour, before a small per-object jitter.
pub const COLOR_RGB: [[f32; 3]; 8] = [
    [215.0, 40.0, 40.0],
    [40.0, 165.0, 60.0],
    [40.0, 85.0, 215.0],
    [240.0, 205.0, 35.0],
    [140.0, 55.0, 185.0],
    [245.0, 135.0, 25.0],
    [245.0, 245.0, 245.0],
    [20.0, 20.0, 20.0],
];

/// The (shape, colour) pairs kept out of training: 10 of 64, every shape and colour still seen.
const HELD_OUT: [(usize, usize); 10] = [
    (0, 1), // green circle
    (0, 5), // orange circle
    (1, 4), // purple square
    (2, 5), // orange triangle
    (3, 2), // blue star
    (4, 6), // white cross
    (5, 3), // yellow ring
    (6, 2), // blue diamond
    (6, 7), // black diamond
    (7, 0), // red heart
];

/// Object radius range (fraction of the image side) of each size.
const RADII: [(f32, f32); 3] = [(0.08, 0.1), (0.12, 0.145), (0.17, 0.2)];
/// Distance from the centre to the farthest point of each shape, in radii.
const REACH: [f32; 8] = [1.0, 1.14, 1.0, 1.0, 1.05, 1.0, 1.0, 1.0];
/// Minimum gap between the image border or another object and an object's reach.
const GAP: f32 = 0.03;
/// Attempts at placing a non-main object before the scene does without it.
const PLACEMENT_TRIES: usize = 24;
/// Largest per-channel jitter of an object's colour, in 8-bit levels.
const COLOR_JITTER: f32 = 8.0;
/// Minimum RGB distance between an object's colour and any background colour.
const MIN_CONTRAST: f32 = 100.0;
/// Background candidates tried before the most contrasted one is kept.
const BACKGROUND_TRIES: usize = 32;
/// Range of the uniform per-pixel noise amplitude, in 8-bit levels.
const NOISE: (f32, f32) = (2.0, 8.0);

/// Which stream of scenes a dataset draws.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    /// Training scenes: every object uses a seen (not held-out) colour-shape pair.
    Train,
    /// Validation / test scenes: seen compositions like `Train`, from a disjoint random stream.
    HeldOut,
    /// Generalisation probes: the main object always uses a held-out composition (never in
    /// `Train`); the other objects use seen ones.
    Novel,
}

impl Split {
    /// The name used in sample keys and accepted by [`Split::from_str`].
    fn name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::HeldOut => "heldout",
            Split::Novel => "novel",
        }
    }
}

impl fmt::Display for Split {
    /// Writes `train`, `heldout` or `novel`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Split {
    type Err = Error;

    /// Parses `train`, `heldout` (also `held-out`, `val`, `test`) or `novel`, in any case.
    fn from_str(text: &str) -> Result<Self, Error> {
        match text.to_ascii_lowercase().as_str() {
            "train" => Ok(Split::Train),
            "heldout" | "held-out" | "val" | "test" => Ok(Split::HeldOut),
            "novel" => Ok(Split::Novel),
            _ => bail!("unknown synthetic split '{text}' (expected train, heldout/val or novel)"),
        }
    }
}

/// What a [`SyntheticDataset`] generates.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SyntheticConfig {
    /// Seed of the whole dataset; samples of different seeds are independent.
    pub seed: u64,
    /// Side of the square images in pixels (meant for 16 and more; smaller ones lose objects).
    pub resolution: u32,
    /// Which stream of scenes to draw.
    pub split: Split,
    /// Nominal number of samples (one epoch).
    pub len: usize,
    /// Factor on every object's radius (1 = the default sizes; at most [`MAX_ZOOM`]), for small
    /// images whose 16-pixel patches would otherwise hold a whole object.
    pub zoom: f32,
    /// Probability that a caption names no colour (only shapes, sizes and places), so that a contrastive
    /// loss cannot match it by colour alone (0 = every caption names every colour).
    pub colorless: f32,
    /// Hard negatives: consecutive indices in groups of `group` (from 2 to [`MAX_GROUP`]) show one scene
    /// whose main object takes a different shape in each, so that captions differ only in that shape
    /// word (1 = independent scenes). A contrastive batch holds whole groups when the stream is
    /// unshuffled and the batch a multiple of `group`. Train and held-out splits only.
    pub group: usize,
}

/// The largest [`SyntheticConfig::zoom`]: the widest object still fits inside the image.
pub const MAX_ZOOM: f32 = 2.0;

/// The largest [`SyntheticConfig::group`]: every colour has at least this many seen shapes.
pub const MAX_GROUP: usize = 6;

impl Default for SyntheticConfig {
    /// Seed 0, 64×64 pixels, the train split, 10 000 samples, default object sizes, colours in every
    /// caption, independent scenes.
    fn default() -> Self {
        SyntheticConfig {
            seed: 0,
            resolution: 64,
            split: Split::Train,
            len: 10_000,
            zoom: 1.0,
            colorless: 0.0,
            group: 1,
        }
    }
}

/// The synthetic captioned dataset: a stateless generator, cheap to share across threads.
#[derive(Clone, Debug)]
pub struct SyntheticDataset {
    config: SyntheticConfig,
}

impl SyntheticDataset {
    /// A dataset generating what `config` describes.
    pub fn new(config: SyntheticConfig) -> Self {
        SyntheticDataset { config }
    }

    /// The nominal number of samples (`config.len`).
    pub fn len(&self) -> usize {
        self.config.len
    }

    /// Whether the nominal length is zero.
    pub fn is_empty(&self) -> bool {
        self.config.len == 0
    }

    /// Sample `index`, a pure function of (seed, split, resolution, index). Every index is valid,
    /// also past `len`, where the stream simply goes on with new scenes.
    pub fn get(&self, index: usize) -> Sample {
        let (scene, mut rng) = self.scene(index);
        let colorless = self.config.colorless > 0.0 && rng.random_bool(self.config.colorless as f64);
        let caption = caption(&scene, colorless, &mut rng);
        let image = render(&scene, self.config.resolution, &mut rng);
        let SyntheticConfig { seed, split, .. } = self.config;
        Sample { key: format!("synthetic-{split}-{seed}-{index}"), image, caption, labels: scene.labels() }
    }

    /// The ground truth of sample `index`: every object's shape, colour and size word, main object
    /// first (what its caption describes, with every size given).
    pub fn describe(&self, index: usize) -> SceneDescription {
        self.scene(index).0.description()
    }

    /// The scene of sample `index` and the generator that goes on to caption and render it: drawn
    /// from the seed of its group (`index / group`), the main object reshaped to the group member's
    /// shape when groups are on.
    fn scene(&self, index: usize) -> (Scene, ChaCha8Rng) {
        let group = self.config.group.max(1);
        let mut rng = self.rng(index / group);
        let mut scene = Scene::generate(self.config.split, self.config.zoom, &mut rng);
        if group > 1 {
            let shapes = group_shapes(scene.objects[0].color, group, &mut rng);
            scene.objects[0].reshape(shapes[index % group]);
        }
        (scene, rng)
    }

    /// The generator of sample `index`, seeded from a hash of (seed, split, index).
    fn rng(&self, index: usize) -> ChaCha8Rng {
        let split = match self.config.split {
            Split::Train => 0x7472_6169_6e00_0001,
            Split::HeldOut => 0x6865_6c64_6f75_7402,
            Split::Novel => 0x6e6f_7665_6c00_0003,
        };
        let hash = splitmix64(splitmix64(splitmix64(self.config.seed) ^ split) ^ index as u64);
        ChaCha8Rng::seed_from_u64(hash)
    }
}

impl IndexedSource for SyntheticDataset {
    fn len(&self) -> usize {
        self.len()
    }

    fn get(&self, index: usize) -> Result<Sample, Skip> {
        Ok(self.get(index))
    }
}

/// The names of the classes of a label set (index = label value), `None` for an unknown set.
/// `shape_color` names are "<colour> <shape>" at index `shape * COLORS.len() + color`.
pub fn class_names(label_set: &str) -> Option<Vec<String>> {
    let names = |list: &[&str]| -> Vec<String> { list.iter().map(|name| name.to_string()).collect() };
    match label_set {
        "shape" => Some(names(SHAPES)),
        "color" => Some(names(COLORS)),
        "shape_color" => {
            Some(SHAPES.iter().flat_map(|shape| COLORS.iter().map(move |color| format!("{color} {shape}"))).collect())
        }
        _ => None,
    }
}

/// Whether the (shape, colour) composition is held out of training (a fixed ~15% of the pairs;
/// every shape and every colour keeps seen pairs).
pub fn is_held_out(shape: usize, color: usize) -> bool {
    HELD_OUT.contains(&(shape, color))
}

/// The scene a caption describes (used by tests to check captions agree with labels).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SceneDescription {
    /// (shape id, colour id, canonical size word when given) of each object in order of mention;
    /// the first is the main object.
    pub objects: Vec<(usize, usize, Option<&'static str>)>,
}

/// Reads back the objects a synthetic caption mentions: every "[size] colour shape" phrase,
/// synonyms mapped to canonical ids. `None` when the caption mentions no object.
pub fn parse_caption(caption: &str) -> Option<SceneDescription> {
    let words: Vec<String> = caption
        .split_whitespace()
        .map(|word| word.trim_matches(|c: char| !c.is_alphanumeric() && c != '-').to_lowercase())
        .collect();
    let mut objects = Vec::new();
    let mut at = 0;
    while at < words.len() {
        match (word_id(&COLOR_WORDS, &words[at]), phrase_at(&words[at + 1..])) {
            (Some(color), Some((shape, length))) => {
                let size = at.checked_sub(1).and_then(|before| word_id(&SIZE_WORDS, &words[before]));
                objects.push((shape, color, size.map(|size| SIZES[size])));
                at += 1 + length;
            }
            _ => at += 1,
        }
    }
    (!objects.is_empty()).then_some(SceneDescription { objects })
}

/// The id of the one-word entry of `table` that `word` is.
fn word_id(table: &[&[&str]], word: &str) -> Option<usize> {
    table.iter().position(|words| words.contains(&word))
}

/// The shape whose longest synonym starts `words`, and that synonym's number of words.
fn phrase_at(words: &[String]) -> Option<(usize, usize)> {
    SHAPE_WORDS
        .iter()
        .enumerate()
        .flat_map(|(shape, synonyms)| synonyms.iter().map(move |synonym| (shape, synonym)))
        .filter_map(|(shape, synonym)| {
            let parts: Vec<&str> = synonym.split(' ').collect();
            let matches = parts.len() <= words.len() && parts.iter().zip(words).all(|(part, word)| part == word);
            matches.then_some((shape, parts.len()))
        })
        .max_by_key(|&(_, length)| length)
}

/// SplitMix64 finaliser: a well-mixed 64-bit hash step.
fn splitmix64(value: u64) -> u64 {
    let mut z = value.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A uniformly chosen element of a non-empty constant table.
fn pick<'a, T>(rng: &mut ChaCha8Rng, items: &'a [T]) -> &'a T {
    &items[rng.random_range(0..items.len())]
}

/// One shape of a scene, in coordinates where the image is the unit square (y down).
#[derive(Clone, Debug)]
struct Object {
    shape: usize,
    color: usize,
    size: usize,
    center: [f32; 2],
    radius: f32,
    rgb: [f32; 3],
}

impl Object {
    /// Distance from the centre to the farthest point of the shape.
    fn reach(&self) -> f32 {
        self.radius * REACH[self.shape]
    }

    /// The object as `shape`, its radius scaled to keep its reach (so it still clears its neighbours).
    fn reshape(&mut self, shape: usize) {
        self.radius *= REACH[self.shape] / REACH[shape];
        self.shape = shape;
    }
}

/// `count` distinct shapes seen in `color` (not held out), in random order: a hard-negative group.
fn group_shapes(color: usize, count: usize, rng: &mut ChaCha8Rng) -> Vec<usize> {
    let mut shapes: Vec<usize> = (0..SHAPES.len()).filter(|&shape| !is_held_out(shape, color)).collect();
    shapes.shuffle(rng);
    shapes.truncate(count);
    shapes
}

/// How the background colours are laid out.
#[derive(Clone, Copy, Debug)]
enum Pattern {
    Flat,
    /// Linear ramp from the first colour to the second along `direction` (a unit vector).
    Gradient {
        direction: [f32; 2],
    },
    /// Alternating bands across `normal` (a unit vector), each `period / 2` wide.
    Stripes {
        normal: [f32; 2],
        period: f32,
    },
    /// Squares `period` wide.
    Checker {
        period: f32,
    },
}

/// A scene's background: a pattern over two colours (the same one when flat).
#[derive(Clone, Debug)]
struct Background {
    pattern: Pattern,
    colors: [[f32; 3]; 2],
}

/// A procedural scene, main object first.
#[derive(Clone, Debug)]
struct Scene {
    objects: Vec<Object>,
    background: Background,
    noise: f32,
}

impl Scene {
    /// Draws a scene of `split`: one to three non-overlapping objects (radii × `zoom`), the first (main)
    /// one strictly the largest when there are several, on a background that contrasts with them all.
    fn generate(split: Split, zoom: f32, rng: &mut ChaCha8Rng) -> Scene {
        let count = rng.random_range(1..=3);
        let main_size = if count == 1 { rng.random_range(0..SIZES.len()) } else { rng.random_range(1..SIZES.len()) };
        let main_pair = match split {
            Split::Novel => *pick(rng, &HELD_OUT),
            Split::Train | Split::HeldOut => seen_pair(rng),
        };
        let mut objects = vec![new_object(main_pair, main_size, zoom, rng)];
        for _ in 1..count {
            let size = rng.random_range(0..main_size);
            let mut object = new_object(seen_pair(rng), size, zoom, rng);
            if place(&mut object, &objects, rng) {
                objects.push(object);
            }
        }
        let background = contrasting_background(&objects, rng);
        Scene { objects, background, noise: rng.random_range(NOISE.0..NOISE.1) }
    }

    /// The labels of the main object.
    fn labels(&self) -> BTreeMap<String, i64> {
        let main = &self.objects[0];
        let shape_color = main.shape * COLORS.len() + main.color;
        [("shape", main.shape), ("color", main.color), ("shape_color", shape_color)]
            .into_iter()
            .map(|(set, class)| (set.to_string(), class as i64))
            .collect()
    }

    /// Every object's shape, colour and size word.
    fn description(&self) -> SceneDescription {
        SceneDescription { objects: self.objects.iter().map(|o| (o.shape, o.color, Some(SIZES[o.size]))).collect() }
    }
}

/// A uniformly drawn (shape, colour) pair that is not held out.
fn seen_pair(rng: &mut ChaCha8Rng) -> (usize, usize) {
    loop {
        let pair = (rng.random_range(0..SHAPES.len()), rng.random_range(0..COLORS.len()));
        if !is_held_out(pair.0, pair.1) {
            return pair;
        }
    }
}

/// An object of the given composition and size (its radius × `zoom`) with a jittered colour, placed
/// anywhere inside the image.
fn new_object((shape, color): (usize, usize), size: usize, zoom: f32, rng: &mut ChaCha8Rng) -> Object {
    let (low, high) = RADII[size];
    let rgb = COLOR_RGB[color].map(|value| (value + rng.random_range(-COLOR_JITTER..=COLOR_JITTER)).clamp(0.0, 255.0));
    let radius = rng.random_range(low..high) * zoom;
    let mut object = Object { shape, color, size, center: [0.5; 2], radius, rgb };
    object.center = random_center(object.reach(), rng);
    object
}

/// A centre keeping a shape of the given reach `GAP` away from the image border.
fn random_center(reach: f32, rng: &mut ChaCha8Rng) -> [f32; 2] {
    let margin = reach + GAP;
    [rng.random_range(margin..1.0 - margin), rng.random_range(margin..1.0 - margin)]
}

/// Moves `object` to a spot at least `GAP` away from every placed object; false when none was found.
fn place(object: &mut Object, placed: &[Object], rng: &mut ChaCha8Rng) -> bool {
    for _ in 0..PLACEMENT_TRIES {
        let free =
            placed.iter().all(|other| distance(&other.center, &object.center) >= other.reach() + object.reach() + GAP);
        if free {
            return true;
        }
        object.center = random_center(object.reach(), rng);
    }
    false
}

/// Euclidean distance between two points or colours.
fn distance<const N: usize>(a: &[f32; N], b: &[f32; N]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum::<f32>().sqrt()
}

/// A background that contrasts with every object: the first candidate at least `MIN_CONTRAST`
/// away from all their colours, else the most contrasted of `BACKGROUND_TRIES` candidates.
fn contrasting_background(objects: &[Object], rng: &mut ChaCha8Rng) -> Background {
    let contrast = |background: &Background| {
        objects.iter().map(|o| background.color_distance(&o.rgb)).fold(f32::INFINITY, f32::min)
    };
    let mut best = random_background(rng);
    let mut best_contrast = contrast(&best);
    for _ in 1..BACKGROUND_TRIES {
        if best_contrast >= MIN_CONTRAST {
            break;
        }
        let candidate = random_background(rng);
        let candidate_contrast = contrast(&candidate);
        if candidate_contrast > best_contrast {
            (best, best_contrast) = (candidate, candidate_contrast);
        }
    }
    best
}

/// A random pattern over a random colour and a second colour near it.
fn random_background(rng: &mut ChaCha8Rng) -> Background {
    let base: [f32; 3] = std::array::from_fn(|_| rng.random_range(0.0..255.0));
    let shifted = base.map(|value| (value + rng.random_range(-50.0..50.0)).clamp(0.0, 255.0));
    let angle = rng.random_range(0.0..TAU);
    let direction = [angle.cos(), angle.sin()];
    let pattern = match rng.random_range(0..4) {
        0 => Pattern::Flat,
        1 => Pattern::Gradient { direction },
        2 => Pattern::Stripes { normal: direction, period: rng.random_range(0.06..0.2) },
        _ => Pattern::Checker { period: rng.random_range(0.08..0.25) },
    };
    let second = if matches!(pattern, Pattern::Flat) { base } else { shifted };
    Background { pattern, colors: [base, second] }
}

impl Background {
    /// RGB distance from `rgb` to the nearest colour the background shows (every colour of a
    /// gradient lies on the segment between its two ends).
    fn color_distance(&self, rgb: &[f32; 3]) -> f32 {
        let [a, b] = &self.colors;
        let ab: [f32; 3] = std::array::from_fn(|c| b[c] - a[c]);
        let length2: f32 = ab.iter().map(|v| v * v).sum();
        let along: f32 = (0..3).map(|c| (rgb[c] - a[c]) * ab[c]).sum();
        let t = if length2 > 0.0 { (along / length2).clamp(0.0, 1.0) } else { 0.0 };
        distance(rgb, &std::array::from_fn(|c| a[c] + t * ab[c]))
    }

    /// The background colour at point (u, v) of the unit square.
    fn color_at(&self, u: f32, v: f32) -> [f32; 3] {
        let [first, second] = self.colors;
        match self.pattern {
            Pattern::Flat => first,
            Pattern::Gradient { direction } => {
                let t = ((u - 0.5) * direction[0] + (v - 0.5) * direction[1] + 0.5).clamp(0.0, 1.0);
                mix(first, second, t)
            }
            Pattern::Stripes { normal, period } => {
                let phase = ((u * normal[0] + v * normal[1]) / period).rem_euclid(1.0);
                if phase < 0.5 {
                    first
                } else {
                    second
                }
            }
            Pattern::Checker { period } => {
                let cell = (u / period).floor() as i64 + (v / period).floor() as i64;
                if cell % 2 == 0 {
                    first
                } else {
                    second
                }
            }
        }
    }

    /// Words describing the pattern in a caption.
    fn words(&self) -> &'static [&'static str] {
        match self.pattern {
            Pattern::Flat => &["plain", "flat", "uniform"],
            Pattern::Gradient { .. } => &["gradient", "shaded"],
            Pattern::Stripes { .. } => &["striped"],
            Pattern::Checker { .. } => &["checkered", "chequered", "checkerboard"],
        }
    }
}

/// `from` moved a fraction `t` of the way to `to`.
fn mix(from: [f32; 3], to: [f32; 3], t: f32) -> [f32; 3] {
    std::array::from_fn(|c| from[c] + (to[c] - from[c]) * t)
}

/// Signed distance from `p` (in radii from the centre, y down) to the outline of `shape`;
/// negative inside.
fn shape_distance(shape: usize, [x, y]: [f32; 2]) -> f32 {
    match shape {
        0 => x.hypot(y) - 1.0,
        1 => box_distance([x, y], [0.8, 0.8]),
        2 => triangle_distance([x, -y]),
        3 => star_distance([x, -y]),
        4 => box_distance([x, y], [1.0, 0.3]).min(box_distance([x, y], [0.3, 1.0])),
        5 => (x.hypot(y) - 0.7).abs() - 0.3,
        6 => rhombus_distance([x, y], [0.75, 1.0]),
        _ => heart_distance([x, -y]),
    }
}

/// Signed distance to an axis-aligned box of the given half sizes.
fn box_distance([x, y]: [f32; 2], [half_w, half_h]: [f32; 2]) -> f32 {
    let (dx, dy) = (x.abs() - half_w, y.abs() - half_h);
    dx.max(0.0).hypot(dy.max(0.0)) + dx.max(dy).min(0.0)
}

/// Signed distance to the upward equilateral triangle of circumradius 1 centred at the origin
/// (y up; after Inigo Quilez's `sdEquilateralTriangle`).
fn triangle_distance([x, y]: [f32; 2]) -> f32 {
    let k = 3f32.sqrt();
    let half_side = k / 2.0;
    let (mut px, mut py) = (x.abs() - half_side, y + half_side / k);
    if px + k * py > 0.0 {
        (px, py) = ((px - k * py) / 2.0, (-k * px - py) / 2.0);
    }
    px -= px.clamp(-2.0 * half_side, 0.0);
    -px.hypot(py) * py.signum()
}

/// Signed distance to the upward five-pointed star of outer radius 1 (y up; after Inigo
/// Quilez's `sdStar5`).
fn star_distance([x, y]: [f32; 2]) -> f32 {
    const K1: [f32; 2] = [0.809_017, -0.587_785];
    const K2: [f32; 2] = [-0.809_017, -0.587_785];
    const INNER: f32 = 0.45;
    let mut p = [x.abs(), y];
    for k in [K1, K2] {
        let reflect = 2.0 * (k[0] * p[0] + k[1] * p[1]).max(0.0);
        p = [p[0] - reflect * k[0], p[1] - reflect * k[1]];
    }
    p = [p[0].abs(), p[1] - 1.0];
    let ba = [-INNER * K1[1], INNER * K1[0] - 1.0];
    let h = ((p[0] * ba[0] + p[1] * ba[1]) / (ba[0] * ba[0] + ba[1] * ba[1])).clamp(0.0, 1.0);
    (p[0] - ba[0] * h).hypot(p[1] - ba[1] * h) * (p[1] * ba[0] - p[0] * ba[1]).signum()
}

/// Signed distance to a rhombus of half diagonals `b` (after Inigo Quilez's `sdRhombus`).
fn rhombus_distance([x, y]: [f32; 2], b: [f32; 2]) -> f32 {
    let (px, py) = (x.abs(), y.abs());
    let h = (((b[0] - 2.0 * px) * b[0] - (b[1] - 2.0 * py) * b[1]) / (b[0] * b[0] + b[1] * b[1])).clamp(-1.0, 1.0);
    let d = (px - 0.5 * b[0] * (1.0 - h)).hypot(py - 0.5 * b[1] * (1.0 + h));
    d * (px * b[1] + py * b[0] - b[0] * b[1]).signum()
}

/// Signed distance to a heart of reach 1 centred at the origin, tip down (y up; after Inigo
/// Quilez's `sdHeart`, whose unit heart spans y ∈ [0, 1.1] and reaches 0.672 from (0, 0.552)).
fn heart_distance([x, y]: [f32; 2]) -> f32 {
    const SCALE: f32 = 1.0 / 0.672;
    let (px, py) = (x.abs() / SCALE, y / SCALE + 0.552);
    let d = if px + py > 1.0 {
        (px - 0.25).hypot(py - 0.75) - 2f32.sqrt() / 4.0
    } else {
        let m = 0.5 * (px + py).max(0.0);
        let to_top = px.hypot(py - 1.0);
        let to_diagonal = (px - m).hypot(py - m);
        to_top.min(to_diagonal) * (px - py).signum()
    };
    d * SCALE
}

/// Where one object lies relative to another.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Relation {
    LeftOf,
    RightOf,
    Above,
    Below,
}

impl Relation {
    /// How `a` lies relative to `b`, along the axis where their centres differ most (objects
    /// never overlap, so that difference is at least their combined reach over √2).
    fn between(a: &Object, b: &Object) -> Relation {
        let (dx, dy) = (b.center[0] - a.center[0], b.center[1] - a.center[1]);
        match (dx.abs() >= dy.abs(), dx > 0.0, dy > 0.0) {
            (true, true, _) => Relation::LeftOf,
            (true, false, _) => Relation::RightOf,
            (false, _, true) => Relation::Above,
            (false, _, false) => Relation::Below,
        }
    }

    /// Caption phrases for the relation.
    fn words(self) -> &'static [&'static str] {
        match self {
            Relation::LeftOf => &["to the left of", "left of", "on the left of"],
            Relation::RightOf => &["to the right of", "right of", "on the right of"],
            Relation::Above => &["above", "higher than"],
            Relation::Below => &["below", "under", "beneath"],
        }
    }
}

/// The phrase placing an object within the image, when its centre is clearly in one of the
/// 3×3 regions (away from the borders between them).
fn region_phrase(object: &Object) -> Option<&'static str> {
    const PHRASES: [[&str; 3]; 3] = [
        ["in the top left", "at the top", "in the top right"],
        ["on the left", "in the centre", "on the right"],
        ["in the bottom left", "at the bottom", "in the bottom right"],
    ];
    let third = |t: f32| match t {
        t if t < 0.36 => Some(0),
        t if t > 0.64 => Some(2),
        t if (0.42..=0.58).contains(&t) => Some(1),
        _ => None,
    };
    Some(PHRASES[third(object.center[1])?][third(object.center[0])?])
}

/// Openings of full-sentence captions.
const PREFIXES: [&str; 6] = ["", "", "a photo of ", "an image of ", "a picture of ", "a drawing of "];

/// A caption of the scene in one of several wordings, main object first; without colour words when
/// `colorless`.
fn caption(scene: &Scene, colorless: bool, rng: &mut ChaCha8Rng) -> String {
    let described: Vec<Object>;
    let objects = if colorless {
        described = scene.objects.iter().map(|o| Object { color: NO_COLOR, ..o.clone() }).collect();
        &described
    } else {
        &scene.objects
    };
    let template = rng.random_range(0..5);
    if template == 0 {
        return finish(terse(objects, rng), rng);
    }
    let sentence = match (objects.len(), template) {
        (1, 1) => format!("{} on a {} background", noun_phrase(&objects[0], rng), pick(rng, scene.background.words())),
        (1, _) => with_region(&objects[0], rng),
        (_, 1) => relational(objects, rng),
        (count, 2) => {
            format!("{} {}: {}", ["two", "three"][count - 2], pick(rng, &["shapes", "objects"]), listed(objects, rng))
        }
        (_, 3) => join_list(objects.iter().map(|o| with_region(o, rng)).collect()),
        _ => listed(objects, rng),
    };
    finish(format!("{}{sentence}", pick(rng, &PREFIXES)), rng)
}

/// Optionally capitalises the caption and ends it with a full stop.
fn finish(mut text: String, rng: &mut ChaCha8Rng) -> String {
    if rng.random_bool(0.3) {
        text[..1].make_ascii_uppercase();
    }
    if rng.random_bool(0.5) {
        text.push('.');
    }
    text
}

/// "[size] colour shape" in caption words, the size given half of the time; "[size] shape" for an
/// object described without its colour ([`NO_COLOR`]).
fn bare_phrase(object: &Object, rng: &mut ChaCha8Rng) -> String {
    let color = match object.color {
        NO_COLOR => String::new(),
        c => format!("{} ", pick(rng, COLOR_WORDS[c])),
    };
    let shape = pick(rng, SHAPE_WORDS[object.shape]);
    match rng.random_bool(0.5) {
        true => format!("{} {color}{shape}", pick(rng, SIZE_WORDS[object.size])),
        false => format!("{color}{shape}"),
    }
}

/// The colour id of an object its caption describes without colour.
const NO_COLOR: usize = usize::MAX;

/// The bare phrase with its indefinite article.
fn noun_phrase(object: &Object, rng: &mut ChaCha8Rng) -> String {
    let phrase = bare_phrase(object, rng);
    let article = if phrase.starts_with(['a', 'e', 'i', 'o', 'u']) { "an" } else { "a" };
    format!("{article} {phrase}")
}

/// "red disc, blue box": bare phrases separated by commas.
fn terse(objects: &[Object], rng: &mut ChaCha8Rng) -> String {
    objects.iter().map(|o| bare_phrase(o, rng)).collect::<Vec<_>>().join(", ")
}

/// "a red circle, a blue box and a green star".
fn listed(objects: &[Object], rng: &mut ChaCha8Rng) -> String {
    join_list(objects.iter().map(|o| noun_phrase(o, rng)).collect())
}

/// "a, b and c": phrases separated by commas, the last one by "and".
fn join_list(phrases: Vec<String>) -> String {
    match phrases.split_last() {
        Some((last, rest)) if !rest.is_empty() => format!("{} and {last}", rest.join(", ")),
        _ => phrases.concat(),
    }
}

/// "a red circle on the left", or just the noun phrase when the object is near a region border.
fn with_region(object: &Object, rng: &mut ChaCha8Rng) -> String {
    let phrase = noun_phrase(object, rng);
    match region_phrase(object) {
        Some(region) => format!("{phrase} {region}"),
        None => phrase,
    }
}

/// "a red circle left of a blue box and above a green star": the main object related to each
/// other one ("... left of a blue box and a green star" when both relations agree).
fn relational(objects: &[Object], rng: &mut ChaCha8Rng) -> String {
    let main = &objects[0];
    let mut text = noun_phrase(main, rng);
    let mut previous = None;
    for (position, other) in objects[1..].iter().enumerate() {
        let relation = Relation::between(main, other);
        if position > 0 {
            text.push_str(" and");
        }
        if previous != Some(relation) {
            let phrase = pick(rng, relation.words());
            text.push(' ');
            text.push_str(phrase);
        }
        text.push(' ');
        text.push_str(&noun_phrase(other, rng));
        previous = Some(relation);
    }
    text
}

/// Renders `scene` as a `resolution`² image: background, anti-aliased objects, uniform noise.
fn render(scene: &Scene, resolution: u32, rng: &mut ChaCha8Rng) -> RgbImage {
    let side = resolution as f32;
    let stamps: Vec<Stamp> = scene.objects.iter().map(|object| Stamp::new(object, side)).collect();
    let mut image = RgbImage::new(resolution, resolution);
    for (x, y, pixel) in image.enumerate_pixels_mut() {
        let (u, v) = ((x as f32 + 0.5) / side, (y as f32 + 0.5) / side);
        let mut rgb = scene.background.color_at(u, v);
        for stamp in stamps.iter().filter(|stamp| stamp.covers(x, y)) {
            let coverage = stamp.coverage(u, v, side);
            if coverage > 0.0 {
                rgb = mix(rgb, stamp.object.rgb, coverage);
            }
        }
        let bits = rng.next_u32();
        for (channel, value) in pixel.0.iter_mut().enumerate() {
            let unit = ((bits >> (8 * channel)) & 0xff) as f32 / 127.5 - 1.0;
            *value = (rgb[channel] + unit * scene.noise).round().clamp(0.0, 255.0) as u8;
        }
    }
    image
}

/// An object with the pixel rectangle it may touch.
struct Stamp<'a> {
    object: &'a Object,
    x_range: (u32, u32),
    y_range: (u32, u32),
}

impl<'a> Stamp<'a> {
    /// The stamp of `object` in an image `side` pixels wide (its reach plus a pixel of margin).
    fn new(object: &'a Object, side: f32) -> Self {
        let reach = object.reach() * side + 1.0;
        let range = |center: f32| {
            let middle = center * side;
            ((middle - reach).floor().max(0.0) as u32, (middle + reach).ceil().max(0.0) as u32)
        };
        Stamp { object, x_range: range(object.center[0]), y_range: range(object.center[1]) }
    }

    /// Whether pixel (x, y) lies in the stamp's rectangle.
    fn covers(&self, x: u32, y: u32) -> bool {
        (self.x_range.0..=self.x_range.1).contains(&x) && (self.y_range.0..=self.y_range.1).contains(&y)
    }

    /// The fraction of the pixel centred at (u, v) that the object covers (a one-pixel ramp
    /// across its outline).
    fn coverage(&self, u: f32, v: f32, side: f32) -> f32 {
        let object = self.object;
        let p = [(u - object.center[0]) / object.radius, (v - object.center[1]) / object.radius];
        let pixels = shape_distance(object.shape, p) * object.radius * side;
        (0.5 - pixels).clamp(0.0, 1.0)
    }
}

#[cfg(test)]
mod tests {
    use std::f32::consts::PI;

    use super::*;

    #[test]
    fn word_tables_start_with_the_canonical_names_and_never_share_a_word() {
        assert!(SHAPES.iter().zip(SHAPE_WORDS).all(|(name, words)| words[0] == *name));
        assert!(COLORS.iter().zip(COLOR_WORDS).all(|(name, words)| words[0] == *name));
        assert!(SIZES.iter().zip(SIZE_WORDS).all(|(name, words)| words[0] == *name));
        let mut owners = BTreeMap::new();
        for (table, words) in [&SHAPE_WORDS[..], &COLOR_WORDS, &SIZE_WORDS].into_iter().enumerate() {
            for (id, synonyms) in words.iter().enumerate() {
                for synonym in synonyms.iter() {
                    assert_eq!(*owners.entry(*synonym).or_insert((table, id)), (table, id), "'{synonym}'");
                }
            }
        }
        let shape_parts: Vec<&str> =
            SHAPE_WORDS.iter().flat_map(|words| words.iter().flat_map(|w| w.split(' '))).collect();
        let mut modifiers = COLOR_WORDS.iter().chain(&SIZE_WORDS).flat_map(|words| words.iter());
        assert!(modifiers.all(|word| !shape_parts.contains(word)));
    }

    #[test]
    fn shapes_stay_within_their_reach_and_fill_part_of_it() {
        for shape in 0..SHAPES.len() {
            for step in 0..360 {
                let angle = step as f32 * PI / 180.0;
                let outside = REACH[shape] + 1e-3;
                let d = shape_distance(shape, [outside * angle.cos(), outside * angle.sin()]);
                assert!(d > -1e-4, "{} pokes out of its reach at {step}°: {d}", SHAPES[shape]);
            }
            let grid = 100;
            let inside = (0..grid * grid)
                .filter(|i| {
                    let p = [(i % grid) as f32 / grid as f32 * 2.0 - 1.0, (i / grid) as f32 / grid as f32 * 2.0 - 1.0];
                    shape_distance(shape, p) < 0.0
                })
                .count();
            assert!(inside as f32 > 0.3 * (grid * grid) as f32 * PI / 4.0, "{} covers {inside}", SHAPES[shape]);
        }
    }

    /// Centroid and count of the pixels near `object`'s colour within its reach.
    fn visible_pixels(image: &RgbImage, object: &Object) -> (f32, [f32; 2]) {
        let side = image.width() as f32;
        let (mut count, mut sum) = (0.0, [0.0f32; 2]);
        for (x, y, pixel) in image.enumerate_pixels() {
            let point = [(x as f32 + 0.5) / side, (y as f32 + 0.5) / side];
            let color = pixel.0.map(f32::from);
            if distance(&point, &object.center) <= object.reach() && distance(&color, &object.rgb) < 30.0 {
                count += 1.0;
                sum = [sum[0] + point[0], sum[1] + point[1]];
            }
        }
        (count, [sum[0] / count, sum[1] / count])
    }

    #[test]
    fn objects_are_visible_and_relations_hold_in_the_pixels() {
        for index in 0..400 {
            let mut rng = ChaCha8Rng::seed_from_u64(index);
            let scene = Scene::generate(Split::Train, 1.0, &mut rng);
            let image = render(&scene, 128, &mut rng);
            let centroids: Vec<[f32; 2]> = scene
                .objects
                .iter()
                .map(|object| {
                    let (count, centroid) = visible_pixels(&image, object);
                    let area = PI * (object.radius * 128.0).powi(2);
                    assert!(count > 0.2 * area, "scene {index}: {object:?} shows {count} of ~{area} pixels");
                    centroid
                })
                .collect();
            let main = &scene.objects[0];
            for (other, centroid) in scene.objects.iter().zip(&centroids).skip(1) {
                let (dx, dy) = (centroid[0] - centroids[0][0], centroid[1] - centroids[0][1]);
                let along = match Relation::between(main, other) {
                    Relation::LeftOf => dx,
                    Relation::RightOf => -dx,
                    Relation::Above => dy,
                    Relation::Below => -dy,
                };
                let clear = 0.4 * (main.reach() + other.reach());
                assert!(along > clear, "scene {index}: relation contradicts the pixels ({dx}, {dy})");
            }
        }
    }

    #[test]
    fn backgrounds_contrast_with_every_object() {
        for index in 0..3000 {
            let scene = Scene::generate(Split::Train, 1.0, &mut ChaCha8Rng::seed_from_u64(index));
            for object in &scene.objects {
                assert!(scene.background.color_distance(&object.rgb) >= MIN_CONTRAST, "scene {index}");
            }
        }
    }
}
