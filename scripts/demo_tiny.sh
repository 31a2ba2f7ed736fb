#!/usr/bin/env bash
# The main job end to end on the `tiny` preset (random weights, so the images are noise):
# set up .venv -> train the tiny deprojector (once; reused afterwards) -> export the bundle
# (reused when unchanged) -> python -m runtime.generate -> out/tiny.png, out/tiny-compose.png
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
py=.venv/bin/python
$py -m export.train_deprojector --model tiny --captions builtin --variant v3 --threads 1 \
  --out bundles/tiny-deprojector --reuse
$py -m export --model tiny --deprojector bundles/tiny-deprojector/deprojector --out bundles/tiny --precision both
$py -m runtime.generate "a photo of a cat maid" --negative "blurry" --bundle bundles/tiny \
  --steps 20 --seed 0 --out out/tiny.png
$py -m runtime.generate "a photo of a cat, (maid:1.3)" --compose --bundle bundles/tiny \
  --steps 20 --seed 0 --out out/tiny-compose.png
