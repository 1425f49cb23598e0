"""Human byte sizes in and out: `--mem 8G`, `--mem-cap 512MiB`, tables in MiB/GiB."""

from __future__ import annotations

import re

from .errors import MoespacError

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """'8G', '8GiB', '8GB', '512m', '1.5g', '4096' -> bytes (binary units, as llama.cpp prints)."""
    m = _SIZE.match(str(text))
    if not m:
        raise MoespacError(f"cannot read {text!r} as a size (examples: 512M, 8G, 1.5GiB)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def format_size(n: float) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"
