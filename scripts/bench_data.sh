#!/usr/bin/env bash
# Benchmark (not a test): samples/s of the DINOv2 multi-crop pipeline (2 global 224 + 8 local 96
# crops, docs/design.md §4.2, the `small` preset's sizes) in vtp-rs next to torchvision (DataLoader with the
# same number of workers) in the same run, and the `small` training step's images/s (PyTorch,
# ../shared/bench/pytorch_vtp.py) that the data path must outpace by 2x.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$VTP_ROOT"
vtp_test_python_packages
cargo build --release --locked -q
W="${WORKERS:-2}"
N="${IMAGES:-256}"
rust=$(target/release/vtp data bench --images "$N" --workers "$W")
tv=$(python benches/torchvision_multicrop.py --images "$N" --workers "$W")
step=$(python "$VTP_ROOT/../shared/bench/pytorch_vtp.py" --preset small --mode train-step --optim --size 256 --batch 4 --threads "$W" --iters 3 --warmup 1)
echo "$rust"; echo "$tv"; echo "$step"
python - "$rust" "$tv" "$step" <<'PY'
import json, sys
r, t, s = (json.loads(a) for a in sys.argv[1:4])
print(f"multi-crop: vtp-rs {r['samples_per_s']:.1f} samples/s, torchvision {t['samples_per_s']:.1f} samples/s, "
      f"ratio {r['samples_per_s'] / t['samples_per_s']:.2f}x; small train step {s['img_per_s']:.2f} img/s -> "
      f"data/step {r['samples_per_s'] / s['img_per_s']:.1f}x")
PY
