#!/usr/bin/env bash
# The Optimum baseline for scripts/bench_e2e.py, on the same weights as a bundle:
#   bash scripts/setup_optimum.sh bundles/sd15        # -> .venv-optimum/, bundles/sd15-optimum/
#   .venv/bin/python scripts/bench_e2e.py --bundle bundles/sd15 \
#       --optimum-python .venv-optimum/bin/python --optimum-model bundles/sd15-optimum
# Optimum's exporter pins transformers<4.58, which cannot share .venv with transformers 5, so it
# gets its own virtualenv (git-ignored). The bundle's source model (preset + seed, or a diffusers
# folder) is written as a diffusers folder by .venv, then exported by `optimum-cli export onnx`.
# Each step is skipped when its output exists.
set -euo pipefail
cd "$(dirname "$0")/.."
bundle=${1:?usage: bash scripts/setup_optimum.sh BUNDLE_DIR}
[ -f "$bundle/manifest.json" ] || { echo "setup_optimum: $bundle has no manifest.json" >&2; exit 2; }
bash scripts/bootstrap.sh
folder="$bundle-diffusers"
out="$bundle-optimum"

if [ ! -x .venv-optimum/bin/optimum-cli ]; then
  python3 -m venv .venv-optimum
  pip() { .venv-optimum/bin/python -m pip --disable-pip-version-check -q "$@"; }
  pip install torch==2.13.0  # first, so nothing pulls a CUDA build
  pip install "optimum==2.1.0" "optimum-onnx[onnxruntime]==0.1.0" "transformers==4.57.6" "diffusers==0.39.0"
fi

.venv/bin/python scripts/diffusers_folder.py "$bundle" "$folder"  # kept when already there

if [ ! -f "$out/model_index.json" ]; then
  rm -rf "$out.tmp"
  .venv-optimum/bin/optimum-cli export onnx --model "$folder" --task text-to-image "$out.tmp"
  mv "$out.tmp" "$out"
fi
echo "optimum baseline ready: --optimum-python .venv-optimum/bin/python --optimum-model $out"
