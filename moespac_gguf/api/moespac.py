"""`MoeSpac`, the Python API, in the shape of `llama_cpp.Llama`.

Completions and chat completions come back as llama-cpp-python / OpenAI-shaped
dicts (or streams of chunks), with a `moespac` entry holding the run's stats.
"""

from __future__ import annotations

import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path

import numpy as np

from ..core.errors import MoespacError, RemoteDeviceLost
from ..core.gguf import n_vocab
from ..core.layout import read_layout
from ..core.units import format_size, parse_size
from ..decode.draft import SELF_DRAFT, DraftSource, draft_source
from ..decode.sampling import Sampler
from ..decode.speculative import SpeculativeDecoder, check_prompt
from ..decode.stats import DecodeStats
from ..gate.model import LookaheadGate
from ..gate.runtime import GatedResidency, GateTap
from ..llama.abi import set_verbose
from ..llama.capture import RouterCapture
from ..llama.chat import chat_tokens
from ..llama.devices import gpu_devices
from ..llama.rpc import add_servers, usable_devices
from ..llama.session import Session
from ..llama.slots import SlotCache
from ..residency.controller import ResidencyController, expert_budget
from ..residency.costs import load_costs
from ..residency.engine import ExpertMap
from ..residency.ilp import RUNTIME_GAP, BackgroundBalancer, solve
from ..residency.memory import AUTO, OFF, measured_budget, parse_budget, plan_memory
from ..residency.pages import anon_rss
from ..residency.platform import PLATFORM
from ..residency.remote import AllRemote, all_remote, remote_tier_pays
from ..residency.slots import SlotFiller, slot_counts
from .options import DRAFT_AHEAD, SAMPLING, ModelOptions, keeps_at_use
from .text import TextStream
from .turns import Turns
from .types import ChatCompletion, ChatCompletionChunk, Completion, CompletionChunk, MoespacStats, Usage

TIERS = ("flash", "ram", "pinned", "gpu")  # expert_tiers' codes: not in memory, in RAM, locked, in GPU memory
GPU_HEADROOM = 256 << 20  # GPU memory left free beyond 5% of the device (driver, allocator, growth)
PREFILL_BATCH = 1024  # the target's batch under a memory budget (batch_sizes)
DRAFT_BATCH = 64  # a draft's batch under a memory budget (batch_sizes)


def batch_sizes(n_batch: int | None, n_ctx: int, budgeted: bool) -> tuple[int, int]:
    """(target, draft) batch sizes. Without a budget both are llama.cpp's 512 (or `n_batch`).
    Under a budget the target prefills in batches of up to PREFILL_BATCH tokens (within `n_ctx`):
    every batch routes to nearly every expert, so each batch reads every unheld one again, and
    fewer batches read less. The bound is memory: without flash attention a batch's attention
    scores take n_ctx x batch x heads x 4 bytes of compute buffer. The draft's batches shrink to
    DRAFT_BATCH, because its reads cost nothing (a self-draft computes with held experts only; a
    separate draft's file is pinned) and a compute buffer is memory the experts could use
    (docs/design.md, "The page tier", has the measured sizes)."""
    if not budgeted:
        return (n_batch or 512,) * 2
    target = n_batch or min(n_ctx, PREFILL_BATCH)
    return target, min(target, DRAFT_BATCH)


def flash_attention(setting: str, drafted: bool) -> bool:
    """Whether the target uses flash attention: "auto" is llama.cpp's default without a draft and
    off with one (Session says why); "on" with a draft is refused rather than breaking exactness."""
    setting = str(setting).lower()
    if setting not in ("on", "off", "auto"):
        raise MoespacError(f"-fa/--flash-attn takes on, off or auto, not {setting!r}")
    if setting == "on" and drafted:
        raise MoespacError(
            "-fa on cannot verify a draft exactly (flash attention computes a batch differently from "
            "single tokens): use -fa auto or off with a draft"
        )
    return setting == "on" or (setting == "auto" and not drafted)


