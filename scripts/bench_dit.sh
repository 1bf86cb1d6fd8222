#!/usr/bin/env bash
# Benchmark (not a test): LightningDiT training steps/s and sampling images/s of vtp-rs next to plain
# PyTorch (`../shared/bench/pytorch_dit.py`), in one run on the same machine with 2 threads, on random
# 16×16×64 latents:
#   1. `small` (384 wide, 12 blocks): a training step at batch 8, and 20-step Euler sampling of 8 latents;
#   2. `B` (LightningDiT-B/1, 130 M): a training step at batch 4, and 5-step Euler sampling of 4 latents
#   (VTP_DIT_BENCH="small,8,20 B,4,5" chooses preset, batch and sampling steps).
# A training step is the flow-matching loss (logit-normal t, MSE + cosine), backward and AdamW
# (lr 2e-4, betas (0.9, 0.95)) on both sides. Prints every JSON line, then the ratios.
# Usage: scripts/bench_dit.sh (ITERS=3 WARMUP=1 by default). Each JSON line is printed as it is measured.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$VTP_ROOT"
cargo build --release --locked -q
PYBENCH="${VTP_PYBENCH:-$VTP_ROOT/../shared/bench/pytorch_dit.py}"
VTP=(target/release/vtp --device cpu --threads 2 bench)
T=(--iters "${ITERS:-3}" --warmup "${WARMUP:-1}")
echo "load before: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
lines=()
run() { lines+=("$("$@")"); echo "${lines[-1]}"; }
for spec in ${VTP_DIT_BENCH:-small,8,20 B,4,5}; do
  read -r preset batch steps <<<"${spec//,/ }"
  run "${VTP[@]}" --mode dit-train-step --preset "$preset" --batch "$batch" "${T[@]}"
  run python "$PYBENCH" --preset "$preset" --mode train-step --batch "$batch" --threads 2 "${T[@]}"
  run "${VTP[@]}" --mode dit-sample --preset "$preset" --batch "$batch" --steps "$steps" "${T[@]}"
  run python "$PYBENCH" --preset "$preset" --mode sample --batch "$batch" --steps "$steps" --threads 2 "${T[@]}"
done
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
python - "${lines[@]}" <<'PY'
import json, sys
rows = [json.loads(a) for a in sys.argv[1:]]
for r, t in zip(rows[::2], rows[1::2]):
    what = f"{r['preset']} {r['mode']} batch {r['batch']}" + (f", {r['steps']} steps" if r.get("steps") else "")
    print(f"{what}: vtp-rs {r['it_per_s']:.3f} it/s ({r['img_per_s']:.2f} img/s), PyTorch {t['it_per_s']:.3f} it/s "
          f"({t['img_per_s']:.2f} img/s), ratio {r['it_per_s'] / t['it_per_s']:.3f}x")
PY
