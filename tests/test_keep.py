"""Keep at use (residency.keep, patches/0017): the rule, and the routing tap applying it for real."""

import numpy as np
import pytest

from moespac_gguf import MoeSpac
from moespac_gguf.core.layout import read_layout
from moespac_gguf.demo.synthetic import SyntheticSpec
from moespac_gguf.residency import pages
from moespac_gguf.residency.keep import keep_at_use, keep_plan, layer_shares
from moespac_gguf.residency.policy import Capacity

INF = np.inf


def _routing(*layers):
    """int [L, 1, k]: one row, each layer's experts (padded with -1)."""
    k = max(len(l) for l in layers)
    return np.array([[list(l) + [-1] * (k - len(l))] for l in layers])


def test_plan_scores_only_what_is_not_held_and_orders_victims_weakest_first():
    resident = np.zeros((2, 4), bool)
    resident[0, 1] = resident[1, 2] = resident[1, 3] = True
    held = np.array([[0, 0.5, 0, 0], [0, 0, 0.2, 0.9]])
    plan = keep_plan(resident, np.full((2, 4), 0.7), held, np.array([2, 3]))
    assert (plan.admit[resident] == -INF).all() and (plan.admit[~resident] == np.float32(0.7)).all()
    assert plan.victims.tolist() == [6, 1, 7] and plan.victim_score.tolist() == pytest.approx([0.2, 0.5, 0.9])
    assert plan.free.tolist() == [1, 1]
    # a layer above its share (layer 1: 2 of 1) leaves no room for the others to grow into
    assert keep_plan(resident, np.full((2, 4), 0.7), held, np.array([2, 1])).free.tolist() == [0, 0]


def test_layer_shares_are_equal_with_the_remainder_spread():
    shares = layer_shares(45, 30)
    assert shares.sum() == 45 and set(shares.tolist()) == {1, 2}
    assert abs(shares[:15].sum() - shares[15:].sum()) <= 1, "the remainder is spread, not given to the first layers"
    assert layer_shares(5, 3).tolist() == [2, 2, 1]
    assert layer_shares(10, 3, per_layer=2).tolist() == [2, 2, 2]
    assert layer_shares(0, 4).tolist() == [0, 0, 0, 0]


def test_routed_experts_take_free_places_then_replace_weaker_held_ones_of_their_layer_only():
    resident = np.zeros((2, 4), bool)
    resident[0, 3] = resident[1, 1] = True
    admit = np.array([[0.9, 0.1, 0.6, 0], [0, 0, 0, 0.05]])
    held = np.zeros((2, 4))
    held[0, 3], held[1, 1] = 0.3, 0.7
    plan = keep_plan(resident, admit, held, np.array([2, 1]))  # one free place, in layer 0
    hits, admitted, evicted = keep_at_use(plan, resident, _routing([1, 0, 2], [1, 3]))
    # layer 0, best first: 0 (0.9) takes the free place, 2 (0.6) replaces (0, 3) at 0.3, 1 (0.1)
    # beats nothing left; layer 1: (1, 1) is held and routed (a hit), 3 has no victim left
    assert admitted.tolist() == [0, 2] and evicted.tolist() == [3]
    assert hits[1, 1] and hits.sum() == 1
    assert resident[0, 3] and not resident[0, 0], "the caller's array is not modified"


def test_a_victim_routed_in_the_window_is_passed_over_and_minus_inf_never_admits():
    resident = np.zeros((2, 4), bool)
    resident[0, 3] = resident[0, 2] = True
    held = np.zeros((2, 4))
    held[0, 3], held[0, 2] = 0.1, 0.2  # (0, 3) weakest, but routed
    plan = keep_plan(resident, np.full((2, 4), 0.5), held, np.array([2, 0]))
    hits, admitted, evicted = keep_at_use(plan, resident, _routing([3, 0], [1]))
    assert evicted.tolist() == [2] and admitted.tolist() == [0]  # (0, 0) in place of (0, 2)
    assert hits[0, 3] and hits.sum() == 1
    plan = keep_plan(np.zeros((1, 4), bool), np.full((1, 4), -INF), np.zeros((1, 4)), np.array([4]))
    assert keep_at_use(plan, np.zeros((1, 4), bool), _routing([0, 1]))[1].size == 0


