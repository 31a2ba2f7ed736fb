#!/usr/bin/env bash
# The OpenVINO peers of scripts/bench_e2e.py (optimum-intel's OVStableDiffusionPipeline and
# openvino-genai's Text2ImagePipeline), on the same weights as a bundle:
#   bash scripts/setup_openvino_peers.sh bundles/sd15   # -> .venv-ovpeers/, bundles/sd15-openvino/
#   .venv/bin/python scripts/bench_e2e.py --bundle bundles/sd15 \
#       --ov-python .venv-ovpeers/bin/python --ov-model bundles/sd15-openvino
# optimum-intel pins transformers<5.6, which cannot share .venv with transformers 5.24, so the
# peers get their own virtualenv (git-ignored); openvino-genai lives there too, since it reads the
# OpenVINO tokenizer that optimum-intel's exporter writes (openvino-tokenizers). OpenVINO is pinned
# to .venv's version, so the peers and the runtime run the same kernels.
# The bundle's source model is written as a diffusers folder by .venv (shared with
# setup_optimum.sh), then exported to OpenVINO IR (fp32 weights) with its OpenVINO tokenizer; with
# SDRT_OV_INT8=1 also quantized by optimum-intel's hybrid int8 (scripts/ov_hybrid_int8.py, calibrated
# at the bench's 256x256 / 10 steps: --ov-int8-model BUNDLE-openvino-int8).
# Each step is skipped when its output exists. Needs .venv (scripts/bootstrap.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
bundle=${1:?usage: bash scripts/setup_openvino_peers.sh BUNDLE_DIR}
[ -f "$bundle/manifest.json" ] || { echo "setup_openvino_peers: $bundle has no manifest.json" >&2; exit 2; }
[ -x .venv/bin/python ] || { echo "setup_openvino_peers: no .venv; run scripts/bootstrap.sh first" >&2; exit 2; }
venv=.venv-ovpeers
folder="$bundle-diffusers"
out="$bundle-openvino"
ov_version=$(.venv/bin/python -c 'import openvino; print(openvino.get_version().split("-")[0])')

if [ ! -x $venv/bin/optimum-cli ] || ! $venv/bin/python -c 'import openvino_genai, optimum.intel' 2>/dev/null; then
  python3 -m venv $venv
  pip() { $venv/bin/python -m pip --disable-pip-version-check -q "$@"; }
  pip install torch==2.13.0  # first, so nothing pulls a CUDA build
  pip install "openvino==$ov_version" "openvino-tokenizers==$ov_version.0" "openvino-genai==$ov_version.0" \
    "optimum-intel[openvino,diffusers]==2.2.0" "transformers>=4.51,<5.6" "diffusers==0.39.0"
fi

.venv/bin/python scripts/diffusers_folder.py "$bundle" "$folder"

if [ ! -f "$out/model_index.json" ]; then
  rm -rf "$out.tmp"
  $venv/bin/optimum-cli export openvino --model "$folder" --task text-to-image --weight-format fp32 "$out.tmp"
  mv "$out.tmp" "$out"
fi
if [ "${SDRT_OV_INT8:-0}" = 1 ] && [ ! -f "$out-int8/model_index.json" ]; then
  $venv/bin/python scripts/ov_hybrid_int8.py "$out" "$out-int8"
fi
echo "openvino peers ready: --ov-python $venv/bin/python --ov-model $out"
