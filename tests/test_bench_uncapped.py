"""`moespac bench --no-cap`: the uncapped comparison (tools.bench_uncapped).

The report's assembly (medians over rounds, the same-output check against the reference, errors
kept in their rows), the table and its targets line are pure logic, tested on fabricated results;
the CLI's refusals run without a model run. One test runs two real contenders end to end on the
demo model (skipped where it is not built); llama-bench is never run here (its first build takes
minutes): run `moespac bench --no-cap` by hand for it.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from dataclasses import replace

import pytest

from moespac_gguf.core.errors import MoespacError
from moespac_gguf.demo.synthetic import SyntheticSpec
from moespac_gguf.tools import bench_uncapped
from moespac_gguf.tools.bench import BenchConfig
from moespac_gguf.tools.bench_uncapped import (
    UNCAPPED_CONTENDERS,
    assemble,
    check,
    llama_bench_argv,
    markdown,
    parse_llama_bench,
    reference_of,
    same_output,
    targets,
)

TARGET = SyntheticSpec(arch="qwen3moe", n_layer=2, n_embd=128, n_ff_exp=128, seed=5)
OUT = [[1, 2, 3], [4, 5, 6]]  # two prompts' greedy token ids


def result(name: str, prompt: float, decode: float, outputs=OUT, **extra) -> dict:
    r = {"name": name, "prompt_tokens_per_s": prompt, "decode_tokens_per_s": decode, **extra}
    return r if outputs is None else r | {"outputs": outputs}


def cfg_for(tmp_path, **kw) -> BenchConfig:
    model = tmp_path / "m.gguf"
    model.write_bytes(b"\0" * 1024)
    return BenchConfig(model=str(model), uncapped=True, limit=2, n_predict=3, n_threads=2, **kw)


def fabricated(tmp_path) -> dict:
    """Two rounds of every contender: llama-bench has no text, moespac+self differs on one prompt."""
    rounds = {
        "llama-bench": [result("llama-bench", 100.0, 20.0, None), result("llama-bench", 102.0, 22.0, None)],
        "llama-cpp-python": [
            result("llama-cpp-python", 90.0, 19.0, outputs_fa_off=OUT),
            result("llama-cpp-python", 94.0, 21.0, outputs_fa_off=OUT),
        ],
        "moespac": [result("moespac", 92.0, 21.0), result("moespac", 96.0, 23.0)],
        "moespac-fa-off": [
            result("moespac-fa-off", 90.0, 20.0, flash_attn=False),
            result("moespac-fa-off", 90.0, 20.0, flash_attn=False),
        ],
        "moespac+draft": [
            result("moespac+draft", 80.0, 30.0, draft="d.gguf"),
            result("moespac+draft", 82.0, 32.0, draft="d.gguf"),
        ],
        "moespac+self": [
            result("moespac+self", 91.0, 15.0, draft="self"),
            result("moespac+self", 91.0, 15.0, [[1, 2, 3], [4, 5, 7]], draft="self"),
        ],
    }
    return assemble(cfg_for(tmp_path, rounds=2), rounds)


def test_the_report_gives_the_median_of_rounds_and_keeps_each_round(tmp_path):
    report = fabricated(tmp_path)
    rows = {r["name"]: r for r in report["results"]}
    assert list(rows) == list(UNCAPPED_CONTENDERS) and report["reference"] == "llama-cpp-python"
    assert rows["llama-bench"]["prompt_tokens_per_s"] == 101.0 and rows["llama-bench"]["decode_tokens_per_s"] == 21.0
    assert rows["moespac"]["decode_tokens_per_s"] == 22.0 and rows["moespac+draft"]["draft"] == "d.gguf"
    assert [r["decode_tokens_per_s"] for r in rows["moespac"]["rounds"]] == [21.0, 23.0]
    assert all("outputs" not in r for row in rows.values() for r in row["rounds"])  # ids compared, not kept
    json.dumps(report)  # JSON-able
    # same output: llama-bench has no text; moespac+self's second round differs on one prompt
    assert "same_output" not in rows["llama-bench"]
    assert rows["moespac"]["same_output"] is True and rows["llama-cpp-python"]["same_output"] is True
    assert rows["moespac+self"]["same_output"] is False and rows["moespac+self"]["same_prompts"] == "1/2"


def test_same_output_compares_every_round_to_the_reference():
    ref = [[1, 2], [3, 4]]
    assert same_output([{"outputs": ref}, {"outputs": [[1, 2], [3, 4]]}], ref) == {
        "same_output": True,
        "same_prompts": "2/2",
    }
    assert same_output([{"outputs": ref}, {"outputs": [[1, 2], [3, 5]]}], ref)["same_output"] is False
    assert same_output([{"outputs": [[1], [3, 4]]}], ref) == {"same_output": False, "same_prompts": "1/2"}
    assert same_output([{"prompt_tokens_per_s": 1.0}], ref) == {}  # llama-bench: nothing to compare
    assert same_output([{"outputs": ref}], None) == {}  # no reference ran


def test_the_reference_is_llama_cpp_python_else_moespac():
    ok = [result("x", 1, 1)]
    assert reference_of({"llama-bench": [result("llama-bench", 1, 1, None)], "moespac": ok}) == "moespac"
    assert reference_of({"llama-cpp-python": ok, "moespac": ok}) == "llama-cpp-python"
    failed = [result("llama-cpp-python", 1, 1), {"name": "llama-cpp-python", "error": "exit 1: boom"}]
    assert reference_of({"llama-cpp-python": failed, "moespac": ok}) == "moespac"
    assert reference_of({"llama-bench": [result("llama-bench", 1, 1, None)]}) is None


def test_a_failed_contender_keeps_its_error_and_the_others_their_rows(tmp_path):
    rounds = {
        "llama-cpp-python": [{"name": "llama-cpp-python", "error": "exit 1: no memory"}],
        "moespac": [result("moespac", 10.0, 5.0)],
        "moespac+self": [result("moespac+self", 10.0, 4.0, [[1, 2, 3], [9]])],
    }
    report = assemble(cfg_for(tmp_path, rounds=1), rounds)
    rows = {r["name"]: r for r in report["results"]}
    assert rows["llama-cpp-python"]["error"] == "exit 1: no memory" and report["reference"] == "moespac"
    assert rows["moespac+self"]["same_output"] is False
    table = markdown(report, cfg_for(tmp_path))
    assert "| llama-cpp-python | error: exit 1: no memory |" in table
    assert "| moespac | 10.00 | 5.00 | - | - | - | reference |" in table
    assert "NO (1/2 prompts)" in table


def test_the_table_ratios_and_targets(tmp_path):
    report = fabricated(tmp_path)
    table = markdown(report, cfg_for(tmp_path))
    lines = table.splitlines()
    head = lines.index(next(line for line in lines if line.startswith("| contender")))
    assert lines[head] == (
        "| contender | prompt tok/s | decode tok/s | decode vs llama-bench | decode vs llama-cpp-python "
        "| prompt vs llama-bench | same output |"
    )
    rows = {line.split(" | ")[0].strip("| "): line for line in lines[head + 2 : head + 8]}
    assert rows["llama-bench"] == "| llama-bench | 101.00 | 21.00 | 1.00x | 1.05x | 1.00x | - |"
    assert rows["llama-cpp-python"] == "| llama-cpp-python | 92.00 | 20.00 | 0.95x | 1.00x | 0.91x | reference |"
    assert rows["moespac"] == "| moespac | 94.00 | 22.00 | 1.05x | 1.10x | 0.93x | yes |"
    assert rows["moespac+self"].endswith("| NO (1/2 prompts) |")
    assert "off for the drafted rows" in lines[0] and "median of 2 interleaved round(s)" in lines[0]
    got = {what: (round(x, 3), ok) for what, x, ok in targets(report)}
    assert got == {
        "moespac decode ≥ 0.95× llama-bench": (round(22 / 21, 3), True),
        "moespac decode ≥ 1× llama-cpp-python": (1.1, True),
        "moespac prompt ≥ 0.9× llama-bench": (round(94 / 101, 3), True),
        "moespac+draft decode ≥ 0.95× moespac": (round(31 / 22, 3), True),
        "moespac+draft decode ≥ 0.95× moespac-fa-off": (round(31 / 20, 3), True),
    }
    assert rows["moespac-fa-off"].endswith("| yes |")  # against the reference's output with -fa off
    assert lines[-1].startswith("Targets: moespac decode ≥ 0.95× llama-bench: 1.05× met;")


def test_a_missed_or_unmeasured_target_says_so(tmp_path):
    rounds = {
        "llama-bench": [result("llama-bench", 100.0, 20.0, None)],
        "moespac": [result("moespac", 80.0, 18.0)],
        "moespac+draft": [result("moespac+draft", 80.0, 10.0)],
    }
    report = assemble(cfg_for(tmp_path, rounds=1), rounds)
    got = {what: ok for what, _, ok in targets(report)}
    assert got["moespac decode ≥ 0.95× llama-bench"] is False  # 0.90
    assert got["moespac prompt ≥ 0.9× llama-bench"] is False  # 0.80
    assert got["moespac+draft decode ≥ 0.95× moespac"] is False
    assert got["moespac decode ≥ 1× llama-cpp-python"] is None  # it did not run
    last = markdown(report, cfg_for(tmp_path)).splitlines()[-1]
    assert "0.90× **missed**" in last and "llama-cpp-python: - not measured" in last


def test_llama_bench_is_asked_for_the_runtimes_settings_and_parsed(tmp_path):
    cfg = cfg_for(tmp_path, rounds=1)
    common = {"-m": cfg.model, "-t": "2", "-r": "2", "-ngl": "0", "-nopo": "1", "-fa": "auto", "-o": "json"}
    pp, tg = (llama_bench_argv("/bin/llama-bench", cfg, 37, test) for test in ("pp", "tg"))
    assert dict(zip(pp[1::2], pp[2::2])) == common | {"-p": "37", "-n": "0"}
    assert dict(zip(tg[1::2], tg[2::2])) == common | {"-p": "0", "-n": "3", "-d": "37"}  # decode after a prompt
    rows = [
        {"n_prompt": 37, "n_gen": 0, "avg_ts": 120.5, "stddev_ts": 1.5, "samples_ts": [119.0, 122.0]},
        {"n_prompt": 0, "n_gen": 3, "avg_ts": 20.25, "stddev_ts": 0.25, "samples_ts": [20.0, 20.5]},
    ]
    tests = parse_llama_bench(rows)
    assert tests["pp"]["tokens_per_s"] == 120.5 and tests["pp"]["n"] == 37
    assert tests["tg"]["tokens_per_s"] == 20.25 and tests["tg"]["n"] == 3
    with pytest.raises(MoespacError, match="no pp and tg"):
        parse_llama_bench(rows[:1])


def test_the_stock_llama_bench_comes_from_the_build_script(tmp_path, monkeypatch):
    """The build script's last stdout line is the binary; a failed build is one line naming its log."""
    binary = tmp_path / "llama-bench"
    binary.write_text("")
    script = tmp_path / "build.py"
    monkeypatch.setattr(bench_uncapped, "BUILD_SCRIPT", script)
    script.write_text(f"print('[build-llama] building stock llama.cpp llama-bench')\nprint({str(binary)!r})\n")
    assert bench_uncapped.stock_llama_bench() == binary
    log = tmp_path / "stock" / "build.log"
    script.write_text(
        "import sys\n"
        f"print('[build-llama] error: stock llama-bench build failed; last lines of {log}:\\nerror: boom\\n"
        "make: *** [all] Error 2', file=sys.stderr)\nsys.exit(1)\n"
    )
    with pytest.raises(MoespacError) as e:
        bench_uncapped.stock_llama_bench()
    assert str(e.value) == f"could not build the stock llama-bench (exit 1): see {log}"


