"""Lookahead gate: from the router input of layer l, predict the experts of layers l+1..l+D.

Loads from flash take longer than one layer's compute, so the runtime must know which experts
a layer will need a few layers before that layer runs. The residual stream changes slowly, so
the router of layer t = l+d applied to layer l's router input already guesses layer t's
routing ("speculative gating", Eliseev & Mazur 2023, Mixtral-offloading). The guess degrades
with d; the gate *aligns* it, layer pair by layer pair:

    z_t(h_l) = [W_t | b_t] [h_l; 1] + Delta_{l,d} [h_l; 1]                (E expert scores)

Delta_{l,d} is fitted by ridge regression shrunk toward speculative gating: with H = [h_l; 1]
over the training tokens and Z = the true (row-centred) router logits of layer t,

    M = argmin ||H M^T - Z||^2 + lam ||M - W0||^2,   W0 = centred [W_t | b_t],   Delta = M - W0

in closed form per lam (one linear solve of H^T H + lam I per source layer and lam, shared by
every d). lam (relative to the mean diagonal of H^T H) is chosen per (l, d) by top-k recall on
held-out rows, from a grid that includes lam = inf (Delta = 0, plain speculative gating). When
the training text has several sources (the corpus: Shakespeare and the KJV) the validation is
leave-one-source-out: the gate is meant for prompts unlike its training text, and on such text
weakly shrunk fits lose to speculative gating while a held-out tail of the same text would
still pick them. Optionally Delta is truncated to rank r in the whitened input metric
(reduced-rank regression) to keep the gate small on models with many experts.

Alternatives measured on a cross-domain dev set (HumanEval prompts, SmolMoE prototype) that did
no better: extra inputs (softmax of the speculative logits of layers l..l+D, the previous
layer's state), a diagonal input scaling or a logit-space map of the speculative logits instead
of the full correction; a cross-entropy refinement toward the true router distribution did not
help on a synthetic model.

The gate lives in a sidecar .npz bound to its model by `model_fingerprint` (checked at load).
Router weights are not stored: they are read from the model (`blk.N.ffn_gate_inp`).

CLI: `moespac train-gate` and `moespac eval-gate` (cli.train_gate, cli.eval_gate).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..core.atomic import atomic_path
from ..core.errors import MoespacError
from ..core.gguf import model_fingerprint, read_header, read_tensor

GATE_FORMAT = 1
MAX_GATE_SHARE = 0.02  # the whole gate stays under 2% of the model's bytes
HIDDEN_NAMES = ("ffn_norm", "attn_post_norm")  # router inputs (gpt-oss routes attn_post_norm)


def moe_layers(path: str | Path) -> list[int]:
    """Layers with a router (blk.N.ffn_gate_inp), from the tensor table; MoespacError if none."""
    layers = sorted(
        int(t.name.split(".")[1])
        for t in read_header(path).tensors
        if t.name.startswith("blk.") and t.name.endswith(".ffn_gate_inp.weight")
    )
    if not layers:
        raise MoespacError(f"{path} has no expert routers (blk.N.ffn_gate_inp): not a Mixture-of-Experts model")
    return layers


def load_routers(path: str | Path, moe_layers) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Router of every MoE layer: (W float32 [n_expert, n_embd], bias float32 [n_expert])."""
    path = Path(path)
    by_name = {t.name: t for t in read_header(path).tensors}
    out = {}
    for l in moe_layers:
        t = by_name.get(f"blk.{l}.ffn_gate_inp.weight")
        if t is None:
            raise MoespacError(f"{path}: MoE layer {l} has no router (blk.{l}.ffn_gate_inp)")
        w = read_tensor(path, t)
        b = by_name.get(f"blk.{l}.ffn_gate_inp.bias")
        bias = read_tensor(path, b).reshape(-1) if b is not None else np.zeros(w.shape[0], np.float32)
        out[l] = (w, bias)
    return out


