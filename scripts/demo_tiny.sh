#!/usr/bin/env bash
# The main job end to end on the `tiny` preset (random weights):
# set up .venv -> export the bundle -> python -m runtime.generate -> out/tiny.png
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
.venv/bin/python -m export --model tiny --out bundles/tiny --precision both
.venv/bin/python -m runtime.generate "cat maid" --negative "blurry" --bundle bundles/tiny \
  --steps 20 --seed 0 --out out/tiny.png
.venv/bin/python -m runtime.generate "cat, (maid:1.3)" --compose --bundle bundles/tiny \
  --steps 20 --seed 0 --out out/tiny-compose.png
