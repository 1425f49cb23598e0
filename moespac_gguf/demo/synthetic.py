"""Tiny random-weight MoE GGUF files, one per supported architecture.

Real MoE checkpoints are gigabytes; the test-suite needs files that llama.cpp
loads and runs in milliseconds yet that have the real layout: 3-D expert
tensors, a router, shared experts, leading dense layers, MLA attention.
Weights are seeded normal noise with std 1/sqrt(fan_in) so activations stay
O(1); routers get a larger, configurable scale so top-k choices are decisive
and differ from token to token.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from ..core.atomic import atomic_path
from ..core.errors import MoespacError


@dataclass(frozen=True)
class _Arch:
    """How one llama.cpp architecture departs from the Mixtral-style llama layout."""

    expert_ff_key: str = "expert_feed_forward_length"  # hparam llama.cpp reads the expert width from
    kv_heads: str = "spec"  # "spec": GQA as spec'd; "all": MHA (K norm spans all heads); "one": MLA
    qk_norm: str = ""  # "": none; "head": per-head RMS norm; "all": over all heads at once
    shared_gated: bool = False  # shared expert scaled by sigmoid(ffn_gate_inp_shexp . x)
    shared: tuple[int, int, int] = (0, 0, 0)  # allowed min, max and default shared-expert count
    dense_lead: int | None = None  # default leading dense layers; None: arch has none
    dense_ok: bool = False  # llama.cpp accepts expert_count 0 (a dense model) for this arch
    ffn_norm: str = "ffn_norm"  # name of the norm before the FFN
    oai: bool = False  # gpt-oss: attention sinks, attention-output, router and expert biases
    extra_kv: tuple[tuple[str, Any], ...] = ()


_ARCHS: dict[str, _Arch] = {
    "llama": _Arch(expert_ff_key="feed_forward_length", dense_ok=True),
    "qwen2moe": _Arch(shared_gated=True, shared=(1, 8, 1)),
    "qwen3moe": _Arch(qk_norm="head"),
    "olmoe": _Arch(expert_ff_key="feed_forward_length", kv_heads="all", qk_norm="all"),
    "deepseek2": _Arch(kv_heads="one", shared=(1, 8, 1), dense_lead=1, dense_ok=True),
    "granitemoe": _Arch(
        expert_ff_key="feed_forward_length", shared=(0, 8, 0), dense_ok=True, extra_kv=(("logit_scale", 1.0),)
    ),
    "gpt-oss": _Arch(ffn_norm="post_attention_norm", oai=True, extra_kv=(("attention.sliding_window", 128),)),
}
SUPPORTED_ARCHS: tuple[str, ...] = tuple(a for a in _ARCHS if a in gguf.MODEL_ARCH_NAMES.values())

_EXPERT_DTYPES = {
    "F32": (gguf.GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32),
    "F16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
    "Q8_0": (gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
    # Q4_0: on AVX2 llama.cpp repacks these into its CPU_REPACK buffer type (another kernel path)
    "Q4_0": (gguf.GGMLQuantizationType.Q4_0, gguf.LlamaFileType.MOSTLY_Q4_0),
}
_Q8_BLOCK = 32
_N_CTX_TRAIN = 2048
_MAX_LAYERS, _MAX_EXPERTS = 512, 1024  # llama.cpp GGML_ASSERTs (aborts) beyond these


@dataclass(frozen=True)
class SyntheticSpec:
    """Shape of one synthetic model; n_expert=0 makes a dense one (llama, granitemoe, deepseek2).

    n_head_kv applies to GQA archs: olmoe is MHA and deepseek2 (MLA) is MQA by
    construction. Dense FFNs (dense models, deepseek2's leading layers) are
    n_ff_exp * n_expert_used wide: the active width of an MoE layer.
    """

    arch: str = "qwen3moe"
    n_layer: int = 2
    n_embd: int = 64
    n_expert: int = 8
    n_expert_used: int = 2
    n_ff_exp: int = 32
    expert_dtype: str = "F32"
    n_head: int = 4
    n_head_kv: int = 2
    seed: int = 0
    n_shared_expert: int | None = None  # None: the arch's usual (1 for qwen2moe/deepseek2, else 0)
    n_dense_lead: int | None = None  # deepseek2 only; None: 1 (all layers when n_expert=0)
    router_std: float = 2.0  # std of router logits for a unit-RMS input: larger = more decisive

    def __post_init__(self) -> None:
        if self.arch not in SUPPORTED_ARCHS:
            raise MoespacError(f"unknown arch {self.arch!r}; supported: {', '.join(SUPPORTED_ARCHS)}")
        _validate(self)

    @property
    def _a(self) -> _Arch:
        return _ARCHS[self.arch]

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def kv_heads(self) -> int:
        """KV heads as llama.cpp sees them (MLA is MQA over the compressed cache)."""
        return {"spec": self.n_head_kv, "all": self.n_head, "one": 1}[self._a.kv_heads]

    @property
    def n_ff_dense(self) -> int:
        return self.n_ff_exp * max(self.n_expert_used, 1)

    @property
    def shared_experts(self) -> int:
        if not self.n_expert:
            return 0
        return self._a.shared[2] if self.n_shared_expert is None else self.n_shared_expert

    @property
    def dense_lead(self) -> int:
        """Leading layers with a dense FFN instead of experts."""
        if not self.n_expert:
            return self.n_layer
        if self.n_dense_lead is not None:
            return self.n_dense_lead
        return self._a.dense_lead or 0

    @property
    def moe_layers(self) -> tuple[int, ...]:
        return tuple(range(self.dense_lead, self.n_layer))


def _validate(s: SyntheticSpec) -> None:
    """Reject specs llama.cpp would refuse (or abort on) with a one-line reason."""
    a = s._a
    for name in ("n_layer", "n_embd", "n_ff_exp", "n_head", "n_head_kv"):
        if getattr(s, name) < 1:
            raise MoespacError(f"{name} must be >= 1, got {getattr(s, name)}")
    if s.n_layer > _MAX_LAYERS:
        raise MoespacError(f"llama.cpp takes at most {_MAX_LAYERS} layers, got {s.n_layer}")
    if not 0 <= s.n_expert <= _MAX_EXPERTS:
        raise MoespacError(f"n_expert must be in 0..{_MAX_EXPERTS}, got {s.n_expert}")
    if s.n_expert == 0 and not a.dense_ok:
        raise MoespacError(f"arch {s.arch} has no dense variant in llama.cpp; use llama for a dense model")
    if s.n_expert and not 1 <= s.n_expert_used <= s.n_expert:
        raise MoespacError(f"top-k must be in 1..{s.n_expert} (the expert count), got {s.n_expert_used}")
    if s.n_embd % s.n_head or s.head_dim % 4:
        raise MoespacError(f"n_embd / n_head must be a whole multiple of 4, got {s.n_embd} / {s.n_head}")
    if a.kv_heads == "spec" and s.n_head % s.n_head_kv:
        raise MoespacError(f"n_head ({s.n_head}) must be a multiple of n_head_kv ({s.n_head_kv})")
    if s.expert_dtype not in _EXPERT_DTYPES:
        raise MoespacError(f"expert dtype must be one of {', '.join(_EXPERT_DTYPES)}, got {s.expert_dtype!r}")
    if s.expert_dtype in ("Q8_0", "Q4_0") and (s.n_embd % _Q8_BLOCK or s.n_ff_exp % _Q8_BLOCK):
        raise MoespacError(f"{s.expert_dtype} experts need n_embd and the expert width to be multiples of {_Q8_BLOCK}")
    lo, hi, _ = a.shared
    if s.n_expert and not lo <= s.shared_experts <= hi:
        raise MoespacError(f"arch {s.arch} takes {lo}..{hi} shared experts, got {s.shared_experts}")
    if s.n_dense_lead is not None and a.dense_lead is None:
        raise MoespacError(f"arch {s.arch} has no leading dense layers")
    if s.n_expert and not 0 <= s.dense_lead < s.n_layer:
        raise MoespacError(f"leading dense layers must be in 0..{s.n_layer - 1}, got {s.dense_lead}")
    if s.router_std <= 0:
        raise MoespacError(f"router_std must be > 0, got {s.router_std}")


# --- tokenizer -------------------------------------------------------------------

_MERGES = ("Ġ t", "h e", "i n", "e r", "a n", "o r", "e n", "l l", "Ġt he", "he ll", "hell o")
_SPECIALS = ("<|bos|>", "<|eos|>", "<|pad|>")
_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


def _byte_tokens() -> list[str]:
    """GPT-2's byte-to-printable-unicode map: byte-level BPE tokens for all 256 bytes."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


def vocab() -> list[str]:
    """Token strings of every synthetic model: bytes, merge results, then control tokens."""
    return [*_byte_tokens(), *(m.replace(" ", "") for m in _MERGES), *_SPECIALS]


def _add_tokenizer(w: gguf.GGUFWriter) -> None:
    """The smallest gpt2-style BPE vocab llama.cpp accepts (it refuses one without merges)."""
    tokens = vocab()
    n_normal = len(tokens) - len(_SPECIALS)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.NORMAL] * n_normal + [gguf.TokenType.CONTROL] * len(_SPECIALS))
    w.add_token_merges(list(_MERGES))
    w.add_bos_token_id(n_normal)
    w.add_eos_token_id(n_normal + 1)
    w.add_pad_token_id(n_normal + 2)
    w.add_add_bos_token(False)
    w.add_chat_template(_CHAT_TEMPLATE)


