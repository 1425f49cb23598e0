"""Speculative Utility Estimator: how many tokens each expert will receive in the next step.

A verification batch routes every row through the target, so its routing is a free look at the
experts the next batch will need. Every estimator here answers in one space, float
[n_layer, n_expert] = expected tokens routed to each (layer, expert) in the next step, so the
balancer and the engine consume a single array whatever the method:

- `SpacUtility`: MoE-SpAc's discrete per-expert state machine (the fixed-threshold baseline);
- `EwmaUtility`: exponentially weighted routing frequency x tokens expected per step;
- `TokenPrior`: what each token id routed to when it was verified before, applied to the
  drafted ids before they are verified.

Routing input everywhere: `experts` int [n_layer, n_tokens, k], -1 = no expert (e.g. rows a
layer pruned).
"""

from __future__ import annotations

import numpy as np

from ..core.errors import MoespacError
from ..core.routing import check_experts, routed_rows, routing_counts

METHODS = ("spac", "ewma", "prior")


def topn_mask(utility: np.ndarray, n: int) -> np.ndarray:
    """The n highest-utility experts of each layer (ties to the lower id): bool [n_layer, n_expert]."""
    order = np.argsort(-np.asarray(utility), axis=1, kind="stable")[:, :n]
    mask = np.zeros(np.shape(utility), dtype=bool)
    np.put_along_axis(mask, order, True, axis=1)
    return mask


def recall_precision(predicted_topn_mask: np.ndarray, used_mask: np.ndarray) -> tuple[float, float]:
    """(share of used experts that were predicted, share of predicted experts that were used).

    An empty denominator scores 1.0: nothing used means nothing was missed, nothing predicted
    means nothing was wasted.
    """
    predicted = np.asarray(predicted_topn_mask, dtype=bool)
    used = np.asarray(used_mask, dtype=bool)
    if predicted.shape != used.shape:
        raise MoespacError(f"predicted mask {predicted.shape} and used mask {used.shape} differ in shape")
    hits = int((predicted & used).sum())
    return _ratio(hits, int(used.sum())), _ratio(hits, int(predicted.sum()))


class SpacUtility:
    """MoE-SpAc's state machine: per expert a state s in 0..S steps up by one when the step's
    count c exceeds s by theta_up, down by one when it falls short by theta_down.

    The thresholds are hysteresis: one noisy step does not move an expert in or out.
    """

    def __init__(self, n_layer: int, n_expert: int, max_state: int = 4, theta_up: int = 1, theta_down: int = 2):
        if max_state < 1 or theta_up < 1 or theta_down < 1:
            # thresholds >= 1 so that a step can never satisfy both the up and the down rule
            raise MoespacError(
                f"SpAc needs S >= 1 and thresholds >= 1, got S={max_state}, "
                f"theta_up={theta_up}, theta_down={theta_down}"
            )
        self.max_state, self.theta_up, self.theta_down = max_state, theta_up, theta_down
        self.state = np.zeros((n_layer, n_expert), dtype=np.int64)

    def update(self, counts: np.ndarray) -> None:
        counts = _check_shape(counts, self.state.shape, "routing counts")
        up = counts - self.state >= self.theta_up
        down = self.state - counts >= self.theta_down
        self.state = np.clip(self.state + up - down, 0, self.max_state)

    def utility(self) -> np.ndarray:
        return self.state.astype(np.float64)


