"""The one thread that runs the model: requests in arrival order from a bounded queue, each
cancellable between tokens, and the counters /metrics and the chat page read.

llama.cpp contexts serve one sequence at a time here (speculative decoding rolls the KV cache
back), so requests are served one by one; the queue's bound turns overload into a prompt 503
instead of a growing wait. The event loop never runs the model: a request is a Job whose
results the worker thread hands back to the loop (call_soon_threadsafe), so a slow generation
never blocks /health, /metrics or another client's 503.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from ..api.moespac import TIERS, MoeSpac
from ..core.errors import MoespacError, RemoteDeviceLost
from ..residency import pages
from .activity import ExpertActivity
from .errors import ApiError

log = logging.getLogger("moespac.server")


@dataclass
class Job:
    """One request: the keyword arguments of create_completion / create_chat_completion, and the
    asyncio queue its results go to: ("chunk", dict)..., then ("done", response or None) or
    ("error", ApiError)."""

    kind: Literal["completion", "chat"]
    args: dict
    stream: bool
    include_usage: bool = False
    loop: asyncio.AbstractEventLoop = field(default_factory=asyncio.get_running_loop)
    out: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    t_start: float = 0.0

    def send(self, item: tuple) -> None:
        try:
            self.loop.call_soon_threadsafe(self.out.put_nowait, item)
        except RuntimeError:  # the loop is gone (shutdown): nobody is listening
            self.cancelled.set()


@dataclass
class Totals:
    """Counters since the server started."""

    requests: dict[str, int] = field(default_factory=lambda: {"ok": 0, "cancelled": 0, "error": 0})
    prompt_tokens: int = 0
    tokens: int = 0
    drafted: int = 0
    accepted: int = 0


class ModelWorker:
    """Owns a MoeSpac from `start()` to `close()`; nothing else may call it meanwhile."""

    def __init__(self, model: MoeSpac, model_id: str, draft_id: str | None, max_queue: int):
        if max_queue < 1:
            raise MoespacError(f"--max-queue must be 1 or more, got {max_queue}")
        self.model, self.model_id, self.draft_id = model, model_id, draft_id
        self.max_queue = max_queue
        self.pending: queue.Queue[Job | None] = queue.Queue(maxsize=max_queue)
        self.running: Job | None = None
        self.totals = Totals()
        self.last: dict | None = None  # the last finished request's decode stats
        layout = model.layout
        self.rows = [l.index for l in layout.layers]  # the MoE layers: one heatmap row each
        self.activity = ExpertActivity(layout.n_layer, layout.n_expert, self._held)
        model.decoder.subscribe(self.activity)
        self._read0 = self._read_bytes()
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="moespac-model", daemon=True)

    def start(self) -> None:
        self._thread.start()

    # -- requests -------------------------------------------------------------------
    def submit(self, job: Job) -> None:
        """Queue `job`, or ApiError 503 when the queue is full or the server is stopping."""
        if self._closing:
            raise ApiError(503, "the server is shutting down", code="shutting_down")
        job.t_start = time.perf_counter()
        try:
            self.pending.put_nowait(job)
        except queue.Full:
            raise ApiError(
                503,
                f"the server is busy: {self.max_queue} requests are waiting already (--max-queue); retry later",
                code="queue_full",
            ) from None

    def _run(self) -> None:
        while True:
            job = self.pending.get()
            if job is None:
                return
            if job.cancelled.is_set():  # its client left while it waited
                self.totals.requests["cancelled"] += 1
                continue
            self.running = job
            try:
                self._serve(job)
            finally:
                self.running = None

    def _serve(self, job: Job) -> None:
        m = self.model
        call = m.create_completion if job.kind == "completion" else m.create_chat_completion
        try:
            result = call(**job.args, stream=job.stream, cancel=job.cancelled.is_set)
            if job.stream:
                for chunk in result:
                    chunk["model"] = self.model_id
                    job.send(("chunk", chunk))
                if job.include_usage:
                    job.send(("chunk", {**chunk, "choices": [], "usage": m.usage}))
                job.send(("done", None))
            else:
                result["model"] = self.model_id
                job.send(("done", result))
        except RemoteDeviceLost as e:  # the model was loaded again without that server: go on serving
            self.totals.requests["error"] += 1
            log.warning("%s", e)
            job.send(("error", ApiError(502, str(e), code="rpc_server_lost")))
            return
        except MoespacError as e:  # a request the model cannot serve (a prompt too long, no chat template)
            self.totals.requests["error"] += 1
            job.send(("error", ApiError(400, str(e))))
            return
        except Exception as e:
            self.totals.requests["error"] += 1
            log.exception("generation failed")
            job.send(("error", ApiError(500, f"internal error: {type(e).__name__}")))
            return
        st = m.stats
        t = self.totals
        t.requests["cancelled" if st.finish_reason == "cancelled" else "ok"] += 1
        t.prompt_tokens += len(m.prompt_tokens)
        t.tokens += len(m.completion_tokens)
        t.drafted, t.accepted = t.drafted + st.n_drafted, t.accepted + st.n_accepted
        self.last = st.as_dict()

    def close(self, timeout: float = 30.0) -> None:
        """Cancel the running request and every waiting one (503), and stop the thread."""
        self._closing = True
        if self.running is not None:
            self.running.cancelled.set()
        while True:
            try:
                job = self.pending.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.send(("error", ApiError(503, "the server is shutting down", code="shutting_down")))
        self.pending.put(None)
        if self._thread.is_alive():
            self._thread.join(timeout)

    # -- what it is doing ------------------------------------------------------------
    def _held(self) -> np.ndarray | None:
        """Experts in fast memory (the residency engine's, and GPU slots), None without the engine."""
        r = self.model.residency
        if r is None:
            return None
        held = r.engine.resident.copy()
        if self.model.slots is not None:
            held |= self.model.slots.in_slot
        return held

    @staticmethod
    def _read_bytes() -> int | None:
        try:
            return pages.read_bytes()
        except OSError:  # no /proc/self/io (not Linux)
            return None

    def stats(self, experts: bool = True) -> dict:
        """The state /metrics and /v1/moespac/stats show (module docstring of server.app)."""
        m, t = self.model, self.totals
        job, st = self.running, m.stats
        if job is not None and st.n_generated:  # the running request, live
            elapsed = time.perf_counter() - job.t_start - st.t_prompt
            tps = st.n_generated / elapsed if elapsed > 0 else None
            cur = {"n_tokens": st.n_generated, "n_steps": st.n_steps, "n_drafted": st.n_drafted}
            cur["acceptance_rate"] = st.acceptance_rate
        else:
            tps = self.last["tokens_per_s"] if self.last else None
            cur = self.last or {}
        steps = cur.get("n_steps") or 0
        tiers = m.expert_tiers()[self.rows]
        read = self._read_bytes()
        slots = m.slots.stats() if m.slots is not None else None
        out = {
            "model": self.model_id,
            "draft": self.draft_id,
            "busy": job is not None,
            "queue_depth": self.pending.qsize(),
            "requests_total": sum(t.requests.values()),
            "requests": dict(t.requests),
            "tokens_generated_total": t.tokens,
            "prompt_tokens_total": t.prompt_tokens,
            "tokens_per_s": tps,
            "acceptance_rate": cur.get("acceptance_rate"),
            "acceptance_rate_total": t.accepted / t.drafted if t.drafted else None,
            "tokens_per_step": cur.get("n_tokens", 0) / steps if steps else None,
            "draft_length": cur.get("n_drafted", 0) / steps if steps else None,
            "expert_hit_rate": self.activity.hit_rate(),
            "flash_read_bytes_total": read - self._read0 if read is not None and self._read0 is not None else None,
            "resident_experts": int((tiers > 0).sum()),
            "pinned_experts": int((tiers == TIERS.index("pinned")).sum()),
            "gpu_slot_experts": int((tiers == TIERS.index("gpu")).sum()),
            "slot_hit_rate": slots["hit_rate"] if slots else None,
            "engine": m.residency is not None,
            "memory_plan": m.memory_plan.summary(),
        }
        if experts:
            out["experts"] = {
                "layers": self.rows,
                "n_expert": m.layout.n_expert,
                "tiers": list(TIERS),
                "tier": tiers.tolist(),
                "activity": np.round(self.activity.scaled(self.rows), 3).tolist(),
            }
        return out


def model_id(name: str) -> str:
    """The id clients name the model by: a demo model's name as given, else the file's stem."""
    return Path(name).stem if name.endswith(".gguf") else name
