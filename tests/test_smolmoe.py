"""Upcycling a dense llama GGUF into an MoE, the fitted router, the truncated draft (tiny models)."""

import gguf
import numpy as np
import pytest

from moespac_gguf import MoespacError
from moespac_gguf.demo.smolmoe.config import UpcycleConfig
from moespac_gguf.demo.smolmoe.router import capture_router_inputs, expert_load, fit_router, load_entropy
from moespac_gguf.demo.smolmoe.upcycle import write_moe, write_truncated
from moespac_gguf.demo.synthetic import SyntheticSpec
from moespac_gguf.llama.session import Session

TRAIN = [
    "the quick brown fox jumps over the lazy dog while the hello world prints " * 3,
    "in the beginning there were tokens, and routers, and experts that hello the world " * 3,
    "then the model learned to send each token to the experts it needs most of all " * 3,
]
HELDOUT = ["a held-out sentence that the router never saw during its fitting, hello there " * 3]
PROMPT = "hello world, upcycled experts are near copies of the dense feed-forward network"


@pytest.fixture(scope="module")
def dense(tiny_moe):
    return tiny_moe(SyntheticSpec(arch="llama", n_expert=0, n_layer=2, n_embd=64, n_ff_exp=32, n_expert_used=2))


@pytest.fixture(scope="module")
def states(dense):
    return capture_router_inputs(dense, TRAIN, 10_000, n_ctx=256, progress=False)


def _upcycle(dense, states, tmp_path, **cfg):
    cfg = UpcycleConfig(**{"n_expert": 4, "top_k": 2, "dtype": "F32", **cfg})
    routers = [fit_router(states[l], cfg.n_expert, cfg.top_k, seed=l, pca_dims=16) for l in range(len(states))]
    return write_moe(dense, tmp_path / f"moe-{cfg.n_expert}-{cfg.top_k}-{cfg.noise}.gguf", routers, cfg, progress=False)


def _logits(path, text=PROMPT):
    with Session(path, n_ctx=256, tap=False) as s:
        return s.decode(s.tokenize(text), all_logits=True)


def test_capture_covers_every_layer_and_token(dense, states):
    with Session(dense, n_ctx=256, tap=False) as s:
        n_tok = sum(len(s.tokenize(t)) for t in TRAIN)
        n_embd = int(s.metadata("llama.embedding_length"))
    assert states.shape == (2, n_tok, n_embd)  # the last layer keeps every row (all logits requested)
    assert np.isfinite(states).all() and states.std() > 0


def test_zero_noise_all_experts_equals_dense(dense, states, tmp_path):
    """Identical experts, every one routed, weights renormalised to 1: exactly the dense FFN."""
    moe = _upcycle(dense, states, tmp_path, n_expert=4, top_k=4, noise=0.0)
    want = _logits(dense)
    got = _logits(moe)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    # and the comparison is sharp: noisy experts do change the logits
    noisy = _logits(_upcycle(dense, states, tmp_path, n_expert=4, top_k=4, noise=0.2))
    assert np.abs(noisy - want).max() > 1e-3


