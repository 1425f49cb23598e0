"""Command-line options built from their one declaration (api.options), and opening the model
a command names.

Every command that runs a model takes llama.cpp's flags (-m, -md, -c, -t, -b, --draft-max, ...)
from ModelOptions and SamplingOptions, so `moespac run`, `chat` and `bench` cannot drift apart
from each other or from the Python API.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields

from ..api.moespac import MoeSpac
from ..api.options import ModelOptions, SamplingOptions, flag_spec
from ..core.errors import MoespacError
from ..decode.draft import DRAFT_TOP_K, SELF_DRAFT
from ..demo.catalog import resolve_model
from ..residency.memory import AUTO

MODEL_HELP = "target GGUF (MoE), or a demo model's name (moespac models)"
DRAFT_HELP = (
    f"draft GGUF with the same vocabulary, a demo model's name, or '{SELF_DRAFT}' (the target routing "
    f"{DRAFT_TOP_K} expert per token: no extra weights)"
)


def add_options(p: argparse.ArgumentParser, declaration, only: tuple[str, ...] | None = None, **defaults) -> None:
    """Add the flags of a declaration's fields (all, or `only` these), with `defaults` overriding theirs."""
    for f in fields(declaration):
        if only is None or f.name in only:
            flags, kwargs = flag_spec(f)
            if f.name in defaults:
                kwargs["default"] = defaults[f.name]
            p.add_argument(*flags, **kwargs)


def option_values(args: argparse.Namespace, declaration) -> dict:
    """The parsed values of a declaration's fields (add_options added them all)."""
    return {f.name: getattr(args, f.name) for f in fields(declaration)}


def add_model_args(p: argparse.ArgumentParser) -> None:
    """-m, -md and every model and sampling option: the flags of a command that runs a model."""
    p.add_argument("-m", "--model", required=True, help=MODEL_HELP)
    p.add_argument("-md", "--model-draft", help=DRAFT_HELP)
    add_options(p, ModelOptions)
    add_options(p, SamplingOptions)


def n_predict(value: str) -> int:
    """-n as llama.cpp reads it: a positive count, or -1 for "until the end of text or a full context"
    (anything else is a MoespacError, which the command prints as one line)."""
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n == 0 or n < -1:
        raise MoespacError(f"-n {value}: give 1 or more tokens, or -1 (until the end of text or a full context)")
    return n


def add_n_predict(p: argparse.ArgumentParser, default: int, what: str) -> None:
    p.add_argument(
        "-n",
        "--n-predict",
        type=n_predict,
        default=default,
        help=f"{what} (default {default}; -1: until the end of text or a full context)",
    )


def resolve_draft(draft: str | None) -> str | None:
    """-md as MoeSpac takes it: a demo model's name becomes its file; SELF_DRAFT stays."""
    return str(resolve_model(draft)) if draft and draft != SELF_DRAFT else draft


def open_model(args: argparse.Namespace) -> MoeSpac:
    """The MoeSpac that -m, -md and the model options describe. Its memory plan goes to stderr in
    one line when an automatic plan turned the residency engine on, and always with --verbose."""
    m = MoeSpac(str(resolve_model(args.model)), resolve_draft(args.model_draft), **option_values(args, ModelOptions))
    plan = m.memory_plan
    if args.verbose or (plan.mode == AUTO and plan.engine):
        print(f"moespac: {plan.summary()}", file=sys.stderr)
    return m


def sampling(args: argparse.Namespace) -> dict:
    """The sampling keyword arguments of create_completion / create_chat_completion."""
    return option_values(args, SamplingOptions)
