"""Expert slot cache (patches 0005-0007): same logits with the cache on, whatever it holds.

Reference logits come from a session without slots; the same tokens are then
decoded with a SlotCache whose slot counts and assignments are random and change
between decode steps. The split graph computes slot experts from the slot tensors
and the rest from the model's, so every difference would be a bug: with F32 (and
Q8_0) experts the CPU result is in fact bit-identical. `test_wrong_slot_content_*`
shows the comparison can fail: slots holding the wrong expert change the logits.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from moespac_gguf import MoespacError
from moespac_gguf.demo.synthetic import SUPPORTED_ARCHS, SyntheticSpec
from moespac_gguf.llama.abi import llama_cpp
from moespac_gguf.llama.session import Session
from moespac_gguf.llama.slots import SlotCache
from moespac_gguf.residency import pages

PROMPT = "hello world, the slot cache must not change a single logit of this prompt"
STEPS = (5, 17, 42, 99, 7, 230)
TOL = 1e-4


def reference(path, prompt_text=PROMPT, steps=STEPS, **kw):
    """Logits of the prompt (every row) and of each single-token step, without slots."""
    with Session(path, n_ctx=256, **kw) as s:
        toks = s.tokenize(prompt_text)
        out = [s.decode(toks, all_logits=True)]
        out += [s.decode([t]) for t in steps]
    return toks, out


def random_remap(cache: SlotCache, rng: np.random.Generator, p_evict: float = 0.5, p_fill: float = 0.7) -> None:
    """Evict some assigned experts, copy random unassigned experts into free slots, assign them."""
    for layer in cache.moe_layers:
        for e in range(cache.n_expert):
            if cache.slot_of(layer, e) is not None and rng.random() < p_evict:
                cache.evict(layer, e)
        taken = {cache.slot_of(layer, e) for e in range(cache.n_expert)} - {None}
        free_experts = [e for e in range(cache.n_expert) if cache.slot_of(layer, e) is None]
        rng.shuffle(free_experts)
        for slot in range(int(cache.n_slots[layer])):
            if slot in taken or not free_experts or rng.random() > p_fill:
                continue
            e = free_experts.pop()
            if cache.expert_in(layer, slot) != e:
                cache.copy_async(layer, e, slot)
            cache.assign(layer, e, slot)  # waits for the copy


def run_with_slots(path, toks, steps=STEPS, seed=0, slots=None, **kw):
    """The same decode as reference() with random slot counts and a new random assignment before each call."""
    rng = np.random.default_rng(seed)
    with Session(path, n_ctx=256, **kw) as s:
        n_expert = int(s.metadata(f"{s.metadata('general.architecture')}.expert_count"))
        counts = slots if slots is not None else rng.integers(1, n_expert + 1, size=s.n_layer)
        with SlotCache(s, counts) as cache:
            assert cache.moe_layers, "no MoE layer got slots"
            random_remap(cache, rng)
            out = [s.decode(toks, all_logits=True)]
            assert cache.graph_layers == len(cache.moe_layers), "the graph is not split in every MoE layer"
            for t in steps:
                random_remap(cache, rng)
                out.append(s.decode([t]))
            assert cache.copied_bytes > 0
    return out


def max_diff(a, b) -> float:
    return max(float(np.abs(x - y).max()) for x, y in zip(a, b))


@pytest.mark.parametrize("arch", SUPPORTED_ARCHS)
def test_slots_equal_logits_every_arch_f32(tiny_moe, arch):
    path = tiny_moe(arch=arch, n_layer=3)
    toks, ref = reference(path)
    for seed in (0, 1):
        got = run_with_slots(path, toks, seed=seed)
        assert max_diff(ref, got) <= TOL, f"{arch}: max abs diff {max_diff(ref, got)}"


@pytest.mark.parametrize("arch", ["qwen3moe", "llama", "deepseek2"])
@pytest.mark.parametrize("dtype", ["Q8_0", "F16", "Q4_0"])  # Q4_0: repacked (CPU_REPACK) on AVX2
def test_slots_same_greedy_tokens_quantized(tiny_moe, arch, dtype):
    path = tiny_moe(arch=arch, n_layer=3, expert_dtype=dtype)
    toks, ref = reference(path)
    got = run_with_slots(path, toks, seed=3)
    for r, g in zip(ref, got):
        assert (r.argmax(axis=1) == g.argmax(axis=1)).all()
    assert max_diff(ref, got) <= TOL  # in fact the same kernels on the same rows: bit-identical


def test_slots_every_expert_in_a_slot_and_none(tiny_moe):
    """All experts from slots (the model side computes nothing), then none (the slot side computes nothing)."""
    path = tiny_moe(n_layer=2)
    toks, ref = reference(path)
    with Session(path, n_ctx=256) as s, SlotCache(s, 8) as cache:
        for layer in cache.moe_layers:
            for e in range(8):
                cache.load(layer, e, 7 - e)
        got = [s.decode(toks, all_logits=True)]
        cache.clear()
        got += [s.decode([t]) for t in STEPS]
    assert max_diff(ref, got) <= TOL


@pytest.mark.parametrize("dtype", ["F32", "Q4_0"])
def test_wrong_slot_content_changes_logits(tiny_moe, dtype):
    """The check can fail: slots holding a neighbour's weights give other logits, the right ones the same."""
    path = tiny_moe(n_layer=2, expert_dtype=dtype)
    toks, ref = reference(path)
    with Session(path, n_ctx=256) as s, SlotCache(s, 8) as cache:
        layer = cache.moe_layers[-1]
        for e in range(8):
            cache.copy_async(layer, (e + 1) % 8, e)
        cache.wait()
        with pytest.raises(MoespacError, match="holds expert 1, not 0"):
            cache.assign(layer, 0, 0)
        for e in range(8):
            cache.assign(layer, e, e, unchecked=True)
        wrong = s.decode(toks, all_logits=True)
        assert np.abs(wrong - ref[0]).max() > 1e-2
        s.reset()
        cache.clear()
        for e in range(8):
            cache.load(layer, e, e)
        right = s.decode(toks, all_logits=True)
        assert np.abs(right - ref[0]).max() <= TOL


