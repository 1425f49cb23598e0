"""Reading GGUF files: the package's one opener (layouts, gates and sessions all start here).

`read_header` parses the header itself instead of using `gguf.GGUFReader`, which builds numpy
views of every metadata value: 5-40 s for a 49k-token vocabulary on a busy machine, where
skipping the arrays takes milliseconds. It keeps the scalar and string metadata, the tensor
table with absolute file offsets and sizes, and raises MoespacError with one line naming the file
and the field on anything it cannot trust: a missing file, wrong magic, unsupported version, any
length, count or shape that runs past the end of the file or overflows, and everything llama.cpp's
own reader refuses (duplicate or empty keys, a general.alignment that is not a uint32 power of 2,
duplicate or over-long tensor names, unknown tensor types, rows that are not whole blocks, data
offsets that do not follow each other) or aborts on (two vocabulary tokens with one text): the
layout (core.layout) is read before llama.cpp sees a file, so what llama.cpp would trust is
checked here first. The hyperparameters are core.layout's to check.
"""

from __future__ import annotations

import hashlib
import mmap
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
MAX_NAME = 64  # GGML_MAX_NAME: a tensor name and its NUL
ALIGNMENT_KEY = "general.alignment"
VOCAB_KEY = "tokenizer.ggml.tokens"
# GGUF value type id -> struct format of a scalar (8 = string, 9 = array: variable length)
_SCALAR = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY, _UINT32 = 8, 9, 4
_STRUCTS: dict[str, struct.Struct] = {}
_INT64_MAX = (1 << 63) - 1
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
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino)
    if key not in _HEADERS:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            _HEADERS[key] = _Parser(buf, path).parse()
    return _HEADERS[key]


