"""The synthetic models every other test builds on: right layout, and llama.cpp runs them."""

from __future__ import annotations

import gguf
import numpy as np
import pytest

from moespac_gguf import MoespacError
from moespac_gguf.cli.synth import main
from moespac_gguf.demo.synthetic import SUPPORTED_ARCHS, SyntheticSpec, vocab, write_synthetic_moe

DTYPES = ("F32", "F16", "Q8_0", "Q4_0")
DENSE_ARCHS = ("llama", "granitemoe", "deepseek2")
ALL_MOE = [(arch, dtype) for arch in SUPPORTED_ARCHS for dtype in DTYPES]


@pytest.fixture(scope="module")
def llama_cpp():
    return pytest.importorskip("llama_cpp")


def _field(reader: gguf.GGUFReader, key: str):
    f = reader.get_field(key)
    return None if f is None else f.contents()


def _run(llama_cpp, path, n_tokens=4):
    """Load in llama.cpp, greedily decode n_tokens; return (tokens, last logits, completion text)."""
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, n_threads=2, verbose=False)
    try:
        prompt = llm.tokenize(b"hello there", add_bos=False)
        tokens = []
        for tok in llm.generate(prompt, temp=0.0):
            tokens.append(tok)
            if len(tokens) == n_tokens:
                break
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),)).copy()
        text = llm.create_completion("hello", max_tokens=n_tokens, temperature=0)["choices"][0]["text"]
        return tokens, logits, text
    finally:
        llm.close()


def test_supported_archs():
    assert {"llama", "qwen2moe", "qwen3moe", "olmoe", "deepseek2"} <= set(SUPPORTED_ARCHS)


@pytest.mark.parametrize("arch,dtype", ALL_MOE)
def test_expert_tensors_read_back(tiny_moe, arch, dtype):
    spec = SyntheticSpec(arch=arch, expert_dtype=dtype)
    reader = gguf.GGUFReader(tiny_moe(spec))
    tensors = {t.name: t for t in reader.tensors}
    assert _field(reader, "general.architecture") == arch
    assert _field(reader, f"{arch}.expert_count") == spec.n_expert
    assert _field(reader, f"{arch}.expert_used_count") == spec.n_expert_used
    want = {"gate": (64, 32, 8), "up": (64, 32, 8), "down": (32, 64, 8)}  # ggml ne order
    for layer in range(spec.n_layer):
        for proj, ne in want.items():
            t = tensors.get(f"blk.{layer}.ffn_{proj}_exps.weight")
            if layer not in spec.moe_layers:
                assert t is None
                continue
            assert tuple(int(n) for n in t.shape) == ne
            assert t.tensor_type.name == dtype
        router = tensors.get(f"blk.{layer}.ffn_gate_inp.weight")
        assert (router is None) == (layer not in spec.moe_layers)
    others = {t.tensor_type.name for n, t in tensors.items() if not n.endswith("_exps.weight")}
    assert others == {"F32"}


@pytest.mark.parametrize("arch,dtype", ALL_MOE)
def test_loads_and_generates(tiny_moe, llama_cpp, arch, dtype):
    tokens, logits, text = _run(llama_cpp, tiny_moe(arch=arch, expert_dtype=dtype))
    assert len(tokens) == 4 and all(0 <= t < len(vocab()) for t in tokens)
    assert np.isfinite(logits).all() and logits.std() > 0.1
    assert isinstance(text, str)


@pytest.mark.parametrize("arch", DENSE_ARCHS)
def test_dense_variant_loads(tiny_moe, llama_cpp, arch):
    path = tiny_moe(arch=arch, n_expert=0)
    reader = gguf.GGUFReader(path)
    assert _field(reader, f"{arch}.expert_count") is None
    assert not [t.name for t in reader.tensors if "exps" in t.name or "gate_inp" in t.name]
    tokens, logits, _ = _run(llama_cpp, path, n_tokens=2)
    assert len(tokens) == 2 and np.isfinite(logits).all()


