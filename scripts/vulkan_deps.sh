#!/usr/bin/env bash
# The Vulkan variant's build and run dependencies (Debian/Ubuntu package names):
# headers and loader, the GLSL compiler for ggml's shaders, SPIR-V headers (CMake
# needs their package config) and Mesa's drivers, lavapipe included (a Vulkan
# device on the CPU: what the GPU tests run on where there is no GPU).
# Installs them with apt-get when run as root; otherwise says what is missing and exits 2.
exec bash "$(dirname "$0")/debian_deps.sh" vulkan glslc mesa-vulkan-drivers libvulkan-dev glslc spirv-headers
