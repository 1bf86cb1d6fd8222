#!/usr/bin/env python3
"""Plain-PyTorch VTP pre-training step (docs/design.md §4), the reference of `vtp`'s `Pretrainer::step`.

One `all`-objectives step, written from the spec and the libraries it names, on the model of
../shared/bench/pytorch_vtp.py (its trunk has no iBOT masks, so the masked forward is rebuilt here
from its submodules, as DINOv3's `prepare_tokens_with_masks` does):
  * CLIP: OpenCLIP `ClipLoss` (world size 1) on `F.normalize(visual_proj(CLS))` and the text tower,
    `logit_scale.exp()`; the log-scale clamped to [0, ln 100] after the optimiser step.
  * SSL (DINOv2 `ssl_meta_arch`): EMA teacher (trunk, no mask) on the global crops, CLS chunks swapped;
    the DINO head (3-layer MLP, exact GELU, `F.normalize(eps=1e-12)`, `nn.utils.weight_norm` last layer
    = `torch._weight_norm(v, g, 0)`) on CLS + masked patches; centred targets with the centres from
    before the step, then the centre EMAs (or Sinkhorn-Knopp, 3 iterations, B = rows / masked
    patches); DINO local / global terms over `n_global_terms + n_local_terms`, global ×2; iBOT with `masks_weight` / number of global crops,
    ×2 ×(1/2); KoLeo per global crop on the student's final-norm CLS tokens (pre-head).
  * Reconstruction: trunk → 64-d bottleneck → pixel decoder, mean L1 on the normalised images (no LPIPS).
  * `L = λ_clip·clip + λ_ssl·(w_dino·dino + w_ibot·ibot + w_koleo·koleo) + λ_rec·rec`.
  * `clip_grad_norm_` over the parameters in name order, `torch.optim.AdamW(fused=True)` (vtp's `optim.fused`; else `foreach=False`) with one
    group per parameter (DINOv2 `get_params_groups_with_decay` + `get_vit_lr_decay_rate`, mirrored in
    `multipliers`), lr = (last_layer_lr if last layer else lr) · lr_mult, wd = wd · wd_mult; then the
    teacher EMA as DINOv2 writes it (`_foreach_mul_`, `_foreach_add_(alpha=1-m)`).

Modes:
  --setup DIR   parity (tests/train_step_parity.rs): reads DIR/setup.json (the run's PretrainConfig and
                the schedule values of each step), DIR/init.safetensors (student, teacher, centres) and
                DIR/batch.safetensors; runs one step per schedule entry on that batch; writes
                DIR/out.safetensors: `loss.<i>.<term>`, `grad_norm.<i>`, and the final `student.*`,
                `teacher.*`, `optim.*.{exp_avg,exp_avg_sq,step}`, `dino.center`, `ibot.center`.
  --bench       timing (scripts/bench_train.sh): random weights and batch at the given preset and sizes,
                median seconds per step, peak RSS; one JSON line in `vtp bench`'s format.
                `--precision bf16` runs every forward pass (student, teacher) under
                `torch.autocast("cpu", dtype=torch.bfloat16)` and the losses in f32 (outputs `.float()`).
                Data parallel under `torchrun --nproc-per-node W ... --bench` (WORLD_SIZE > 1): Gloo,
                `--batch*` are the global sizes, each rank steps on its own random share (seed + 1 + rank)
                with the student (model + DINO head) in `DistributedDataParallel`; the losses are global
                as OpenCLIP / DINOv2 compute them under DDP: CLIP `ClipLoss(local_loss=True,
                gather_with_grad=True)`, DINO / iBOT centre updates and Sinkhorn-Knopp sums all-reduced
                (DINOv2 `update_center`, `sinkhorn_knopp_teacher`), KoLeo per rank. Rank 0 prints the line
                (`world`, `img_per_s` = global CLIP batch / rank 0's median step time).
"""
import argparse, contextlib, json, math, os, resource, statistics, sys, time, warnings

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.distributed as dist

HERE = os.path.dirname(os.path.abspath(__file__))
N_GLOBAL = 2
LOSS_SCALES = 2
KOLEO_EPS = 1e-8
EMBEDDING_PARTS = (".pos_embed", ".patch_embed", ".mask_token", ".cls_token", ".register_tokens")
NO_WD_PARTS = ("norm", "gamma", "ln_", "logit_scale", "logit_bias", "positional_embedding")