# --- hyper-parameters --------------------------------------------------------------


def _mla_dims(s: SyntheticSpec) -> dict[str, int]:
    """DeepSeek MLA sizes scaled from the head size (V2 uses 128/64/128, ranks 512/1536)."""
    hd = s.head_dim
    return {"nope": hd, "rope": hd // 2, "v": hd, "kv_lora": s.n_embd // 2, "q_lora": s.n_embd // 2}


def _hparams(s: SyntheticSpec) -> dict[str, Any]:
    """`{arch}.*` metadata keys, named as llama.cpp's load_hparams reads them."""
    a = s._a
    kv: dict[str, Any] = {
        "context_length": _N_CTX_TRAIN,
        "embedding_length": s.n_embd,
        "block_count": s.n_layer,
        "feed_forward_length": s.n_ff_dense,
        "attention.head_count": s.n_head,
        "attention.head_count_kv": s.kv_heads,
        "attention.key_length": s.head_dim,
        "attention.value_length": s.head_dim,
        "attention.layer_norm_rms_epsilon": 1e-6,
        "rope.freq_base": 10000.0,
    }
    if s.n_expert:
        kv |= {"expert_count": s.n_expert, "expert_used_count": s.n_expert_used, a.expert_ff_key: s.n_ff_exp}
    if a.shared[1]:
        kv |= {
            "expert_shared_count": s.shared_experts,
            "expert_shared_feed_forward_length": s.n_ff_exp * s.shared_experts,
        }
    if a.dense_lead is not None:
        kv["leading_dense_block_count"] = s.dense_lead
    if a.kv_heads == "one":
        d = _mla_dims(s)
        kv |= {
            "expert_feed_forward_length": s.n_ff_exp,  # required even when every layer is dense
            "attention.q_lora_rank": d["q_lora"],
            "attention.kv_lora_rank": d["kv_lora"],
            "attention.key_length": d["kv_lora"] + d["rope"],
            "attention.value_length": d["kv_lora"],
            "attention.key_length_mla": d["nope"] + d["rope"],
            "attention.value_length_mla": d["v"],
            "rope.dimension_count": d["rope"],
        }
    return kv | dict(a.extra_kv)


def _add_hparams(w: gguf.GGUFWriter, arch: str, kv: dict[str, Any]) -> None:
    for key, value in kv.items():
        add = w.add_float32 if isinstance(value, float) else w.add_uint32
        add(f"{arch}.{key}", value)


# --- tensors -----------------------------------------------------------------------


class _Weights:
    """Ordered name -> float32 array; shapes are given in ggml order (ne) and stored reversed."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.tensors: dict[str, np.ndarray] = {}

    def normal(self, name: str, ne: list[int], std: float | None = None) -> None:
        """std defaults to 1/sqrt(ne[0]): ne[0] is the contracted (input) dim of a ggml matmul."""
        scale = ne[0] ** -0.5 if std is None else std
        self.tensors[name] = (self.rng.standard_normal(ne[::-1]) * scale).astype(np.float32)

    def ones(self, name: str, ne: list[int]) -> None:
        self.tensors[name] = np.ones(ne[::-1], dtype=np.float32)


def _gqa_attention(w: _Weights, s: SyntheticSpec, p: str) -> None:
    hd, q, k = s.head_dim, s.n_head * s.head_dim, s.kv_heads * s.head_dim
    w.normal(p + "attn_q.weight", [s.n_embd, q])
    w.normal(p + "attn_k.weight", [s.n_embd, k])
    w.normal(p + "attn_v.weight", [s.n_embd, k])
    w.normal(p + "attn_output.weight", [q, s.n_embd])
    norm = {"": None, "head": (hd, hd), "all": (q, k)}[s._a.qk_norm]
    if norm:
        w.ones(p + "attn_q_norm.weight", [norm[0]])
        w.ones(p + "attn_k_norm.weight", [norm[1]])
    if s._a.oai:
        w.normal(p + "attn_output.bias", [s.n_embd], 0.1)
        w.normal(p + "attn_sinks.weight", [s.n_head], 1.0)


def _mla_attention(w: _Weights, s: SyntheticSpec, p: str) -> None:
    """DeepSeek multi-head latent attention in the split k_b/v_b form current converters write."""
    d, h = _mla_dims(s), s.n_head
    w.ones(p + "attn_q_a_norm.weight", [d["q_lora"]])
    w.ones(p + "attn_kv_a_norm.weight", [d["kv_lora"]])
    w.normal(p + "attn_q_a.weight", [s.n_embd, d["q_lora"]])
    w.normal(p + "attn_q_b.weight", [d["q_lora"], h * (d["nope"] + d["rope"])])
    w.normal(p + "attn_kv_a_mqa.weight", [s.n_embd, d["kv_lora"] + d["rope"]])
    w.normal(p + "attn_k_b.weight", [d["nope"], d["kv_lora"], h])
    w.normal(p + "attn_v_b.weight", [d["kv_lora"], d["v"], h])
    w.normal(p + "attn_output.weight", [h * d["v"], s.n_embd])


def _dense_ffn(w: _Weights, s: SyntheticSpec, p: str, kind: str, width: int) -> None:
    """SwiGLU FFN; kind is "" (a dense layer) or "_shexp" (a shared expert)."""
    w.normal(f"{p}ffn_gate{kind}.weight", [s.n_embd, width])
    w.normal(f"{p}ffn_up{kind}.weight", [s.n_embd, width])
    w.normal(f"{p}ffn_down{kind}.weight", [width, s.n_embd])


def _moe_ffn(w: _Weights, s: SyntheticSpec, p: str) -> None:
    e, f, x = s.n_embd, s.n_ff_exp, s.n_expert
    w.normal(p + "ffn_gate_inp.weight", [e, x], s.router_std / e**0.5)
    w.normal(p + "ffn_gate_exps.weight", [e, f, x])
    w.normal(p + "ffn_up_exps.weight", [e, f, x])
    w.normal(p + "ffn_down_exps.weight", [f, e, x])
    if s._a.oai:
        w.normal(p + "ffn_gate_inp.bias", [x], 0.1)
        w.normal(p + "ffn_gate_exps.bias", [f, x], 0.1)
        w.normal(p + "ffn_up_exps.bias", [f, x], 0.1)
        w.normal(p + "ffn_down_exps.bias", [e, x], 0.1)
    if s.shared_experts:
        if s._a.shared_gated:
            w.normal(p + "ffn_gate_inp_shexp.weight", [e])
        _dense_ffn(w, s, p, "_shexp", f * s.shared_experts)


def _weights(s: SyntheticSpec) -> dict[str, np.ndarray]:
    w = _Weights(s.seed)
    n_vocab = len(vocab())
    w.normal("token_embd.weight", [s.n_embd, n_vocab], 1.0)
    for i in range(s.n_layer):
        p = f"blk.{i}."
        w.ones(p + "attn_norm.weight", [s.n_embd])
        (_mla_attention if s._a.kv_heads == "one" else _gqa_attention)(w, s, p)
        w.ones(f"{p}{s._a.ffn_norm}.weight", [s.n_embd])
        if i in s.moe_layers:
            _moe_ffn(w, s, p)
        else:
            _dense_ffn(w, s, p, "", s.n_ff_dense)
    w.ones("output_norm.weight", [s.n_embd])
    w.normal("output.weight", [s.n_embd, n_vocab])
    return w.tensors


def _add_tensor(w: gguf.GGUFWriter, name: str, data: np.ndarray, expert_dtype: str) -> None:
    """Expert matrices get the spec'd dtype; everything else stays F32."""
    qtype = _EXPERT_DTYPES[expert_dtype][0]
    if not name.endswith("_exps.weight") or qtype == gguf.GGMLQuantizationType.F32:
        w.add_tensor(name, data)
    else:
        w.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)


def write_synthetic_moe(path: str | Path, spec: SyntheticSpec = SyntheticSpec()) -> Path:
    """Write the model `spec` describes to `path` (atomically); same spec, same bytes."""
    path = Path(path)
    with atomic_path(path) as tmp:
        w = gguf.GGUFWriter(tmp, spec.arch)
        w.add_name(f"synthetic-{spec.arch}")
        w.add_file_type(_EXPERT_DTYPES[spec.expert_dtype][1])
        _add_hparams(w, spec.arch, _hparams(spec))
        _add_tokenizer(w)
        for name, data in _weights(spec).items():
            _add_tensor(w, name, data, spec.expert_dtype)
        try:
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_tensors_to_file()
        finally:
            w.close()
    return path


# --- CLI -----------------------------------------------------------------------------
