"""Where a tiny DiT's generation fails (issue 23): one figure and four numbers per (tokenizer, DiT, cache).

Rows of the figure, 8 cached training latents (one per class where the cache has them):
  1. the tokenizer's reconstructions of the cached latents (the ceiling);
  2. the same latents with Gaussian noise of std 0.4 in the normalised space (is the decoder robust?);
  3-5. one-step denoising by the DiT from t = 0.2 / 0.5 / 0.8: x1 = x_t + (1 - t)·v(x_t, t);
  6. samples from pure noise (Euler, the tiny preset's 50 points and shift 0.3), one per class.
Printed: the x1 error of each denoising point against the (1 - t)² of an x1 = x_t guess, and the std of the
samples against the real normalised latents'.

    .venv/bin/python benches/dit_diagnose.py TOKENIZER_DIR DIT_MODEL_DIR CACHE_DIR out.png

Plain PyTorch on ../shared/bench's reference models (both load vtp-rs's exported folders).
"""
import os
import sys

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

sys.path.insert(0, os.environ.get("VTP_BENCH", os.path.join(os.path.dirname(__file__), "../../shared/bench")))
import pytorch_dit as D  # noqa: E402
import pytorch_vtp as P  # noqa: E402

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def main(tokenizer_dir, dit_dir, cache_dir, out):
    torch.set_num_threads(1)
    torch.set_grad_enabled(False)
    torch.manual_seed(0)
    tokenizer = P.load_dir(tokenizer_dir, with_text=False).eval()
    dit = D.load_dir(dit_dir).eval()
    stats = load_file(os.path.join(cache_dir, "latent_stats.safetensors"))
    mean, std = stats["mean"].view(1, -1, 1, 1), stats["std"].view(1, -1, 1, 1)
    shard = load_file(os.path.join(cache_dir, "shard-00000.safetensors"))
    labels = shard["labels"].long()
    picks = [int((labels == c).nonzero()[0]) for c in range(8) if (labels == c).any()]
    x1 = (shard["latents"][picks].float() - mean) / std
    y = labels[picks]

    def decode(z):
        return (tokenizer.get_latents_decoded_images(z * std + mean) * STD + MEAN).clamp(0, 1)

    rows = [decode(x1), decode(x1 + 0.4 * torch.randn_like(x1))]
    for t in [0.2, 0.5, 0.8]:
        xt = t * x1 + (1 - t) * torch.randn_like(x1)
        x1_hat = xt + (1 - t) * dit(xt, torch.full((len(y),), t), y)
        print(f"denoise from t={t}: x1 mse {((x1_hat - x1) ** 2).mean():.3f} (x_t alone: {(1 - t) ** 2:.3f})")
        rows.append(decode(x1_hat))
    samples = D.sample_euler(dit, torch.randn_like(x1), y, 49, shift=0.3)
    print(f"samples: std {samples.std():.3f} (real latents {x1.std():.3f})")
    rows.append(decode(samples))
    grid = torch.cat([torch.cat(list(r), 2) for r in rows], 1)
    Image.fromarray((grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    if len(sys.argv) != 5:
        sys.exit(__doc__)
    main(*sys.argv[1:])
