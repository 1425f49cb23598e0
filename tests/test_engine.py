"""Residency engine: real page-cache moves under a byte budget, and no effect on output."""

import os
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest

from moespac_gguf import MoeSpac, MoespacError
from moespac_gguf.api.options import DRAFT_AHEAD
from moespac_gguf.core.layout import read_layout
from moespac_gguf.demo.synthetic import SyntheticSpec
from moespac_gguf.llama.session import Session
from moespac_gguf.residency import pages
from moespac_gguf.residency.engine import ExpertMap, ResidencyEngine

# experts of 64 KiB (16 pages) each so page-granular residency is measurable
SPEC = SyntheticSpec(arch="qwen3moe", n_layer=3, n_embd=128, n_ff_exp=128, n_expert=8, seed=3)


@pytest.fixture()
def loaded(tiny_moe):
    path = tiny_moe(SPEC)
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)  # freshly written pages are dirty: nothing could evict them
    os.close(fd)
    with Session(path, n_ctx=128, tap=False) as s:
        yield read_layout(path), s


def test_expert_map_matches_layout_and_mapping(loaded):
    layout, s = loaded
    em = ExpertMap(layout, s.mappings())
    assert em.bytes.shape == (layout.n_layer, layout.n_expert)
    assert (em.bytes[[l.index for l in layout.layers]] == layout.layers[0].bytes_per_expert).all()
    off, n = em.ranges[0, 3][0]
    with open(layout.path, "rb") as f:
        f.seek(off)
        want = f.read(n)
    import ctypes

    assert ctypes.string_at(em.mapping.address(off), n) == want


@pytest.mark.harness_needs("populate", "evict")
def test_engine_converges_to_target_within_budget(loaded):
    layout, s = loaded
    em = ExpertMap(layout, s.mappings())
    per = int(em.bytes[0, 0])
    budget = 5 * per
    m = em.mapping
    pages.madvise(m.start, m.end - m.start, pages.MADV_POPULATE_READ)  # all mapped in: over the budget
    eng = ResidencyEngine(em, budget)
    try:
        assert eng.resident.all()
        eng.apply(np.zeros_like(eng.resident), np.zeros(eng.resident.shape))
        assert eng.wait_idle(10)
        assert em.resident().sum() <= 5, "resident experts beyond the budget must be evicted"
        pages.madvise(m.start, m.end - m.start, pages.MADV_PAGEOUT)  # start cold
        pages.drop_file_cache(layout.path)
        eng.resident[:] = em.resident()
        assert not eng.resident.any()
        want = np.zeros_like(eng.resident)
        want[0, :4] = want[1, :4] = True  # 8 wanted, room for 5
        priority = -np.arange(want.size, dtype=float).reshape(want.shape)  # layer 0 first, low ids first
        eng.apply(want, priority)
        assert eng.wait_idle(10)
        real = em.resident()
        assert real.sum() == 5 and real[0, :4].all() and real[1, 0] and not real[2].any()
        assert (real == eng.resident).all()
        assert int(em.bytes[real].sum()) <= budget
        # a new target: the least useful unwanted experts are evicted first to make room
        want2 = np.zeros_like(want)
        want2[2, :2] = True
        pr2 = np.zeros(want.shape)
        pr2[2, :2] = 10
        pr2[0, :4] = [5, 4, 3, 2]  # layer-1 expert 0 has priority 0: evicted first, then layer 0's least useful
        eng.apply(want2, pr2)
        assert eng.wait_idle(10)
        real = em.resident()
        assert real[2, :2].all() and not real[1, 0] and real[0, :2].all() and not real[0, 3]
        assert int(em.bytes[real].sum()) <= budget
        assert eng.stats.evicted_bytes >= 2 * per and eng.stats.prefetched_bytes >= 7 * per
    finally:
        eng.close()


def test_greedy_output_unchanged_with_residency_engine(tiny_moe):
    target, draft = tiny_moe(SPEC), tiny_moe(SyntheticSpec(arch="llama", n_expert=0, n_layer=2, seed=9))
    with MoeSpac(target, n_ctx=256) as plain:
        ref = plain.create_completion("the engine must not change the output", max_tokens=40)["choices"][0]["text"]
        ref_tokens = plain.completion_tokens
    layout = read_layout(target)
    budget = layout.other_bytes + (600 << 20)  # runtime memory included; experts get a little
    with MoeSpac(target, draft, n_ctx=256, mem_budget=budget) as m:
        out = m.create_completion("the engine must not change the output", max_tokens=40)
        assert m.completion_tokens == ref_tokens and out["choices"][0]["text"] == ref
        st = m.residency.engine.stats
        assert (st.kept if m.residency.keep_at_use else st.plans) > 0  # the tap kept, or the engine planned
        assert m.target.tap.demand_paged_bytes > 0


