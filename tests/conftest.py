"""Fixtures shared by the whole test-suite."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import pytest

from moespac_gguf.demo.synthetic import SyntheticSpec, write_synthetic_moe


@pytest.fixture(scope="session")
def tiny_moe(tmp_path_factory) -> Callable[..., Path]:
    """Path factory for synthetic GGUF models, written once per spec per session.

    `tiny_moe()` is the default qwen3moe; `tiny_moe(arch="llama", expert_dtype="Q8_0")`
    or `tiny_moe(spec)` for anything else.
    """
    root = tmp_path_factory.mktemp("synthetic")
    cache: dict[SyntheticSpec, Path] = {}

    def make(spec: SyntheticSpec | None = None, **overrides) -> Path:
        spec = dataclasses.replace(spec or SyntheticSpec(), **overrides)
        if spec not in cache:
            cache[spec] = write_synthetic_moe(root / f"{len(cache)}-{spec.arch}.gguf", spec)
        return cache[spec]

    return make
