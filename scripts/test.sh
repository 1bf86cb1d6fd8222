#!/usr/bin/env bash
# The project's test command (README, .ci/run): sets up libtorch, builds, runs every test.
# Parity tests print every output's error (--nocapture). Tests read the golden fixtures from ../shared/fixtures (override with VTP_FIXTURES).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$VTP_ROOT"
vtp_test_python_packages
# The CPU kernels libtorch runs here (float32 results depend on them; tests/parity.rs, README "Reference
# dumps"): ATen's dispatch capability, and oneDNN's ISA as its verbose mode reports it on a convolution.
python - <<'PY'
import os, subprocess, sys, torch
pins = {k: os.environ[k] for k in ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY") if k in os.environ}
code = "import torch; torch.nn.functional.conv2d(torch.randn(1, 16, 64, 64), torch.randn(32, 16, 3, 3))"
out = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, ONEDNN_VERBOSE="1"),
                     capture_output=True, text=True).stdout
isa = next((l.split("isa:", 1)[1] for l in out.splitlines() if ",isa:" in l), "unknown")
print(f"CPU kernels: ATen {torch.backends.cpu.get_cpu_capability()}, oneDNN {isa}; pinned by environment: {pins or 'no'}")
PY
cargo fmt --check
# Two tests run at once and each starts processes with 2 intra-op threads: OpenMP threads that spin
# between kernels (libgomp's default) would then take the cores from each other. Passive waiting
# changes when threads sleep, never what they compute (README "Performance").
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
cargo test --release --locked -- --test-threads=2 --nocapture
