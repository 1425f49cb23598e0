"""How predictable is a routing trace? Skew, next-token reuse and the per-layer LRU baseline.

These are the hardware-independent numbers every predictor is measured against:
if a per-layer LRU of 4 experts already hits ~57% on Mixtral, a prefetcher must
beat that, not 0%.

LRU replay rule: each layer has its own cache of `cache_per_layer` experts. All
routings of a layer are replayed as one access stream, token by token in trace
order and, within a token, in stored rank order (rank 0 first); an access hits
when its expert is cached, then that expert becomes most recent. Nothing is reset
between sequences: the cache carries over from one prompt/generation to the next.
"""

from __future__ import annotations

import numpy as np

from ..core.errors import MoespacError
from .trace import RoutingTrace

_CHUNK_CELLS = 1 << 21  # rows x n_expert cells per chunk of the LRU replay (8 MB of int32)


def layer_skew(trace: RoutingTrace, top_frac: float = 0.1) -> np.ndarray:
    """Per layer: share of routings taken by the top `top_frac` experts (at least 1); nan if unused."""
    counts = trace.usage_counts()
    n_top = max(1, int(top_frac * trace.n_expert + 1e-9))
    top = -np.sort(-counts, axis=1)[:, :n_top].sum(axis=1)
    return _ratio(top, counts.sum(axis=1))


def next_token_reuse(trace: RoutingTrace) -> np.ndarray:
    """Per layer: mean fraction of token t's experts that token t-1 of the same sequence also used."""
    cur, prev = trace.experts[:, 1:], trace.experts[:, :-1]
    reused = np.zeros(cur.shape, dtype=bool)
    for j in range(trace.k):
        reused |= cur == prev[..., j, None]
    reused &= cur >= 0
    n_cur = (cur >= 0).sum(axis=-1)
    adjacent = (trace.sequence[1:] == trace.sequence[:-1]) & (trace.positions[1:] == trace.positions[:-1] + 1)
    pair = adjacent & (n_cur > 0) & (prev >= 0).any(axis=-1)
    frac = reused.sum(axis=-1) / np.maximum(n_cur, 1)
    return _ratio((frac * pair).sum(axis=1), pair.sum(axis=1))


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den as float, nan where den == 0 (a layer with nothing to measure)."""
    out = np.full(num.shape, np.nan)
    np.divide(num, den, out=out, where=den > 0)
    return out


def _stack_distances(stream: np.ndarray, n_expert: int) -> np.ndarray:
    """LRU stack distance of each access: how many other experts were used since its previous use.

    A cache of C experts hits exactly the accesses with distance < C (LRU is a stack
    algorithm), so one pass gives the hit rate of every size. First uses get n_expert.
    """
    chunk = max(1, _CHUNK_CELLS // n_expert)
    last = np.full(n_expert, -1, dtype=np.int32)  # index of each expert's latest access so far
    out = []
    for start in range(0, len(stream), chunk):
        acc = stream[start : start + chunk]
        n = len(acc)
        seen = np.full((n + 1, n_expert), -1, dtype=np.int32)
        seen[0] = last
        seen[np.arange(1, n + 1), acc] = np.arange(start, start + n)
        np.maximum.accumulate(seen, axis=0, out=seen)
        before = seen[:-1]  # latest access of every expert strictly before each access
        prev = before[np.arange(n), acc]
        out.append(np.where(prev < 0, n_expert, np.count_nonzero(before > prev[:, None], axis=1)))
        last = seen[-1]
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


def lru_curve(trace: RoutingTrace, sizes) -> dict[int, float]:
    """Hit rate of a per-layer LRU for each cache size (module docstring: replay rule)."""
    hist = np.zeros(trace.n_expert + 1, dtype=np.int64)
    for layer in trace.experts:
        stream = layer.reshape(-1)
        hist += np.bincount(_stack_distances(stream[stream >= 0], trace.n_expert), minlength=trace.n_expert + 1)
    total = hist.sum()
    if total == 0:
        raise MoespacError("trace has no routings to replay")
    return {int(size): float(hist[: min(int(size), trace.n_expert)].sum() / total) for size in sizes}


def lru_hit_rate(trace: RoutingTrace, cache_per_layer: int) -> float:
    """Share of routings served by a per-layer LRU of `cache_per_layer` experts."""
    return lru_curve(trace, [cache_per_layer])[cache_per_layer]


def activation_heatmap(trace: RoutingTrace, out_png) -> None:
    """Layers x experts map of each expert's share of its layer's routings."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # lazy: matplotlib takes ~0.5 s to import
    from matplotlib.figure import Figure  # lazy: as above

    counts = trace.usage_counts()
    share = _ratio(counts, counts.sum(axis=1, keepdims=True))
    fig = Figure(figsize=(max(5.0, 2.0 + 0.12 * trace.n_expert), max(4.0, 1.5 + 0.15 * trace.n_layer)))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    image = ax.imshow(share, aspect="auto", interpolation="nearest", cmap="viridis")
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    name = " ".join(filter(None, (trace.meta.get("model", "routing trace"), trace.meta.get("dataset"))))
    ax.set_title(f"{name}: {trace.n_tokens} tokens")
    fig.colorbar(image, ax=ax, label="share of the layer's routings")
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)
