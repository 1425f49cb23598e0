"""What moving and computing an expert costs on this machine: the numbers the balancer weighs.

`moespac calibrate` measures them into CALIBRATION_PATH (JSON); `read_calibration` is the one
reader of that file (the runtime's `load_costs` and the simulator's `local` device both use it),
so a damaged file is the same one-line error everywhere.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import psutil

from ..core.errors import MoespacError
from ..core.paths import CALIBRATION_PATH

CALIBRATION_KEYS = ("flash_read_bps", "memcpy_bps", "mem_bps", "cpu_s_per_token_expert", "page_in_latency_s")


@dataclass
class DeviceCosts:
    """Measured speeds of one machine; gpu_s_per_token_expert is None on CPU-only machines."""

    flash_read_bps: float
    memcpy_bps: float
    cpu_s_per_token_expert: float
    gpu_s_per_token_expert: float | None = None

    def __post_init__(self):
        if min(self.flash_read_bps, self.memcpy_bps) <= 0:
            raise MoespacError("flash and memcpy bandwidths must be positive")
        if self.cpu_s_per_token_expert < 0 or (self.gpu_s_per_token_expert or 0.0) < 0:
            raise MoespacError("per-token expert costs must be non-negative")

    @property
    def has_gpu(self) -> bool:
        return self.gpu_s_per_token_expert is not None


# Used until `moespac calibrate` has measured this machine.
DEFAULT_COSTS = DeviceCosts(flash_read_bps=1.0e9, memcpy_bps=8.0e9, cpu_s_per_token_expert=2e-4)


def read_calibration(path: Path | None = None) -> dict:
    """The calibration at `path` (default CALIBRATION_PATH): the CALIBRATION_KEYS as floats, and the
    optional step_overhead_s (default 0), draft_s_per_token (default: step_overhead_s),
    fault_s_per_page (None: page_in_latency_s stands in), io_overlap (default 1), mem_bytes
    (default: physical RAM) and model (the GGUF it was measured on, or None). MoespacError if it
    is missing or damaged."""
    path = CALIBRATION_PATH if path is None else path
    if not path.is_file():
        raise MoespacError(f"no calibration for device 'local' at {path}: run `moespac calibrate` first")
    try:
        raw = json.loads(path.read_text())
        values = {key: float(raw[key]) for key in CALIBRATION_KEYS}
        step = float(raw.get("step_overhead_s", 0.0))
        values.update(
            step_overhead_s=step,
            draft_s_per_token=float(raw.get("draft_s_per_token", step)),
            mem_bytes=float(raw.get("mem_bytes", psutil.virtual_memory().total)),
            fault_s_per_page=float(raw["fault_s_per_page"]) if "fault_s_per_page" in raw else None,
            io_overlap=float(raw.get("io_overlap", 1.0)),
            model=raw.get("model"),
        )
    except (ValueError, TypeError, KeyError) as e:
        raise MoespacError(
            f"{path} is not a calibration profile with {', '.join(CALIBRATION_KEYS)} ({type(e).__name__}: {e})"
        ) from None
    if min(values[key] for key in ("flash_read_bps", "memcpy_bps", "mem_bps")) <= 0:
        raise MoespacError(f"{path}: bandwidths must be positive")
    return values


def load_costs() -> DeviceCosts:
    """This machine's costs as `moespac calibrate` measured them, else DEFAULT_COSTS."""
    if not CALIBRATION_PATH.exists():
        return DEFAULT_COSTS
    c = read_calibration()
    return DeviceCosts(c["flash_read_bps"], c["memcpy_bps"], c["cpu_s_per_token_expert"])
