"""`moespac bench`: tokens/s and bytes read under a real memory cap, every contender side by side
(tools.bench), each in its own child process and memory cgroup; with `--gpu-budget SIZE`, the GPU
mode: tokens/s, host->device bytes and slot hit rates with the same GPU memory for experts
(tools.bench_gpu), each contender in its own child process; with `--no-cap`, the uncapped
comparison: prompt and decode tokens/s of moespac against stock llama.cpp's llama-bench and
llama-cpp-python where the model fits, in interleaved rounds (tools.bench_uncapped); with `--rpc
HOST:PORT` or `--link RATE,DELAY`, the RPC mode: this machine alone against the same plus another
machine's device, the same memory cap here, over a real or an emulated link (tools.bench_rpc)."""

from __future__ import annotations

import argparse
import json
from dataclasses import fields
from pathlib import Path

from ..api.options import ModelOptions
from ..core.atomic import atomic_write_text
from ..core.errors import MoespacError
from ..core.units import parse_size
from ..decode.draft import SELF_DRAFT
from ..demo.catalog import resolve_model
from ..tools import bench_gpu, bench_rpc, bench_uncapped
from ..tools.bench import CONTENDERS, DEFAULT_CONTENDERS, SLOT_FRACTION, BenchConfig, markdown, run, run_contender
from .options import MODEL_HELP, add_options, resolve_draft

BENCH_OPTIONS = ("n_ctx", "n_threads", "draft_max", "draft_ahead", "gate", "rpc_servers")