class EwmaUtility:
    """Exponentially weighted per-token routing frequency, scaled to the tokens of one step.

    `freq[l, e]` = expected routings of expert e per routed token of layer l; `tokens_per_step`
    = weighted mean of the rows the observed steps carried (accepted length + 1 when the engine
    reports only accepted rows, K + 1 when it reports the whole verification batch). A layer's
    first observation initialises it, so there is no warm-up bias toward zero. `freq` forgets per
    routed token: a step of r rows keeps (1 - alpha)^r of the old estimate, so a K + 1-row
    verification counts as K + 1 one-token steps (per step, alpha = 0.3 lagged SpAc by up to 16% on
    speculative windows in the simulator), and a long prompt's prefill replaces most of what came
    before it. alpha 0.3 remembers ~3 tokens, 0.02 ~50: which one serves depends on what a decision
    costs (policy.MoeSpacPolicy).
    """

    def __init__(self, n_layer: int, n_expert: int, alpha: float = 0.3, step_alpha: float = 0.3):
        if not (0.0 < alpha <= 1.0 and 0.0 < step_alpha <= 1.0):
            raise MoespacError(f"EWMA alphas must be in (0, 1], got {alpha} and {step_alpha}")
        self.alpha, self.step_alpha = alpha, step_alpha  # rows per step follow adaptive K within a few steps
        self.freq = np.zeros((n_layer, n_expert))
        self.tokens_per_step = 0.0  # 0 until a step is seen: a plain decode step's one row is assumed
        self._seen = np.zeros(n_layer, dtype=bool)

    def update(self, counts: np.ndarray, rows: np.ndarray, prefill: bool = False) -> None:
        """Learn from one step's routing; a prefill (a prompt's rows) updates the frequency but not the
        rows per step (a prompt is not a verification)."""
        counts = _check_shape(counts, self.freq.shape, "routing counts")
        rows = _check_shape(rows, self.freq.shape[:1], "routed rows")
        live = rows > 0
        if not live.any():
            return
        step_freq = counts[live] / rows[live, None]
        first = ~self._seen[live]
        # forget per routed token, not per step: a 5-row verification weighs as 5 one-token steps
        keep = (1.0 - self.alpha) ** rows[live, None]
        self.freq[live] = np.where(first[:, None], step_freq, keep * self.freq[live] + (1.0 - keep) * step_freq)
        self._seen |= live
        if not prefill:
            step_rows = float(rows.max())
            self.tokens_per_step = (
                step_rows
                if self.tokens_per_step == 0.0
                else (1.0 - self.step_alpha) * self.tokens_per_step + self.step_alpha * step_rows
            )

    def utility(self) -> np.ndarray:
        return self.freq * (self.tokens_per_step or 1.0)


class TokenPrior:
    """Token id -> per-layer expert distribution, learned online from verified rows.

    Routing depends strongly on the token itself, and the drafted ids are known before the
    target sees them. A token seen n times in layer l predicts
    (counts + strength * fallback) / (n + strength): rare and unseen tokens lean on the fallback
    (by default the global per-token frequency). Memory is bounded by keeping the `max_tokens`
    most recently seen ids (each costs n_layer * (n_expert + 1) floats).
    """

    def __init__(self, n_layer: int, n_expert: int, strength: float = 2.0, max_tokens: int = 1024):
        if strength <= 0 or max_tokens < 1:
            raise MoespacError(f"token prior needs strength > 0 and max_tokens >= 1, got {strength} and {max_tokens}")
        self.n_layer, self.n_expert = n_layer, n_expert
        self.strength, self.max_tokens = strength, max_tokens
        self.total_counts = np.zeros((n_layer, n_expert))
        self.total_rows = np.zeros(n_layer)
        self._table: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # insertion order = recency

    def observe(self, tokens, experts) -> None:
        ids = check_experts(experts, self.n_expert, self.n_layer)
        tokens = _check_tokens(tokens, ids.shape[1])
        for row, token in enumerate(tokens.tolist()):
            one = ids[:, row : row + 1]
            counts, rows = self._table.pop(token, (0.0, 0.0))
            counts = (counts + routing_counts(one, self.n_expert)).astype(np.float32)
            self._table[token] = (counts, rows + routed_rows(one))
        while len(self._table) > self.max_tokens:
            del self._table[next(iter(self._table))]
        self.total_counts += routing_counts(ids, self.n_expert)
        self.total_rows += routed_rows(ids)

    def frequency(self) -> np.ndarray:
        """Global expected routings per token, float [n_layer, n_expert]."""
        return self.total_counts / np.maximum(self.total_rows, 1.0)[:, None]

    def predict(self, draft_tokens, fallback: np.ndarray | None = None) -> np.ndarray:
        """Expected routings of the drafted rows, float [n_layer, n_expert]."""
        tokens = _check_tokens(draft_tokens)
        base = self.strength * (
            self.frequency()
            if fallback is None
            else _check_shape(fallback, self.total_counts.shape, "fallback frequency")
        )
        expected = np.zeros_like(self.total_counts)
        for token in tokens.tolist():
            counts, rows = self._table.get(token, (0.0, np.zeros(self.n_layer)))
            expected += (counts + base) / (rows + self.strength)[:, None]
        return expected