def test_budget_too_small_is_one_line(tiny_moe):
    r = subprocess.run(
        [sys.executable, "-m", "moespac_gguf.cli", "run", "-m", str(tiny_moe(SPEC)), "-p", "hi", "--mem-budget", "1M"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "too small" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    with pytest.raises(MoespacError, match="--mem-budget takes a size"):
        MoeSpac(tiny_moe(SPEC), mem_budget="lots")


@pytest.mark.harness_needs("evict")
def test_mincore_sees_pageout(loaded):
    layout, s = loaded
    em = ExpertMap(layout, s.mappings())
    off, n = em.ranges[1, 2][0]
    addr = em.mapping.address(off)
    pages.madvise(addr, n, pages.MADV_POPULATE_READ)
    assert pages.resident_fraction(addr, n) == 1.0
    pages.madvise(addr, n, pages.MADV_PAGEOUT)
    assert pages.resident_fraction(addr, n) < 0.5


def _locked_bytes() -> int:
    return pages.status_bytes("VmLck")


def _page_out_each(em: ExpertMap) -> np.ndarray:
    """MADV_PAGEOUT every expert; True where the kernel refused (EINVAL: locked pages)."""
    refused = np.zeros((em.n_layer, em.n_expert), bool)
    for (l, e), rs in em.ranges.items():
        for off, n in rs:
            try:
                pages.madvise(em.mapping.address(off), n, pages.MADV_PAGEOUT)
            except OSError:
                refused[l, e] = True
    return refused


@pytest.mark.harness_needs("proc")
def test_pinned_engine_locks_exactly_the_plan(loaded):
    """Pin mode: held experts are mlocked (reclaim cannot take them: PAGEOUT is refused and they
    stay resident), evicted ones are unlocked, and the locked bytes follow the plan."""
    layout, s = loaded
    em = ExpertMap(layout, s.mappings())
    per = int(em.bytes[0, 0])
    m = em.mapping
    base = _locked_bytes()
    eng = ResidencyEngine(em, 3 * per, pin=True)
    try:
        assert not eng.resident.any()
        want = np.zeros((em.n_layer, em.n_expert), bool)
        want[0, [1, 5]] = want[2, 7] = True
        eng.apply(want, want.astype(float))
        assert eng.wait_idle(10)
        assert (eng.resident == want).all()
        # page granularity: each of an expert's ranges may lock a partial page at either end
        slack = 2 * pages.PAGE * len(em.ranges[0, 0])
        assert 3 * per <= _locked_bytes() - base <= 3 * (per + slack)
        refused = _page_out_each(em)
        real = em.resident()
        assert real[want].all() and refused[want].all()  # (unlocked neighbours sharing a large
        # folio with a locked expert may stay too: the kernel does not split locked folios)
        want2 = np.zeros_like(want)
        want2[1, 0] = True
        eng.apply(want2, want2.astype(float))
        assert eng.wait_idle(10)
        # eviction is lazy (only for room): one old expert made way, unlocked (PAGEOUT allowed again)
        assert 3 * per - 2 * slack <= _locked_bytes() - base <= 3 * (per + slack)
        assert eng.resident[1, 0] and eng.resident.sum() == 3
        gone = want & ~eng.resident
        assert gone.sum() == 1
        assert _page_out_each(em)[eng.resident].all()
    finally:
        eng.close()
        for rs in em.ranges.values():
            for off, n in rs:
                pages.munlock(m.address(off), n)


@pytest.mark.parametrize("pin", [True, False])
def test_engine_fetches_and_evicts_with_what_the_platform_has(loaded, pin):
    """The engine through a plan that needs evictions, with only the operations the platform
    table has (make test runs this with macOS's too: no PAGEOUT, POPULATE_READ or fadvise; a call
    to one of them stops the worker and the next apply() raises it)."""
    layout, s = loaded
    em = ExpertMap(layout, s.mappings())
    per = int(em.bytes[0, 0])
    eng = ResidencyEngine(em, 3 * per, pin=pin)
    try:
        eng.resident[:] = False  # unpinned, it starts from mincore's view: the test's plans decide
        for layer in (0, 1, 2, 0):
            want = np.zeros((em.n_layer, em.n_expert), bool)
            want[layer, :3] = True
            eng.apply(want, want.astype(float))
            assert eng.wait_idle(10) and eng.error is None
            assert (eng.resident == want).all()
        assert eng.stats.evictions >= 9 and eng.stats.prefetches >= 12
        eng.apply(want, want.astype(float))  # and the next plan is accepted: nothing stopped the worker
    finally:
        eng.close()
        if pin:
            for rs in em.ranges.values():
                for off, n in rs:
                    pages.munlock(em.mapping.address(off), n)


@pytest.mark.harness_needs("populate", "evict")
def test_hint_reads_ahead_without_holding(loaded):
    """engine.hint: predicted experts not held are read into the page cache (asynchronously), not
    locked and not added to the held set; held experts are skipped."""
    import time

    layout, s = loaded
    em = ExpertMap(layout, s.mappings())
    per = int(em.bytes[0, 0])
    m = em.mapping
    pages.madvise(m.start, m.end - m.start, pages.MADV_PAGEOUT)
    pages.drop_file_cache(layout.path)
    base = _locked_bytes()
    eng = ResidencyEngine(em, 2 * per, pin=True)
    try:
        eng.resident[0, 0] = True  # pretend held: must be skipped
        want = np.zeros((em.n_layer, em.n_expert), bool)
        want[0, 0] = want[1, 3] = want[2, 6] = True
        assert not em.resident()[1, 3] and not em.resident()[2, 6]
        eng.hint(want, want.astype(float))
        assert eng.stats.hinted_bytes == 2 * per
        deadline = time.time() + 5
        while time.time() < deadline and not (em.resident()[1, 3] and em.resident()[2, 6]):
            time.sleep(0.05)
        real = em.resident()
        assert real[1, 3] and real[2, 6]
        assert _locked_bytes() == base and eng.resident.sum() == 1
    finally:
        eng.close()


@pytest.mark.harness_needs("unlock")
def test_other_ranges_lie_inside_the_mapping_and_miss_every_expert(loaded):
    """The fixed weights the pinned engine locks: inside llama.cpp's mapping (which starts past the
    header), disjoint from every expert's bytes, and together with them the whole mapping."""
    layout, s = loaded
    em = ExpertMap(layout, s.mappings())
    m = em.mapping
    lo, hi = m.offset, min(layout.file_bytes, m.offset + m.end - m.start)
    other = em.other_ranges()
    assert other and all(lo <= off and off + n <= hi for off, n in other)
    experts = [r for rs in em.ranges.values() for r in rs]
    covered = sorted(other + experts)
    assert all(a[0] + a[1] <= b[0] for a, b in zip(covered, covered[1:])), "overlap"
    assert covered[0][0] == lo and covered[-1][0] + covered[-1][1] == hi
    assert sum(n for _, n in covered) == hi - lo
    assert pages.mlock_ranges([(m.address(off), n) for off, n in other])
    for off, n in other:
        pages.munlock(m.address(off), n)


@pytest.mark.harness_needs("populate", "evict")
def test_eviction_reaches_pages_a_second_mapping_shares(loaded):
    """A self-draft maps the model file a second time. MADV_PAGEOUT skips a page another mapping
    shares, so the engine unmaps the expert there first: evicted means gone from RAM."""
    layout, s = loaded
    with Session(layout.path, n_ctx=128, tap=False) as second:
        em = ExpertMap(layout, s.mappings(), second.mappings())
        assert len(em.other_mappings) == 1

        def touch(ix):
            for m in (em.mapping, *em.other_mappings):
                for off, n in em.ranges[ix]:
                    pages.madvise(m.address(off), n, pages.MADV_POPULATE_READ)

        touch((1, 2))
        for off, n in em.ranges[1, 2]:  # the control: PAGEOUT through one mapping alone
            pages.madvise(em.mapping.address(off), n, pages.MADV_PAGEOUT)
        assert em.resident()[1, 2], "PAGEOUT evicted a shared page: the DONTNEED step would be untested"
        eng = ResidencyEngine(em, 8 * int(em.bytes[0, 0]))
        try:
            touch((1, 2))
            touch((2, 5))
            eng._evict((1, 2))
            real = em.resident()
            assert not real[1, 2] and real[2, 5]
        finally:
            eng.close()


@pytest.mark.harness_needs("populate", "evict", "proc")
def test_adopting_the_taps_eviction_pages_the_victim_out(loaded):
    """Keep at use: the routing tap only unlocks its victim; the engine's adopt must then page it
    out (from the self-draft's mapping too), as a planned eviction does, or under a cap the
    kernel finds the just-touched pages too late (OOM kills in session 16's runs)."""
    layout, s = loaded
    with Session(layout.path, n_ctx=128, tap=False) as second:
        em = ExpertMap(layout, s.mappings(), second.mappings())
        eng = ResidencyEngine(em, 8 * int(em.bytes[0, 0]), pin=True)
        victim, kept = (1, 2), (2, 5)
        try:
            for ix in (victim, kept):  # what the tap did: the matmul read them, then it locked them
                for m in (em.mapping, *em.other_mappings):
                    for off, n in em.ranges[ix]:
                        pages.madvise(m.address(off), n, pages.MADV_POPULATE_READ)
                assert pages.mlock_ranges([(em.mapping.address(off), n) for off, n in em.ranges[ix]])
            for off, n in em.ranges[victim]:  # then it replaced the victim: unlocked, still in RAM
                pages.munlock(em.mapping.address(off), n)
            eng.resident[victim] = True
            eng.adopt(np.array([kept[0] * em.n_expert + kept[1]]), np.array([victim[0] * em.n_expert + victim[1]]))
            assert eng.resident[kept] and not eng.resident[victim]
            real = em.resident()
            assert not real[victim] and real[kept]
            assert eng.stats.evictions == 1 and eng.stats.kept == 1
        finally:
            eng.close()
            for off, n in em.ranges[kept]:
                pages.munlock(em.mapping.address(off), n)


def test_self_draft_keeps_greedy_output_and_shares_the_targets_file(tiny_moe):
    """-md self: the target routing one expert per token drafts for itself. Greedy output stays
    the target's own; the draft maps the same file (no weights of its own to budget), routes one
    expert per token and pages its experts in whole, as the target does."""
    target = tiny_moe(SPEC)
    prompt = "the draft is the target with fewer experts"
    with MoeSpac(target, n_ctx=256) as plain:
        plain.create_completion(prompt, max_tokens=40)
        ref = plain.completion_tokens
    layout = read_layout(target)
    with MoeSpac(
        target,
        "self",
        n_ctx=256,
        draft_max=4,
        adaptive_draft=False,
        mem_budget=layout.other_bytes + (600 << 20),
        draft_ahead=DRAFT_AHEAD,
    ) as m:
        m.create_completion(prompt, max_tokens=40)
        assert m.completion_tokens == ref
        assert m.stats.n_drafted > 0 and m.stats.n_accepted > 0
        assert m.draft.path == m.target.path and len(m.draft.mappings()) == len(m.target.mappings()) == 1
        assert m.draft.tap.k == 1 and m.draft.last_routing.experts.shape[2] == 1
        assert m.draft.tap.demand_paged_bytes > 0
        assert len(m.residency.map.other_mappings) == 1
        assert m.decoder.draft_ahead == DRAFT_AHEAD and m.residency.lookahead  # the draft ran ahead
        assert m.residency.holds_every_expert  # asked for: it runs ahead even so
    with MoeSpac(
        target, "self", n_ctx=256, draft_max=4, adaptive_draft=False, mem_budget=layout.other_bytes + (600 << 20)
    ) as m:
        assert m.decoder.draft_ahead == 0  # by default not where every expert fits
        m.create_completion(prompt, max_tokens=40)
        assert m.completion_tokens == ref and m.stats.n_drafted > 0
        assert not m.residency.lookahead  # no draft routing reached the engine either
    with pytest.raises(MoespacError, match="-md self needs a target that routes more than 1"):
        MoeSpac(tiny_moe(SPEC, n_expert_used=1), "self")
    with pytest.raises(MoespacError, match="--draft-ahead .* needs -md self and --mem-budget"):
        MoeSpac(target, "self", draft_ahead=2)
    with pytest.raises(MoespacError, match="--draft-ahead must be 0 or more"):
        MoeSpac(target, "self", draft_ahead=-1)


def test_self_draft_running_ahead_samples_within_the_vocabulary(tiny_moe):
    """Sampling with a self-draft running ahead of its proposals (its run is not carried over:
    its tokens past the proposals are greedy, not drawn) completes with vocabulary ids. Not
    reproducible per seed: the restricted draft's picks, hence its proposals, depend on what the
    asynchronous engine holds at that moment; the acceptance rule keeps the target's distribution."""
    target = tiny_moe(SPEC)
    budget = read_layout(target).other_bytes + (600 << 20)
    with MoeSpac(target, "self", n_ctx=256, draft_max=2, mem_budget=budget, seed=7, draft_ahead=DRAFT_AHEAD) as m:
        m.create_completion("sample while the draft runs ahead", max_tokens=24, temperature=0.9)
        assert m.completion_tokens and m.stats.n_drafted > 0 and m.residency.lookahead
        assert all(0 <= t < m.target.n_vocab for t in m.completion_tokens)


def test_batch_sizes_under_a_budget_prefill_in_fewer_passes_and_draft_small():
    from moespac_gguf.api.moespac import DRAFT_BATCH, PREFILL_BATCH, batch_sizes

    assert batch_sizes(None, 2048, budgeted=False) == (512, 512)
    assert batch_sizes(128, 2048, budgeted=False) == (128, 128)
    assert batch_sizes(None, 4096, budgeted=True) == (PREFILL_BATCH, DRAFT_BATCH) == (1024, 64)
    assert batch_sizes(None, 256, budgeted=True) == (256, 64)  # within the context
    assert batch_sizes(32, 2048, budgeted=True) == (32, 32)  # -b wins, the draft never exceeds it


def test_engine_costs_come_from_the_calibration_or_a_one_line_error(tmp_path, monkeypatch):
    from moespac_gguf.residency import costs as engine  # the engine's costs

    path = tmp_path / "calibration.json"
    monkeypatch.setattr(engine, "CALIBRATION_PATH", path)
    assert engine.load_costs() == engine.DEFAULT_COSTS  # not calibrated yet
    path.write_text(
        '{"flash_read_bps": 5e8, "memcpy_bps": 9e9, "mem_bps": 2e10, '
        '"cpu_s_per_token_expert": 3e-4, "page_in_latency_s": 1e-4}'
    )
    costs = engine.load_costs()
    assert (costs.flash_read_bps, costs.memcpy_bps, costs.cpu_s_per_token_expert) == (5e8, 9e9, 3e-4)
    path.write_text('{"flash_read_bps": 5e8}')
    with pytest.raises(MoespacError, match="not a calibration profile"):
        engine.load_costs()


def test_a_controller_knows_when_its_budget_holds_every_expert(tiny_moe):
    from moespac_gguf.residency.controller import ResidencyController

    path = tiny_moe(SPEC)
    layout = read_layout(path)
    with Session(path, n_ctx=256, tap=False) as s:  # the controller works on llama.cpp's mapping
        n_all = len(layout.layers) * layout.n_expert
        for experts, fits in ((n_all, True), (n_all - 1, False)):
            budget = int(experts * layout.mean_bytes_per_expert) + 1
            c = ResidencyController(layout, budget, pin=False, mappings=s.mappings())
            try:
                assert c.holds_every_expert is fits
            finally:
                c.close()


def test_llama_cpp_reports_the_mapping_proc_maps_shows(loaded):
    """Where llama.cpp says it mapped the model (patch 0013) is what the kernel shows in
    /proc/self/maps: the same ranges at the same file offsets, for a second load too (llama.cpp's
    last fragment ends with the file, the kernel's at the next page)."""
    layout, s = loaded
    if not pages.PLATFORM.can("proc"):
        pytest.skip("no /proc on this platform table")
    with Session(layout.path, n_ctx=128, tap=False) as second:
        reported = sorted(s.mappings() + second.mappings(), key=lambda m: m.start)
        paged = [replace(m, end=-(-m.end // pages.PAGE) * pages.PAGE) for m in reported]
        assert paged == sorted(pages.find_mappings(layout.path), key=lambda m: m.start)
        assert reported[0].offset > 0  # llama.cpp unmapped the header: the mapping starts inside the file
