//! Stage 2, `vtp finetune-decoder` (docs/design.md §4.7): the visual tokenizer (encoder + bottleneck, hence the
//! latent space) is frozen and only the pixel decoder is trained, with LightningDiT's / LDM's
//! `LPIPSWithDiscriminator` objective ([`super::discriminator`]):
//! `L_G = L1 + w_p·LPIPS + w·disc_factor·(−mean D(x̂))` on the decoder and the hinge loss on a
//! PatchGAN discriminator, each with its own AdamW, on the shared run loop ([`super::run`]).
//!
//! One step: latents of the batch under no_grad, the decoder's reconstruction `x̂`, the generator
//! loss and its backward (decoder gradients only reach the decoder's AdamW), then, from
//! `loss.disc_start` on, the discriminator's hinge loss on `x` and `x̂.detach()` and its backward.
//! Both updates are applied only when every loss and gradient norm is finite, so a skipped step
//! changes nothing. (The reference trains with Lightning's two-optimiser loop, which re-decodes the
//! batch with the just-updated decoder for the discriminator step; here the discriminator sees the
//! step's own reconstruction, the common manual-optimisation variant, which keeps steps atomic.)
//! Before `disc_start` the adversarial term and the discriminator step are skipped altogether (the
//! reference multiplies them by `disc_factor = 0`, which leaves every weight where it is).
pub mod config;
pub mod discriminator;

use super::checkpoint::restore_into;
use super::feed::{stream_options, BatchQueue, DataFeed, RankPositions};
use super::online::{online_evaluation, ReconGrid};
use super::optim::{dinov2_param_specs, AdamW, AdamWConfig};
use super::precision::f32;
use super::pretrain::batch::render;
use super::pretrain::objectives::recon::ReconLoss;
use super::run::{RunOptions, StepReport, Trainer};
use super::schedule::CosineScheduler;
use super::step::{guarded_backward, step_seed};
use crate::data::augment::{Augment, ReconCrop};
use crate::data::Sample;
use crate::dist::DataParallel;
use crate::model::fingerprint::tensors_fingerprint;
use crate::model::VtpModel;
use anyhow::{bail, Context, Result};
use config::FinetuneConfig;
use discriminator::{adaptive_weight, generator_loss, hinge_d_loss, NLayerDiscriminator};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tch::{nn, Kind, Tensor};

/// Prefix of the trained parameters' official names: the pixel decoder.
pub const DECODER_PREFIX: &str = "pixel_decoder.";

/// The decoder's last layer, on which the adaptive weight is computed (docs/design.md §1.4: the final 1×1 conv).
pub const LAST_LAYER: &str = "pixel_decoder.proj_out.weight";

