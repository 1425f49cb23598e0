"""`moespac calibrate`: measure this machine's costs for the balancer and the simulator.

Saves CALIBRATION_PATH (JSON): flash_read_bps (cold reads of the model file the
way the engine fetches experts), fault_s_per_page (cold 4 KiB faults in order on
a MADV_RANDOM mapping, llama.cpp+random's way), both measured inside a small
memory cgroup with --under-pressure (what runs under a memory cap pay);
page_in_latency_s (cold random 4 KiB reads), memcpy_bps and mem_bps (numpy copy /
sum of a large array), mem_bytes (RAM), and from decodes with the model cached:
the marginal cost of one more token in a batch (9 tokens vs 1) divided by the
expert matmuls a token runs, cpu_s_per_token_expert (an upper bound: it includes
attention), the rest of a one-token step, step_overhead_s, and with -md the
draft's time per token, draft_s_per_token. Where the build has a GPU device, also the GPU tier's
costs under "gpu" (gpu_costs); with --rpc HOST:PORT, an RPC server's as the slot device under
"rpc", keyed by endpoint (rpc_costs).
"""

from __future__ import annotations

import json
import mmap
import os
import platform
import random
import subprocess
import sys
import time
from collections.abc import Sequence

import numpy as np
import psutil

from ..core.errors import MoespacError
from ..core.layout import read_layout
from ..residency import pages
from ..residency.pages import drop_file_cache
from .memcap import MemoryCap

PRESSURE_CAP = 128 << 20  # the child's cgroup: a third of what each measurement reads
# expert copies that measure a slot device's bandwidth: 0.3 s over 1 Gbit/s, 27 s over 10 Mbit/s
COPY_SAMPLE_BYTES = 32 << 20


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


def _cold_window(path: str, total: int, which: int) -> tuple[int, int]:
    """(offset, length) of window `which` (0 or 1) of the file: disjoint, page-aligned, each at most
    a third of the file, so the second measurement does not find the first one's pages."""
    size = os.path.getsize(path)
    length = min(total, size // 3) // mmap.ALLOCATIONGRANULARITY * mmap.ALLOCATIONGRANULARITY
    offset = (size // 6 if which == 0 else size // 2) // mmap.ALLOCATIONGRANULARITY * mmap.ALLOCATIONGRANULARITY
    return offset, length


def flash_read_bps(path: str, chunk: int, total: int = 384 << 20) -> float:
    """Cold reads through a mapping of the file the way the engine fetches an expert: MADV_WILLNEED
    then MADV_POPULATE_READ on each `chunk` (one expert's bytes), in order."""
    offset, length = _cold_window(path, total, 0)
    drop_file_cache(path)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), length, prot=mmap.PROT_READ, offset=offset):
        start = pages.find_mapping(path).start
        t = time.perf_counter()
        for pos in range(0, length, chunk):
            n = min(chunk, length - pos)
            pages.madvise(start + pos, n, pages.MADV_WILLNEED)
            pages.madvise(start + pos, n, pages.MADV_POPULATE_READ)
        return length / (time.perf_counter() - t)


