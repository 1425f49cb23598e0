#!/usr/bin/env bash
# The GPU tier on a real CUDA machine, in one prepared run (target: under 8 minutes on 16 cores):
#   1. build the CUDA variant of the patched llama.cpp for the GPU present only (one architecture,
#      no examples), in its own venv (.venv-cuda), cached like every variant;
#   2. the GPU test subset (tests marked gpu) on it;
#   3. the GPU benchmark on smolmoe-32x with a GPU budget of ~25% of its experts:
#      bench/results/gpu_cuda.{json,md} (or $OUT/ when set, as the device runner collects it).
# Each phase is timed (printed, and written to gpu_cuda_phases.txt beside the results).
# Needs the package registries (pip, the llama-cpp-python sdist) or a filled $MOESPAC_CACHE, and a
# CUDA toolkit with cuBLAS (nvcc on PATH or in /usr/local/cuda).
set -euo pipefail
cd "$(dirname "$0")/.."
RESULTS=${OUT:-bench/results}
mkdir -p "$RESULTS"
PHASES="$RESULTS/gpu_cuda_phases.txt"
: >"$PHASES"
export PATH="$PATH:/usr/local/cuda/bin"
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}
PY=.venv-cuda/bin/python

phase() {  # phase NAME COMMAND...: run, time, record
    local name=$1 start rc=0
    shift
    start=$(date +%s)
    echo "[device-check] $name ..." >&2
    "$@" || rc=$?
    echo "$name: $(($(date +%s) - start)) s (exit $rc)" | tee -a "$PHASES" >&2
    return $rc
}

arch=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d '. ')
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$PHASES" >&2
phase "build (CUDA, sm_$arch)" env MOESPAC_VENV=.venv-cuda \
    CMAKE_ARGS="-DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=$arch -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF" \
    bash scripts/setup.sh
phase "models (smolmoe-32x)" .venv-cuda/bin/moespac models build smolmoe-32x
phase "GPU tests" env MOESPAC_REQUIRE_GPU=1 "$PY" -m pytest -q -m gpu -p no:cacheprovider
budget=$("$PY" -c "
from moespac_gguf.core.layout import read_layout
from moespac_gguf.demo.catalog import model_path
layout = read_layout(model_path('smolmoe-32x'))
print(int(0.25 * sum(l.bytes_per_expert * layout.n_expert for l in layout.layers)))")
phase "GPU benchmark (budget $budget bytes)" .venv-cuda/bin/moespac bench -m smolmoe-32x -md smollm2 \
    --gpu-budget "$budget" --limit 8 -n 64 --out "$RESULTS/gpu_cuda.json"
cat "$RESULTS/gpu_cuda.md"