def test_upcycled_file_is_a_runnable_moe_with_all_metadata(dense, states, tmp_path):
    moe = _upcycle(dense, states, tmp_path, n_expert=4, top_k=2, noise=0.05, dtype="Q8_0")
    src, out = gguf.GGUFReader(dense), gguf.GGUFReader(moe)
    changed = {"general.name", "general.file_type"}
    for key, field in src.fields.items():
        if not key.startswith("GGUF.") and key not in changed:
            assert key in out.fields, key
            assert out.fields[key].contents() == field.contents(), key
    assert out.fields["llama.expert_count"].contents() == 4
    assert out.fields["llama.expert_used_count"].contents() == 2
    t = {x.name: x for x in out.tensors}
    assert t["blk.0.ffn_gate_exps.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0
    assert list(t["blk.1.ffn_gate_inp.weight"].shape) == [64, 4]
    assert "blk.0.ffn_gate.weight" not in t
    with Session(moe, n_ctx=256) as s:
        s.decode(s.tokenize(PROMPT), all_logits=True)
        counts = s.last_routing.counts(4)
    assert (counts > 0).all(), counts  # every expert of every layer is used


def test_same_seed_same_bytes(dense, states, tmp_path):
    a = _upcycle(dense, states, tmp_path / "a", noise=0.05)
    b = _upcycle(dense, states, tmp_path / "b", noise=0.05)
    assert a.read_bytes() == b.read_bytes()


def test_router_is_balanced_on_heldout_states(dense, states):
    held = capture_router_inputs(dense, HELDOUT, 10_000, n_ctx=256, progress=False)
    for layer in range(len(states)):
        w = fit_router(states[layer], 4, 2, seed=layer, pca_dims=16)
        load = expert_load(held[layer] @ w.T, 2)
        assert (load > 0).all(), load
        assert load_entropy(load) > 0.85, load


def test_router_is_meaningful_on_clustered_states():
    """Tokens drawn from E well-separated clusters: each cluster goes to its own expert, evenly."""
    rng = np.random.default_rng(0)
    d, e, per = 32, 4, 400
    centres = rng.standard_normal((e, d)) * 3
    x = np.concatenate([c + rng.standard_normal((per, d)) for c in centres]).astype(np.float32)
    x[:, 0] = 5.0 + 0.05 * rng.standard_normal(len(x))  # a near-constant direction, like real hidden states
    label = np.repeat(np.arange(e), per)
    w = fit_router(x, e, 1, seed=0, pca_dims=16)
    top1 = np.argmax(x @ w.T, axis=1)
    purity = sum(np.bincount(top1[label == c], minlength=e).max() for c in range(e)) / len(x)
    assert purity > 0.95
    assert len(set(top1.tolist())) == e
    assert load_entropy(expert_load(x @ w.T, 1)) > 0.98


def test_fit_router_rejects_too_few_states():
    with pytest.raises(MoespacError):
        fit_router(np.ones((10, 8), np.float32), 8, 2)


def test_truncated_draft(dense, tmp_path):
    out = write_truncated(dense, tmp_path / "trunc.gguf", 1)
    r = gguf.GGUFReader(out)
    assert r.fields["llama.block_count"].contents() == 1
    assert not any(t.name.startswith("blk.1.") for t in r.tensors)
    with Session(out, n_ctx=256, tap=False) as s, Session(dense, n_ctx=256, tap=False) as full:
        assert s.n_layer == 1 and s.vocab_fingerprint() == full.vocab_fingerprint()
        assert np.isfinite(s.decode(s.tokenize(PROMPT))).all()
    # first 1 + last 1 of 2 layers is the whole model again (blocks renumbered in order)
    whole = write_truncated(dense, tmp_path / "whole.gguf", 1, keep_last=1)
    np.testing.assert_allclose(_logits(whole), _logits(dense), rtol=1e-5, atol=1e-5)
    assert np.abs(_logits(out) - _logits(dense)).max() > 1e-3
    with pytest.raises(MoespacError):
        write_truncated(dense, tmp_path / "bad.gguf", 3)
    with pytest.raises(MoespacError):
        write_truncated(dense, tmp_path / "bad.gguf", 2, keep_last=1)


def test_config_validation():
    with pytest.raises(MoespacError):
        UpcycleConfig(n_expert=8, top_k=9)
    with pytest.raises(MoespacError):
        UpcycleConfig(dtype="Q4_0")


def test_greedy_replay_matches_the_speculative_loop(dense, states, tmp_path):
    """Acceptance replayed on a recorded trace equals what SpeculativeDecoder measures."""
    from moespac_gguf.decode.sampling import Sampler
    from moespac_gguf.decode.speculative import SpeculativeDecoder
    from moespac_gguf.demo.smolmoe.acceptance import greedy_acceptance_from_trace
    from moespac_gguf.sim.record import record

    target = _upcycle(dense, states, tmp_path, n_expert=4, top_k=2, noise=0.2)
    prompts = [
        {"text": "hello world, the", "category": "", "question_id": 0},
        {"text": "in the beginning", "category": "", "question_id": 1},
    ]
    n = 24
    trace = record(target, prompts, n, n_ctx=256, progress=False)
    replay = greedy_acceptance_from_trace(dense, trace, draft_max=3, n_ctx=256, progress=False)
    drafted = accepted = 0
    from moespac_gguf.llama.chat import format_prompt

    with Session(target, n_ctx=256, tap=False) as t, Session(dense, n_ctx=256, tap=False) as d:
        dec = SpeculativeDecoder(t, d, draft_max=3, adaptive=False)
        for p in prompts:
            out = list(dec.generate(format_prompt(t, p["text"]), n, Sampler(temperature=0)))
            seq = trace.tokens[(trace.sequence == p["question_id"]) & (trace.phase == 1)]
            assert out == seq.tolist()
            drafted, accepted = drafted + dec.stats.n_drafted, accepted + dec.stats.n_accepted
    # batch (replay) and one-token (loop) draft decodes round differently, so near-ties may flip
    assert abs(replay["acceptance_rate"] - accepted / drafted) < 0.05, (replay, drafted, accepted)
    assert 0.2 < accepted / drafted < 0.9  # a partial-agreement regime, so the comparison means something
    itself = greedy_acceptance_from_trace(target, trace, draft_max=3, n_ctx=256, progress=False)
    assert itself["acceptance_rate"] == 1.0
