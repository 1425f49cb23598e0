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

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import MoespacError
from .gguf import read_header
from .units import format_size

# Architectures whose MoE tensors we know how to read (gguf arch names).
SUPPORTED_ARCHS = ("llama", "qwen2moe", "qwen3moe", "olmoe", "deepseek2", "gpt-oss", "granitemoe")

_EXPERT_TENSOR = re.compile(r"^blk\.(\d+)\.(ffn_\w+_exps)\.(weight|bias)$")
_ROUTER_TENSOR = re.compile(r"^blk\.(\d+)\.ffn_gate_inp\.weight$")


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
    """Read the MoE expert layout of a GGUF file; MoespacError on anything unusable."""
    header = read_header(path)
    path, meta = header.path, header.metadata
    arch = meta.get("general.architecture")
    if arch is None:
        raise MoespacError(f"{path}: GGUF without general.architecture")
    file_bytes = header.file_bytes

    layers: dict[int, MoeLayer] = {}
    routers: dict[int, TensorSpan] = {}
    other_bytes = 0
    for t in header.tensors:
        if t.offset + t.nbytes > file_bytes:
            raise MoespacError(f"{path}: truncated GGUF (tensor {t.name} ends past the end of the file)")
        span = TensorSpan(t.name, t.type.name, t.offset, t.nbytes, 0)
        m = _EXPERT_TENSOR.match(t.name)
        if m:
            n_expert = int(t.shape[-1])  # ggml ne[2]: the outermost dimension
            span = TensorSpan(span.name, span.type, span.offset, span.nbytes, span.nbytes // n_expert)
            layers.setdefault(int(m.group(1)), MoeLayer(int(m.group(1)), {}, None)).tensors[t.name] = span
            continue
        other_bytes += span.nbytes
        r = _ROUTER_TENSOR.match(t.name)
        if r:
            routers[int(r.group(1))] = span

    if not layers:
        raise MoespacError(
            f"{path} is a dense model (arch {arch!r}, no expert tensors): moespac needs a Mixture-of-Experts GGUF"
        )
    if arch not in SUPPORTED_ARCHS:
        raise MoespacError(f"{path}: unsupported architecture {arch!r} (supported: {', '.join(SUPPORTED_ARCHS)})")
    n_expert = meta.get(f"{arch}.expert_count")
    n_used = meta.get(f"{arch}.expert_used_count")
    if not n_expert or not n_used:
        raise MoespacError(f"{path}: expert tensors present but {arch}.expert_count/expert_used_count missing")
    for layer in layers.values():
        layer.router = routers.get(layer.index)
    ordered = [layers[i] for i in sorted(layers)]
    return MoeLayout(
        path=str(path),
        arch=arch,
        n_layer=int(meta.get(f"{arch}.block_count")),
        n_expert=int(n_expert),
        n_expert_used=int(n_used),
        n_shared_expert=int(meta.get(f"{arch}.expert_shared_count", 0)),
        n_dense_lead=int(meta.get(f"{arch}.leading_dense_block_count", 0)),
        n_embd=int(meta.get(f"{arch}.embedding_length")),
        n_ff_exp=int(meta.get(f"{arch}.expert_feed_forward_length", meta.get(f"{arch}.feed_forward_length", 0))),
        file_bytes=file_bytes,
        expert_bytes=sum(t.nbytes for l in ordered for t in l.tensors.values()),
        other_bytes=other_bytes,
        layers=ordered,
    )


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
