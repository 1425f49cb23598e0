"""Device choice where this build (or the test run) shows no GPU: -ngl falls back to the CPU,
as llama.cpp does, with a one-line notice, and computes exactly what the CPU path computes."""

from __future__ import annotations

import subprocess
import sys

import numpy as np

from moespac_gguf.api.moespac import MoeSpac
from moespac_gguf.llama import devices
from moespac_gguf.llama.session import Session


def test_gpu_layers_without_a_gpu_run_on_the_cpu(tiny_moe, capsys, monkeypatch):
    monkeypatch.setattr(devices, "_said_no_gpu", False)
    path = tiny_moe(n_layer=2)
    with Session(path, n_ctx=128) as s:
        ref = s.decode(s.tokenize("hello there"), all_logits=True)
    for _ in range(2):
        with Session(path, n_ctx=128, n_gpu_layers=-1) as s:
            assert s.gpu is None
            got = s.decode(s.tokenize("hello there"), all_logits=True)
        assert np.array_equal(ref, got)
    err = capsys.readouterr().err
    assert err.count("no GPU device") == 1 and err.count("\n") == 1  # once, on one line


def test_moespac_with_a_gpu_budget_but_no_gpu_has_no_slots(tiny_moe):
    with MoeSpac(tiny_moe(n_layer=2), n_ctx=128, n_gpu_layers=-1, gpu_budget="64M") as m:
        out = m.create_completion("hello", max_tokens=4)
    assert m.slots is None and "slots" not in out["moespac"]


def test_gpu_flags_are_the_llama_cpp_ones():
    r = subprocess.run([sys.executable, "-m", "moespac_gguf.cli", "run", "--help"], capture_output=True, text=True)
    for flag in ("-ngl", "--n-gpu-layers", "--gpu-budget", "--main-gpu"):
        assert flag in r.stdout


def test_bad_gpu_options_are_one_line_errors(tiny_moe):
    path = str(tiny_moe(n_layer=2))
    for flags, message in (
        (["--gpu-budget", "12QQ"], "as a size"),
        (["--gpu-budget=-5"], "as a size"),
        (["--n-cpu-moe", "-2"], "--n-cpu-moe must be 0 or more"),
    ):
        r = subprocess.run(
            [sys.executable, "-m", "moespac_gguf.cli", "run", "-m", path, "-p", "hi", "-n", "2", *flags],
            capture_output=True,
            text=True,
        )
        assert r.returncode == 2 and message in r.stderr and r.stderr.count("\n") == 1, (flags, r.stderr)


def test_a_negative_gpu_budget_in_the_api_is_refused(tiny_moe):
    import pytest

    from moespac_gguf import MoespacError

    with pytest.raises(MoespacError, match="--gpu-budget must be 0 or more"):
        MoeSpac(tiny_moe(n_layer=2), gpu_budget=-5)
