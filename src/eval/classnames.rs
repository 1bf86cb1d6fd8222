//! Class names and prompt templates for zero-shot classification (docs/design.md §5.1).
//!
//! - ImageNet-1k: the 1000 OpenAI/OpenCLIP "cleaned" class names (`IMAGENET_CLASSNAMES`) and the 80
//!   OpenAI prompt templates (`OPENAI_IMAGENET_TEMPLATES`), copied verbatim and in order from OpenCLIP 3.3.0
//!   `open_clip/zero_shot_metadata.py` (MIT licence) into `assets/imagenet_classnames.txt` and
//!   `assets/openai_imagenet_templates.txt`, one per line; VTP's `tools/test_zero_shot_hf.py` uses the same
//!   lists (docs/design.md §5.1). Order = ImageNet class index = sorted wnid folder order.
//! - CIFAR-10: the torchvision class order and the 18 OpenAI CLIP CIFAR-10 templates
//!   (`openai/CLIP` `data/prompts.md`, also CLIP_benchmark's).
//! - The built-in synthetic scenes: the label sets of [`crate::data::synthetic::LABEL_SETS`] with names from
//!   [`crate::data::synthetic::class_names`] and a few simple templates of our own.
//! - Any class folders (ImageNet layout, `DIR/<class>/<image>`): the class set [`FOLDER_CLASS_SET`] takes
//!   the sorted sub-folder names (the order of the folder source's `cls` labels, like torchvision's
//!   `ImageFolder`), `_` read as a space, with the 80 OpenAI ImageNet templates ([`folder_class_set`]).
//!
//! Templates use a `{c}` placeholder for the class name ([`fill_template`]).

use std::fmt;
use std::str::FromStr;

use anyhow::{bail, Context, Error, Result};
use serde::{Deserialize, Serialize};

use crate::data::{source, synthetic};

/// `assets/imagenet_classnames.txt`: the 1000 OpenCLIP ImageNet class names, one per line (docs/design.md §5.1).
const IMAGENET_CLASSNAMES_TXT: &str = include_str!("../../assets/imagenet_classnames.txt");

/// `assets/openai_imagenet_templates.txt`: the 80 OpenAI ImageNet templates, one per line (docs/design.md §5.1).
const OPENAI_IMAGENET_TEMPLATES_TXT: &str = include_str!("../../assets/openai_imagenet_templates.txt");

/// The placeholder a template's class name replaces.
pub const CLASS_PLACEHOLDER: &str = "{c}";

/// The label key of ImageNet-style data in [`crate::data::Sample::labels`]: a WebDataset `.cls` member or
/// the index of a class folder (sorted folder names).
pub const CLS_LABEL_KEY: &str = "cls";

/// CIFAR-10 class names in label order (torchvision `CIFAR10.classes`).
pub const CIFAR10_CLASSNAMES: [&str; 10] =
    ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"];

/// The 18 OpenAI CLIP templates for CIFAR-10 (`openai/CLIP` `data/prompts.md`).
pub const CIFAR10_TEMPLATES: [&str; 18] = [
    "a photo of a {c}.",
    "a blurry photo of a {c}.",
    "a black and white photo of a {c}.",
    "a low contrast photo of a {c}.",
    "a high contrast photo of a {c}.",
    "a bad photo of a {c}.",
    "a good photo of a {c}.",
    "a photo of a small {c}.",
    "a photo of a big {c}.",
    "a photo of the {c}.",
    "a blurry photo of the {c}.",
    "a black and white photo of the {c}.",
    "a low contrast photo of the {c}.",
    "a high contrast photo of the {c}.",
    "a bad photo of the {c}.",
    "a good photo of the {c}.",
    "a photo of the small {c}.",
    "a photo of the big {c}.",
];

/// Templates for the synthetic `shape` and `shape_color` label sets (names like "circle", "red circle").
/// "the" rather than "a/an", so that no article disagrees with the name ("an orange ...").
pub const SYNTHETIC_OBJECT_TEMPLATES: [&str; 4] =
    ["a photo of the {c}.", "the {c}.", "a picture of the {c}.", "a rendering of the {c} on a background."];

/// Templates for the synthetic `color` label set (names are colour words: "red", "purple", ...).
pub const SYNTHETIC_COLOR_TEMPLATES: [&str; 4] =
    ["a photo of the {c} shape.", "the {c} object.", "a picture of the {c} shape.", "a {c} shape on a background."];

