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

CLI: `moespac train-gate` and `moespac eval-gate` (`main_train`, `main_eval`).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import MoespacError
from .layout import MoeLayout, read_layout
from .paths import SHARED_DIR

GATE_FORMAT = 1
MAX_GATE_SHARE = 0.02            # the whole gate stays under 2% of the model's bytes
ALPHAS = (1e-3, 1e-2, 0.1, 0.3, 1.0, 3.0, 10.0, np.inf)  # ridge strength / mean diag(H^T H); inf = unaligned
HIDDEN_NAMES = ("ffn_norm", "attn_post_norm")      # router inputs (gpt-oss routes attn_post_norm)
DEFAULT_PROMPTS = SHARED_DIR / "data" / "prompts" / "spec_bench_question.jsonl"
BATCH_ROWS = 4                   # rows of a verification batch for the batch-level metric (K = 3 + 1)

_FP_BLOCKS, _FP_BLOCK = 64, 1 << 16


# --- binding a gate to its model ---------------------------------------------------------------

@dataclass(frozen=True)
class _TensorInfo:
    name: str
    qtype: int        # ggml type id
    shape: tuple      # ggml order (ne0, ne1, ...)
    offset: int       # absolute file offset
    nbytes: int


_GGUF_SCALAR = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # type id -> bytes
_TABLE_CACHE: dict[tuple, list[_TensorInfo]] = {}


