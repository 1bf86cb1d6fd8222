//! The EMA teacher of the SSL objectives (docs/design.md §4.4; VTP's legacy `vtp/models/vtp.py`
//! `update_teacher`): a copy of the student's trunk, CLIP projection (`teacher_proj`, unused by the
//! losses) and DINO head, updated after every step as `θ_t ← m·θ_t + (1 − m)·θ_s`, never by gradients.
use super::config::DinoHeadConfig;
use super::dino_head::DinoHead;
use crate::config::VtpConfig;
use crate::model::encoder::VisionEncoder;
use crate::model::ffn::linear;
use crate::train::ema::ema_update;
use anyhow::{Context, Result};
use std::collections::HashMap;
use tch::{nn, Device, Tensor};

/// The teacher network; its parameters carry the student's names (`trunk.*`, `visual_proj.*`,
/// `dino_head.*`) in their own store.
#[derive(Debug)]
pub struct Teacher {
    pub vs: nn::VarStore,
    pub trunk: VisionEncoder,
    pub head: DinoHead,
}

impl Teacher {
    /// A teacher for `config`, on `device`, frozen (no gradients); copy the student in with
    /// [`Self::copy_from`].
    pub fn new(config: &VtpConfig, head: &DinoHeadConfig, device: Device) -> Self {
        let mut vs = nn::VarStore::new(device);
        let root = vs.root();
        let trunk = VisionEncoder::new(&root / "trunk", config);
        if config.train_clip {
            linear(&root / "visual_proj", config.clip_input_dim(), config.text_embed_dim, false);
        }
        let head = DinoHead::new(&root / "dino_head", config.clip_input_dim(), head);
        vs.freeze();
        Self { vs, trunk, head }
    }

    /// The teacher's parameters by name.
    pub fn named_parameters(&self) -> Vec<(String, Tensor)> {
        let mut all: Vec<(String, Tensor)> = self.vs.variables().into_iter().collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    }

    /// Pairs every teacher parameter with the student parameter of the same name.
    fn pairs<'a>(&self, student: &'a HashMap<String, Tensor>) -> Result<Vec<(Tensor, &'a Tensor)>> {
        self.named_parameters()
            .into_iter()
            .map(|(name, t)| {
                let s = student.get(&name).with_context(|| format!("the student has no parameter '{name}'"))?;
                Ok((t, s))
            })
            .collect()
    }

    /// `θ_t ← θ_s` (the teacher starts as a copy of the student).
    pub fn copy_from(&self, student: &HashMap<String, Tensor>) -> Result<()> {
        tch::no_grad(|| {
            for (mut t, s) in self.pairs(student)? {
                t.copy_(s);
            }
            Ok(())
        })
    }

    /// The EMA update `θ_t ← m·θ_t + (1 − m)·θ_s` (DINOv2: `_foreach_mul_(m)` then
    /// `_foreach_add_(s, alpha = 1 − m)`), rounded as [`ema_update`] explains.
    pub fn ema_update(&self, student: &HashMap<String, Tensor>, momentum: f64) -> Result<()> {
        ema_update(self.pairs(student)?, momentum);
        Ok(())
    }
}
