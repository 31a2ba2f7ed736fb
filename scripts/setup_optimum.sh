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

if [ ! -f "$folder/model_index.json" ]; then
  .venv/bin/python - "$bundle" "$folder" <<'EOF'
import json, os, shutil, sys
from pathlib import Path
from export.models import load_model, save_diffusers_folder
bundle, folder = Path(sys.argv[1]), Path(sys.argv[2])
source = json.loads((bundle / "manifest.json").read_text())["source"]
model = source["preset"] if source["kind"] == "preset" else source["path"]
tmp = folder.with_name(folder.name + ".tmp")
shutil.rmtree(tmp, ignore_errors=True)
save_diffusers_folder(load_model(model, seed=source.get("seed") or 0), tmp)
os.replace(tmp, folder)
EOF
fi

if [ ! -f "$out/model_index.json" ]; then
  rm -rf "$out.tmp"
  .venv-optimum/bin/optimum-cli export onnx --model "$folder" --task text-to-image "$out.tmp"
  mv "$out.tmp" "$out"
fi
echo "optimum baseline ready: --optimum-python .venv-optimum/bin/python --optimum-model $out"
