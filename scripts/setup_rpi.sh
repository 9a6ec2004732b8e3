#!/usr/bin/env bash
# One-command set-up on a fresh 64-bit Raspberry Pi OS (or any Linux CPU machine):
#   bash scripts/setup_rpi.sh [--minimal] [--system-site-packages]
# Creates .venv in the repository, installs CPU-only PyTorch from PyTorch's CPU wheel index, the
# other dependencies, both kernel packages and this project (editable), and runs a smoke test.
# --minimal skips the optional torchvision, timm, OpenCV (--video FILE|INDEX), the HTTP
#   server's packages and numba (the fused kernels, about 2x faster).
# --system-site-packages lets the venv see apt's Python packages, for the Pi camera module
#   (sudo apt install python3-picamera2; infer_rpi.py --video picam), and keeps the system's
#   numpy, which apt's packages are built against; running without it again turns that off.
#   Either way an existing venv is updated, not recreated.
# Overrides (environment):
#   TORCH_VERSION        [2.9.1]   torch version (2.10.0 crashes at import on a Pi 4)
#   TORCHVISION_VERSION  [the release built for TORCH_VERSION, e.g. 0.24.* for 2.9.x]
#   TORCH_INDEX_URL      [https://download.pytorch.org/whl/cpu]  empty: use pip's default index
#                        (a build that would pull CUDA packages is refused)
#   PYTHON               [python3]
#   VENV                 [.venv]
set -euo pipefail

CPU_INDEX=https://download.pytorch.org/whl/cpu
TORCH_VERSION=${TORCH_VERSION:-2.9.1}
TORCH_INDEX_URL=${TORCH_INDEX_URL-$CPU_INDEX}
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
MIN_FREE_MB=2000
EXTRAS=1
SYSTEM_SITE=0

for arg in "$@"; do
  case "$arg" in
    --minimal) EXTRAS=0 ;;
    --system-site-packages) SYSTEM_SITE=1 ;;
    -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
    *) echo "setup_rpi.sh: unknown option $arg (see --help)" >&2; exit 2 ;;
  esac
done

die() { echo "setup_rpi.sh: $*" >&2; exit 1; }
cd "$(dirname "$0")/.."

# Each torchvision release is built for one torch release and pins it exactly: torch 2.M.x pairs
# with torchvision 0.(M+15).x (2.9.1 with 0.24.1, 2.13.0 with 0.28.0), and the wildcard lets pip
# pick the patch release whose pin matches.
if [ "$EXTRAS" = 1 ] && [ -z "${TORCHVISION_VERSION:-}" ]; then
  [[ $TORCH_VERSION =~ ^2\.([0-9]+)\.[0-9]+$ ]] \
    || die "no torchvision release known for TORCH_VERSION=$TORCH_VERSION: set TORCHVISION_VERSION too (or use --minimal)"
  TORCHVISION_VERSION="0.$((BASH_REMATCH[1] + 15)).*"
fi

arch=$(uname -m)
case "$arch" in
  aarch64|arm64) ;;
  armv7l|armv6l|armhf)
    die "this is a 32-bit OS ($arch). PyTorch publishes no 32-bit ARM wheels: install the 64-bit
Raspberry Pi OS (Raspberry Pi Imager: 'Raspberry Pi OS (64-bit)') on a Pi 3, 4 or 5 and run this again." ;;
  x86_64) echo "note: $arch machine, not a Pi; installing the same CPU-only stack" ;;
  *) die "unsupported machine type $arch (need 64-bit ARM or x86-64)" ;;
esac

command -v "$PYTHON" >/dev/null || die "$PYTHON not found: sudo apt install python3 python3-venv"
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 9))' \
  || die "Python >= 3.9 needed, found $("$PYTHON" -V 2>&1)"
"$PYTHON" -c 'import venv, ensurepip' 2>/dev/null || die "Python's venv module is missing: sudo apt install python3-venv"

free_mb=$(df -Pm . | awk 'NR==2 {print $4}')
[ "$free_mb" -ge "$MIN_FREE_MB" ] || die "only ${free_mb} MB free here; PyTorch needs about ${MIN_FREE_MB} MB"

echo "== creating $VENV"
venv_args=()
[ "$SYSTEM_SITE" = 0 ] || venv_args=(--system-site-packages)
"$PYTHON" -m venv "${venv_args[@]}" "$VENV"
pip=("$VENV/bin/python" -m pip install --disable-pip-version-check)

rm -f "$VENV/system-numpy.txt"
if [ "$SYSTEM_SITE" = 1 ]; then
  # apt's Python packages (picamera2's simplejpeg) are built against the system's numpy: read it
  # with the system interpreter (in the venv, a numpy of its own would answer), remove a venv numpy
  # that shadows it, and hold every install from here on (OpenCV, torchvision, numba) to it.
  if system_numpy=$("$PYTHON" -I -c 'import numpy; print(numpy.__version__)' 2>/dev/null); then
    if "$VENV/bin/python" -I -c 'import os, sys, numpy