def test_slots_survive_batches_larger_than_n_batch_and_rollback(tiny_moe):
    path = tiny_moe(n_layer=2)
    with Session(path, n_ctx=256, n_batch=16) as s:
        toks = s.tokenize(PROMPT * 2)
        ref = s.decode(toks, all_logits=True)
    with Session(path, n_ctx=256, n_batch=16) as s, SlotCache(s, 3) as cache:
        rng = np.random.default_rng(5)
        random_remap(cache, rng, p_fill=1.0)
        got = s.decode(toks, all_logits=True)
        assert np.abs(got - ref).max() <= TOL
        s.rollback(10)
        random_remap(cache, rng, p_fill=1.0)
        again = s.decode(toks[10:], all_logits=True)
        assert np.abs(again - ref[10:]).max() <= TOL


def test_detach_and_close_restore_the_plain_graph(tiny_moe):
    path = tiny_moe(n_layer=2)
    toks, ref = reference(path)
    with Session(path, n_ctx=256) as s:
        cache = SlotCache(s, 2)
        cache.load(cache.moe_layers[0], 3, 1)
        a = s.decode(toks, all_logits=True)
        cache.close()
        s.reset()
        b = s.decode(toks, all_logits=True)
        cache2 = SlotCache(s, 4)  # attach again to a context that already built graphs
        cache2.load(cache2.moe_layers[-1], 5, 0)
        s.reset()
        c = s.decode(toks, all_logits=True)
        assert cache2.graph_layers == len(cache2.moe_layers)
        cache2.close()
    for x in (a, b, c):
        assert np.abs(x - ref[0]).max() <= TOL


# -- bad calls ---------------------------------------------------------------------