# ------------------------------------------------------------------------------------------- model
class DinoHead(nn.Module):
    """DINOv2 `DINOHead` (nlayers 3, no BN): keys `mlp.{0,2,4}.*`, `last_layer.weight_{g,v}`."""

    def __init__(self, in_dim, hidden, bottleneck, out_dim):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                                 nn.Linear(hidden, bottleneck))
        self.last_layer = nn.Module()
        self.last_layer.weight_g = nn.Parameter(torch.ones(out_dim, 1))
        self.last_layer.weight_v = nn.Parameter(torch.empty(out_dim, bottleneck))
        nn.init.uniform_(self.last_layer.weight_v, -bottleneck ** -0.5, bottleneck ** -0.5)

    def forward(self, x):
        x = F.normalize(self.mlp(x), dim=-1, p=2, eps=1e-12)
        return F.linear(x, torch._weight_norm(self.last_layer.weight_v, self.last_layer.weight_g, 0))


def trunk_forward(pv, trunk, img, masks=None, use_bottleneck=False):
    """The trunk with iBOT masks (masked patch tokens become `mask_token`): final-norm (cls, patches),
    both through `feature_bottleneck` when `use_bottleneck`."""
    x = trunk.patch_embed.proj(img)
    h, w = x.shape[-2:]
    x = x.flatten(2).transpose(1, 2)
    if masks is not None:
        x = torch.where(masks.unsqueeze(-1), trunk.mask_token.to(x.dtype).unsqueeze(0), x)
    x = torch.cat([trunk.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
    rope = pv.rope_sincos(h, w, trunk.head_dim, img.device)
    for blk in trunk.blocks:
        x = blk(x, rope)
    x = trunk.norm(x)
    cls, patches = x[:, 0], x[:, 1:]
    if use_bottleneck and trunk.feature_bottleneck is not None:
        cls, patches = trunk.feature_bottleneck(cls), trunk.feature_bottleneck(patches)
    return cls, patches, (h, w)


class Teacher(nn.Module):
    """The EMA teacher: trunk, `visual_proj` (unused by the losses) and DINO head, student names."""

    def __init__(self, pv, c, head_cfg):
        super().__init__()
        self.trunk = pv.Trunk(c)
        in_dim = c["vision_embed_dim"] if c["vision_bottleneck_ae_only"] else c["vision_feature_bottleneck"]
        if c["train_clip"]:
            self.visual_proj = nn.Linear(in_dim, c["text_embed_dim"], bias=False)
        self.dino_head = make_head(in_dim, head_cfg)
        for p in self.parameters():
            p.requires_grad_(False)


def make_head(in_dim, h):
    return DinoHead(in_dim, h["hidden_dim"], h["bottleneck_dim"], h["out_dim"])


# ------------------------------------------------------------------------------------------ losses
def softmax_centered(t, center, temp):
    return F.softmax((t - center) / temp, dim=-1)


def center_ema(center, batch_sum, count, m):
    return center * m + (batch_sum / count) * (1 - m)


def sinkhorn_knopp(t, temp, n_samples, n_iterations=3):
    """DINOv2 `sinkhorn_knopp_teacher` (world size 1)."""
    q = torch.exp(t.float() / temp).t()
    k = q.shape[0]
    q /= torch.sum(q)
    for _ in range(n_iterations):
        q /= torch.sum(q, dim=1, keepdim=True)
        q /= k
        q /= torch.sum(q, dim=0, keepdim=True)
        q /= n_samples
    q *= n_samples
    return q.t()


def sinkhorn_knopp_dist(t, temp, n_samples, n_iterations=3):
    """DINOv2 `sinkhorn_knopp_teacher` under DDP: the total and row sums all-reduced, `n_samples` the
    global count of columns."""
    q = torch.exp(t.float() / temp).t()
    k = q.shape[0]
    sum_q = torch.sum(q)
    dist.all_reduce(sum_q)
    q /= sum_q
    for _ in range(n_iterations):
        sum_of_rows = torch.sum(q, dim=1, keepdim=True)
        dist.all_reduce(sum_of_rows)
        q /= sum_of_rows
        q /= k
        q /= torch.sum(q, dim=0, keepdim=True)
        q /= n_samples
    q *= n_samples
    return q.t()


def dino_forward(student_chunks, teacher_chunks, student_temp):
    """DINOv2 `DINOLoss.forward`."""
    total = 0
    for s in student_chunks:
        lsm = F.log_softmax(s / student_temp, dim=-1)
        for t in teacher_chunks:
            total = total - torch.sum(t * lsm, dim=-1).mean()
    return total


def koleo(x):
    """DINOv2 `KoLeoLoss`."""
    x = F.normalize(x, eps=KOLEO_EPS, p=2, dim=-1)
    with torch.no_grad():
        dots = torch.mm(x, x.t())
        dots.view(-1)[:: (x.shape[0] + 1)].fill_(-1)
        nn_index = dots.max(dim=1)[1]
    d = F.pairwise_distance(x, x[nn_index], p=2, eps=KOLEO_EPS)
    return -torch.log(d + KOLEO_EPS).mean()


class State:
    """Everything one step reads and updates: student (model + head), teacher, centres, optimiser.
    `world` > 1: this is rank `rank` of a data-parallel job (the collectives of the global losses);
    `loss_fn` is what `step` calls for (total, terms): `losses`, or the DDP-wrapped `Student`."""

    def __init__(self, pv, cfg, model, head, teacher, world=1, rank=0, bf16=False):
        self.pv, self.cfg, self.model, self.head, self.teacher = pv, cfg, model, head, teacher
        self.world, self.rank, self.bf16 = world, rank, bf16
        self.merge = cfg["loss"].get("merge_trunk_passes", False)
        self.loss_fn = self.losses
        self.profile, self.t = None, 0.0  # --profile: {phase: [seconds per step]}, the phase's start
        k = cfg["dino_head"]["out_dim"]
        self.dino_center, self.ibot_center = torch.zeros(1, k), torch.zeros(1, 1, k)
        self.named = sorted(student_parameters(model, head).items())
        o, depth = cfg["optim"], cfg["model"]["vision_depth"]
        self.mults = [multipliers(n, p.dim(), depth, o["layer_decay"], o["patch_embed_lr_mult"]) for n, p in self.named]
        # vtp's `optim.fused` (its default): the fused kernel, else the single-tensor update.
        kernel = {"fused": True} if o.get("fused", False) else {"foreach": False}
        self.opt = torch.optim.AdamW([{"params": [p]} for _, p in self.named], lr=0.0, betas=(o["beta1"], o["beta2"]),
                                     eps=o["eps"], weight_decay=0.0, **kernel)

    def lap(self, phase):
        """--profile: records the time since the last lap under `phase` (the phases of `vtp bench --profile`)."""
        if self.profile is not None:
            now = time.perf_counter()
            self.profile.setdefault(phase, []).append(now - self.t)
            self.t = now

    def wide(self):
        return not self.cfg["model"]["vision_bottleneck_ae_only"]

    def fwd(self):
        """The context of a forward pass: bf16 autocast with `--precision bf16`, else nothing (the
        outputs are `.float()`-ed before the losses, a no-op in f32)."""
        return torch.autocast("cpu", dtype=torch.bfloat16) if self.bf16 else contextlib.nullcontext()

    def student_features(self, b):
        """The student trunk's (cls, patches, grid) of the CLIP images, the global crops (iBOT-masked), the
        local crops and the reconstruction images: one trunk pass each (the legacy meta-arch), or with
        `merge` (vtp's `loss.merge_trunk_passes`) one pass over every group of the same image size, split
        back by rows, the bottleneck applied to the rows that ask for it (vtp's `train::passes`)."""
        wide, trunk = self.wide(), self.model.trunk
        passes = [("clip", b["clip_images"], None, wide), ("global", b["global"], b["masks"], wide),
                  ("local", b["local"], None, wide), ("recon", b["recon"], None, True)]
        groups = []
        for p in passes:
            group = next((g for g in groups if self.merge and g[0][1].shape[1:] == p[1].shape[1:]), None)
            groups.append([p]) if group is None else group.append(p)
        out = {}
        with self.fwd():
            for group in groups:
                if len(group) == 1:
                    name, images, masks, bottleneck = group[0]
                    out[name] = trunk_forward(self.pv, trunk, images, masks, bottleneck)
                    continue
                masks = None
                if any(m is not None for _, _, m, _ in group):
                    n = next(m for _, _, m, _ in group if m is not None).shape[1]
                    masks = torch.cat([m if m is not None else torch.zeros(x.shape[0], n, dtype=torch.bool)
                                       for _, x, m, _ in group])
                cls, patches, grid = trunk_forward(self.pv, trunk, torch.cat([x for _, x, _, _ in group]), masks, False)
                start = 0
                for name, x, _, bottleneck in group:
                    c, p = cls[start:start + x.shape[0]], patches[start:start + x.shape[0]]
                    start += x.shape[0]
                    if bottleneck and trunk.feature_bottleneck is not None:
                        c, p = trunk.feature_bottleneck(c), trunk.feature_bottleneck(p)
                    out[name] = (c, p, grid)
        return out

    def clip_loss(self, features, tokens):
        m = self.model
        with self.fwd():
            cls, patches, _ = features
            feat = cls if m.c["vision_clip_feat"] == "cls" else patches.mean(1)
            image_out = m.visual_proj(feat)
        image_features = F.normalize(image_out.float(), dim=-1)
        with self.fwd():
            text_out = m.get_clip_text_feature(tokens, normalize=False)
        text_features = F.normalize(text_out.float(), dim=-1)
        s = m.logit_scale.exp()
        if self.world > 1:
            # OpenCLIP `ClipLoss(local_loss=True, gather_with_grad=True)`: this rank's rows against
            # every rank's features, gathered with gradients.
            all_image = torch.cat(torch.distributed.nn.functional.all_gather(image_features), dim=0)
            all_text = torch.cat(torch.distributed.nn.functional.all_gather(text_features), dim=0)
            logits_per_image = s * image_features @ all_text.T
            logits_per_text = s * text_features @ all_image.T
            labels = torch.arange(logits_per_image.shape[0]) + self.rank * logits_per_image.shape[0]
        else:
            logits_per_image = s * image_features @ text_features.T
            logits_per_text = s * text_features @ image_features.T
            labels = torch.arange(logits_per_image.shape[0])
        return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2

    def ssl_losses(self, b, student, teacher_temp):
        l, idx, masks = self.cfg["loss"], b["mask_indices_list"], b["masks"]
        with torch.no_grad():
            with self.fwd():
                t_cls, t_patches, _ = trunk_forward(self.pv, self.teacher.trunk, b["global"], None, self.wide())
                chunks = t_cls.chunk(N_GLOBAL)
                cls = torch.cat([chunks[1], chunks[0]])
                patches = t_patches.flatten(0, 1).index_select(0, idx)
                logits = self.teacher.dino_head(torch.cat([cls, patches]))
            logits = logits.float()
            cls_logits, patch_logits = logits[: cls.shape[0]], logits[cls.shape[0]:]
            dino_targets, ibot_targets = self.teacher_targets(cls_logits, patch_logits, teacher_temp)
        (g_cls, g_patches, _), (l_cls, _, _) = student["global"], student["local"]
        n_local = self.cfg["data"]["n_local_crops"]
        n_terms = (N_GLOBAL - 1) * N_GLOBAL + n_local * N_GLOBAL
        with self.fwd():
            s_global, s_local = self.head(g_cls), self.head(l_cls)
        s_global, s_local = s_global.float(), s_local.float()
        local = dino_forward(s_local.chunk(n_local), dino_targets.chunk(N_GLOBAL), l["student_temp"]) / n_terms
        glob = dino_forward([s_global], [dino_targets], l["student_temp"]) * LOSS_SCALES / n_terms
        with self.fwd():
            s_patches = self.head(g_patches.flatten(0, 1).index_select(0, idx))
        lsm = F.log_softmax(s_patches.float() / l["student_temp"], dim=-1)
        ibot = -(torch.sum(ibot_targets * lsm, dim=-1) * b["masks_weight"]).sum() / masks.shape[0]
        ibot = ibot * LOSS_SCALES * (1.0 / N_GLOBAL)
        k = sum(koleo(c.float()) for c in g_cls.chunk(N_GLOBAL))
        return [("dino", local + glob), ("ibot", ibot), ("koleo", k)]

    def teacher_targets(self, cls_logits, patch_logits, teacher_temp):
        """DINO and iBOT targets: centred with the centres from before the step, which are then updated
        (DINOv2 `centering`), or Sinkhorn-Knopp with B = rows / masked patches (`sinkhorn_knopp`).
        Data parallel: the centre updates all-reduce the batch sums and divide by count × world
        (`update_center`), Sinkhorn-Knopp all-reduces its sums and B is the global count."""
        l = self.cfg["loss"]
        if l["centering"] == "sinkhorn_knopp":
            if self.world > 1:
                n_patches = torch.tensor(patch_logits.shape[0])
                dist.all_reduce(n_patches)
                return (sinkhorn_knopp_dist(cls_logits, teacher_temp, cls_logits.shape[0] * self.world),
                        sinkhorn_knopp_dist(patch_logits, teacher_temp, n_patches.item()))
            return (sinkhorn_knopp(cls_logits, teacher_temp, cls_logits.shape[0]),
                    sinkhorn_knopp(patch_logits, teacher_temp, patch_logits.shape[0]))
        dino = softmax_centered(cls_logits, self.dino_center, teacher_temp)
        dino_sum = cls_logits.sum(0, keepdim=True)
        if self.world > 1:
            dist.all_reduce(dino_sum)
        self.dino_center = center_ema(self.dino_center, dino_sum, cls_logits.shape[0] * self.world,
                                      l["center_momentum"])
        h = patch_logits.unsqueeze(0)
        ibot = softmax_centered(h, self.ibot_center, teacher_temp).squeeze(0)
        ibot_sum = h.mean(1).sum(0, keepdim=True)
        if self.world > 1:
            dist.all_reduce(ibot_sum)
        self.ibot_center = center_ema(self.ibot_center, ibot_sum, h.shape[0] * self.world,
                                      l["center_momentum"])
        return dino, ibot

    def losses(self, b, sv):
        l, m = self.cfg["loss"], self.model
        terms, total = [], torch.zeros([])
        self.t = time.perf_counter()
        student = self.student_features(b)
        self.lap("student trunk")
        clip = self.clip_loss(student["clip"], b["tokens"])
        total = total + clip * l["lambda_clip"]
        terms.append(("clip", clip))
        self.lap("clip forward")
        ssl_terms = self.ssl_losses(b, student, sv["teacher_temp"])
        ssl = torch.zeros([])
        for (_, t), w in zip(ssl_terms, (l["dino_weight"], l["ibot_weight"], l["koleo_weight"])):
            ssl = ssl + t * w
        total = total + ssl * l["lambda_ssl"]
        terms += ssl_terms + [("ssl", ssl)]
        self.lap("ssl forward (teacher, student)")
        _, patches, grid = student["recon"]
        with self.fwd():
            bsz, _, ch = patches.shape
            reconstruction = m.get_latents_decoded_images(patches.transpose(1, 2).reshape(bsz, ch, *grid))
        rec_l1 = F.l1_loss(reconstruction.float(), b["recon"])
        terms.append(("rec_l1", rec_l1))
        rec = rec_l1
        if l.get("l2_weight", 0.0):  # vtp-rs's L2 term (`loss.l2_weight`)
            rec_l2 = F.mse_loss(reconstruction.float(), b["recon"])
            terms.append(("rec_l2", rec_l2))
            rec = rec_l1 + rec_l2 * l["l2_weight"]
        total = total + rec * l["lambda_rec"]
        terms.append(("rec", rec))
        self.lap("rec forward")
        return total, terms

    def step(self, b, sv):
        """losses, backward, clipping, AdamW, logit-scale clamp, teacher EMA; returns (terms, grad norm)."""
        self.opt.zero_grad(set_to_none=True)
        total, terms = self.loss_fn(b, sv)
        self.t = time.perf_counter()
        total.backward()
        self.lap("backward")
        max_norm = self.cfg["optim"]["clip_grad"]
        params = [p for _, p in self.named]
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else math.inf)
        self.lap("clip grad")
        for group, (lr_mult, wd_mult, last) in zip(self.opt.param_groups, self.mults):
            group["lr"] = (sv["last_layer_lr"] if last else sv["lr"]) * lr_mult
            group["weight_decay"] = sv["wd"] * wd_mult
        self.opt.step()
        with torch.no_grad():
            self.model.logit_scale.clamp_(0, math.log(100))
            self.lap("optimiser")
            self.ema(sv["momentum"])
            self.lap("teacher ema")
        return [("total", total)] + terms, grad_norm

    def ema(self, m):
        student = dict(self.named)
        names = sorted(n for n, _ in self.teacher.named_parameters())
        t_params = dict(self.teacher.named_parameters())
        torch._foreach_mul_([t_params[n] for n in names], m)
        torch._foreach_add_([t_params[n] for n in names], [student[n] for n in names], alpha=1 - m)


class Student(nn.Module):
    """The student as one module (model + DINO head) for `DistributedDataParallel`: forward(batch, sv)
    is `State.losses`, so the step's loss goes through the DDP wrapper (bucketed all-reduce overlapped
    with the backward)."""

    def __init__(self, state):
        super().__init__()
        self.model, self.dino_head = state.model, state.head
        self.losses = state.losses

    def forward(self, b, sv):
        return self.losses(b, sv)


def student_parameters(model, head):
    named = dict(model.named_parameters())
    named.update({f"dino_head.{n}": p for n, p in head.named_parameters()})
    return named


def multipliers(name, ndim, depth, layer_decay, patch_embed_lr_mult):
    """DINOv2's (lr_mult, wd_mult, is_last_layer) as `vtp::train::optim::dinov2_multipliers` states the rule:
    layer decay on `trunk.*` only (id 0 embeddings/tokens, i+1 for block i, depth+1 otherwise), patch-embed
    lr ×mult, no wd for ndim<2 / `.bias` / norm / gamma / ln_ / logit_* / positional_embedding / `*token*` leaves."""
    lr_mult = 1.0
    if name.startswith("trunk"):
        rest = name[len("trunk"):]
        if any(p in rest for p in EMBEDDING_PARTS) or ".storage_tokens" in rest:
            layer_id = 0
        elif rest.startswith(".blocks."):
            block = rest[len(".blocks."):].split(".")[0]
            layer_id = int(block) + 1 if block.isdigit() else depth + 1
        else:
            layer_id = depth + 1
        lr_mult = layer_decay ** float(depth + 1 - layer_id)
    if "patch_embed" in name:
        lr_mult *= patch_embed_lr_mult
    leaf = name.rsplit(".", 1)[-1]
    no_wd = ndim < 2 or name.endswith(".bias") or any(p in name for p in NO_WD_PARTS) or "token" in leaf
    return lr_mult, 0.0 if no_wd else 1.0, "last_layer" in name


# ------------------------------------------------------------------------------------------ parity
def build(pv, cfg, with_text=True):
    c = pv.make_config(None, {k: v for k, v in cfg["model"].items() if k in pv.DEFAULTS})
    model = pv.VTP(c, with_text=with_text)
    in_dim = c["vision_embed_dim"] if c["vision_bottleneck_ae_only"] else c["vision_feature_bottleneck"]
    return model, make_head(in_dim, cfg["dino_head"]), Teacher(pv, c, cfg["dino_head"])


def load_exact(module, prefix, tensors):
    own = {k for k in module.state_dict()}
    sd = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    extra, missing = sorted(set(sd) - own), sorted(own - set(sd))
    if extra or missing:
        raise SystemExit(f"{prefix}: missing {missing[:8]}, unexpected {extra[:8]}")
    module.load_state_dict(sd)


def parity(pv, a):
    from safetensors.torch import load_file, save_file
    with open(os.path.join(a.setup, "setup.json")) as f:
        setup = json.load(f)
    cfg = setup["config"]
    if cfg["objectives"] != "all" or cfg["loss"]["ssl_drop_path"] or cfg["loss"]["clip_drop_path"] or cfg["loss"]["rec_drop_path"]:
        raise SystemExit("parity mode needs objectives = all and no drop-path")
    init = load_file(os.path.join(a.setup, "init.safetensors"))
    batch = load_file(os.path.join(a.setup, "batch.safetensors"))
    model, head, teacher = build(pv, cfg)
    student = {k[len("student."):]: v for k, v in init.items() if k.startswith("student.")}
    load_exact(model, "", {k: v for k, v in student.items() if not k.startswith("dino_head.")})
    load_exact(head, "dino_head.", student)
    load_exact(teacher, "teacher.", init)
    state = State(pv, cfg, model, head, teacher)
    state.dino_center, state.ibot_center = init["dino.center"].clone(), init["ibot.center"].clone()
    out = {}
    for i, sv in enumerate(setup["schedule"]):
        terms, grad_norm = state.step(batch, sv)
        out.update({f"loss.{i}.{n}": t.detach().reshape([]).clone() for n, t in terms})
        out[f"grad_norm.{i}"] = grad_norm.detach().reshape([])
    for name, p in state.named:
        out[f"student.{name}"] = p.detach()
        st = state.opt.state.get(p, {})
        out[f"optim.{name}.exp_avg"] = st.get("exp_avg", torch.zeros_like(p))
        out[f"optim.{name}.exp_avg_sq"] = st.get("exp_avg_sq", torch.zeros_like(p))
        out[f"optim.{name}.step"] = st.get("step", torch.tensor(0.0)).reshape([])
    out.update({f"teacher.{n}": p.detach() for n, p in teacher.named_parameters()})
    out["dino.center"], out["ibot.center"] = state.dino_center, state.ibot_center
    save_file({k: v.contiguous() for k, v in out.items()}, os.path.join(a.setup, "out.safetensors"))
    print(json.dumps(dict(steps=len(setup["schedule"]), tensors=len(out), torch=torch.__version__,
                          cpu_capability=torch.backends.cpu.get_cpu_capability(), threads=torch.get_num_threads())))


# ------------------------------------------------------------------------------------------- bench
def rss_mib(field="VmRSS"):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return None


def random_masks(n_crops, grid, g):
    """DINOv2 collate's mask counts (half the crops, ratios over linspace(0.1, 0.5)), random positions."""
    n_tokens, n_masked = grid * grid, int(n_crops * 0.5)
    probs = torch.linspace(0.1, 0.5, n_masked + 1)
    masks = torch.zeros(n_crops, n_tokens, dtype=torch.bool)
    for i in range(n_masked):
        lo, hi = probs[i].item(), probs[i + 1].item()
        k = int(n_tokens * (lo + (hi - lo) * torch.rand([], generator=g).item()))
        masks[i, torch.randperm(n_tokens, generator=g)[:k]] = True
    masks = masks[torch.randperm(n_crops, generator=g)]
    per_row = masks.sum(-1, keepdim=True).clamp(min=1.0)
    return masks, masks.flatten().nonzero().flatten(), (1 / per_row).expand_as(masks)[masks]


def random_batch(cfg, a, g):
    c, p = cfg["model"], cfg["model"]["vision_patch_size"]
    masks, idx, weight = random_masks(N_GLOBAL * a.batch_ssl, a.global_size // p, g)
    img = lambda n, s: torch.randn(n, 3, s, s, generator=g)
    tokens = torch.randint(1, c["text_vocab_size"], (a.batch, c["text_context_length"]), generator=g)
    return {"clip_images": img(a.batch, a.clip_size), "tokens": tokens,
            "global": img(N_GLOBAL * a.batch_ssl, a.global_size), "local": img(a.n_local_crops * a.batch_ssl, a.local_size),
            "masks": masks, "mask_indices_list": idx, "masks_weight": weight, "recon": img(a.batch_recon, a.recon_size)}


def bench_config(pv, a):
    """The bench's config: the architecture of `--preset` (pytorch_vtp.py's presets) or, for presets
    it lacks (`vtp`'s `tiny`), of `--model-json` (VTPConfig keys over its defaults; `vtp pretrain
    --preset P --print-config`'s [model] table); `--model-json` also overrides a known preset."""
    over = json.loads(a.model_json) if a.model_json else {}
    if a.preset not in pv.PRESETS and not over:
        raise SystemExit(f"--preset {a.preset}: not a pytorch_vtp.py preset ({', '.join(sorted(pv.PRESETS))}); "
                         "pass its architecture as --model-json")
    model = pv.make_config(a.preset if a.preset in pv.PRESETS else None, over)
    return dict(model=model, objectives="all", data=dict(n_local_crops=a.n_local_crops),
                loss=dict(lambda_rec=0.1, lambda_ssl=1.0, lambda_clip=1.0, dino_weight=1.0, ibot_weight=1.0,
                          koleo_weight=0.1, centering=a.centering, student_temp=0.1, center_momentum=0.9,
                          l2_weight=a.l2_weight, merge_trunk_passes=a.merge_trunk_passes),
                dino_head=dict(out_dim=a.out_dim, hidden_dim=a.hidden_dim, bottleneck_dim=a.bottleneck_dim),
                optim=dict(beta1=0.9, beta2=0.999, eps=1e-8, clip_grad=3.0, layer_decay=0.9, patch_embed_lr_mult=0.2,
                           fused=a.fused))


def bench(pv, a):
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), 0
    if world > 1:
        dist.init_process_group("gloo")
        rank = dist.get_rank()
        # OpenCLIP's gather_with_grad is `torch.distributed.nn.all_gather`, deprecated in recent torch.
        warnings.filterwarnings("ignore", message=r"torch\.distributed\.nn\.functional\.all_gather is deprecated",
                                category=FutureWarning)
    shares = {}
    for name in ("batch", "batch_ssl", "batch_recon"):
        if getattr(a, name) % world:
            flag = "--" + name.replace("_", "-")
            raise SystemExit(f"{flag} {getattr(a, name)} is not divisible by the world size {world}")
        shares[name] = getattr(a, name) // world
    torch.manual_seed(a.seed)
    cfg = bench_config(pv, a)
    model, head, teacher = build(pv, cfg)
    pv.init_random(model, a.seed)
    with torch.no_grad():
        for n, p in head.named_parameters():
            if n.startswith("mlp.") and p.dim() == 2:
                nn.init.trunc_normal_(p, std=0.02)
        t_params = dict(teacher.named_parameters())
        for n, p in student_parameters(model, head).items():
            if n in t_params:
                t_params[n].copy_(p)
    state = State(pv, cfg, model, head, teacher, world=world, rank=rank, bf16=a.precision == "bf16")
    if world > 1:
        # Every student parameter gets a gradient from the all-objectives loss (checked), so DDP
        # needs no unused-parameter search. Default 25 MiB buckets; rank 0's weights broadcast here.
        state.loss_fn = nn.parallel.DistributedDataParallel(Student(state), find_unused_parameters=False)
    # This rank's share of the global batch (world 1: the whole batch, seed + 1 as before).
    share = argparse.Namespace(**{**vars(a), **shares})
    batch = random_batch(cfg, share, torch.Generator().manual_seed(a.seed + 1 + rank))
    sv = dict(lr=1e-4, wd=0.04, momentum=0.992, teacher_temp=0.04, last_layer_lr=1e-4)
    times, rss, t_all = [], {}, time.perf_counter()
    for i in range(a.warmup + a.iters):
        if a.profile and i == a.warmup:
            state.profile = {}
        t0 = time.perf_counter()
        state.step(batch, sv)
        if i >= a.warmup:
            times.append(time.perf_counter() - t0)
        if i + 1 in (20, 200):
            rss[f"rss_after_{i + 1}_mib"] = round(rss_mib(), 1)
    med = statistics.median(times)
    phases = {k: statistics.median(v) for k, v in (state.profile or {}).items()}
    if a.profile and rank == 0:
        # The op-level profile of one more step (torch.profiler), on stderr.
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            state.step(batch, sv)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15), file=sys.stderr)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    if rank != 0:
        return
    print(json.dumps(dict(
        impl="pytorch-eager", preset=a.preset, mode="pretrain-step", batch=a.batch, batch_ssl=a.batch_ssl,
        batch_recon=a.batch_recon, clip_size=a.clip_size, global_size=a.global_size, local_size=a.local_size,
        n_local_crops=a.n_local_crops, recon_size=a.recon_size, dino_out_dim=a.out_dim, threads=a.threads,
        precision=a.precision, centering=a.centering, world=world,
        img_per_s=round(a.batch / med, 4), s_per_iter=round(med, 4), s_per_iter_min=round(min(times), 4),
        iters=a.iters, warmup=a.warmup, peak_rss_mib=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        **rss, wall_s=round(time.perf_counter() - t_all, 2), torch=torch.__version__,
        **({"phases": phases} if a.profile else {}))))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bench-dir", default=os.path.join(HERE, "../../shared/bench"), help="folder of pytorch_vtp.py")
    ap.add_argument("--threads", type=int, default=2)
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--setup", help="parity: folder with setup.json, init.safetensors, batch.safetensors")
    mode.add_argument("--bench", action="store_true", help="time one all-objectives step on random data")
    ap.add_argument("--preset", default="small")
    ap.add_argument("--model-json", help="--bench: the architecture as a JSON object of VTPConfig keys (over --preset "
                    "when pytorch_vtp.py knows it, else over VTPConfig's defaults)")
    ap.add_argument("--centering", choices=("centering", "sinkhorn_knopp"), default="centering",
                    help="--bench: the teachers' targets (DINOv2 cfg.train.centering)")
    ap.add_argument("--precision", choices=("f32", "bf16"), default="f32",
                    help="--bench: bf16 = forward passes under CPU bf16 autocast, losses in f32")
    ap.add_argument("--batch", type=int, default=8, help="CLIP pairs per step (data parallel: global)")
    ap.add_argument("--batch-ssl", type=int, default=2, help="SSL images per step (data parallel: global)")
    ap.add_argument("--batch-recon", type=int, default=1, help="reconstruction images per step (data parallel: global)")
    ap.add_argument("--clip-size", type=int, default=256)
    ap.add_argument("--global-size", type=int, default=224)
    ap.add_argument("--local-size", type=int, default=96)
    ap.add_argument("--n-local-crops", type=int, default=8)
    ap.add_argument("--recon-size", type=int, default=256)
    ap.add_argument("--l2-weight", type=float, default=0.0, help="weight of the L2 reconstruction term (loss.l2_weight)")
    ap.add_argument("--out-dim", type=int, default=65536)
    ap.add_argument("--hidden-dim", type=int, default=2048)
    ap.add_argument("--bottleneck-dim", type=int, default=256)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fused", action=argparse.BooleanOptionalAction, default=True,
                    help="--bench: AdamW(fused=True), as vtp's default optim.fused; --no-fused: AdamW(foreach=False)")
    ap.add_argument("--merge-trunk-passes", action=argparse.BooleanOptionalAction, default=False,
                    help="--bench: one student trunk pass per image size (vtp's loss.merge_trunk_passes, its default); "
                    "default: one pass per objective, the legacy meta-arch")
    ap.add_argument("--profile", action="store_true", help="--bench: median seconds of each phase of the step "
                    "(as `vtp bench --profile`) in the JSON line, torch.profiler's op table on stderr")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    sys.path.insert(0, a.bench_dir)
    import pytorch_vtp as pv
    parity(pv, a) if a.setup else bench(pv, a)


if __name__ == "__main__":
    main()
