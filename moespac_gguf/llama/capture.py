"""Offline capture of named graph tensors (e.g. `ffn_norm-N`, the router input).

A Python eval callback: ~0.3 ms per captured node (NOTES.md), far too slow for
the decode hot path (that is what the C routing tap is for) but fine for
collecting hidden states to fit routers and lookahead gates, and for checking
the tap against a numpy recomputation in tests.
"""

from __future__ import annotations

import ctypes
import re

import numpy as np

from .abi import lib, llama_cpp

lib.ggml_backend_buffer_is_host.restype = ctypes.c_bool
lib.ggml_backend_buffer_is_host.argtypes = [ctypes.c_void_p]

GGML_TYPE_F32 = 0


class GgmlTensor(ctypes.Structure):
    """The head of `struct ggml_tensor` (ggml.h of the pinned llama.cpp), up to `name`."""

    _fields_ = [
        ("type", ctypes.c_int),
        ("buffer", ctypes.c_void_p),
        ("ne", ctypes.c_int64 * 4),
        ("nb", ctypes.c_size_t * 4),
        ("op", ctypes.c_int),
        ("op_params", ctypes.c_int32 * 16),
        ("flags", ctypes.c_int32),
        ("src", ctypes.c_void_p * 10),
        ("view_src", ctypes.c_void_p),
        ("view_offs", ctypes.c_size_t),
        ("data", ctypes.c_void_p),
        ("name", ctypes.c_char * 64),
    ]


def read_f32(t: GgmlTensor, ptr: int) -> np.ndarray:
    """A 2-D F32 tensor [ne1 rows, ne0 cols] (rows nb[1] apart) as a numpy copy."""
    ne0, ne1 = t.ne[0], t.ne[1] * t.ne[2] * t.ne[3]
    if t.buffer and not lib.ggml_backend_buffer_is_host(t.buffer):
        raise RuntimeError(f"capture of {t.name.decode()} needs a host (CPU) buffer")
    rows = np.empty((ne1, ne0), dtype=np.float32)
    for r in range(ne1):
        rows[r] = np.ctypeslib.as_array(ctypes.cast(t.data + r * t.nb[1], ctypes.POINTER(ctypes.c_float)), shape=(ne0,))
    return rows


class TensorCapture:
    """Collect every evaluated F32 tensor named "<name>-<layer>" for the given names.

    After each decode, `captured` maps a tensor name (e.g. "ffn_norm-3") to the
    list of [rows, n_embd] arrays seen since the last `clear()`, one per ubatch.
    Behind the routing tap, llama.cpp asks this callback only about nodes with
    these `name_prefixes`.
    """

    def __init__(self, *names: str):
        self.name_prefixes = tuple(f"{n}-" for n in names)
        self.pattern = re.compile("(?:" + "|".join(re.escape(n) for n in names) + r")-\d+")
        self.captured: dict[str, list[np.ndarray]] = {}
        # keep the ctypes callback object alive as long as this capture
        self.callback = llama_cpp.ggml_backend_sched_eval_callback(self._eval)

    def _eval(self, tensor_ptr, ask: bool, user_data) -> bool:
        t = GgmlTensor.from_address(tensor_ptr)
        name = t.name.decode("utf-8", errors="replace")
        if not self.pattern.fullmatch(name) or t.type != GGML_TYPE_F32:
            return not ask  # ask: not wanted; evaluated: keep going
        if not ask:
            self.captured.setdefault(name, []).append(read_f32(t, tensor_ptr))
        return True

    def take(self, name: str) -> np.ndarray:
        """All rows captured for `name`, concatenated over ubatches."""
        return np.concatenate(self.captured.get(name, [np.empty((0, 0), np.float32)]))

    def clear(self) -> None:
        self.captured.clear()


class RouterCapture(TensorCapture):
    """Every layer's router logits ("ffn_moe_logits-<il>") as a draft decodes. A self-draft runs
    the target's own routers, so its ranking of each row it decodes, taken before a restriction
    to held experts rewrites its picks, predicts the target's routing of the rows it drafts ahead
    (less well the further ahead: docs/design.md, "Self-draft lookahead")."""

    def __init__(self):
        super().__init__("ffn_moe_logits")

    def last_row_ranking(self, n_layer: int, k: int) -> np.ndarray:
        """int16 [n_layer, k]: the k best-ranked experts of the last row decoded (-1 in a layer
        without routing), then forget everything captured."""
        out = np.full((n_layer, k), -1, dtype=np.int16)
        for il in range(n_layer):
            parts = self.captured.get(f"ffn_moe_logits-{il}")
            if parts:
                out[il] = np.argsort(-parts[-1][-1], kind="stable")[:k]
        self.clear()
        return out
