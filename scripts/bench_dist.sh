#!/usr/bin/env bash
# Benchmark (not a test): 2-process CPU scaling of one all-objectives pre-training step, vtp-rs next to
# plain PyTorch, in one run on the same machine, the same global batch in every configuration:
#   1. `vtp launch --nproc-per-node 2 -- ... bench --mode pretrain-step`: data parallel, 2 processes × 1 thread
#   2. `vtp --threads 2 bench --mode pretrain-step`: 1 process × 2 threads
#   3. `torchrun --nproc-per-node 2 benches/pytorch_pretrain.py --bench --threads 1`: PyTorch DDP (Gloo), 2 × 1
#   4. `python benches/pytorch_pretrain.py --bench --threads 2`: 1 × 2
# The PyTorch runs get the sizes `vtp bench --mode pretrain-step` uses (CLIP batch B, SSL max(2, B/4),
# reconstruction max(1, B/8), CLIP / reconstruction crops SIZE) and, from `vtp pretrain --preset P
# --print-config`, the preset's crops, DINO head, teacher centring and architecture. img_per_s is global
# CLIP images per second (rank 0's median step). Prints every JSON line, then per implementation the img/s
# of 2×1 and 1×2, the scaling (2×1)/(1×2) and the vtp-rs / PyTorch ratio of each configuration.
# Usage: scripts/bench_dist.sh; environment: PRESET=tiny SIZE=64 BATCH=64 ITERS=20 WARMUP=3 PRECISION=f32
# OVERLAP=false (vtp-rs: true all-reduces the gradient buckets during the backward pass, DDP's Reducer, as
# PyTorch DDP always does).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$VTP_ROOT"
cargo build --release --locked -q
PRESET="${PRESET:-tiny}"
SIZE="${SIZE:-64}"
BATCH="${BATCH:-64}"
ITERS="${ITERS:-20}"
WARMUP="${WARMUP:-3}"
PRECISION="${PRECISION:-f32}"
OVERLAP="${OVERLAP:-false}"
BATCH_SSL=$((BATCH / 4 > 2 ? BATCH / 4 : 2))
BATCH_RECON=$((BATCH / 8 > 1 ? BATCH / 8 : 1))
VTP=target/release/vtp
# The last JSON line of a run's stdout (rank 0's; fails when there is none).
json_line() { grep '^{' | tail -n 1; }

# The preset's crop sizes, DINO head, teacher centring and architecture, as vtp's bench builds them.
mapfile -t PRESET_ARGS < <("$VTP" pretrain --preset "$PRESET" --print-config | python benches/preset_args.py)
BENCH=(bench --mode pretrain-step --preset "$PRESET" --size "$SIZE" --batch "$BATCH" --iters "$ITERS" --warmup "$WARMUP"
  --precision "$PRECISION" --set "dist.overlap=$OVERLAP")
TORCH=(benches/pytorch_pretrain.py --bench --preset "$PRESET" --batch "$BATCH" --batch-ssl "$BATCH_SSL"
  --batch-recon "$BATCH_RECON" --clip-size "$SIZE" --recon-size "$SIZE" "${PRESET_ARGS[@]}" --iters "$ITERS"
  --warmup "$WARMUP" --precision "$PRECISION")
echo "load before: $(cut -d' ' -f1-3 /proc/loadavg)" >&2

rust_dp=$("$VTP" launch --nproc-per-node 2 -- --threads 1 --device cpu "${BENCH[@]}" 2>/dev/null | json_line)
echo "$rust_dp"
rust_mt=$("$VTP" --threads 2 --device cpu "${BENCH[@]}" 2>/dev/null | json_line)
echo "$rust_mt"
torch_dp=$(OMP_NUM_THREADS=1 torchrun --standalone --nproc-per-node 2 "${TORCH[@]}" --threads 1 | json_line)
echo "$torch_dp"
torch_mt=$(python "${TORCH[@]}" --threads 2 | json_line)
echo "$torch_mt"
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)" >&2

python - "$rust_dp" "$rust_mt" "$torch_dp" "$torch_mt" <<'PY'
import json, sys
rd, rm, td, tm = (json.loads(a) for a in sys.argv[1:5])
keys = ("batch", "batch_ssl", "batch_recon", "clip_size", "recon_size", "precision")
sizes = {tuple(line[k] for k in keys) for line in (rd, rm, td, tm)}
assert len(sizes) == 1, f"the four runs differ in global batch / sizes / precision: {sizes}"
for name, dp, mt in (("vtp-rs", rd, rm), ("PyTorch", td, tm)):
    assert dp.get("world") == 2 and mt.get("world", 1) == 1, f"{name}: world sizes {dp.get('world')}, {mt.get('world')}"
    print(f"{name}: 2x1 {dp['img_per_s']:.2f} img/s ({dp['s_per_iter']:.3f} s/step), 1x2 {mt['img_per_s']:.2f} img/s "
          f"({mt['s_per_iter']:.3f} s/step), scaling (2x1)/(1x2) {dp['img_per_s'] / mt['img_per_s']:.3f}x")
for name, r, t in (("2x1", rd, td), ("1x2", rm, tm)):
    print(f"vtp-rs / PyTorch {name}: {r['img_per_s'] / t['img_per_s']:.3f}x")
print(f"(preset {rd['preset']}, global batch CLIP {rd['batch']} / SSL {rd['batch_ssl']} / reconstruction "
      f"{rd['batch_recon']}, size {rd['clip_size']}, precision {rd['precision']}, vtp-rs overlap {rd['overlap']})")
PY