def main(argv: list[str]) -> int:
    if argv[:1] == ["--child"]:  # one contender (in its cgroup, CPU mode): `--child NAME CONFIG_JSON` (tools.bench*)
        name, config = argv[1:3]
        cfg = BenchConfig(**json.loads(config))
        if cfg.gpu_budget is not None:
            child = bench_gpu.run_contender
        elif cfg.uncapped:
            child = bench_uncapped.run_contender
        elif cfg.rpc_servers or cfg.links:
            child = bench_rpc.run_contender
        else:
            child = run_contender
        print(json.dumps(child(name, cfg)))
        return 0
    p = argparse.ArgumentParser(
        prog="moespac bench",
        description="Tokens/s and bytes read under a real memory "
        "cap, every contender side by side (llama.cpp, +MADV_RANDOM, +speculative "
        "decoding, moespac). With --gpu-budget SIZE, the GPU mode: tokens/s, host->device bytes and "
        "slot hit rates with the same GPU memory for experts (llama.cpp --n-cpu-moe N, the same + "
        "speculative decoding, an LRU expert cache, moespac). With --no-cap, the uncapped comparison: "
        "prompt and decode tokens/s against stock llama.cpp's llama-bench and llama-cpp-python "
        f"({', '.join(bench_uncapped.UNCAPPED_CONTENDERS)}), the model in memory, interleaved rounds. With --rpc "
        "HOST:PORT or --link RATE,DELAY, the RPC mode: local (this machine alone) against local+rpc (the same "
        "memory cap and options, plus an RPC server's device), auto (--mem-budget auto plus the server: the "
        "runtime's own choice) and llama.cpp-rpc (every layer on the server, as llama.cpp's --rpc): tokens/s, bytes "
        "read, bytes over the link, same output; --link calibrates each emulated link first.",
    )
    p.add_argument("-m", "--model", required=True, help=MODEL_HELP)
    p.add_argument(
        "-md",
        "--model-draft",
        help=f"draft GGUF, a demo model's name, or '{SELF_DRAFT}' (the target routing fewer experts)",
    )
    p.add_argument(
        "--mem-cap",
        type=parse_size,
        help="memory cap for each contender, e.g. 1.5G (0: no cap, the model fits); required without --gpu-budget "
        "or --no-cap",
    )
    p.add_argument(
        "--no-cap",
        dest="uncapped",
        action="store_true",
        help="the uncapped comparison: moespac against stock llama.cpp (llama-bench, built once without our "
        f"patches) and llama-cpp-python, CPU only, no memory cap (defaults: --limit {bench_uncapped.UNCAPPED_LIMIT}, "
        f"-t all cores, -md {bench_uncapped.DEFAULT_DRAFT} for moespac+draft)",
    )
    p.add_argument(
        "--rounds",
        type=int,
        metavar="R",
        help=f"--no-cap: interleaved rounds, every contender once per round (default {bench_uncapped.UNCAPPED_ROUNDS})",
    )
    p.add_argument(
        "--gpu-budget",
        type=parse_size,
        metavar="SIZE",
        help="the GPU mode: GPU memory for expert weights, the same for every contender, e.g. 4G "
        f"(contenders {', '.join(bench_gpu.GPU_CONTENDERS)}; no memory cap)",
    )
    p.add_argument(
        "-ngl",
        "--n-gpu-layers",
        type=int,
        metavar="N",
        help="GPU mode: layers on the GPU; RPC mode: layers on the remote; as llama.cpp's -ngl (default -1: all)",
    )
    p.add_argument("--prompts", default=BenchConfig.prompts)
    p.add_argument(
        "--limit",
        type=int,
        help=f"prompts (default {BenchConfig.limit}; with --no-cap {bench_uncapped.UNCAPPED_LIMIT})",
    )
    p.add_argument("-n", "--n-predict", type=int, default=BenchConfig.n_predict)
    add_options(p, ModelOptions, only=BENCH_OPTIONS, n_ctx=BenchConfig.n_ctx)
    p.add_argument(
        "--link",
        dest="links",
        action="append",
        default=[],
        metavar="RATE,DELAY",
        help="the RPC mode with an emulated remote: our own rpc-server in a network namespace behind a link "
        "shaped to RATE and one-way DELAY in tc's units (e.g. 1gbit,1ms); repeat it for a sweep, one row per "
        "link and remote contender (Linux, root; instead of --rpc)",
    )
    p.add_argument(
        "--sd-draft",
        metavar="FILE",
        help="llama.cpp+sd's draft GGUF instead of -md (e.g. a dense draft beside -md self, whose "
        "unrestricted self-draft thrashes under a cap without expert management)",
    )
    p.add_argument(
        "--contenders",
        help=f"comma-separated, from {', '.join(CONTENDERS)} (default: {', '.join(DEFAULT_CONTENDERS)}); "
        f"with --gpu-budget from {', '.join(bench_gpu.GPU_CONTENDERS)} (default: all); "
        f"with --no-cap from {', '.join(bench_uncapped.UNCAPPED_CONTENDERS)} (default: all); "
        f"with --rpc or --link from {', '.join(bench_rpc.RPC_CONTENDERS)} (default: all)",
    )
    p.add_argument(
        "--slot-fraction",
        type=float,
        default=SLOT_FRACTION,
        help="moespac+slots: share of the expert budget held in host-RAM expert slots",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--out", help="also write the JSON here (a .json name), and the table beside it (.md)")
    args = p.parse_args(argv)
    if args.out and Path(args.out).suffix != ".json":  # the table beside it would overwrite a .md name
        raise MoespacError(f"--out {args.out}: give a .json name (the table is written beside it as .md)")
    gpu = args.gpu_budget is not None
    if args.rounds is not None and not args.uncapped:
        raise MoespacError("--rounds is for the uncapped comparison (--no-cap)")
    if args.rpc_servers or args.links:
        return rpc(args)
    if args.uncapped:
        return uncapped(args)
    if not gpu and args.mem_cap is None:
        p.error("--mem-cap is required (or --gpu-budget SIZE for the GPU mode, or --no-cap)")
    if args.limit is None:
        args.limit = BenchConfig.limit
    contenders = args.contenders or ",".join(bench_gpu.GPU_CONTENDERS if gpu else DEFAULT_CONTENDERS)
    # every BenchConfig field is a flag of the same name, contenders as one comma-separated string;
    # -m, -md and --sd-draft take a demo model's name too
    values = {f.name: getattr(args, f.name) for f in fields(BenchConfig)}
    cfg = BenchConfig(
        **{
            **values,
            "model": str(resolve_model(args.model)),
            "model_draft": resolve_draft(args.model_draft),
            "sd_draft": resolve_draft(args.sd_draft),
            "mem_cap": args.mem_cap or 0,
            "rounds": BenchConfig.rounds,  # --no-cap's
            "contenders": tuple(contenders.split(",")),
        }
    )
    report = bench_gpu.run(cfg, progress=not args.json) if gpu else run(cfg, progress=not args.json)
    table = bench_gpu.markdown(report, cfg) if gpu else markdown(report["results"], cfg)
    return output(args, report, table)


def uncapped(args: argparse.Namespace) -> int:
    """`--no-cap`: the uncapped comparison (tools.bench_uncapped), its own defaults filled in."""
    if args.mem_cap is not None or args.gpu_budget is not None:
        raise MoespacError("--no-cap runs without a memory cap or GPU budget: not with --mem-cap or --gpu-budget")
    names = tuple((args.contenders or ",".join(bench_uncapped.UNCAPPED_CONTENDERS)).split(","))
    draft = args.model_draft or (bench_uncapped.DEFAULT_DRAFT if "moespac+draft" in names else None)
    values = {f.name: getattr(args, f.name) for f in fields(BenchConfig)}
    cfg = BenchConfig(
        **{
            **values,
            "model": str(resolve_model(args.model)),
            "model_draft": resolve_draft(draft),
            "sd_draft": args.sd_draft,  # refused by the check: kept so that it says so
            "mem_cap": 0,
            "limit": bench_uncapped.UNCAPPED_LIMIT if args.limit is None else args.limit,
            "rounds": bench_uncapped.UNCAPPED_ROUNDS if args.rounds is None else args.rounds,
            "contenders": names,
        }
    )
    report = bench_uncapped.run(cfg, progress=not args.json)
    return output(args, report, bench_uncapped.markdown(report, cfg))


def rpc(args: argparse.Namespace) -> int:
    """`--rpc` or `--link`: the RPC mode (tools.bench_rpc), with the capped benchmark's --mem-cap."""
    if args.mem_cap is None:
        raise MoespacError("the RPC mode needs --mem-cap SIZE: the same cap for every contender (0: none)")
    values = {f.name: getattr(args, f.name) for f in fields(BenchConfig)}
    cfg = BenchConfig(
        **{
            **values,
            "model": str(resolve_model(args.model)),
            "model_draft": resolve_draft(args.model_draft),
            "limit": BenchConfig.limit if args.limit is None else args.limit,
            "rounds": BenchConfig.rounds,  # --no-cap's
            "contenders": tuple((args.contenders or ",".join(bench_rpc.RPC_CONTENDERS)).split(",")),
            "links": tuple(args.links),
        }
    )
    report = bench_rpc.run(cfg, progress=not args.json)
    return output(args, report, bench_rpc.markdown(report, cfg))


def output(args: argparse.Namespace, report: dict, table: str) -> int:
    """Print the report (the table, or JSON with --json); --out writes both."""
    if args.out:
        atomic_write_text(args.out, json.dumps(report, indent=1))
        atomic_write_text(Path(args.out).with_suffix(".md"), table + "\n")
    print(json.dumps(report) if args.json else table)
    return 0
