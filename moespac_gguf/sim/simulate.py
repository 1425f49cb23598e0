"""Trace-driven simulator: replay routing through a residency policy on a modeled device.

Windows. The decode tokens of each sequence are cut, in order, into verification windows: a window
produces the next a + 1 tokens, where a = min(K, accepted drafts) and each drafted token is accepted
with probability A independently until the first rejection (a truncated geometric; numpy
default_rng(seed)). K = 0 gives one token per window. The target verifies K + 1 rows whatever it
accepts: the rows of the drafts it rejects are not in a trace, so the trace's next tokens stand in
for them (a window feeds min(K + 1, tokens left in the sequence) rows). Windows never span two
sequences; the policy's state carries over. A window needs, per layer, the union of its rows'
experts; each needed (layer, expert) is one access: a hit if the policy serves it from fast memory,
otherwise one miss, loaded once however many of the window's rows use it.

Prefill. Where the trace holds a sequence's prompt rows (`moespac trace` records them), the policy
first sees them as one uncounted window, the prompt's single batch: the runtime observes that routing
before the first decode step, and the page cache holds what the prefill read last. Only decode
windows are counted and timed, as the benchmark meters decode apart from the prefills. (Belady
minimizes the loads of every window; a prefill window needs every expert a full cache could hold, so
its own loads do not depend on the choice and the bound holds for the decode windows.)

Device model, per window (b = bytes of one expert, O = all other weights, n = needed experts):
    compute = (O + n b) / mem_bps + step_overhead_s   memory-bound decode: weights streamed once per pass
              (on `local`: n x the measured cpu_s_per_token_expert + step_overhead_s)
    draft   = K draft_s                                draft_s: step_overhead_s (a tiny draft) or measured;
                                                       running N ahead, the draft's decodes (draft_decodes)
    load    = b / flash_read_bps + page_in_latency_s   one expert from the slow tier in one read (paging "bulk")
              b / 4 KiB x fault_s_per_page             or by 4 KiB page faults (paging "fault": mmap
                                                       without read-ahead, llama.cpp's with MADV_RANDOM)
    time    = compute + draft + misses x load + max(0, prefetches x load - io_overlap x (compute + draft))
Misses stall the pass; prefetches (experts fetched before the window) overlap the draft and the
compute, and only their excess stalls — unless the decode threads take every core (io_overlap 0:
`local` on this 2-core machine, where the kernel's paging work runs on the cores that compute).
tokens/s = tokens / total time; bytes moved = (misses + prefetches) x b. Free and reported apart: a policy's first resident set (its preload at model load)
and, with a profile trace, an uncounted warm-up pass over it (an earlier conversation), so that a
short trace is not dominated by cold misses; without a profile every cache starts cold (then warms on
the first prompt's prefill, where the trace has one).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..core.errors import MoespacError
from ..core.routing import used_experts
from ..core.units import format_size
from ..residency.baselines import Belady, Lru, OnDemand, Spac, Static, StaticLayers
from ..residency.policy import POLICIES, Capacity, MoeSpacPolicy, Policy, first_uses
from .profiles import Device, ModelSpec, names
from .trace import PROMPT, RoutingTrace, open_trace

MODEL_BY_ARCH = {"mixtral": "mixtral-8x7b"}  # default --model for imported traces


@dataclass
class Replay:
    """What a policy did on each window: all the device model needs."""

    tokens: np.ndarray  # int [W]: tokens the window produced
    needed: np.ndarray  # int [W]: distinct (layer, expert) it used
    hits: np.ndarray  # int [W]: of those, served from fast memory
    prefetched: np.ndarray  # int [W]: experts loaded before it ran
    preloaded: int  # experts resident when the counted windows start (preload, warm-up)

    def bytes_per_token(self, expert_bytes: float) -> float:
        """Bytes moved per token produced: (misses + prefetches) x expert bytes."""
        moved = (self.needed - self.hits + self.prefetched).sum()
        return float(moved * expert_bytes / self.tokens.sum())


@dataclass
class SimResult:
    """One run, as `moespac sim --json` prints it (bytes in B, times in s)."""

    trace: str
    policy: str
    device: str
    model: str
    quant: str
    draft_k: float
    acceptance: float
    paging: str
    pinned: bool  # misses stream through, not kept for free (the pinned engine)
    stream_window: int  # experts the unlocked window beside a pinned policy keeps
    n_tokens: int
    n_windows: int
    capacity_experts: int
    cache_per_layer: int | None
    budget_bytes: float
    hit_rate: float
    bytes_per_token: float
    prefetch_bytes_per_token: float
    stall_s_per_token: float
    tokens_per_s: float
    preload_bytes: float  # resident when the counted windows start: free (model load, warm-up)


def load_trace(path) -> RoutingTrace:
    """A saved trace or a Mixtral JSONL (imported on the fly); its prompt rows become prefill windows."""
    trace = open_trace(path)
    if not (trace.phase != PROMPT).any():
        raise MoespacError(f"{path} has no decode tokens to replay")
    return trace


def make_windows(trace: RoutingTrace, draft_k: float, acceptance: float, seed: int = 0) -> list[tuple[int, int, int]]:
    """(start, end, fed) of each window: it produces tokens [start, end) and the target computes rows
    [start, fed), end <= fed (module docstring). A sequence's prompt rows are one prefill window that
    produces nothing (end == start). A fractional `draft_k` is a mean, as adaptive drafting gives: each
    window drafts floor(K) or floor(K) + 1 tokens (the latter with probability frac(K))."""
    if draft_k < 0 or not 0.0 <= acceptance <= 1.0:
        raise MoespacError(f"need --draft-k >= 0 and 0 <= --acceptance <= 1, got {draft_k} and {acceptance}")
    rng = np.random.default_rng(seed)
    whole, frac = int(draft_k), draft_k - int(draft_k)
    breaks = (
        np.flatnonzero((np.diff(trace.sequence) != 0) | (np.diff(trace.positions) != 1) | (np.diff(trace.phase) != 0))
        + 1
    )
    windows = []
    for start, end in zip(np.r_[0, breaks], np.r_[breaks, trace.n_tokens]):
        if trace.phase[start] == PROMPT:
            windows.append((int(start), int(start), int(end)))
            continue
        while start < end:
            k = whole + int(rng.random() < frac) if frac else whole
            accepted = k if acceptance == 1.0 else min(k, int(rng.geometric(1.0 - acceptance)) - 1)
            windows.append((int(start), int(min(end, start + accepted + 1)), int(min(end, start + k + 1))))
            start = windows[-1][1]
    return windows


def warmup_of(profile: RoutingTrace | None, draft_k: float, acceptance: float, seed: int):
    """The uncounted warm-up pass over a profile trace: (trace, windows), or None without one."""
    return None if profile is None else (profile, make_windows(profile, draft_k, acceptance, seed + 1))


def window_needs(trace: RoutingTrace, windows) -> np.ndarray:
    """bool [W, L, E]: the experts each window uses (Belady's future)."""
    return np.stack([used_experts(trace.experts[:, a:fed], trace.n_expert) for a, _, fed in windows])


def make_policy(
    name: str,
    trace: RoutingTrace,
    windows,
    device: Device,
    expert_bytes: float,
    profile: RoutingTrace | None = None,
    pinned: bool = False,
) -> Policy:
    """A fresh policy; `static` needs the profile trace, `belady` the windows' future; `pinned`:
    moespac as the pinned engine runs it (a miss streams through; the tap keeps at use), and
    moespac-old as it ran before (a kept miss is a fetch)."""
    if name == "static":
        if profile is None:
            raise MoespacError("policy static needs --profile TRACE: a DIFFERENT trace of the same model")
        return Static(profile.usage_counts())
    simple = {"ondemand": OnDemand, "lru": Lru, "static-layers": StaticLayers, "spac": Spac}
    if name in simple:
        return simple[name]()
    if name == "lru-global":
        return Lru(per_layer=False)
    if name == "moespac":
        # pinned, the routing tap keeps at use what a page cache would keep (residency.keep)
        return MoeSpacPolicy(device.costs(expert_bytes), expert_bytes, keep_used=not pinned, keep_at_use=pinned)
    if name == "moespac-old":  # before issue 24, for side-by-side tables (bench/policy_table.py)
        old = MoeSpacPolicy(device.costs(expert_bytes), expert_bytes, keep_used=not pinned, reuse=False)
        old.name = "moespac-old"
        return old
    if name == "belady":
        return Belady(window_needs(trace, windows))
    raise MoespacError(f"unknown policy {name!r} (choose from {', '.join((*POLICIES, 'moespac-old'))})")


def replay(
    trace: RoutingTrace,
    windows,
    policy: Policy,
    capacity: Capacity,
    warmup: tuple[RoutingTrace, list] | None = None,
    stream_window: int = 0,
    ahead: list[np.ndarray | None] | None = None,
) -> Replay:
    """Run `policy` over the windows, after an uncounted pass over `warmup` (trace, windows) if given.
    Belady skips the warm-up: its free optimal preload already beats any warm state.
    `stream_window`: experts the unlocked window beside a pinned policy holds (StreamWindow).
    `ahead`: per window, a draft's routing of the rows ahead (draft_replay.self_draft_rows)."""
    policy.reset(trace.n_layer, trace.n_expert, capacity)
    window = StreamWindow(stream_window)
    if warmup is not None and not isinstance(policy, Belady):
        _run(*warmup, policy, capacity, window)
    preloaded = int(policy.resident.sum())
    return Replay(*_run(trace, windows, policy, capacity, window, ahead), preloaded=preloaded)


class StreamWindow:
    """The unlocked page cache beside a pinned policy: experts read on demand stay there, least
    recently streamed first out, until `size` newer ones push them out (the engine's stream window).
    A need it still holds, and a fetch of an expert it holds, read nothing."""

    def __init__(self, size: int):
        self.size, self.order = size, OrderedDict()

    def holds(self, shape) -> np.ndarray:
        mask = np.zeros(shape, dtype=bool)
        for key in self.order:
            mask[key] = True
        return mask

    def release(self, held: np.ndarray) -> None:
        """Experts the policy now holds (bool [L, E]) are pinned: no longer the window's."""
        for key in [k for k in self.order if held[k]]:
            del self.order[key]

    def stream(self, experts: np.ndarray, streamed: np.ndarray, held: np.ndarray) -> None:
        """The window ran: `streamed` (bool [L, E]) went through in layer order, first use within a
        layer; what the policy now holds is pinned, no longer the window's."""
        for key in first_uses(experts):
            if streamed[key]:
                self.order.pop(key, None)
                self.order[key] = None
        self.release(held)
        while len(self.order) > self.size:
            self.order.popitem(last=False)


def _run(
    trace: RoutingTrace,
    windows,
    policy: Policy,
    capacity: Capacity,
    window: StreamWindow | None = None,
    ahead: list[np.ndarray | None] | None = None,
) -> np.ndarray:
    """int [4, W]: tokens, needed, hits, prefetched per decode window (prefill windows run uncounted);
    checks the policy never holds more than it may nor keeps an expert it neither wanted nor used
    (that would be a free load). Hits and prefetches count what the stream window (if any) already
    held as free."""
    window = window or StreamWindow(0)
    counts = np.zeros((4, len(windows)), dtype=np.int64)
    for w, (a, b, fed) in enumerate(windows):
        kept = policy.resident.copy()
        tokens, experts = trace.tokens[a:fed], trace.experts[:, a:fed]
        prefill = b == a  # produces no token
        drafted = tokens[:0] if prefill else tokens[1:]  # the rows after the last committed token
        in_window = window.holds(kept.shape)  # what the unlocked cache holds when the plan is made
        want = policy.before_window(
            drafted if len(drafted) and (drafted >= 0).all() else None, None if ahead is None else ahead[w]
        )
        window.release(want)  # pinned now, it leaves the window's LRU (and its room) at once
        used = used_experts(experts, trace.n_expert)
        hits = policy.access(tokens, experts, prefill=prefill)
        if (
            want.sum() > capacity.total
            or policy.resident.sum() > capacity.total
            or (hits & ~(used & want)).any()
            or (policy.resident & ~(want | used)).any()
        ):
            raise RuntimeError(f"policy {policy.name} broke the residency rules at window {w}")
        # what it wanted was a hit anyway, so the window as it was before the plan serves the rest
        counts[:, w] = b - a, used.sum(), (hits | (used & in_window)).sum(), (want & ~kept & ~in_window).sum()
        window.stream(experts, used & ~hits, policy.resident)
    return counts[:, counts[0] > 0]


def draft_decodes(windows, draft_k: float, acceptance: float, draft_ahead: int = 0) -> float | np.ndarray:
    """The draft's decodes per decode window: K (a mean) without a lookahead. Running N ahead
    (SpeculativeDecoder._propose and _carry_over), max(k, N) rows, unless the last window accepted
    all its drafts and the draft's next token too (chance A): then its run carries over and it decodes
    only as many rows as that window produced. Expected values, so the time does not depend on a draw."""
    if not draft_ahead:
        return draft_k
    out, carried = [], None  # carried: rows the last window consumed, if it accepted every draft
    for a, b, fed in windows:
        if a == b:
            carried = None
            continue
        fresh = max(fed - a - 1, draft_ahead)
        out.append(fresh if carried is None else acceptance * carried + (1 - acceptance) * fresh)
        carried = b - a if b == fed else None
    return np.array(out, dtype=np.float64)


def timing(
    rep: Replay,
    device: Device,
    expert_bytes: float,
    other_bytes: float,
    draft_decodes: float | np.ndarray,
    paging: str = "bulk",
) -> dict:
    """Modeled seconds and bytes (module docstring) summed over the windows; `draft_decodes`: the
    draft's per window (draft_decodes())."""
    compute = device.pass_s(rep.needed, expert_bytes, other_bytes)
    draft = draft_decodes * device.draft_s
    load = device.load_s(expert_bytes, paging)
    misses = rep.needed - rep.hits
    stall = misses * load + np.maximum(0.0, rep.prefetched * load - device.io_overlap * (compute + draft))
    n_tokens = int(rep.tokens.sum())
    return {
        "hit_rate": float(rep.hits.sum() / max(1, rep.needed.sum())),
        "bytes_per_token": rep.bytes_per_token(expert_bytes),
        "prefetch_bytes_per_token": float(rep.prefetched.sum() * expert_bytes / n_tokens),
        "stall_s_per_token": float(stall.sum() / n_tokens),
        "tokens_per_s": float(n_tokens / (compute + draft + stall).sum()),
        "preload_bytes": float(rep.preloaded * expert_bytes),
    }


def capacity_for(
    model: ModelSpec,
    other_bytes: float,
    expert_bytes: float,
    device: Device,
    cache_per_layer: int | None,
    mem_budget: float | None,
) -> tuple[Capacity, float]:
    """(capacity, budget bytes): N experts per layer, or what a byte budget (default: the device's
    memory) holds after the non-expert weights."""
    n_all = model.n_layer * model.n_expert
    if cache_per_layer is not None:
        if not 0 <= cache_per_layer <= model.n_expert:
            raise MoespacError(f"--cache-per-layer must be in 0..{model.n_expert}, got {cache_per_layer}")
        n = cache_per_layer * model.n_layer
        return Capacity(n, cache_per_layer), other_bytes + n * expert_bytes
    budget = device.mem_bytes if mem_budget is None else float(mem_budget)
    if budget < other_bytes:
        raise MoespacError(
            f"memory budget {format_size(budget)} is smaller than the {format_size(other_bytes)} "
            f"of {model.name}'s non-expert weights"
        )
    return Capacity(min(n_all, int((budget - other_bytes) // expert_bytes))), budget


def check_shape(model: ModelSpec, trace: RoutingTrace, path) -> None:
    if (model.n_layer, model.n_expert, model.top_k) != (trace.n_layer, trace.n_expert, trace.k):
        raise MoespacError(
            f"{path} routes {trace.n_layer} layers x top-{trace.k} of {trace.n_expert} experts, "
            f"but {model.name} has {model.n_layer} x top-{model.top_k} of {model.n_expert}"
        )


def simulate(
    trace: RoutingTrace,
    trace_name: str,
    policy: str,
    device: Device,
    model: ModelSpec,
    quant: str | None = None,
    cache_per_layer: int | None = None,
    mem_budget: float | None = None,
    draft_k: float = 0,
    acceptance: float = 0.7,
    profile: RoutingTrace | None = None,
    seed: int = 0,
    paging: str = "bulk",
    pinned: bool = False,
    stream_window: int = 0,
    draft_ahead: int = 0,
    self_draft: str | None = None,
) -> SimResult:
    """One policy on one device: the numbers `moespac sim` prints. `draft_ahead` N: the runtime's
    `-md self --draft-ahead N`, the self-draft of the GGUF file `self_draft` running N rows ahead of
    every window (draft_replay, restricted to the capacity's most used experts), its rows the
    policy's lookahead and its decodes timed."""
    if draft_ahead < 0:
        raise MoespacError(f"--draft-ahead must be 0 or more, got {draft_ahead}")
    if draft_ahead and not (self_draft and str(self_draft).endswith(".gguf")):
        raise MoespacError("--draft-ahead replays the model's self-draft: give the model as a .gguf file (--model)")
    check_shape(model, trace, trace_name)
    if device.calibrated_model and Path(device.calibrated_model).name != model.name:
        raise MoespacError(
            f"device local was calibrated on {device.calibrated_model}: simulate that model "
            f"(--model {device.calibrated_model}) or calibrate on {model.name}"
        )
    quant, expert_b, other_b = model.sizes(quant)
    capacity, budget = capacity_for(model, other_b, expert_b, device, cache_per_layer, mem_budget)
    windows = make_windows(trace, draft_k, acceptance, seed)
    device.load_s(expert_b, paging)  # one-line error for an unknown paging
    ahead = None
    if draft_ahead and policy == "moespac":  # the one policy that reads a lookahead; the rest are only timed
        from .draft_replay import self_draft_rows  # lazy: loads libllama, which only this replay needs

        ahead = self_draft_rows(trace, windows, self_draft, draft_ahead, restrict=capacity.total)
    rep = replay(
        trace,
        windows,
        make_policy(policy, trace, windows, device, expert_b, profile, pinned),
        capacity,
        warmup_of(profile, draft_k, acceptance, seed),
        stream_window,
        ahead,
    )
    return SimResult(
        trace_name,
        policy,
        device.name,
        model.name,
        quant,
        draft_k,
        acceptance,
        paging,
        pinned,
        stream_window,
        int(rep.tokens.sum()),
        len(rep.tokens),
        capacity.total,
        cache_per_layer,
        budget,
        **timing(rep, device, expert_b, other_b, draft_decodes(windows, draft_k, acceptance, draft_ahead), paging),
    )


def default_model(trace: RoutingTrace, path: str) -> str:
    """The model spec of a trace's architecture (Mixtral traces carry no file of their own)."""
    name = MODEL_BY_ARCH.get(trace.meta.get("arch", ""))
    if name is None:
        raise MoespacError(
            f"cannot tell the model of {path}: pass --model (one of {', '.join(names('models'))}, "
            "a model spec .toml or the .gguf file)"
        )
    return name