def tensor_table(path: str | Path) -> list[_TensorInfo]:
    """The GGUF tensor table, parsed directly and cached per (path, size, mtime).

    gguf.GGUFReader builds numpy views of every metadata value, which takes 5-40 s for a
    49k-token vocabulary on a busy machine; skipping the values takes milliseconds.
    """
    import struct

    import gguf

    path = Path(path)
    if not path.is_file():
        raise MoespacError(f"no such file: {path}")
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key in _TABLE_CACHE:
        return _TABLE_CACHE[key]
    try:
        with open(path, "rb") as f:
            def rd(fmt):
                size = struct.calcsize("<" + fmt)
                b = f.read(size)
                if len(b) != size:
                    raise EOFError
                return struct.unpack("<" + fmt, b)

            def rd_str() -> bytes:
                (n,) = rd("Q")
                return f.read(n)

            def skip(vtype: int) -> None:
                if vtype == 8:
                    (n,) = rd("Q")
                    f.seek(n, 1)
                elif vtype == 9:
                    etype, count = rd("IQ")
                    if etype in _GGUF_SCALAR:
                        f.seek(_GGUF_SCALAR[etype] * count, 1)
                    else:
                        for _ in range(count):
                            skip(etype)
                else:
                    f.seek(_GGUF_SCALAR[vtype], 1)

            if f.read(4) != b"GGUF":
                raise MoespacError(f"{path} is not a GGUF file")
            _version, n_tensors, n_kv = rd("IQQ")
            alignment = 32
            for _ in range(n_kv):
                k = rd_str()
                (vtype,) = rd("I")
                if k == b"general.alignment" and vtype == 4:
                    (alignment,) = rd("I")
                else:
                    skip(vtype)
            infos = []
            for _ in range(n_tensors):
                name = rd_str().decode("utf-8")
                (n_dims,) = rd("I")
                shape = rd("Q" * n_dims)
                qtype, off = rd("IQ")
                infos.append((name, qtype, tuple(shape), off))
            data_start = -(-f.tell() // alignment) * alignment
    except (EOFError, KeyError, struct.error, UnicodeDecodeError):
        raise MoespacError(f"{path}: corrupt or truncated GGUF header") from None
    table = []
    for name, qtype, shape, off in infos:
        block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(qtype)]
        n = int(np.prod(shape, dtype=np.int64))
        table.append(_TensorInfo(name, qtype, shape, data_start + off, n // block * type_size))
    _TABLE_CACHE[key] = table
    return table


def model_fingerprint(path: str | Path) -> str:
    """sha256 over the GGUF's tensor table (name, type, shape, offset), its data size, every router
    tensor in full and 64 blocks of 64 KiB at evenly spaced offsets of the tensor data.

    Hashing all of a multi-GB file takes seconds to minutes (and pages it all in); this samples
    ~4 MiB deterministically, so any retrained, requantised or resized model changes the hash,
    while a flipped byte in an unsampled expert does not (the gate does not depend on experts).
    """
    path = Path(path)
    tensors = sorted(tensor_table(path), key=lambda t: t.offset)
    if not tensors:
        raise MoespacError(f"{path}: GGUF without tensors")
    h = hashlib.sha256(b"moespac-gate-fingerprint-v1")
    for t in tensors:
        h.update(f"{t.name}|{t.qtype}|{list(t.shape)}|{t.offset}\n".encode())
    start = tensors[0].offset
    end = max(t.offset + t.nbytes for t in tensors)
    h.update(f"data {start} {end}\n".encode())
    with open(path, "rb") as f:
        fd = f.fileno()
        for t in tensors:
            if ".ffn_gate_inp." in t.name:
                h.update(os.pread(fd, t.nbytes, t.offset))
        span = max(1, end - start - _FP_BLOCK)
        for i in range(_FP_BLOCKS):
            h.update(os.pread(fd, _FP_BLOCK, start + span * i // max(1, _FP_BLOCKS - 1)))
    return h.hexdigest()


def _read_tensor(path: Path, t: _TensorInfo) -> np.ndarray:
    """One tensor dequantized to float32, numpy shape (reverse of ggml's)."""
    import gguf

    qtype = gguf.GGMLQuantizationType(t.qtype)
    with open(path, "rb") as f:
        raw = np.frombuffer(os.pread(f.fileno(), t.nbytes, t.offset), dtype=np.uint8)
    rows = int(np.prod(t.shape[1:], dtype=np.int64))
    out = gguf.quants.dequantize(raw.reshape(rows, -1), qtype)
    return np.asarray(out, dtype=np.float32).reshape(t.shape[::-1])


def moe_layers(path: str | Path) -> list[int]:
    """Layers with a router (blk.N.ffn_gate_inp), from the tensor table; MoespacError if none."""
    layers = sorted(int(t.name.split(".")[1]) for t in tensor_table(path)
                    if t.name.startswith("blk.") and t.name.endswith(".ffn_gate_inp.weight"))
    if not layers:
        raise MoespacError(f"{path} has no expert routers (blk.N.ffn_gate_inp): not a Mixture-of-Experts model")
    return layers


def load_routers(path: str | Path, moe_layers) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Router of every MoE layer: (W float32 [n_expert, n_embd], bias float32 [n_expert])."""
    path = Path(path)
    by_name = {t.name: t for t in tensor_table(path)}
    out = {}
    for l in moe_layers:
        t = by_name.get(f"blk.{l}.ffn_gate_inp.weight")
        if t is None:
            raise MoespacError(f"{path}: MoE layer {l} has no router (blk.{l}.ffn_gate_inp)")
        w = _read_tensor(path, t)
        b = by_name.get(f"blk.{l}.ffn_gate_inp.bias")
        bias = _read_tensor(path, b).reshape(-1) if b is not None else np.zeros(w.shape[0], np.float32)
        out[l] = (w, bias)
    return out


def _router_matrix(router: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """[W | b] with every column centred over experts (softmax and top-k ignore a per-row shift)."""
    w0 = np.concatenate([router[0], router[1][:, None]], axis=1).astype(np.float64)
    return w0 - w0.mean(axis=0, keepdims=True)


def _aug(h: np.ndarray) -> np.ndarray:
    h = np.asarray(h, dtype=np.float32)
    return np.concatenate([h, np.ones((*h.shape[:-1], 1), np.float32)], axis=-1)


# --- capture: router inputs + routing on text ----------------------------------------------------

@dataclass
class Capture:
    """Router inputs and the tap's routing of every token of some sequences, in order."""
    hidden: dict[int, np.ndarray]   # MoE layer -> float16 [N, n_embd] router inputs
    experts: np.ndarray             # int32 [n_layer, N, k]: routing read by the C tap
    tokens: np.ndarray              # int32 [N]
    seq_start: np.ndarray           # bool [N]: first row of a sequence (no previous token)
    generated: np.ndarray           # bool [N]: rows produced by greedy decoding (not prompt)
    group: np.ndarray | None = None  # int [N]: source of each row (e.g. text file), for validation

    @property
    def n_rows(self) -> int:
        return len(self.tokens)

    def rows(self, sel) -> "Capture":
        return Capture({l: h[sel] for l, h in self.hidden.items()}, self.experts[:, sel], self.tokens[sel],
                       self.seq_start[sel], self.generated[sel], None if self.group is None else self.group[sel])


def capture(model: str | Path, sequences: list[list[int]], *, max_new: int = 0, n_ctx: int = 1024,
            n_threads: int | None = None, desc: str = "capture", progress: bool = True,
            groups: list[int] | None = None) -> Capture:
    """Decode each token sequence from an empty context (every row's logits, so every layer routes
    every row), then `max_new` greedy tokens one at a time; collect router inputs and routing.
    `groups`: a source label per sequence (kept per row for grouped validation)."""
    from tqdm import tqdm

    from .capture import TensorCapture
    from .session import Session

    moe = moe_layers(model)
    cap = TensorCapture(*HIDDEN_NAMES)
    hidden = {l: [] for l in moe}
    experts, tokens, starts, gen, grp = [], [], [], [], []
    total = sum(len(s) + max_new for s in sequences)
    with Session(model, n_ctx=n_ctx, n_threads=n_threads, capture=cap) as s, \
            tqdm(total=total, desc=desc, unit="tok", disable=not progress, file=sys.stderr) as bar:
        if s.tap is None:
            raise MoespacError(f"{model}: no routing tap (not an MoE model?)")
        for i_seq, seq in enumerate(sequences):
            seq = list(seq)[: n_ctx - max_new]
            if not seq:
                continue
            s.reset()
            cap.clear()
            logits = s.decode(seq, all_logits=True)
            routes = [s.last_routing.experts]
            rows = list(seq)
            bar.update(len(seq))
            for _ in range(max_new):
                tok = int(np.argmax(logits[-1]))
                if s.is_eog(tok):
                    break
                logits = s.decode([tok])
                routes.append(s.last_routing.experts)
                rows.append(tok)
                bar.update(1)
            n = len(rows)
            for l in moe:
                names = [f"ffn_norm-{l}", f"attn_post_norm-{l}"]
                name = next((x for x in names if x in cap.captured), None)
                if name is None:
                    raise MoespacError(f"{model}: the router input of layer {l} was not captured")
                h = cap.take(name)
                if h.shape[0] != n:
                    raise MoespacError(f"capture of {name}: {h.shape[0]} rows for {n} tokens")
                hidden[l].append(h.astype(np.float16))
            experts.append(np.concatenate(routes, axis=1))
            tokens.append(np.asarray(rows, np.int32))
            st = np.zeros(n, bool)
            st[0] = True
            starts.append(st)
            g = np.zeros(n, bool)
            g[len(seq):] = True
            gen.append(g)
            grp.append(np.full(n, 0 if groups is None else groups[i_seq], np.int32))
    if not tokens:
        raise MoespacError("capture: no tokens to decode")
    return Capture({l: np.concatenate(v) for l, v in hidden.items()}, np.concatenate(experts, axis=1),
                   np.concatenate(tokens), np.concatenate(starts), np.concatenate(gen), np.concatenate(grp))


def text_windows(model: str | Path, files: list[str | Path], max_tokens: int,
                 window: int = 256) -> tuple[list[list[int]], list[int]]:
    """About `max_tokens` tokens of the files as `window`-token sequences, spread evenly over the
    files and over each file (deterministic); and the index of each sequence's file."""
    from .session import Session

    texts = []
    for f in files:
        p = Path(f)
        if not p.is_file():
            raise MoespacError(f"no such text file: {p}")
        t = p.read_text(encoding="utf-8", errors="replace")
        if t.strip():
            texts.append(t)
    if not texts:
        raise MoespacError("no training text (the --text files are empty)")
    n_windows = max(1, max_tokens // window)
    chars = window * 8  # comfortably more than `window` tokens of English
    out, groups = [], []
    with Session(model, n_ctx=window * 2, tap=False) as s:
        for i, t in enumerate(texts):
            share = n_windows // len(texts) + (i < n_windows % len(texts))
            for j in range(share):
                pos = (len(t) - chars) * j // max(1, share) if len(t) > chars else 0
                pos = t.rfind("\n", 0, pos) + 1 if pos else 0
                toks = s.tokenize(t[pos:pos + chars], add_special=True)[:window]
                if len(toks) >= 16:
                    out.append(toks)
                    groups.append(i)
    return out, groups


def prompt_sequences(model: str | Path, prompts_file: str | Path, n_prompts: int,
                     max_prompt_chars: int = 1200) -> list[list[int]]:
    """The first turn of `n_prompts` prompts, chosen round-robin over categories (deterministic),
    rendered with the model's chat template when it has one."""
    from .generate import render_chat
    from .session import Session

    p = Path(prompts_file)
    if not p.is_file():
        raise MoespacError(f"no such prompt file: {p}")
    rows = [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
    by_cat: dict[str, list[dict]] = {}
    for r in rows:
        if not r.get("turns"):
            raise MoespacError(f"{p}: a row without \"turns\"")
        by_cat.setdefault(r.get("category", ""), []).append(r)
    picked, i = [], 0
    while len(picked) < min(n_prompts, len(rows)):
        for cat in sorted(by_cat):
            if i < len(by_cat[cat]) and len(picked) < n_prompts:
                picked.append(by_cat[cat][i])
        i += 1
    out = []
    with Session(model, n_ctx=2048, tap=False) as s:
        template = s.chat_template()
        bos = s.token_bytes(s.bos, special=True).decode("utf-8", errors="replace") if s.bos >= 0 else ""
        for r in picked:
            q = r["turns"][0][:max_prompt_chars]
            if template:
                text = render_chat(template, [{"role": "user", "content": q}], bos, "")
                out.append(s.tokenize(text, add_special=not (bos and text.startswith(bos))))
            else:
                out.append(s.tokenize(q))
    return out


# --- the gate ------------------------------------------------------------------------------------

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
    frequency: np.ndarray               # float [n_layer, n_expert]: routings per token in training
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
        return (a.astype(np.float32) if b is None else a.astype(np.float32) @ b.astype(np.float32))

    @property
    def nbytes(self) -> int:
        """Bytes of the gate's own parameters (the corrections and the frequency prior)."""
        return int(sum(a.nbytes + (0 if b is None else b.nbytes) for a, b in self.deltas.values())
                   + self.frequency.astype(np.float32).nbytes)

    # -- prediction --
    def predict(self, layer: int, hidden_state: np.ndarray) -> np.ndarray:
        """Scores of layers layer+1..layer+D from the router input of `layer`.

        hidden_state [n_embd] -> [D, n_expert]; [rows, n_embd] -> [rows, D, n_expert]. Higher =
        more likely routed; the top n_expert_used of a row is the predicted routing. Distances
        whose target is past the last layer (or not MoE) score -inf.
        """
        if layer not in self._stack:
            raise MoespacError(f"layer {layer} is not an MoE layer of this gate (MoE layers: "
                               f"{self.moe_layers[0]}..{self.moe_layers[-1]})")
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
        for l in reversed(sources):       # nearest source first
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
        meta = {"format": GATE_FORMAT, "n_layer": self.n_layer, "n_expert": self.n_expert,
                "n_expert_used": self.n_expert_used, "n_embd": self.n_embd, "distance": self.distance,
                "moe_layers": self.moe_layers, "fingerprint": self.fingerprint, "info": self.info}
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:   # np.savez would append .npz to a name without it
            np.savez(f, meta=np.frombuffer(json.dumps(meta).encode(), np.uint8), **arrays)
        return path

    @classmethod
    def load(cls, path: str | Path, model: str | Path) -> "LookaheadGate":
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
            raise MoespacError(f"gate {path.name} was trained for another model (tensor hash "
                               f"{meta['fingerprint'][:12]}, {model.name} has {fp[:12]}): retrain it with "
                               f"`moespac train-gate -m {model}`")
        deltas = {}
        for key in z.files:
            if key.startswith("delta_"):
                l, d = map(int, key[6:].split("_"))
                q = f"deltaq_{l}_{d}"
                deltas[l, d] = (z[key], z[q] if q in z.files else None)
        return cls(meta["n_layer"], meta["n_expert"], meta["n_expert_used"], meta["n_embd"], meta["distance"],
                   list(meta["moe_layers"]), load_routers(model, meta["moe_layers"]), deltas, z["frequency"].astype(np.float64),
                   fp, meta.get("info", {}))


# --- fitting -------------------------------------------------------------------------------------

def true_logits(cap: Capture, routers, layer: int, rows=slice(None)) -> np.ndarray:
    """Router logits of `layer` recomputed from its captured router input: float64 [N, E]."""
    return _aug(cap.hidden[layer][rows]).astype(np.float64) @ _router_matrix(routers[layer]).T


def routing_mask(experts: np.ndarray, n_expert: int) -> np.ndarray:
    """int [N, k] (-1 = none) -> bool [N, n_expert]."""
    mask = np.zeros((experts.shape[0], n_expert + 1), bool)
    np.put_along_axis(mask, np.where(experts < 0, n_expert, experts), True, axis=1)
    return mask[:, :n_expert]


def topk_rows(scores: np.ndarray, k: int) -> np.ndarray:
    """bool [N, E]: the k highest scores of each row."""
    idx = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    mask = np.zeros(scores.shape, bool)
    np.put_along_axis(mask, idx, True, axis=1)
    return mask


def _reduce_rank(delta: np.ndarray, evals, evecs, rank: int):
    """Best rank-r Delta [E, n+1] in the data metric (reduced-rank regression): factors (P, Q)."""
    root = np.sqrt(np.maximum(evals, 0) + 1e-12 * evals.max())
    u, s, vt = np.linalg.svd(delta @ evecs * root, full_matrices=False)
    p = u[:, :rank] * s[:rank]
    q = (vt[:rank] / root) @ evecs.T
    return p, q


def validation_folds(cap: Capture, val_frac: float = 0.2) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train rows, validation rows) bool masks: leave one source group out when the capture has
    several (validating across sources, like the shift from training text to real prompts), else
    the last `val_frac` of the rows, cut at a sequence start when possible."""
    n_rows = cap.n_rows
    groups = np.unique(cap.group) if cap.group is not None else np.zeros(1)
    if len(groups) >= 2:
        return [(cap.group != g, cap.group == g) for g in groups]
    cut = int(n_rows * (1 - val_frac))
    starts = np.flatnonzero(cap.seq_start)
    starts = starts[starts > 0]
    if len(starts):   # the sequence start nearest the cut: no sequence on both sides
        cut = int(starts[np.argmin(np.abs(starts - cut))])
    va = np.arange(n_rows) >= cut
    return [(~va, va)]


def fit_gate(model: str | Path, train: Capture, distance: int, *, rank: int = 0, val_frac: float = 0.2,
             alphas=ALPHAS, alpha_scope: str = "pair", progress: bool = True,
             dtype=np.float16) -> LookaheadGate:
    """Fit the alignment of every (l, d) on `train` (see the module docstring)."""
    from tqdm import tqdm

    if distance < 1:
        raise MoespacError(f"--distance must be >= 1, got {distance}")
    layout = read_layout(model)
    routers = load_routers(model, [l.index for l in layout.layers])
    moe = [l.index for l in layout.layers]
    n, k, e = layout.n_embd, layout.n_expert_used, layout.n_expert
    n_rows = train.n_rows
    if n_rows < 64:
        raise MoespacError(f"{n_rows} training tokens are too few to fit a gate (want >= 64)")
    folds = validation_folds(train, val_frac)
    moe_set = set(moe)
    alphas = sorted(alphas, reverse=True)  # strongest shrinkage first: argmax keeps it on ties
    n_pairs = sum(1 for l in moe for d in range(1, distance + 1) if l + d in moe_set)
    bar = tqdm(total=2 * n_pairs, desc="fit", unit="pair", disable=not progress, file=sys.stderr)
    eye = np.eye(n + 1)

    def centred_logits(t, rows=slice(None)):
        z = true_logits(train, routers, t, rows)
        return z - z.mean(axis=1, keepdims=True)

    # 1. validation top-k hits of every (l, d, lam) over the folds
    hits = np.zeros((layout.n_layer, distance, len(alphas)))
    used = np.zeros((layout.n_layer, distance))
    for l in moe:
        targets = [d for d in range(1, distance + 1) if l + d in moe_set]
        if not targets:
            continue
        h_all = _aug(train.hidden[l]).astype(np.float64)
        w0s = {d: _router_matrix(routers[l + d]) for d in targets}
        z_all = {d: centred_logits(l + d) for d in targets}
        for tr, va in folds:
            h_tr, h_va = h_all[tr], h_all[va]
            g_tr = h_tr.T @ h_tr
            c_tr = {d: h_tr.T @ z_all[d][tr] for d in targets}
            true_va = {d: routing_mask(train.experts[l + d][va], e) for d in targets}
            for d in targets:
                used[l, d - 1] += true_va[d].sum()
            for ai, a in enumerate(alphas):
                if np.isinf(a):
                    ms = w0s
                else:   # M^T = (H^T H + lam I)^-1 (H^T Z + lam W0^T), one solve for every d
                    lam = a * float(np.trace(g_tr)) / (n + 1)   # relative to the mean diag(H^T H)
                    rhs = np.concatenate([c_tr[d] + lam * w0s[d].T for d in targets], axis=1)
                    sol = np.linalg.solve(g_tr + lam * eye, rhs)
                    ms = {d: sol[:, i * e:(i + 1) * e].T for i, d in enumerate(targets)}
                for d in targets:
                    hits[l, d - 1, ai] += (topk_rows(h_va @ ms[d].T, k) & true_va[d]).sum()
        bar.update(len(targets))

    # 2. lam: per distance pooled over layers (robust), or per (l, d)
    if alpha_scope == "distance":
        pooled = hits.sum(axis=0).argmax(axis=1)                     # [D]
        choice = np.broadcast_to(pooled, hits.shape[:2])
    elif alpha_scope == "pair":
        choice = hits.argmax(axis=2)
    else:
        raise MoespacError(f"alpha_scope must be 'distance' or 'pair', got {alpha_scope!r}")
    inf_i = alphas.index(np.inf) if np.inf in alphas else None

    # 3. refit every pair on all rows with its lam
    deltas, chosen, val = {}, {}, {}
    for l in moe:
        targets = [d for d in range(1, distance + 1) if l + d in moe_set]
        if not targets:
            continue
        for d in targets:
            chosen[l, d] = float(alphas[choice[l, d - 1]])
            den = max(1.0, used[l, d - 1])
            val[l, d] = ((hits[l, d - 1, inf_i] / den) if inf_i is not None else float("nan"),
                         hits[l, d - 1, choice[l, d - 1]] / den)
        finite = [d for d in targets if np.isfinite(chosen[l, d])]
        if not finite:
            bar.update(len(targets))
            continue
        h_all = _aug(train.hidden[l]).astype(np.float64)
        g_all = h_all.T @ h_all
        ev = vec = None
        if 0 < rank < min(e, n + 1):
            ev, vec = np.linalg.eigh(g_all)
        for d in targets:
            if d in finite:
                w0 = _router_matrix(routers[l + d])
                lam = chosen[l, d] * float(np.trace(g_all)) / (n + 1)
                delta = np.linalg.solve(g_all + lam * eye, h_all.T @ centred_logits(l + d) + lam * w0.T).T - w0
                if ev is not None:
                    p, q = _reduce_rank(delta, ev, vec, rank)
                    deltas[l, d] = (p.astype(dtype), q.astype(dtype))
                else:
                    deltas[l, d] = (delta.astype(dtype), None)
            bar.update(1)
    bar.close()
    freq = train_frequency(train, layout)
    by_d = {}
    for (l, d), (b, a) in val.items():
        by_d.setdefault(d, []).append((b, a))
    info = {"trained_rows": int(n_rows), "val_folds": len(folds), "alpha_scope": alpha_scope, "rank": int(rank),
            "alpha": {f"{l},{d}": (v if np.isfinite(v) else "inf") for (l, d), v in chosen.items()},
            "val_recall": {str(d): {"unaligned": float(np.mean([x[0] for x in v])),
                                    "aligned": float(np.mean([x[1] for x in v]))} for d, v in sorted(by_d.items())},
            "method": "ridge regression of layer l+d's router logits on layer l's router input, shrunk toward "
                      "speculative gating; lam by validation top-k recall "
                      + ("(leave-one-source-out)" if len(folds) > 1 else "(held-out tail)")
                      + (" per distance" if alpha_scope == "distance" else " per (l, d)")}
    gate = LookaheadGate(layout.n_layer, e, k, n, distance, moe, routers, deltas, freq, model_fingerprint(model), info)
    model_bytes = Path(model).stat().st_size
    gate.info["bytes"] = gate.nbytes
    gate.info["model_bytes"] = model_bytes
    return gate


def train_frequency(cap: Capture, layout: MoeLayout) -> np.ndarray:
    """Routings per token of each (layer, expert) in `cap`: the frequency prior."""
    from .utility import routing_counts, routed_rows

    counts = routing_counts(cap.experts, layout.n_expert).astype(np.float64)
    return counts / np.maximum(routed_rows(cap.experts), 1)[:, None]


# --- evaluation ----------------------------------------------------------------------------------

METHODS = ("aligned", "unaligned", "prev_token", "frequency")


def evaluate(gate: LookaheadGate, cap: Capture, rows: np.ndarray | None = None, batch: int = BATCH_ROWS) -> dict:
    """Per distance d: top-k recall and precision of every method on the captured rows.

    token level: each row's predicted top-k (k = experts per token) vs its true top-k at layer
    l+d, summed over all (l, l+d) MoE pairs (recall = precision: both sets have k experts);
    batch level: a verification batch of `batch` consecutive rows, the union of the per-row
    predictions vs the union of the true experts (previous token: the experts of the token just
    before the batch, known when the batch starts). Rows: all (default) or a bool mask.
    """
    k, e = gate.n_expert_used, gate.n_expert
    n_rows = cap.n_rows
    sel = np.ones(n_rows, bool) if rows is None else np.asarray(rows, bool)
    seq_id = np.cumsum(cap.seq_start) - 1
    # batches: `batch` consecutive selected rows of one sequence
    idx = np.flatnonzero(sel)
    groups = []
    i = 0
    while i + batch <= len(idx):
        g = idx[i:i + batch]
        if seq_id[g[0]] == seq_id[g[-1]] and g[-1] - g[0] == batch - 1:
            groups.append(g)
            i += batch
        else:
            i += 1
    groups = np.array(groups, dtype=np.int64).reshape(-1, batch)
    out = {}
    for d in range(1, gate.distance + 1):
        acc = {m: np.zeros(2) for m in METHODS}              # token: hits, used (= predicted)
        bacc = {m: np.zeros(3) for m in METHODS}             # batch: hits, used, predicted
        for l in gate.moe_layers:
            t = l + d
            if not gate._valid[l][d - 1]:
                continue
            h = cap.hidden[l].astype(np.float32)
            true = routing_mask(cap.experts[t], e)
            freq_mask = topk_rows(np.broadcast_to(gate.frequency[t], (n_rows, e)), k)
            prev = np.zeros_like(true)
            prev[1:] = true[:-1]
            prev[cap.seq_start] = freq_mask[cap.seq_start]
            preds = {
                "aligned": topk_rows(gate.predict(l, h)[:, d - 1], k),
                "unaligned": topk_rows(_aug(h) @ _router_matrix(gate.routers[t]).T, k),
                "prev_token": prev,
                "frequency": freq_mask,
            }
            for m, p in preds.items():
                acc[m] += [(p & true)[sel].sum(), true[sel].sum()]
                if len(groups):
                    used = true[groups].any(axis=1)
                    pb = prev[groups[:, 0]] if m == "prev_token" else p[groups].any(axis=1)
                    bacc[m] += [(pb & used).sum(), used.sum(), pb.sum()]
        row = {}
        for m in METHODS:
            r = acc[m][0] / max(1, acc[m][1])
            row[f"{m}_recall"] = round(float(r), 4)
            row[f"{m}_precision"] = round(float(r), 4)
        for m in METHODS:
            row[f"batch{batch}_{m}_recall"] = round(float(bacc[m][0] / max(1, bacc[m][1])), 4)
            row[f"batch{batch}_{m}_precision"] = round(float(bacc[m][0] / max(1, bacc[m][2])), 4)
        row["pairs"] = sum(1 for l in gate.moe_layers if gate._valid[l][d - 1])
        row["rows"] = int(sel.sum())
        out[str(d)] = row
    return out


def format_table(result: dict, batch: int = BATCH_ROWS) -> str:
    """Markdown table: one row per distance, recall (= precision at token level) per method."""
    lines = ["| d | aligned gate | speculative gating (unaligned) | previous token | frequency prior |",
             "|---|---|---|---|---|"]
    for d, r in result.items():
        lines.append(f"| {d} | " + " | ".join(f"{r[f'{m}_recall']:.3f}" for m in METHODS) + " |")
    lines += ["", f"Verification batch of {batch} rows (union of the rows' experts), recall / precision:", "",
              "| d | aligned gate | speculative gating (unaligned) | previous token | frequency prior |",
              "|---|---|---|---|---|"]
    for d, r in result.items():
        cells = [f"{r[f'batch{batch}_{m}_recall']:.3f} / {r[f'batch{batch}_{m}_precision']:.3f}" for m in METHODS]
        lines.append(f"| {d} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# --- CLI -----------------------------------------------------------------------------------------

def corpus_files(n_tokens: int, window: int) -> list[Path]:
    """The local corpus's training split as two files, Shakespeare and the KJV (two sources, so
    the shrinkage is validated across them); the held-out documents are not in them."""
    from . import corpus
    from .paths import CACHE_DIR

    docs = corpus.training_documents()
    out = []
    for source in ("shakespeare", "kjv"):
        path = CACHE_DIR / "corpus" / f"gate-train-{source}.txt"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("\n\n".join(t for name, t in docs if name.startswith(source + "/")))
        out.append(path)
    return out


def main_train(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="moespac train-gate",
                                description="Fit the lookahead gate (experts of layers l+1..l+D from layer l) "
                                            "and write its sidecar file.")
    p.add_argument("-m", "--model", required=True, help="GGUF MoE model")
    p.add_argument("--text", nargs="+", metavar="FILE", help="training text files")
    p.add_argument("--corpus", action="store_true",
                   help="train on the local English corpus (moespac_gguf.corpus, held-out split excluded)")
    p.add_argument("--distance", "-d", type=int, default=3, help="lookahead distance D (default 3)")
    p.add_argument("--out", "-o", required=True, help="gate file to write (.npz)")
    p.add_argument("--tokens", type=int, default=6000, help="training tokens to capture (default 6000)")
    p.add_argument("--window", type=int, default=256, help="tokens per training sequence (default 256)")
    p.add_argument("--rank", type=int, default=0, help="rank of each correction (0 = full, default)")
    p.add_argument("--alpha-scope", choices=("pair", "distance"), default="pair",
                   help="choose the shrinkage per (l, d) (default) or per distance, pooled over layers")
    p.add_argument("--gen", type=int, default=0,
                   help="also train on this many greedy tokens the model writes after each window (default 0)")
    p.add_argument("-t", "--threads", type=int, default=None)
    a = p.parse_args(argv)
    if not a.text and not a.corpus:
        p.error("give --text FILE... or --corpus")
    files = list(a.text or [])
    if a.corpus:
        files += corpus_files(a.tokens, a.window)
    t0 = time.perf_counter()
    seqs, groups = text_windows(a.model, files, a.tokens, a.window)
    cap = capture(a.model, seqs, max_new=a.gen, n_ctx=a.window + a.gen + 8, n_threads=a.threads,
                  desc="capture", groups=groups)
    gate = fit_gate(a.model, cap, a.distance, rank=a.rank, alpha_scope=a.alpha_scope)
    gate.info["text"] = [str(f) for f in files]
    gate.info["train_s"] = round(time.perf_counter() - t0, 1)
    gate.save(a.out)
    size = Path(a.out).stat().st_size
    share = size / Path(a.model).stat().st_size
    print(f"{a.out}: gate for {Path(a.model).name}, D={a.distance}, {len(gate.deltas)} aligned (l, d) pairs, "
          f"{size / 1024:.1f} KiB on disk = {100 * share:.3f}% of the model, {cap.n_rows} tokens, "
          f"{gate.info['train_s']} s")
    for d, v in gate.info["val_recall"].items():
        print(f"  d={d}: validation top-{gate.n_expert_used} recall {v['aligned']:.3f} aligned "
              f"vs {v['unaligned']:.3f} speculative gating")
    if share > MAX_GATE_SHARE:
        print(f"warning: the gate is {100 * share:.2f}% of the model (> {100 * MAX_GATE_SHARE:.0f}%): "
              f"use --rank", file=sys.stderr)
    return 0


def eval_on_prompts(model, gate: LookaheadGate, prompts, n_prompts: int, max_new: int, threads=None,
                    progress: bool = True) -> tuple[dict, Capture]:
    seqs = prompt_sequences(model, prompts, n_prompts)
    cap = capture(model, seqs, max_new=max_new, n_ctx=2048, n_threads=threads, desc="eval", progress=progress)
    return evaluate(gate, cap), cap


def main_eval(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="moespac eval-gate",
                                description="Top-k recall/precision of the lookahead gate on held-out prompts, "
                                            "against unaligned speculative gating, the previous token's experts "
                                            "and a frequency prior.")
    p.add_argument("-m", "--model", required=True)
    p.add_argument("--gate", required=True, help="gate file from train-gate")
    p.add_argument("--prompts", default=str(DEFAULT_PROMPTS), help="JSONL with \"turns\" (default: Spec-Bench)")
    p.add_argument("--n-prompts", type=int, default=26, help="prompts, round-robin over categories (default 26)")
    p.add_argument("--max-new", type=int, default=24, help="greedy tokens generated per prompt (default 24)")
    p.add_argument("--json", action="store_true", help="print one JSON object: per distance, the metrics")
    p.add_argument("-t", "--threads", type=int, default=None)
    a = p.parse_args(argv)
    gate = LookaheadGate.load(a.gate, a.model)
    result, cap = eval_on_prompts(a.model, gate, a.prompts, a.n_prompts, a.max_new, a.threads)
    if a.json:
        print(json.dumps(result))
    else:
        print(f"{cap.n_rows} held-out tokens ({int(cap.generated.sum())} generated), top-{gate.n_expert_used} "
              f"of {gate.n_expert} experts; recall = precision per token")
        print(format_table(result))
    return 0
