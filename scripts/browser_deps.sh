#!/usr/bin/env bash
# What the browser test of `moespac serve`'s page (tests/test_server_browser.py) and
# scripts/server_screenshot.py drive: Debian's Chromium and its chromedriver (selenium itself
# is a Python package in the venv). Installs them with apt-get when run as root; otherwise
# says what is missing and exits 2.
exec bash "$(dirname "$0")/debian_deps.sh" browser chromedriver chromium chromium-driver
