"""The main job on the built-in demo model (README command 1): a model larger than its memory.

SmolMoE (an 8-expert MoE upcycled from SmolLM2-135M, built by setup) gets a memory cgroup limit
of 60% of its file. The same prompt runs greedily, in two child processes under that limit, each
from a cold page cache: plain llama.cpp (llama-cpp-python's `Llama`: mmap and the kernel's page
cache, nothing managed) and moespac with its defaults and the target as its own draft
(`moespac run -m smolmoe -md self`): the automatic memory plan sees the limit and turns the
residency engine on with the budget it computes. The table shows tokens/s and bytes read from
disk side by side, and the two texts must be identical (exit 1 otherwise).

Where no memory cgroup can be created (not Linux, or not root), the demo says so and runs both
without a limit, moespac with `--mem-budget` at the same 60%.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time

from moespac_gguf import MoespacError, read_layout
from moespac_gguf.core.units import format_size
from moespac_gguf.demo.catalog import model_path
from moespac_gguf.residency.pages import drop_file_cache, read_bytes
from moespac_gguf.tools.memcap import MemoryCap

PROMPT = "A mixture-of-experts model needs less compute per token because"
N_TOKENS = 24
N_CTX = 512
CAP_SHARE = 0.6


def run_plain(target: str) -> dict:
    """Plain llama.cpp: llama-cpp-python's Llama, greedy."""
    import llama_cpp

    llm = llama_cpp.Llama(target, n_ctx=N_CTX, verbose=False)
    r0, t0 = read_bytes(), time.perf_counter()
    out = []
    for tok in llm.generate(llm.tokenize(PROMPT.encode()), temp=0.0):
        if tok == llm.token_eos() or len(out) == N_TOKENS:
            break
        out.append(tok)
    return {"tokens": out, "seconds": time.perf_counter() - t0, "bytes_read": read_bytes() - r0}


def run_moespac(target: str, budget: int | None) -> dict:
    """moespac with its defaults (the automatic memory plan) or `budget`, drafted by itself."""
    from moespac_gguf import MoeSpac

    options = {} if budget is None else {"mem_budget": budget}
    with MoeSpac(target, "self", n_ctx=N_CTX, **options) as m:
        r0, t0 = read_bytes(), time.perf_counter()
        m.create_completion(PROMPT, max_tokens=N_TOKENS)
        return {
            "tokens": m.completion_tokens,
            "seconds": time.perf_counter() - t0,
            "bytes_read": read_bytes() - r0,
            "plan": m.memory_plan.summary(),
            "acceptance": m.stats.acceptance_rate,
        }


def child(name: str, target: str, cap: MemoryCap | None, budget: int | None) -> dict:
    """One contender in a child process (in the cgroup when there is one), from a cold page cache."""
    drop_file_cache(target)
    argv = [sys.executable, __file__, "--child", name, target, str(budget or 0)]
    proc = subprocess.run(argv, capture_output=True, text=True, preexec_fn=cap.preexec if cap else None)
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1:] or [f"exit {proc.returncode}"]
        raise MoespacError(f"{name}: {tail[0]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    target = str(model_path("smolmoe"))
    layout = read_layout(target)
    limit = int(CAP_SHARE * layout.file_bytes)
    print(
        f"target {model_path('smolmoe').name}: {format_size(layout.file_bytes)}, {layout.n_expert} experts, "
        f"top-{layout.n_expert_used}; memory limit {format_size(limit)} ({CAP_SHARE:.0%} of the file)"
    )
    rows = {}
    with contextlib.ExitStack() as stack:
        try:
            cap, budget = stack.enter_context(MemoryCap(limit, "demo")), None
        except MoespacError as e:
            print(
                f"cannot cap memory here ({e}); running both uncapped, moespac with --mem-budget {format_size(limit)}"
            )
            cap, budget = None, limit
        for name in ("plain", "moespac"):
            print(f"[demo] {name} ...", file=sys.stderr, flush=True)
            rows[name] = child(name, target, cap, budget)
    a, b = rows["plain"], rows["moespac"]
    print(f"\n{b['plan']}\n")
    print("| | tokens/s | bytes read | acceptance |")
    print("|---|---:|---:|---:|")
    for label, r in (("plain llama.cpp (llama-cpp-python, mmap)", a), ("moespac (defaults, -md self)", b)):
        acc = "-" if r.get("acceptance") is None else f"{r['acceptance']:.2f}"
        print(f"| {label} | {len(r['tokens']) / r['seconds']:.2f} | {format_size(r['bytes_read'])} | {acc} |")
    speed = (len(b["tokens"]) / b["seconds"]) / (len(a["tokens"]) / a["seconds"])
    print(f"\nmoespac: {speed:.2f}x the tokens/s, {b['bytes_read'] / max(1, a['bytes_read']):.2f}x the bytes read")
    from moespac_gguf.llama.session import Session

    with Session(target, n_ctx=64, tap=False) as s:
        print(f"text: {PROMPT}{s.detokenize(b['tokens'])}")
    same = a["tokens"] == b["tokens"]
    print("identical greedy output:", "yes" if same else "NO")
    return 0 if same else 1


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        name, target, budget = sys.argv[2], sys.argv[3], int(sys.argv[4]) or None
        print(json.dumps(run_plain(target) if name == "plain" else run_moespac(target, budget)))
        sys.exit(0)
    try:
        sys.exit(main())
    except MoespacError as e:
        sys.exit(f"demo: error: {e}")
