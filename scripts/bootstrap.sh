#!/usr/bin/env bash
# Create (or reuse) .venv at the repo root with everything export, runtime and tests need.
# torch is installed first and pinned. On this machine its CPU build lies on disk (pip's
# find-links); elsewhere, on Linux x86_64, the registry's torch==2.13.0 is its CUDA 13 build
# (~3 GB with its nvidia-* wheels): export runs on the CPU either way, and on a GPU host that
# build's cuDNN and CUDA runtime wheels are the cu13 ones the gpu extra needs as well.
# SDRT_EXTRAS picks the extras (default: all but gpu); scripts/gpu_check.sh asks for export,test.
# A stamp of pyproject.toml + this script + the extras skips pip when nothing changed since.
set -euo pipefail
cd "$(dirname "$0")/.."
extras=${SDRT_EXTRAS:-cpu,openvino,int8,export,test,compare,serve,ray}
if [ ! -x .venv/bin/python ]; then
  if ! python3 -c 'import ensurepip, venv' 2>/dev/null; then
    minor=$(python3 -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")' 2>/dev/null || echo 3)
    echo "bootstrap: $(command -v python3 || echo python3) cannot create virtual environments (no ensurepip):" \
      "install python3-venv (Debian/Ubuntu: apt-get install python${minor}-venv) and run this again" >&2
    exit 1
  fi
  python3 -m venv .venv
fi
stamp=.venv/.sdrt-bootstrap
want=$( (cat pyproject.toml scripts/bootstrap.sh; echo "$extras") | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && .venv/bin/python -c "import export, runtime" 2>/dev/null; then
  exit 0
fi
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }
pip install torch==2.13.0
.venv/bin/python -c 'import torch; print(f"bootstrap: torch {torch.__version__} (CUDA build: {torch.version.cuda})")'
pip install -e ".[$extras]"
# The real CLIP BPE merges ship in this wheel; --no-deps because we only read one data file
# from it (its dependencies would drag in torchvision).
pip install --no-deps open-clip-torch==3.3.0
modules=torch,diffusers,tokenizers
case ",$extras," in *,cpu,*) modules+=,onnxruntime ;; esac  # gpu_check.sh installs onnxruntime-gpu after
.venv/bin/python -c "import $modules" \
  || { echo "bootstrap: the environment is incomplete (see pip output above)" >&2; exit 1; }
echo "$want" > "$stamp"
