"""Lookahead gate: alignment really helps, targets are layer l+d, the sidecar is bound to its model."""

import json

import numpy as np
import pytest

from moespac_gguf import MoespacError, cli
from moespac_gguf.core.gguf import model_fingerprint
from moespac_gguf.core.routing import routing_mask
from moespac_gguf.demo.synthetic import SyntheticSpec
from moespac_gguf.gate.capture import Capture, capture, text_windows
from moespac_gguf.gate.evaluate import evaluate
from moespac_gguf.gate.fit import true_logits, validation_folds
from moespac_gguf.gate.model import HIDDEN_NAMES, LookaheadGate, topk_rows

D = 3
# 5 layers: from layer 0, d = 1..3 all land on MoE layers; from layer 3, only d = 1 does
SPEC = SyntheticSpec(arch="qwen3moe", n_layer=5, n_embd=64, n_expert=8, n_expert_used=2, router_std=2.0)
WORDS = (
    "the of and to in is that it was for on are with as his they be at one have this from or had by "
    "word but what some we can out other were all there when up use your how said an each she which do "
    "their time if will way about many then them write would like so these her long make thing see him "
    "two has look more day could go come did number sound no most people my over know water than call"
).split()


def _text(seed: int, n_words: int) -> str:
    rng = np.random.default_rng(seed)
    lines = []
    for _ in range(n_words // 12):
        lines.append(" ".join(rng.choice(WORDS, 12)).capitalize() + ".")
    return "\n".join(lines)


@pytest.fixture(scope="module")
def trained(tiny_moe, tmp_path_factory):
    """A model, a gate fitted on ~1000 tokens (through the CLI) and a capture of other text."""
    model = tiny_moe(SPEC)
    root = tmp_path_factory.mktemp("gate")
    train_txt = root / "train.txt"
    train_txt.write_text(_text(1, 1200))
    out = root / "gate.npz"
    rc = cli.main(
        [
            "train-gate",
            "-m",
            str(model),
            "--text",
            str(train_txt),
            "--distance",
            str(D),
            "--out",
            str(out),
            "--tokens",
            "1024",
            "--window",
            "128",
            "-t",
            "1",
        ]
    )
    assert rc == 0 and out.is_file()
    test_seqs, _ = text_windows(model, [_write(root / "test.txt", _text(2, 500))], 384, 128)
    test_cap = capture(model, test_seqs, n_ctx=160, n_threads=1, progress=False)
    return model, out, test_cap, root


def _write(path, text):
    path.write_text(text)
    return path


def test_alignment_beats_unaligned_speculative_gating(trained):
    model, out, test_cap, _ = trained
    gate = LookaheadGate.load(out, model)
    res = evaluate(gate, test_cap)
    assert sorted(res) == [str(d) for d in range(1, D + 1)]
    for d, r in res.items():
        # the models differ: speculative gating is clearly imperfect on this model ...
        assert r["unaligned_recall"] < 0.9, (d, r)
        # ... and alignment fixes a real part of it on held-out text, at every distance
        assert r["aligned_recall"] > r["unaligned_recall"] + 0.04, (d, r)
        assert r["aligned_recall"] > r["frequency_recall"] and r["aligned_recall"] > r["prev_token_recall"]


def test_targets_are_layer_l_plus_d_routing(trained):
    """The regression target of layer t is the tap's routing of layer t, and evaluation at
    distance d compares with layer l+d: with every layer's state equal, speculative gating is
    exact at every d (comparing with layer l or l+d-1 would score near chance)."""
    model, out, test_cap, _ = trained
    gate = LookaheadGate.load(out, model)
    k, e = gate.n_expert_used, gate.n_expert
    for t in gate.moe_layers:
        want = routing_mask(test_cap.experts[t], e)
        assert (topk_rows(true_logits(test_cap, gate.routers, t), k) == want).all(), t
    # a capture where the state does not change between layers; the truth of layer t = its router on it
    x = test_cap.hidden[gate.moe_layers[0]]
    experts = np.full_like(test_cap.experts, -1)
    for t in gate.moe_layers:
        experts[t] = np.sort(np.argsort(-(x.astype(np.float32) @ gate.routers[t][0].T), axis=1)[:, :k], axis=1)
    frozen = Capture({l: x for l in gate.moe_layers}, experts, test_cap.tokens, test_cap.seq_start, test_cap.generated)
    unaligned = LookaheadGate(gate.n_layer, e, k, gate.n_embd, D, gate.moe_layers, gate.routers, {}, gate.frequency)
    res = evaluate(unaligned, frozen)
    assert all(r["unaligned_recall"] == 1.0 and r["aligned_recall"] == 1.0 for r in res.values())
    # the same rows scored against the wrong layer are far from perfect
    shifted = Capture(frozen.hidden, np.roll(experts, 1, axis=0), frozen.tokens, frozen.seq_start, frozen.generated)
    assert all(r["unaligned_recall"] < 0.8 for r in evaluate(unaligned, shifted).values())
    # predict: -inf for targets past the last layer
    last = gate.moe_layers[-2]
    z = gate.predict(last, x[0])
    assert z.shape == (D, e) and np.isfinite(z[0]).all() and np.isinf(z[1:]).all()


def test_sidecar_is_bound_to_its_model(trained, tiny_moe):
    model, out, _, _ = trained
    other = tiny_moe(SPEC, seed=7)  # same shapes, other weights
    assert model_fingerprint(model) == model_fingerprint(model)
    assert model_fingerprint(model) != model_fingerprint(other)
    with pytest.raises(MoespacError, match="trained for another model") as err:
        LookaheadGate.load(out, other)
    assert "\n" not in str(err.value)
    # the CLI turns it into one line and exit code 2
    assert cli.main(["eval-gate", "-m", str(other), "--gate", str(out), "--json", "-t", "1"]) == 2


def test_eval_gate_json_keys(trained, capsys):
    model, out, _, root = trained
    prompts = root / "prompts.jsonl"
    prompts.write_text(
        "\n".join(json.dumps({"category": c, "turns": [_text(i, 40)]}) for i, c in enumerate(("qa", "math", "qa")))
    )
    capsys.readouterr()
    rc = cli.main(
        [
            "eval-gate",
            "-m",
            str(model),
            "--gate",
            str(out),
            "--prompts",
            str(prompts),
            "--n-prompts",
            "3",
            "--max-new",
            "4",
            "--json",
            "-t",
            "1",
        ]
    )
    assert rc == 0
    res = json.loads(capsys.readouterr().out)
    assert sorted(res) == ["1", "2", "3"]
    for r in res.values():
        for key in (
            "aligned_recall",
            "unaligned_recall",
            "aligned_precision",
            "unaligned_precision",
            "prev_token_recall",
            "frequency_recall",
        ):
            assert 0.0 <= r[key] <= 1.0, key


def test_runtime_utility_is_expected_routings_of_later_layers(trained):
    model, out, test_cap, _ = trained
    gate = LookaheadGate.load(out, model)
    rows = 5
    src = gate.moe_layers[1]
    u = gate.utility({src: test_cap.hidden[src][:rows]})
    assert u.shape == (gate.n_layer, gate.n_expert)
    assert (u[: src + 1] == 0).all()  # routed already: the tap knows
    reach = [t for t in range(src + 1, src + D + 1) if t in gate.moe_layers]
    for t in reach:
        assert 0 < u[t].sum() <= rows * gate.n_expert_used + 1e-9
        assert (u[t] <= rows + 1e-9).all()
    # the gate's size: under 2% of the model, as the issue asks
    assert gate.nbytes < 0.02 * gate.info["model_bytes"]


def test_gate_tap_predicts_during_the_decode(trained):
    """The runtime callback sees each MoE layer's router input mid-decode and predicts the same
    expected routings as the offline path, layer by layer, in layer order."""
    from moespac_gguf.gate.runtime import GateTap
    from moespac_gguf.llama.capture import TensorCapture
    from moespac_gguf.llama.session import Session

    model, out, test_cap, _ = trained
    gate = LookaheadGate.load(out, model)
    seen = []
    tap = GateTap(gate, lambda layer, u: seen.append((layer, u)))
    with Session(model, n_ctx=128, n_threads=1, capture=tap) as s:
        toks = s.tokenize("the lookahead gate predicts later layers")
        s.decode(toks[:-1], all_logits=True)
        seen.clear()
        s.decode(toks[-1:])
    assert [layer for layer, _ in seen] == gate.moe_layers
    cap = TensorCapture(*HIDDEN_NAMES)
    with Session(model, n_ctx=128, n_threads=1, capture=cap) as s:
        s.decode(toks[:-1], all_logits=True)
        cap.clear()
        s.decode(toks[-1:])
    for layer, u in seen:
        want = gate.utility({layer: cap.take(f"ffn_norm-{layer}")}, known_upto=layer)
        assert np.allclose(u, want, atol=1e-5), layer
    assert tap.calls == 2 * len(gate.moe_layers)


def test_gated_residency_puts_the_next_layers_first(trained):
    """One utility space: the gate's layers replace the speculative utility there, and the engine
    reads ahead the predicted experts of layer l+1 before l+2 before l+3, and nothing else."""
    from types import SimpleNamespace

    from moespac_gguf.gate.runtime import GatedResidency
    from moespac_gguf.residency.policy import Capacity

    model, out, test_cap, _ = trained
    gate = LookaheadGate.load(out, model)
    applied = []
    base = np.full((gate.n_layer, gate.n_expert), 0.3)
    controller = SimpleNamespace(
        policy=SimpleNamespace(estimator=SimpleNamespace(predict=lambda draft=None: base), capacity=Capacity(total=10)),
        engine=SimpleNamespace(hint=lambda want, prio: applied.append((want, prio))),
        on_draft=lambda draft, ahead=None: None,
        on_verify=lambda event: None,
    )
    gated = GatedResidency(controller, gate, read_ahead=D)
    gated.on_draft([1, 2])
    src = gate.moe_layers[0]
    expected = gate.utility({src: test_cap.hidden[src][:1]}, known_upto=src)
    gated.on_lookahead(src, expected)
    want, prio = applied[-1]
    util, _, predicted_mask = gated.combine(src, expected)
    assert (want == predicted_mask).all() and want.sum() == sum(
        map(len, [np.flatnonzero(expected[t] >= 0.5) for t in range(src + 1, src + D + 1)])
    )
    assert np.allclose(util[src + 1 : src + D + 1], expected[src + 1 : src + D + 1])
    assert np.allclose(util[src + D + 1 :], 0.3)
    predicted = [set(np.flatnonzero(expected[t] >= 0.5)) for t in range(src + 1, src + D + 1)]
    assert all(predicted)
    order = np.argsort(-prio, axis=None, kind="stable")
    layers_in_order = [int(i) // gate.n_expert for i in order[: sum(map(len, predicted))]]
    assert layers_in_order == sorted(layers_in_order)  # nearest layer first
    for t, p in zip(range(src + 1, src + D + 1), predicted):
        assert all(want[t, e] for e in p)


def test_shrinkage_is_validated_across_sources():
    """With several text sources, each fold validates on one source it was not fitted on."""
    n = 12
    cap = Capture(
        {},
        np.zeros((1, n, 2), np.int32),
        np.zeros(n, np.int32),
        np.arange(n) % 4 == 0,
        np.zeros(n, bool),
        np.repeat([0, 1, 2], 4),
    )
    folds = validation_folds(cap)
    assert len(folds) == 3
    for g, (tr, va) in enumerate(folds):
        assert (va == (cap.group == g)).all() and (tr == ~va).all()
    single = validation_folds(Capture({}, cap.experts, cap.tokens, cap.seq_start, cap.generated, None), 0.25)
    assert len(single) == 1 and single[0][1].tolist() == [False] * 8 + [True] * 4


def test_moespac_runs_with_the_gate_and_keeps_greedy_output(trained):
    """`MoeSpac(..., gate=FILE)`: the gate runs inside every decode (one call per MoE layer and
    ubatch) and steers the engine, without changing a single greedy token."""
    from moespac_gguf import MoeSpac

    model, out, _, _ = trained
    prompt = "the lookahead gate predicts later layers of the model"
    with MoeSpac(model, model, n_ctx=256, n_threads=1, draft_max=3) as plain:
        plain.create_completion(prompt, max_tokens=12)
        want = list(plain.completion_tokens)
    with MoeSpac(model, model, n_ctx=256, n_threads=1, draft_max=3, mem_budget="4G", gate=out) as m:
        m.create_completion(prompt, max_tokens=12)
        assert m.completion_tokens == want
        n_moe = len(m.gate_tap.gate.moe_layers)
        assert m.gate_tap.calls >= n_moe * (m.stats.n_steps + 1)  # prompt + every verification
        st = m.residency.engine.stats
        assert (st.kept if m.residency.keep_at_use else st.plans) > 0  # the tap kept, or the engine planned
    with pytest.raises(MoespacError, match="a lookahead gate steers the residency engine, which is off"):
        MoeSpac(model, gate=out)
