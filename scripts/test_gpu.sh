#!/usr/bin/env bash
# The GPU half of `make test`: the tests marked `gpu` against the Vulkan variant of the patched
# llama.cpp (its own venv, .venv-vulkan, built and cached like the CPU one), on whatever Vulkan
# device is there: Mesa's lavapipe (a Vulkan driver on the CPU) on a machine without a GPU.
# GGML_VK_VISIBLE_DEVICES=0: ggml skips CPU-type Vulkan devices unless named; GGML_VK_DISABLE_F16=1:
# lavapipe computes in F32, so slots-on vs slots-off is checkable to 1e-4 (tests/test_gpu.py).
# Without the Vulkan packages and no root to install them, says so and skips (exit 0); as root
# (CI on a fresh machine) it installs them, and any failure fails the run.
set -euo pipefail
cd "$(dirname "$0")/.."
rc=0
bash scripts/vulkan_deps.sh || rc=$?
if [ $rc = 2 ]; then
    echo "[test-gpu] skipped: no Vulkan build dependencies and no root to install them (see above)"
    exit 0
fi
[ $rc = 0 ] || exit $rc
MOESPAC_VENV=.venv-vulkan CMAKE_ARGS="${CMAKE_ARGS:-} -DGGML_VULKAN=ON" bash scripts/setup.sh
export GGML_VK_VISIBLE_DEVICES=${GGML_VK_VISIBLE_DEVICES:-0} GGML_VK_DISABLE_F16=1 MOESPAC_REQUIRE_GPU=1
exec .venv-vulkan/bin/python -m pytest -q -m gpu "$@"