def test_bad_calls_raise_moespac_error(tiny_moe):
    spec = SyntheticSpec(arch="deepseek2", n_layer=3)  # layer 0 is dense
    path = tiny_moe(spec)
    with Session(path, n_ctx=128) as s:
        with pytest.raises(MoespacError, match="one slot count per layer"):
            SlotCache(s, [1, 2])
        with pytest.raises(MoespacError, match=">= 0"):
            SlotCache(s, [1, -1, 2])
        with SlotCache(s, 2) as cache:
            assert cache.moe_layers == [1, 2] and cache.n_slots[0] == 0
            with pytest.raises(MoespacError, match="layer 0 has no slots"):
                cache.copy_async(0, 0, 0)
            with pytest.raises(MoespacError, match="layer 7 has no slots"):
                cache.assign(7, 0, 0)
            with pytest.raises(MoespacError, match="expert 8 out of range 0..7"):
                cache.copy_async(1, 8, 0)
            with pytest.raises(MoespacError, match="expert -1 out of range"):
                cache.evict(1, -1)
            with pytest.raises(MoespacError, match="slot 2 out of range 0..1 of layer 1"):
                cache.copy_async(1, 0, 2)
            with pytest.raises(MoespacError, match="slot -1 out of range"):
                cache.assign(1, 0, -1)
            with pytest.raises(MoespacError, match="holds expert -1, not 3"):
                cache.assign(1, 3, 0)
            cache.load(1, 3, 0)
            with pytest.raises(MoespacError, match="slot 0 of layer 1 is assigned to expert 3; evict it first"):
                cache.copy_async(1, 4, 0)
            cache.evict(1, 3)
            cache.copy_async(1, 4, 0)
            cache.wait()
        with pytest.raises(MoespacError, match="closed"):
            cache.copy_async(1, 0, 0)


def test_dense_model_has_no_experts_for_slots(tiny_moe):
    path = tiny_moe(arch="llama", n_expert=0)
    with Session(path, n_ctx=128) as s:
        with pytest.raises(MoespacError, match="no experts"):
            SlotCache(s, 2)


class _MidGraphCopier:
    """A cb_eval chained behind the routing tap: during the graph, evict and copy into its slot."""

    name_prefixes = ()  # asked about every node

    def __init__(self, cache_ref: list, layer: int, slot: int):
        self.cache_ref, self.layer, self.slot = cache_ref, layer, slot
        self.errors: list[str] = []
        self.armed = False
        self.callback = llama_cpp.llama_cpp.ggml_backend_sched_eval_callback(self._cb)

    def _cb(self, t, ask, user_data):
        if ask and self.armed:
            self.armed = False
            cache = self.cache_ref[0]
            e = cache.expert_in(self.layer, self.slot)
            cache.evict(self.layer, e)  # the running graph still reads the slot
            try:
                cache.copy_async(self.layer, (e + 1) % cache.n_expert, self.slot)
            except MoespacError as err:
                self.errors.append(str(err))
        return False


def test_copy_into_a_slot_the_running_graph_reads_is_refused(tiny_moe):
    path = tiny_moe(n_layer=2)
    toks, ref = reference(path)
    cache_ref: list = []
    copier = _MidGraphCopier(cache_ref, layer=1, slot=0)
    with Session(path, n_ctx=256, capture=copier) as s, SlotCache(s, 2) as cache:
        cache_ref.append(cache)
        cache.load(1, 2, 0)
        copier.armed = True
        got = s.decode(toks, all_logits=True)
        assert copier.errors and "is read by the graph being computed" in copier.errors[0], copier.errors
        assert np.abs(got - ref[0]).max() <= TOL
        cache.copy_async(1, 5, 0)  # after the decode the slot is free again
        cache.wait()
        assert cache.expert_in(1, 0) == 5


# -- stress ------------------------------------------------------------------------


def _rss_bytes() -> int:
    return pages.status_bytes("VmRSS")


