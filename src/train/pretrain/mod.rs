//! Stage 1, `vtp pretrain` (docs/design.md §4.1–§4.5): the student (the VTP tokenizer + the DINO head), its EMA
//! teacher, and one optimisation step of
//! `L = λ_rec·(L1 + LPIPS) + λ_ssl·(L_dino + L_ibot + w_koleo·L_koleo) + λ_clip·L_clip`.
//!
//! The trunk serves each objective with that objective's drop-path rate (the legacy meta-arch; requests
//! of the same size and rate share one pass, `train::passes`): CLIP and SSL on full-width tokens
//! (`use_bottleneck = !vision_bottleneck_ae_only`), reconstruction through the 64-d bottleneck into the
//! pixel decoder.
pub mod batch;
pub mod config;
pub mod diagnostics;
pub mod dino_head;
pub mod objectives;
pub mod passes;
pub mod teacher;

use super::feed::{stream_options, BatchQueue, DataFeed, RankPositions};
use super::online::{online_evaluation, ReconGrid};
use super::optim::{dinov2_param_specs, AdamW};
use super::precision::f32;
use super::profile::StepProfile;
use super::run::{RunOptions, StepReport, Trainer};
use super::schedule::{ScheduleValues, Schedules};
use super::step::{guarded_backward, step_seed};
use crate::config::ClipFeat;
use crate::data::Sample;
use crate::dist::DataParallel;
use crate::model::encoder::{tokens_to_map, Features};
use crate::model::{l2_normalize, VtpModel};
use anyhow::{Context, Result};
use batch::{BatchBuilder, PretrainBatch, SslBatch, N_GLOBAL_CROPS};
use config::{BatchConfig, PretrainConfig};
use diagnostics::{mean_entropy, CollapseAlarm};
use dino_head::DinoHead;
use objectives::clip::{clamp_logit_scale, clip_loss_local, siglip_loss_local};
use objectives::dino::DinoLoss;
use objectives::ibot::IbotPatchLoss;
use objectives::koleo::koleo_per_crop;
use objectives::recon::ReconLoss;
use passes::{run_trunk_passes, TrunkPass};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;
use tch::{nn, nn::Module, Device, Kind, Tensor};
use teacher::Teacher;

