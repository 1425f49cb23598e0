"""Keep at use (residency.keep, patches/0017): the rule, and the routing tap applying it for real."""

import numpy as np
import pytest

from moespac_gguf import MoeSpac
from moespac_gguf.core.layout import read_layout
from moespac_gguf.demo.synthetic import SyntheticSpec
from moespac_gguf.residency import pages
from moespac_gguf.residency.keep import keep_at_use, keep_plan
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
    plan = keep_plan(resident, np.full((2, 4), 0.7), held, total=5)
    assert (plan.admit[resident] == -INF).all() and (plan.admit[~resident] == np.float32(0.7)).all()
    assert plan.victims.tolist() == [6, 1, 7] and plan.victim_score.tolist() == pytest.approx([0.2, 0.5, 0.9])
    assert plan.free.tolist() == [2]
    per = keep_plan(resident, np.full((2, 4), 0.7), held, total=5, per_layer=2)
    assert per.per_layer and per.free.tolist() == [1, 0]


def test_routed_experts_take_free_places_then_replace_weaker_held_ones_only():
    resident = np.zeros((2, 4), bool)
    resident[1, 0] = resident[1, 1] = True
    admit = np.array([[0.9, 0.1, 0.6, 0], [0, 0, 0, 0.05]])
    held = np.zeros((2, 4))
    held[1, 0], held[1, 1] = 0.3, 0.7
    plan = keep_plan(resident, admit, held, total=3)  # one free place
    hits, admitted, evicted = keep_at_use(plan, resident, _routing([1, 0, 2], [1, 3]))
    # layer 0, best first: 0 (0.9) takes the free place, 2 (0.6) replaces (1, 0) at 0.3, 1 (0.1)
    # beats nothing left that is not routed; layer 1: (1, 1) is held and routed (a hit), 3 too weak
    assert admitted.tolist() == [0, 2] and evicted.tolist() == [4]
    assert hits[1, 1] and hits.sum() == 1
    assert not resident[0].any(), "the caller's array is not modified"


def test_a_victim_routed_earlier_is_passed_over_and_one_evicted_before_its_layer_misses():
    resident = np.zeros((3, 4), bool)
    resident[0, 3] = resident[2, 3] = True
    held = np.zeros((3, 4))
    held[0, 3], held[2, 3] = 0.1, 0.2  # (0, 3) weakest, but routed in layer 0 below
    plan = keep_plan(resident, np.full((3, 4), 0.5), held, total=2)
    hits, admitted, evicted = keep_at_use(plan, resident, _routing([3], [0], [3]))
    assert evicted.tolist() == [11] and admitted.tolist() == [4]  # (1, 0) in place of (2, 3)
    assert hits[0, 3] and not hits[2, 3]  # evicted at layer 1: layer 2 reads it again
    # -inf never admits
    plan = keep_plan(np.zeros((1, 4), bool), np.full((1, 4), -INF), np.zeros((1, 4)), total=4)
    assert keep_at_use(plan, np.zeros((1, 4), bool), _routing([0, 1]))[1].size == 0


def test_per_layer_capacity_replaces_within_the_layer():
    resident = np.zeros((2, 4), bool)
    resident[0, 0] = resident[1, 0] = True
    held = np.zeros((2, 4))
    held[0, 0], held[1, 0] = 0.9, 0.1  # layer 1's is the weakest overall
    plan = keep_plan(resident, np.full((2, 4), 0.5), held, total=2, per_layer=1)
    _, admitted, evicted = keep_at_use(plan, resident, _routing([2], [3]))
    assert admitted.tolist() == [7] and evicted.tolist() == [4]  # layer 0's 2 loses to its 0.9


# experts of 64 KiB each (as tests/test_engine.py): the budget below holds a few of 3 x 8
SPEC = SyntheticSpec(arch="qwen3moe", n_layer=3, n_embd=128, n_ff_exp=128, n_expert=8, seed=3)


@pytest.mark.harness_needs("proc")
def test_the_tap_keeps_exactly_what_the_rule_says_and_the_output_is_unchanged(tiny_moe):
    """A real pinned run: in every window the experts the routing tap locked and unlocked are
    keep_at_use's for the same plan and routing, the locked bytes stay within the held
    experts' (the swap unlocks first), the held set changes, and the greedy text is the same."""
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

        def checked(tokens, experts, prefill=False, moves=None):
            want = keep_at_use(res.policy.plan, res.policy.resident, experts)[1:]
            assert [a.tolist() for a in moves] == [w.tolist() for w in want]
            windows.append(len(moves[0]) + len(moves[1]))
            out = access(tokens, experts, prefill, moves)
            locked.append(pages.status_bytes("VmLck") - base - per * int(res.policy.resident.sum()))
            return out

        res.policy.access = checked
        out = m.create_completion(prompt, max_tokens=40)["choices"][0]["text"]
        assert out == ref
        assert len(windows) >= 40 and sum(windows) > 10, "admissions and evictions happened"
        assert res.policy.resident.sum() == 5 and (res.engine.resident == res.policy.resident).all()
        slack = 2 * pages.PAGE * len(res.engine.map.ranges[layout.layers[0].index, 0])
        assert max(abs(x) for x in locked) <= 5 * slack, "locked bytes follow the held set"
        assert res.keep_tap.lock_failures == 0


def test_keep_at_use_is_opt_in_and_changes_no_output(tiny_moe):
    """By default the pinned engine fetches its plan and the tap keeps nothing; --keep-at-use (the
    bench's moespac+keep) lets the tap keep; the output is the same."""
    target = tiny_moe(SPEC)
    layout = read_layout(target)
    outs = []
    for keep in (True, False):
        options = {"keep_at_use": True} if keep else {}
        with MoeSpac(target, n_ctx=256, mem_budget=layout.other_bytes + (600 << 20), **options) as m:
            outs.append(m.create_completion("the old path", max_tokens=16)["choices"][0]["text"])
            res = m.residency
            assert res.keep_at_use == keep and res.policy.keep_at_use == keep
            assert (res.engine.stats.kept > 0) == keep and (res.engine.stats.plans > 0) != keep
    assert outs[0] == outs[1]