def test_check_refuses_what_the_uncapped_mode_does_not_do(tmp_path):
    cfg = cfg_for(tmp_path, contenders=("moespac",), prompts=str(tmp_path / "none.jsonl"))
    cases = {
        "unknown contender": {"contenders": ("llama.cpp",)},
        "no contender": {"contenders": ()},
        "not with --mem-cap": {"mem_cap": 1 << 30},
        "--sd-draft": {"sd_draft": "x.gguf"},
        "--rounds must be 1 or more": {"rounds": 0},
        "-n must be 2 or more": {"n_predict": 1},
        "moespac+draft needs a draft model": {"contenders": ("moespac+draft",)},
        "prompt file not found": {},
    }
    for message, changes in cases.items():
        with pytest.raises(MoespacError, match=re.escape(message)):
            check(replace(cfg, **changes))


def _bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "moespac_gguf.cli", "bench", *args], capture_output=True, text=True, timeout=120
    )


def test_cli_refusals_are_one_line(tiny_moe, tmp_path):
    model = str(tiny_moe(TARGET))
    cases = [
        (["-m", model, "--no-cap", "--mem-cap", "1G"], "not with --mem-cap or --gpu-budget"),
        (["-m", model, "--no-cap", "--gpu-budget", "1G"], "not with --mem-cap or --gpu-budget"),
        (["-m", model, "--mem-cap", "1G", "--rounds", "3"], "--rounds is for the uncapped comparison"),
        (["-m", model, "--no-cap", "--contenders", "llama.cpp"], "unknown contender(s) llama.cpp"),
        (["-m", str(tmp_path / "x.gguf"), "--no-cap", "--contenders", "moespac"], "no such file"),
        (["-m", model, "--no-cap", "--contenders", "moespac", "-ngl", "1"], "-ngl: not used by --no-cap"),
        (["-m", model, "--no-cap", "--contenders", "moespac", "--rounds", "0"], "--rounds must be 1 or more"),
    ]
    for args, msg in cases:
        r = _bench(*args)
        assert r.returncode == 2, (args, r.stderr)
        assert msg in r.stderr and len(r.stderr.strip().splitlines()) == 1, (args, r.stderr)


