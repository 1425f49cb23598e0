"""The C routing tap records exactly what the routers compute (numpy ground truth)."""

import gguf
import numpy as np
import pytest

from moespac_gguf.core.layout import read_layout
from moespac_gguf.demo.synthetic import SUPPORTED_ARCHS
from moespac_gguf.llama.capture import TensorCapture
from moespac_gguf.llama.session import Session

PROMPT = "hello world, the routing tap records every expert choice of every layer"


def router_topk(path, layer: int, h: np.ndarray, k: int) -> np.ndarray:
    """Top-k experts by router logit, recomputed from the GGUF's router weights."""
    tensors = {t.name: np.asarray(t.data, dtype=np.float32) for t in gguf.GGUFReader(path).tensors}
    logits = h @ tensors[f"blk.{layer}.ffn_gate_inp.weight"].T
    bias = tensors.get(f"blk.{layer}.ffn_gate_inp.bias")
    if bias is not None:
        logits = logits + bias
    return np.sort(np.argsort(-logits, axis=1)[:, :k], axis=1)


@pytest.mark.parametrize("arch", SUPPORTED_ARCHS)
def test_tap_matches_router_recomputation(tiny_moe, arch):
    path = tiny_moe(arch=arch, n_layer=3)
    layout = read_layout(path)
    moe_layers = [l.index for l in layout.layers]
    cap = TensorCapture("ffn_norm", "attn_post_norm")
    with Session(path, n_ctx=128, capture=cap) as s:
        prompt = s.tokenize(PROMPT)
        s.decode(prompt)  # prompt batch: the last layer routes only the output row
        prefill = s.last_routing
        assert prefill.experts.shape == (s.n_layer, len(prompt), layout.n_expert_used)
        steps = []
        for tok in (5, 17, 42):  # single-token decode
            s.decode([tok])
            steps.append(s.last_routing)
    for l in range(s.n_layer):
        if l not in moe_layers:
            assert (prefill.experts[l] == -1).all()
            continue
        h = cap.take(f"ffn_norm-{l}") if f"ffn_norm-{l}" in cap.captured else cap.take(f"attn_post_norm-{l}")
        want = router_topk(path, l, h, layout.n_expert_used)
        got_rows = np.concatenate([prefill.experts[l]] + [r.experts[l] for r in steps])
        got = np.sort(got_rows[got_rows[:, 0] >= 0], axis=1)
        assert got.shape == want.shape, (l, got.shape, want.shape)
        assert (got == want).all(), f"layer {l}: tap disagrees with the router"
    # the last layer routes the output row; most archs prune the others (gpt-oss does not)
    routed = prefill.experts[s.n_layer - 1, :, 0] >= 0
    assert routed[-1] and (routed.sum() == 1 or routed.all())
    assert all((r.experts[moe_layers] >= 0).all() for r in steps)


def test_all_logits_batch_routes_every_row_in_every_layer(tiny_moe):
    with Session(tiny_moe(), n_ctx=128) as s:
        toks = s.tokenize(PROMPT)
        s.decode(toks, all_logits=True)
        r = s.last_routing
        assert (r.experts >= 0).all()
        counts = r.counts(8)
        assert (counts.sum(axis=1) == len(toks) * 2).all()
        w = r.weights
        assert (w > 0).all() and (w <= 1).all()


def test_rollback_and_batches_larger_than_n_batch(tiny_moe):
    """Prompts longer than n_batch are split; the tap still returns one row per token."""
    with Session(tiny_moe(), n_ctx=256, n_batch=16) as s:
        toks = s.tokenize(PROMPT * 3)
        assert len(toks) > 32
        logits = s.decode(toks, all_logits=True)
        assert logits.shape == (len(toks), s.n_vocab)
        assert s.last_routing.experts.shape[1] == len(toks)
        s.rollback(10)
        assert s.n_past == 10
        again = s.decode(toks[10:], all_logits=True)
        assert np.allclose(again, logits[10:], atol=1e-4)