/// The generator side of one step: its loss and named terms (scalars).
pub struct GeneratorLosses {
    pub total: Tensor,
    pub terms: Vec<(&'static str, Tensor)>,
}

/// What one step computed, for its report.
pub struct StepOutcome {
    pub generator: GeneratorLosses,
    /// `(d_loss, mean D(x), mean D(x̂))` from `disc_start` on.
    pub disc: Option<(Tensor, Tensor, Tensor)>,
    pub grad_norm: f64,
    pub disc_grad_norm: f64,
    pub skipped: bool,
}

/// `vtp finetune-decoder`'s run: the frozen tokenizer, its trained decoder, the discriminator, the
/// two optimisers and the data feed.
pub struct FinetuneRun {
    pub config: FinetuneConfig,
    pub model: VtpModel,
    /// The discriminator's store (not part of the released tokenizer).
    pub disc_vs: nn::VarStore,
    pub disc: NLayerDiscriminator,
    recon: ReconLoss,
    decoder_optim: AdamW,
    disc_optim: AdamW,
    last_layer: Tensor,
    lr: CosineScheduler,
    /// The data feed and the crops, one step ahead on a thread of their own.
    batches: BatchQueue<Tensor>,
    grid: ReconGrid,
    /// A checksum of the frozen weights, stored in checkpoints: a resume must load the same tokenizer.
    frozen_fingerprint: String,
    /// This process's place in the job and every rank's data position.
    dp: Arc<DataParallel>,
    feeds: RankPositions,
}

/// The model's parameters whose name starts (or not, `!decoder`) with [`DECODER_PREFIX`], sorted.
fn named_parameters(model: &VtpModel, decoder: bool) -> Vec<(String, Tensor)> {
    let mut named: Vec<(String, Tensor)> =
        model.vs.variables().into_iter().filter(|(k, _)| k.starts_with(DECODER_PREFIX) == decoder).collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    named
}

/// Every tensor of a store, sorted by name.
fn sorted_variables(vs: &nn::VarStore) -> Vec<(String, Tensor)> {
    let mut named: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    named
}

/// An AdamW over `named` (weight decay off for biases, norms and vectors, as in pre-training).
fn adamw(named: Vec<(String, Tensor)>, config: AdamWConfig) -> AdamW {
    AdamW::new(dinov2_param_specs(named, 0, 1.0, 1.0), config)
}

impl FinetuneRun {
    /// A fresh run of `config` on the tokenizer `model` with the reconstruction loss `recon`: the
    /// encoder, bottleneck and every other non-decoder weight frozen, the discriminator seeded by
    /// `train.seed`; over several processes (`dp`) each rank reads its slice of the data and takes
    /// `batch.size / world` images a step, all starting from rank 0's decoder and discriminator.
    pub fn new(config: FinetuneConfig, model: VtpModel, recon: ReconLoss, dp: Arc<DataParallel>) -> Result<Self> {
        check_model(&config, &model)?;
        let local_batch = dp.local_rows(config.batch.size as i64).context("batch.size")?.1 as usize;
        let frozen = named_parameters(&model, false);
        for (_, t) in &frozen {
            let _ = t.set_requires_grad(false);
        }
        let frozen_fingerprint = tensors_fingerprint(&frozen)?;
        tch::manual_seed(config.train.seed as i64);
        let disc_vs = nn::VarStore::new(model.device());
        let l = &config.loss;
        let disc = NLayerDiscriminator::new(&disc_vs.root() / "discriminator", 3, l.disc_channels, l.disc_layers);
        let d_out = disc.output_size(config.data.recon_size);
        if d_out < 1 {
            bail!(
                "data.recon_size = {} is too small for a {}-layer discriminator (its output would be {d_out} pixels)",
                config.data.recon_size,
                l.disc_layers
            );
        }
        let adam = config.optim.adamw();
        let decoder_optim = adamw(named_parameters(&model, true), adam);
        let disc_optim = adamw(sorted_variables(&disc_vs), adam);
        let last_layer = model.vs.variables().remove(LAST_LAYER).context("the model has no pixel decoder")?;
        let trained: Vec<Tensor> =
            named_parameters(&model, true).into_iter().chain(sorted_variables(&disc_vs)).map(|(_, t)| t).collect();
        dp.broadcast_from_main(&trained)?;
        let feed = DataFeed::open(
            &config.data.source,
            stream_options(config.data.workers, config.data.shuffle_buffer, config.train.seed, &dp),
            None,
        )?;
        let crop = ReconCrop::new(config.data.recon_size);
        let rank_seed = dp.rank_seed(config.train.seed);
        let build = move |step: u64, samples: &[Sample]| {
            let mut rng = ChaCha8Rng::seed_from_u64(step_seed(rank_seed, step));
            render(samples.iter().collect(), &mut rng, |s, r| crop.apply(&s.image, r))
        };
        let batches = BatchQueue::new(feed, local_batch, Arc::new(build));
        let (data, eval) = (&config.data, &config.eval);
        let grid = ReconGrid::new(&data.eval_source, eval.grid_images, model.config.vision_patch_size, data.recon_size);
        Ok(Self {
            lr: config.lr_schedule()?,
            config,
            model,
            disc_vs,
            disc,
            recon,
            decoder_optim,
            disc_optim,
            last_layer,
            batches,
            grid,
            frozen_fingerprint,
            dp,
            feeds: RankPositions::default(),
        })
    }

    /// The loop settings of this run's config.
    pub fn run_options(&self) -> RunOptions {
        self.config.run_options()
    }

    /// The generator loss of the reconstruction `x̂` of `images`: `L_rec = L1 + w_p·LPIPS`, plus the
    /// adaptively weighted `−mean D(x̂)` when `adversarial`.
    fn generator_losses(&self, images: &Tensor, recon: &Tensor, adversarial: bool) -> Result<GeneratorLosses> {
        let l = &self.config.loss;
        let r = self.recon.forward(images, recon)?;
        // Out of place: `r.l1` is reported as its own term.
        let rec = match &r.lpips {
            Some(p) => &r.l1 + p * l.perceptual_weight,
            None => r.l1.shallow_clone(),
        };
        let mut terms = vec![("rec_l1", r.l1)];
        terms.extend(r.lpips.map(|p| ("rec_lpips", p)));
        terms.push(("rec", rec.shallow_clone()));
        if !adversarial {
            return Ok(GeneratorLosses { total: rec, terms });
        }
        let g = generator_loss(&self.discriminate(recon)?);
        let w = adaptive_weight(&rec, &g, &self.last_layer, l.disc_weight);
        let total = &rec + &w * &g;
        terms.push(("g", g));
        terms.push(("d_weight", w));
        Ok(GeneratorLosses { total, terms })
    }

