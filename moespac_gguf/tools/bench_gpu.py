"""`moespac bench --gpu-budget SIZE`: the GPU mode, every contender with the same GPU memory for experts.

The same prompts, the same greedy decoding and the same GPU budget for expert weights; every
non-expert weight is on the GPU (-ngl, default all) and every contender runs in its own child
process (`moespac bench --child NAME CONFIG`), with the model files' pages warm in the page cache
and no memory cgroup: the question here is the GPU budget, not the disk. Contenders:

  llama.cpp+ncmoe     what a llama.cpp user does today: `-ngl 99 --n-cpu-moe N`, N the fewest
                      leading layers whose expert tensors stay in host memory so that every other
                      layer's experts (all of them) fit in the budget (ncmoe_layers); no draft
  llama.cpp+ncmoe+sd  the same placement with speculative decoding by the same draft
  lru                 every layer's experts in host memory, GPU expert slots (the budget) holding
                      each layer's most recently routed experts, up to LRU_INSERTS_PER_LAYER uploads
                      per slotted layer per step, no draft: llama.cpp PR #27861's expert cache
  moespac             the same slots filled by the speculative utility and the balancer, drafted

Reported per contender: tokens/s (also of the decode alone), host->device bytes (the slots'
copies; 0 for a static placement), the share of routed (row, expert) uses served from GPU memory
(slots, or the layers whose experts are on the GPU), and whether the greedy output equals the first
contender's. Greedy outputs of a quantized model may legitimately differ between placements (the
GPU's and the CPU's kernels round differently, and near-tied routing flips): same_output is
reported, never enforced. llama.cpp's op offload (batches of 32+ rows computed on the GPU, host
expert weights copied for them) is on for the static placements, as a llama.cpp user has it, and
its copies are not counted; the slot contenders need it off (patches/0012).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from ..core.errors import MoespacError
from ..core.layout import MoeLayout, read_layout
from ..core.paths import REPO_ROOT
from ..core.prompts import load_prompts
from ..core.units import format_size
from ..llama.devices import gpu_devices
from ..residency.utility import RecencyEstimator
from .bench import BenchConfig, child_argv, generate_prompts, open_contender

GPU_CONTENDERS = ("llama.cpp+ncmoe", "llama.cpp+ncmoe+sd", "lru", "moespac")
LRU_INSERTS_PER_LAYER = 2  # uploads per slotted layer per step: PR #27861's measured setting


def first_gpu_layer(n_layer: int, n_gpu_layers: int) -> int:
    """The first layer llama.cpp puts on the GPU for -ngl n (the output layer counts as one; -1: all)."""
    return 0 if n_gpu_layers < 0 else max(n_layer + 1 - n_gpu_layers, 0)


def ncmoe_layers(layout: MoeLayout, gpu_budget: int, n_gpu_layers: int = -1) -> int:
    """llama.cpp's `--n-cpu-moe N` for a GPU budget: the fewest leading layers whose expert tensors
    stay in host memory so that the experts of every other layer on the GPU (all `n_expert` of
    each) fit in `gpu_budget` bytes. Layers -ngl leaves on the CPU hold nothing on the GPU."""
    start = first_gpu_layer(layout.n_layer, n_gpu_layers)
    per_layer = [(l.index, layout.n_expert * l.bytes_per_expert) for l in layout.layers]
    for n in range(layout.n_layer + 1):
        if sum(b for i, b in per_layer if i >= max(n, start)) <= gpu_budget:
            return n
    return layout.n_layer  # not reached: with every layer's experts in host memory, none is on the GPU


def gpu_expert_layers(layout: MoeLayout, n_cpu_moe: int, n_gpu_layers: int = -1) -> list[int]:
    """The MoE layers whose expert tensors are on the GPU under `--n-cpu-moe n_cpu_moe`."""
    start = max(n_cpu_moe, first_gpu_layer(layout.n_layer, n_gpu_layers))
    return [l.index for l in layout.layers if l.index >= start]


class ExpertUses:
    """Speculative-loop observer: routed (row, expert) uses, and those whose expert is in GPU
    memory, for a static placement (the layers in `gpu_layers`), counted as SlotFiller counts its
    hits (every routed batch, the prompts' included)."""

    def __init__(self, layout: MoeLayout, gpu_layers: list[int]):
        self.n_expert = layout.n_expert
        self.layers = [l.index for l in layout.layers]
        self.gpu_layers = gpu_layers
        self.hits = self.uses = 0

    def on_draft(self, draft, ahead=None) -> None:
        pass

    def on_verify(self, event) -> None:
        if event.routing is not None:
            counts = event.routing.counts(self.n_expert)
            self.uses += int(counts[self.layers].sum())
            self.hits += int(counts[self.gpu_layers].sum())

    @property
    def hit_rate(self) -> float | None:
        return self.hits / self.uses if self.uses else None


def contender_draft(name: str, cfg: BenchConfig) -> str | None:
    return cfg.sd if name == "llama.cpp+ncmoe+sd" else cfg.model_draft if name == "moespac" else None


def run_contender(name: str, cfg: BenchConfig) -> dict:
    """Run inside the child: load with the contender's placement, generate every prompt, report."""
    layout = read_layout(cfg.model)
    ngl = cfg.n_gpu_layers if cfg.n_gpu_layers is not None else -1
    static = name.startswith("llama.cpp")
    n_cpu_moe = ncmoe_layers(layout, cfg.gpu_budget, ngl) if static else None
    draft = contender_draft(name, cfg)
    m = open_contender(cfg, draft, n_gpu_layers=ngl, gpu_budget=0 if static else cfg.gpu_budget, n_cpu_moe=n_cpu_moe)
    try:
        if m.target.gpu is None:
            raise MoespacError("no GPU device in this llama.cpp build (on lavapipe: GGML_VK_VISIBLE_DEVICES=0)")
        uses = None
        if static:
            gpu_layers = gpu_expert_layers(layout, n_cpu_moe, ngl)
            gpu_bytes = sum(layout.n_expert * l.bytes_per_expert for l in layout.layers if l.index in gpu_layers)
            uses = ExpertUses(layout, gpu_layers)
            m.decoder.subscribe(uses)
        else:
            if m.slots is None:
                raise MoespacError(f"{name}: no GPU expert slots (every layer's experts are on the GPU already)")
            gpu_bytes = m.slots.cache.buffer_bytes
            if name == "lru":
                n_slotted = int((m.slots.cache.n_slots > 0).sum())
                m.slots.follow(
                    RecencyEstimator(m.target.n_layer, layout.n_expert),
                    margin=0.0,
                    planner=None,
                    max_copies=LRU_INSERTS_PER_LAYER * n_slotted,
                )
        outputs, n_tokens, elapsed, pooled = generate_prompts(m, cfg)
        slots = m.slots.stats() if m.slots is not None else None
        return {
            "name": name,
            "draft": draft,
            "device": m.target.gpu.description,
            "n_gpu_layers": ngl,
            "n_cpu_moe": n_cpu_moe,  # None: every layer's experts in host memory, served by slots
            "gpu_expert_bytes": gpu_bytes,  # GPU memory holding expert weights (slots: their buffer)
            "tokens_per_s": n_tokens / elapsed,
            "n_tokens": n_tokens,
            "seconds": elapsed,
            "acceptance_rate": pooled.acceptance_rate,
            "h2d_bytes": slots["copied_bytes"] if slots else 0,
            "hit_rate": slots["hit_rate"] if slots else uses.hit_rate,
            "slots": slots,
            "decode": {
                "tokens_per_s": pooled.tokens_per_s,
                "seconds": pooled.t_total - pooled.t_prompt,
                "n_steps": pooled.n_steps,
                "n_drafted": pooled.n_drafted,
                "prefill_s": pooled.t_prompt,
            },
            "outputs": outputs,
        }
    finally:
        m.close()


def warm_file_cache(path: str, chunk: int = 16 << 20) -> None:
    """Read a file once so that its pages are in the page cache (each contender starts warm)."""
    with open(path, "rb", buffering=0) as f:
        while f.read(chunk):
            pass


def run_child(name: str, cfg: BenchConfig) -> dict:
    """One contender as a child process (no cgroup), its model files warm."""
    for f in cfg.files:
        warm_file_cache(f)
    proc = subprocess.run(child_argv(name, cfg), capture_output=True, text=True, cwd=REPO_ROOT)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        return {"name": name, "error": f"exit {proc.returncode}: {tail}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def check(cfg: BenchConfig) -> None:
    """MoespacError, in one line, for a GPU benchmark that cannot run as asked."""
    for f in cfg.files:
        if not Path(f).is_file():
            raise MoespacError(f"no such file: {f}")
    unknown = [n for n in cfg.contenders if n not in GPU_CONTENDERS]
    if unknown:
        raise MoespacError(
            f"unknown GPU contender(s) {', '.join(unknown)} (with --gpu-budget choose from {', '.join(GPU_CONTENDERS)})"
        )
    if not cfg.contenders:
        raise MoespacError("no contender to run")
    if "moespac" in cfg.contenders and not cfg.model_draft:
        raise MoespacError("moespac needs a draft model (-md)")
    if "llama.cpp+ncmoe+sd" in cfg.contenders and not cfg.sd:
        raise MoespacError("llama.cpp+ncmoe+sd needs a draft model (-md or --sd-draft)")
    if cfg.gpu_budget is None or cfg.gpu_budget < 0:
        raise MoespacError(f"--gpu-budget must be a size, got {cfg.gpu_budget}")
    if cfg.gpu_budget == 0 and any(n in ("lru", "moespac") for n in cfg.contenders):
        raise MoespacError("lru and moespac need a --gpu-budget above 0: it sizes their expert slots")
    if cfg.mem_cap:
        raise MoespacError("the GPU mode (--gpu-budget) runs without a memory cap: --mem-cap is for the CPU mode")
    if cfg.gate or cfg.draft_ahead is not None:
        raise MoespacError("--gate and --draft-ahead steer the page tier, which the GPU mode does not use")
    if cfg.n_gpu_layers == 0:
        raise MoespacError("-ngl 0 puts nothing on the GPU: the GPU mode needs -ngl -1 (all) or N > 0")
    if not gpu_devices():
        raise MoespacError(
            "the GPU mode needs a GPU device in this llama.cpp build (a Vulkan/CUDA/Metal build; "
            "on lavapipe, GGML_VK_VISIBLE_DEVICES=0)"
        )
    load_prompts(cfg.prompts, cfg.limit, select="spread")  # fail early on a bad prompt file


def run(cfg: BenchConfig, progress: bool = True) -> dict:
    """Every GPU contender of `cfg`, one after the other, as `moespac bench --gpu-budget ... --json` prints."""
    check(cfg)
    layout = read_layout(cfg.model)
    ngl = cfg.n_gpu_layers if cfg.n_gpu_layers is not None else -1
    n_cpu_moe = ncmoe_layers(layout, cfg.gpu_budget, ngl)
    if progress:
        on_gpu = gpu_expert_layers(layout, n_cpu_moe, ngl)
        print(
            f"[bench] GPU budget {format_size(cfg.gpu_budget)}: llama.cpp --n-cpu-moe {n_cpu_moe} "
            f"({len(on_gpu)} of {len(layout.layers)} MoE layers' experts on the GPU)",
            file=sys.stderr,
            flush=True,
        )
    results = []
    for name in cfg.contenders:
        if progress:
            print(f"[bench] {name} ...", file=sys.stderr, flush=True)
        results.append(run_child(name, cfg))
    first = results[0] if "outputs" in results[0] else None
    reference = first["outputs"] if first else None

    def same(r: dict) -> dict:
        if "outputs" not in r or reference is None:
            return {}
        agree = sum(a == b for a, b in zip(r["outputs"], reference))
        return {"same_output": r["outputs"] == reference, "same_prompts": f"{agree}/{len(reference)}"}

    return {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "mode": "gpu",
        "device": next((r["device"] for r in results if "device" in r), None),
        "env": {k: v for k, v in sorted(os.environ.items()) if k.startswith("GGML_")},  # e.g. GGML_VK_*
        "model": cfg.model,
        "draft": cfg.model_draft,
        "sd_draft": cfg.sd,
        "gpu_budget": cfg.gpu_budget,
        "n_gpu_layers": ngl,
        "n_cpu_moe": n_cpu_moe,
        "lru_inserts_per_layer": LRU_INSERTS_PER_LAYER,
        "reference": first["name"] if first else None,
        "prompts": str(cfg.prompts),
        "limit": cfg.limit,
        "n_predict": cfg.n_predict,
        "results": [{k: v for k, v in r.items() if k != "outputs"} | same(r) for r in results],
    }


def is_lavapipe(device: str | None) -> bool:
    return device is not None and "llvmpipe" in device.lower()


def markdown(report: dict, cfg: BenchConfig) -> str:
    """The GPU report as a table under a caption saying what was compared (and, on lavapipe,
    that its speeds mean nothing)."""
    results, device = report["results"], report["device"]
    ref = report["reference"] or "-"
    caption = (
        f"GPU mode on `{device or 'no device'}`: model `{Path(cfg.model).name}` "
        f"({format_size(os.path.getsize(cfg.model))}), draft "
        f"`{Path(cfg.model_draft).name if cfg.model_draft else '-'}`"
        f"{f' (llama.cpp+ncmoe+sd: `{Path(cfg.sd_draft).name}`)' if cfg.sd_draft else ''}, "
        f"GPU budget for experts {format_size(report['gpu_budget'])} (llama.cpp+ncmoe: `--n-cpu-moe "
        f"{report['n_cpu_moe']}`, the fewest leading layers in host memory for the rest to fit), "
        f"{cfg.limit} prompts x {cfg.n_predict} tokens, greedy, warm page cache. h2d: host->device bytes "
        "copied into slots (static placements copy none; llama.cpp's op offload of prompt batches is not "
        f"counted). hit rate: routed uses served from GPU memory. same output: vs {ref} (quantized models may "
        "legitimately differ between placements: GPU and CPU kernels round differently)."
    )
    if is_lavapipe(device):
        caption += (
            "\n\n**lavapipe is Mesa's Vulkan driver running on the CPU: the speeds below mean nothing. "
            "This run is a functional check (every contender runs, copies, hits, same output), not a benchmark.**"
        )
    lines = [
        caption,
        "",
        "| contender | draft | experts on GPU | tok/s | decode tok/s | h2d | copies | hit rate | acceptance "
        "| same output |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|:-:|",
    ]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['name']} | error: {r['error']} ||||||||")
            continue
        slots = r["slots"]
        if r["n_cpu_moe"] is not None:
            placed = f"--n-cpu-moe {r['n_cpu_moe']}: {format_size(r['gpu_expert_bytes'])}"
        else:
            placed = f"{slots['slots']} slots: {format_size(r['gpu_expert_bytes'])}"
        hit = "-" if r["hit_rate"] is None else f"{r['hit_rate']:.2f}"
        acc = "-" if r["acceptance_rate"] is None else f"{r['acceptance_rate']:.2f}"
        same = {True: "yes", False: f"NO ({r.get('same_prompts')} prompts)"}.get(r.get("same_output"), "-")
        draft = Path(r["draft"]).name if r["draft"] and r["draft"] != "self" else (r["draft"] or "-")
        lines.append(
            f"| {r['name']} | {draft} | {placed} | {r['tokens_per_s']:.2f} | {r['decode']['tokens_per_s']:.2f} | "
            f"{format_size(r['h2d_bytes'])} | {slots['copies'] if slots else 0} | {hit} | {acc} | {same} |"
        )
    return "\n".join(lines)