/// The 1000 OpenAI/OpenCLIP ImageNet class names in class-index order (docs/design.md §5.1): `"tench"` first,
/// `"toilet paper"` last, duplicates (two `"missile"`, two `"sunglasses"`) kept.
pub fn imagenet_classnames() -> Vec<&'static str> {
    lines(IMAGENET_CLASSNAMES_TXT)
}

/// The 80 OpenAI ImageNet prompt templates in order (docs/design.md §5.1), `{c}` standing for the class name:
/// `"a bad photo of a {c}."` first, `"a tattoo of the {c}."` last.
pub fn openai_imagenet_templates() -> Vec<&'static str> {
    lines(OPENAI_IMAGENET_TEMPLATES_TXT)
}

/// The non-empty lines of an asset file.
fn lines(text: &'static str) -> Vec<&'static str> {
    text.lines().filter(|l| !l.is_empty()).collect()
}

/// A template with its `{c}` replaced by `class_name` (OpenCLIP's `lambda c: f'...{c}...'`).
pub fn fill_template(template: &str, class_name: &str) -> String {
    template.replace(CLASS_PLACEHOLDER, class_name)
}

/// The prompts of one class: every template with its `{c}` replaced by `class_name`, in template order.
pub fn prompts(templates: &[String], class_name: &str) -> Vec<String> {
    templates.iter().map(|t| fill_template(t, class_name)).collect()
}

/// The name of the class set read from the data: the class sub-folders of a class-folder source
/// ([`folder_class_set`]).
pub const FOLDER_CLASS_SET: &str = "folder";

/// A class folder's name as the class name of its prompts: `_` becomes a space (`apple_pie` ->
/// `apple pie`). (ImageNet's wnid folders, `n01440764`, name no class: use the `imagenet` set there.)
pub fn folder_prompt_name(folder: &str) -> String {
    folder.replace('_', " ")
}

/// The [`FOLDER_CLASS_SET`] of the class folders `spec` ([`source::open_class_folder`]): one class per
/// sub-folder in sorted name order (= its `cls` label), named by [`folder_prompt_name`], prompted with
/// the 80 OpenAI ImageNet templates ([`openai_imagenet_templates`]), label key [`CLS_LABEL_KEY`].
/// Data that are not labelled class folders are a one-line error naming the path and the problem.
pub fn folder_class_set(spec: &str) -> Result<ResolvedClassSet> {
    let folders = source::open_class_folder(spec)
        .with_context(|| format!("class set '{FOLDER_CLASS_SET}' takes its classes from class folders"))?;
    Ok(ResolvedClassSet {
        name: FOLDER_CLASS_SET.into(),
        class_names: folders.classes().iter().map(|c| folder_prompt_name(c)).collect(),
        templates: openai_imagenet_templates().into_iter().map(String::from).collect(),
        label_key: CLS_LABEL_KEY.into(),
    })
}

/// Whether `name` names [`FOLDER_CLASS_SET`] (any case).
pub fn is_folder_set(name: &str) -> bool {
    name.trim().eq_ignore_ascii_case(FOLDER_CLASS_SET)
}

/// Resolves class set `name` for the data `spec`: [`FOLDER_CLASS_SET`] reads the class folders of
/// `spec` ([`folder_class_set`]), any other name is [`resolve`]d without looking at the data.
pub fn resolve_for_data(name: &str, spec: &str) -> Result<ResolvedClassSet> {
    if is_folder_set(name) {
        folder_class_set(spec)
    } else {
        resolve(name)
    }
}

/// A named set of classes for zero-shot classification (docs/design.md §5.1): which names, which templates, and
/// which label of a [`crate::data::Sample`] holds the ground truth.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ClassSet {
    /// ImageNet-1k: OpenCLIP names × the 80 OpenAI templates, label `cls` (docs/design.md §5.1).
    Imagenet,
    /// CIFAR-10: its 10 names × the 18 OpenAI CIFAR templates, label `cls`.
    Cifar10,
    /// The built-in synthetic scenes, one of [`synthetic::LABEL_SETS`] (`shape`, `color`, `shape_color`),
    /// the label of the same name.
    Synthetic(String),
}