    /// Runs a forward pass in the run's precision (`train.precision`).
    fn amp<T>(&self, forward: impl FnOnce() -> T) -> Result<T> {
        self.config.train.precision.autocast(self.model.device(), forward)
    }

    /// The discriminator's logits of `images`, in f32.
    fn discriminate(&self, images: &Tensor) -> Result<Tensor> {
        Ok(f32(&self.amp(|| self.disc.forward(images))?))
    }

    /// The discriminator's hinge loss on real `images` and detached `fake`s, and its mean logits.
    fn disc_losses(&self, images: &Tensor, fake: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let (real, fake) = (self.discriminate(images)?, self.discriminate(fake)?);
        Ok((hinge_d_loss(&real, &fake), real.mean(Kind::Float), fake.mean(Kind::Float)))
    }

    /// `loss` (a scalar) averaged over the ranks: every rank then decides alike whether to step.
    fn mean_over_ranks(&self, loss: &Tensor) -> Result<f64> {
        Ok(self.dp.mean(&[loss.double_value(&[])])?[0])
    }

    /// One step on `images` (this rank's share) at `step` with learning rate `lr` (see the module
    /// doc), gradients averaged over the ranks; `inject_nan` (tests) makes the generator loss NaN. The
    /// adaptive GAN weight is each rank's own, as in taming-transformers under DDP.
    pub fn step(&mut self, images: &Tensor, step: u64, lr: f64, inject_nan: bool) -> Result<StepOutcome> {
        let adversarial = step >= self.config.loss.disc_start;
        let max_norm = self.config.optim.clip_grad;
        self.decoder_optim.zero_grad();
        let recon = f32(&self.amp(|| {
            let latents = tch::no_grad(|| self.model.get_reconstruction_latents(images))?;
            self.model.get_latents_decoded_images(&latents)
        })??);
        let mut generator = self.generator_losses(images, &recon, adversarial)?;
        if inject_nan {
            generator.total = &generator.total * f64::NAN;
        }
        let (loss, decoder_params) = (&generator.total, params(&self.decoder_optim));
        let grad_norm = guarded_backward(loss, self.mean_over_ranks(loss)?, &decoder_params, max_norm, &self.dp, None)?;
        // The generator's backward also reached the discriminator: those gradients are dropped.
        self.disc_optim.zero_grad();
        let disc = adversarial.then(|| self.disc_losses(images, &recon.detach())).transpose()?;
        let mut disc_grad_norm = 0.0;
        if let Some((d_loss, _, _)) = &disc {
            let disc_params = params(&self.disc_optim);
            disc_grad_norm =
                guarded_backward(d_loss, self.mean_over_ranks(d_loss)?, &disc_params, max_norm, &self.dp, None)?;
        }
        let skipped = !grad_norm.is_finite() || !disc_grad_norm.is_finite();
        if skipped {
            self.decoder_optim.zero_grad();
            self.disc_optim.zero_grad();
        } else {
            let wd = self.config.optim.weight_decay;
            self.decoder_optim.step(lr, wd, lr)?;
            if adversarial {
                let disc_lr = lr * self.config.optim.disc_lr_mult;
                self.disc_optim.step(disc_lr, wd, disc_lr)?;
            }
        }
        Ok(StepOutcome { generator, disc, grad_norm, disc_grad_norm, skipped })
    }

    /// The step's scalars: every loss term and the discriminator's logits (means over the ranks), lr
    /// and gradient norms.
    fn scalars(&self, o: &StepOutcome, lr: f64) -> Result<Vec<(String, f64)>> {
        let mut terms: Vec<(String, &Tensor)> = vec![("loss/total".to_string(), &o.generator.total)];
        for (k, v) in &o.generator.terms {
            terms.push((if *k == "d_weight" { k.to_string() } else { format!("loss/{k}") }, v));
        }
        if let Some((d, real, fake)) = &o.disc {
            terms.extend([("loss/d".into(), d), ("disc/logits_real".into(), real), ("disc/logits_fake".into(), fake)]);
        }
        let values: Vec<f64> = terms.iter().map(|(_, t)| t.double_value(&[])).collect();
        let mut out: Vec<(String, f64)> = terms.into_iter().map(|(k, _)| k).zip(self.dp.mean(&values)?).collect();
        if o.disc.is_some() {
            out.push(("disc_grad_norm".into(), o.disc_grad_norm));
        }
        out.push(("lr".into(), lr));
        out.push(("grad_norm".into(), o.grad_norm));
        out.push(("data/skipped_samples".into(), self.batches.skipped().total() as f64));
        out.push(("data/wait_s".into(), self.batches.wait_s()));
        Ok(out)
    }

