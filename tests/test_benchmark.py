"""`moespac bench`: every contender runs capped in its own cgroup, agrees with llama.cpp, cleans up."""

import json
import subprocess
import sys

from moespac_gguf.demo.synthetic import SyntheticSpec
from moespac_gguf.tools.memcap import MemoryCap, cgroup_root

TARGET = SyntheticSpec(arch="qwen3moe", n_layer=2, n_embd=128, n_ff_exp=128, seed=5)
DRAFT = SyntheticSpec(arch="qwen3moe", n_layer=2, n_embd=128, n_ff_exp=128, seed=5, n_expert_used=1)


def _our_groups():
    _, parent = cgroup_root()
    return sorted(p.name for p in parent.iterdir() if p.is_dir() and p.name.startswith("moespac-"))


def test_bench_json_all_contenders(tiny_moe, tmp_path):
    before = _our_groups()
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"turns": ["hello there"]}\n{"turns": ["the quick brown fox"]}\n')
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "moespac_gguf.cli",
            "bench",
            "-m",
            str(tiny_moe(TARGET)),
            "-md",
            str(tiny_moe(DRAFT)),
            "--mem-cap",
            "1G",
            "--prompts",
            str(prompts),
            "--limit",
            "2",
            "-n",
            "8",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    names = [x["name"] for x in d["results"]]
    assert names == ["llama.cpp", "llama.cpp+random", "llama.cpp+sd", "moespac"]
    for x in d["results"]:
        assert "error" not in x, x
        assert x["tokens_per_s"] > 0 and x["bytes_read"] >= 0 and x["same_output"] is True
        assert 0 < x["peak_bytes"] <= 1 << 30
    assert d["results"][0]["acceptance_rate"] is None and d["results"][3]["acceptance_rate"] is not None
    assert "engine" in d["results"][3]
    for x in d["results"]:  # the decode phase metered apart from the prefills
        dec = x["decode"]
        assert 0 <= dec["prefill_bytes_read"] <= x["bytes_read"]
        assert dec["seconds"] + dec["prefill_s"] <= x["seconds"] and dec["tokens_per_s"] >= x["tokens_per_s"]
        assert dec["n_steps"] > 0 and x["rss_anon_bytes"] > 0
    assert d["results"][0]["decode"]["n_drafted"] == 0 < d["results"][3]["decode"]["n_drafted"]
    assert _our_groups() == before, "a benchmark cgroup was left behind"


def test_bench_sd_draft_gives_llama_cpp_sd_its_own_draft(tiny_moe, tmp_path):
    """-md self for moespac, --sd-draft for llama.cpp+sd: each drafts with its own, same greedy output."""
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"turns": ["hello there"]}\n')
    draft = str(tiny_moe(DRAFT))
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "moespac_gguf.cli",
            "bench",
            "-m",
            str(tiny_moe(TARGET)),
            "-md",
            "self",
            "--sd-draft",
            draft,
            "--mem-cap",
            "1G",
            "--prompts",
            str(prompts),
            "--limit",
            "1",
            "-n",
            "8",
            "--json",
            "--contenders",
            "llama.cpp,llama.cpp+sd,moespac",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["draft"] == "self" and d["sd_draft"] == draft
    for x in d["results"]:
        assert "error" not in x, x
        assert x["same_output"] is True
    sd, moespac = d["results"][1:]
    assert sd["draft"] == draft and sd["acceptance_rate"] is not None
    assert moespac["draft"] == "self" and "draft_tap" in moespac  # the target drafting for itself
    # the effective lookahead is recorded (sim_agreement replays it): a 1G cap holds every expert, so none ran
    assert moespac["draft_ahead"] == 0 == sd["draft_ahead"]
    assert d["results"][0]["draft"] is None