def test_moespac_and_llama_cpp_python_agree_on_the_demo_model(tmp_path):
    """End to end on the demo model: two real contenders, one prompt, 8 tokens, one round."""
    from moespac_gguf.demo.catalog import model_path

    try:
        model = model_path("smolmoe")
    except MoespacError:
        pytest.skip("demo model smolmoe not built (moespac models build smolmoe)")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"turns": ["Write a short poem about the sea."]}\n')
    out = tmp_path / "uncapped.json"
    r = _bench(
        *("-m", str(model), "--no-cap", "--contenders", "llama-cpp-python,moespac", "--prompts", str(prompts)),
        *("--limit", "1", "-n", "8", "--rounds", "1", "-t", "2", "--json", "--out", str(out)),
    )
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert json.loads(out.read_text())["results"] == report["results"] and out.with_suffix(".md").is_file()
    assert report["reference"] == "llama-cpp-python" and report["n_threads"] == 2 and report["rounds"] == 1
    rows = {x["name"]: x for x in report["results"]}
    assert list(rows) == ["llama-cpp-python", "moespac"]
    for x in rows.values():
        assert "error" not in x, x
        assert x["same_output"] is True, x
        assert x["prompt_tokens_per_s"] > 0 and x["decode_tokens_per_s"] > 0 and len(x["rounds"]) == 1
    lcp, moe = rows["llama-cpp-python"]["rounds"][0], rows["moespac"]["rounds"][0]
    assert lcp["n_prompt"] == moe["n_prompt"]  # the same prompt tokens
    assert moe["n_tokens"] == 8 and moe["acceptance_rate"] is None  # no draft


