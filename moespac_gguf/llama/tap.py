"""The routing tap (patches/0002): which experts each token used, read into numpy after each decode.

The tap lives in libllama as a C eval callback; this module owns its handle and
turns its flat arrays into a `Routing` after each decode. No Python runs per
graph node, so the tap costs one strncmp per node inside llama.cpp.
"""

from __future__ import annotations

import ctypes

import numpy as np

from ..core.routing import Routing
from .abi import lib, tap_eval_callback


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
        if (
            allowed.dtype != np.bool_
            or allowed.ndim != 2
            or allowed.shape[0] != self.n_layer
            or not allowed.flags.c_contiguous
        ):
            raise ValueError(f"allowed must be a C-contiguous bool [{self.n_layer}, n_expert] array")
        self._allowed = allowed  # the C side holds a pointer into it
        lib.llama_moespac_tap_set_allowed(self.handle, allowed.ctypes.data, allowed.shape[1])

    @property
    def rerouted(self) -> int:
        """Selections replaced by an allowed expert so far."""
        return int(lib.llama_moespac_tap_rerouted(self.handle))

    def set_keep(
        self,
        admit: np.ndarray | None,
        victims: np.ndarray | None = None,
        victim_score: np.ndarray | None = None,
        free: np.ndarray | None = None,
        ranges: np.ndarray | None = None,
    ) -> None:
        """Keep at use from the next decode on (patches 0017, 0019; residency.keep.KeepPlan says
        what the arrays mean): the tap locks routed experts `admit` (float [n_layer, n_expert])
        scores into one of their layer's `free` (int [n_layer]) places or above its layer's next
        of `victims` (flat ids, each layer's weakest first, with `victim_score`), unlocking that
        victim first; `ranges` uint64 [n_layer * n_expert, R, 2]: every expert's (address,
        length) ranges in the mapping (length 0 pads). Copied by the C side. `admit` None: off.
        Needs demand page-in (set_demand_page_in)."""
        if admit is None:
            lib.llama_moespac_tap_set_keep(self.handle, 0, None, None, 0, None, None, None, None)
            return
        free = np.ascontiguousarray(free, dtype=np.int32)
        if admit.ndim != 2 or admit.shape[0] != self.n_layer or free.shape != (self.n_layer,):
            raise ValueError(f"admit must be float [{self.n_layer}, n_expert] and free int [{self.n_layer}]")
        admit = np.ascontiguousarray(admit, dtype=np.float32)
        victims = np.ascontiguousarray(victims, dtype=np.int32)
        score = np.ascontiguousarray(victim_score, dtype=np.float32)
        spans = np.ascontiguousarray(ranges[victims].reshape(-1, 2), dtype=np.uint64)
        first = np.arange(len(victims) + 1, dtype=np.int32) * ranges.shape[1]
        lib.llama_moespac_tap_set_keep(
            self.handle,
            admit.shape[1],
            admit.ctypes.data,
            free.ctypes.data,
            len(victims),
            victims.ctypes.data,
            score.ctypes.data,
            first.ctypes.data,
            spans.ctypes.data,
        )

    def kept(self) -> tuple[np.ndarray, np.ndarray]:
        """(admitted, evicted): flat ids (layer * n_expert + expert) the tap locked and unlocked
        since the last set_keep, in decision order."""
        n_admitted, n_evicted = ctypes.c_int32(), ctypes.c_int32()
        ptr = lib.llama_moespac_tap_kept(self.handle, ctypes.byref(n_admitted), ctypes.byref(n_evicted))
        n = n_admitted.value + n_evicted.value
        ids = np.ctypeslib.as_array(ptr, shape=(n,)).astype(np.int64) if n else np.zeros(0, np.int64)
        return ids[: n_admitted.value], ids[n_admitted.value :]

    @property
    def lock_failures(self) -> int:
        """mlock calls of keep at use that the kernel refused."""
        return int(lib.llama_moespac_tap_lock_failures(self.handle))

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