def test_bench_slots_contender_same_output(tiny_moe, tmp_path):
    """moespac+slots (opt-in): host-RAM expert slots filled by the utility, same greedy output."""
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"turns": ["hello there"]}\n{"turns": ["the quick brown fox"]}\n')
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "moespac_gguf.cli",
            "bench",
            "-m",
            str(tiny_moe(TARGET)),
            "-md",
            str(tiny_moe(DRAFT)),
            "--mem-cap",
            "1G",
            "--prompts",
            str(prompts),
            "--limit",
            "2",
            "-n",
            "8",
            "--json",
            "--contenders",
            "llama.cpp,moespac+slots",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert [x["name"] for x in d["results"]] == ["llama.cpp", "moespac+slots"]
    x = d["results"][1]
    assert "error" not in x, x
    assert x["same_output"] is True and "engine" in x
    slots = x["slots"]
    assert slots["slots"] >= 1 and not slots["on_gpu"] and slots["buffer_bytes"] > 0 and slots["copied_bytes"] > 0


def test_cap_really_limits_a_child(tmp_path):
    """A child that allocates beyond the cap is killed by the kernel, not allowed through."""
    with MemoryCap(64 << 20, "probe") as cap:
        r = subprocess.run(
            [sys.executable, "-c", "b = bytearray(256 << 20); b[::4096] = b'x' * len(b[::4096])"],
            preexec_fn=cap.preexec,
            capture_output=True,
        )
        assert r.returncode != 0
    assert not cap.path.exists()


def test_bench_errors_are_one_line(tiny_moe, tmp_path):
    cases = [
        (["-m", str(tiny_moe(TARGET)), "--mem-cap", "1G"], "moespac needs a draft model (-md)"),
        (
            ["-m", str(tiny_moe(TARGET)), "--mem-cap", "1G", "--contenders", "llama.cpp+sd"],
            "llama.cpp+sd needs a draft model (-md or --sd-draft)",
        ),
        (
            ["-m", str(tiny_moe(TARGET)), "-md", "self", "--sd-draft", str(tmp_path / "d.gguf"), "--mem-cap", "1G"],
            "no such file",
        ),
        (["-m", str(tmp_path / "x.gguf"), "--mem-cap", "1G"], "no such file"),
        (["-m", str(tiny_moe(TARGET)), "--mem-cap", "1G", "--contenders", "vllm"], "unknown contender"),
        (
            ["-m", str(tiny_moe(TARGET)), "--mem-cap", "1G", "--contenders", "llama.cpp", "--slot-fraction", "2"],
            "--slot-fraction must be between 0 and 1",
        ),
        (
            [
                "-m",
                str(tiny_moe(TARGET)),
                "-md",
                str(tiny_moe(DRAFT)),
                "--mem-cap",
                "0",
                "--contenders",
                "moespac+slots",
            ],
            "needs a memory cap",
        ),
        (["-m", str(tiny_moe(TARGET)), "--mem-cap", "lots"], None),
        (  # the table goes beside the JSON as .md: a .md name would lose the JSON
            ["-m", str(tiny_moe(TARGET)), "-md", "self", "--mem-cap", "1G", "--out", str(tmp_path / "r.md")],
            "give a .json name",
        ),
    ]
    for args, msg in cases:
        r = subprocess.run([sys.executable, "-m", "moespac_gguf.cli", "bench", *args], capture_output=True, text=True)
        assert r.returncode == 2, (args, r.stderr)
        if msg:
            assert msg in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_bench_refuses_a_model_another_process_maps(tiny_moe):
    """Pages another process maps are shared and uncharged: the run could not be cold or capped."""
    path = str(tiny_moe(TARGET))
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"import mmap, sys, time\nf = open({path!r}, 'rb')\n"
            "m = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)\nprint('ok', flush=True)\n"
            "time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "ok"
        r = subprocess.run(
            [
                sys.executable,
                "-m",
                "moespac_gguf.cli",
                "bench",
                "-m",
                path,
                "--mem-cap",
                "1G",
                "--contenders",
                "llama.cpp",
            ],
            capture_output=True,
            text=True,
        )
        assert r.returncode == 2 and f"pids {holder.pid}" in r.stderr, r.stderr
    finally:
        holder.kill()