def _router_matrix(router: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """[W | b] with every column centred over experts (softmax and top-k ignore a per-row shift)."""
    w0 = np.concatenate([router[0], router[1][:, None]], axis=1).astype(np.float64)
    return w0 - w0.mean(axis=0, keepdims=True)


def _aug(h: np.ndarray) -> np.ndarray:
    h = np.asarray(h, dtype=np.float32)
    return np.concatenate([h, np.ones((*h.shape[:-1], 1), np.float32)], axis=-1)


def topk_rows(scores: np.ndarray, k: int) -> np.ndarray:
    """bool [N, E]: the k highest scores of each row."""
    idx = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    mask = np.zeros(scores.shape, bool)
    np.put_along_axis(mask, idx, True, axis=1)
    return mask


@dataclass
class LookaheadGate:
    """Per (source MoE layer l, distance d) an aligned expert scorer for layer l+d.

    `predict(l, h)` -> float [D, n_expert] (or [rows, D, n_expert]); rows d-1 whose target l+d is
    not an MoE layer are -inf. `utility(hidden)` -> expected routings [n_layer, n_expert].
    """

    n_layer: int
    n_expert: int
    n_expert_used: int
    n_embd: int
    distance: int
    moe_layers: list[int]
    routers: dict[int, tuple[np.ndarray, np.ndarray]]
    deltas: dict[tuple[int, int], tuple[np.ndarray, np.ndarray | None]]  # (l,d) -> Delta or (P, Q) factors
    frequency: np.ndarray  # float [n_layer, n_expert]: routings per token in training
    fingerprint: str = ""
    info: dict = field(default_factory=dict)

    def __post_init__(self):
        self._stack: dict[int, np.ndarray] = {}
        self._valid: dict[int, np.ndarray] = {}
        moe = set(self.moe_layers)
        for l in self.moe_layers:
            m = np.zeros((self.distance, self.n_expert, self.n_embd + 1), np.float32)
            ok = np.zeros(self.distance, bool)
            for d in range(1, self.distance + 1):
                if l + d in moe:
                    m[d - 1] = _router_matrix(self.routers[l + d]) + self.delta(l, d)
                    ok[d - 1] = True
            self._stack[l] = m.reshape(self.distance * self.n_expert, self.n_embd + 1)
            self._valid[l] = ok

    # -- parameters --
    def delta(self, l: int, d: int) -> np.ndarray:
        """The alignment correction of (l, d): float [n_expert, n_embd + 1] (zeros if none)."""
        a, b = self.deltas.get((l, d), (None, None))
        if a is None:
            return np.zeros((self.n_expert, self.n_embd + 1), np.float32)
        return a.astype(np.float32) if b is None else a.astype(np.float32) @ b.astype(np.float32)

    @property
    def nbytes(self) -> int:
        """Bytes of the gate's own parameters (the corrections and the frequency prior)."""
        return int(
            sum(a.nbytes + (0 if b is None else b.nbytes) for a, b in self.deltas.values())
            + self.frequency.astype(np.float32).nbytes
        )

    # -- prediction --
    def predict(self, layer: int, hidden_state: np.ndarray) -> np.ndarray:
        """Scores of layers layer+1..layer+D from the router input of `layer`.

        hidden_state [n_embd] -> [D, n_expert]; [rows, n_embd] -> [rows, D, n_expert]. Higher =
        more likely routed; the top n_expert_used of a row is the predicted routing. Distances
        whose target is past the last layer (or not MoE) score -inf.
        """
        if layer not in self._stack:
            raise MoespacError(
                f"layer {layer} is not an MoE layer of this gate (MoE layers: "
                f"{self.moe_layers[0]}..{self.moe_layers[-1]})"
            )
        h = np.asarray(hidden_state, dtype=np.float32)
        if h.shape[-1] != self.n_embd:
            raise MoespacError(f"hidden state has {h.shape[-1]} features, the model has n_embd={self.n_embd}")
        one = h.ndim == 1
        h2 = h.reshape(-1, self.n_embd)
        z = (h2 @ self._stack[layer][:, :-1].T + self._stack[layer][:, -1]).reshape(-1, self.distance, self.n_expert)
        z[:, ~self._valid[layer]] = -np.inf
        return z[0] if one else z

    def expected_routings(self, scores: np.ndarray) -> np.ndarray:
        """Scores [..., n_expert] -> expected routings per expert, min(1, k * softmax), summed over
        leading axes except the last two. -inf rows give zeros."""
        z = np.asarray(scores, dtype=np.float64)
        finite = np.isfinite(z).all(axis=-1, keepdims=True)
        z = np.where(finite, z, 0.0)
        p = np.exp(z - z.max(axis=-1, keepdims=True))
        p /= p.sum(axis=-1, keepdims=True)
        return np.where(finite, np.minimum(1.0, self.n_expert_used * p), 0.0)

    def utility(self, hidden: dict[int, np.ndarray], known_upto: int | None = None) -> np.ndarray:
        """Expected routings [n_layer, n_expert] of the rows whose router inputs are in `hidden`
        (layer -> [rows, n_embd]), for the layers after `known_upto` (default: the last layer in
        `hidden`), each predicted from the nearest earlier layer within D. Layers <= known_upto
        have routed already (the tap knows them) and layers out of reach get zeros: add this to
        the speculative utility, it is in the same unit (tokens routed to each expert)."""
        out = np.zeros((self.n_layer, self.n_expert))
        sources = sorted(l for l in hidden if l in self._stack)
        if not sources:
            return out
        last = sources[-1] if known_upto is None else known_upto
        done = set()
        for l in reversed(sources):  # nearest source first
            if l > last:
                continue
            q = self.expected_routings(self.predict(l, np.asarray(hidden[l]).reshape(-1, self.n_embd)))
            for d in range(1, self.distance + 1):
                t = l + d
                if t > last and t not in done and self._valid[l][d - 1]:
                    out[t] = q[:, d - 1].sum(axis=0)
                    done.add(t)
        return out

    # -- sidecar --
    def save(self, path: str | Path) -> Path:
        path = Path(path)
        arrays = {"frequency": self.frequency.astype(np.float32)}
        for (l, d), (a, b) in self.deltas.items():
            arrays[f"delta_{l}_{d}"] = a
            if b is not None:
                arrays[f"deltaq_{l}_{d}"] = b
        meta = {
            "format": GATE_FORMAT,
            "n_layer": self.n_layer,
            "n_expert": self.n_expert,
            "n_expert_used": self.n_expert_used,
            "n_embd": self.n_embd,
            "distance": self.distance,
            "moe_layers": self.moe_layers,
            "fingerprint": self.fingerprint,
            "info": self.info,
        }
        with atomic_path(path) as tmp, open(tmp, "wb") as f:  # np.savez would append .npz to a name without it
            np.savez(f, meta=np.frombuffer(json.dumps(meta).encode(), np.uint8), **arrays)
        return path

    @classmethod
    def load(cls, path: str | Path, model: str | Path) -> LookaheadGate:
        """Load a sidecar for `model`; MoespacError if it was trained for another model."""
        path, model = Path(path), Path(model)
        if not path.is_file():
            raise MoespacError(f"no such gate file: {path}")
        try:
            z = np.load(path, allow_pickle=False)
            meta = json.loads(bytes(z["meta"]).decode())
        except Exception as e:
            raise MoespacError(f"{path} is not a moespac gate file ({type(e).__name__}: {e})") from None
        if meta.get("format") != GATE_FORMAT:
            raise MoespacError(f"{path}: gate format {meta.get('format')} is not supported (expected {GATE_FORMAT})")
        fp = model_fingerprint(model)
        if fp != meta["fingerprint"]:
            raise MoespacError(
                f"gate {path.name} was trained for another model (tensor hash "
                f"{meta['fingerprint'][:12]}, {model.name} has {fp[:12]}): retrain it with "
                f"`moespac train-gate -m {model}`"
            )
        deltas = {}
        for key in z.files:
            if key.startswith("delta_"):
                l, d = map(int, key[6:].split("_"))
                q = f"deltaq_{l}_{d}"
                deltas[l, d] = (z[key], z[q] if q in z.files else None)
        return cls(
            meta["n_layer"],
            meta["n_expert"],
            meta["n_expert_used"],
            meta["n_embd"],
            meta["distance"],
            list(meta["moe_layers"]),
            load_routers(model, meta["moe_layers"]),
            deltas,
            z["frequency"].astype(np.float64),
            fp,
            meta.get("info", {}),
        )
