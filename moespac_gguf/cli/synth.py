"""`moespac synth`: write a tiny random-weight MoE GGUF (the tests' models)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..demo.synthetic import _EXPERT_DTYPES, SUPPORTED_ARCHS, SyntheticSpec, write_synthetic_moe


def _parser() -> argparse.ArgumentParser:
    d = SyntheticSpec()
    p = argparse.ArgumentParser(prog="moespac synth", description="Write a tiny random-weight MoE GGUF for tests.")
    p.add_argument("out", type=Path, help="output .gguf path")
    p.add_argument("--arch", default=d.arch, choices=SUPPORTED_ARCHS)
    p.add_argument("--layers", type=int, default=d.n_layer)
    p.add_argument("--embd", type=int, default=d.n_embd)
    p.add_argument("--experts", type=int, default=d.n_expert, help="0 writes a dense model")
    p.add_argument("--top-k", type=int, default=d.n_expert_used)
    p.add_argument("--ff", type=int, default=d.n_ff_exp, help="expert FFN width")
    p.add_argument("--dtype", default=d.expert_dtype, choices=tuple(_EXPERT_DTYPES), help="expert tensor type")
    p.add_argument("--heads", type=int, default=d.n_head)
    p.add_argument("--kv-heads", type=int, default=d.n_head_kv)
    p.add_argument("--shared", type=int, default=None, help="shared experts (qwen2moe, deepseek2, granitemoe)")
    p.add_argument("--dense-lead", type=int, default=None, help="leading dense layers (deepseek2)")
    p.add_argument("--router-std", type=float, default=d.router_std)
    p.add_argument("--seed", type=int, default=d.seed)
    return p


def main(argv: list[str]) -> int:
    a = _parser().parse_args(argv)
    spec = SyntheticSpec(
        arch=a.arch,
        n_layer=a.layers,
        n_embd=a.embd,
        n_expert=a.experts,
        n_expert_used=a.top_k,
        n_ff_exp=a.ff,
        expert_dtype=a.dtype,
        n_head=a.heads,
        n_head_kv=a.kv_heads,
        seed=a.seed,
        n_shared_expert=a.shared,
        n_dense_lead=a.dense_lead,
        router_std=a.router_std,
    )
    path = write_synthetic_moe(a.out, spec)
    print(
        f"{path}: {spec.arch}, {spec.n_layer} layers, {spec.n_expert} experts (top-{spec.n_expert_used}), "
        f"{path.stat().st_size / 2**20:.2f} MiB"
    )
    return 0
