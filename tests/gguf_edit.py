"""Well-formed edits of a GGUF through gguf-py, for the tests that need a file a byte patch cannot
make (a new key, a value of another size, another architecture)."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np


def gguf_copy(
    src: Path, dst: Path, set_kv: dict | None = None, drop: tuple[str, ...] = (), arch: str | None = None
) -> Path:
    """A copy of `src` at `dst` with keys set ({key: (value, GGUFValueType)}) or dropped, and
    `general.architecture` replaced by `arch` when given; tensors unchanged."""
    reader = gguf.GGUFReader(src)
    w = gguf.GGUFWriter(dst, arch=arch or reader.fields["general.architecture"].contents())
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture" or key in drop or key in (set_kv or {}):
            continue
        sub = field.types[-1] if len(field.types) > 1 else None
        w.add_key_value(key, field.contents(), field.types[0], sub)
    for key, (value, vtype) in (set_kv or {}).items():
        w.add_key_value(key, value, vtype)
    for t in reader.tensors:
        w.add_tensor(t.name, np.asarray(t.data), raw_dtype=t.tensor_type, raw_shape=np.asarray(t.data).shape)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst
