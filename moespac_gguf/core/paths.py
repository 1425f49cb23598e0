"""Where things live: the repo, the shared data beside it, and the build cache."""

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
# Prompt sets and Mixtral traces live beside the repo (../shared), never inside it.
SHARED_DIR = Path(os.environ.get("MOESPAC_SHARED", REPO_ROOT.parent / "shared"))
# Built wheels, demo models and other generated artefacts: outside git.
CACHE_DIR = Path(os.environ.get("MOESPAC_CACHE", Path.home() / ".cache" / "moespac-gguf"))
# `moespac calibrate` writes this machine's measured costs here (the balancer and `sim --device local` read it);
# MOESPAC_CALIBRATION names another file (the RPC benchmark's contenders read one measured over their link).
CALIBRATION_PATH = Path(os.environ.get("MOESPAC_CALIBRATION") or CACHE_DIR / "calibration.json")
