#!/usr/bin/env bash
# Benchmark (not a test): `reconstruct` images/s of vtp-rs next to PyTorch (../shared/bench/pytorch_vtp.py)
# in the same run, same machine, same thread count. Usage: scripts/bench.sh [presets...] (default: small base)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$VTP_ROOT"
cargo build --release --locked -q
PYBENCH="${VTP_PYBENCH:-$VTP_ROOT/../shared/bench/pytorch_vtp.py}"
ARGS=(--size 256 --batch 4 --iters "${ITERS:-5}" --warmup 1)
for preset in "${@:-small base}"; do
  for p in $preset; do
    rust=$(target/release/vtp --device cpu --threads 2 bench --preset "$p" "${ARGS[@]}" 2>/dev/null)
    torch=$(python "$PYBENCH" --preset "$p" --mode reconstruct --threads 2 "${ARGS[@]}")
    echo "$rust"
    echo "$torch"
    python - "$rust" "$torch" <<'PY'
import json, sys
r, t = (json.loads(a) for a in sys.argv[1:3])
print(f"{r['preset']}: vtp-rs {r['img_per_s']:.3f} img/s, PyTorch {t['img_per_s']:.3f} img/s, ratio {r['img_per_s'] / t['img_per_s']:.3f}x")
PY
  done
done