class UtilityEstimator:
    """The one utility array the balancer and the engine read, from the chosen method.

    "spac": the SpAc state (baseline); "ewma": the EWMA estimate; "prior" (default): with drafted
    ids, the token prior over exactly those rows, smoothed toward the EWMA frequency (recent
    context beats the session-wide average for unseen ids); without them, the EWMA estimate.
    """

    def __init__(
        self,
        n_layer: int,
        n_expert: int,
        method: str = "prior",
        *,
        alpha: float = 0.3,
        max_state: int = 4,
        theta_up: int = 1,
        theta_down: int = 2,
        prior_strength: float = 2.0,
        max_tokens: int = 1024,
    ):
        if method not in METHODS:
            raise MoespacError(f"unknown utility method {method!r} (choose from {', '.join(METHODS)})")
        self.n_layer, self.n_expert, self.method = n_layer, n_expert, method
        self.spac = SpacUtility(n_layer, n_expert, max_state, theta_up, theta_down) if method == "spac" else None
        self.ewma = EwmaUtility(n_layer, n_expert, alpha) if method != "spac" else None
        self.prior = TokenPrior(n_layer, n_expert, prior_strength, max_tokens) if method == "prior" else None

    def observe_verification(self, tokens, experts, prefill: bool = False) -> None:
        """Learn from one verification (or, with `prefill`, a prompt): the row token ids [n_tokens]
        and their routing."""
        ids = check_experts(experts, self.n_expert, self.n_layer)
        _check_tokens(tokens, ids.shape[1])
        counts = routing_counts(ids, self.n_expert)
        if self.spac is not None:
            self.spac.update(counts)
        if self.ewma is not None:
            self.ewma.update(counts, routed_rows(ids), prefill)
        if self.prior is not None:
            self.prior.observe(tokens, ids)

    def predict(self, draft_tokens=None) -> np.ndarray:
        """Expected tokens per (layer, expert) next step; `draft_tokens` are the ids of the rows
        about to be verified (only the "prior" method uses them)."""
        if self.spac is not None:
            return self.spac.utility()
        if self.prior is not None and draft_tokens is not None and len(draft_tokens) > 0:
            return self.prior.predict(draft_tokens, fallback=self.ewma.freq)
        return self.ewma.utility()

    def predict_over(self, steps: float, draft_tokens=None) -> np.ndarray:
        """Mean expected tokens per (layer, expert) per step over the next `steps` steps: the first
        predicted from its drafted ids (if given), the others at the estimate's rate. What a plan
        that holds experts for `steps` steps weighs: the drafted ids say nothing about later steps
        (letting them stand for all of them reads more bytes: docs/design.md)."""
        first = self.predict(draft_tokens)
        if draft_tokens is None or len(draft_tokens) == 0 or steps <= 1:
            return first
        return ((steps - 1.0) * self.predict() + first) / steps


def _ratio(num: int, den: int) -> float:
    return num / den if den else 1.0


def _check_tokens(tokens, n_tokens: int | None = None) -> np.ndarray:
    ids = np.asarray(tokens).reshape(-1)
    if ids.size and not np.issubdtype(ids.dtype, np.integer):
        raise MoespacError(f"token ids must be integers, got {ids.dtype}")
    if n_tokens is not None and ids.size != n_tokens:
        raise MoespacError(f"{ids.size} token ids for {n_tokens} routed rows")
    return ids.astype(np.int64)


def _check_shape(values, shape: tuple, what: str) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64)
    if arr.shape != tuple(shape):
        raise MoespacError(f"{what} must have shape {tuple(shape)}, got {arr.shape}")
    return arr


class RecencyEstimator:
    """Least-recently-used order in the utility's place: an LRU expert cache's policy.

    Each (layer, expert)'s value is the stamp of the last routed row that used it (rows are
    stamped 1, 2, ... in the order they are observed, a batch's rows in batch order; 0: never
    used), so each layer's top-S experts by `predict()` are its S most recently used: what an LRU
    cache of S slots per layer holds (llama.cpp PR #27861's GPU expert cache). The values rank
    experts; they are not expected tokens. The same interface as UtilityEstimator, so the slot
    filler can follow it (SlotFiller.follow); it ignores drafted ids.
    """

    def __init__(self, n_layer: int, n_expert: int):
        self.n_layer, self.n_expert = n_layer, n_expert
        self.last_used = np.zeros((n_layer, n_expert))
        self.rows = 0  # rows observed so far: the last stamp given

    def observe_verification(self, tokens, experts, prefill: bool = False) -> None:
        """Stamp the experts a batch's rows used (`prefill` makes no difference: a prompt's rows
        are uses like any other)."""
        ids = check_experts(experts, self.n_expert, self.n_layer)
        _check_tokens(tokens, ids.shape[1])
        n_layer, n_rows, k = ids.shape
        layer = np.broadcast_to(np.arange(n_layer)[:, None, None], ids.shape)
        stamp = np.broadcast_to(self.rows + 1 + np.arange(n_rows)[None, :, None], ids.shape)
        used = ids >= 0
        np.maximum.at(self.last_used, (layer[used], ids[used]), stamp[used])
        self.rows += n_rows

    def predict(self, draft_tokens=None) -> np.ndarray:
        """float [n_layer, n_expert]: the last row that used each expert (higher = more recent)."""
        return self.last_used.copy()


