"""`MoeSpac`, the Python API (in the shape of `llama_cpp.Llama`), and `moespac run` / `moespac chat`.

Completions and chat completions come back as llama-cpp-python / OpenAI-shaped
dicts (or streams of chunks), with a `moespac` entry holding the run's stats.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import uuid
from pathlib import Path
from typing import Iterator

from . import pages
from .capture import RouterCapture
from .engine import ResidencyController
from .errors import MoespacError
from .gate import LookaheadGate
from .gate_runtime import GatedResidency, GateTap
from .layout import MoeLayout, read_layout
from .native import set_verbose
from .session import DRAFT_TOP_K, SELF_DRAFT, Session, draft_source
from .speculative import DecodeStats, Sampler, SpeculativeDecoder
from .units import format_size, parse_size

PREFILL_BATCH = 1024  # the target's batch under a memory budget (batch_sizes)
DRAFT_BATCH = 64  # a draft's batch under a memory budget (batch_sizes)
DRAFT_AHEAD = 6   # tokens a self-draft runs ahead under a budget (MoeSpac, bench/results/lookahead.md)


class TextStream:
    """Bytes of tokens -> text, holding back incomplete UTF-8 and possible stop-string prefixes."""

    def __init__(self, stop: list[str]):
        self.stop = [s for s in stop if s]
        self.pending = b""
        self.text = ""       # all text released so far
        self.held = ""       # decoded text not yet released (could start a stop string)
        self.stopped = False

    def feed(self, data: bytes) -> str:
        self.pending += data
        try:
            new = self.pending.decode("utf-8")
            self.pending = b""
        except UnicodeDecodeError as e:  # keep a split multi-byte character for later
            if e.start < len(self.pending) - 3:
                new, self.pending = self.pending.decode("utf-8", errors="replace"), b""
            else:
                new, self.pending = self.pending[:e.start].decode("utf-8"), self.pending[e.start:]
        buf = self.held + new
        for s in self.stop:
            i = buf.find(s)
            if i >= 0:
                self.stopped, self.held = True, ""
                return self._release(buf[:i])
        keep = max((n for s in self.stop for n in range(len(s) - 1, 0, -1) if buf.endswith(s[:n])), default=0)
        self.held = buf[len(buf) - keep:] if keep else ""
        return self._release(buf[:len(buf) - keep])

    def flush(self) -> str:
        out = self.held + self.pending.decode("utf-8", errors="replace")
        self.held, self.pending = "", b""
        return self._release(out)

    def _release(self, s: str) -> str:
        self.text += s
        return s


def expert_budget(mem_budget: int, layout: MoeLayout, draft_bytes: int) -> int:
    """Bytes left for expert weights once everything else that must stay in memory is counted."""
    runtime = pages.status_bytes("RssAnon")
    margin = (16 << 20) + mem_budget // 50  # allocator slack
    left = mem_budget - layout.other_bytes - draft_bytes - runtime - margin
    # experts are paged in layer by layer: the floor is one layer's top-k experts
    one_layer = layout.n_expert_used * max(l.bytes_per_expert for l in layout.layers)
    if left < one_layer:
        raise MoespacError(
            f"memory budget {format_size(mem_budget)} is too small: non-expert weights "
            f"{format_size(layout.other_bytes)}, draft {format_size(draft_bytes)}, runtime {format_size(runtime)} "
            f"and margin {format_size(margin)} leave {format_size(max(left, 0))} for experts, less than the "
            f"{format_size(one_layer)} one layer's top-{layout.n_expert_used} experts need")
    return left


def batch_sizes(n_batch: int | None, n_ctx: int, budgeted: bool) -> tuple[int, int]:
    """(target, draft) batch sizes. Without a budget both are llama.cpp's 512 (or `n_batch`).
    Under a budget the target prefills in batches of up to PREFILL_BATCH tokens (within `n_ctx`):
    every batch routes to nearly every expert, so each batch reads every unheld one again (the
    bench's prompts, one of 682 tokens: prefill bytes 3.20 -> 2.92 GB from 512 to 1024). The
    bound is memory: without flash attention a batch's attention scores take n_ctx x batch x
    heads x 4 bytes of compute buffer. The draft's batches shrink to DRAFT_BATCH, because its
    reads cost nothing (a self-draft computes with held experts only; a separate draft's file is
    pinned) and a compute buffer is memory the experts could use (measured on smolmoe-16x, a
    682-token prefill: target 512 -> 1024 +21 MiB, self-draft 512 -> 64 -26 MiB)."""
    if not budgeted:
        return (n_batch or 512,) * 2
    target = n_batch or min(n_ctx, PREFILL_BATCH)
    return target, min(target, DRAFT_BATCH)


def chat_tokens(session, messages: list[dict]) -> list[int] | None:
    """Token ids of `messages` rendered by the model's chat template (None: it has none)."""
    template = session.chat_template()
    if not template:
        return None
    bos = session.token_bytes(session.bos, special=True).decode("utf-8", errors="replace")
    eos_id = int(session.metadata("tokenizer.ggml.eos_token_id") or -1)
    eos = session.token_bytes(eos_id, special=True).decode("utf-8", errors="replace") if eos_id >= 0 else ""
    text = render_chat(template, messages, bos, eos)
    return session.tokenize(text, add_special=not (bos and text.startswith(bos)))


def render_chat(template: str, messages: list[dict], bos: str, eos: str) -> str:
    """Render a GGUF chat template (Jinja2, as in Hugging Face tokenizers)."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(msg):
        raise MoespacError(f"chat template: {msg}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template).render(messages=messages, add_generation_prompt=True,
                                            bos_token=bos, eos_token=eos)


class MoeSpac:
    """A GGUF MoE target, optionally drafted by a small GGUF model of the same vocabulary
    or by itself routing fewer experts (`draft_model_path="self"`)."""

    def __init__(self, model_path: str | Path, draft_model_path: str | Path | None = None, *,
                 n_ctx: int = 2048, n_threads: int | None = None, n_batch: int | None = None,
                 draft_max: int = 8, adaptive_draft: bool = True, seed: int | None = None,
                 mem_budget: int | str | None = None, gate: str | Path | None = None,
                 draft_ahead: int | None = None, verbose: bool = False):
        """`mem_budget` (bytes or "8G"): keep expert residency within it (the residency engine).
        `gate`: a lookahead-gate sidecar (`moespac train-gate`) whose predictions of the next
        layers' experts, made inside each decode, join the engine's utility (needs `mem_budget`).
        `n_batch`: the target's batch (see `batch_sizes`).
        `draft_ahead`: tokens a self-draft drafts each step, beyond what it proposes if need be, so
        its routing of them tells the engine what the next steps need (default DRAFT_AHEAD with
        `-md self` under a budget that cannot hold every expert, else 0)."""
        set_verbose(verbose)
        self.model_path = str(model_path)
        self.layout = read_layout(model_path)  # one-line errors for missing / non-GGUF / dense targets
        self_draft = draft_model_path is not None and str(draft_model_path) == SELF_DRAFT
        if draft_model_path is not None and not self_draft and not Path(draft_model_path).is_file():
            raise MoespacError(f"no such draft file: {draft_model_path}")
        if gate is not None and mem_budget is None:
            raise MoespacError("a lookahead gate needs a memory budget (--mem-budget): its predictions "
                               "steer the residency engine")
        ahead_by_default = draft_ahead is None
        if draft_ahead is None:
            draft_ahead = DRAFT_AHEAD if self_draft and mem_budget is not None else 0
        if draft_ahead < 0:
            raise MoespacError(f"--draft-ahead must be 0 or more, got {draft_ahead}")
        if draft_ahead and not (self_draft and mem_budget is not None):
            raise MoespacError(f"--draft-ahead reads a self-draft's routing for the residency engine: it needs "
                               f"-md {SELF_DRAFT} and --mem-budget")
        lookahead_gate = LookaheadGate.load(gate, model_path) if gate is not None else None
        self.gate_tap = GateTap(lookahead_gate) if lookahead_gate is not None else None
        n_batch, draft_batch = batch_sizes(n_batch, n_ctx, budgeted=mem_budget is not None)
        self.target = Session(model_path, n_ctx=n_ctx, n_threads=n_threads, n_batch=n_batch,
                              capture=self.gate_tap)
        self.draft = None
        router = RouterCapture() if draft_ahead else None
        try:
            if draft_model_path is not None:  # a self-draft's tap, with a budget, restricts its routing (below)
                path, overrides = draft_source(draft_model_path, self.layout)
                self.draft = Session(path, n_ctx=n_ctx, n_threads=n_threads, n_batch=draft_batch,
                                     tap=self_draft and mem_budget is not None, overrides=overrides,
                                     capture=router)
            self.decoder = SpeculativeDecoder(self.target, self.draft, draft_max=draft_max,
                                              adaptive=adaptive_draft, draft_ahead=draft_ahead, draft_router=router)
            self.residency = None
            if mem_budget is not None:
                budget = parse_size(mem_budget) if isinstance(mem_budget, str) else int(mem_budget)
                own_draft = draft_model_path if draft_model_path and not self_draft else None
                draft_bytes = Path(own_draft).stat().st_size if own_draft else 0
                self.residency = ResidencyController(self.layout, expert_budget(budget, self.layout, draft_bytes),
                                                     draft_path=own_draft, draft_max=draft_max)
                self.decoder.subscribe(self.residency if lookahead_gate is None else
                                       GatedResidency(self.residency, lookahead_gate, tap=self.gate_tap))
                for s in (self.target, self.draft):
                    if s is not None and s.tap is not None:
                        s.tap.set_demand_page_in(True)
                if self_draft:  # the draft computes with held experts only: it reads nothing
                    self.draft.tap.restrict_to(self.residency.engine.resident)
                if router is not None and ahead_by_default and self.residency.holds_every_expert:
                    # nothing to choose between: running ahead, reading the routing, only cost time
                    self.decoder.stop_running_ahead()
                    self.draft.tap.chain(None)
        except Exception:
            self.close()
            raise
        self.seed = seed

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
    def _stream(self, prompt_tokens: list[int], max_tokens: int, sampler: Sampler,
                stop: list[str]) -> Iterator[tuple[str, str | None]]:
        """(text delta, finish_reason or None) pairs; the last pair carries the reason."""
        text = TextStream(stop)
        gen = self.decoder.generate(prompt_tokens, max_tokens, sampler)
        self.completion_tokens: list[int] = []
        for tok in gen:
            if self.target.is_eog(tok):
                continue
            self.completion_tokens.append(tok)
            delta = text.feed(self.target.token_bytes(tok))
            if text.stopped:
                gen.close()
                self.stats.finish_reason = "stop"
                yield delta, "stop"
                return
            if delta:
                yield delta, None
        yield text.flush(), self.stats.finish_reason

    def _sampler(self, temperature: float, top_p: float, top_k: int, seed: int | None) -> Sampler:
        return Sampler(temperature, top_p, top_k, self.seed if seed is None else seed)

    def create_completion(self, prompt: str | list[int], max_tokens: int = 128, temperature: float = 0.0,
                          top_p: float = 1.0, top_k: int = 0, stop: str | list[str] | None = None,
                          stream: bool = False, seed: int | None = None):
        """Complete `prompt`; greedy by default (temperature 0)."""
        tokens = self.tokenize(prompt) if isinstance(prompt, str) else list(prompt)
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        chunks = self._stream(tokens, max_tokens, self._sampler(temperature, top_p, top_k, seed), stops)
        meta = {"id": f"cmpl-{uuid.uuid4()}", "created": int(time.time()), "model": self.model_path}
        if stream:
            return ({**meta, "object": "text_completion",
                     "choices": [{"text": t, "index": 0, "logprobs": None, "finish_reason": r}]}
                    for t, r in chunks)
        parts, reason = [], None
        for t, reason in chunks:
            parts.append(t)
        return {**meta, "object": "text_completion",
                "choices": [{"text": "".join(parts), "index": 0, "logprobs": None, "finish_reason": reason}],
                "usage": self._usage(tokens), "moespac": self.stats.as_dict()}

    def chat_prompt(self, messages: list[dict]) -> list[int]:
        tokens = chat_tokens(self.target, messages)
        if tokens is None:
            raise MoespacError(f"{Path(self.model_path).name} has no chat template (tokenizer.chat_template)")
        return tokens

    def create_chat_completion(self, messages: list[dict], max_tokens: int = 256, temperature: float = 0.0,
                               top_p: float = 1.0, top_k: int = 0, stop: str | list[str] | None = None,
                               stream: bool = False, seed: int | None = None):
        tokens = self.chat_prompt(messages)
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        chunks = self._stream(tokens, max_tokens, self._sampler(temperature, top_p, top_k, seed), stops)
        meta = {"id": f"chatcmpl-{uuid.uuid4()}", "created": int(time.time()), "model": self.model_path}
        if stream:
            def gen():
                yield {**meta, "object": "chat.completion.chunk",
                       "choices": [{"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}]}
                for t, r in chunks:
                    yield {**meta, "object": "chat.completion.chunk",
                           "choices": [{"index": 0, "delta": {"content": t} if t else {}, "finish_reason": r}]}
            return gen()
        parts, reason = [], None
        for t, reason in chunks:
            parts.append(t)
        return {**meta, "object": "chat.completion",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(parts)},
                             "finish_reason": reason}],
                "usage": self._usage(tokens), "moespac": self.stats.as_dict()}

    def _usage(self, prompt_tokens: list[int]) -> dict:
        n = len(self.completion_tokens)
        return {"prompt_tokens": len(prompt_tokens), "completion_tokens": n, "total_tokens": len(prompt_tokens) + n}

    def close(self) -> None:
        if getattr(self, "residency", None) is not None:
            self.residency.close()
            self.residency = None
        for s in (self.draft, getattr(self, "target", None)):
            if s is not None:
                s.close()

    def __enter__(self) -> "MoeSpac":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# -- CLI ----------------------------------------------------------------------
def add_model_args(p: argparse.ArgumentParser) -> None:
    """The llama.cpp-style flags shared by every command that runs a model."""
    p.add_argument("-m", "--model", required=True, help="target GGUF (MoE), or a demo model's name (moespac models)")
    p.add_argument("-md", "--model-draft", help="draft GGUF with the same vocabulary, a demo model's name, or "
                   f"'{SELF_DRAFT}' (the target routing {DRAFT_TOP_K} expert per token: no extra weights)")
    p.add_argument("-c", "--ctx-size", type=int, default=2048, help="context size (default 2048)")
    p.add_argument("-t", "--threads", type=int, default=None, help="CPU threads (default: all cores)")
    p.add_argument("-b", "--batch-size", type=int, default=None,
                   help="batch size (default 512; with --mem-budget up to 1024: fewer prefill passes, each reads "
                   "every expert not held)")
    p.add_argument("--draft-max", type=int, default=8, help="most tokens drafted per step (default 8)")
    p.add_argument("--no-adaptive-draft", action="store_true", help="always draft --draft-max tokens")
    p.add_argument("--draft-ahead", type=int, default=None, metavar="N",
                   help=f"with -md {SELF_DRAFT} and --mem-budget: tokens the draft runs ahead each step, whose "
                   f"routing tells the engine which experts to keep (default {DRAFT_AHEAD} where the budget "
                   "cannot hold every expert, else 0)")
    p.add_argument("--temp", type=float, default=0.0, help="temperature (default 0 = greedy)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("-s", "--seed", type=int, default=None)
    p.add_argument("--mem-budget", metavar="SIZE", help="memory for the model, e.g. 8G: moespac keeps the most "
                   "useful experts resident within it")
    p.add_argument("--gate", metavar="FILE", help="lookahead-gate sidecar (moespac train-gate) to prefetch the "
                   "next layers' experts during each decode (needs --mem-budget)")
    p.add_argument("--verbose", action="store_true", help="show llama.cpp's log")


def open_model(args) -> MoeSpac:
    from .models import resolve_model  # -m accepts a file or a demo model's name

    draft = args.model_draft
    if draft and draft != SELF_DRAFT:
        draft = str(resolve_model(draft))
    return MoeSpac(str(resolve_model(args.model)), draft, n_ctx=args.ctx_size, n_threads=args.threads,
                   n_batch=args.batch_size, draft_max=args.draft_max,
                   adaptive_draft=not args.no_adaptive_draft, seed=args.seed, mem_budget=args.mem_budget,
                   gate=args.gate, draft_ahead=args.draft_ahead, verbose=args.verbose)


def stats_line(st: DecodeStats) -> str:
    acc = "n/a" if st.acceptance_rate is None else f"{st.acceptance_rate:.2f}"
    return (f"[{st.n_generated} tokens, {st.tokens_per_s:.1f} tok/s, acceptance {acc}, "
            f"{st.mean_accepted_len:.2f} tokens/step, prompt {st.n_prompt} tokens in {st.t_prompt:.2f} s, "
            f"finish: {st.finish_reason}]")


def main_run(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="moespac run", description="Generate text from a prompt.")
    add_model_args(p)
    p.add_argument("-p", "--prompt", required=True)
    p.add_argument("-n", "--n-predict", type=int, default=128, help="tokens to generate (default 128)")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    args = p.parse_args(argv)
    with open_model(args) as m:
        sampling = dict(max_tokens=args.n_predict, temperature=args.temp, top_p=args.top_p,
                        top_k=args.top_k, stop=args.stop)
        if args.json:
            out = m.create_completion(args.prompt, **sampling)
            st = m.stats
            print(json.dumps({"text": out["choices"][0]["text"], "tokens": m.completion_tokens,
                              "n_tokens": st.n_generated, "tokens_per_s": st.tokens_per_s,
                              "acceptance_rate": st.acceptance_rate, "stats": st.as_dict()}))
            return 0
        for chunk in m.create_completion(args.prompt, stream=True, **sampling):
            sys.stdout.write(chunk["choices"][0]["text"])
            sys.stdout.flush()
        print()
        print(stats_line(m.stats))
        if m.stats.finish_reason == "context":
            print(f"moespac run: stopped: the context of {m.target.n_ctx} tokens is full (raise -c)", file=sys.stderr)
    return 0


def main_chat(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="moespac chat", description="Chat with the model's own template; "
                                "reads one user message per line (piped stdin works too).")
    add_model_args(p)
    p.add_argument("-n", "--n-predict", type=int, default=256, help="most tokens per reply (default 256)")
    p.add_argument("--system", default=None, help="system message")
    p.add_argument("--stats", action="store_true", help="print a stats line after each reply")
    args = p.parse_args(argv)
    interactive = sys.stdin.isatty()
    with open_model(args) as m:
        messages = [{"role": "system", "content": args.system}] if args.system else []
        while True:
            try:
                line = input("> " if interactive else "")
            except EOFError:
                break
            if not line.strip():
                continue
            messages.append({"role": "user", "content": line})
            reply = []
            for chunk in m.create_chat_completion(messages, max_tokens=args.n_predict, temperature=args.temp,
                                                  top_p=args.top_p, top_k=args.top_k, stream=True):
                delta = chunk["choices"][0]["delta"].get("content", "")
                reply.append(delta)
                sys.stdout.write(delta)
                sys.stdout.flush()
            print()
            if args.stats:
                print(stats_line(m.stats))
            messages.append({"role": "assistant", "content": "".join(reply)})
    return 0
