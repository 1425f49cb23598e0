"""What moving and computing an expert costs on this machine: the numbers the balancer weighs.

`moespac calibrate` measures them into CALIBRATION_PATH (JSON); `read_calibration` is the one
reader of that file (the runtime's `load_costs` and the simulator's `local` device both use it),
so a damaged file is the same one-line error everywhere.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import psutil

from ..core.errors import MoespacError
from ..core.paths import CALIBRATION_PATH

CALIBRATION_KEYS = ("flash_read_bps", "memcpy_bps", "mem_bps", "cpu_s_per_token_expert", "page_in_latency_s")


@dataclass
class DeviceCosts:
    """Measured speeds of one machine; gpu_s_per_token_expert is None on CPU-only machines.

    `memcpy_bps` is what moving an expert into a slot costs: a host memcpy without a GPU, the
    host->device copy with one (and on unified memory, where a slot is a copy in the same DRAM,
    the measured copy there too), the link's bandwidth for an RPC server's device.
    `unified_memory` says which: the README says what differs. With slots on an RPC server's
    device, gpu_s_per_token_expert is its compute and `round_trip_s` the link's latency (None: the
    slot device is local); residency.plan charges the link's round trips to the slot branch."""

    flash_read_bps: float
    memcpy_bps: float
    cpu_s_per_token_expert: float
    gpu_s_per_token_expert: float | None = None
    unified_memory: bool = False
    round_trip_s: float | None = None

    def __post_init__(self):
        if min(self.flash_read_bps, self.memcpy_bps) <= 0:
            raise MoespacError("flash and memcpy bandwidths must be positive")
        if min(self.cpu_s_per_token_expert, self.gpu_s_per_token_expert or 0.0, self.round_trip_s or 0.0) < 0:
            raise MoespacError("per-token expert costs and the round trip must be non-negative")
        if self.round_trip_s is not None and not self.has_gpu:
            raise MoespacError("a link's round trip needs the remote device's per-token expert cost")

    @property
    def has_gpu(self) -> bool:
        return self.gpu_s_per_token_expert is not None


# Used until `moespac calibrate` has measured this machine.
DEFAULT_COSTS = DeviceCosts(flash_read_bps=1.0e9, memcpy_bps=8.0e9, cpu_s_per_token_expert=2e-4)
# With a GPU not yet calibrated: a discrete GPU computes an expert ~10x faster than the CPU's
# threads and takes it over PCIe at ~10 GB/s (moespac calibrate measures both).
DEFAULT_GPU_S_PER_TOKEN_EXPERT = DEFAULT_COSTS.cpu_s_per_token_expert / 10
DEFAULT_H2D_BPS = 1.0e10
# With an RPC server not yet calibrated (moespac calibrate --rpc): a machine like this one behind
# gigabit Ethernet (a LAN's round trip)
DEFAULT_LINK_BPS = 1.25e8
DEFAULT_ROUND_TRIP_S = 5e-4


def read_calibration(path: Path | None = None) -> dict:
    """The calibration at `path` (default CALIBRATION_PATH): the CALIBRATION_KEYS as floats, and the
    optional step_overhead_s (default 0), draft_s_per_token (default: step_overhead_s),
    fault_s_per_page (None: page_in_latency_s stands in), io_overlap (default 1), mem_bytes
    (default: physical RAM), model (the GGUF it was measured on, or None), the GPU tier's
    gpu (None without one, else a dict of GPU_KEYS: device name, per-token expert seconds at batch
    1 and per token at a verification batch, host->device bytes/s, unified memory) and rpc (RPC
    servers' devices as slot devices: HOST:PORT -> a dict of RPC_KEYS, device name, per-token
    expert seconds there, the link's bytes/s and round trip seconds; empty when none was
    calibrated). MoespacError if it is missing or damaged."""
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
            gpu=_gpu_profile(raw["gpu"]) if raw.get("gpu") else None,
            rpc={str(endpoint): _rpc_profile(p) for endpoint, p in dict(raw.get("rpc") or {}).items()},
        )
    except (ValueError, TypeError, KeyError) as e:
        raise MoespacError(
            f"{path} is not a calibration profile with {', '.join(CALIBRATION_KEYS)} ({type(e).__name__}: {e})"
        ) from None
    if min(values[key] for key in ("flash_read_bps", "memcpy_bps", "mem_bps")) <= 0:
        raise MoespacError(f"{path}: bandwidths must be positive")
    return values