def test_drafted_rows_are_checked_against_the_output_with_flash_attention_off(tmp_path):
    """Flash attention is on without a draft and off with one: a drafted row must equal the
    reference's output with it off, the undrafted rows the one with it on."""
    off = [[1, 2, 3], [4, 5, 9]]
    rounds = {
        "llama-cpp-python": [result("llama-cpp-python", 90.0, 19.0, outputs_fa_off=off)],
        "moespac": [result("moespac", 92.0, 21.0)],
        "moespac+self": [result("moespac+self", 91.0, 15.0, off, draft="self")],
        "moespac+draft": [result("moespac+draft", 91.0, 15.0, draft="d.gguf")],
    }
    rows = {r["name"]: r for r in assemble(cfg_for(tmp_path), rounds)["results"]}
    assert rows["moespac"]["same_output"] is True and rows["moespac+self"]["same_output"] is True
    assert rows["moespac+draft"]["same_output"] is False


def test_moespac_without_a_draft_is_llama_cpp_token_for_token_with_flash_attention():
    """Without a draft moespac runs llama.cpp's default flash attention, whose CPU kernel gives a
    batch's rows other values than single tokens: the prompt must go in one batch, as llama.cpp
    runs it, or the first token (and all after it) can differ (7 of 20 Spec-Bench prompts did)."""
    import llama_cpp

    from moespac_gguf import MoeSpac
    from moespac_gguf.core.prompts import SPEC_BENCH, load_prompts
    from moespac_gguf.demo.catalog import model_path
    from moespac_gguf.llama.chat import format_prompt

    try:
        model = str(model_path("smolmoe"))
    except MoespacError:
        pytest.skip("demo model smolmoe not built (moespac models build smolmoe)")
    n = 24
    with MoeSpac(model, n_ctx=1024, n_threads=2) as m:
        prompts = [format_prompt(m.target, row["text"]) for row in load_prompts(SPEC_BENCH, 8, select="spread")]
        ours = []
        for tokens in prompts:
            m.create_completion(tokens, max_tokens=n)
            ours.append(m.completion_tokens)
    llm = llama_cpp.Llama(model, n_ctx=1024, n_threads=2, flash_attn=True, verbose=False)
    try:
        for tokens, want in zip(prompts, ours):
            llm.reset()
            got = []
            for tok in llm.generate(tokens, temp=0.0):
                if llama_cpp.llama_vocab_is_eog(llm._model.vocab, tok) or len(got) == n:
                    break
                got.append(tok)
            assert got == want
    finally:
        llm.close()
