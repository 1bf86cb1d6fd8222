"""Calibrations of the tiny pre-training recipe (README "Pre-training: what the tiny run can learn"):
how well the *architecture* of `vtp pretrain --preset tiny` can do on the built-in scenes in the main
job's budget when it is given the answer, so that a trained tokenizer's figures can be read against a
ceiling rather than against chance.

    vtp data write-shards --source "synthetic:train?n=20000&res=64&zoom=2" --out /tmp/cal/train --per-shard 5000
    vtp data write-shards --source "synthetic:heldout?n=1000&res=64&zoom=2" --out /tmp/cal/held
    python benches/tiny_calibration.py supervised /tmp/cal          # the tiny ViT trunk + a linear head on shape
    python benches/tiny_calibration.py cnn /tmp/cal                 # a 4-layer CNN on shape (the task itself)
    python benches/tiny_calibration.py autoencoder /tmp/cal         # the tiny VTP autoencoder, L1 + L2
    python benches/tiny_calibration.py linear-autoencoder /tmp/cal  # a linear 16x16 patch autoencoder, 64-d
    python benches/tiny_calibration.py clip /tmp/cal                # the tiny CLIP alone on the captions
    python benches/tiny_calibration.py clip /tmp/cal --captions shape --batch 256

`clip` trains the tiny tokenizer's image trunk and text tower with the symmetric contrastive loss alone
(`--captions full`: the scenes' own captions; `shape`: "a <shape>." with the canonical shape name, so that
the contrast can only be won by shape) and scores zero-shot shape and colour on the held-out scenes with
the prompts of `vtp eval`. Words are tokenised one id per word (the text tower does not care which ids).

Every model trains on batches of 64 (16 for the autoencoders) drawn from the 20 000 training scenes with
AdamW, and is scored on the held-out scenes every 200 steps. The ViT is `../shared/bench/pytorch_vtp.py`'s
model in the tiny preset's shape; `--patch-embed-lr-mult` applies the DINOv2 parameter group the preset uses.
"""
import argparse, glob, io, json, math, os, re, sys, tarfile

import numpy as np
import torch
import torch.nn as nn
from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.environ.get("VTP_SHARED_BENCH", os.path.join(HERE, "..", "..", "shared", "bench")))
import pytorch_vtp as P  # noqa: E402

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
TINY = dict(image_size=64, vision_embed_dim=96, vision_depth=4, vision_num_heads=3, decoder_embed_dim=96,
            decoder_depth=2, decoder_num_heads=3, text_embed_dim=64, text_depth=2, text_num_heads=2,
            text_context_length=32)


def load(folder, label, captions=None):
    """ImageNet-normalised images [N, 3, H, W] and the `label` labels of every shard in `folder`
    (and each image's caption appended to `captions` when given)."""
    images, labels = [], []
    for path in sorted(glob.glob(os.path.join(folder, "*.tar"))):
        members = {}
        with tarfile.open(path) as t:
            for m in t.getmembers():
                key, ext = m.name.rsplit(".", 1)
                members.setdefault(key, {})[ext] = t.extractfile(m).read()
        for parts in members.values():
            images.append(np.asarray(Image.open(io.BytesIO(parts["png"])).convert("RGB")))
            meta = json.loads(parts["json"])
            labels.append(meta["labels"][label])
            if captions is not None:
                captions.append(meta["caption"])
    x = torch.tensor(np.stack(images)).permute(0, 3, 1, 2).float() / 255
    return (x - MEAN) / STD, torch.tensor(labels)


def classifier(kind, c):
    """(model, parameter groups) of a shape classifier."""
    if kind == "cnn":
        def conv(i, o):
            return [nn.Conv2d(i, o, 3, padding=1), nn.ReLU()]
        net = nn.Sequential(*conv(3, 32), nn.MaxPool2d(2), *conv(32, 64), nn.MaxPool2d(2), *conv(64, 96),
                            nn.MaxPool2d(2), *conv(96, 96), nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(96, 8))
        return net, [dict(params=list(net.parameters()))]
    trunk, head = P.Trunk(c), nn.Linear(c["vision_embed_dim"], 8)
    embed = list(trunk.patch_embed.parameters())
    rest = [p for p in list(trunk.parameters()) + list(head.parameters()) if all(p is not q for q in embed)]
    return (lambda x: head(trunk(x)[0])), [dict(params=embed, mult=args.patch_embed_lr_mult), dict(params=rest)]


def autoencoder(kind, c):
    """(reconstruction function, parameter groups) of an autoencoder."""
    if kind == "linear-autoencoder":
        enc, dec = nn.Conv2d(3, 64, 16, 16), nn.ConvTranspose2d(64, 3, 16, 16)
        return (lambda x: dec(enc(x))), [dict(params=list(enc.parameters()) + list(dec.parameters()))]
    m = P.VTP(dict(c, train_clip=False))
    embed = list(m.trunk.patch_embed.parameters())
    rest = [p for p in m.parameters() if all(p is not q for q in embed)]
    forward = lambda x: m.get_latents_decoded_images(m.get_reconstruction_latents(x))  # noqa: E731
    return forward, [dict(params=embed, mult=args.patch_embed_lr_mult), dict(params=rest)]


SHAPES = ["circle", "square", "triangle", "star", "cross", "ring", "diamond", "heart"]
COLORS = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black"]  # synthetic.rs order
OBJECT_TEMPLATES = ["a photo of the {c}.", "the {c}.", "a picture of the {c}.", "a rendering of the {c} on a background."]
COLOR_TEMPLATES = ["a photo of the {c} shape.", "the {c} object.", "a picture of the {c} shape.", "a {c} shape on a background."]


