#!/usr/bin/env bash
# Create (or reuse) .venv at the repo root with everything export, runtime and tests need.
# torch is installed first and pinned: the CPU build lies on this machine's disk, and letting
# another package pull "torch" would download a multi-GB CUDA build instead.
# A stamp of pyproject.toml + this script skips pip when nothing changed since the last run.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
stamp=.venv/.sdrt-bootstrap
want=$(cat pyproject.toml scripts/bootstrap.sh | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && .venv/bin/python -c "import export, runtime" 2>/dev/null; then
  exit 0
fi
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }
pip install torch==2.13.0
pip install -e ".[cpu,openvino,export,test,compare,serve,ray]"
# The real CLIP BPE merges ship in this wheel; --no-deps because we only read one data file
# from it (its dependencies would drag in torchvision).
pip install --no-deps open-clip-torch==3.3.0
.venv/bin/python -c "import torch, diffusers, onnxruntime, tokenizers" \
  || { echo "bootstrap: the environment is incomplete (see pip output above)" >&2; exit 1; }
echo "$want" > "$stamp"
