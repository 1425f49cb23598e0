"""Where every expert of a GGUF MoE model lives in the file.

The residency runtime moves experts between flash, RAM and slots by byte range,
so it needs, per MoE layer and expert projection, the absolute file offset of
expert 0 and the per-expert stride: in GGUF the experts of a layer are ONE 3-D
tensor per projection (`blk.N.ffn_{gate,up,down}_exps` or merged
`ffn_gate_up_exps`) with the expert as the outermost dimension, so expert e
occupies `[offset + e * stride, offset + (e + 1) * stride)`.

`read_layout` is the only entry point; `moespac inspect` prints it (`format_layout`).
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import MoespacError
from .gguf import read_header
from .units import format_size

# Architectures whose MoE tensors we know how to read (gguf arch names).
SUPPORTED_ARCHS = ("llama", "qwen2moe", "qwen3moe", "olmoe", "deepseek2", "gpt-oss", "granitemoe")

# llama.cpp's limits (src/llama-hparams.h): it GGML_ASSERTs (aborts) beyond them
MAX_LAYERS, MAX_EXPERTS = 512, 1024
ROPE_SCALING_TYPES = ("none", "linear", "yarn", "longrope")  # llama_rope_scaling_type_from_string
_INT32_MAX = (1 << 31) - 1
# ggml types no quantizer writes as weights (activation-side and integer types): ggml has no
# kernel multiplying or adding them as one, and llama.cpp segfaults or aborts in the graph
NOT_WEIGHT_TYPES = ("Q8_1", "Q8_K", "I8", "I16", "I32", "I64", "F64")
MLA_ARCHS = ("deepseek2",)  # multi-head latent attention: other head geometry rules
# integer widths `{arch}.NAME` llama.cpp reads for every architecture (absent ones take defaults)
_WIDTHS = (
    "context_length",
    "feed_forward_length",
    "expert_feed_forward_length",
    "attention.head_count",
    "attention.head_count_kv",
    "attention.key_length",
    "attention.value_length",
    "rope.dimension_count",
)

_EXPERT_TENSOR = re.compile(r"^blk\.(\d+)\.(ffn_\w+_exps)\.(weight|bias)$", re.ASCII)
_ROUTER_TENSOR = re.compile(r"^blk\.(\d+)\.ffn_gate_inp\.weight$", re.ASCII)


@dataclass(frozen=True)
class TensorSpan:
    """One tensor's place in the file; for expert tensors, one slice per expert."""

    name: str
    type: str  # ggml type name, e.g. F16, Q4_K
    offset: int  # absolute file offset of the tensor (= of expert 0)
    nbytes: int
    expert_stride: int  # bytes per expert; 0 for non-expert tensors


@dataclass
class MoeLayer:
    index: int
    tensors: dict[str, TensorSpan]  # expert tensors by GGUF name
    router: TensorSpan | None

    @property
    def bytes_per_expert(self) -> int:
        return sum(t.expert_stride for t in self.tensors.values())

    def expert_ranges(self, expert: int) -> list[tuple[int, int]]:
        """(offset, length) of every byte range holding `expert` in this layer."""
        return [(t.offset + expert * t.expert_stride, t.expert_stride) for t in self.tensors.values()]


