"""The lookahead gate inside a decode: predict layers l+1..l+D as soon as layer l's router input exists.

`GateTap` is an eval callback for `Session(..., capture=GateTap(gate, sink))`: the session chains
it behind the C routing tap, which asks it only about nodes named like the router inputs of MoE
layers (`ffn_norm-<l>`, gpt-oss `attn_post_norm-<l>`; `name_prefixes`), and when one has
been computed it runs the gate on that ubatch's rows and calls `sink(layer, expected)` with the
expected routings [n_layer, n_expert] of layers l+1..l+D (zeros elsewhere) — while layers
l+1.. are still to be computed, so a prefetch started by the sink overlaps their compute.

`GatedResidency` is such a sink plus a speculative-loop observer around the engine's
`ResidencyController`: one utility space. Its utility is the controller's speculative utility
(expected tokens per (layer, expert) in the step) with the layers the gate reaches replaced by
the gate's expected routings of the rows being decoded (same unit, better informed: conditioned
on this pass's hidden states). The held set stays the controller's plan, re-made once per
step; the gate's predicted experts of the layers in reach that are not held are read ahead into
the stream window (`engine.hint`), nearest layer first (their deadline is soonest). Re-planning
the held set after every layer instead makes the engine swap experts in and out at every layer
(docs/design.md, "The lookahead gate").

Cost: the tap's C-side name filter keeps Python out of every other node (~50 us per Python
call, NOTES.md); what remains is reading each layer's rows and running the gate.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

from ..llama.abi import llama_cpp
from ..llama.capture import GgmlTensor, read_f32
from .model import HIDDEN_NAMES, LookaheadGate

Sink = Callable[[int, np.ndarray], None]


class GateTap:
    """Run the gate on each MoE layer's router input as llama.cpp computes it (see module doc)."""

    def __init__(self, gate: LookaheadGate, sink: Sink | None = None):
        self.gate, self.sink = gate, sink
        self.name_prefixes = tuple(f"{n}-" for n in HIDDEN_NAMES)
        self._layer_of = {}
        for l in gate.moe_layers:
            self._layer_of[f"ffn_norm-{l}".encode()] = l
            self._layer_of[f"attn_post_norm-{l}".encode()] = l
        self.calls = 0  # gate evaluations
        self.seconds = 0.0  # time spent reading states + predicting + in the sink
        self.last: dict[int, np.ndarray] = {}  # source layer -> its expected routings, this decode
        self.callback = llama_cpp.ggml_backend_sched_eval_callback(self._eval)

    def _eval(self, tensor_ptr, ask: bool, user_data) -> bool:
        t = GgmlTensor.from_address(tensor_ptr)
        layer = self._layer_of.get(t.name)
        if layer is None:
            return not ask
        if ask:
            return True
        t0 = time.perf_counter()
        try:
            if layer == self.gate.moe_layers[0]:
                self.last = {}
            h = read_f32(t, tensor_ptr)
            u = self.gate.utility({layer: h}, known_upto=layer)
            self.last[layer] = u
            if self.sink is not None:
                self.sink(layer, u)
        except Exception:  # never let an exception cross into llama.cpp
            pass
        self.calls += 1
        self.seconds += time.perf_counter() - t0
        return True


class GatedResidency:
    """Observer + gate sink around a `ResidencyController` (residency.controller): one utility space.

        tap = GateTap(gate)                              # before the target session ...
        target = Session(model, capture=tap)             # ... chained behind the routing tap
        controller = ResidencyController(layout, budget, mappings=target.mappings())
        gated = GatedResidency(controller, gate, tap=tap)  # becomes the tap's sink
        decoder.subscribe(gated)                         # instead of the controller itself

    Uses of the controller: `on_draft`/`on_verify` (passed through), `policy.estimator.predict`
    (the speculative utility) and `engine.hint`.
    """

    def __init__(
        self,
        controller,
        gate: LookaheadGate,
        weight: float = 1.0,
        every: int = 1,
        threshold: float = 0.5,
        tap: GateTap | None = None,
        read_ahead: int = 1,
    ):
        self.controller, self.gate = controller, gate
        self.weight = weight  # 1: the gate replaces the speculative utility in its reach
        self.every = max(1, every)  # re-plan every `every` source layers
        self.threshold = threshold  # expected routings that make an expert "predicted" (urgent)
        # layers ahead whose predicted experts are read ahead: the stream window under a tight cap
        # holds about one layer's experts; reading 3 layers ahead there re-read 3x the bytes
        self.read_ahead = read_ahead
        self.tap = tap or GateTap(gate)
        self.tap.sink = self.on_lookahead
        self.base = np.zeros((gate.n_layer, gate.n_expert))
        self.applied = 0

    def _estimate(self, draft=None) -> np.ndarray:
        est = getattr(getattr(self.controller, "policy", None), "estimator", None) or getattr(
            self.controller, "estimator", None
        )
        return np.asarray(est.predict(draft), dtype=np.float64) if est is not None else self.base

    # speculative-loop observer: keep the controller's behaviour, remember its utility
    def on_draft(self, draft: list[int], ahead=None) -> None:
        self.controller.on_draft(draft, ahead)
        self.base = self._estimate(draft or None)

    def on_verify(self, event) -> None:
        self.controller.on_verify(event)
        self.base = self._estimate()

    def combine(self, layer: int, expected: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(utility, priority, predicted) [n_layer, n_expert] after `layer` routed, given the gate's
        expected routings of the layers it reaches (rows of zeros elsewhere); `predicted`: the
        experts of the layers in reach the gate expects to be used (>= threshold)."""
        reach = expected.any(axis=1)
        util = np.array(self.base, dtype=np.float64, copy=True)
        util[reach] = self.weight * expected[reach] + (1 - self.weight) * util[reach]
        priority = util.copy()
        dist = np.arange(self.gate.n_layer)[:, None] - layer
        urgent = reach[:, None] & (dist > 0) & (expected >= self.threshold)
        # predicted experts of the layers in reach first, nearest layer first (its compute starts
        # soonest), then everything else by utility
        bonus = (self.gate.distance + 1 - dist) * (1.0 + float(np.abs(util).max()))
        priority[urgent] += np.broadcast_to(bonus, priority.shape)[urgent]
        return util, priority, urgent

    def on_lookahead(self, layer: int, expected: np.ndarray) -> None:
        if self.gate.moe_layers.index(layer) % self.every:
            return
        _, priority, predicted = self.combine(layer, expected)
        near = np.zeros_like(predicted)
        near[layer + 1 : layer + 1 + self.read_ahead] = True
        self.controller.engine.hint(predicted & near, priority)
        self.applied += 1

    def close(self) -> None:
        self.controller.close()
