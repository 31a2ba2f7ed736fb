#!/usr/bin/env bash
# The TensorRT path, end to end, on an NVIDIA GPU host (none of it runs on CPU-only machines):
# .venv + gpu extra -> sd15 bundle -> FP16 engines -> pytest -m gpu -> out/gpu_check.md.
# Steps keep going after a failure so the report shows all of them; the exit status is non-zero
# if any failed. Extra arguments go to `python -m engines.build` (default: --shapes 512x512 --batch 1-4).
set -uo pipefail
cd "$(dirname "$0")/.."
command -v nvidia-smi >/dev/null || { echo "gpu_check: nvidia-smi not found: run this on an NVIDIA GPU host" >&2; exit 3; }
mkdir -p out
report=out/gpu_check.md
log=out/gpu_check.log
: >"$log"
build_args=("$@")
[ ${#build_args[@]} -gt 0 ] || build_args=(--shapes 512x512 --batch 1-4)
declare -a rows
status=0

step() {  # step NAME COMMAND...: run, time, log, and add a row to the report
    local name=$1 start rc
    shift
    echo "== $name: $*" | tee -a "$log"
    start=$(date +%s)
    "$@" 2>&1 | tee -a "$log"
    rc=${PIPESTATUS[0]}
    rows+=("| $name | $([ "$rc" -eq 0 ] && echo ok || echo "FAILED ($rc)") | $(( $(date +%s) - start )) s |")
    [ "$rc" -eq 0 ] || status=1
    return "$rc"
}

pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }

install_gpu() {
    # The gpu extra's `tensorrt` and `cuda-python` are built for CUDA 13 (driver >= 580). On an
    # older driver install their CUDA 12 builds instead (same versions of our code paths).
    local cuda_major
    cuda_major=$(nvidia-smi | sed -n 's/.*CUDA Version: *\([0-9]*\)\..*/\1/p' | head -n1)
    if [ "${cuda_major:-0}" -ge 13 ]; then
        pip install -e ".[gpu]"
    else
        pip install -e . "onnxruntime-gpu>=1.20" "tensorrt-cu12>=10.8" "cuda-python>=12.6,<13"
    fi
    # onnxruntime (a core dependency) and onnxruntime-gpu install the same module: reinstall the
    # GPU build last so that all of its files win.
    local ort
    ort=$(.venv/bin/python -c 'import importlib.metadata as m; print(m.version("onnxruntime-gpu"))') &&
        pip install --force-reinstall --no-deps "onnxruntime-gpu==$ort"
}

environment() {
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    .venv/bin/python -c 'from runtime.backends.tensorrt import probe_environment as p; print(p())'
}

step "environment setup" bash scripts/bootstrap.sh &&
    step "gpu extra" install_gpu &&
    step "probe" environment &&
    step "export sd15" .venv/bin/python -m export --model sd15 --out bundles/sd15 --precision both &&
    step "build engines" .venv/bin/python -m engines.build bundles/sd15 "${build_args[@]}"
step "pytest -m gpu" .venv/bin/python -m pytest -m gpu -q -rs tests/test_engines_gpu.py
step "generate (TensorRT)" .venv/bin/python -m runtime.generate "a cat maid, watercolor" --bundle bundles/sd15 \
    --backend tensorrt --precision fp16 --steps 25 --seed 1 --out out/gpu_check.png

{
    echo "# GPU check ($(date -u +%Y-%m-%dT%H:%MZ), $(git rev-parse --short HEAD 2>/dev/null || echo 'no git'))"
    echo
    echo "| step | result | time |"
    echo "|---|---|---|"
    printf '%s\n' "${rows[@]}"
    echo
    echo "## Environment"
    echo '```'
    grep -A3 '^== probe' "$log" | tail -n +2
    echo '```'
    echo "## Engines"
    echo '```'
    sed -n '/^engine  /,/^==/p' "$log" | grep -v '^=='
    echo '```'
    echo "## Tests"
    echo '```'
    grep -E '(passed|failed|skipped|error)' "$log" | tail -n 5
    echo '```'
    echo "## Stage timings (TensorRT, 512x512, 25 steps)"
    echo '```'
    sed -n '/^stage /,/^total/p' "$log"
    echo '```'
    echo "Full log: $log"
} >"$report"
echo "gpu_check: wrote $report" >&2
exit "$status"
