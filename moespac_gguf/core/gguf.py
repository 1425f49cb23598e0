"""Reading GGUF files: the package's one opener (layouts, gates and sessions all start here).

`read_header` parses the header itself instead of using `gguf.GGUFReader`, which builds numpy
views of every metadata value: 5-40 s for a 49k-token vocabulary on a busy machine, where
skipping the arrays takes milliseconds. It keeps the scalar and string metadata, the tensor
table with absolute file offsets and sizes, and raises MoespacError with one line on anything
it cannot trust (missing file, wrong magic, unsupported version, a truncated or corrupt header,
an unknown tensor type).
"""

from __future__ import annotations

import hashlib
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from .errors import MoespacError

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
MAX_DIMS = 4  # GGML_MAX_DIMS
# GGUF value type id -> struct format of a scalar (8 = string, 9 = array: variable length)
_SCALAR = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
_FP_BLOCKS, _FP_BLOCK = 64, 1 << 16


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of the file: where its bytes are and what they hold."""

    name: str
    type: gguf.GGMLQuantizationType
    shape: tuple[int, ...]  # ggml order (ne0, ne1, ...): the reverse of numpy's
    offset: int  # absolute file offset of the data
    nbytes: int


@dataclass(frozen=True)
class GgufHeader:
    """The header of a GGUF file: scalar and string metadata (arrays, such as the vocabulary, are
    skipped and absent) and the tensor table."""

    path: Path
    version: int
    metadata: dict[str, int | float | bool | str]
    tensors: tuple[TensorInfo, ...]
    file_bytes: int


_HEADERS: dict[tuple, GgufHeader] = {}


def check_gguf(path: str | Path) -> Path:
    """`path` as a Path if it is a file starting with the GGUF magic, else MoespacError."""
    path = Path(path)
    if not path.exists():
        raise MoespacError(f"no such file: {path}")
    if not path.is_file():
        raise MoespacError(f"not a file: {path}")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise MoespacError(f"{path} is not a GGUF file (starts with {magic!r}, expected b'GGUF')")
    return path


def read_header(path: str | Path) -> GgufHeader:
    """The parsed header of `path`, cached per (path, size, mtime)."""
    path = check_gguf(path)
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _HEADERS:
        try:
            with open(path, "rb") as f:
                header = _parse(f, path, st.st_size)
        except (EOFError, struct.error, UnicodeDecodeError, OverflowError, MemoryError):
            raise MoespacError(f"{path}: corrupt or truncated GGUF header") from None
        _HEADERS[key] = header
    return _HEADERS[key]


def _parse(f, path: Path, file_bytes: int) -> GgufHeader:
    def read(fmt: str) -> tuple:
        size = struct.calcsize("<" + fmt)
        data = f.read(size)
        if len(data) != size:
            raise EOFError
        return struct.unpack("<" + fmt, data)

    def read_str() -> str:
        (n,) = read("Q")
        data = f.read(n)
        if len(data) != n:
            raise EOFError
        return data.decode("utf-8")

    def skip_array() -> None:
        etype, count = read("IQ")
        if etype in _SCALAR:
            f.seek(struct.calcsize("<" + _SCALAR[etype]) * count, 1)
        elif etype == _STRING:
            for _ in range(count):
                (n,) = read("Q")
                f.seek(n, 1)
        else:
            raise MoespacError(f"{path}: corrupt GGUF header (array of value type {etype})")

    f.read(4)  # the magic, checked by check_gguf
    (version,) = read("I")
    if version not in SUPPORTED_VERSIONS:
        raise MoespacError(f"{path}: GGUF version {version} is not supported (expected 2 or 3)")
    n_tensors, n_kv = read("QQ")
    metadata: dict[str, int | float | bool | str] = {}
    for _ in range(n_kv):
        key = read_str()
        (vtype,) = read("I")
        if vtype in _SCALAR:
            (metadata[key],) = read(_SCALAR[vtype])
        elif vtype == _STRING:
            metadata[key] = read_str()
        elif vtype == _ARRAY:
            skip_array()
        else:
            raise MoespacError(f"{path}: corrupt GGUF header (key {key!r} has value type {vtype})")
    alignment = metadata.get("general.alignment", 32)
    if not isinstance(alignment, int) or alignment <= 0:
        raise MoespacError(f"{path}: corrupt GGUF header (general.alignment {alignment!r})")
    raw = []
    for _ in range(n_tensors):
        name = read_str()
        (n_dims,) = read("I")
        if not 1 <= n_dims <= MAX_DIMS:
            raise MoespacError(f"{path}: corrupt GGUF header (tensor {name!r} has {n_dims} dimensions)")
        shape = read("Q" * n_dims)
        qtype, offset = read("IQ")
        raw.append((name, qtype, shape, offset))
    data_start = -(-f.tell() // alignment) * alignment
    tensors = []
    for name, qtype, shape, offset in raw:
        try:
            ttype = gguf.GGMLQuantizationType(qtype)
            block, type_size = gguf.GGML_QUANT_SIZES[ttype]
        except (ValueError, KeyError):
            raise MoespacError(f"{path}: tensor {name!r} has an unknown type {qtype}") from None
        n = int(np.prod(shape, dtype=np.int64))
        tensors.append(TensorInfo(name, ttype, tuple(shape), data_start + offset, n // block * type_size))
    return GgufHeader(path, version, metadata, tuple(tensors), file_bytes)


def read_tensor(path: str | Path, t: TensorInfo) -> np.ndarray:
    """One tensor dequantized to float32, in numpy's shape (the reverse of ggml's)."""
    with open(path, "rb") as f:
        raw = np.frombuffer(os.pread(f.fileno(), t.nbytes, t.offset), dtype=np.uint8)
    rows = int(np.prod(t.shape[1:], dtype=np.int64))
    out = gguf.quants.dequantize(raw.reshape(rows, -1), t.type)
    return np.asarray(out, dtype=np.float32).reshape(t.shape[::-1])


def model_fingerprint(path: str | Path) -> str:
    """sha256 over the GGUF's tensor table (name, type, shape, offset), its data size, every router
    tensor in full and 64 blocks of 64 KiB at evenly spaced offsets of the tensor data.

    Hashing all of a multi-GB file takes seconds to minutes (and pages it all in); this samples
    ~4 MiB deterministically, so any retrained, requantised or resized model changes the hash,
    while a flipped byte in an unsampled expert does not (what is bound to a model by it, the
    lookahead gate, does not depend on experts).
    """
    header = read_header(path)
    tensors = sorted(header.tensors, key=lambda t: t.offset)
    if not tensors:
        raise MoespacError(f"{path}: GGUF without tensors")
    h = hashlib.sha256(b"moespac-gate-fingerprint-v1")
    for t in tensors:
        h.update(f"{t.name}|{int(t.type)}|{list(t.shape)}|{t.offset}\n".encode())
    start = tensors[0].offset
    end = max(t.offset + t.nbytes for t in tensors)
    h.update(f"data {start} {end}\n".encode())
    with open(header.path, "rb") as f:
        fd = f.fileno()
        for t in tensors:
            if ".ffn_gate_inp." in t.name:
                h.update(os.pread(fd, t.nbytes, t.offset))
        span = max(1, end - start - _FP_BLOCK)
        for i in range(_FP_BLOCKS):
            h.update(os.pread(fd, _FP_BLOCK, start + span * i // max(1, _FP_BLOCKS - 1)))
    return h.hexdigest()
