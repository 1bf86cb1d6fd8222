//! The optimiser of every trainer (docs/design.md §4.5, "[VTP values not published — DINOv2 / OpenCLIP defaults]"):
//! DINOv2's parameter groups (`get_params_groups_with_decay` + `get_vit_lr_decay_rate`: layer-wise lr decay
//! of the vision trunk, patch-embedding lr multiplier, last-layer flag) with OpenCLIP's weight-decay
//! exclusions, AdamW as `torch.optim.AdamW(fused=True)` (ATen's fused kernel, one pass per tensor:
//! the default) or `torch.optim.AdamW(foreach=False)` (PyTorch's `_single_tensor_adamw`, op for op),
//! each bit for bit on the CPU (non-amsgrad, non-capturable), and `torch.nn.utils.clip_grad_norm_`.
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::ffi::c_void;
use tch::{COptimizer, Tensor};

extern "C" {
    /// `aten.cpp`: one `_fused_adamw_` call over `n` parameters sharing lr and weight decay.
    #[allow(clippy::too_many_arguments)]
    fn vtp_fused_adamw(
        params: *const *mut c_void,
        grads: *const *mut c_void,
        exp_avgs: *const *mut c_void,
        exp_avg_sqs: *const *mut c_void,
        steps: *const *mut c_void,
        n: usize,
        lr: f64,
        beta1: f64,
        beta2: f64,
        weight_decay: f64,
        eps: f64,
    ) -> bool;
}

/// One optimised parameter with its DINOv2 group settings.
#[derive(Debug)]
pub struct ParamSpec {
    /// State-dict name (e.g. `trunk.blocks.3.attn.qkv.weight`); names the optimiser state.
    pub name: String,
    /// The live parameter (a leaf that requires grad), updated in place.
    pub tensor: Tensor,
    /// Learning-rate multiplier (layer decay × patch-embedding multiplier).
    pub lr_mult: f64,
    /// Weight-decay multiplier (0 = no weight decay).
    pub wd_mult: f64,
    /// The DINO head's last layer: it takes the last-layer lr (0 while frozen) instead of the lr.
    pub is_last_layer: bool,
}

/// Trunk-level parameters whose DINOv2 layer id is 0 (embeddings and tokens before the first block).
const EMBEDDING_PARTS: [&str; 5] = [".pos_embed", ".patch_embed", ".mask_token", ".cls_token", ".register_tokens"];

/// DINOv2 `get_vit_lr_decay_rate` for the vision trunk (`trunk.` names); 1 for every other parameter.
fn layer_decay_rate(name: &str, depth: i64, layer_decay: f64) -> f64 {
    let Some(rest) = name.strip_prefix("trunk") else { return 1.0 };
    let layer_id = if EMBEDDING_PARTS.iter().any(|p| rest.contains(p)) || rest.contains(".storage_tokens") {
        0
    } else if let Some(block) = rest.strip_prefix(".blocks.") {
        block.split('.').next().and_then(|i| i.parse::<i64>().ok()).map_or(depth + 1, |i| i + 1)
    } else {
        depth + 1
    };
    layer_decay.powf((depth + 1 - layer_id) as f64)
}

/// No weight decay: DINOv2's `.bias` / `norm` / `gamma` rule plus OpenCLIP's exclusions (`ndim < 2`,
/// `ln_`, `logit_scale`) and the learned tokens and positional embedding. The text `token_embedding`
/// table is a weight matrix and keeps its decay, as in OpenCLIP.
fn excluded_from_weight_decay(name: &str, ndim: usize) -> bool {
    let leaf = name.rsplit('.').next().unwrap_or(name);
    ndim < 2
        || name.ends_with(".bias")
        || ["norm", "gamma", "ln_", "logit_scale", "logit_bias", "positional_embedding"]
            .iter()
            .any(|p| name.contains(p))
        || leaf.contains("token")
}

/// DINOv2's group settings of one parameter: `(lr_mult, wd_mult, is_last_layer)`. Layer-wise lr decay
/// `layer_decay^(depth+1-layer_id)` applies to the vision trunk only (layer id 0 for the patch embedding
/// and tokens, `i+1` for `trunk.blocks.i`, `depth+1` for the rest of the trunk); the patch embedding's lr
/// is further multiplied by `patch_embed_lr_mult`; `wd_mult` is 0 for biases, norms, LayerScale gammas,
/// tokens, logit scale/bias, the positional embedding and any parameter with `ndim < 2`, else 1;
/// `is_last_layer` marks the DINO head's `last_layer`.
pub fn dinov2_multipliers(
    name: &str,
    ndim: usize,
    depth: i64,
    layer_decay: f64,
    patch_embed_lr_mult: f64,
) -> (f64, f64, bool) {
    let mut lr_mult = layer_decay_rate(name, depth, layer_decay);
    if name.contains("patch_embed") {
        lr_mult *= patch_embed_lr_mult;
    }
    let wd_mult = if excluded_from_weight_decay(name, ndim) { 0.0 } else { 1.0 };
    (lr_mult, wd_mult, name.contains("last_layer"))
}

