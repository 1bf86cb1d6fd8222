#!/usr/bin/env bash
# Benchmark (not a test): training-step speed and memory of vtp-rs next to plain PyTorch, in one run on
# the same machine with the same thread count (2):
#   1. `vtp bench --mode pretrain-step` vs `benches/pytorch_pretrain.py --bench`: one all-objectives
#      step of the `small` preset, CLIP 256² × 8 pairs, SSL 2 images (2 × 224² global + 8 × 96² local
#      crops), reconstruction 1 × 256² (the paper's 16k:4k:2k = 8:2:1 split), DINO head K = 65536;
#      L1-only reconstruction, no drop-path on either side.
#   2. `vtp bench --mode recon-step` vs `../shared/bench/pytorch_vtp.py --mode train-step --optim`:
#      a reconstruction-only step of `small` at 256² × 4.
#   3. The main job's step: one all-objectives step of the `tiny` preset as `vtp pretrain --preset tiny`
#      takes it (CLIP 64 × 64², SSL 16 images of 2 × 64² + 4 × 32² crops, reconstruction 16 × 64²,
#      K = 128, L1 + L2), with TINY_ITERS iterations (default 20).
#   4. Leak check: `vtp bench` of both training modes on the `tiny` preset (64²) for 200 steps, with
#      the resident memory after steps 20 and 200.
# Both pre-training steps are profiled (`--profile`: the median seconds of each phase, side by side).
# vtp-rs runs its default one student trunk pass per image size (`loss.merge_trunk_passes`); PyTorch
# runs one pass per objective (the legacy meta-arch), and again with the same merge
# (`--merge-trunk-passes`) to show what eager PyTorch gains from the same trick.
# Both sides use the fused AdamW (vtp's `optim.fused`, torch's `AdamW(fused=True)`); NO_FUSED=1 runs
# both with the single-tensor update instead (torch's CPU default).
# Prints every JSON line, then the ratios. Usage: scripts/bench_train.sh (ITERS=2 WARMUP=1 by default).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$VTP_ROOT"
cargo build --release --locked -q
PYBENCH="${VTP_PYBENCH:-$VTP_ROOT/../shared/bench/pytorch_vtp.py}"
VTP=(target/release/vtp --device cpu --threads 2 bench)
T=(--iters "${ITERS:-2}" --warmup "${WARMUP:-1}")
TT=(--iters "${TINY_ITERS:-20}" --warmup 3)
if [[ -n "${NO_FUSED:-}" ]]; then FUSED=(--set optim.fused=false); TORCH_FUSED=--no-fused; else FUSED=(); TORCH_FUSED=--fused; fi
echo "load before: $(cut -d' ' -f1-3 /proc/loadavg)" >&2

rust_pre=$("${VTP[@]}" --mode pretrain-step --preset small --size 256 --batch 8 "${T[@]}" --profile "${FUSED[@]}" 2>/dev/null)
echo "$rust_pre"
torch_pre=$(python benches/pytorch_pretrain.py --bench --bench-dir "$(dirname "$PYBENCH")" --preset small --threads 2 \
  --batch 8 --batch-ssl 2 --batch-recon 1 --clip-size 256 --global-size 224 --local-size 96 --n-local-crops 8 \
  --recon-size 256 "${T[@]}" --profile $TORCH_FUSED 2>/dev/null)
echo "$torch_pre"
torch_pre_merged=$(python benches/pytorch_pretrain.py --bench --bench-dir "$(dirname "$PYBENCH")" --preset small --threads 2 \
  --batch 8 --batch-ssl 2 --batch-recon 1 --clip-size 256 --global-size 224 --local-size 96 --n-local-crops 8 \
  --recon-size 256 "${T[@]}" $TORCH_FUSED --merge-trunk-passes 2>/dev/null)