@dataclass
class _Request:
    """A checked request: what a generation needs, and the id, created and model of its responses."""

    tokens: list[int]
    max_tokens: int
    sampler: Sampler
    stops: list[str]
    cancel: Callable[[], bool] | None
    meta: dict


class MoeSpac:
    """A GGUF MoE target, optionally drafted by a small GGUF model of the same vocabulary
    or by itself routing fewer experts (`draft_model_path="self"`).

    Safe to share between threads: generations take turns, in the order they were asked for
    (a stream from its first chunk to its last, or until it is closed or dropped); tokenizing
    does not wait. A thread that starts a generation while its own stream is still open gets a
    MoespacError, not a deadlock."""

    def __init__(self, model_path: str | Path, draft_model_path: str | Path | DraftSource | None = None, **options):
        """`draft_model_path`: a GGUF of the same vocabulary, or "self" (the target routing fewer
        experts). `options`: the fields of api.options.ModelOptions (n_ctx, n_threads, n_batch,
        draft_max, adaptive_draft, draft_ahead, seed, mem_budget, gate, verbose), among them:
        `mem_budget`: "auto" (default: the residency engine runs only when the files do not fit
        in the memory available, with the budget residency.memory computes; `memory_plan` says
        what it measured and decided), bytes or "8G" (keep expert residency within it), or
        "off"/None (never).
        `gate`: a lookahead-gate sidecar (`moespac train-gate`) whose predictions of the next
        layers' experts, made inside each decode, join the engine's utility (needs `mem_budget`).
        `n_batch`: the target's batch (see `batch_sizes`).
        `draft_ahead`: tokens a self-draft drafts each step, beyond what it proposes if need be, so
        its routing of them tells the engine what the next steps need (default DRAFT_AHEAD with
        a self-draft under a budget that cannot hold every expert, else 0)."""
        self.options = opt = ModelOptions(**options)
        self._turns = Turns()
        self.prompt_tokens: list[int] = []  # the last request's, for `usage`
        self.completion_tokens: list[int] = []
        set_verbose(opt.verbose)
        self.model_path = str(model_path)
        self._draft_arg = draft_model_path  # for a reload (_reload_without)
        self.layout = read_layout(model_path)  # one-line errors for missing / non-GGUF / dense targets
        source = draft_source(draft_model_path) if draft_model_path is not None else None
        draft_bytes = Path(source.file).stat().st_size if source is not None and source.file else 0
        # decided before loading (batch sizes, taps and the draft's run-ahead depend on it); an auto
        # budget is measured again once the contexts exist (below)
        budget = parse_budget(opt.mem_budget)
        self.all_remote: AllRemote | None = None  # the prediction behind auto's choice, where it was asked
        if budget == AUTO and opt.rpc_endpoints and not gpu_devices() and self._send_every_layer(opt, draft_bytes):
            budget = OFF  # every layer on the servers: llama.cpp's placement (_rpc_placement)
        self.memory_plan = plan_memory(budget, self.layout, draft_bytes, opt.n_ctx)
        budgeted = self.memory_plan.engine
        self_draft = source is not None and source.shares_target
        if opt.gate is not None and not budgeted:
            raise MoespacError(
                "a lookahead gate steers the residency engine, which is off: "
                + ("the model fits in memory" if self.memory_plan.mode == AUTO else "give --mem-budget SIZE")
            )
        draft_ahead = opt.draft_ahead
        if draft_ahead is None:
            draft_ahead = DRAFT_AHEAD if self_draft and budgeted else 0
        if draft_ahead < 0:
            raise MoespacError(f"--draft-ahead must be 0 or more, got {draft_ahead}")
        if draft_ahead and not (self_draft and budgeted):
            raise MoespacError(
                f"--draft-ahead reads a self-draft's routing for the residency engine: it needs "
                f"-md {SELF_DRAFT} and --mem-budget"
            )
        lookahead_gate = LookaheadGate.load(opt.gate, model_path) if opt.gate is not None else None
        self.gate_tap = GateTap(lookahead_gate) if lookahead_gate is not None else None
        flash_attn = flash_attention(opt.flash_attn, drafted=source is not None)
        n_batch, draft_batch = batch_sizes(opt.n_batch, opt.n_ctx, budgeted=budgeted)
        rpc = opt.rpc_endpoints
        if rpc and budgeted and opt.n_cpu_moe is not None and opt.n_cpu_moe < self.layout.n_layer:
            raise MoespacError(
                "--rpc with the residency engine keeps every layer's expert tensors in host memory: drop --n-cpu-moe"
            )
        self.n_cpu_moe = opt.n_cpu_moe
        if rpc and opt.n_cpu_moe is None and not gpu_devices():
            step = 1 + opt.draft_max if source is not None else 1  # tokens a verification holds at most
            rpc, self.n_cpu_moe = self._rpc_placement(rpc, budgeted, step)
        n_gpu_layers = opt.n_gpu_layers if opt.n_gpu_layers is not None else -1 if gpu_devices() or rpc else 0
        gpu_budget = opt.gpu_budget
        if gpu_budget is not None:
            gpu_budget = parse_size(gpu_budget) if isinstance(gpu_budget, str) else int(gpu_budget)
            if gpu_budget < 0:
                raise MoespacError(f"--gpu-budget must be 0 or more, got {gpu_budget}")
        gpu_slots = n_gpu_layers != 0 and gpu_budget != 0
        devices = {"n_gpu_layers": n_gpu_layers, "main_gpu": opt.main_gpu, "rpc_servers": rpc}
        self.target = Session(
            model_path,
            n_ctx=opt.n_ctx,
            n_threads=opt.n_threads,
            n_batch=n_batch,
            capture=self.gate_tap,
            # the routing tap reads every MoE layer's choice back: over a link that splits the
            # server's graph per layer (~77 round trips a token instead of under one,
            # bench/rpc_tap_cost.py), for nothing when no engine or slot reads it
            tap=not (rpc and not budgeted and self.n_cpu_moe == 0),
            op_offload=not gpu_slots,  # the split's -1 ids must stay on the CPU (patches/0012)
            n_cpu_moe=self.n_cpu_moe,
            flash_attn=flash_attn,
            **devices,
        )
        self.draft = self.slots = self._page_map = None
        router = RouterCapture() if draft_ahead else None
        try:
            if source is not None:  # a self-draft's tap, with a budget, restricts its routing (below)
                self.draft = source.open(
                    self.layout,
                    n_ctx=opt.n_ctx,
                    n_threads=opt.n_threads,
                    n_batch=draft_batch,
                    tap=self_draft and budgeted,
                    capture=router,
                    **devices,
                )
            self.decoder = SpeculativeDecoder(
                self.target,
                self.draft,
                draft_max=opt.draft_max,
                adaptive=opt.adaptive_draft,
                draft_ahead=draft_ahead,
                draft_router=router,
            )
            self.residency = None
            if budgeted:
                mappings = self.target.mappings()
                draft_mappings = self.draft.mappings() if self.draft is not None else []
                mapped = mappings + draft_mappings
                self.memory_plan = measured_budget(self.memory_plan, anon_rss(mapped))
                self.residency = ResidencyController(
                    self.layout,
                    expert_budget(self.memory_plan.budget_bytes, self.layout, draft_bytes, mapped),
                    mappings=mappings,
                    draft_mappings=draft_mappings,
                    draft_path=source.file if source is not None else None,
                    draft_max=opt.draft_max,
                    keep_tap=self.target.tap if keeps_at_use(opt.keep_at_use, draft_ahead) else None,
                )
                self.decoder.subscribe(
                    self.residency
                    if lookahead_gate is None
                    else GatedResidency(self.residency, lookahead_gate, tap=self.gate_tap)
                )
                for s in (self.target, self.draft):
                    if s is not None and s.tap is not None:
                        s.tap.set_demand_page_in(True)
                if self_draft:  # the draft computes with held experts only: it reads nothing
                    self.draft.tap.restrict_to(self.residency.engine.resident)
                if router is not None and opt.draft_ahead is None and self.residency.holds_every_expert:
                    # nothing to choose between: running ahead, reading the routing, only cost time
                    self.decoder.stop_running_ahead()
                    self.draft.tap.chain(None)
            if self.target.gpu is not None:
                self.memory_plan = replace(self.memory_plan, gpu_free_bytes=self.target.gpu.memory()[0])
            if gpu_slots and self.target.slot_device is not None:
                self.slots = self._gpu_tier(gpu_budget, self.n_cpu_moe)
        except Exception:
            self.close()
            raise
        self.seed = opt.seed

    def _servers_hold(self, rpc: list[str]) -> bool:
        """Whether the RPC servers at `rpc` have room for the whole model (its file and a fifth more
        for the KV cache and compute buffers), free memory as they report it."""
        add_servers(rpc)
        free = sum(d.memory()[0] for d in usable_devices(rpc))
        return free >= 1.2 * Path(self.model_path).stat().st_size

    def _send_every_layer(self, opt: ModelOptions, draft_bytes: int) -> bool:
        """Whether an automatic budget sends every layer to the RPC servers (no engine here): only
        where they have room for the model (_servers_hold) and a decoded token is predicted faster
        there than on this machine alone, with the budget plan_memory gives here (residency.remote.
        all_remote, for the first server's link as `moespac calibrate --rpc` measured it, else the
        stated defaults; self.all_remote keeps the prediction), or where this machine cannot run
        the model at all. Otherwise the model runs here as the memory plan says, said on one line
        (with the engine, _rpc_placement may still give the server layers and expert slots)."""
        rpc = opt.rpc_endpoints
        if not self._servers_hold(rpc):
            return False
        try:
            plan = plan_memory(AUTO, self.layout, draft_bytes, opt.n_ctx)
            # before loading: the runtime counted is the interpreter's, so an upper bound of the engine's
            experts = expert_budget(plan.budget_bytes, self.layout, draft_bytes) if plan.engine else None
        except MoespacError:
            return True  # too little memory here for the model alone
        remote = load_costs(rpc=rpc[0])
        self.all_remote = all_remote(load_costs(), remote, self.layout, n_vocab(self.model_path), experts)
        if not self.all_remote.pays:
            print(
                f"moespac: over the link to the RPC server at {rpc[0]} ({remote.round_trip_s * 1e3:.2g} ms a round "
                f"trip, {remote.memcpy_bps * 8 / 1e6:.3g} Mbit/s) a token would take ~{self.all_remote.remote_s * 1e3:.0f} "
                f"ms with every layer there against ~{self.all_remote.local_s * 1e3:.0f} ms here: running on this machine"
                + (" with the residency engine" if plan.engine else "")
                + " (--mem-budget off sends every layer there, as llama.cpp's --rpc)",
                file=sys.stderr,
            )
        return self.all_remote.pays

    def _rpc_placement(self, rpc: list[str], budgeted: bool, step: int) -> tuple[list[str], int | None]:
        """(RPC servers to use, n_cpu_moe) for --rpc without a local GPU and without --n-cpu-moe.
        Without the residency engine: llama.cpp's own --rpc placement, every offloaded layer on the
        server with its expert tensors (0), which crosses the link about once a token; keeping the
        experts here would cross it twice in every layer (bench/results/rpc_link_tier.md: 5.2
        against 1.1 tok/s over 1 Gbit/s and 1 ms); but no server at all where an automatic budget
        found that placement slower than this machine alone (_send_every_layer). With the engine, the experts stay here (None)
        and the server gets layers and expert slots, but only where, given the link's costs
        (moespac calibrate --rpc, else the stated defaults), the balancer's slots there save more
        than the link costs every layer, for steps of `step` tokens (residency.remote.
        remote_tier_pays); otherwise the server is left out, said on one line."""
        if not budgeted:
            declined = self.all_remote is not None and not self.all_remote.pays
            return ([], None) if declined else (rpc, 0)
        costs = load_costs(rpc=rpc[0])
        if remote_tier_pays(costs, self.layout, tokens=step):
            return rpc, None
        print(
            f"moespac: the link to the RPC server at {rpc[0]} ({costs.round_trip_s * 1e3:.2g} ms a round trip, "
            f"{costs.memcpy_bps * 8 / 1e6:.3g} Mbit/s) is too slow for the server's layers and expert slots to pay: running on this "
            "machine alone (--mem-budget off puts whole layers there instead, as llama.cpp's --rpc)",
            file=sys.stderr,
        )
        return [], None

    def _gpu_tier(self, gpu_budget: int | None, n_cpu_moe: int | None) -> SlotFiller | None:
        """Expert slots in the slot device's memory (the GPU's, else an RPC server's: Session) for
        the layers whose experts are kept in host memory (the first `n_cpu_moe`, default all),
        filled by the balancer from the speculative utility (residency.slots.SlotFiller); None
        when the automatic budget holds no slot."""
        device = self.target.slot_device
        free, total = device.memory()
        # by default what is free once the contexts' KV and compute buffers are allocated
        budget = free - GPU_HEADROOM - total // 20 if gpu_budget is None else gpu_budget
        host = self.layout
        if n_cpu_moe is not None:
            host = replace(host, layers=[l for l in host.layers if l.index < n_cpu_moe])
        if not host.layers:
            return None  # every layer's experts are on the GPU already
        counts = slot_counts(host, max(budget, 0), 1.0, self.target.n_layer, spare=1)
        if not any(counts):
            if gpu_budget is None:
                return None
            one = format_size(2 * int(self.layout.mean_bytes_per_expert))
            raise MoespacError(
                f"--gpu-budget {format_size(budget)} holds no expert slot: a layer's first slot and its zero "
                f"slot take {one}"
            )
        costs = load_costs(gpu=True) if device is self.target.gpu else load_costs(rpc=device.description)
        r = self.residency
        filler = SlotFiller(
            SlotCache(self.target, counts),
            self.layout,
            costs,
            on_gpu=True,
            device=f"{device.name} ({device.description})",
            estimator=r.policy.estimator if r is not None else None,
            engine=r.engine if r is not None else None,
            planner=BackgroundBalancer(partial(solve, gap=RUNTIME_GAP)),
        )
        self.decoder.subscribe(filler)
        return filler

    def expert_tiers(self) -> np.ndarray:
        """int8 [n_layer, n_expert]: where each expert's weights are now, as indices into TIERS.
        With the residency engine, what it holds ("pinned" where it locks); without it, what the
        kernel's page cache holds of llama.cpp's mapping (mincore: the model is mmapped, so
        "ram" is the truth there too); GPU slots, and layers whose experts llama.cpp put on the
        GPU, over both. Rows of dense layers are 0. A view for people (a server's heatmap): it
        reads state that other threads change, and is never an input to a decision."""
        r = self.residency
        if r is not None:
            held = r.engine.resident.copy()
            out = np.where(held, TIERS.index("pinned" if r.engine.pin else "ram"), 0)
        else:
            if not PLATFORM.can("residency"):  # no mincore: an mmapped model counts as in RAM
                return np.full((self.layout.n_layer, self.layout.n_expert), TIERS.index("ram"), np.int8)
            if self._page_map is None:
                self._page_map = ExpertMap(self.layout, self.target.mappings())
            out = np.where(self._page_map.resident(), TIERS.index("ram"), 0)
        gpu = TIERS.index("gpu")
        if self.slots is not None:
            out[self.slots.in_slot.copy()] = gpu
        n_cpu_moe = self.n_cpu_moe
        if self.target.slot_device is not None and n_cpu_moe is not None:
            out[[l.index for l in self.layout.layers if l.index >= n_cpu_moe]] = gpu
        return out.astype(np.int8)

    def stats_dict(self) -> MoespacStats:
        """The last request's stats, with the GPU tier's under "slots" when there is one."""
        out = self.stats.as_dict()
        if self.slots is not None:
            out["slots"] = self.slots.stats()
        return out

    # -- tokens -------------------------------------------------------------
    def tokenize(self, text: bytes | str, add_bos: bool = True, special: bool = True) -> list[int]:
        text = text.decode("utf-8") if isinstance(text, bytes) else text
        return self.target.tokenize(text, add_special=add_bos, parse_special=special)

    def detokenize(self, tokens: list[int]) -> bytes:
        return b"".join(self.target.token_bytes(t) for t in tokens)

    @property
    def stats(self) -> DecodeStats:
        return self.decoder.stats

    # -- completions ----------------------------------------------------------
    def _stream(
        self, gen: Iterator[int], stop: list[str], cancel: Callable[[], bool] | None
    ) -> Iterator[tuple[str, str | None]]:
        """(text delta, finish_reason or None) pairs from the decoder's tokens; the last pair
        carries the reason."""
        text = TextStream(stop)
        for tok in gen:
            if self.target.is_eog(tok):
                continue
            self.completion_tokens.append(tok)
            delta = text.feed(self.target.token_bytes(tok))
            ended = "stop" if text.stopped else "cancelled" if cancel is not None and cancel() else None
            if ended:
                self.stats.finish_reason = ended
                yield delta, ended
                return
            if delta:
                yield delta, None
        yield text.flush(), self.stats.finish_reason

    def _generate(self, req: _Request) -> Iterator[tuple[str, str | None]]:
        """The request's (text delta, finish_reason) pairs; the caller holds this instance's turn."""
        self.prompt_tokens, self.completion_tokens = req.tokens, []
        gen = self.decoder.generate(req.tokens, req.max_tokens, req.sampler)
        try:
            yield from self._stream(gen, req.stops, req.cancel)
        except RemoteDeviceLost as lost:
            gen.close()
            raise self._reload_without(lost) from None
        finally:
            gen.close()

    def _reload_without(self, lost: RemoteDeviceLost) -> RemoteDeviceLost:
        """After an RPC server stopped answering mid-request: load the model again on the devices
        left (this machine's, and the other servers'), so this instance stays usable, and return
        the one-line error that ends the request. The caller's turn and the request's tokens so far
        (usage) are kept across the reload."""
        turns, done = self._turns, (self.prompt_tokens, self.completion_tokens)
        rest = [e for e in self.options.rpc_endpoints if e not in lost.endpoint.split(",")]
        self.close()
        try:
            self.__init__(self.model_path, self._draft_arg, **{**asdict(self.options), "rpc_servers": rest or None})
        except MoespacError as e:
            return RemoteDeviceLost(lost.endpoint, f"{lost}; loading the model again without it failed: {e}")
        self._turns, (self.prompt_tokens, self.completion_tokens) = turns, done
        where = "without it" if rest else "on this machine alone"
        return RemoteDeviceLost(
            lost.endpoint, f"{lost}: the request ended there, and the model is loaded again {where}"
        )

    def _streamed(self, req: _Request) -> Iterator[tuple[str, str | None]]:
        """_generate's pairs, holding the turn from the first pair until the last, or until the
        stream is closed (or dropped: CPython closes it then): an abandoned stream frees the model."""
        with self._turns.turn():
            yield from self._generate(req)

    def _collected(self, req: _Request) -> tuple[list[tuple[str, str | None]], Usage, MoespacStats]:
        """All of _generate's pairs, with the usage and stats of that request, in one turn."""
        with self._turns.turn():
            parts = list(self._generate(req))
            return parts, self.usage, self.stats_dict()

    def _request(
        self,
        tokens: list[int],
        max_tokens: int | None,
        temperature: float,
        top_p: float,
        top_k: int,
        stop: str | list[str] | None,
        seed: int | None,
        cancel: Callable[[], bool] | None,
        kind: str,
    ) -> _Request:
        """A request checked, with the id, created and model fields of its responses (`kind`: the
        id's prefix). `max_tokens` -1 or None: until the end of text or a full context, as
        llama.cpp's `-n -1`; 0 and other negatives are refused. Bad requests (these, an empty
        prompt or one the context cannot hold) raise here, before any stream."""
        if max_tokens is None or max_tokens == -1:
            max_tokens = self.target.n_ctx + 1  # more than the context holds: it stops full ("context")
        elif max_tokens < 1:
            raise MoespacError(
                f"max_tokens must be 1 or more, or -1 (until the end of text or a full context), got {max_tokens}"
            )
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        sampler = Sampler(temperature, top_p, top_k, self.seed if seed is None else seed)
        check_prompt(tokens, self.target.n_ctx)
        meta = {"id": f"{kind}-{uuid.uuid4()}", "created": int(time.time()), "model": self.model_path}
        return _Request(tokens, max_tokens, sampler, stops, cancel, meta)

    def create_completion(
        self,
        prompt: str | list[int],
        max_tokens: int | None = 128,
        temperature: float = SAMPLING.temperature,
        top_p: float = SAMPLING.top_p,
        top_k: int = SAMPLING.top_k,
        stop: str | list[str] | None = None,
        stream: bool = False,
        seed: int | None = None,
        cancel: Callable[[], bool] | None = None,
    ) -> Completion | Iterator[CompletionChunk]:
        """Complete `prompt`; greedy by default (temperature 0, or below). `max_tokens` -1 or None:
        until the end of text or a full context. `cancel`: asked after every token; when it
        returns True the generation ends there, with finish_reason "cancelled" (a server's
        client that went away)."""
        tokens = self.tokenize(prompt) if isinstance(prompt, str) else list(prompt)
        req = self._request(tokens, max_tokens, temperature, top_p, top_k, stop, seed, cancel, "cmpl")
        meta = req.meta
        if stream:
            return (
                {
                    **meta,
                    "object": "text_completion",
                    "choices": [{"text": t, "index": 0, "logprobs": None, "finish_reason": r}],
                }
                for t, r in self._streamed(req)
            )
        parts, usage, stats = self._collected(req)  # the last pair carries the finish reason
        return {
            **meta,
            "object": "text_completion",
            "choices": [
                {"text": "".join(t for t, _ in parts), "index": 0, "logprobs": None, "finish_reason": parts[-1][1]}
            ],
            "usage": usage,
            "moespac": stats,
        }

    def chat_prompt(self, messages: list[dict]) -> list[int]:
        tokens = chat_tokens(self.target, messages)
        if tokens is None:
            raise MoespacError(f"{Path(self.model_path).name} has no chat template (tokenizer.chat_template)")
        return tokens

    def create_chat_completion(
        self,
        messages: list[dict],
        max_tokens: int | None = 256,
        temperature: float = SAMPLING.temperature,
        top_p: float = SAMPLING.top_p,
        top_k: int = SAMPLING.top_k,
        stop: str | list[str] | None = None,
        stream: bool = False,
        seed: int | None = None,
        cancel: Callable[[], bool] | None = None,
    ) -> ChatCompletion | Iterator[ChatCompletionChunk]:
        """Answer `messages` ({"role", "content"} dicts) with the model's chat template; greedy by
        default. `cancel` as in create_completion."""
        tokens = self.chat_prompt(messages)
        req = self._request(tokens, max_tokens, temperature, top_p, top_k, stop, seed, cancel, "chatcmpl")
        meta = req.meta
        if stream:

            def gen():
                yield {
                    **meta,
                    "object": "chat.completion.chunk",
                    "choices": [{"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}],
                }
                for t, r in self._streamed(req):
                    yield {
                        **meta,
                        "object": "chat.completion.chunk",
                        "choices": [{"index": 0, "delta": {"content": t} if t else {}, "finish_reason": r}],
                    }

            return gen()
        parts, usage, stats = self._collected(req)  # the last pair carries the finish reason
        return {
            **meta,
            "object": "chat.completion",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "".join(t for t, _ in parts)},
                    "finish_reason": parts[-1][1],
                }
            ],
            "usage": usage,
            "moespac": stats,
        }

    @property
    def usage(self) -> Usage:
        """Token counts of the last (or running) request, as a response's `usage`."""
        p, n = len(self.prompt_tokens), len(self.completion_tokens)
        return {"prompt_tokens": p, "completion_tokens": n, "total_tokens": p + n}

    def close(self) -> None:
        if getattr(self, "slots", None) is not None:
            self.slots.close()
            self.slots = None
        if getattr(self, "residency", None) is not None:
            self.residency.close()
            self.residency = None
        for s in (self.draft, getattr(self, "target", None)):
            if s is not None:
                s.close()

    def __enter__(self) -> MoeSpac:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