/// The doc of every trainer's `optim.fused` field (a macro: `#[doc = fused_doc!()]` takes no constant).
macro_rules! fused_doc {
    () => {
        "AdamW as ATen's fused kernel, one pass over each tensor [torch: AdamW(fused=True)]; false = \
         PyTorch's single-tensor update op for op [AdamW(foreach=False)]; the same update, rounded differently."
    };
}
pub(crate) use fused_doc;

/// The default of every trainer's `optim.fused`: the fused AdamW kernel.
pub fn fused_by_default() -> bool {
    true
}

/// AdamW hyper-parameters that stay fixed over a run (lr and weight decay come from the schedules).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AdamWConfig {
    /// First-moment decay [DINOv2: 0.9].
    pub beta1: f64,
    /// Second-moment decay [DINOv2: 0.999; OpenCLIP: 0.98].
    pub beta2: f64,
    /// Denominator epsilon [DINOv2: 1e-8; OpenCLIP: 1e-6].
    pub eps: f64,
    /// `true`: ATen's fused kernel (`torch.optim.AdamW(fused=True)`), one pass over each tensor;
    /// `false`: PyTorch's single-tensor update op for op (`foreach=False`). The same update; they
    /// round differently (~1e-7 relative per step).
    pub fused: bool,
}

impl Default for AdamWConfig {
    /// DINOv2's AdamW settings (docs/design.md §4.5), fused.
    fn default() -> Self {
        Self { beta1: 0.9, beta2: 0.999, eps: 1e-8, fused: true }
    }
}

/// One parameter's update in a step: its index, group lr, group weight decay and gradient.
type Update = (usize, f64, f64, Tensor);

/// The bits of (lr, weight decay, step count): the updates one fused call takes together.
type FusedGroup = (u64, u64, u32);

/// Per-parameter AdamW state, as torch keeps it.
#[derive(Debug)]
struct MomentState {
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    /// Updates taken so far; a float32 counter like torch's `state["step"]`.
    step: f32,
}

/// AdamW with per-parameter lr / weight-decay multipliers whose update is bit-identical on the CPU to
/// `torch.optim.AdamW(fused=True)` (or, with `fused = false`, `foreach=False`) with one param group
/// per parameter (group lr `lr * lr_mult`, or `last_layer_lr * lr_mult` for the last layer; group
/// weight decay `wd * wd_mult`). Parameters without a gradient are skipped, their state untouched,
/// as torch does.
#[derive(Debug)]
pub struct AdamW {
    params: Vec<ParamSpec>,
    state: Vec<MomentState>,
    config: AdamWConfig,
    /// libtorch's own optimiser, used only for `zero_grad(set_to_none = true)`, which tch lacks.
    grad_clearer: COptimizer,
}

impl AdamW {
    /// An optimiser over `params` with zero moments.
    pub fn new(params: Vec<ParamSpec>, config: AdamWConfig) -> Self {
        let mut grad_clearer = COptimizer::sgd(0.0, 0.0, 0.0, 0.0, false).expect("libtorch creates an SGD optimiser");
        for p in &params {
            grad_clearer.add_parameters(&p.tensor, 0).expect("libtorch accepts a parameter");
        }
        let state = params
            .iter()
            .map(|p| MomentState { exp_avg: p.tensor.zeros_like(), exp_avg_sq: p.tensor.zeros_like(), step: 0.0 })
            .collect();
        Self { params, state, config, grad_clearer }
    }

    /// One AdamW update of every parameter that has a gradient, with the scheduled `lr`, weight decay `wd`
    /// and `last_layer_lr`.
    pub fn step(&mut self, lr: f64, wd: f64, last_layer_lr: f64) -> Result<()> {
        let config = self.config;
        let mut updates: Vec<Update> = Vec::with_capacity(self.params.len());
        for (i, p) in self.params.iter().enumerate() {
            let grad = p.tensor.grad();
            if grad.defined() {
                let group_lr = if p.is_last_layer { last_layer_lr } else { lr } * p.lr_mult;
                updates.push((i, group_lr, wd * p.wd_mult, grad));
            }
        }
        tch::no_grad(|| {
            if config.fused {
                return self.fused_step(&updates);
            }
            for (i, lr, wd, grad) in &updates {
                adamw_update(&self.params[*i].tensor, grad, &mut self.state[*i], *lr, *wd, &config);
            }
            Ok(())
        })
    }