class Words:
    """One token id per lower-case word, between start (49406) and end (49407) ids, padded with 0."""

    def __init__(self, context):
        self.ids, self.context = {}, context

    def __call__(self, texts):
        rows = torch.zeros(len(texts), self.context, dtype=torch.long)
        for i, text in enumerate(texts):
            words = [self.ids.setdefault(w, len(self.ids) + 1) for w in re.findall(r"[a-z]+", text.lower())]
            ids = [49406] + words[: self.context - 2] + [49407]
            rows[i, : len(ids)] = torch.tensor(ids)
        return rows


def clip_run(c, x_train, y_train, captions, x_held, y_held, held_colors):
    """Train the tiny CLIP alone; print zero-shot shape and colour every 200 steps."""
    c = dict(c, train_reconstruction=False)
    m = P.init_random(P.VTP(c))
    words = Words(c["text_context_length"])
    if args.captions == "shape":
        captions = [f"a {SHAPES[y]}." for y in y_train.tolist()]
    tokens = words(captions)
    embed = list(m.trunk.patch_embed.parameters())
    text = [p for n, p in m.named_parameters() if n.startswith(("text_", "token_", "positional_", "ln_final"))]
    rest = [p for p in m.parameters() if all(p is not q for q in embed + text)]
    opt = optimiser([dict(params=embed, mult=args.patch_embed_lr_mult), dict(params=text, mult=args.text_lr_mult),
                     dict(params=rest)])
    g = torch.Generator().manual_seed(0)
    for step in range(1, args.steps + 1):
        idx = torch.randint(0, len(x_train), (args.batch,), generator=g)
        img, txt = m.get_clip_image_feature(x_train[idx]), m.get_clip_text_feature(tokens[idx])
        logits = m.logit_scale.exp().clamp(max=100) * img @ txt.T
        target = torch.arange(len(idx))
        loss = (nn.functional.cross_entropy(logits, target) + nn.functional.cross_entropy(logits.T, target)) / 2
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 200 == 0:
            with torch.no_grad():
                scores = []
                for classes, templates, truth in ((SHAPES, OBJECT_TEMPLATES, y_held), (COLORS, COLOR_TEMPLATES, held_colors)):
                    t = torch.stack([nn.functional.normalize(m.get_clip_text_feature(
                        words([tpl.format(c=n) for tpl in templates])).mean(0), dim=-1) for n in classes])
                    pred = (m.get_clip_image_feature(x_held) @ t.T).argmax(1)
                    scores.append(100 * (pred == truth).float().mean().item())
            print(f"clip ({args.captions} captions, batch {args.batch}) step {step}: loss {loss.item():.3f} "
                  f"(ln B = {math.log(args.batch):.2f}), zero-shot shape {scores[0]:.1f} %, colour {scores[1]:.1f} %",
                  flush=True)


def optimiser(groups):
    for g in groups:
        g["lr"] = args.lr * g.pop("mult", 1.0)
    return torch.optim.AdamW(groups, lr=args.lr, weight_decay=args.weight_decay)


def psnr(a, b):
    a, b = (a * STD + MEAN).clamp(0, 1), (b * STD + MEAN).clamp(0, 1)
    return (10 * torch.log10(1 / ((a - b) ** 2).flatten(1).mean(1))).mean().item()


def main():
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    c = P.make_config("small", TINY)
    captions = []
    x_train, y_train = load(os.path.join(args.data, "train"), "shape", captions)
    x_held, y_held = load(os.path.join(args.data, "held"), "shape")
    if args.kind == "clip":
        held_colors = load(os.path.join(args.data, "held"), "color")[1]
        return clip_run(c, x_train, y_train, captions, x_held, y_held, held_colors)
    ae = args.kind.endswith("autoencoder")
    model, groups = (autoencoder if ae else classifier)(args.kind, c)
    opt = optimiser(groups)
    g = torch.Generator().manual_seed(0)
    batch = 16 if ae else 64
    for step in range(1, args.steps + 1):
        idx = torch.randint(0, len(x_train), (batch,), generator=g)
        if ae:
            out = model(x_train[idx])
            loss = (out - x_train[idx]).abs().mean() + ((out - x_train[idx]) ** 2).mean()
        else:
            loss = nn.functional.cross_entropy(model(x_train[idx]), y_train[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 200 == 0:
            with torch.no_grad():
                if ae:
                    score = f"held-out PSNR {psnr(x_held[:256], model(x_held[:256])):.2f} dB"
                else:
                    score = f"held-out shape top-1 {100 * (model(x_held).argmax(1) == y_held).float().mean():.1f} %"
            print(f"{args.kind} step {step}: loss {loss.item():.3f}, {score}", flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kind", choices=["supervised", "cnn", "autoencoder", "linear-autoencoder", "clip"])
    parser.add_argument("data", help="folder holding train/ and held/ shards from `vtp data write-shards`")
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--patch-embed-lr-mult", type=float, default=0.2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64, help="clip: image-caption pairs per step")
    parser.add_argument("--text-lr-mult", type=float, default=1.0, help="clip: lr multiplier of the text tower")
    parser.add_argument("--captions", choices=["full", "shape"], default="full", help="clip: which captions")
    args = parser.parse_args()
    main()