/// The loss of one step, its named terms (scalars), and what watches the training without entering the
/// loss (`ssl/*`: the mean entropy of the DINO and iBOT teacher targets).
pub struct Losses {
    pub total: Tensor,
    pub terms: Vec<(&'static str, Tensor)>,
    pub diagnostics: Diagnostics,
}

/// The student's parameters: the tokenizer's (official names) and its DINO head's (`dino_head.*`).
fn student(model: &VtpModel, head_vs: &nn::VarStore) -> HashMap<String, Tensor> {
    let mut all = model.vs.variables();
    all.extend(head_vs.variables());
    all
}

/// Named scalars that watch the training without entering the loss.
type Diagnostics = Vec<(&'static str, f64)>;

/// One term of `L_ssl`: its name (the metric `loss/<name>`), value and weight.
struct SslTerm {
    name: &'static str,
    loss: Tensor,
    weight: f64,
}

/// The student trunk's features of one batch, per objective.
struct StudentFeatures {
    clip: Option<Features>,
    /// Global crops (masked), local crops.
    ssl: Option<(Features, Features)>,
    recon: Features,
}

/// Everything stage 1 trains and its loss state.
pub struct Pretrainer {
    pub config: PretrainConfig,
    pub model: VtpModel,
    /// The student's DINO head (its own store: it is not part of the released tokenizer).
    pub head_vs: nn::VarStore,
    pub head: DinoHead,
    pub teacher: Teacher,
    pub dino: DinoLoss,
    pub ibot: IbotPatchLoss,
    pub recon: ReconLoss,
    pub optim: AdamW,
    /// This process's place in the job: gradients, centres and CLIP features are shared over it.
    pub dp: Arc<DataParallel>,
    /// Wall time by phase of every step, when set (`vtp bench --profile`).
    pub profile: Option<StepProfile>,
}

impl Pretrainer {
    /// A freshly initialised student (seeded by `train.seed`), its teacher copy and the optimiser;
    /// over several processes every rank starts from rank 0's weights. `recon` is the reconstruction
    /// loss (L1, with LPIPS or not), to which the config's L2 term (`loss.l2_weight`) is added here.
    pub fn new(config: PretrainConfig, recon: ReconLoss, device: Device, dp: Arc<DataParallel>) -> Result<Self> {
        tch::manual_seed(config.train.seed as i64);
        let model = VtpModel::new(config.model.clone(), device)?;
        let head_vs = nn::VarStore::new(device);
        let in_dim = config.model.clip_input_dim();
        let head = DinoHead::new(&head_vs.root() / "dino_head", in_dim, &config.dino_head);
        let teacher = Teacher::new(&config.model, &config.dino_head, device);
        let loss = &config.loss;
        let k = config.dino_head.out_dim;
        let dino = DinoLoss::new(k, loss.student_temp, loss.center_momentum, device);
        let ibot = IbotPatchLoss::new(k, loss.student_temp, loss.center_momentum, device);
        let recon = recon.with_l2(loss.l2_weight);
        let o = &config.optim;
        let specs = dinov2_param_specs(
            student(&model, &head_vs),
            config.model.vision_depth,
            o.layer_decay,
            o.patch_embed_lr_mult,
        );
        let optim = AdamW::new(specs, o.adamw());
        let trainer = Self { optim, config, model, head_vs, head, teacher, dino, ibot, recon, dp, profile: None };
        let mut named: Vec<(String, Tensor)> = trainer.student_parameters().into_iter().collect();
        named.sort_by(|a, b| a.0.cmp(&b.0));
        trainer.dp.broadcast_from_main(&named.into_iter().map(|(_, t)| t).collect::<Vec<_>>())?;
        trainer.teacher.copy_from(&trainer.student_parameters())?;
        Ok(trainer)
    }

    /// The student's parameters by name: the tokenizer's official names plus `dino_head.*`.
    pub fn student_parameters(&self) -> HashMap<String, Tensor> {
        student(&self.model, &self.head_vs)
    }

    /// Records the phase that ends now under `phase` when profiling, and restarts `since`.
    fn lap(&mut self, phase: &'static str, since: &mut Instant) {
        if let Some(p) = &mut self.profile {
            p.lap(phase, since);
        }
    }

    /// Runs a forward pass of the student or teacher in the run's precision (`train.precision`).
    fn amp<T>(&self, forward: impl FnOnce() -> T) -> Result<T> {
        self.config.train.precision.autocast(self.model.device(), forward)
    }

    /// The CLIP image embedding of the trunk features (`vision_clip_feat`, `visual_proj`).
    fn clip_image_embedding(&self, f: &Features) -> Result<Tensor> {
        let feat = match self.model.config.vision_clip_feat {
            ClipFeat::Cls => f.cls.shallow_clone(),
            ClipFeat::Pooled => f.patches.mean_dim(1, false, None::<Kind>),
        };
        let proj = self.model.visual_proj.as_ref().context("CLIP needs model.train_clip = true")?;
        Ok(proj.forward(&feat))
    }

    /// `L_clip`: InfoNCE (or SigLIP when the model has a logit bias) over the whole batch (docs/design.md §4.6):
    /// over several processes, this rank's pairs against every rank's features gathered with gradients.
    /// The towers run in the run's precision, the normalised features and the loss in f32.
    fn clip_loss(&self, f: &Features, tokens: &Tensor) -> Result<Tensor> {
        let (image_embedding, text_embedding) = self.amp(|| -> Result<_> {
            Ok((self.clip_image_embedding(f)?, self.model.get_clip_text_feature(tokens, false)?))
        })??;
        let image_features = l2_normalize(&f32(&image_embedding));
        let text_features = l2_normalize(&f32(&text_embedding));
        let log_scale = self.model.logit_scale.as_ref().context("the model has no logit_scale")?;
        // One gather of both feature sets: a single collective in the backward pass, so no two
        // ranks can pair their all-reduces differently.
        let (all_image, all_text) = match self.dp.group() {
            Some(g) => {
                let d = image_features.size()[1];
                let both = g.gather_with_grad(&Tensor::cat(&[&image_features, &text_features], 1))?;
                (both.narrow(1, 0, d), both.narrow(1, d, text_features.size()[1]))
            }
            None => (image_features.shallow_clone(), text_features.shallow_clone()),
        };
        let offset = self.dp.rank() as i64 * image_features.size()[0];
        let scale = log_scale.exp();
        Ok(match &self.model.logit_bias {
            Some(bias) => siglip_loss_local(&image_features, &all_text, &scale, bias, offset),
            None => clip_loss_local(&image_features, &text_features, &all_image, &all_text, &scale, offset),
        })
    }

    /// The SSL terms (docs/design.md §4.4), each with its weight inside `L_ssl`: DINO on CLS tokens (teacher
    /// crops swapped), iBOT on the masked patches, KoLeo on the student's global-crop CLS tokens
    /// (pre-head); and the mean entropy of the DINO and iBOT teacher targets (diagnostics).
    fn ssl_losses(
        &mut self,
        ssl: &SslBatch,
        (g, l): (&Features, &Features),
        teacher_temp: f64,
    ) -> Result<(Vec<SslTerm>, Diagnostics)> {
        let wide = !self.model.config.vision_bottleneck_ae_only;
        let loss = self.config.loss.clone();
        let idx = &ssl.masks.mask_indices_list;
        let (dino_targets, ibot_targets) = tch::no_grad(|| {
            let (logits, n_cls) = self.amp(|| {
                let t = self.teacher.trunk.forward_train(&ssl.global, None, 0.0, wide);
                let chunks = t.cls.chunk(N_GLOBAL_CROPS, 0);
                let cls = Tensor::cat(&[&chunks[1], &chunks[0]], 0);
                let patches = t.patches.flatten(0, 1).index_select(0, idx);
                (f32(&self.teacher.head.forward(&Tensor::cat(&[&cls, &patches], 0))), cls.size()[0])
            })?;
            let (cls_logits, patch_logits) = (logits.narrow(0, 0, n_cls), logits.narrow(0, n_cls, idx.size()[0]));
            let dp = &*self.dp;
            Ok::<_, anyhow::Error>((
                self.dino.teacher_targets(&cls_logits, teacher_temp, loss.centering, dp)?,
                self.ibot.teacher_targets(&patch_logits, teacher_temp, loss.centering, dp)?,
            ))
        })?;
        let (global_cls, local_cls, student_patches) = self.amp(|| {
            let (global_cls, local_cls) = (self.head.forward(&g.cls), self.head.forward(&l.cls));
            let patches = self.head.forward(&g.patches.flatten(0, 1).index_select(0, idx));
            (f32(&global_cls), f32(&local_cls), f32(&patches))
        })?;
        let g_cls = f32(&g.cls);
        let n_local = self.config.data.n_local_crops as i64;
        let dino = self.dino.dino_crops_loss(&global_cls, &local_cls, &dino_targets, N_GLOBAL_CROPS, n_local);
        let ibot = self.ibot.ibot_patch_loss(
            &student_patches,
            &ibot_targets,
            &ssl.masks.masks,
            &ssl.masks.masks_weight,
            N_GLOBAL_CROPS,
        );
        let terms = vec![
            SslTerm { name: "dino", loss: dino.total(), weight: loss.dino_weight },
            SslTerm { name: "ibot", loss: ibot, weight: loss.ibot_weight },
            SslTerm { name: "koleo", loss: koleo_per_crop(&g_cls, N_GLOBAL_CROPS), weight: loss.koleo_weight },
        ];
        let diagnostics = vec![
            ("dino_target_entropy", mean_entropy(&dino_targets)),
            ("ibot_target_entropy", mean_entropy(&ibot_targets)),
        ];
        Ok((terms, diagnostics))
    }

    /// The student trunk's features of every image batch of `batch` (`train::passes`), in the run's precision.
    fn student_features(&self, batch: &PretrainBatch) -> Result<StudentFeatures> {
        let (l, objectives) = (&self.config.loss, self.config.objectives);
        let wide = !self.model.config.vision_bottleneck_ae_only;
        let pass = |images, masks, drop_path, bottleneck| TrunkPass { images, masks, drop_path, bottleneck };
        let mut passes = Vec::new();
        let clip = batch.clip_images.as_ref().filter(|_| objectives.clip());
        if let Some(images) = clip {
            passes.push(pass(images, None, l.clip_drop_path, wide));
        }
        let ssl = batch.ssl.as_ref().filter(|_| objectives.ssl());
        if let Some(ssl) = ssl {
            passes.push(pass(&ssl.global, Some(&ssl.masks.masks), l.ssl_drop_path, wide));
            passes.push(pass(&ssl.local, None, l.ssl_drop_path, wide));
        }
        passes.push(pass(&batch.recon, None, l.rec_drop_path, true));
        let trunk = &self.model.trunk;
        let mut features = self.amp(|| run_trunk_passes(trunk, &passes, l.merge_trunk_passes))?.into_iter();
        let mut next = || features.next().expect("one features per pass");
        let clip = clip.map(|_| next());
        let ssl = ssl.map(|_| (next(), next()));
        Ok(StudentFeatures { clip, ssl, recon: next() })
    }

    /// The loss of one batch and its terms (scalars, differentiable).
    pub fn losses(&mut self, batch: &PretrainBatch, sv: &ScheduleValues) -> Result<Losses> {
        let l = self.config.loss.clone();
        let mut terms: Vec<(&'static str, Tensor)> = Vec::new();
        let mut diagnostics = Vec::new();
        let mut total = Tensor::zeros([], (Kind::Float, self.model.device()));
        let mut t = Instant::now();
        let student = self.student_features(batch)?;
        self.lap("student trunk", &mut t);
        if let (Some(f), Some(tokens)) = (&student.clip, &batch.tokens) {
            let clip = self.clip_loss(f, tokens)?;
            total += &clip * l.lambda_clip;
            terms.push(("clip", clip));
            self.lap("clip forward", &mut t);
        }
        if let (Some((g, local)), Some(ssl)) = (&student.ssl, &batch.ssl) {
            let (ssl_terms, ssl_diagnostics) = self.ssl_losses(ssl, (g, local), sv.teacher_temp)?;
            diagnostics = ssl_diagnostics;
            let ssl_total = ssl_terms.iter().fold(Tensor::zeros_like(&total), |acc, t| acc + &t.loss * t.weight);
            total += &ssl_total * l.lambda_ssl;
            terms.extend(ssl_terms.into_iter().map(|t| (t.name, t.loss)));
            terms.push(("ssl", ssl_total));
            self.lap("ssl forward (teacher, student)", &mut t);
        }
        let f = &student.recon;
        let reconstruction =
            f32(&self.amp(|| self.model.get_latents_decoded_images(&tokens_to_map(&f.patches, f.grid)))??);
        let rec = self.recon.forward(&batch.recon, &reconstruction)?;
        total += &rec.total * l.lambda_rec;
        terms.push(("rec_l1", rec.l1));
        if let Some(l2) = rec.l2 {
            terms.push(("rec_l2", l2));
        }
        if let Some(p) = rec.lpips {
            terms.push(("rec_lpips", p));
        }
        terms.push(("rec", rec.total));
        self.lap("rec forward", &mut t);
        Ok(Losses { total, terms, diagnostics })
    }

    /// One optimisation step on `batch` (this rank's share of the global batch) with the schedule values
    /// `sv`: the losses, backward, gradients averaged over the ranks, gradient clipping
    /// (`optim.clip_grad`, 0 = off), then [`Self::update`]. A non-finite loss (on any rank) or gradient
    /// norm (or `inject_nan`, for tests) skips the update and leaves the weights, optimiser and
    /// centres unchanged. Returns the losses, the gradient norm (before clipping) and whether skipped.
    pub fn step(
        &mut self,
        batch: &PretrainBatch,
        sv: &ScheduleValues,
        inject_nan: bool,
    ) -> Result<(Losses, f64, bool)> {
        let centres = self.centres();
        self.optim.zero_grad();
        let mut losses = self.losses(batch, sv)?;
        if inject_nan {
            losses.total = &losses.total * f64::NAN;
        }
        let mean_loss = self.dp.mean(&[losses.total.double_value(&[])])?[0];
        let (params, max_norm) = (self.parameters(), self.config.optim.clip_grad);
        let grad_norm = guarded_backward(&losses.total, mean_loss, &params, max_norm, &self.dp, self.profile.as_mut())?;
        let skipped = !grad_norm.is_finite();
        if skipped {
            self.optim.zero_grad();
            self.restore_centres(centres);
        } else {
            self.update(sv)?;
        }
        Ok((losses, grad_norm, skipped))
    }

    /// The update after a good backward pass: AdamW with the scheduled lr / wd / last-layer lr, the
    /// logit-scale clamp to [0, ln 100], then the teacher EMA with the scheduled momentum (only when
    /// SSL is on: nothing else reads the teacher, so `ae` and `clip+ae` runs keep its initial copy).
    pub fn update(&mut self, sv: &ScheduleValues) -> Result<()> {
        let mut t = Instant::now();
        self.optim.step(sv.lr, sv.wd, sv.last_layer_lr)?;
        if let Some(s) = &self.model.logit_scale {
            clamp_logit_scale(s);
        }
        self.lap("optimiser", &mut t);
        if !self.config.objectives.ssl() {
            return Ok(());
        }
        self.teacher.ema_update(&self.student_parameters(), sv.momentum)?;
        self.lap("teacher ema", &mut t);
        Ok(())
    }

    /// The gradients of every optimised parameter (for clipping).
    pub fn parameters(&self) -> Vec<Tensor> {
        self.optim.params().iter().map(|p| p.tensor.shallow_clone()).collect()
    }

    /// Every tensor a checkpoint holds: student, head, teacher, optimiser moments, centres.
    pub fn state_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out: Vec<(String, Tensor)> =
            self.student_parameters().into_iter().map(|(k, v)| (format!("student.{k}"), v)).collect();
        out.extend(self.teacher.named_parameters().into_iter().map(|(k, v)| (format!("teacher.{k}"), v)));
        out.extend(self.optim.state_tensors());
        out.push(("dino.center".into(), self.dino.center.shallow_clone()));
        out.push(("ibot.center".into(), self.ibot.center.shallow_clone()));
        out
    }

    /// Restores [`Self::state_tensors`] from a checkpoint.
    pub fn load_state_tensors(&mut self, saved: &HashMap<String, Tensor>) -> Result<()> {
        let live: Vec<(String, Tensor)> = self
            .state_tensors()
            .into_iter()
            .filter(|(k, _)| !k.starts_with("optim.") && !k.ends_with(".center"))
            .collect();
        super::checkpoint::restore_into(&live, saved, "")?;
        self.optim.load_state_tensors(saved)?;
        for (key, center) in [("dino.center", &mut self.dino.center), ("ibot.center", &mut self.ibot.center)] {
            *center =
                saved.get(key).with_context(|| format!("the checkpoint has no '{key}'"))?.to_device(center.device());
        }
        Ok(())
    }

    /// The SSL centres, saved before a step so a skipped (non-finite) step leaves them unchanged.
    pub fn centres(&self) -> (Tensor, Tensor) {
        (self.dino.center.copy(), self.ibot.center.copy())
    }

    /// Puts back centres saved by [`Self::centres`].
    pub fn restore_centres(&mut self, centres: (Tensor, Tensor)) {
        (self.dino.center, self.ibot.center) = centres;
    }
}

/// `vtp pretrain`'s run: the [`Pretrainer`] fed from its data source, its schedules, and the
/// online evaluation and reconstruction grid.
pub struct PretrainRun {
    pub trainer: Pretrainer,
    /// The data feed and the batch builder, one step ahead on a thread of their own.
    batches: BatchQueue<PretrainBatch>,
    schedules: Schedules,
    grid: ReconGrid,
    /// Every rank's data position, gathered before a checkpoint.
    feeds: RankPositions,
    /// Watches the DINO teacher targets for the uniform solution.
    alarm: CollapseAlarm,
}

impl PretrainRun {
    /// A fresh run of `config` on `device` with the reconstruction loss `recon`, as rank `dp.rank()`:
    /// it reads its own slice of the data (the pipeline's rank × worker split) and builds its share of
    /// every global batch (`batch.*` divided by the world size).
    pub fn new(config: PretrainConfig, recon: ReconLoss, device: Device, dp: Arc<DataParallel>) -> Result<Self> {
        let feed = DataFeed::open(
            &config.data.source,
            stream_options(config.data.workers, config.data.shuffle_buffer, config.train.seed, &dp),
            None,
        )?;
        let c = &config;
        let sizes = local_batch(&c.batch, &dp)?;
        let builder = BatchBuilder::new(c, &sizes);
        let rank_seed = dp.rank_seed(c.train.seed);
        let build = move |step: u64, samples: &[Sample]| {
            builder.build(samples, &mut ChaCha8Rng::seed_from_u64(step_seed(rank_seed, step)))
        };
        let batches = BatchQueue::new(feed, sizes.clip, Arc::new(build));
        let schedules = Schedules::new(&c.schedule, c.train.steps)?;
        let grid =
            ReconGrid::new(&c.data.eval_source, c.eval.grid_images, c.model.vision_patch_size, c.data.recon_size);
        let alarm = CollapseAlarm::new(c.dino_head.out_dim, c.schedule.warmup_teacher_temp_steps);
        let trainer = Pretrainer::new(config, recon, device, dp)?;
        let feeds = RankPositions::default();
        Ok(Self { trainer, batches, schedules, grid, feeds, alarm })
    }

    /// The loop settings of this run's config.
    pub fn run_options(&self) -> RunOptions {
        let c = &self.trainer.config;
        RunOptions::from_config(&c.train, &c.log, &c.eval, &c.checkpoint)
    }

    /// The step's scalars: every loss term and diagnostic (the mean over the ranks; with SSL also
    /// `ssl/ln_k`, the uniform targets' entropy), the schedules, the gradient norm, the CLIP temperature.
    fn scalars(&self, losses: &Losses, sv: &ScheduleValues, grad_norm: f64) -> Result<Vec<(String, f64)>> {
        let mut names = vec!["loss/total".to_string()];
        names.extend(losses.terms.iter().map(|(k, _)| format!("loss/{k}")));
        let mut values = vec![losses.total.double_value(&[])];
        values.extend(losses.terms.iter().map(|(_, v)| v.double_value(&[])));
        let mut out: Vec<(String, f64)> = names.into_iter().zip(self.trainer.dp.mean(&values)?).collect();
        let diagnostics: Vec<f64> = losses.diagnostics.iter().map(|(_, v)| *v).collect();
        let names = losses.diagnostics.iter().map(|(k, _)| format!("ssl/{k}"));
        out.extend(names.zip(finite_mean(&self.trainer.dp, &diagnostics)?));
        if !losses.diagnostics.is_empty() {
            out.push(("ssl/ln_k".to_string(), self.alarm.ln_k()));
        }
        out.extend([
            ("lr".to_string(), sv.lr),
            ("wd".to_string(), sv.wd),
            ("momentum".to_string(), sv.momentum),
            ("teacher_temp".to_string(), sv.teacher_temp),
            ("grad_norm".to_string(), grad_norm),
            ("data/skipped_samples".to_string(), self.batches.skipped().total() as f64),
            ("data/wait_s".to_string(), self.batches.wait_s()),
        ]);
        if let Some(s) = &self.trainer.model.logit_scale {
            out.push(("logit_scale".into(), s.exp().double_value(&[])));
        }
        Ok(out)
    }
}

/// The mean over the ranks of each of `values`, leaving out the ranks where it is not finite (the iBOT
/// targets' entropy of a rank without masked patches); NaN where no rank has a finite value.
fn finite_mean(dp: &DataParallel, values: &[f64]) -> Result<Vec<f64>> {
    let mut sums: Vec<f64> = values.iter().map(|v| if v.is_finite() { *v } else { 0.0 }).collect();
    sums.extend(values.iter().map(|v| if v.is_finite() { 1.0 } else { 0.0 }));
    let means = dp.mean(&sums)?;
    let (totals, counts) = means.split_at(values.len());
    Ok(totals.iter().zip(counts).map(|(t, c)| if *c > 0.0 { t / c } else { f64::NAN }).collect())
}

/// This rank's share of the global batch sizes `b` (each divided by the world size).
pub fn local_batch(b: &BatchConfig, dp: &DataParallel) -> Result<BatchConfig> {
    let local = |n: usize, key: &str| dp.local_rows(n as i64).map(|r| r.1 as usize).context(key.to_string());
    Ok(BatchConfig {
        clip: local(b.clip, "batch.clip")?,
        ssl: local(b.ssl, "batch.ssl")?,
        recon: local(b.recon, "batch.recon")?,
    })
}

impl Trainer for PretrainRun {
    fn train_step(&mut self, step: u64) -> Result<StepReport> {
        let seed = step_seed(self.trainer.dp.rank_seed(self.trainer.config.train.seed), step);
        tch::manual_seed(seed as i64);
        let (batch, samples) = self.batches.next(step)?;
        let batch = batch.to_device(self.trainer.model.device());
        let sv = self.schedules.at(step);
        let inject_nan = self.trainer.config.debug.nan_at_steps.contains(&step);
        let (losses, grad_norm, skipped) = self.trainer.step(&batch, &sv, inject_nan)?;
        let images = samples * self.trainer.dp.world();
        let scalars = self.scalars(&losses, &sv, grad_norm)?;
        let entropy = scalars.iter().find(|(k, _)| k == "ssl/dino_target_entropy").map(|(_, v)| *v);
        let warnings = entropy.and_then(|e| self.alarm.observe(step, e)).into_iter().collect();
        Ok(StepReport { scalars, images, skipped, warnings })
    }

    fn evaluate(&mut self, _step: u64) -> Result<Vec<(String, f64)>> {
        let c = &self.trainer.config;
        online_evaluation(&self.trainer.model, &c.data.eval_source, &c.eval, c.data.clip_size, c.data.recon_size)
    }

    fn snapshot(&mut self, step: u64, dir: &Path) -> Result<PathBuf> {
        self.grid.save(&self.trainer.model, step, dir)
    }

    /// Gathers every rank's data position (all ranks, before rank 0 writes a checkpoint).
    fn sync_state(&mut self) -> Result<()> {
        self.feeds = RankPositions::gather(self.batches.position(), &self.trainer.dp)?;
        Ok(())
    }

    fn checkpoint(&self) -> (Vec<(String, Tensor)>, serde_json::Value) {
        let mut state = self.feeds.state(self.batches.position(), &self.trainer.dp);
        state["config"] = serde_json::json!(self.trainer.config);
        (self.trainer.state_tensors(), state)
    }

    /// Restores the weights and this rank's data position (a checkpoint of `W` processes resumes with
    /// `W`: each holds its readers' positions).
    fn restore(&mut self, tensors: &HashMap<String, Tensor>, state: &serde_json::Value) -> Result<()> {
        self.trainer.load_state_tensors(tensors)?;
        let position = RankPositions::saved(state, &self.trainer.dp)?;
        let c = &self.trainer.config;
        self.batches.restart(DataFeed::open(
            &c.data.source,
            stream_options(c.data.workers, c.data.shuffle_buffer, c.train.seed, &self.trainer.dp),
            Some(&position),
        )?);
        Ok(())
    }

    fn export(&self, dir: &Path) -> Result<()> {
        self.trainer.model.save(dir)
    }
}