AGE_EDGES = np.array([0, 1, 2, 3, 4, 6, 9, 17, 33])  # rows since an expert's last use: bucket edges
MEMORY_CELLS = 1 << 21  # the successor memory's windows x (layer, expert) pairs, at most


class ReusePredictor:
    """The probability that each (layer, expert) is used by the next window, learned online from
    the windows' routing alone (no future): what a cache with free keeps (a page cache) should keep
    after each window (policy.MoeSpacPolicy), the experts most likely needed soonest.

    Two predictions, each an estimate in [0, 1], combined by an online-calibrated logistic model:

    - **reuse**: one table shared by every (layer, expert), keyed by its recency and frequency state,
      which is the bits of whether it was used by each of the last `history` windows and how many
      routed rows ago it was last used (bucketed by AGE_EDGES: within a K + 1-row window, an
      expert of its last rows is likelier in the next window than one of its first), and holding
      how often an expert in that state was used by the next window. Recency and frequency, with
      the balance between them measured rather than set.
    - **successor**: the routing of the window's last row stands in for its token (routing depends
      strongly on the token), and what followed past rows that routed alike predicts what follows
      it: a kernel average of the next window's experts over the past `memory` windows, weighted
      exp(`sharpness` x the share of the (layer, expert) pairs the two rows share), shrunk toward the experts'
      long-run frequency. `sharpness` is per share of the row's (layer, expert) pairs: exp(20) for
      a row routed alike in every layer against one routed alike in none.

    The calibration (weights on the logits of the two, and a bias) is fitted by one gradient step of
    the log-loss per window, labelled by the next window's use: it leans on whichever predicts better
    on this routing and this window size. `predict()` is the combined probability, float [L, E].
    """

    def __init__(
        self,
        n_layer: int,
        n_expert: int,
        history: int = 4,
        memory: int = 1024,
        sharpness: float = 20.0,
        rate: float = 0.2,
        freq_alpha: float = 0.02,
    ):
        if history < 1 or memory < 1 or sharpness < 0 or rate < 0 or not 0 < freq_alpha <= 1:
            raise MoespacError(
                f"reuse predictor needs history >= 1, memory >= 1, sharpness >= 0, rate >= 0 and "
                f"0 < freq_alpha <= 1, got {history}, {memory}, {sharpness}, {rate}, {freq_alpha}"
            )
        self.n_layer, self.n_expert = n_layer, n_expert
        self.history, self.sharpness, self.rate, self.freq_alpha = history, sharpness, rate, freq_alpha
        shape = (n_layer, n_expert)
        self.bits = np.zeros(shape, dtype=np.int64)  # use by the last `history` windows, newest lowest
        self.last_row = np.zeros(shape, dtype=np.int64)  # stamp of the last row that used it, 0 = never
        self.rows = 0
        n_state = (1 << history) * (len(AGE_EDGES) + 1)
        self.state = np.zeros(shape, dtype=np.int64)
        self.used_next = np.zeros(n_state)  # per state: times the next window used it ...
        self.seen = np.zeros(n_state)  # ... of times an expert was in that state
        self.freq = np.full(shape, 1.0 / max(1, n_expert))  # per-window use frequency, EWMA
        # successor memory: of each past window, the experts of its last row and of the next window
        self.memory = min(memory, max(64, MEMORY_CELLS // (n_layer * n_expert)))  # ~2 M cells: a few ms a window
        memory = self.memory
        self.last_rows = np.zeros((memory, n_layer * n_expert), dtype=bool)
        self.next_used = np.zeros((memory, n_layer * n_expert), dtype=np.float32)  # 0/1; float for BLAS
        self.n_memory = 0
        self.key: np.ndarray | None = None  # flat (layer, expert) ids of the last window's last row
        self.weights = np.array([0.0, 0.5, 0.5])  # bias, reuse logit, successor logit
        self.features: np.ndarray | None = None  # of the last prediction, for its gradient step

    def observe(self, experts) -> None:
        """Learn from one window's routing (int [L, T, k]) and predict for the next."""
        ids = check_experts(experts, self.n_expert, self.n_layer)
        if ids.shape[1] == 0:
            return
        used = routing_counts(ids, self.n_expert) > 0
        flat_used = used.ravel()
        if self.features is not None:  # the last prediction's step, labelled by this window
            p = _sigmoid(self.features @ self.weights)
            self.weights -= self.rate * (self.features.T @ (p - flat_used)) / len(p)
        n_state = len(self.seen)
        self.used_next += np.bincount(self.state.ravel(), weights=flat_used, minlength=n_state)
        self.seen += np.bincount(self.state.ravel(), minlength=n_state)
        if self.key is not None:
            slot = self.n_memory % self.memory
            self.last_rows[slot] = False
            self.last_rows[slot, self.key] = True
            self.next_used[slot] = flat_used
            self.n_memory += 1
        # the state after this window
        self.bits = ((self.bits << 1) | used) & ((1 << self.history) - 1)
        n_layer, n_rows, k = ids.shape
        layer = np.broadcast_to(np.arange(n_layer)[:, None, None], ids.shape)
        stamp = np.broadcast_to(self.rows + 1 + np.arange(n_rows)[None, :, None], ids.shape)
        live = ids >= 0
        np.maximum.at(self.last_row, (layer[live], ids[live]), stamp[live])
        self.rows += n_rows
        age = np.where(self.last_row > 0, self.rows - self.last_row, np.iinfo(np.int64).max)
        self.state = self.bits * (len(AGE_EDGES) + 1) + np.searchsorted(AGE_EDGES, age, side="right")
        self.freq = (1.0 - self.freq_alpha) * self.freq + self.freq_alpha * used
        last = ids[:, -1, :].astype(np.int64)
        self.key = (last + np.arange(n_layer)[:, None] * self.n_expert)[last >= 0]
        self.features = np.column_stack(
            [np.ones(flat_used.size), _logit(self.reuse()).ravel(), _logit(self.successor()).ravel()]
        )

    def reuse(self) -> np.ndarray:
        """P(used by the next window) of each expert's recency and frequency state, float [L, E]."""
        return (self.used_next[self.state] + 0.5) / (self.seen[self.state] + 1.0)

    def successor(self) -> np.ndarray:
        """P(used by the next window) from what followed past windows whose last row routed alike."""
        n = min(self.n_memory, self.memory)
        if self.key is None or n == 0:
            return self.freq.copy()
        shared = self.last_rows[:n][:, self.key].mean(axis=1) if len(self.key) else np.zeros(n)
        weight = np.exp(self.sharpness * (shared - shared.max()))
        prior = 1.0  # the long-run frequency counts as one window of evidence
        expected = (weight.astype(np.float32) @ self.next_used[:n] + prior * self.freq.ravel()) / (weight.sum() + prior)
        return expected.reshape(self.freq.shape)

    def predict_if_used(self) -> np.ndarray:
        """The calibrated P(used by the window after next | used by the next one, in its last row),
        float [L, E]: what keeping an expert the next window reads is worth (residency.keep).
        The successor part stays as predicted now (what follows the next window is unknown)."""
        if self.features is None:
            return self.freq.copy()
        bits = ((self.bits << 1) | 1) & ((1 << self.history) - 1)
        state = bits * (len(AGE_EDGES) + 1) + np.searchsorted(AGE_EDGES, 0, side="right")
        reuse = (self.used_next[state] + 0.5) / (self.seen[state] + 1.0)
        z = self.weights[0] + self.weights[1] * _logit(reuse).ravel() + self.weights[2] * self.features[:, 2]
        return _sigmoid(z).reshape(self.n_layer, self.n_expert)

    def predict(self) -> np.ndarray:
        """The calibrated P(used by the next window), float [L, E] (the long-run frequency before any
        window)."""
        if self.features is None:
            return self.freq.copy()
        return _sigmoid(self.features @ self.weights).reshape(self.n_layer, self.n_expert)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-3, 1.0 - 1e-3)
    return np.log(p / (1.0 - p))
