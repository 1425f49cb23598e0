"""`moespac calibrate`: measure this machine's costs for the balancer and the simulator.

Saves CALIBRATION_PATH (JSON): flash_read_bps (cold sequential reads of the
model file), page_in_latency_s (cold random 4 KiB reads), memcpy_bps and mem_bps
(numpy copy / sum of a large array), mem_bytes (RAM), and from decodes with the
model cached: the marginal cost of one more token in a batch (9 tokens vs 1)
divided by the expert matmuls a token runs, cpu_s_per_token_expert (an upper
bound: it includes attention), the rest of a one-token step, step_overhead_s,
and with -md the draft's time per token, draft_s_per_token.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import time

import numpy as np
import psutil

from .layout import read_layout
from .pages import drop_file_cache
from .paths import CALIBRATION_PATH
from .units import format_size


def flash_read_bps(path: str, total: int = 256 << 20, block: int = 4 << 20) -> float:
    drop_file_cache(path)
    size = os.path.getsize(path)
    total = min(total, size)
    fd = os.open(path, os.O_RDONLY)
    try:
        t = time.perf_counter()
        done = 0
        while done < total:
            done += len(os.pread(fd, block, done))
        return done / (time.perf_counter() - t)
    finally:
        os.close(fd)


def page_in_latency_s(path: str, n: int = 200) -> float:
    drop_file_cache(path)
    size = os.path.getsize(path)
    rng = random.Random(0)
    fd = os.open(path, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
    try:
        t = time.perf_counter()
        for _ in range(n):
            os.pread(fd, 4096, rng.randrange(0, size - 4096) & ~4095)
        return (time.perf_counter() - t) / n
    finally:
        os.close(fd)


def memory_bps(n_bytes: int = 256 << 20) -> tuple[float, float]:
    a = np.ones(n_bytes // 8)
    b = np.empty_like(a)
    t = time.perf_counter()
    np.copyto(b, a)
    copy = 2 * n_bytes / (time.perf_counter() - t)  # read + write
    t = time.perf_counter()
    a.sum()
    read = n_bytes / (time.perf_counter() - t)
    return copy, read


def _decode_s(session, tokens: list[int], repeat: int) -> float:
    """Mean time of decoding `tokens` at a fixed position (rolled back after each)."""
    base = session.n_past
    t = time.perf_counter()
    for _ in range(repeat):
        session.decode(tokens, all_logits=True)
        session.rollback(base)
    return (time.perf_counter() - t) / repeat


def decode_costs(path: str, threads: int | None = None, repeat: int = 16) -> dict:
    """cpu_s_per_token_expert and step_overhead_s of the target, with its pages cached."""
    from .session import Session

    layout = read_layout(path)
    with Session(path, n_ctx=256, n_threads=threads, tap=False) as s:
        s.decode(s.tokenize("warm up the page cache and the threads"))
        tok = s.bos
        _decode_s(s, [tok] * 9, 2)  # warm-up
        one, nine = _decode_s(s, [tok], repeat), _decode_s(s, [tok] * 9, repeat)
    marginal = max(nine - one, 0.0) / 8
    return {"cpu_s_per_token_expert": marginal / (len(layout.layers) * layout.n_expert_used),
            "step_overhead_s": max(one - marginal, 0.0)}


def draft_s_per_token(path: str, threads: int | None = None, repeat: int = 16) -> float:
    from .session import Session

    with Session(path, n_ctx=256, n_threads=threads, tap=False) as s:
        s.decode(s.tokenize("warm up"))
        _decode_s(s, [s.bos], 2)
        return _decode_s(s, [s.bos], repeat)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="moespac calibrate", description=__doc__.split("\n")[0])
    p.add_argument("-m", "--model", required=True, help="a GGUF MoE on the disk to measure")
    p.add_argument("-md", "--model-draft", help="draft GGUF: also measure its time per token")
    p.add_argument("-t", "--threads", type=int, default=None)
    p.add_argument("--out", default=str(CALIBRATION_PATH))
    args = p.parse_args(argv)
    read_layout(args.model)  # one-line errors for bad models
    copy, read = memory_bps()
    profile = {
        "flash_read_bps": flash_read_bps(args.model),
        "page_in_latency_s": page_in_latency_s(args.model),
        "memcpy_bps": copy,
        "mem_bps": read,
        "mem_bytes": psutil.virtual_memory().total,
        **decode_costs(args.model, threads=args.threads),
        "model": os.path.abspath(args.model),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
    }
    if args.model_draft:
        profile["draft_s_per_token"] = draft_s_per_token(args.model_draft, threads=args.threads)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(profile, f, indent=1)
    print(f"flash read     {format_size(profile['flash_read_bps'])}/s\n"
          f"page-in        {profile['page_in_latency_s'] * 1e6:.0f} us per 4 KiB\n"
          f"memcpy         {format_size(copy)}/s\nmemory read    {format_size(read)}/s\n"
          f"expert matmul  {profile['cpu_s_per_token_expert'] * 1e6:.1f} us per token (upper bound)\n"
          f"step overhead  {profile['step_overhead_s'] * 1e3:.2f} ms\n"
          f"saved to {args.out}")
    return 0
