"""The options of a run, declared once: `MoeSpac`'s keyword arguments and, from the same
declaration, the llama.cpp-style flags of every command that runs a model (cli.options).

Each field carries its default, its flags and its help; the CLI builds its parser from them and
passes the parsed values straight to `MoeSpac(**options)`, so a new option is one new field.
"""

from __future__ import annotations

import argparse
from dataclasses import MISSING, Field, dataclass, field

from ..decode.draft import SELF_DRAFT

DRAFT_AHEAD = 6  # tokens a self-draft runs ahead under a budget that cannot hold every expert


def keeps_at_use(choice: bool | None, draft_ahead: int) -> bool:
    """Whether the routing tap keeps experts at use (residency.keep) instead of the pinned engine
    fetching a planned set: `choice` (--keep-at-use / --no-keep-at-use), else where a self-draft runs
    ahead (`draft_ahead` rows). Measured under a cap (docs/results.md 8.3): with the self-draft
    faster on SmolMoE 8x (1.20-1.41x), level on smolmoe-16x; with a separate draft slower (0.69x)."""
    return choice if choice is not None else draft_ahead > 0


def option(default, *flags: str, help: str, type=None, metavar: str | None = None, action=None):
    """A dataclass field that is also a command-line flag (argparse's arguments)."""
    return field(
        default=default, metadata={"flags": flags, "help": help, "type": type, "metavar": metavar, "action": action}
    )


def flag_spec(f: Field) -> tuple[tuple[str, ...], dict]:
    """(flags, argparse keyword arguments) of an `option` field."""
    meta = f.metadata
    kwargs = {"dest": f.name, "help": meta["help"]}
    if f.default is not MISSING:
        kwargs["default"] = f.default
    if meta["action"]:
        kwargs["action"] = meta["action"]
    else:
        kwargs.update({k: meta[k] for k in ("type", "metavar") if meta[k] is not None})
    return meta["flags"], kwargs


@dataclass(frozen=True)
class ModelOptions:
    """How a MoeSpac runs: every keyword argument of `MoeSpac(model, draft, **options)`."""

    n_ctx: int = option(2048, "-c", "--ctx-size", type=int, help="context size (default %(default)s)")
    n_threads: int | None = option(None, "-t", "--threads", type=int, help="CPU threads (default: all cores)")
    n_batch: int | None = option(
        None,
        "-b",
        "--batch-size",
        type=int,
        help="batch size (default 512; with --mem-budget up to 1024: fewer prefill passes, each reads every "
        "expert not held)",
    )
    draft_max: int = option(8, "--draft-max", type=int, help="most tokens drafted per step (default %(default)s)")
    adaptive_draft: bool = option(
        True, "--no-adaptive-draft", action="store_false", help="always draft --draft-max tokens"
    )
    draft_ahead: int | None = option(
        None,
        "--draft-ahead",
        type=int,
        metavar="N",
        help=f"with -md {SELF_DRAFT} and --mem-budget: tokens the draft runs ahead each step, whose routing tells "
        f"the engine which experts to keep (default {DRAFT_AHEAD} where the budget cannot hold every expert, "
        "else 0)",
    )
    keep_at_use: bool | None = option(
        None,
        "--keep-at-use",
        action=argparse.BooleanOptionalAction,
        help="under a memory budget, let the routing tap keep the routed experts worth holding as they are read "
        "(--keep-at-use) or fetch a planned set (--no-keep-at-use); default: keep at use where a self-draft runs "
        "ahead, the planned set otherwise (what was faster on this machine's demo model: docs/results.md 8.3)",
    )
    seed: int | None = option(None, "-s", "--seed", type=int, help="seed of the sampler (default: random)")
    mem_budget: int | str | None = option(
        "auto",
        "--mem-budget",
        metavar="SIZE",
        help="memory for the model, e.g. 8G: moespac keeps the most useful experts resident within it. auto "
        "(default): measure the memory available (a memory cgroup's limit included) and turn the residency engine "
        "on, with the budget it computes, only when the model, the draft and the KV cache do not fit; off: never",
    )
    n_gpu_layers: int | None = option(
        None,
        "-ngl",
        "--n-gpu-layers",
        "--gpu-layers",
        type=int,
        metavar="N",
        help="layers on the GPU, their expert tensors kept in host memory (llama.cpp's --cpu-moe) for the expert "
        "slots to serve (default: all where this build has a GPU device, else 0; -1: all)",
    )
    gpu_budget: int | str | None = option(
        None,
        "--gpu-budget",
        metavar="SIZE",
        help="GPU memory for expert slots, e.g. 4G, that the balancer fills with the most useful experts; 0: none "
        "(default: the GPU's free memory once the model is loaded, less headroom)",
    )
    n_cpu_moe: int | None = option(
        None,
        "--n-cpu-moe",
        type=int,
        metavar="N",
        help="with -ngl, keep only the first N layers' expert tensors in host memory (the slots serve those) and "
        "put the others' on the GPU, as llama.cpp's --n-cpu-moe (default: every layer's, as --cpu-moe)",
    )
    main_gpu: int = option(0, "-mg", "--main-gpu", type=int, metavar="I", help="the GPU to use (default 0)")
    rpc_servers: str | list[str] | None = option(
        None,
        "--rpc",
        metavar="HOST:PORT[,...]",
        help="llama.cpp RPC servers (moespac rpc-server on another machine) whose devices hold layers first, "
        "as llama.cpp's --rpc (-ngl default: all); without a local GPU the first one's device also holds the "
        "expert slots, as a GPU would. The protocol has no authentication: trusted networks only",
    )
    flash_attn: str = option(
        "auto",
        "-fa",
        "--flash-attn",
        metavar="on|off|auto",
        help="the target's flash attention. auto (default): llama.cpp's own (on where the device has it) "
        "without a draft, off with one: its CPU kernel computes a batch differently from single tokens, and "
        "verification must reproduce the target's token-by-token output (greedy text with a draft equals the "
        "target's with -fa off)",
    )
    gate: str | None = option(
        None,
        "--gate",
        metavar="FILE",
        help="lookahead-gate sidecar (moespac train-gate) to prefetch the next layers' experts during each "
        "decode (needs the residency engine: a --mem-budget, or auto when the model does not fit)",
    )
    verbose: bool = option(False, "--verbose", action="store_true", help="show llama.cpp's log and the memory plan")

    @property
    def rpc_endpoints(self) -> list[str]:
        """rpc_servers as a list of HOST:PORT (a string is comma-separated, as --rpc takes it)."""
        rpc = self.rpc_servers.split(",") if isinstance(self.rpc_servers, str) else list(self.rpc_servers or [])
        return [r.strip() for r in rpc if r.strip()]


@dataclass(frozen=True)
class SamplingOptions:
    """How tokens are chosen: the sampling arguments of `create_completion` and
    `create_chat_completion` (greedy by default)."""

    temperature: float = option(
        0.0, "--temp", type=float, help="temperature (default 0 = greedy; below 0 is greedy too, as in llama.cpp)"
    )
    top_p: float = option(1.0, "--top-p", type=float, help="nucleus sampling threshold (default %(default)s: off)")
    top_k: int = option(0, "--top-k", type=int, help="sample among the k most likely tokens (default 0: all)")


SAMPLING = SamplingOptions()