GPU_KEYS = ("device", "gpu_s_per_token_expert", "gpu_s_per_token_expert_batch", "h2d_bps", "unified_memory")


def _gpu_profile(raw: dict) -> dict:
    out = {"device": str(raw["device"]), "unified_memory": bool(raw["unified_memory"])}
    out.update({key: float(raw[key]) for key in GPU_KEYS[1:4]})
    if min(out[key] for key in GPU_KEYS[1:4]) <= 0:
        raise ValueError("GPU costs must be positive")
    return out


RPC_KEYS = ("device", "remote_s_per_token_expert", "link_bps", "round_trip_s")


def _rpc_profile(raw: dict) -> dict:
    out = {"device": str(raw["device"])}
    out.update({key: float(raw[key]) for key in RPC_KEYS[1:]})
    if min(out[key] for key in RPC_KEYS[1:]) <= 0:
        raise ValueError("RPC costs must be positive")
    return out


def load_costs(gpu: bool = False, rpc: str | None = None, path: Path | None = None) -> DeviceCosts:
    """This machine's costs as `moespac calibrate` measured them, else DEFAULT_COSTS. With `gpu`
    (a GPU tier is running) the GPU's measured costs, else DEFAULT_GPU_S_PER_TOKEN_EXPERT and
    DEFAULT_H2D_BPS until the GPU is calibrated. With `rpc` (slots on the device of the RPC
    server at that HOST:PORT) that endpoint's measured compute and link, else (said once on
    stderr) this machine's CPU behind DEFAULT_LINK_BPS and DEFAULT_ROUND_TRIP_S. `path`: the
    calibration file (default CALIBRATION_PATH)."""
    path = CALIBRATION_PATH if path is None else Path(path)
    c = read_calibration(path) if path.exists() else None
    costs = (
        DEFAULT_COSTS if c is None else DeviceCosts(c["flash_read_bps"], c["memcpy_bps"], c["cpu_s_per_token_expert"])
    )
    if rpc is not None:
        return _remote_costs(costs, (c or {}).get("rpc", {}).get(rpc), rpc)
    if not gpu:
        return costs
    g = (c or {}).get("gpu")
    if g is None:
        return replace(costs, gpu_s_per_token_expert=DEFAULT_GPU_S_PER_TOKEN_EXPERT, memcpy_bps=DEFAULT_H2D_BPS)
    return replace(
        costs,
        gpu_s_per_token_expert=g["gpu_s_per_token_expert"],
        memcpy_bps=g["h2d_bps"],
        unified_memory=g["unified_memory"],
    )


def _remote_costs(costs: DeviceCosts, profile: dict | None, endpoint: str) -> DeviceCosts:
    """`costs` with the slot device across the link to `endpoint`, as `profile` measured it."""
    if profile is None:
        if endpoint not in _said_uncalibrated:
            _said_uncalibrated.add(endpoint)
            print(
                f"moespac: the RPC server at {endpoint} is not calibrated: planning its expert slots as this "
                f"machine's CPU behind {DEFAULT_LINK_BPS * 8 / 1e9:g} Gbit/s and a "
                f"{DEFAULT_ROUND_TRIP_S * 1e3:g} ms round trip (moespac calibrate --rpc {endpoint} measures them)",
                file=sys.stderr,
            )
        return replace(
            costs,
            gpu_s_per_token_expert=costs.cpu_s_per_token_expert,
            memcpy_bps=DEFAULT_LINK_BPS,
            round_trip_s=DEFAULT_ROUND_TRIP_S,
        )
    return replace(
        costs,
        gpu_s_per_token_expert=profile["remote_s_per_token_expert"],
        memcpy_bps=profile["link_bps"],
        round_trip_s=profile["round_trip_s"],
    )


_said_uncalibrated: set[str] = set()
