#!/usr/bin/env python3
"""The `benches/pytorch_pretrain.py --bench` arguments of a `vtp` pre-training preset, one per line.

Reads `vtp pretrain --preset P --print-config` on stdin and prints the preset's crop sizes, DINO head,
teacher centring, L2 reconstruction weight and architecture (--model-json: pytorch_vtp.py lacks presets such as tiny), so the
PyTorch step times what `vtp bench --mode pretrain-step --preset P` does (scripts/bench_dist.sh,
scripts/bench_precision.sh).
"""
import json, sys, tomllib

c = tomllib.loads(sys.stdin.read())
d, h = c["data"], c["dino_head"]
args = ["--global-size", d["global_size"], "--local-size", d["local_size"], "--n-local-crops", d["n_local_crops"],
        "--out-dim", h["out_dim"], "--hidden-dim", h["hidden_dim"], "--bottleneck-dim", h["bottleneck_dim"],
        "--centering", c["loss"]["centering"], "--l2-weight", c["loss"].get("l2_weight", 0.0), "--model-json", json.dumps(c["model"], separators=(",", ":"))]
print("\n".join(str(x) for x in args))
