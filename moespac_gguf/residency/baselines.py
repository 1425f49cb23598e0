"""The policies moespac is measured against in the simulator: no cache, LRU (per layer and
global, as the page cache), a static hot set (Fiddler, `--n-cpu-moe`), MoE-SpAc's state machine,
and Belady's offline optimum, the bound on bytes moved. Same protocol as policy.Policy.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

from ..core.errors import MoespacError
from ..core.routing import routing_counts
from .policy import Capacity, Policy, first_uses, select
from .utility import SpacUtility


class OnDemand(Policy):
    """No cache: every window reads all its experts from the slow tier."""

    name = "ondemand"

    def _keep(self, tokens, experts, used, prefill):
        return np.zeros_like(self.resident)


class Lru(Policy):
    """Least recently used. `lru` is per layer (Mixtral-offloading); under a global capacity it splits
    it evenly, total // n_layer per layer. `lru-global` is one LRU over every layer's experts: what
    the kernel's page cache does to llama.cpp's mmapped GGUF (readahead aside).

    Replay rule, as `sim.trace_stats.lru_hit_rate`: a window's distinct experts are accessed layer by
    layer, each in first-use order (token order, then rank order); an access hits if the expert is
    resident at that moment; a miss evicts the least recent expert (of its layer, when per layer)
    and takes its place. With one token per window this is exactly trace_stats' replay.
    """

    def __init__(self, per_layer: bool = True):
        self.per_layer = per_layer
        self.name = "lru" if per_layer else "lru-global"

    def reset(self, n_layer, n_expert, capacity):
        if self.per_layer and capacity.per_layer is None:
            capacity = Capacity(capacity.total, capacity.total // n_layer)
        elif not self.per_layer:
            capacity = Capacity(capacity.total)
        super().reset(n_layer, n_expert, capacity)
        # recency order, least recent first: one per layer, or one over (layer, expert) pairs
        self.order = [OrderedDict() for _ in range(n_layer if self.per_layer else 1)]
        self.limit = capacity.per_layer if self.per_layer else capacity.total

    def access(self, tokens, experts, prefill=False):
        hits = np.zeros_like(self.resident)
        for key in first_uses(experts):
            order = self.order[key[0] if self.per_layer else 0]
            if key in order:
                order.move_to_end(key)
                hits[key] = True
            elif self.limit > 0:
                if len(order) >= self.limit:
                    self.resident[order.popitem(last=False)[0]] = False
                order[key] = None
                self.resident[key] = True
        return hits


class Static(Policy):
    """Fiddler-style: the experts a profile (of a DIFFERENT trace) used most, fixed for the whole run."""

    name = "static"

    def __init__(self, profile_counts: np.ndarray):
        self.profile_counts = np.asarray(profile_counts, dtype=np.float64)

    def reset(self, n_layer, n_expert, capacity):
        super().reset(n_layer, n_expert, capacity)
        if self.profile_counts.shape != (n_layer, n_expert):
            raise MoespacError(
                f"static profile has shape {self.profile_counts.shape}, the trace needs {(n_layer, n_expert)}"
            )
        self.resident = select(self.profile_counts, np.ones_like(self.resident), capacity)


class StaticLayers(Policy):
    """llama.cpp `--n-cpu-moe` style: whole layers resident (the last ones, as --n-cpu-moe keeps the
    first N layers' experts on the CPU). Layer-granular: honours the total, not `per_layer`."""

    name = "static-layers"

    def reset(self, n_layer, n_expert, capacity):
        super().reset(n_layer, n_expert, capacity)
        n_full = min(n_layer, capacity.total // n_expert) if n_expert else 0
        self.resident[n_layer - n_full :] = True


class Spac(Policy):
    """MoE-SpAc's baseline: an expert is wanted while its level in utility.SpacUtility's state
    machine (defaults S=4, theta_up=1, theta_down=2) is >= `threshold` (fixed); ties broken by
    recency, then the capacity cuts. Prefetches experts that qualify but are not resident."""

    name = "spac"

    def __init__(self, threshold: int = 1):
        if threshold < 1:
            raise MoespacError(f"SpAc threshold must be >= 1, got {threshold}")
        self.threshold = threshold

    def reset(self, n_layer, n_expert, capacity):
        super().reset(n_layer, n_expert, capacity)
        self.spac = SpacUtility(n_layer, n_expert)
        self.last_used = np.zeros((n_layer, n_expert))  # window index + 1 of the last use, 0 = never
        self.window = 0

    def _score(self) -> np.ndarray:
        return self.spac.state + self.last_used / (self.window + 1.0)  # recency in [0, 1) breaks ties

    def _want(self, draft_tokens):
        return select(self._score(), self.spac.state >= self.threshold, self.capacity)

    def _keep(self, tokens, experts, used, prefill):
        self.window += 1
        self.spac.update(routing_counts(experts, self.n_expert))
        self.last_used[used] = self.window
        return select(self._score(), (self.resident | used) & (self.spac.state >= self.threshold), self.capacity)


class Belady(Policy):
    """The offline optimum (Belady's MIN with bypass) for windows, given every window's needs.

    Model: the resident set R_w is fixed during window w; each needed expert not in R_w costs one
    load; after a window the cache may keep any of R_w | used_w for free; prefetching is allowed but
    also costs one load. Keeping, after each window, the experts whose next use comes soonest
    (never-used-again ones dropped) minimizes the total loads, hence the bytes moved, of ANY policy
    under the same capacity, per layer or global with equal expert sizes (exchange argument: swapping
    a kept expert for one needed sooner never adds a load). The first window starts from the soonest
    needed experts, as every policy's preload is free. Among policies that load only on demand it
    also has the highest hit rate (hits = needs - loads); a prefetching policy can exceed its hit
    rate, but never moves fewer bytes.
    """

    name = "belady"

    def __init__(self, future: np.ndarray):
        self.future = np.asarray(future, dtype=bool)  # [n_windows, L, E]: experts each window uses

    def reset(self, n_layer, n_expert, capacity):
        super().reset(n_layer, n_expert, capacity)
        n_window = len(self.future)
        if self.future.shape[1:] != (n_layer, n_expert):
            raise MoespacError(
                f"Belady future has shape {self.future.shape[1:]}, the trace needs {(n_layer, n_expert)}"
            )
        self.next_use = np.empty((n_window + 1, n_layer, n_expert), dtype=np.int64)  # first window >= w using it
        self.next_use[n_window] = n_window
        for w in range(n_window - 1, -1, -1):
            self.next_use[w] = np.where(self.future[w], w, self.next_use[w + 1])
        self.window = 0
        self.resident = self._soonest(np.ones_like(self.resident))

    def _soonest(self, eligible: np.ndarray) -> np.ndarray:
        upcoming = self.next_use[self.window]
        return select(-upcoming, eligible & (upcoming < len(self.future)), self.capacity)

    def _keep(self, tokens, experts, used, prefill):
        if self.window >= len(self.future) or not np.array_equal(used, self.future[self.window]):
            raise MoespacError(f"Belady was given a future that differs from window {self.window}")
        self.window += 1
        return self._soonest(self.resident | used)
