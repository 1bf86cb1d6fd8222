#!/usr/bin/env python3
"""Same-machine LightningDiT reference dump (tests/dit_model.rs).

Loads a config.json + model.safetensors folder with ../shared/bench/pytorch_dit.py's `load_dir` (plain
PyTorch, parity-checked against the official code), runs `forward` and `forward_with_cfg` on seeded inputs
on this machine's kernels and thread count, and writes inputs and outputs as safetensors:
  x, t, y, out                       model(x, t, y) in eval mode
  cfg.x, cfg.t, cfg.y                the doubled batch [x; x], [t; t], [y; null]
  cfg.out                            forward_with_cfg(cfg.x, cfg.t, cfg.y, 4.0)
  cfg.interval.out                   forward_with_cfg(..., 4.0, cfg_interval=True, cfg_interval_start=0.5)
"""
import argparse
import json
import sys

import torch
from safetensors.torch import save_file


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bench-dir", required=True, help="folder holding pytorch_dit.py")
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    sys.path.insert(0, a.bench_dir)
    import pytorch_dit as pd

    torch.set_num_threads(a.threads)
    model = pd.load_dir(a.model_dir).eval()
    c = model.c
    g = torch.Generator().manual_seed(a.seed)
    x = torch.randn(a.batch, c["in_channels"], c["input_size"], c["input_size"], generator=g)
    t = torch.rand(a.batch, generator=g)
    y = torch.randint(0, c["num_classes"], (a.batch,), generator=g)
    out = dict(x=x, t=t, y=y)
    with torch.no_grad():
        out["out"] = model(x, t, y)
        cx, ct = torch.cat([x, x]), torch.cat([t, t])
        cy = torch.cat([y, torch.full_like(y, c["num_classes"])])
        out.update({"cfg.x": cx, "cfg.t": ct, "cfg.y": cy})
        out["cfg.out"] = model.forward_with_cfg(cx, ct, cy, 4.0)
        out["cfg.interval.out"] = model.forward_with_cfg(cx, ct, cy, 4.0, True, 0.5)
    save_file({k: v.contiguous() for k, v in out.items()}, a.out)
    print(json.dumps(dict(keys=sorted(out), t=t.tolist(), torch=torch.__version__,
                          cpu_capability=torch.backends.cpu.get_cpu_capability(), threads=a.threads)))


if __name__ == "__main__":
    main()