echo "$torch_pre_merged"
rust_rec=$("${VTP[@]}" --mode recon-step --preset small --size 256 --batch 4 "${T[@]}" "${FUSED[@]}" 2>/dev/null)
echo "$rust_rec"
torch_rec=$(python "$PYBENCH" --preset small --mode train-step --optim --size 256 --batch 4 --threads 2 "${T[@]}")
echo "$torch_rec"
mapfile -t TINY_ARGS < <(target/release/vtp pretrain --preset tiny --print-config | python benches/preset_args.py)
rust_tiny=$("${VTP[@]}" --mode pretrain-step --preset tiny --size 64 --batch 64 --set batch.recon=16 "${TT[@]}" --profile \
  "${FUSED[@]}" 2>/dev/null)
echo "$rust_tiny"
torch_tiny=$(python benches/pytorch_pretrain.py --bench --bench-dir "$(dirname "$PYBENCH")" --preset tiny --threads 2 \
  --batch 64 --batch-ssl 16 --batch-recon 16 --clip-size 64 --recon-size 64 "${TINY_ARGS[@]}" "${TT[@]}" --profile \
  $TORCH_FUSED 2>/dev/null)
echo "$torch_tiny"
torch_tiny_merged=$(python benches/pytorch_pretrain.py --bench --bench-dir "$(dirname "$PYBENCH")" --preset tiny --threads 2 \
  --batch 64 --batch-ssl 16 --batch-recon 16 --clip-size 64 --recon-size 64 "${TINY_ARGS[@]}" "${TT[@]}" \
  $TORCH_FUSED --merge-trunk-passes 2>/dev/null)
echo "$torch_tiny_merged"
leak_pre=$("${VTP[@]}" --mode pretrain-step --preset tiny --size 64 --batch 8 --iters 200 --warmup 0 2>/dev/null)
echo "$leak_pre"
leak_rec=$("${VTP[@]}" --mode recon-step --preset tiny --size 64 --batch 4 --iters 200 --warmup 0 2>/dev/null)
echo "$leak_rec"
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)" >&2

python - "$rust_pre" "$torch_pre" "$rust_rec" "$torch_rec" "$leak_pre" "$leak_rec" "$rust_tiny" "$torch_tiny" \
  "$torch_pre_merged" "$torch_tiny_merged" <<'PY'
import json, sys
rp, tp, rr, tr, lp, lr, rt, tt, tpm, ttm = (json.loads(a) for a in sys.argv[1:11])
for name, r, t in (("pretrain-step small", rp, tp), ("recon-step small", rr, tr), ("pretrain-step tiny", rt, tt)):
    mem = f", peak RSS {r['peak_rss_mib']:.0f} MiB vs {t['peak_rss_mib']:.0f} MiB" if "peak_rss_mib" in t else \
        f", vtp-rs peak RSS {r['peak_rss_mib']:.0f} MiB"
    print(f"{name}: vtp-rs {r['img_per_s']:.4f} img/s ({r['s_per_iter']:.2f} s/step), PyTorch {t['img_per_s']:.4f} img/s "
          f"({t['s_per_iter']:.2f} s/step), ratio {r['img_per_s'] / t['img_per_s']:.3f}x{mem}")
for name, r, t in (("pretrain-step small", rp, tpm), ("pretrain-step tiny", rt, ttm)):
    print(f"{name}: PyTorch with the same merged trunk passes {t['img_per_s']:.4f} img/s, ratio "
          f"{r['img_per_s'] / t['img_per_s']:.3f}x")
for name, r, t in (("pretrain-step small", rp, tp), ("pretrain-step tiny", rt, tt)):
    print(f"{name} phases (median ms): vtp-rs / PyTorch")
    for phase in r["phases"]:
        print(f"  {phase:32s} {1e3 * r['phases'][phase]:8.1f} / {1e3 * t['phases'].get(phase, float('nan')):8.1f}")
for name, l in (("pretrain-step tiny", lp), ("recon-step tiny", lr)):
    print(f"leak check {name}: RSS {l['rss_after_20_mib']:.1f} MiB after 20 steps, {l['rss_after_200_mib']:.1f} MiB after 200 "
          f"({l['rss_after_200_mib'] - l['rss_after_20_mib']:+.1f} MiB), peak {l['peak_rss_mib']:.1f} MiB")
PY
