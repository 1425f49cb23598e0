"""Device profiles and MoE model specs for the simulator, read from the TOML files in data/.

Every number in those files carries its public source (or "estimate") in a comment. The `local`
device is not a file: it is what `moespac calibrate` measured on this machine, read from
CACHE_DIR/calibration.json (residency.costs). A model can also be a GGUF file (its layout gives the exact bytes)
or a TOML file of its own (a path ending in .toml, with the keys of data/models/*.toml). A name is only
ever a file stem in data/: one with a path separator or a leading dot is refused, so no name reaches a
file outside it.
"""

from __future__ import annotations

import math
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

from ..core.errors import MoespacError
from ..core.layout import read_layout
from ..residency.costs import DeviceCosts, read_calibration

DATA_DIR = Path(__file__).resolve().parent / "data"
PAGE = 4096
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")  # a profile name: a file stem, never a path
PAGING = ("bulk", "fault")
_DEVICE_KEYS = (
    "name",
    "mem_bytes",
    "mem_peak_bps",
    "decode_efficiency",
    "flash_read_bps",
    "page_in_latency_s",
    "memcpy_bps",
    "step_overhead_s",
)
_MODEL_KEYS = (
    "name",
    "n_layer",
    "n_expert",
    "top_k",
    "n_shared_expert",
    "n_embd",
    "n_ff_expert",
    "total_params",
    "default_quant",
    "bits_per_weight",
)


@dataclass(frozen=True)
class Device:
    """What the timing model needs of a machine (simulate.py's docstring: the model)."""

    name: str
    mem_bytes: float  # fast memory the model may use: the default budget
    mem_bps: float  # bandwidth decode achieves streaming weights from fast memory
    flash_read_bps: float  # slow tier -> fast memory (SSD/UFS read, or PCIe from host RAM)
    page_in_latency_s: float  # fixed cost of each expert load
    memcpy_bps: float  # fast-memory copy (the balancer's slot moves)
    step_overhead_s: float  # per forward pass: kernel launches, sampling, sync
    cpu_s_per_token_expert: float | None = None  # measured on `local`: decode time per expert use
    calibrated_model: str | None = None  # the GGUF `local` was measured on
    draft_token_s: float | None = None  # one pass of the draft model; None: step_overhead_s
    fault_s_per_page: float | None = None  # one 4 KiB page fault in order; None: page_in_latency_s
    io_overlap: float = 1.0  # share of prefetch time hidden behind compute: 0 when
    # decode threads take every core (local, measured so)

    @property
    def draft_s(self) -> float:
        """Seconds of one drafted token: measured on `local` if given, else a tiny draft's overhead."""
        return self.step_overhead_s if self.draft_token_s is None else self.draft_token_s

    def load_s(self, expert_bytes: float, paging: str = "bulk") -> float:
        """Seconds to bring one expert in from the slow tier: in one read ("bulk": the engine's
        prefetch, a slot copy) or by 4 KiB page faults ("fault": an mmap without read-ahead)."""
        if paging == "bulk":
            return expert_bytes / self.flash_read_bps + self.page_in_latency_s
        if paging == "fault":
            per_page = self.page_in_latency_s if self.fault_s_per_page is None else self.fault_s_per_page
            return math.ceil(expert_bytes / PAGE) * per_page
        raise MoespacError(f"unknown paging {paging!r} (choose from {', '.join(PAGING)})")

    def pass_s(self, needed, expert_bytes: float, other_bytes: float):
        """Seconds of a forward pass using `needed` distinct experts, all resident: the weights streamed
        once from fast memory, or on `local` the measured decode time per expert use (attention included)."""
        if self.cpu_s_per_token_expert is not None:
            return needed * self.cpu_s_per_token_expert + self.step_overhead_s
        return (other_bytes + needed * expert_bytes) / self.mem_bps + self.step_overhead_s

    def costs(self, expert_bytes: float) -> DeviceCosts:
        """The balancer's view of this device for experts of `expert_bytes`."""
        per_token = self.cpu_s_per_token_expert
        return DeviceCosts(
            self.flash_read_bps, self.memcpy_bps, expert_bytes / self.mem_bps if per_token is None else per_token
        )


