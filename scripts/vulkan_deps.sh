#!/usr/bin/env bash
# The Vulkan variant's build and run dependencies (Debian/Ubuntu package names):
# headers and loader, the GLSL compiler for ggml's shaders, SPIR-V headers (CMake
# needs their package config) and Mesa's drivers, lavapipe included (a Vulkan
# device on the CPU: what the GPU tests run on where there is no GPU).
# Installs them with apt-get when run as root; otherwise says what is missing and exits 2.
set -euo pipefail
PKGS=(mesa-vulkan-drivers libvulkan-dev glslc spirv-headers)
if ! command -v dpkg-query >/dev/null; then
    command -v glslc >/dev/null || { echo "[vulkan] glslc not found: install the Vulkan SDK (headers, loader, glslc)" >&2; exit 2; }
    exit 0
fi
missing=()
for p in "${PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ]; then
    echo "[vulkan] missing packages: ${missing[*]} (run: sudo apt-get install -y ${missing[*]})" >&2
    exit 2
fi
echo "[vulkan] installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get install -y -q "${missing[@]}" >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q "${missing[@]}" >/dev/null; }
