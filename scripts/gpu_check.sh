#!/usr/bin/env bash
# The TensorRT and ONNX Runtime CUDA paths, end to end, on an NVIDIA GPU host (CPU-only machines
# cannot run any of it). Cheap checks first, so that a broken step is found in minutes:
#   preflight -> .venv (export, test extras only) -> GPU packages -> probe -> tiny bundle ->
#   tiny TensorRT engines -> GPU parity tests (TensorRT and ORT CUDA) -> sd15 export ->
#   sd15 engines -> 512x512 generation -> benchmark (4 images, engines and graphs warm).
# It stops at the first step that fails. out/gpu_check.md names that step and keeps every figure
# of the steps that passed; out/gpu_check.log has all output. Exit status: that step's, or 0.
#
# GPU packages, by the driver's CUDA version (nvidia-smi): CUDA >= 13 installs the gpu extra
# (tensorrt-cu13 10.x, cuda-python 13, onnxruntime-gpu[cuda,cudnn] >= 1.27); CUDA 12 installs the
# same for cu12. TensorRT's libs wheels on PyPI are stubs that download from NVIDIA's own index
# while installing: if that is blocked, point pip at local wheels (PIP_FIND_LINKS=/dir) first.
# Extra arguments go to the sd15 `python -m engines.build` (default: --shapes 512x512 --batch 1-4).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
mkdir -p out
report=out/gpu_check.md
log=out/gpu_check.log
work=out/gpu_check
: >"$log"
build_args=("$@")
[ ${#build_args[@]} -gt 0 ] || build_args=(--shapes 512x512 --batch 1-4)
rows=()
failed=""
# The CUDA major the driver supports (steps run in subshells: read it here, once).
driver_cuda=$(nvidia-smi 2>/dev/null | sed -n 's/.*CUDA Version: *\([0-9]*\)\..*/\1/p' | head -n1)
started=$(date -u +%Y-%m-%dT%H:%MZ)

# step NAME COMMAND...: run, time and log it, add a row to the report; on failure, stop the check.
step() {
    local name=$1 start rc
    shift
    echo "== $name: $*" | tee -a "$log"
    start=$(date +%s)
    "$@" 2>&1 | tee -a "$log"
    rc=${PIPESTATUS[0]}
    rows+=("| $name | $([ "$rc" -eq 0 ] && echo ok || echo "**FAILED** (exit $rc)") | $(($(date +%s) - start)) s |")
    if [ "$rc" -ne 0 ]; then
        failed=$name
        exit "$rc" # the EXIT trap writes the report
    fi
}

# section TITLE STEP-NAME [LINES]: the last log lines of one step that ran (nothing if it did not).
section() {
    grep -q "^== $2:" "$log" || return 0
    echo "## $1"
    echo '```'
    awk -v head="== $2:" 'index($0, head) == 1 {on = 1; next} /^== / {on = 0} on' "$log" | tail -n "${3:-40}"
    echo '```'
}

write_report() {
    {
        echo "# GPU check ($started, $(git rev-parse --short HEAD 2>/dev/null || echo 'no git'))"
        echo
        if [ -n "$failed" ]; then
            echo "**Failed at step: $failed** (the steps after it did not run; its output is below)."
        else
            echo "All steps passed."
        fi
        echo
        echo "| step | result | time |"
        echo "|---|---|---|"
        printf '%s\n' "${rows[@]}"
        echo
        [ -z "$failed" ] || section "Output of the failed step ($failed)" "$failed" 60
        [ "$failed" = preflight ] || section "Environment" "preflight" 10
        section "Probe" "probe" 20
        section "Tiny engines" "tiny engines"
        section "GPU parity tests" "GPU parity tests" 15
        section "sd15 engines" "sd15 engines"
        section "512x512 generation (TensorRT, 25 steps, cold start)" "generate 512x512"
        section "Benchmark (TensorRT, 512x512, 25 steps, 4 images)" "benchmark"
        echo "Full log: $log"
    } >"$report"
    echo "gpu_check: wrote $report${failed:+ (failed at: $failed)}" >&2
}
trap write_report EXIT

pip() { .venv/bin/python -m pip --disable-pip-version-check "$@"; }

preflight() {
    command -v nvidia-smi >/dev/null || { echo "nvidia-smi not found: run this on an NVIDIA GPU host"; return 3; }
    nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv,noheader || return 3
    echo "driver CUDA version: ${driver_cuda:-unknown}"
    [ "${driver_cuda:-0}" -ge 12 ] || { echo "the driver must support CUDA 12 or newer"; return 3; }
    df -h . | tail -n1 # sd15 needs ~15 GB: bundle, engines, torch
}

# The GPU packages for the driver's CUDA major, each install its own step-failing command.
install_gpu() {
    pip install -q --upgrade pip wheel || return # NVIDIA's wheels want a current pip
    if [ "$driver_cuda" -ge 13 ]; then
        pip install -q -e ".[gpu]" || return
    else
        pip install -q "onnxruntime-gpu[cuda,cudnn]>=1.21,<1.27" "tensorrt-cu12>=10.16,<11" "cuda-python>=12.6,<13" ||
            return
    fi
    # onnxruntime (CPU) and onnxruntime-gpu install the same module; a .venv from a full bootstrap
    # has the CPU one: remove it, then reinstall the GPU build so that all of its files are there.
    if pip show -q onnxruntime 2>/dev/null; then
        pip uninstall -q -y onnxruntime || return
        local version
        version=$(.venv/bin/python -c 'import importlib.metadata as m; print(m.version("onnxruntime-gpu"))') || return
        pip install -q --force-reinstall --no-deps "onnxruntime-gpu==$version" || return
    fi
}

probe() {
    .venv/bin/python - <<'PY'
import onnxruntime as ort

from runtime.backends.tensorrt import probe_environment

print(probe_environment())
print("onnxruntime", ort.__version__, ort.get_available_providers())
PY
}

# pytest passes when every test is skipped (no TensorRT, no CUDA provider): here that is a failure.
parity_tests() {
    local out rc
    out=$(.venv/bin/python -m pytest -m gpu -q -rs tests/test_engines_gpu.py tests/test_ort_cuda.py 2>&1)
    rc=$?
    echo "$out"
    [ "$rc" -eq 0 ] || return "$rc"
    if grep -q "skipped" <<<"$out"; then
        echo "gpu_check: GPU tests were skipped (reasons above): the GPU path did not run"
        return 1
    fi
}

step "preflight" preflight
step "environment setup" env SDRT_EXTRAS=export,test bash scripts/bootstrap.sh
step "GPU packages (CUDA $driver_cuda)" install_gpu
step "probe" probe
step "tiny bundle" .venv/bin/python -m export --model tiny --out "$work/tiny" --precision both
step "tiny engines" .venv/bin/python -m engines.build "$work/tiny" --shapes 128x128 --dynamic 64-256 --batch 1-4
step "GPU parity tests" parity_tests
step "sd15 export" .venv/bin/python -m export --model sd15 --out bundles/sd15 --precision both
step "sd15 engines" .venv/bin/python -m engines.build bundles/sd15 "${build_args[@]}"
generate=(.venv/bin/python -m runtime.generate "a cat maid, watercolor" --bundle bundles/sd15 --backend tensorrt
    --size 512x512 --steps 25)
step "generate 512x512" "${generate[@]}" --seed 1 --out out/gpu_check.png
step "benchmark" "${generate[@]}" --seed 2 --num-images 4 --out "$work/bench.png"
