#!/usr/bin/env bash
# Debian/Ubuntu packages a part of `make test` needs: debian_deps.sh LABEL COMMAND PACKAGE...
# Exits 0 when the packages are installed (or, without dpkg, when COMMAND is on PATH); installs
# the missing ones with apt-get when run as root; otherwise says what is missing and exits 2.
set -euo pipefail
label=$1 command=$2
shift 2
PKGS=("$@")
if ! command -v dpkg-query >/dev/null; then
    command -v "$command" >/dev/null || { echo "[$label] $command not found: install ${PKGS[*]} (or your system's equivalent)" >&2; exit 2; }
    exit 0
fi
missing=()
for p in "${PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ]; then
    echo "[$label] missing packages: ${missing[*]} (run: sudo apt-get install -y ${missing[*]})" >&2
    exit 2
fi
echo "[$label] installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get install -y -q "${missing[@]}" >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q "${missing[@]}" >/dev/null; }