@dataclass
class MoeLayout:
    path: str
    arch: str
    n_layer: int
    n_expert: int
    n_expert_used: int
    n_shared_expert: int
    n_dense_lead: int
    n_embd: int
    n_ff_exp: int
    file_bytes: int
    expert_bytes: int
    other_bytes: int
    layers: list[MoeLayer] = field(default_factory=list)

    @property
    def mean_bytes_per_expert(self) -> float:
        return self.expert_bytes / max(1, len(self.layers) * self.n_expert)

    def experts_fitting(self, mem_bytes: int) -> int:
        """How many (layer, expert) pairs fit in `mem_bytes` after the non-expert weights."""
        spare = mem_bytes - self.other_bytes
        return 0 if spare <= 0 else min(len(self.layers) * self.n_expert, int(spare // self.mean_bytes_per_expert))

    def to_json(self) -> dict:
        d = asdict(self)
        d["layers"] = [
            {
                "index": l.index,
                "bytes_per_expert": l.bytes_per_expert,
                "tensors": {
                    n: {"type": t.type, "offset": t.offset, "expert_stride": t.expert_stride}
                    for n, t in l.tensors.items()
                },
                "router": None
                if l.router is None
                else {
                    "name": l.router.name,
                    "type": l.router.type,
                    "offset": l.router.offset,
                    "nbytes": l.router.nbytes,
                },
            }
            for l in self.layers
        ]
        return d


def read_layout(path: str | Path) -> MoeLayout:
    """Read the MoE expert layout of a GGUF file; MoespacError on anything unusable.

    This runs before llama.cpp sees the file (MoeSpac reads the layout first), so besides what
    the layout needs it refuses the hyperparameters llama.cpp would GGML_ASSERT (abort) on in
    llama_model::load_hparams or in building its graph, tensors of types it cannot compute
    with, and expert tensors that disagree with the metadata."""
    header = read_header(path)
    path, meta = header.path, header.metadata
    arch = meta.get("general.architecture")
    if arch is None:
        raise MoespacError(f"{path}: GGUF without general.architecture")
    if not isinstance(arch, str):
        raise MoespacError(f"{path}: general.architecture is {arch!r}, not a string")
    file_bytes = header.file_bytes

    layers: dict[int, MoeLayer] = {}
    routers: dict[int, tuple[TensorSpan, int]] = {}
    experts: list[tuple[TensorSpan, tuple[int, ...]]] = []
    other_bytes = 0
    for t in header.tensors:
        if t.offset + t.nbytes > file_bytes:
            raise MoespacError(f"{path}: truncated GGUF (tensor {t.name!r} ends past the end of the file)")
        if t.type.name in NOT_WEIGHT_TYPES:
            raise MoespacError(
                f"{path}: tensor {t.name!r} has type {t.type.name}, which llama.cpp cannot compute with as a weight"
            )
        span = TensorSpan(t.name, t.type.name, t.offset, t.nbytes, 0)
        m = _EXPERT_TENSOR.fullmatch(t.name)
        if m:
            experts.append((span, t.shape))
            layers.setdefault(int(m.group(1)), MoeLayer(int(m.group(1)), {}, None))
            continue
        other_bytes += span.nbytes
        r = _ROUTER_TENSOR.fullmatch(t.name)
        if r:
            routers[int(r.group(1))] = span, t.shape[-1]

    if not layers:
        raise MoespacError(
            f"{path} is a dense model (arch {arch!r}, no expert tensors): moespac needs a Mixture-of-Experts GGUF"
        )
    if arch not in SUPPORTED_ARCHS:
        raise MoespacError(f"{path}: unsupported architecture {arch!r} (supported: {', '.join(SUPPORTED_ARCHS)})")
    if f"{arch}.expert_count" not in meta or f"{arch}.expert_used_count" not in meta:
        raise MoespacError(f"{path}: expert tensors present but {arch}.expert_count/expert_used_count missing")
    hp = _Hparams(path, meta, arch)
    n_layer = hp.int("block_count", lo=1, hi=MAX_LAYERS)
    n_expert = hp.int("expert_count", lo=1, hi=MAX_EXPERTS)
    n_used = hp.int("expert_used_count", lo=1, hi=n_expert, hi_what=f"{arch}.expert_count")
    n_embd = hp.int("embedding_length", lo=1, hi=_INT32_MAX)
    n_ff_exp = hp.int("expert_feed_forward_length", default=None, lo=0)
    if n_ff_exp is None:
        n_ff_exp = hp.int("feed_forward_length", default=0, lo=0)
    n_shared = hp.int("expert_shared_count", default=0, lo=0, hi=MAX_EXPERTS)
    n_dense_lead = hp.int("leading_dense_block_count", default=0, lo=0, hi=n_layer, hi_what=f"{arch}.block_count")
    # the rest of load_hparams' GGML_ASSERTs on keys every architecture may carry
    hp.int("nextn_predict_layers", default=0, lo=0, hi=n_layer, hi_what=f"{arch}.block_count")
    groups = hp.int("expert_group_count", default=0, lo=0, hi=n_expert - 1, hi_what=f"{arch}.expert_count - 1")
    if groups > 1:
        if n_expert % groups:
            raise MoespacError(
                f"{path}: {arch}.expert_count {n_expert} is not a multiple of {arch}.expert_group_count {groups}"
            )
        hp.int("expert_group_used_count", lo=1, hi=groups - 1, hi_what=f"{arch}.expert_group_count - 1")
    rope_scaling = meta.get(f"{arch}.rope.scaling.type", "linear")
    if rope_scaling not in ROPE_SCALING_TYPES:
        raise MoespacError(
            f"{path}: {arch}.rope.scaling.type is {rope_scaling!r}, not one of {', '.join(ROPE_SCALING_TYPES)}"
        )
    hp.attention(n_embd, {t.name: t.shape for t in header.tensors})
    hp.floats()

    for span, shape in experts:
        index = int(_EXPERT_TENSOR.fullmatch(span.name).group(1))
        if index >= n_layer:
            raise MoespacError(f"{path}: tensor {span.name} is in layer {index}, but {arch}.block_count is {n_layer}")
        if shape[-1] != n_expert or 0 in shape or len(shape) != (3 if span.name.endswith(".weight") else 2):
            raise MoespacError(
                f"{path}: tensor {span.name} has shape {list(shape)}: expected {'3' if span.name.endswith('.weight') else '2'} "
                f"non-zero dimensions, the last the {arch}.expert_count of {n_expert}"
            )
        stride = span.nbytes // n_expert
        layers[index].tensors[span.name] = TensorSpan(span.name, span.type, span.offset, span.nbytes, stride)
    for index, (router, routed) in routers.items():
        if index in layers and routed != n_expert:
            raise MoespacError(
                f"{path}: tensor {router.name} routes to {routed} experts, but {arch}.expert_count is {n_expert}"
            )
    for layer in layers.values():
        layer.router = routers[layer.index][0] if layer.index in routers else None
    ordered = [layers[i] for i in sorted(layers)]
    return MoeLayout(
        path=str(path),
        arch=arch,
        n_layer=n_layer,
        n_expert=n_expert,
        n_expert_used=n_used,
        n_shared_expert=n_shared,
        n_dense_lead=n_dense_lead,
        n_embd=n_embd,
        n_ff_exp=n_ff_exp,
        file_bytes=file_bytes,
        expert_bytes=sum(t.nbytes for l in ordered for t in l.tensors.values()),
        other_bytes=other_bytes,
        layers=ordered,
    )


_REQUIRED = object()


class _Hparams:
    """Integer hyperparameters `{arch}.NAME` of a file's metadata, with one-line errors naming
    the key when one is missing, not an integer (a mutated value type reads as a float, a string
    or a bool), or out of the range llama.cpp accepts."""

    def __init__(self, path: Path, meta: dict, arch: str):
        self.path, self.meta, self.arch = path, meta, arch

    def int(self, name: str, default=_REQUIRED, lo: int = 0, hi: int | None = None, hi_what: str = ""):
        key = f"{self.arch}.{name}"
        if key not in self.meta:
            if default is _REQUIRED:
                raise MoespacError(f"{self.path}: GGUF without {key}")
            return default
        value = self.meta[key]
        if type(value) is not int:
            raise MoespacError(f"{self.path}: {key} is {value!r} ({type(value).__name__}), expected an integer")
        if value < lo or (hi is not None and value > hi):
            expected = f"{lo} or more" if hi is None else f"{lo}..{hi}" + (f" ({hi_what})" if hi_what else "")
            raise MoespacError(f"{self.path}: {key} is {value}, expected {expected}")
        return value

    def attention(self, n_embd: int, shapes: dict[str, tuple[int, ...]]) -> None:
        """The attention geometry, which llama.cpp's graph builders GGML_ASSERT (abort) on where
        no tensor shape reveals it: every width and product below 2**31 (llama.cpp multiplies
        them in uint32: 2 + 2**28 KV heads of 16 wrap round to 32 and pass the shape checks), the
        KV heads dividing the heads, and per architecture what its graph asserts (below).
        Per-layer arrays are not checked."""
        w = {}
        for name in _WIDTHS:
            w[name] = self.int(name, default=None, lo=0 if name.endswith("feed_forward_length") else 1, hi=_INT32_MAX)
        n_head, n_head_kv = w["attention.head_count"], w["attention.head_count_kv"]
        if n_head is None:
            return
        n_head_kv = n_head if n_head_kv is None else n_head_kv
        if n_head % n_head_kv:
            raise self.error(f"attention.head_count {n_head} is not a multiple of attention.head_count_kv {n_head_kv}")
        head_k = w["attention.key_length"] or n_embd // n_head  # llama.cpp's defaults
        head_v = w["attention.value_length"] or n_embd // n_head
        n_rot = w["rope.dimension_count"] or head_k
        if max(head_k, head_v) * n_head > _INT32_MAX:
            raise self.error(f"heads of {max(head_k, head_v)} x attention.head_count {n_head} overflow 32 bits")
        if self.arch in MLA_ARCHS:
            self.mla(n_head_kv, head_k, head_v, n_rot)
            return
        # llama, qwen2moe, qwen3moe, olmoe, granite: GGML_ASSERT(n_embd_head_v == n_embd_head_k
        # && n_embd_head_v == n_rot); gpt-oss sizes its heads by n_rot
        if not head_k == head_v == n_rot:
            raise self.error(
                f"attention.key_length {head_k}, attention.value_length {head_v} and rope.dimension_count "
                f"{n_rot} differ (llama.cpp's {self.arch} needs one head width)"
            )
        # and reshapes the projections into heads: their widths must be whole heads
        for name, axis, want in (
            ("attn_q", 1, n_head * head_k),
            ("attn_k", 1, n_head_kv * head_k),
            ("attn_v", 1, n_head_kv * head_v),
            ("attn_output", 0, n_head * head_v),
        ):
            for tensor, shape in shapes.items():
                if tensor.endswith(f".{name}.weight") and len(shape) == 2 and shape[axis] != want:
                    raise self.error(
                        f"tensor {tensor!r} has shape {list(shape)}, but {n_head} heads ({n_head_kv} KV) of "
                        f"{head_k} need {want} in dimension {axis}"
                    )

    def mla(self, n_head_kv: int, head_k: int, head_v: int, n_rot: int) -> None:
        """deepseek2's multi-head latent attention: with key_length_mla / value_length_mla it caches
        one latent head (head_count_kv 1) of kv_lora_rank + n_rot keys and kv_lora_rank values;
        either way its graph GGML_ASSERTs that a head has dimensions beyond the rotary ones."""
        k_mla = self.int("attention.key_length_mla", default=0, lo=0, hi=_INT32_MAX)
        v_mla = self.int("attention.value_length_mla", default=0, lo=0, hi=_INT32_MAX)
        if bool(k_mla) != bool(v_mla):
            raise self.error("attention.key_length_mla and attention.value_length_mla: one without the other")
        if (k_mla or head_k) - n_rot < 1:
            raise self.error(f"rope.dimension_count {n_rot} leaves no key dimensions beyond it ({k_mla or head_k})")
        if k_mla:
            rank = self.int("attention.kv_lora_rank", lo=1, hi=_INT32_MAX)
            if (n_head_kv, head_k, head_v) != (1, rank + n_rot, rank):
                raise self.error(
                    f"attention.head_count_kv {n_head_kv}, key_length {head_k} and value_length {head_v}: "
                    f"latent attention needs 1, kv_lora_rank + rope.dimension_count ({rank + n_rot}) and "
                    f"kv_lora_rank ({rank})"
                )

    def error(self, what: str) -> MoespacError:
        """A MoespacError naming the file; `what` names keys without the architecture's prefix."""
        return MoespacError(f"{self.path}: {self.arch}: {what}")

    def floats(self) -> None:
        """Every float hyperparameter finite (llama.cpp computes with what it reads: a NaN norm
        epsilon fails ggml's eps >= 0 assertion and aborts), norm epsilons not negative."""
        prefix = f"{self.arch}."
        for key, value in self.meta.items():
            if key.startswith(prefix) and type(value) is float:
                if not math.isfinite(value):
                    raise MoespacError(f"{self.path}: {key!r} is {value}, expected a finite number")
                if key.endswith("_epsilon") and value < 0:
                    raise MoespacError(f"{self.path}: {key!r} is {value}, expected 0 or more")


def format_layout(layout: MoeLayout, mem_bytes: int | None = None) -> str:
    """The `moespac inspect` table."""
    lines = [
        f"{Path(layout.path).name}: arch {layout.arch}, {layout.n_layer} layers "
        f"({len(layout.layers)} MoE, {layout.n_dense_lead} leading dense), "
        f"{layout.n_expert} experts, top-{layout.n_expert_used}"
        + (f", {layout.n_shared_expert} shared" if layout.n_shared_expert else "")
        + f", n_embd {layout.n_embd}, expert FFN {layout.n_ff_exp}",
        "",
        f"{'layer':>5}  {'experts':>7}  {'bytes/expert':>12}  quant (gate/up/down)",
    ]
    for l in layout.layers:
        quants = "/".join(t.type for n, t in l.tensors.items() if n.endswith(".weight"))
        lines.append(f"{l.index:>5}  {layout.n_expert:>7}  {format_size(l.bytes_per_expert):>12}  {quants}")
    lines += [
        "",
        f"expert weights   {format_size(layout.expert_bytes):>12}",
        f"other weights    {format_size(layout.other_bytes):>12}",
        f"file             {format_size(layout.file_bytes):>12}",
    ]
    if mem_bytes is not None:
        total = len(layout.layers) * layout.n_expert
        fit = layout.experts_fitting(mem_bytes)
        lines.append(
            f"with {format_size(mem_bytes)}: {fit} of {total} experts fit "
            f"({100 * fit / total:.0f}%) beside the non-expert weights"
        )
    return "\n".join(lines)
