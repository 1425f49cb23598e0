"""SmolMoE's routers: fitted to real hidden states by balanced k-means (the package docstring).

The router inputs (`ffn_norm-N`) are captured from the dense model through llama.cpp once per
source file and cached on disk; routers are then fitted per (experts, top-k) and cached too.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ...core.atomic import atomic_path
from ...core.errors import MoespacError
from ...llama.capture import TensorCapture
from ...llama.session import Session
from ..corpus import training_sample
from .config import BUILDER_VERSION, UpcycleConfig, file_id, short_hash


def capture_router_inputs(
    model: Path, texts: Iterable[str], max_tokens: int, n_ctx: int = 512, progress: bool = True
) -> np.ndarray:
    """float32 [n_layer, n_tokens, n_embd]: every token's FFN input (`ffn_norm-N`) in every layer.

    Decoded with logits for every row, so the last layer keeps every row too
    (llama.cpp prunes rows without output before the last FFN otherwise).
    """
    cap = TensorCapture("ffn_norm")
    n = 0
    with (
        Session(model, n_ctx=n_ctx, n_batch=n_ctx, tap=False, capture=cap) as s,
        tqdm(total=max_tokens, unit="tok", desc="capturing router inputs", disable=not progress) as bar,
    ):
        n_layer = s.n_layer
        for text in texts:
            if n >= max_tokens:
                break
            toks = s.tokenize(text)[: min(n_ctx, max_tokens - n)]
            if len(toks) < 2:
                continue
            s.reset()
            s.decode(toks, all_logits=True)
            n += len(toks)
            bar.update(len(toks))
    if n == 0:
        raise MoespacError("no training tokens captured")
    return np.stack([cap.take(f"ffn_norm-{l}") for l in range(n_layer)])


def _topk(logits: np.ndarray, k: int) -> np.ndarray:
    return np.argpartition(-logits, k - 1, axis=1)[:, :k]


def expert_load(logits: np.ndarray, k: int) -> np.ndarray:
    """Share of the top-k routings each expert receives (sums to 1)."""
    e = logits.shape[1]
    return np.bincount(_topk(logits, k).ravel(), minlength=e) / (logits.shape[0] * k)


def load_entropy(load: np.ndarray) -> float:
    """Entropy of a load distribution as a fraction of ln(E) (1 = perfectly even)."""
    p = np.asarray(load, dtype=np.float64)
    p = p / p.sum()
    nz = p[p > 0]
    return float(-(nz * np.log(nz)).sum() / np.log(len(p))) if len(p) > 1 else 1.0


def _balance(scores: np.ndarray, k: int, offsets: np.ndarray, soft_iters: int, hard_iters: int) -> np.ndarray:
    """Per-column offsets that even out the top-k counts of `scores + offsets`.

    Log-domain Sinkhorn on softmax(scores / tau) first (its column potentials
    converge robustly), then damped updates on the hard top-k counts.
    """
    n, e = scores.shape
    target = n * k / e
    tau = 0.05 * float(np.std(scores - scores.mean(1, keepdims=True))) or 1e-3
    g = np.asarray(offsets, dtype=np.float32).copy()
    for _ in range(soft_iters):
        a = (scores + g) / tau
        a -= a.max(1, keepdims=True)
        p = np.exp(a)
        col = (p / p.sum(1, keepdims=True)).sum(0) * k
        g -= tau * np.log(np.maximum(col, 1e-9) / target)
    step = tau
    for _ in range(hard_iters):
        top = np.argmax(scores + g, axis=1) if k == 1 else _topk(scores + g, k)
        counts = np.bincount(top.ravel(), minlength=e)
        g -= step * np.log((counts + 1.0) / (target + 1.0))
        step *= 0.95
    return g


class _OneBlasThread:
    """Run numpy's OpenBLAS on one thread inside the block.

    On a shared 2-core machine multi-threaded OpenBLAS is up to 100x slower
    for these small matrices (threads spin against llama.cpp and other work).
    """

    def __init__(self):
        self.get = self.set = None
        try:
            maps = open("/proc/self/maps").read()
        except OSError:
            return
        for lib in sorted({line.split()[-1] for line in maps.splitlines() if "openblas" in line.lower()}):
            try:
                dll = ctypes.CDLL(lib)
            except OSError:
                continue
            for suffix in ("64_", ""):
                for prefix in ("scipy_openblas", "openblas"):
                    get = getattr(dll, f"{prefix}_get_num_threads{suffix}", None)
                    set_ = getattr(dll, f"{prefix}_set_num_threads{suffix}", None)
                    if get is not None and set_ is not None:
                        self.get, self.set = get, set_
                        return

    def __enter__(self):
        self.old = self.get() if self.get else None
        if self.set:
            self.set(1)
        return self

    def __exit__(self, *exc):
        if self.set and self.old:
            self.set(self.old)


def _kmeans_pp(z: np.ndarray, e: int, rng: np.random.Generator) -> np.ndarray:
    centres = [z[rng.integers(len(z))]]
    d2 = ((z - centres[0]) ** 2).sum(1)
    for _ in range(1, e):
        i = rng.choice(len(z), p=d2 / d2.sum())
        centres.append(z[i])
        d2 = np.minimum(d2, ((z - z[i]) ** 2).sum(1))
    return np.stack(centres)


def fit_router(
    x: np.ndarray, n_expert: int, top_k: int, seed: int = 0, pca_dims: int = 64, iters: int = 12
) -> np.ndarray:
    """Router weights [n_expert, n_embd] (float32) for router inputs x [n_tokens, n_embd].

    Balanced k-means in a whitened PCA space, turned into a bias-free linear
    router (see the module docstring).
    """
    with _OneBlasThread():
        return _fit_router(x, n_expert, top_k, seed, pca_dims, iters)


def _fit_router(x, n_expert, top_k, seed, pca_dims, iters) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    n, d = x.shape
    if n < 4 * n_expert:
        raise MoespacError(f"{n} router inputs are too few to fit {n_expert} experts")
    rng = np.random.default_rng(seed)
    # whiten with the UNcentred second moment: the mean becomes one (near-constant) direction, so
    # the scores below need only small per-expert constants (large ones would not survive folding)
    gram = x.T @ x
    r = min(pca_dims, d)
    lam, vec = np.linalg.eigh(gram.astype(np.float64) / n)
    lam, vec = lam[::-1][:r], vec[:, ::-1][:, :r]
    proj = (vec / np.sqrt(np.maximum(lam, 1e-12 * lam[0]))).astype(np.float32)  # d x r
    z = x @ proj
    centres = _kmeans_pp(z, n_expert, rng)
    offsets = np.zeros(n_expert, dtype=np.float32)
    for _ in range(iters):
        scores = 2 * z @ centres.T - (centres**2).sum(1)  # = |z|^2 - |z - c|^2
        offsets = _balance(scores, 1, offsets, 8, 4)
        assign = np.argmax(scores + offsets, axis=1)
        for e in range(n_expert):
            members = z[assign == e]
            if len(members):
                centres[e] = members.mean(0)
    # linear form: score_e(h) = h.w_e + b_e
    w = 2 * (proj @ centres.T).T  # E x d
    b = offsets - (centres**2).sum(1)
    b = b - b.mean()  # a shared constant does not change the ranking
    # fold the constants into u, a direction along which every token's input is ~1
    u = np.linalg.solve(gram.astype(np.float64) + 1e-6 * n * np.eye(d), x.sum(0).astype(np.float64))
    u = u.astype(np.float32)
    weights = w + b[:, None].astype(np.float32) * u[None, :]
    logits = x @ weights.T
    spread = float(np.std(logits - logits.mean(1, keepdims=True))) or 1.0
    # re-tune the top-k balance of the real (bias-free) router
    delta = _balance(logits, top_k, np.zeros(n_expert), 40, 40)
    weights = weights + delta[:, None].astype(np.float32) * u[None, :]
    logits = x @ weights.T
    spread = float(np.std(logits - logits.mean(1, keepdims=True))) or 1.0
    return (weights / spread).astype(np.float32)


class RouterFitter:
    """Captures the training router inputs once and fits/caches routers for any (E, k)."""

    def __init__(
        self, src: Path, cache_dir: Path, progress: bool = True, texts: Callable[[int], list[str]] | None = None
    ):
        self.src, self.cache_dir, self.progress = Path(src), Path(cache_dir), progress
        self._texts = texts
        self._states: dict[int, np.ndarray] = {}

    def _training_texts(self, n_tokens: int) -> list[str]:
        if self._texts is not None:
            return self._texts(n_tokens)
        return training_sample(n_chars=n_tokens * 6, chunk_chars=2400)

    def states(self, n_tokens: int) -> np.ndarray:
        """[n_layer, n_tokens, n_embd] float16 router inputs, captured once and cached on disk."""
        if n_tokens not in self._states:
            key = short_hash(file_id(self.src), n_tokens, self._texts is None, BUILDER_VERSION)
            path = self.cache_dir / f"states-{n_tokens}-{key}.npy"
            if path.is_file():
                self._states[n_tokens] = np.load(path, mmap_mode="r")
            else:
                x = capture_router_inputs(
                    self.src, self._training_texts(n_tokens), n_tokens, progress=self.progress
                ).astype(np.float16)
                if self._texts is None:
                    with atomic_path(path) as tmp, open(tmp, "wb") as f:  # np.save would append .npy
                        np.save(f, x)
                self._states[n_tokens] = x
        return self._states[n_tokens]

    def routers(self, cfg: UpcycleConfig) -> list[np.ndarray]:
        key = short_hash(file_id(self.src), cfg.router_key(), self._texts is None)
        path = self.cache_dir / f"router-{cfg.n_expert}x-top{cfg.top_k}-{key}.npy"
        if path.is_file():
            return list(np.load(path))
        x = self.states(cfg.train_tokens)
        out = [
            fit_router(
                np.asarray(x[l], dtype=np.float32),
                cfg.n_expert,
                cfg.top_k,
                seed=cfg.seed + l,
                pca_dims=cfg.pca_dims,
                iters=cfg.kmeans_iters,
            )
            for l in tqdm(
                range(len(x)), desc=f"fitting {cfg.n_expert}-expert routers", unit="layer", disable=not self.progress
            )
        ]
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.save(f, np.stack(out))
        return out
