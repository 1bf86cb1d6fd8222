#!/usr/bin/env bash
# The project's test command (README, .ci/run): sets up libtorch, builds, runs every test.
# Parity tests print every output's error (--nocapture). Tests read the golden fixtures from ../shared/fixtures (override with VTP_FIXTURES).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$VTP_ROOT"
vtp_test_python_packages
cargo fmt --check
cargo test --release --locked -- --test-threads=2 --nocapture
