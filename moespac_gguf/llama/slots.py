"""Expert slot cache (patches 0005-0007): chosen experts copied into memory we own.

Per MoE layer, `SlotCache` holds S_l slots, each able to hold one expert (all of
its projections, in the model's own quant type), in a buffer llama.cpp
allocates: host RAM without a GPU (anonymous memory the kernel does not
evict like the mmapped file), the GPU's memory when the session has one. An expert
*assigned* to a slot is computed from the slot from the next decode on; the
others from the model's tensors, and the logits do not change.

    cache = SlotCache(session, 4)            # 4 slots in every MoE layer
    cache.copy_async(layer, expert, slot)    # native worker thread, overlaps decoding
    cache.assign(layer, expert, slot)        # waits for that copy, then maps it
    cache.evict(layer, expert)               # back to the model's tensors

Copies never race the graph: a slot can be copied into only while no expert is
assigned to it and no graph of a running decode reads it (else MoespacError).
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence

import numpy as np

from ..core.errors import MoespacError
from ..core.layout import read_layout
from ..core.units import format_size
from .abi import last_log_line, lib

ASSIGN_UNCHECKED = 1  # tests only: map an expert to a slot that holds another one


class SlotCache:
    """The slot cache of one Session; close() (or the session's close) releases it."""

    def __init__(self, session, slots_per_layer: int | Sequence[int]):
        """Slots live on the session's GPU when it has one (the GPU tier: the GPU computes the
        experts they hold), else in host RAM. A GPU session needs op_offload off (Session)."""
        n_layer = session.n_layer
        if isinstance(slots_per_layer, (int, np.integer)):
            counts = [int(slots_per_layer)] * n_layer
        else:
            counts = [int(c) for c in slots_per_layer]
            if len(counts) != n_layer:
                raise MoespacError(f"need one slot count per layer ({n_layer}), got {len(counts)}")
        if any(c < 0 for c in counts):
            raise MoespacError("slot counts must be >= 0")
        if not session.ctx:
            raise MoespacError("the session is closed")
        arr = (ctypes.c_int32 * n_layer)(*counts)
        device = session.slot_device
        where = ""
        if device is not None:  # checked first: some drivers (lavapipe) overcommit instead of failing
            free = device.memory()[0]
            where = f" in {device.name}'s memory ({format_size(free)} free)"
            # + 1: a GPU layer's spare all-zero slot (patches/0006)
            need = sum(
                (counts[l.index] + 1) * l.bytes_per_expert for l in read_layout(session.path).layers if counts[l.index]
            )
            if need > free:
                raise MoespacError(f"cannot create expert slots{where}: they need {format_size(need)}")
        self.handle = lib.llama_moespac_slots_new(session.model, arr, n_layer, device and device.buffer_type)
        if not self.handle:
            raise MoespacError(f"cannot create expert slots{where}: {last_log_line() or 'unknown error'}")
        self.session = session
        self._check(lib.llama_moespac_slots_attach(session.ctx, self.handle))
        self.n_layer = n_layer
        self.n_expert = int(lib.llama_moespac_slots_n_expert(self.handle))
        self.n_slots = np.array(
            [lib.llama_moespac_slots_n_slots(self.handle, l) for l in range(n_layer)], dtype=np.int32
        )
        self.moe_layers = [l for l in range(n_layer) if self.n_slots[l] > 0]

    # -- errors -----------------------------------------------------------------
    def _check(self, rc: int) -> int:
        if rc <= -2:  # LLAMA_MOESPAC_SLOTS_E*; -1 means "none" (slot_of, expert_in)
            msg = lib.llama_moespac_slots_last_error(self.handle) if self.handle else None
            raise MoespacError((msg or b"slot cache error").decode("utf-8", errors="replace"))
        return rc

    def _live(self):
        if not self.handle:
            raise MoespacError("the slot cache is closed")
        return self.handle

    # -- moving experts -----------------------------------------------------------
    def copy_async(self, layer: int, expert: int, slot: int) -> None:
        """Queue a copy of `expert` of `layer` into `slot` (the slot must not be assigned)."""
        self._check(lib.llama_moespac_slots_copy_async(self._live(), layer, expert, slot))

    def wait(self) -> None:
        """Block until every queued copy is done."""
        self._check(lib.llama_moespac_slots_wait(self._live()))

    @property
    def pending(self) -> int:
        return int(lib.llama_moespac_slots_pending(self._live()))

    def assign(self, layer: int, expert: int, slot: int, *, unchecked: bool = False) -> None:
        """Compute `expert` from `slot` from the next decode on (waits for its copy)."""
        flags = ASSIGN_UNCHECKED if unchecked else 0
        self._check(lib.llama_moespac_slots_assign(self._live(), layer, expert, slot, flags))

    def load(self, layer: int, expert: int, slot: int) -> None:
        """copy_async + assign: the expert is in the slot and used from the next decode."""
        self.copy_async(layer, expert, slot)
        self.assign(layer, expert, slot)

    def evict(self, layer: int, expert: int) -> None:
        """Compute `expert` from the model's tensors again (the slot keeps its bytes)."""
        self._check(lib.llama_moespac_slots_evict(self._live(), layer, expert))

    def clear(self) -> None:
        for layer in self.moe_layers:
            for e in range(self.n_expert):
                self.evict(layer, e)

    # -- state --------------------------------------------------------------------
    def slot_of(self, layer: int, expert: int) -> int | None:
        s = self._check(lib.llama_moespac_slots_slot_of(self._live(), layer, expert))
        return None if s < 0 else s

    def expert_in(self, layer: int, slot: int) -> int | None:
        """The expert the slot holds (or will, once its queued copy is done)."""
        e = self._check(lib.llama_moespac_slots_expert_in(self._live(), layer, slot))
        return None if e < 0 else e

    def assignment(self) -> np.ndarray:
        """int [n_layer, n_expert]: the slot each expert is computed from, -1 for the model's tensors."""
        out = np.full((self.n_layer, self.n_expert), -1, dtype=np.int32)
        for layer in self.moe_layers:
            for e in range(self.n_expert):
                out[layer, e] = lib.llama_moespac_slots_slot_of(self._live(), layer, e)
        return out

    def slot_bytes(self, layer: int) -> int:
        """Bytes of one expert of `layer` (all projections) = bytes of one slot."""
        return int(lib.llama_moespac_slots_slot_bytes(self._live(), layer))

    @property
    def buffer_bytes(self) -> int:
        return int(lib.llama_moespac_slots_buffer_bytes(self._live()))

    @property
    def copied_bytes(self) -> int:
        return int(lib.llama_moespac_slots_copied_bytes(self._live()))

    @property
    def graph_layers(self) -> int:
        """MoE layers the last built graph computed split (0 before the first decode)."""
        return int(lib.llama_moespac_slots_graph_layers(self._live()))

    # -- lifetime -----------------------------------------------------------------
    def close(self) -> None:
        if getattr(self, "handle", None):
            if getattr(self.session, "ctx", None):
                lib.llama_moespac_slots_attach(self.session.ctx, None)
            lib.llama_moespac_slots_free(self.handle)
            self.handle = None

    def __enter__(self) -> SlotCache:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()
