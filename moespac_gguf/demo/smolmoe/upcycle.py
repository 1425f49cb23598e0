"""Writing SmolMoE GGUF files: the upcycled MoE, the dense draft and the layer-truncated draft."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import gguf
import numpy as np
from tqdm import tqdm

from ...core.atomic import atomic_path
from ...core.errors import MoespacError
from ...core.paths import CACHE_DIR
from .config import BUILDER_VERSION, UpcycleConfig, file_id, smollm2_path
from .router import RouterFitter

_FFN = ("ffn_gate", "ffn_up", "ffn_down")
_DTYPES = {
    "F32": (gguf.GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32),
    "F16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
    "Q8_0": (gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
}


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


def _finish(writer: gguf.GGUFWriter, path: Path) -> None:
    """Open `path` (the writer was made without one) and write everything but the tensor data."""
    writer.write_header_to_file(path)
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()


def write_moe(
    src: Path,
    out: Path,
    routers: list[np.ndarray],
    cfg: UpcycleConfig,
    name: str | None = None,
    extra_meta: dict | None = None,
    progress: bool = True,
) -> Path:
    """Write the upcycled MoE of `src` with the given per-layer router weights [E, n_embd]."""
    src, out = Path(src), Path(out)
    reader = gguf.GGUFReader(src)
    _check_dense_llama(reader, src)
    n_layer = int(_source_hparam(reader, "block_count"))
    if len(routers) != n_layer or any(r.shape[0] != cfg.n_expert for r in routers):
        raise MoespacError(f"need {n_layer} routers of {cfg.n_expert} rows")
    tensors = {t.name: t for t in reader.tensors}
    writer = gguf.GGUFWriter(None, "llama")  # the file: at _finish, under a temporary name
    V = gguf.GGUFValueType
    base_name = reader.fields.get("general.name")
    label = name or f"SmolMoE {cfg.n_expert}x" + (f" ({base_name.contents()})" if base_name else "")
    meta = {"config": asdict(cfg), "source": file_id(src), **(extra_meta or {})}
    _copy_metadata(
        reader,
        writer,
        {
            "general.name": (label, V.STRING),
            "general.file_type": (int(_DTYPES[cfg.dtype][1]), V.UINT32),
            "llama.expert_count": (cfg.n_expert, V.UINT32),
            "llama.expert_used_count": (cfg.top_k, V.UINT32),
            "moespac.smolmoe.builder_version": (BUILDER_VERSION, V.UINT32),
            "moespac.smolmoe.method": (
                "sparse upcycling (dense FFN + seeded Gaussian noise per expert); router: "
                "balanced k-means of captured ffn_norm states in whitened PCA space, "
                "bias folded into a constant direction",
                V.STRING,
            ),
            "moespac.smolmoe.build": (json.dumps(meta, sort_keys=True), V.STRING),
        },
    )

    # the plan: (name, numpy shape, numpy dtype, nbytes, raw ggml type, producer)
    plan: list[tuple[str, tuple, np.dtype, int, object, Callable[[], np.ndarray]]] = []
    for t in reader.tensors:
        parts = t.name.split(".")
        if parts[0] == "blk" and parts[2] in _FFN and parts[-1] == "weight":
            layer, proj = int(parts[1]), _FFN.index(parts[2])
            if proj == 0:  # router before the experts of the layer
                router = np.ascontiguousarray(routers[layer], dtype=np.float32)
                plan.append(
                    (
                        f"blk.{layer}.ffn_gate_inp.weight",
                        router.shape,
                        router.dtype,
                        router.nbytes,
                        gguf.GGMLQuantizationType.F32,
                        lambda r=router: r,
                    )
                )
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
    with atomic_path(out) as tmp:  # a killed build leaves no partial model under `out`
        try:
            _finish(writer, tmp)
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
    return out


def truncated_blocks(n_layer: int, keep_first: int, keep_last: int = 0) -> list[int]:
    """Block indices of a layer-truncated draft: the first `keep_first` and the last `keep_last` blocks."""
    if keep_first < 1 or keep_last < 0 or keep_first + keep_last > n_layer:
        raise MoespacError(
            f"truncated draft: need 1 <= first ({keep_first}) and first + last ({keep_last}) <= {n_layer} layers"
        )
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
    writer = gguf.GGUFWriter(None, arch)  # the file: at _finish, under a temporary name
    V = gguf.GGUFValueType
    base_name = reader.fields.get("general.name")
    which = f"first {keep_first}" + (f" + last {keep_last}" if keep_last else "")
    label = name or f"{base_name.contents() if base_name else src.stem} ({which} of {n_layer} layers)"
    _copy_metadata(
        reader,
        writer,
        {
            "general.name": (label, V.STRING),
            f"{arch}.block_count": (len(blocks), V.UINT32),
            "moespac.smolmoe.builder_version": (BUILDER_VERSION, V.UINT32),
            "moespac.smolmoe.build": (json.dumps({"truncated_from": file_id(src), "blocks": blocks}), V.STRING),
        },
    )
    for new_name, t in keep:
        writer.add_tensor_info(new_name, t.data.shape, t.data.dtype, t.data.nbytes, raw_dtype=t.tensor_type)
    with atomic_path(out) as tmp:
        try:
            _finish(writer, tmp)
            for _, t in keep:
                writer.write_tensor_data(t.data)
        finally:
            writer.close()
    return out


def copy_dense(src: Path, out: Path) -> Path:
    with atomic_path(out) as tmp:
        shutil.copyfile(src, tmp)
    return out


def build_upcycled(
    out: Path,
    cfg: UpcycleConfig,
    src: Path | None = None,
    fitter: RouterFitter | None = None,
    cache_dir: Path | None = None,
    progress: bool = True,
    name: str | None = None,
) -> Path:
    """Capture (or reuse) router inputs, fit routers and write the MoE GGUF to `out`."""
    src = Path(src) if src else smollm2_path()
    fitter = fitter or RouterFitter(src, cache_dir or CACHE_DIR / "routers", progress)
    t0 = time.perf_counter()
    routers = fitter.routers(cfg)
    return write_moe(
        src,
        out,
        routers,
        cfg,
        name=name,
        progress=progress,
        extra_meta={"router_fit_s": round(time.perf_counter() - t0, 1)},
    )