    /// Every tensor a checkpoint holds: the decoder, the discriminator and both optimisers' moments.
    fn state_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = named_parameters(&self.model, true);
        out.extend(sorted_variables(&self.disc_vs));
        out.extend(self.decoder_optim.state_tensors());
        out.extend(self.disc_optim.state_tensors());
        out
    }
}

/// The optimised tensors of `optim`.
fn params(optim: &AdamW) -> Vec<Tensor> {
    optim.params().iter().map(|p| p.tensor.shallow_clone()).collect()
}

/// The model-dependent checks: a pixel decoder, a crop that is a multiple of the patch size.
fn check_model(config: &FinetuneConfig, model: &VtpModel) -> Result<()> {
    if model.pixel_decoder.is_none() {
        bail!("model '{}' has no pixel decoder (train_reconstruction = false)", config.model);
    }
    let (p, s) = (model.config.vision_patch_size, config.data.recon_size);
    if s < p || s % p != 0 {
        bail!("data.recon_size = {s} must be a positive multiple of the patch size {p}");
    }
    Ok(())
}

impl Trainer for FinetuneRun {
    fn train_step(&mut self, step: u64) -> Result<StepReport> {
        let seed = step_seed(self.dp.rank_seed(self.config.train.seed), step);
        tch::manual_seed(seed as i64);
        let (images, samples) = self.batches.next(step)?;
        let lr = self.lr.value(step);
        let inject_nan = self.config.debug.nan_at_steps.contains(&step);
        let outcome = self.step(&images.to_device(self.model.device()), step, lr, inject_nan)?;
        let images = samples * self.dp.world();
        Ok(StepReport { scalars: self.scalars(&outcome, lr)?, images, skipped: outcome.skipped, warnings: Vec::new() })
    }

    fn evaluate(&mut self, _step: u64) -> Result<Vec<(String, f64)>> {
        let c = &self.config;
        online_evaluation(&self.model, &c.data.eval_source, &c.eval, c.data.recon_size, c.data.recon_size)
    }

    fn snapshot(&mut self, step: u64, dir: &Path) -> Result<PathBuf> {
        self.grid.save(&self.model, step, dir)
    }

    /// Gathers every rank's data position (all ranks, before rank 0 writes a checkpoint).
    fn sync_state(&mut self) -> Result<()> {
        self.feeds = RankPositions::gather(self.batches.position(), &self.dp)?;
        Ok(())
    }

    fn checkpoint(&self) -> (Vec<(String, Tensor)>, serde_json::Value) {
        let mut state = self.feeds.state(self.batches.position(), &self.dp);
        state["config"] = serde_json::json!(self.config);
        state["frozen_fingerprint"] = serde_json::json!(self.frozen_fingerprint);
        (self.state_tensors(), state)
    }

    fn restore(&mut self, tensors: &HashMap<String, Tensor>, state: &serde_json::Value) -> Result<()> {
        if state["frozen_fingerprint"].as_str() != Some(self.frozen_fingerprint.as_str()) {
            bail!("--resume: the checkpoint was trained on another tokenizer than '{}'", self.config.model);
        }
        let mut live = named_parameters(&self.model, true);
        live.extend(sorted_variables(&self.disc_vs));
        restore_into(&live, tensors, "")?;
        self.decoder_optim.load_state_tensors(tensors)?;
        self.disc_optim.load_state_tensors(tensors)?;
        let position = RankPositions::saved(state, &self.dp)?;
        let c = &self.config;
        let feed = DataFeed::open(
            &c.data.source,
            stream_options(c.data.workers, c.data.shuffle_buffer, c.train.seed, &self.dp),
            Some(&position),
        )?;
        self.batches.restart(feed);
        Ok(())
    }

    fn export(&self, dir: &Path) -> Result<()> {
        self.model.save(dir)
    }
}