class _Parser:
    """One pass over a GGUF header, every length and count checked against the bytes that are
    there, and everything llama.cpp's gguf reader (ggml/src/gguf.cpp) refuses, or its vocabulary
    loader aborts on, refused here first as a one-line MoespacError naming the field."""

    def __init__(self, buf, path: Path):
        self.buf, self.path, self.pos = buf, path, 0
        self.where = "the header"  # the field being read, for the messages

    def corrupt(self, what: str) -> MoespacError:
        return MoespacError(f"{self.path}: corrupt GGUF header: {what}")

    def need(self, n: int) -> None:
        if n > len(self.buf) - self.pos:
            raise MoespacError(
                f"{self.path}: corrupt or truncated GGUF header: {self.where} ends past the end of the file "
                f"({n} bytes at offset {self.pos} of {len(self.buf)})"
            )

    def read(self, fmt: str) -> tuple:
        s = _STRUCTS.get(fmt) or _STRUCTS.setdefault(fmt, struct.Struct("<" + fmt))
        self.need(s.size)
        out = s.unpack_from(self.buf, self.pos)
        self.pos += s.size
        return out

    def raw_string(self) -> bytes:
        (n,) = self.read("Q")
        self.need(n)
        self.pos += n
        return self.buf[self.pos - n : self.pos]

    def name(self, what: str) -> str:
        """A key or a tensor name: UTF-8, as gguf-py and our lookups need."""
        raw = self.raw_string()
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self.corrupt(f"{what} is not UTF-8 ({raw[:40]!r})") from None

    def value(self, vtype: int):
        if vtype == _STRING:  # values llama.cpp keeps as bytes: a mangled one is not fatal
            return self.raw_string().decode("utf-8", errors="replace")
        return self.read(_SCALAR[vtype])[0]

    def array(self, key: str) -> None:
        """Skip an array (values we never read), checking its extent; the vocabulary's texts are
        checked for what llama.cpp aborts on: two tokens with the same text."""
        etype, count = self.read("IQ")
        if etype in _SCALAR:
            size = struct.calcsize("<" + _SCALAR[etype]) * count
            self.need(size)
            self.pos += size
        elif etype == _STRING:
            if count > (len(self.buf) - self.pos) // 8:
                raise self.corrupt(f"{key!r} claims {count} strings, more than the file holds")
            self.strings(key, count)
        else:
            raise self.corrupt(f"{key!r} is an array of value type {etype}")

    def strings(self, key: str, count: int) -> None:
        """Skip `count` strings (a tight loop: a vocabulary has 50k-250k). The vocabulary's texts
        are checked for what llama.cpp aborts on: llama_vocab::impl::load maps each text (as a C
        string: up to its first NUL) to its id, an empty one as "[EMPTY_<id>]", and GGML_ASSERTs
        that the texts are distinct."""
        buf, pos, end = self.buf, self.pos, len(self.buf)
        unpack = _STRUCTS.setdefault("Q", struct.Struct("<Q")).unpack_from
        vocab = key == VOCAB_KEY
        seen: dict[bytes, int] = {}
        for i in range(count):
            if pos + 8 > end:
                break
            (n,) = unpack(buf, pos)
            if n > end - pos - 8:
                break
            pos += 8 + n
            if vocab:
                text = buf[pos - n : pos].split(b"\0", 1)[0] or f"[EMPTY_{i}]".encode()
                j = seen.setdefault(text, i)
                if j != i:
                    raise self.corrupt(f"{VOCAB_KEY!r} has the token {text[:40]!r} twice (ids {j} and {i})")
        else:
            self.pos = pos
            return
        self.pos = pos
        self.where = f"string {i} of {key!r}"
        self.raw_string()  # raises: it ends past the end of the file

    def parse(self) -> GgufHeader:
        path = self.path
        self.read("4s")  # the magic, checked by check_gguf
        (version,) = self.read("I")
        if version not in SUPPORTED_VERSIONS:
            raise MoespacError(f"{path}: GGUF version {version} is not supported (expected 2 or 3)")
        n_tensors, n_kv = self.read("QQ")
        metadata: dict[str, int | float | bool | str] = {}
        seen: set[str] = set()
        for i in range(n_kv):
            self.where = f"metadata key {i}"
            key = self.name(f"metadata key {i}")
            if not key:
                raise self.corrupt(f"metadata key {i} is empty")
            if key in seen:
                raise self.corrupt(f"metadata key {key!r} appears twice")
            seen.add(key)
            self.where = f"the value of {key!r}"
            (vtype,) = self.read("I")
            if vtype in _SCALAR or vtype == _STRING:
                metadata[key] = self.value(vtype)
            elif vtype == _ARRAY:
                self.array(key)
            else:
                raise self.corrupt(f"{key!r} has value type {vtype}")
            if key == ALIGNMENT_KEY and vtype != _UINT32:
                raise self.corrupt(f"{ALIGNMENT_KEY} has value type {vtype}, expected {_UINT32} (uint32)")
        alignment = metadata.get(ALIGNMENT_KEY, 32)
        if alignment <= 0 or alignment & (alignment - 1):
            raise self.corrupt(f"{ALIGNMENT_KEY} {alignment} is not a power of 2")
        raw = []
        names: set[str] = set()
        for i in range(n_tensors):
            self.where = f"tensor info {i}"
            name = self.name(f"tensor name {i}")
            if len(name.encode()) >= MAX_NAME:
                raise self.corrupt(f"tensor name {name[:80]!r} is longer than {MAX_NAME - 1} bytes")
            if name in names:
                raise self.corrupt(f"tensor {name!r} appears twice")
            names.add(name)
            self.where = f"the tensor info of {name!r}"
            (n_dims,) = self.read("I")
            if not 1 <= n_dims <= MAX_DIMS:
                raise self.corrupt(f"tensor {name!r} has {n_dims} dimensions")
            shape = self.read("Q" * n_dims)
            qtype, offset = self.read("IQ")
            raw.append(self.tensor(name, shape, qtype, offset))
        # the data section: aligned after the tensor infos, each tensor right after the one before
        data_start = -(-self.pos // alignment) * alignment
        tensors = []
        expected = 0
        for name, ttype, shape, offset, nbytes in raw:
            if offset != expected:
                raise self.corrupt(f"tensor {name!r} has data offset {offset}, expected {expected}")
            if data_start + offset + nbytes > len(self.buf):
                raise MoespacError(f"{path}: truncated GGUF (tensor {name!r} ends past the end of the file)")
            tensors.append(TensorInfo(name, ttype, shape, data_start + offset, nbytes))
            expected += -(-nbytes // alignment) * alignment
        return GgufHeader(path, version, metadata, tuple(tensors), len(self.buf))

    def tensor(self, name: str, shape: tuple[int, ...], qtype: int, offset: int) -> tuple:
        """(name, type, shape, offset, nbytes) once the shape and type are ones ggml can hold."""
        try:
            ttype = gguf.GGMLQuantizationType(qtype)
            block, type_size = gguf.GGML_QUANT_SIZES[ttype]
        except (ValueError, KeyError):
            raise MoespacError(f"{self.path}: tensor {name!r} has an unknown type {qtype}") from None
        n = 1
        for d in shape:
            n *= d
        if max(shape) > _INT64_MAX or n > _INT64_MAX:  # ggml's ne are int64
            raise self.corrupt(f"tensor {name!r} has an impossible shape {list(shape)}")
        if shape[0] % block:
            raise self.corrupt(
                f"tensor {name!r} of type {ttype.name} has rows of {shape[0]} values, not a multiple of {block}"
            )
        return name, ttype, tuple(shape), offset, n // block * type_size


def n_vocab(path: str | Path) -> int:
    """The size of the model's vocabulary, a logits row: the rows of its token embedding."""
    header = read_header(path)
    embd = next((t for t in header.tensors if t.name == "token_embd.weight"), None)
    if embd is None or len(embd.shape) < 2:
        raise MoespacError(f"{header.path}: no token_embd.weight [n_embd, n_vocab] tensor")
    return int(embd.shape[1])


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