def test_copied_kv_continues_exactly_as_its_source(tiny_moe):
    """A session given another's KV cache (copy_kv_from) continues as that session would: the
    same model, the same cache, the same next logits. A session that never saw the prompt does
    not (the control), and a different file's cache is refused."""
    path = tiny_moe()
    with Session(path, n_ctx=256) as a, Session(path, n_ctx=256) as b, Session(tiny_moe(seed=5), n_ctx=256) as other:
        toks = a.tokenize(PROMPT)
        a.decode(toks[:-1])
        b.decode(toks[:3])  # unrelated state, replaced by the copy
        b.copy_kv_from(a)
        assert b.n_past == a.n_past == len(toks) - 1
        want = a.decode(toks[-1:])
        assert np.array_equal(b.decode(toks[-1:]), want)
        b.reset()
        assert not np.allclose(b.decode(toks[-1:]), want, atol=1e-3)
        with pytest.raises(ValueError, match="same model file"):
            other.copy_kv_from(a)


def test_chained_callback_is_asked_only_about_its_names(tiny_moe):
    """The tap forwards to a chained callback only the nodes named with its prefixes (C-side filter);
    with no prefixes it forwards every node. Both captures still see the same router inputs."""
    names = {}
    for prefixes in ((), ("ffn_norm-",)):
        cap = TensorCapture("ffn_norm")
        asked = []
        inner = cap._eval

        def counting(ptr, ask, user_data, inner=inner, asked=asked):
            if ask:
                from moespac_gguf.llama.capture import GgmlTensor

                asked.append(GgmlTensor.from_address(ptr).name.decode())
            return inner(ptr, ask, user_data)

        from moespac_gguf.llama.abi import llama_cpp

        cap.callback = llama_cpp.ggml_backend_sched_eval_callback(counting)
        cap.name_prefixes = prefixes
        with Session(tiny_moe(n_layer=3), n_ctx=128, capture=cap) as s:
            s.decode(s.tokenize(PROMPT))
        names[prefixes] = (asked, sorted(cap.captured))
    unfiltered, filtered = names[()], names[("ffn_norm-",)]
    assert any(not n.startswith("ffn_norm-") for n in unfiltered[0])
    assert filtered[0] and all(n.startswith("ffn_norm-") for n in filtered[0])
    assert filtered[1] == unfiltered[1] and len(filtered[1]) == 3


def test_a_chained_callback_can_be_detached(tiny_moe):
    """chain(None) stops the tap forwarding: a capture detached after one decode sees no more."""
    cap = TensorCapture("ffn_norm")
    with Session(tiny_moe(n_layer=3), n_ctx=128, capture=cap) as s:
        s.decode(s.tokenize(PROMPT))
        assert len(cap.captured) == 3
        cap.clear()
        s.tap.chain(None)
        s.decode(s.tokenize(PROMPT))
        assert not cap.captured and s.last_routing.experts.shape[1] > 0  # the tap itself still records


def test_restricted_routing_picks_the_best_ranked_allowed_experts(tiny_moe):
    """restrict_to (patch 0009): every row's experts become the best-ranked allowed ones by the
    router's own logits; a layer allowing fewer than top-k fills up with its best-ranked others."""
    path = tiny_moe(n_layer=3)
    layout = read_layout(path)
    k, n_expert = layout.n_expert_used, layout.n_expert
    allowed = np.zeros((3, n_expert), bool)
    allowed[0, [1, 4, 6]] = True  # a choice among three
    allowed[1, 5] = True  # one allowed: it, then the best other
    # layer 2 allows nothing: the router's own top-k
    cap = TensorCapture("ffn_norm", "attn_post_norm")
    tensors = {t.name: np.asarray(t.data, dtype=np.float32) for t in gguf.GGUFReader(path).tensors}
    with Session(path, n_ctx=128, capture=cap) as s:
        s.tap.restrict_to(allowed)
        s.decode(s.tokenize(PROMPT), all_logits=True)
        got = s.last_routing.experts
        assert s.tap.rerouted > 0
        s.tap.restrict_to(None)
    for l in range(3):
        h = cap.take(f"ffn_norm-{l}") if f"ffn_norm-{l}" in cap.captured else cap.take(f"attn_post_norm-{l}")
        rank = np.argsort(-(h @ tensors[f"blk.{l}.ffn_gate_inp.weight"].T), axis=1)
        want = [[e for e in row if allowed[l, e]][:k] for row in rank]
        want = np.sort([w + [e for e in row if not allowed[l, e]][: k - len(w)] for w, row in zip(want, rank)], axis=1)
        assert (np.sort(got[l], axis=1) == want).all(), f"layer {l}"
    assert set(np.unique(got[0])) <= {1, 4, 6} and (got[1] == 5).any(axis=1).all()
