"""Which experts each token used: the routing tap (patches/0002) read into numpy.

The tap lives in libllama as a C eval callback; this module owns its handle and
turns its flat arrays into a `Routing` after each decode. No Python runs per
graph node, so the tap costs one strncmp per node inside llama.cpp.
"""
from __future__ import annotations

import ctypes
from dataclasses import dataclass

import numpy as np

from .native import lib, tap_eval_callback


@dataclass
class Routing:
    """Experts used by each token of one decode call, per layer.

    experts[l, t] holds the top-k expert ids of token t in layer l, or -1 where
    the layer did not route that token (dense layers; the last layer skips rows
    that produce no output); weights are the router weights of those experts.
    """
    experts: np.ndarray  # int32 [n_layer, n_tokens, k]
    weights: np.ndarray  # float32 [n_layer, n_tokens, k]

    @property
    def n_tokens(self) -> int:
        return self.experts.shape[1]

    def counts(self, n_expert: int) -> np.ndarray:
        """Tokens routed to each expert: int [n_layer, n_expert]."""
        n_layer = self.experts.shape[0]
        out = np.zeros((n_layer, n_expert), dtype=np.int64)
        layer_idx = np.broadcast_to(np.arange(n_layer)[:, None, None], self.experts.shape)
        ok = self.experts >= 0
        np.add.at(out, (layer_idx[ok], self.experts[ok]), 1)
        return out

    def take(self, rows: slice | np.ndarray) -> "Routing":
        return Routing(self.experts[:, rows], self.weights[:, rows])

    @staticmethod
    def concat(parts: list["Routing"]) -> "Routing":
        return Routing(np.concatenate([p.experts for p in parts], axis=1),
                       np.concatenate([p.weights for p in parts], axis=1))


class RoutingTap:
    """Owner of one C tap; install `callback`/`user_data` as the context's cb_eval."""

    def __init__(self, n_layer: int, n_expert_used: int, max_rows: int):
        self.n_layer, self.k, self.max_rows = n_layer, n_expert_used, max_rows
        self.handle = lib.llama_moespac_tap_new(n_layer, n_expert_used, max_rows)
        if not self.handle:
            raise ValueError("llama_moespac_tap_new failed")
        shape = (n_layer, max_rows, n_expert_used)
        self._ids = np.ctypeslib.as_array(lib.llama_moespac_tap_ids(self.handle), shape=shape)
        self._weights = np.ctypeslib.as_array(lib.llama_moespac_tap_weights(self.handle), shape=shape)
        self._rows = np.ctypeslib.as_array(lib.llama_moespac_tap_rows(self.handle), shape=(n_layer,))
        self.callback = tap_eval_callback
        self.user_data = ctypes.c_void_p(self.handle)

    def chain(self, callback, name_prefixes: tuple[str, ...] = ()) -> None:
        """Run another eval callback (a ctypes CFUNCTYPE object; keep it alive) behind the tap
        (None: none any more).

        With `name_prefixes`, llama.cpp asks it only about nodes whose names start
        with one of them: a Python callback asked about every node costs ~50 us each.
        """
        if callback is None:
            callback = lib.llama_moespac_tap_chain.argtypes[1]()  # a NULL function pointer
        lib.llama_moespac_tap_chain(self.handle, callback, None, "|".join(name_prefixes).encode())

    def reset(self) -> None:
        lib.llama_moespac_tap_reset(self.handle)

    def set_demand_page_in(self, enable: bool) -> None:
        """Read each routed expert whole (MADV_WILLNEED) right before its matmul (patch 0003)."""
        lib.llama_moespac_tap_set_willneed(self.handle, enable)

    @property
    def demand_paged_bytes(self) -> int:
        return int(lib.llama_moespac_tap_willneed_bytes(self.handle))

    def restrict_to(self, allowed: np.ndarray | None) -> None:
        """Route only to experts where `allowed` (bool [n_layer, n_expert], read in place at every
        decode: keep it alive and update it in place) is True, best-ranked first (patch 0009); a
        layer with fewer than top-k allowed falls back to its best-ranked others. None: off."""
        if allowed is None:
            self._allowed = None
            lib.llama_moespac_tap_set_allowed(self.handle, None, 0)
            return
        if allowed.dtype != np.bool_ or allowed.ndim != 2 or allowed.shape[0] != self.n_layer \
                or not allowed.flags.c_contiguous:
            raise ValueError(f"allowed must be a C-contiguous bool [{self.n_layer}, n_expert] array")
        self._allowed = allowed  # the C side holds a pointer into it
        lib.llama_moespac_tap_set_allowed(self.handle, allowed.ctypes.data, allowed.shape[1])

    @property
    def rerouted(self) -> int:
        """Selections replaced by an allowed expert so far."""
        return int(lib.llama_moespac_tap_rerouted(self.handle))

    def read(self, n_tokens: int, output_rows: np.ndarray | None = None) -> Routing:
        """Routing of the `n_tokens` decoded since reset().

        A layer that routed fewer rows than n_tokens routed only the rows that
        produce output (llama.cpp prunes them before the last layer's FFN):
        `output_rows` names those token indices, in order.
        """
        if lib.llama_moespac_tap_overflow(self.handle):
            raise RuntimeError(f"routing tap overflow: more than {self.max_rows} rows in one decode")
        experts = np.full((self.n_layer, n_tokens, self.k), -1, dtype=np.int32)
        weights = np.zeros((self.n_layer, n_tokens, self.k), dtype=np.float32)
        for layer, rows in enumerate(self._rows.tolist()):
            if rows == 0:
                continue
            if rows == n_tokens:
                dest = slice(None)
            elif output_rows is not None and rows == len(output_rows):
                dest = output_rows
            else:
                raise RuntimeError(f"routing tap: layer {layer} routed {rows} rows for {n_tokens} tokens")
            experts[layer, dest] = self._ids[layer, :rows]
            weights[layer, dest] = self._weights[layer, :rows]
        return Routing(experts, weights)

    def close(self) -> None:
        if self.handle:
            lib.llama_moespac_tap_free(self.handle)
            self.handle = None