@dataclass(frozen=True)
class ModelSpec:
    """Shape and sizes of an MoE model: bytes per quant type of one routed expert and of the rest."""

    name: str
    n_layer: int  # MoE layers (the layers of its routing traces)
    n_expert: int  # routed experts per layer
    top_k: int
    n_shared_expert: int  # always-active experts, counted in other_bytes
    expert_bytes: dict[str, float]  # quant -> bytes of one routed expert (gate + up + down)
    other_bytes: dict[str, float]  # quant -> all other weights (attention, embeddings, shared, dense)
    default_quant: str

    def sizes(self, quant: str | None) -> tuple[str, float, float]:
        """(quant, expert bytes, other bytes); None = the default quant."""
        quant = quant or self.default_quant
        if quant not in self.expert_bytes:
            raise MoespacError(f"{self.name} has no quant {quant!r} (choose from {', '.join(self.expert_bytes)})")
        return quant, self.expert_bytes[quant], self.other_bytes[quant]


def names(kind: str) -> list[str]:
    """The profile names shipped in data/<kind>/ ("devices" or "models")."""
    return sorted(p.stem for p in (DATA_DIR / kind).glob("*.toml"))


def load_device(name: str, calibration: Path | None = None) -> Device:
    """A device profile by name; "local" reads the calibration JSON."""
    if name == "local":
        return _local_device(calibration)
    raw = _read_toml("devices", name, _DEVICE_KEYS)
    return Device(
        raw["name"],
        float(raw["mem_bytes"]),
        float(raw["mem_peak_bps"]) * float(raw["decode_efficiency"]),
        *(float(raw[key]) for key in _DEVICE_KEYS[4:]),
    )


def load_model(name: str) -> ModelSpec:
    """A model spec by name (data/models/NAME.toml), from a TOML file of the same keys (a path
    ending in .toml), or from a GGUF file's layout."""
    if name.endswith(".gguf"):
        return _gguf_model(Path(name))
    if name.endswith(".toml"):
        path = Path(name)
        if not path.is_file():
            raise MoespacError(f"model spec file not found: {name}")
        raw = _check_keys(path, _MODEL_KEYS)
    else:
        raw = _read_toml("models", name, _MODEL_KEYS)
    expert_params = 3 * raw["n_embd"] * raw["n_ff_expert"]  # gate, up and down projections
    other_params = raw["total_params"] - raw["n_layer"] * raw["n_expert"] * expert_params
    other_bits = {**raw["bits_per_weight"], **raw.get("other_bits_per_weight", {})}
    bits = raw["bits_per_weight"]
    if raw["default_quant"] not in bits:
        raise MoespacError(f"model {name}: default_quant {raw['default_quant']!r} has no bits_per_weight")
    return ModelSpec(
        raw["name"],
        raw["n_layer"],
        raw["n_expert"],
        raw["top_k"],
        raw["n_shared_expert"],
        {q: expert_params * b / 8 for q, b in bits.items()},
        {q: other_params * other_bits[q] / 8 for q in bits},
        raw["default_quant"],
    )


def _read_toml(kind: str, name: str, required: tuple[str, ...]) -> dict:
    """data/KIND/NAME.toml; NAME is a file stem (no separator, no leading dot): nothing outside data/."""
    path = DATA_DIR / kind / f"{name}.toml"
    if not _NAME.fullmatch(name) or not path.is_file():
        extra = ", local" if kind == "devices" else ", or a .gguf or .toml path"
        raise MoespacError(f"unknown {kind[:-1]} {name!r} (choose from {', '.join(names(kind))}{extra})")
    return _check_keys(path, required)


def _check_keys(path: Path, required: tuple[str, ...]) -> dict:
    try:
        raw = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise MoespacError(f"{path} is not valid TOML: {e}") from None
    missing = [key for key in required if key not in raw]
    if missing:
        raise MoespacError(f"{path} lacks {', '.join(missing)}")
    return raw


def _local_device(path: Path | None) -> Device:
    """This machine, as measured by `moespac calibrate` (residency.costs.read_calibration)."""
    c = read_calibration(path)
    return Device(
        "local",
        c["mem_bytes"],
        c["mem_bps"],
        c["flash_read_bps"],
        c["page_in_latency_s"],
        c["memcpy_bps"],
        c["step_overhead_s"],
        c["cpu_s_per_token_expert"],
        c["model"],
        c["draft_s_per_token"],
        c["fault_s_per_page"],
        c["io_overlap"],
    )


def _gguf_model(path: Path) -> ModelSpec:
    """Exact sizes from the file: one quant, "file"; expert bytes are the mean over MoE layers."""
    layout = read_layout(path)
    if not layout.layers:
        raise MoespacError(f"{path} has no MoE layers")
    sizes = {"file": layout.mean_bytes_per_expert}
    return ModelSpec(
        path.name,
        len(layout.layers),
        layout.n_expert,
        layout.n_expert_used,
        layout.n_shared_expert,
        sizes,
        {"file": float(layout.other_bytes)},
        "file",
    )