def test_an_admission_never_replaces_another_layers_expert():
    resident = np.zeros((2, 4), bool)
    resident[0, 0] = resident[1, 0] = True
    held = np.zeros((2, 4))
    held[0, 0], held[1, 0] = 0.9, 0.1  # layer 1's is the weakest overall
    plan = keep_plan(resident, np.full((2, 4), 0.5), held, np.array([1, 1]))
    _, admitted, evicted = keep_at_use(plan, resident, _routing([2], [3]))
    assert admitted.tolist() == [7] and evicted.tolist() == [4]  # layer 0's 2 loses to its 0.9


# experts of 64 KiB each (as tests/test_engine.py): the budget below holds a few of 3 x 8
SPEC = SyntheticSpec(arch="qwen3moe", n_layer=3, n_embd=128, n_ff_exp=128, n_expert=8, seed=3)


@pytest.mark.harness_needs("proc")
def test_the_tap_keeps_exactly_what_the_rule_says_and_the_output_is_unchanged(tiny_moe):
    """A real pinned run: in every window the experts the routing tap locked and unlocked are
    keep_at_use's for the same plan and routing, every layer fills its share and no more, the
    locked bytes stay within the held experts' (the swap unlocks first), the held set changes,
    and the greedy text is the same."""
    target = tiny_moe(SPEC)
    prompt = "keeping at use must not change the output"
    with MoeSpac(target, n_ctx=256) as plain:
        ref = plain.create_completion(prompt, max_tokens=40)["choices"][0]["text"]
    layout = read_layout(target)
    with MoeSpac(target, n_ctx=256, mem_budget=layout.other_bytes + (600 << 20), keep_at_use=True) as m:
        res = m.residency
        assert res.keep_at_use, "pinned with a routing tap: the tap keeps"
        per = int(res.engine.map.bytes.max())
        res.policy.capacity = Capacity(total=5)  # a few of the 24: there is a choice each window
        res.policy.before_window(None)
        res._push_plan()
        windows, locked = [], []
        base = pages.status_bytes("VmLck") - per * int(res.engine.resident.sum())
        access = res.policy.access

        after_prefill = [False]

        def checked(tokens, experts, prefill=False, moves=None):
            # without a draft the prompt is one graph, its last row (the first step's) included:
            # the tap decides that row in the prefill's window, and the first step runs no graph
            graph = m.target.last_routing.experts if prefill else experts
            want = keep_at_use(res.policy.plan, res.policy.resident, graph)[1:]
            if after_prefill[0]:
                want = (np.zeros(0, int), np.zeros(0, int))
            after_prefill[0] = prefill
            assert [a.tolist() for a in moves] == [w.tolist() for w in want]
            windows.append(len(moves[0]) + len(moves[1]))
            out = access(tokens, experts, prefill, moves)
            locked.append(pages.status_bytes("VmLck") - base - per * int(res.policy.resident.sum()))
            return out

        res.policy.access = checked
        out = m.create_completion(prompt, max_tokens=40)["choices"][0]["text"]
        assert out == ref
        assert len(windows) >= 40 and sum(windows) > 10, "admissions and evictions happened"
        assert res.policy.resident.sum(axis=1).tolist() == [2, 2, 1], "every layer holds its share"
        assert (res.engine.resident == res.policy.resident).all()
        slack = 2 * pages.PAGE * len(res.engine.map.ranges[layout.layers[0].index, 0])
        assert max(abs(x) for x in locked) <= 5 * slack, "locked bytes follow the held set"
        assert res.keep_tap.lock_failures == 0


def test_keep_at_use_is_the_default_only_where_a_self_draft_runs_ahead(tiny_moe):
    """By default the tap keeps at use where a self-draft runs ahead and the pinned engine fetches
    its plan otherwise (api.options.keeps_at_use); --keep-at-use / --no-keep-at-use (the bench's
    moespac+keep / moespac-plan) choose either; the output is the same."""
    target = tiny_moe(SPEC)
    layout = read_layout(target)
    outs = []
    cases = [(None, {}, False), (None, {"keep_at_use": True}, True), ("self", {}, True)]
    cases.append(("self", {"keep_at_use": False}, False))
    for draft, options, keep in cases:
        with MoeSpac(target, draft, n_ctx=256, mem_budget=layout.other_bytes + (600 << 20), **options) as m:
            outs.append(m.create_completion("the old path", max_tokens=16)["choices"][0]["text"])
            res = m.residency
            assert res.keep_at_use == keep and res.policy.keep_at_use == keep, (draft, options)
            assert (res.engine.stats.kept > 0) == keep and (res.engine.stats.plans > 0) != keep
    assert len(set(outs)) == 1