def fault_s_per_page(path: str, total: int = 384 << 20) -> float:
    """Seconds per 4 KiB page fault on a cold MADV_RANDOM mapping of the file, touched in order:
    how llama.cpp+random (and any mmap without read-ahead) pages a missing expert in."""
    offset, length = _cold_window(path, total, 1)
    drop_file_cache(path)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), length, prot=mmap.PROT_READ, offset=offset) as m:
        m.madvise(mmap.MADV_RANDOM)
        touch = np.frombuffer(m, dtype=np.uint8)[:: mmap.PAGESIZE]
        t = time.perf_counter()
        int(touch.sum())  # one read per page, in order: one fault each
        elapsed = time.perf_counter() - t
        del touch
    return elapsed / (length // mmap.PAGESIZE)


def read_costs(path: str, chunk: int, under_pressure: bool) -> dict:
    """flash_read_bps (reads of `chunk` bytes, one expert's) and fault_s_per_page; `under_pressure`:
    measured in a child process inside a memory cgroup much smaller than what it reads, so every
    page read first evicts another, as in a run under `--mem-cap`/`--mem-budget` (reclaim, not the
    disk, can set the pace there)."""
    if not under_pressure:
        return read_costs_here(path, chunk)
    # the child must not parse the GGUF: its metadata (the vocabulary) alone would fill the cgroup
    with MemoryCap(PRESSURE_CAP, "calibrate") as cap:
        proc = subprocess.run(
            [sys.executable, "-m", "moespac_gguf.cli", "calibrate", "--read-costs-child", str(chunk), "-m", path],
            capture_output=True,
            text=True,
            preexec_fn=cap.preexec,
        )
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise MoespacError(f"read costs under memory pressure failed: {tail}")
    return {**json.loads(proc.stdout), "pressure_cap_bytes": PRESSURE_CAP}


def read_costs_here(path: str, chunk: int) -> dict:
    """read_costs in this process (the child of --under-pressure runs this)."""
    return {"flash_read_bps": flash_read_bps(path, chunk), "fault_s_per_page": fault_s_per_page(path)}


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


def _decode_s(session, tokens: list[int], repeat: int, all_logits: bool = True) -> float:
    """Mean time of decoding `tokens` at a fixed position (rolled back after each), every token's
    logits read back (a verification batch's) or, without `all_logits`, the last one's."""
    base = session.n_past
    t = time.perf_counter()
    for _ in range(repeat):
        session.decode(tokens, all_logits=all_logits)
        session.rollback(base)
    return (time.perf_counter() - t) / repeat


def decode_costs(layout, threads: int | None = None, repeat: int = 16) -> dict:
    """cpu_s_per_token_expert and step_overhead_s of the target (`layout`'s file), with its pages cached."""
    from ..llama.session import Session  # lazy: libllama stays out of the 128 MiB read-costs child

    with Session(layout.path, n_ctx=256, n_threads=threads, tap=False) as s:
        s.decode(s.tokenize("warm up the page cache and the threads"))
        tok = s.bos
        _decode_s(s, [tok] * 9, 2)  # warm-up
        one, nine = _decode_s(s, [tok], repeat), _decode_s(s, [tok] * 9, repeat)
    marginal = max(nine - one, 0.0) / 8
    return {
        "cpu_s_per_token_expert": marginal / (len(layout.layers) * layout.n_expert_used),
        "step_overhead_s": max(one - marginal, 0.0),
    }


def draft_s_per_token(draft: str, layout, threads: int | None = None, repeat: int = 16) -> float:
    """One drafted token's time; `draft` as -md takes it (a file, or 'self' for the target `layout`)."""
    from ..decode.draft import draft_source  # lazy: libllama stays out of the 128 MiB read-costs child

    with draft_source(draft).open(layout, n_ctx=256, n_threads=threads, tap=False) as s:
        s.decode(s.tokenize("warm up"))
        _decode_s(s, [s.bos], 2)
        return _decode_s(s, [s.bos], repeat)


def step_times(
    layout, n_cpu_moe: int | None, threads: int | None, verify_batch: int, all_logits: bool = True, **devices
) -> tuple[float, float]:
    """(one token, a batch of `verify_batch`) step times with every layer on the slot device
    (llama.session.Session.slot_device of a session opened with `devices`) and the expert
    tensors of the first `n_cpu_moe` layers (None: all) in host memory; `all_logits` as _decode_s."""
    from ..llama.session import Session  # lazy: libllama stays out of the 128 MiB read-costs child

    with Session(
        layout.path, n_ctx=256, n_threads=threads, tap=False, n_gpu_layers=-1, n_cpu_moe=n_cpu_moe, **devices
    ) as s:
        s.decode(s.tokenize("warm up the page cache, the threads and the shaders"))
        tok = s.bos
        _decode_s(s, [tok] * verify_batch, 2, all_logits)  # warm-up
        return _decode_s(s, [tok], 8, all_logits), _decode_s(s, [tok] * verify_batch, 8, all_logits)


def slot_device_costs(
    layout, threads: int | None = None, verify_batch: int = 9, all_logits: bool = True, **devices
) -> dict:
    """What the slot device of a session opened with `devices` costs, for gpu_costs and rpc_costs:
    - one_s: the step time of a token with every expert on the device (step_times, `all_logits`
      as there);
    - marginal_s: the marginal time of a token in a verification batch of `verify_batch` (vs 1)
      there, per expert matmul it runs;
    - copy_bps: expert copies into slots on the device, the path the slot tier takes, up to
      COPY_SAMPLE_BYTES of them (bytes / wall time, up to a round trip after the last copy: a
      remote device has then taken them);
    - device: the slot device (a llama.devices.Device)."""
    from ..llama.session import Session  # lazy: libllama stays out of the 128 MiB read-costs child
    from ..llama.slots import SlotCache  # lazy: as above

    one, batch = step_times(layout, 0, threads, verify_batch, all_logits, **devices)
    with Session(
        layout.path, n_ctx=64, n_threads=threads, tap=False, n_gpu_layers=-1, op_offload=False, **devices
    ) as s:
        with SlotCache(s, [min(4, layout.n_expert)] * s.n_layer) as cache:
            t = time.perf_counter()
            for layer, slot in [(l, i) for l in cache.moe_layers for i in range(int(cache.n_slots[l]))]:
                if cache.copied_bytes >= COPY_SAMPLE_BYTES:
                    break
                cache.copy_async(layer, slot, slot)
            cache.wait()
            s.slot_device.memory()  # ggml-rpc answers it after the copies sent before it
            copy_bps = cache.copied_bytes / (time.perf_counter() - t)
    ops = len(layout.layers) * layout.n_expert_used
    return {
        "one_s": one,
        "marginal_s": max(batch - one, 0.0) / (verify_batch - 1) / ops,
        "copy_bps": copy_bps,
        "device": s.slot_device,
    }


def gpu_costs(layout, cpu_s_per_token_expert: float, threads: int | None = None, verify_batch: int = 9) -> dict | None:
    """The GPU tier's costs (residency.costs.GPU_KEYS) on GPU device 0, None without one, from
    slot_device_costs: gpu_s_per_token_expert_batch its marginal_s; gpu_s_per_token_expert (one
    token): the experts moved from the CPU side (llama.cpp's --cpu-moe, everything else on the
    GPU) to the GPU save (t_cpu_moe - t_gpu) per token over L x k expert matmuls, so a GPU expert
    costs cpu_s_per_token_expert less that share (floored at a tenth of the batch figure: the
    difference also holds the activations' round trips); h2d_bps its copy_bps; unified_memory
    whether the GPU computes from the host's DRAM (llama.devices)."""
    from ..llama.devices import gpu_devices  # lazy: libllama stays out of the 128 MiB read-costs child

    if not gpu_devices():
        return None
    m = slot_device_costs(layout, threads, verify_batch)
    saved = (step_times(layout, None, threads, verify_batch)[0] - m["one_s"]) / (
        len(layout.layers) * layout.n_expert_used
    )
    gpu = m["device"]
    return {
        "device": f"{gpu.name} ({gpu.description})",
        "gpu_s_per_token_expert": max(cpu_s_per_token_expert - saved, m["marginal_s"] / 10, 1e-9),
        "gpu_s_per_token_expert_batch": max(m["marginal_s"], 1e-9),
        "h2d_bps": m["copy_bps"],
        "unified_memory": gpu.unified_memory,
    }


def round_trip_s(device, n: int = 64) -> float:
    """The median time of asking `device` its free memory: one round trip with a few bytes each
    way for an RPC server's device (ggml-rpc sends every call and waits for the answer)."""
    times = []
    for _ in range(n):
        t = time.perf_counter()
        device.memory()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def rpc_costs(layout, endpoint: str, threads: int | None = None) -> dict:
    """The costs of the RPC server at `endpoint` as the slot device (residency.costs.RPC_KEYS),
    from slot_device_costs on its device: link_bps its copy_bps (expert copies over the link),
    round_trip_s (round_trip_s), and remote_s_per_token_expert its marginal_s: the marginal
    compute of a token's expert there, without the fixed costs of a step, which are the link's
    and which the planner charges as round trips (residency.plan), nor the logits rows of the
    batch's other tokens coming back, which are the link's bandwidth too (8 rows of SmolMoE's
    192 KiB over 10 Mbit/s add 2.6 ms to each of its 60 expert matmuls). gpu_costs' one-token figure
    (cpu_s_per_token_expert less the --cpu-moe saving) does not serve here: the saving holds the
    round trips --cpu-moe adds to every layer, several per layer over a link, and what is left
    once one per layer is taken out is noise (127.0.0.1, a 256-wide synthetic model with a CPU
    expert at 44 us: +48 us, then -124 us, run to run).
    Measured only without a local GPU: one would hold the slots (llama.session), so the runtime
    would not use the figures (MOESPAC_NO_GPU=1 hides it)."""
    from ..llama.devices import gpu_devices  # lazy: libllama stays out of the 128 MiB read-costs child

    if gpu_devices():
        raise MoespacError(
            "calibrate --rpc measures an RPC server as the slot device, which it is only without a local GPU: "
            "run it with MOESPAC_NO_GPU=1"
        )
    m = slot_device_costs(layout, threads, all_logits=False, rpc_servers=[endpoint])
    device = m["device"]
    return {
        "device": f"{device.name} ({device.description})",
        "remote_s_per_token_expert": max(m["marginal_s"], 1e-9),
        "link_bps": m["copy_bps"],
        "round_trip_s": round_trip_s(device),
    }


def calibrate(
    model: str,
    draft: str | None = None,
    threads: int | None = None,
    under_pressure: bool = False,
    rpc: Sequence[str] = (),
) -> dict:
    """Every measurement of the module docstring, as the calibration file stores it, with the
    RPC servers at the endpoints `rpc` under "rpc" (rpc_costs)."""
    layout = read_layout(model)  # one-line errors for bad models
    copy, read = memory_bps()
    profile = {
        **read_costs(model, int(layout.mean_bytes_per_expert), under_pressure),
        "page_in_latency_s": page_in_latency_s(model),
        "memcpy_bps": copy,
        "mem_bps": read,
        "mem_bytes": psutil.virtual_memory().total,
        # prefetches overlap compute only on a core the decode threads leave free
        "io_overlap": 0.0 if (threads or os.cpu_count() or 1) >= (os.cpu_count() or 1) else 1.0,
        **decode_costs(layout, threads=threads),
        "model": os.path.abspath(model),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
    }
    if draft:
        profile["draft_s_per_token"] = draft_s_per_token(draft, layout, threads=threads)
    gpu = gpu_costs(layout, profile["cpu_s_per_token_expert"], threads=threads)
    if gpu is not None:
        profile["gpu"] = gpu
    if rpc:
        profile["rpc"] = {e: rpc_costs(layout, e, threads=threads) for e in rpc}
    return profile