sys.exit(not os.path.realpath(numpy.__file__).startswith(os.path.realpath(sys.prefix) + os.sep))' 2>/dev/null; then
      echo "== removing the venv's numpy, which hides the system's numpy $system_numpy"
      "$VENV/bin/python" -m pip uninstall --disable-pip-version-check -y numpy
    fi
    echo "numpy==$system_numpy" >"$VENV/system-numpy.txt"
    export PIP_CONSTRAINT="${PIP_CONSTRAINT:+$PIP_CONSTRAINT }$VENV/system-numpy.txt"
    echo "keeping the system's numpy $system_numpy"
  else
    echo "note: $PYTHON has no numpy yet (sudo apt install python3-picamera2 brings it); pip installs one"
  fi
fi

echo "== installing torch $TORCH_VERSION${TORCH_INDEX_URL:+ from $TORCH_INDEX_URL}"
index=()
[ -z "$TORCH_INDEX_URL" ] || index=(--index-url "$TORCH_INDEX_URL")
torch_pkgs=("torch==$TORCH_VERSION")
[ "$EXTRAS" = 0 ] || torch_pkgs+=("torchvision==$TORCHVISION_VERSION")
if [ "$TORCH_INDEX_URL" != "$CPU_INDEX" ]; then
  # Another index may hold CUDA builds under the same version (PyPI does for x86-64, and for
  # aarch64 from torch 2.11), which pull gigabytes of nvidia packages: install torch alone first
  # and read what it requires, before pip fetches any of that.
  "${pip[@]}" "${index[@]}" --no-deps "torch==$TORCH_VERSION"
  cuda=$("$VENV/bin/python" -I -c 'from importlib.metadata import requires
from pip._vendor.packaging.requirements import Requirement
needs = [Requirement(r) for r in requires("torch") or []]
print(" ".join(sorted(r.name for r in needs if r.name.lower().startswith(("nvidia-", "cuda-", "triton"))
                      and (r.marker is None or r.marker.evaluate({"extra": ""})))))')
  if [ -n "$cuda" ]; then
    "$VENV/bin/python" -m pip uninstall --disable-pip-version-check -q -y torch
    where=${TORCH_INDEX_URL:-"pip's default index"}
    die "$where has a CUDA build of torch $TORCH_VERSION here (it needs $cuda);
unset TORCH_INDEX_URL to use PyTorch's CPU index ($CPU_INDEX), or set it to a mirror of that index"
  fi
fi
"${pip[@]}" "${index[@]}" "${torch_pkgs[@]}"

# The rest in one resolution: what pip picks for one package (numpy for OpenCV, say) then suits
# all of them, and pip starts once (seconds on a Pi).
packages=("numpy>=1.22" "pillow>=9.1" "tqdm>=4.60" "huggingface_hub>=1.1,<3")
if [ "$EXTRAS" = 1 ]; then
  echo "== installing the other dependencies (timm, OpenCV, the HTTP server's, numba) and this project"
  packages+=("timm>=0.9" -r scripts/requirements-camera.txt -r scripts/requirements-serve.txt -r scripts/requirements-numba.txt)
else
  echo "== installing the other dependencies and this project"
fi
"${pip[@]}" "${packages[@]}" -e causal-conv1d -e mamba-1p1p1 -e .

if [ "$EXTRAS" = 1 ]; then
  echo "== compiling the fused Vim kernels for this CPU (once; later runs load them) and checking them"
  # One line: the kernels match the pure-PyTorch path and where they are cached, or why they will
  # not be used. Either way the model runs, so the set-up goes on.
  "$VENV/bin/python" -m mamba_ssm.kernel_check || true
fi

echo "== smoke test"
"$VENV/bin/python" - <<'PY'
import torch
import mamba_ssm
import vim_rpi
from vim_rpi import cli

model = vim_rpi.create_model("vim_tiny", depth=2, embed_dim=64, img_size=64).eval()
with torch.inference_mode():
    logits = model(torch.randn(1, 3, 64, 64))
assert logits.shape == (1, 1000) and torch.isfinite(logits).all()
print(f"ok: torch {torch.__version__}, {torch.get_num_threads()} threads; "
      f"kernels: {cli.kernels_text(mamba_ssm.kernel_report(model))}")
PY
echo
echo "Done. Classify the bundled sample photo (downloads the Vim-Tiny weights, ~115 MB, on first use;"
echo "HF_ENDPOINT=https://hf-mirror.com for a mirror), or pass your own images:"
echo "  $VENV/bin/python vim/infer_rpi.py"
[ "$EXTRAS" = 0 ] || echo "Or serve a page and an API on http://127.0.0.1:8000/: $VENV/bin/python vim/serve_rpi.py"
