#!/usr/bin/env bash
# Set up .venv and run lint, type checks and the test suite (tiny preset; slow/gpu tests deselected).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
.venv/bin/ruff check export engines runtime scripts tests
.venv/bin/mypy runtime export engines
# The TensorRT path cannot run here (no GPU): strict typing is its check on this machine.
.venv/bin/mypy --strict engines runtime/backends/tensorrt.py runtime/backends/trt_manifest.py \
  runtime/backends/trt_shapes.py runtime/backends/trt_refit.py
status=0
# Two workers (pytest-xdist), whole files per worker: a module's fixtures (a Ray cluster, a server
# process) stay in one process; the torch-exported tiny bundle is shared through a file lock.
.venv/bin/python -m pytest -q -n 2 --dist loadfile "$@" || status=$?
# pytest exits 5 when nothing was collected: that is a failure for us, not a pass.
[ "$status" -eq 5 ] && echo "no tests were collected" >&2
exit "$status"