impl ClassSet {
    /// Every set [`ClassSet::from_str`] accepts, by name.
    pub fn all() -> Vec<ClassSet> {
        let mut out = vec![ClassSet::Imagenet, ClassSet::Cifar10];
        out.extend(synthetic::LABEL_SETS.iter().map(|s| ClassSet::Synthetic(s.to_string())));
        out
    }

    /// The set's name: `imagenet`, `cifar10`, `synthetic-shape`, `synthetic-color`, `synthetic-shape_color`.
    pub fn name(&self) -> String {
        match self {
            ClassSet::Imagenet => "imagenet".into(),
            ClassSet::Cifar10 => "cifar10".into(),
            ClassSet::Synthetic(set) => format!("synthetic-{set}"),
        }
    }

    /// The class names, index = label value.
    pub fn class_names(&self) -> Vec<String> {
        match self {
            ClassSet::Imagenet => imagenet_classnames().into_iter().map(String::from).collect(),
            ClassSet::Cifar10 => CIFAR10_CLASSNAMES.iter().map(|s| s.to_string()).collect(),
            ClassSet::Synthetic(set) => synthetic::class_names(set).unwrap_or_default(),
        }
    }

    /// The prompt templates (`{c}` placeholder).
    pub fn templates(&self) -> Vec<String> {
        let owned = |list: &[&str]| list.iter().map(|s| s.to_string()).collect();
        match self {
            ClassSet::Imagenet => owned(&openai_imagenet_templates()),
            ClassSet::Cifar10 => owned(&CIFAR10_TEMPLATES),
            ClassSet::Synthetic(set) if set == "color" => owned(&SYNTHETIC_COLOR_TEMPLATES),
            ClassSet::Synthetic(_) => owned(&SYNTHETIC_OBJECT_TEMPLATES),
        }
    }

    /// The key of [`crate::data::Sample::labels`] holding this set's ground truth.
    pub fn label_key(&self) -> String {
        match self {
            ClassSet::Imagenet | ClassSet::Cifar10 => CLS_LABEL_KEY.into(),
            ClassSet::Synthetic(set) => set.clone(),
        }
    }

    /// Names, templates and label key together.
    pub fn resolve(&self) -> ResolvedClassSet {
        ResolvedClassSet {
            name: self.name(),
            class_names: self.class_names(),
            templates: self.templates(),
            label_key: self.label_key(),
        }
    }
}

impl fmt::Display for ClassSet {
    /// Writes [`ClassSet::name`].
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name())
    }
}

impl FromStr for ClassSet {
    type Err = Error;

    /// Parses a set name (any case; `imagenet-1k`/`imagenet1k`, `cifar-10`, `synthetic-shape-color` and
    /// `synthetic` = `synthetic-shape_color` also accepted).
    fn from_str(text: &str) -> Result<Self, Error> {
        if is_folder_set(text) {
            bail!("class set '{FOLDER_CLASS_SET}' is read from the data: resolve it with resolve_for_data");
        }
        let lower = text.trim().to_ascii_lowercase();
        Ok(match lower.as_str() {
            "imagenet" | "imagenet-1k" | "imagenet1k" => ClassSet::Imagenet,
            "cifar10" | "cifar-10" => ClassSet::Cifar10,
            "synthetic" => ClassSet::Synthetic("shape_color".into()),
            other => match other.strip_prefix("synthetic-").or_else(|| other.strip_prefix("synthetic:")) {
                Some(set) if synthetic::class_names(&set.replace('-', "_")).is_some() => {
                    ClassSet::Synthetic(set.replace('-', "_"))
                }
                _ => {
                    let known: Vec<String> = ClassSet::all().iter().map(ClassSet::name).collect();
                    bail!("unknown class set '{text}' (expected one of {}, {FOLDER_CLASS_SET})", known.join(", "))
                }
            },
        })
    }
}

/// A [`ClassSet`] spelled out: what zero-shot classification needs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResolvedClassSet {
    /// [`ClassSet::name`].
    pub name: String,
    /// Class names, index = label value.
    pub class_names: Vec<String>,
    /// Prompt templates with a `{c}` placeholder.
    pub templates: Vec<String>,
    /// The key of [`crate::data::Sample::labels`] holding the ground truth.
    pub label_key: String,
}

/// Resolves a class-set name ([`ClassSet::from_str`]) to (names, templates, label key).
pub fn resolve(name: &str) -> Result<ResolvedClassSet> {
    Ok(name.parse::<ClassSet>()?.resolve())
}
