#!/usr/bin/env bash
# Benchmark (not a test): one all-objectives pre-training step in f32 and in bf16 mixed precision
# (`train.precision`, autocast: bf16 matmuls / convolutions / attention, f32 weights, norms and losses),
# vtp-rs next to PyTorch (`benches/pytorch_pretrain.py --bench --precision`, torch.autocast) in one run on
# the same machine, 2 threads, the sizes of `vtp bench --mode pretrain-step` (CLIP B pairs, SSL max(2, B/4),
# reconstruction max(1, B/8), the preset's crops and DINO head). Prints every JSON line, then the bf16 / f32
# speed-up of each implementation and the vtp-rs / PyTorch ratio of each precision.
# Usage: scripts/bench_precision.sh; environment: PRESET=small SIZE=256 BATCH=8 ITERS=2 WARMUP=1.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$VTP_ROOT"
cargo build --release --locked -q
PRESET="${PRESET:-small}"
SIZE="${SIZE:-256}"
BATCH="${BATCH:-8}"
T=(--iters "${ITERS:-2}" --warmup "${WARMUP:-1}")
mapfile -t SIZES < <(target/release/vtp pretrain --preset "$PRESET" --print-config | python benches/preset_args.py)
echo "load before: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
lines=()
for precision in f32 bf16; do
  lines+=("$(target/release/vtp --device cpu --threads 2 bench --mode pretrain-step --preset "$PRESET" --size "$SIZE" \
    --batch "$BATCH" "${T[@]}" --precision "$precision" 2>/dev/null)")
  lines+=("$(python benches/pytorch_pretrain.py --bench --threads 2 --preset "$PRESET" --batch "$BATCH" \
    --batch-ssl $((BATCH / 4 > 2 ? BATCH / 4 : 2)) --batch-recon $((BATCH / 8 > 1 ? BATCH / 8 : 1)) --clip-size "$SIZE" \
    --recon-size "$SIZE" "${SIZES[@]}" "${T[@]}" --precision "$precision" | grep '^{' | tail -n 1)")
done
printf '%s\n' "${lines[@]}"
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
python - "${lines[@]}" <<'PY'
import json, sys
rf, tf, rb, tb = (json.loads(a) for a in sys.argv[1:5])
for name, f, b in (("vtp-rs", rf, rb), ("PyTorch", tf, tb)):
    print(f"{name}: f32 {f['img_per_s']:.3f} img/s, bf16 {b['img_per_s']:.3f} img/s, bf16 speed-up {b['img_per_s'] / f['img_per_s']:.2f}x")
for name, r, t in (("f32", rf, tf), ("bf16", rb, tb)):
    print(f"vtp-rs / PyTorch {name}: {r['img_per_s'] / t['img_per_s']:.3f}x")
PY
