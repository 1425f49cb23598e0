"""bench/byte_bound.py: the page cache, the runtime's policy and the offline optimum at a share of the
experts, on real Mixtral-8x7B routing."""

import importlib.util
import json

import pytest

from moespac_gguf.core.paths import REPO_ROOT
from moespac_gguf.sim.profiles import load_device

spec = importlib.util.spec_from_file_location("byte_bound", REPO_ROOT / "bench" / "byte_bound.py")
byte_bound = importlib.util.module_from_spec(spec)
spec.loader.exec_module(byte_bound)
GSM8K = byte_bound.SHARED_TRACES[0]


def test_optimum_reads_least_and_ratios_are_to_the_page_cache():
    rows = byte_bound.bound_rows(GSM8K, [0.375, 0.625], load_device("m2-macbook"), 0.26, 0.6, draft_ahead=6)
    assert [r["per_layer"] for r in rows] == [3, 5] and all(r["capacity_experts"] == 32 * r["per_layer"] for r in rows)
    for r in rows:
        assert r["draft_ahead"] == 0  # no weights behind a Mixtral trace: no self-draft to run ahead
        assert r["belady_mib_per_token"] < r["moespac_mib_per_token"]
        assert r["belady_mib_per_token"] < r["random_mib_per_token"]
        assert r["belady_vs_random"] == pytest.approx(r["belady_mib_per_token"] / r["random_mib_per_token"])
        assert r["moespac_vs_random"] == pytest.approx(r["moespac_mib_per_token"] / r["random_mib_per_token"])
    assert rows[0]["random_mib_per_token"] > rows[1]["random_mib_per_token"]  # more held, fewer misses


def test_main_writes_table_and_json(tmp_path, capsys):
    out = tmp_path / "bb.json"
    assert byte_bound.main([str(GSM8K), "--shares", "0.5", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 1 and rows[0]["per_layer"] == 4
    assert "| mixtral8x7b_gsm8k_routing.jsonl | mixtral-8x7b |" in out.with_suffix(".md").read_text()


@pytest.mark.parametrize("text", ["0", "1", "half", "0.5,1.2"])
def test_bad_shares_are_one_line_errors(text, capsys):
    with pytest.raises(SystemExit):
        byte_bound.main(["--shares", text])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "error: argument --shares:" in last and repr(text) in last


def test_missing_trace_is_a_one_line_error(tmp_path):
    with pytest.raises(SystemExit, match="error: "):
        byte_bound.main([str(tmp_path / "nope.npz"), "--out", str(tmp_path / "bb.json")])
