"""The slot tier's decisions (residency.slots), as pure logic against a fake slot store.

The real slots (llama.SlotCache, host RAM or GPU) are tested in test_slots.py / test_gpu.py;
here only what the filler asks of them: which experts go where, when, and what it counts.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from moespac_gguf.core.events import VerificationEvent
from moespac_gguf.core.layout import read_layout
from moespac_gguf.core.routing import Routing
from moespac_gguf.residency.costs import DEFAULT_COSTS
from moespac_gguf.residency.plan import RESIDENT, SLOT, Plan
from moespac_gguf.residency.slots import SlotFiller, slot_counts


class FakeSlots:
    """A SlotStore that records copies and keeps the assignment in arrays."""

    def __init__(self, n_layer: int, n_expert: int, counts: list[int]):
        self.n_layer, self.n_expert = n_layer, n_expert
        self.n_slots = np.array(counts)
        self.moe_layers = [l for l, c in enumerate(counts) if c]
        self.content = {l: [None] * c for l, c in enumerate(counts)}
        self.map = np.full((n_layer, n_expert), -1)
        self.buffer_bytes, self.copied_bytes, self.copied = 1000, 0, []

    def copy_async(self, layer, expert, slot):
        assert expert not in [e for e in range(self.n_expert) if self.map[layer, e] == slot], "copy into a used slot"
        self.content[layer][slot] = expert
        self.copied.append((layer, expert, slot))
        self.copied_bytes += 10

    def assign(self, layer, expert, slot):
        assert self.content[layer][slot] == expert
        self.map[layer, self.map[layer] == slot] = -1
        self.map[layer, expert] = slot

    def evict(self, layer, expert):
        self.map[layer, expert] = -1

    def expert_in(self, layer, slot):
        return self.content[layer][slot]

    def assignment(self):
        return self.map.copy()

    def close(self):
        pass


class FixedPlanner:
    def __init__(self, plan):
        self.plan, self.problems = plan, []

    def submit(self, problem):
        self.problems.append(problem)

    def latest(self):
        return self.plan

    def close(self):
        pass


def event(layout_layers: int, experts_per_row: list[list[int]], n_layer: int) -> VerificationEvent:
    """One verification whose every MoE layer routes each row to the given experts."""
    ids = np.full((n_layer, len(experts_per_row), len(experts_per_row[0])), -1, dtype=np.int32)
    ids[n_layer - layout_layers :] = np.array(experts_per_row)
    routing = Routing(ids, np.ones(ids.shape, np.float32))
    batch = list(range(len(experts_per_row)))
    return VerificationEvent("verify", batch, batch[1:], 0, batch[:1], routing)


@pytest.fixture
def layout(tiny_moe):
    return read_layout(tiny_moe(n_layer=2))  # 2 MoE layers of 8 experts


def test_slot_counts_pay_for_spares_with_fewer_layers(layout):
    b = layout.mean_bytes_per_expert
    assert slot_counts(layout, 3 * b, 1.0, 2, spare=1) == [0, 2]  # one layer: 2 slots + its zero slot
    assert slot_counts(layout, 5 * b, 1.0, 2, spare=1) == [1, 2]
    assert slot_counts(layout, 1 * b, 1.0, 2, spare=1) == [0, 0]
    assert slot_counts(layout, 100 * b, 1.0, 2, spare=1) == [8, 8]  # at most every expert
    assert slot_counts(layout, 3 * b, 1.0, 2) == [1, 2]  # host slots have no spare


def test_slots_follow_utility_and_count_hits(layout):
    cache = FakeSlots(2, 8, [2, 2])
    filler = SlotFiller(cache, layout, DEFAULT_COSTS, on_gpu=True)
    for _ in range(3):
        filler.on_verify(event(2, [[1, 2], [1, 2], [1, 3]], 2))
        filler.on_draft([])
    assert sorted(np.flatnonzero(cache.map[0] >= 0)) == [1, 2]  # the two most used
    assert filler.in_slot[:, [1, 2]].all() and filler.in_slot.sum() == 4
    st = filler.stats()
    # first step: nothing held; later steps: experts 1 and 2 (5 of 6 uses per layer) from slots
    assert st["hit_rate"] == pytest.approx((0 + 5 + 5) / 18)
    assert st["copies"] == 4 and st["planned_steps"] == 0


def test_an_occupant_is_replaced_only_by_a_much_more_useful_expert(layout):
    cache = FakeSlots(2, 8, [1, 1])
    filler = SlotFiller(cache, layout, DEFAULT_COSTS, on_gpu=True, margin=1.0)
    filler.on_verify(event(2, [[4, 5]] * 4, 2))  # 4 and 5 tie: the first wins the one slot
    filler.on_draft([])
    held = int(np.flatnonzero(cache.map[1] >= 0)[0])
    filler.on_verify(event(2, [[5, 6]], 2))  # 5 now ahead, but not by (1 + margin)x
    filler.on_draft([])
    assert int(np.flatnonzero(cache.map[1] >= 0)[0]) == held and len(cache.copied) == 2
    for _ in range(6):
        filler.on_verify(event(2, [[6, 7]] * 4, 2))
        filler.on_draft([])
    assert int(np.flatnonzero(cache.map[1] >= 0)[0]) in (6, 7)


def test_the_balancer_plan_decides_what_the_slots_hold(layout):
    cache = FakeSlots(2, 8, [2, 2])
    tier = np.full((2, 8), RESIDENT, dtype=np.int8)
    tier[:, 7] = SLOT  # an expert the utility does not rank first
    plan = Plan(tier, np.zeros_like(tier), 0.0, "highs", 0.0, "optimal")
    planner = FixedPlanner(plan)
    filler = SlotFiller(cache, layout, DEFAULT_COSTS, on_gpu=True, planner=planner, plan_every=2)
    for _ in range(3):
        filler.on_verify(event(2, [[1, 2]] * 3 + [[7, 1]], 2))
        filler.on_draft([])
    assert (cache.map[:, 7] >= 0).all() and (cache.map >= 0).sum() == 2
    assert len(planner.problems) == 2  # steps 0 and 2
    problem = planner.problems[-1]
    assert (problem.current[:, 7] == SLOT).all() and (problem.slot_capacity == 2).all()
    assert filler.stats()["planned_steps"] == 3


class LatePlanner(FixedPlanner):
    """A planner whose plan arrives after `delay` questions."""

    def __init__(self, plan, delay: int):
        super().__init__(plan)
        self.delay = delay

    def latest(self):
        return self.plan if len(self.problems) > self.delay else None


def test_a_plan_evicts_the_occupants_it_leaves_out(layout):
    # the utility ranking fills both slots of each layer until the plan comes; it wants none
    cache = FakeSlots(2, 8, [2, 2])
    none_in_slots = Plan(np.full((2, 8), RESIDENT, np.int8), np.zeros((2, 8), np.int8), 0.0, "highs", 0.0, "optimal")
    filler = SlotFiller(cache, layout, DEFAULT_COSTS, on_gpu=True, planner=LatePlanner(none_in_slots, 1), plan_every=1)
    filler.on_verify(event(2, [[1, 2]] * 4, 2))
    filler.on_draft([])
    assert (cache.map >= 0).sum() == 4 and filler.in_slot.sum() == 4
    filler.on_verify(event(2, [[1, 2]] * 4, 2))
    assert (cache.map >= 0).sum() == 0 and filler.in_slot.sum() == 0 and len(cache.copied) == 4


def test_slots_across_a_link_wait_for_the_plan(layout):
    """Over a link (costs.round_trip_s) the utility ranking fills nothing: only the balancer,
    which weighs the link, puts experts on the remote device."""
    cache = FakeSlots(2, 8, [2, 2])
    link = replace(DEFAULT_COSTS, gpu_s_per_token_expert=2e-5, memcpy_bps=1.25e8, round_trip_s=1e-3)
    tier = np.full((2, 8), RESIDENT, np.int8)
    tier[:, 1] = SLOT
    planner = LatePlanner(Plan(tier, np.zeros_like(tier), 0.0, "highs", 0.0, "optimal"), 2)
    filler = SlotFiller(cache, layout, link, on_gpu=True, planner=planner, plan_every=1)
    for _ in range(2):
        filler.on_verify(event(2, [[1, 2]] * 4, 2))
        filler.on_draft([])
        assert not cache.copied and planner.problems[-1].token_bytes == 4 * layout.n_embd
    filler.on_verify(event(2, [[1, 2]] * 4, 2))
    filler.on_draft([])
    assert (cache.map[:, 1] >= 0).all() and (cache.map >= 0).sum() == 2


class FakeEngine:
    def __init__(self):
        self.budget, self.resident, self.released = 10_000, np.zeros((2, 8), bool), []

    def release(self, ix):
        self.released.append(ix)


@pytest.mark.parametrize("on_gpu, unified, shrinks", [(False, False, True), (True, False, False), (True, True, True)])
def test_the_page_engine_leaves_slotted_experts_out(layout, on_gpu, unified, shrinks):
    import dataclasses

    engine = FakeEngine()
    costs = dataclasses.replace(DEFAULT_COSTS, gpu_s_per_token_expert=1e-5, unified_memory=unified)
    filler = SlotFiller(FakeSlots(2, 8, [1, 1]), layout, costs, on_gpu=on_gpu, engine=engine)
    assert engine.budget == (9_000 if shrinks else 10_000)  # the slot buffer is 1000 bytes
    filler.on_verify(event(2, [[3, 4]] * 2 + [[3, 5]], 2))
    filler.on_draft([])
    assert engine.elsewhere is filler.in_slot and engine.elsewhere[:, 3].all()
    assert sorted(engine.released) == [(0, 3), (1, 3)]
