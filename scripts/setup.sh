#!/usr/bin/env bash
# Fresh machine -> built `vtp`: creates .venv with the pinned torch==2.13.0 wheel (libtorch for tch;
# reused when the version matches) and builds target/release/vtp, linked with an rpath so it runs
# from any shell without environment variables.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$VTP_ROOT"
cargo build --release --locked
echo "built $VTP_ROOT/target/release/vtp" >&2