    /// The fused update: one `_fused_adamw_` call per (lr, weight decay, step) group, which updates
    /// each tensor as a one-parameter group would (torch.optim.AdamW(fused=True) calls it per group).
    fn fused_step(&mut self, updates: &[Update]) -> Result<()> {
        // The updates that share lr, weight decay and step count, in first-seen order.
        let mut groups: Vec<(FusedGroup, Vec<&Update>)> = Vec::new();
        for update in updates {
            let (i, lr, wd, _) = update;
            self.state[*i].step += 1.0;
            let key = (lr.to_bits(), wd.to_bits(), self.state[*i].step.to_bits());
            match groups.iter_mut().find(|(k, _)| *k == key) {
                Some((_, members)) => members.push(update),
                None => groups.push((key, vec![update])),
            }
        }
        let raw = |t: &Tensor| t.as_ptr() as *mut c_void;
        for ((lr, wd, step), members) in groups {
            let (mut params, mut grads, mut exp_avgs, mut exp_avg_sqs, mut steps) =
                (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
            for (i, _, _, grad) in &members {
                let (param, state) = (&self.params[*i].tensor, &self.state[*i]);
                params.push(raw(param));
                grads.push(raw(grad));
                exp_avgs.push(raw(&state.exp_avg));
                exp_avg_sqs.push(raw(&state.exp_avg_sq));
                steps.push(Tensor::from(f32::from_bits(step)).to_device(param.device()));
            }
            let step_ptrs: Vec<*mut c_void> = steps.iter().map(raw).collect();
            let c = &self.config;
            // SAFETY: every pointer is a live tch tensor (`at::Tensor*`) borrowed for the call; the
            // lists have `members.len()` entries each.
            let ok = unsafe {
                vtp_fused_adamw(
                    params.as_ptr(),
                    grads.as_ptr(),
                    exp_avgs.as_ptr(),
                    exp_avg_sqs.as_ptr(),
                    step_ptrs.as_ptr(),
                    members.len(),
                    f64::from_bits(lr),
                    c.beta1,
                    c.beta2,
                    f64::from_bits(wd),
                    c.eps,
                )
            };
            if !ok {
                bail!("libtorch's fused AdamW failed (set optim.fused = false for the single-tensor update)");
            }
        }
        Ok(())
    }

    /// Sets every gradient to undefined (torch's `zero_grad(set_to_none=True)`), so a parameter that gets
    /// no gradient in the next backward pass is skipped by the next `step`.
    pub fn zero_grad(&mut self) {
        self.grad_clearer.zero_grad().expect("libtorch clears the gradients");
    }

    /// The optimised parameters.
    pub fn params(&self) -> &[ParamSpec] {
        &self.params
    }

    /// The optimiser state, named `optim.<param>.exp_avg`, `optim.<param>.exp_avg_sq` and
    /// `optim.<param>.step` (a float32 scalar); the moments share storage with the live state.
    pub fn state_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::with_capacity(3 * self.params.len());
        for (p, s) in self.params.iter().zip(&self.state) {
            out.push((state_key(&p.name, "exp_avg"), s.exp_avg.shallow_clone()));
            out.push((state_key(&p.name, "exp_avg_sq"), s.exp_avg_sq.shallow_clone()));
            out.push((state_key(&p.name, "step"), Tensor::from(s.step)));
        }
        out
    }

    /// Restores the state written by `state_tensors` (moments copied in place, converted to the live
    /// dtype/device); a missing or mis-shaped entry is a one-line error naming every such entry.
    pub fn load_state_tensors(&mut self, map: &HashMap<String, Tensor>) -> Result<()> {
        let mut problems = Vec::new();
        for (p, s) in self.params.iter().zip(&self.state) {
            for (what, live) in [("exp_avg", &s.exp_avg), ("exp_avg_sq", &s.exp_avg_sq)] {
                check_entry(map, &state_key(&p.name, what), &live.size(), &mut problems);
            }
            check_entry(map, &state_key(&p.name, "step"), &[], &mut problems);
        }
        if !problems.is_empty() {
            bail!("optimiser state does not match the parameters: {}", crate::io::name_list(&problems));
        }
        tch::no_grad(|| {
            for (p, s) in self.params.iter().zip(self.state.iter_mut()) {
                s.exp_avg.copy_(&map[&state_key(&p.name, "exp_avg")]);
                s.exp_avg_sq.copy_(&map[&state_key(&p.name, "exp_avg_sq")]);
                s.step = map[&state_key(&p.name, "step")].double_value(&[]) as f32;
            }
        });
        Ok(())
    }
}

