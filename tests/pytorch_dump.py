#!/usr/bin/env python3
"""Same-machine reference dump (tests/parity.rs, issue 17).

Runs ../shared/bench/pytorch_vtp.py (plain PyTorch, parity-checked against the official code) on the
inputs of a fixture's io.safetensors, on this machine's kernels and thread count, and writes a dump in
the fixtures' key convention (in.* inputs + out.* outputs) for `vtp check`: latents, decoded images
(from its own latents and from the random ones), CLIP image features and CLIP text features.
"""
import argparse
import json
import os
import sys

import torch
from safetensors.torch import load_file, save_file


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bench-dir", required=True, help="folder holding pytorch_vtp.py")
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--inputs", required=True, help="io.safetensors whose in.* tensors are used")
    ap.add_argument("--out", required=True)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    sys.path.insert(0, a.bench_dir)
    import pytorch_vtp as pv

    torch.set_num_threads(a.threads)
    with open(os.path.join(a.model_dir, "config.json")) as f:
        clip = json.load(f).get("train_clip", True)
    model = pv.load_dir(a.model_dir, with_text=clip).eval()
    io = load_file(a.inputs)
    out = {k: v for k, v in io.items() if k.startswith("in.")}
    with torch.no_grad():
        for key, value in io.items():
            size = key.rsplit(".", 1)[-1]
            if key.startswith("in.image."):
                z = model.get_reconstruction_latents(value)
                out[f"out.get_reconstruction_latents.{size}"] = z
                out[f"out.get_latents_decoded_images.from_reconstruction.{size}"] = model.get_latents_decoded_images(z)
                if clip:
                    for norm in (True, False):
                        feat = model.get_clip_image_feature(value, normalize=norm)
                        out[f"out.get_clip_image_feature.normalize_{str(norm).lower()}.{size}"] = feat
            elif key.startswith("in.latent."):
                out[f"out.get_latents_decoded_images.from_random.{size}"] = model.get_latents_decoded_images(value)
            elif key == "in.text" and clip:
                for norm in (True, False):
                    feat = model.get_clip_text_feature(value, normalize=norm)
                    out[f"out.get_clip_text_feature.normalize_{str(norm).lower()}"] = feat
    save_file({k: v.contiguous() for k, v in out.items()}, a.out)
    print(json.dumps(dict(outputs=sorted(k for k in out if k.startswith("out.")), torch=torch.__version__,
                          cpu_capability=torch.backends.cpu.get_cpu_capability(), threads=a.threads)))


if __name__ == "__main__":
    main()
