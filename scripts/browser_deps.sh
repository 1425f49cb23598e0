#!/usr/bin/env bash
# What the browser test of `moespac serve`'s page (tests/test_server_browser.py) and
# scripts/server_screenshot.py drive: Debian's Chromium and its chromedriver (selenium itself
# is a Python package in the venv). Installs them with apt-get when run as root; otherwise
# says what is missing and exits 2.
set -euo pipefail
PKGS=(chromium chromium-driver)
if ! command -v dpkg-query >/dev/null; then
    command -v chromedriver >/dev/null || { echo "[browser] chromedriver not found: install Chromium and its chromedriver" >&2; exit 2; }
    exit 0
fi
missing=()
for p in "${PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ]; then
    echo "[browser] missing packages: ${missing[*]} (run: sudo apt-get install -y ${missing[*]})" >&2
    exit 2
fi
echo "[browser] installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get install -y -q "${missing[@]}" >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q "${missing[@]}" >/dev/null; }