@pytest.mark.parametrize("arch", SUPPORTED_ARCHS)
def test_tensor_names_known_to_gguf(tiny_moe, arch):
    """Every tensor we write is one gguf-py lists for the arch (catches typos llama.cpp would ignore)."""
    spec = SyntheticSpec(arch=arch)
    model_arch = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[arch]
    known = {gguf.TENSOR_NAMES[t].format(bid=i) for t in gguf.MODEL_TENSORS[model_arch] for i in range(spec.n_layer)}
    names = {t.name.rsplit(".", 1)[0] for t in gguf.GGUFReader(tiny_moe(spec)).tensors}
    assert names <= known


def test_tokenizer_uses_merges(tiny_moe, llama_cpp):
    llm = llama_cpp.Llama(model_path=str(tiny_moe(arch="llama")), n_ctx=64, n_threads=2, verbose=False)
    try:
        assert llm.tokenize(b"hello", add_bos=False) == [vocab().index("hello")]
        assert llm.detokenize(llm.tokenize(b"Hi, world!\n", add_bos=False)) == b"Hi, world!\n"
    finally:
        llm.close()


def test_routing_is_decisive_and_spread(tiny_moe):
    """Router logits of the (RMS-normed) token embeddings: many experts win, with clear margins."""
    spec = SyntheticSpec()
    reader = gguf.GGUFReader(tiny_moe(spec))
    data = {t.name: np.asarray(t.data, dtype=np.float32) for t in reader.tensors}
    x = data["token_embd.weight"]
    x = x / np.sqrt((x**2).mean(axis=1, keepdims=True))
    logits = x @ data["blk.0.ffn_gate_inp.weight"].T
    assert len(set(np.argmax(logits, axis=1).tolist())) == spec.n_expert
    ranked, k = -np.sort(-logits, axis=1), spec.n_expert_used
    assert np.median(ranked[:, k - 1] - ranked[:, k]) > 0.3


def test_deterministic(tmp_path):
    spec = SyntheticSpec(arch="olmoe", expert_dtype="Q8_0")
    a = write_synthetic_moe(tmp_path / "a.gguf", spec).read_bytes()
    b = write_synthetic_moe(tmp_path / "b.gguf", spec).read_bytes()
    c = write_synthetic_moe(tmp_path / "c.gguf", SyntheticSpec(arch="olmoe", expert_dtype="Q8_0", seed=1)).read_bytes()
    assert a == b != c


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(arch="mixtral"), "unknown arch"),
        (dict(n_expert_used=9), "top-k"),
        (dict(n_expert_used=0), "top-k"),
        (dict(expert_dtype="Q4_K"), "dtype"),
        (dict(expert_dtype="Q8_0", n_ff_exp=48), "Q8_0"),
        (dict(n_expert=0), "dense"),
        (dict(arch="llama", n_shared_expert=1), "shared"),
        (dict(arch="qwen2moe", n_shared_expert=0), "shared"),
        (dict(arch="deepseek2", n_dense_lead=2), "dense layers"),
        (dict(arch="qwen3moe", n_dense_lead=1), "dense layers"),
        (dict(n_head=3), "n_head"),
        (dict(n_head_kv=3), "n_head_kv"),
        (dict(n_layer=0), "n_layer"),
        (dict(n_expert=2000), "n_expert"),
    ],
)
def test_bad_spec_is_a_one_line_error(kwargs, match):
    with pytest.raises(MoespacError, match=match) as e:
        SyntheticSpec(**kwargs)
    assert "\n" not in str(e.value)


def test_cli(tmp_path, capsys):
    out = tmp_path / "m.gguf"
    argv = [
        str(out),
        "--arch",
        "deepseek2",
        "--layers",
        "3",
        "--experts",
        "4",
        "--top-k",
        "1",
        "--ff",
        "32",
        "--dtype",
        "F16",
        "--seed",
        "7",
        "--dense-lead",
        "2",
    ]
    assert main(argv) == 0
    reader = gguf.GGUFReader(out)
    assert _field(reader, "deepseek2.block_count") == 3
    assert _field(reader, "deepseek2.leading_dense_block_count") == 2
    assert [t.name for t in reader.tensors if t.name.endswith("ffn_up_exps.weight")] == ["blk.2.ffn_up_exps.weight"]
    assert "deepseek2" in capsys.readouterr().out
    with pytest.raises(MoespacError, match="top-k"):
        main([str(out), "--experts", "4", "--top-k", "5"])