@pytest.mark.harness_needs("proc")  # RSS from /proc/self/status
def test_stress_1000_decodes_with_remaps_and_copies(tiny_moe):
    """1000 single-token decodes; between each, evictions, async copies that overlap the
    next decode, and assignments. No crash, logits spot-checked, RSS flat."""
    path = tiny_moe(n_layer=2, n_expert=16, n_expert_used=4)
    rng = np.random.default_rng(11)
    n_steps, window = 1000, 200
    toks = rng.integers(0, 256, size=window).tolist()
    with Session(path, n_ctx=256) as s:
        ref = [s.decode([t])[0] for t in toks]
    t0 = time.perf_counter()
    with Session(path, n_ctx=256) as s, SlotCache(s, 6) as cache:
        rss = {}
        worst = 0.0
        queued: list[tuple[int, int, int]] = []
        for step in range(n_steps):
            if step % window == 0:
                s.reset()
            if step == 100:
                rss["before"] = _rss_bytes()
            for layer, e, slot in queued:  # copies queued before the last decode: assign now
                cache.assign(layer, e, slot)
            queued = []
            for layer in cache.moe_layers:
                for e in np.flatnonzero(cache.assignment()[layer] >= 0):
                    if rng.random() < 0.3:
                        cache.evict(layer, int(e))
                used = set(cache.assignment()[layer]) - {-1}
                unassigned = [e for e in range(16) if cache.slot_of(layer, e) is None]
                for slot in range(6):
                    if slot not in used and unassigned and rng.random() < 0.5:
                        e = unassigned.pop(int(rng.integers(len(unassigned))))
                        cache.copy_async(layer, e, slot)  # runs while the next decode computes
                        queued.append((layer, e, slot))
            logits = s.decode([toks[step % window]])[0]
            worst = max(worst, float(np.abs(logits - ref[step % window]).max()))  # a slot read mid-copy shows here
        cache.wait()
        rss["after"] = _rss_bytes()
        copied = cache.copied_bytes
    elapsed = time.perf_counter() - t0
    print(
        f"stress: {n_steps} decodes in {elapsed:.1f} s, {copied / 2**20:.1f} MiB copied, "
        f"RSS {rss['before'] / 2**20:.1f} -> {rss['after'] / 2**20:.1f} MiB, max |logit diff| {worst:.3g}"
    )
    assert worst <= TOL
    assert copied > 0
    assert rss["after"] - rss["before"] < 8 * 2**20


# -- the demo model --------------------------------------------------------------------


def test_slots_on_the_demo_model():
    from moespac_gguf.demo.catalog import model_path

    try:
        path = model_path("smolmoe")
    except MoespacError:
        pytest.skip("demo model smolmoe not built (moespac models build smolmoe)")
    text = "The quick brown fox jumps over the lazy dog. Then"
    with Session(path, n_ctx=128) as s:
        toks = s.tokenize(text)
        ref = [s.decode(toks, all_logits=True)]
        greedy = []
        for _ in range(6):
            greedy.append(int(ref[-1][-1].argmax()))
            ref.append(s.decode([greedy[-1]]))
    got = run_with_slots(path, toks, steps=greedy, seed=4, slots=[4] * 30)
    for r, g in zip(ref, got):
        assert (r.argmax(axis=1) == g.argmax(axis=1)).all()
    assert max_diff(ref, got) <= TOL


def test_remapping_reuses_the_graph(tiny_moe):
    """The map is an input tensor: remaps between single-token decodes keep llama.cpp's graph reuse."""
    path = tiny_moe(n_layer=2)
    toks, ref = reference(path)
    with Session(path, n_ctx=256) as s, SlotCache(s, 4) as cache:
        rng = np.random.default_rng(2)
        s.decode(toks)
        s.decode([STEPS[0]])
        before = llama_cpp.llama_perf_context(s.ctx).n_reused
        got = []
        for t in STEPS[1:]:
            random_remap(cache, rng, p_fill=1.0)
            got.append(s.decode([t]))
        reused = llama_cpp.llama_perf_context(s.ctx).n_reused - before
    assert reused == len(STEPS) - 1, reused
    assert max_diff(ref[2:], got) <= TOL


@pytest.mark.parametrize("dtype", ["F32", "Q4_0"])
def test_one_slot_per_layer(tiny_moe, dtype):
    """A single slot is a 2-D tensor; repacked (Q4_0) slots get a spare so the repack kernel still takes them."""
    path = tiny_moe(n_layer=3, expert_dtype=dtype)
    toks, ref = reference(path)
    got = run_with_slots(path, toks, seed=6, slots=[1, 1, 1])
    assert max_diff(ref, got) <= TOL


def test_demand_page_in_skips_experts_in_slots(tiny_moe):
    """Demand page-in (patch 0003) reads the model-side ids at the expert matmuls: they must be
    computed by then (0007 builds them before the routing split), and slot experts never advised."""
    path = tiny_moe(n_layer=2)
    with Session(path, n_ctx=256) as s, SlotCache(s, 8) as cache:
        s.tap.set_demand_page_in(True)
        toks = s.tokenize(PROMPT)
        s.decode(toks[:8])
        before = s.tap.demand_paged_bytes
        assert before > 0  # nothing in slots: every routed expert is advised
        for layer in cache.moe_layers:
            for e in range(8):
                cache.load(layer, e, e)
        s.decode(toks[8:16])  # stale ids from the last decode would be advised here
        assert s.tap.demand_paged_bytes == before