/// `optim.<param>.<what>`.
fn state_key(param: &str, what: &str) -> String {
    format!("optim.{param}.{what}")
}

/// Records `key` in `problems` when it is missing from `map` or has another shape than `shape`.
fn check_entry(map: &HashMap<String, Tensor>, key: &str, shape: &[i64], problems: &mut Vec<String>) {
    match map.get(key) {
        None => problems.push(format!("{key} missing")),
        Some(t) if t.size() != shape => problems.push(format!("{key} has shape {:?}, expected {shape:?}", t.size())),
        Some(_) => {}
    }
}

/// PyTorch's `_single_tensor_adam` with `decoupled_weight_decay` (AdamW), op for op: Python-float scalar
/// arithmetic in f64, tensor ops in the parameter's dtype. tch's `addcmul_` / `addcdiv_` take no `value`;
/// the CPU kernels compute `self + value * t1 * t2` and `self + value * t1 / t2` left to right, so
/// pre-scaling `t1` by `value` (rounded exactly as the kernel rounds `value * t1`) gives the same bits.
/// (torch's CUDA `addcdiv` computes `self + value * (t1 / t2)`, so on a GPU the update agrees to rounding.)
fn adamw_update(param: &Tensor, grad: &Tensor, s: &mut MomentState, lr: f64, wd: f64, c: &AdamWConfig) {
    let mut param = param.shallow_clone();
    s.step += 1.0;
    if wd != 0.0 {
        let _ = param.g_mul_scalar_(1.0 - lr * wd);
    }
    let _ = s.exp_avg.lerp_(grad, 1.0 - c.beta1);
    let _ = s.exp_avg_sq.g_mul_scalar_(c.beta2).addcmul_(&grad.g_mul_scalar(1.0 - c.beta2), grad);
    let step = f64::from(s.step);
    let bias_correction1 = 1.0 - c.beta1.powf(step);
    let bias_correction2 = 1.0 - c.beta2.powf(step);
    let step_size = lr / bias_correction1;
    let bias_correction2_sqrt = bias_correction2.powf(0.5);
    let denom = s.exp_avg_sq.sqrt().g_div_scalar(bias_correction2_sqrt).g_add_scalar(c.eps);
    let _ = param.addcdiv_(&s.exp_avg.g_mul_scalar(-step_size), &denom);
}

/// The [`ParamSpec`]s of `named` parameters with [`dinov2_multipliers`] (trunk depth `depth`), sorted
/// by name.
pub fn dinov2_param_specs(
    named: impl IntoIterator<Item = (String, Tensor)>,
    depth: i64,
    layer_decay: f64,
    patch_embed_lr_mult: f64,
) -> Vec<ParamSpec> {
    let mut named: Vec<(String, Tensor)> = named.into_iter().collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    named
        .into_iter()
        .map(|(name, tensor)| {
            let (lr_mult, wd_mult, is_last_layer) =
                dinov2_multipliers(&name, tensor.dim(), depth, layer_decay, patch_embed_lr_mult);
            ParamSpec { name, tensor, lr_mult, wd_mult, is_last_layer }
        })
        .collect()
}

/// `torch.nn.utils.clip_grad_norm_(params, max_norm)` (L2; the CPU op sequence, where torch's `_foreach_norm`
/// is the per-tensor norm; its CUDA kernel reduces in another order): the norm of the stacked
/// per-gradient norms, then every gradient multiplied in place by `min(max_norm / (norm + 1e-6), 1)` (skipped when exactly 1).
/// Parameters without a gradient are ignored. Returns the total norm before clipping (0 with no
/// gradients); a non-finite norm is returned as is (the gradients are then scaled by NaN, as in torch).
pub fn clip_grad_norm(params: &[Tensor], max_norm: f64) -> f64 {
    tch::no_grad(|| {
        let grads: Vec<Tensor> = params.iter().map(Tensor::grad).filter(Tensor::defined).collect();
        if grads.is_empty() {
            return 0.0;
        }
        let norms: Vec<Tensor> = grads.iter().map(Tensor::norm).collect();
        let total = Tensor::stack(&norms, 0).norm();
        let coef = total.g_add_scalar(1e-6).reciprocal().g_mul_scalar(max_norm).clamp_max(1.0);
        // torch multiplies by a coefficient of exactly 1 too (every norm below the threshold, or no
        // threshold): the same bits, so that pass over every gradient is skipped here.
        if coef.double_value(&[]) != 1.0 {
            for mut g in grads {
                let _ = g.g_mul_(&coef);
            }
        }
        total.double_value(&[])
    })
}
