"""`moespac calibrate`'s read costs: the engine's read path and llama.cpp+random's page faults, measured
on cold pages, in this process or inside a small memory cgroup."""

import json

import pytest

from moespac_gguf import MoespacError, cli
from moespac_gguf.core.layout import read_layout
from moespac_gguf.sim.profiles import load_device
from moespac_gguf.tools.calibrate import _cold_window, read_costs
from moespac_gguf.tools.memcap import cgroup_root


def test_windows_are_disjoint_page_aligned_thirds(tiny_moe):
    path = tiny_moe()
    size = path.stat().st_size
    (a, n), (b, m) = _cold_window(str(path), 1 << 40, 0), _cold_window(str(path), 1 << 40, 1)
    assert a % 4096 == b % 4096 == 0 and 0 < n <= size // 3 and 0 < m <= size // 3
    assert a + n <= b and b + m <= size


def test_read_costs_here_and_under_pressure(tiny_moe):
    path = str(tiny_moe())
    _, parent = cgroup_root()
    before = sorted(p.name for p in parent.iterdir() if p.name.startswith("moespac-"))
    chunk = int(read_layout(path).mean_bytes_per_expert)
    here, capped = read_costs(path, chunk, under_pressure=False), read_costs(path, chunk, under_pressure=True)
    for costs in (here, capped):
        assert costs["flash_read_bps"] > 0 and 0 < costs["fault_s_per_page"] < 0.1
    assert capped["pressure_cap_bytes"] == 128 << 20 and "pressure_cap_bytes" not in here
    assert sorted(p.name for p in parent.iterdir() if p.name.startswith("moespac-")) == before


def test_calibrate_writes_a_profile_sim_can_read(tiny_moe, tmp_path, capsys):
    out = tmp_path / "calibration.json"
    assert cli.main(["calibrate", "-m", str(tiny_moe()), "-md", "self", "--out", str(out)]) == 0
    profile = json.loads(out.read_text())
    assert profile["draft_s_per_token"] > 0  # the target drafting for itself, timed
    assert profile["io_overlap"] in (0.0, 1.0) and profile["fault_s_per_page"] > 0
    assert "fault in order" in capsys.readouterr().out
    device = load_device("local", out)
    assert (device.fault_s_per_page, device.io_overlap) == (profile["fault_s_per_page"], profile["io_overlap"])


def test_costs_with_a_gpu_come_from_the_profile_else_defaults(tmp_path, monkeypatch):
    from moespac_gguf.residency import costs as costs_mod

    path = tmp_path / "calibration.json"
    monkeypatch.setattr(costs_mod, "CALIBRATION_PATH", path)
    assert costs_mod.load_costs(gpu=False) == costs_mod.DEFAULT_COSTS
    default = costs_mod.load_costs(gpu=True)  # not calibrated: a discrete GPU's rough figures
    assert default.has_gpu and default.memcpy_bps == costs_mod.DEFAULT_H2D_BPS and not default.unified_memory
    base = dict(flash_read_bps=1e9, memcpy_bps=5e9, mem_bps=9e9, cpu_s_per_token_expert=3e-4, page_in_latency_s=1e-4)
    gpu = dict(
        device="Vulkan0",
        gpu_s_per_token_expert=2e-5,
        gpu_s_per_token_expert_batch=4e-6,
        h2d_bps=2e10,
        unified_memory=True,
    )
    path.write_text(json.dumps({**base, "gpu": gpu}))
    measured = costs_mod.load_costs(gpu=True)
    assert (measured.gpu_s_per_token_expert, measured.memcpy_bps, measured.unified_memory) == (2e-5, 2e10, True)
    assert costs_mod.load_costs(gpu=False).memcpy_bps == 5e9 and not costs_mod.load_costs().has_gpu
    path.write_text(json.dumps({**base, "gpu": {**gpu, "h2d_bps": -1}}))
    with pytest.raises(MoespacError, match="is not a calibration profile"):
        costs_mod.load_costs(gpu=True)


def test_costs_of_an_rpc_device_come_from_its_endpoints_profile_else_defaults(tmp_path, monkeypatch, capsys):
    from moespac_gguf.residency import costs as costs_mod

    path = tmp_path / "calibration.json"
    monkeypatch.setattr(costs_mod, "CALIBRATION_PATH", path)
    monkeypatch.setattr(costs_mod, "_said_uncalibrated", set())
    base = dict(flash_read_bps=1e9, memcpy_bps=5e9, mem_bps=9e9, cpu_s_per_token_expert=3e-4, page_in_latency_s=1e-4)
    rpc = dict(device="RPC0 (10.0.0.2:50052)", remote_s_per_token_expert=5e-5, link_bps=1.2e8, round_trip_s=3e-4)
    path.write_text(json.dumps({**base, "rpc": {"10.0.0.2:50052": rpc}}))
    measured = costs_mod.load_costs(rpc="10.0.0.2:50052")
    assert (measured.gpu_s_per_token_expert, measured.memcpy_bps, measured.round_trip_s) == (5e-5, 1.2e8, 3e-4)
    assert capsys.readouterr().err == ""
    for _ in range(2):  # another endpoint: this machine's CPU behind the default link, said once
        default = costs_mod.load_costs(rpc="10.0.0.3:50052")
        assert default.gpu_s_per_token_expert == 3e-4 and default.memcpy_bps == costs_mod.DEFAULT_LINK_BPS
        assert default.round_trip_s == costs_mod.DEFAULT_ROUND_TRIP_S
    err = capsys.readouterr().err
    assert err.count("10.0.0.3:50052 is not calibrated") == 1 and err.count("\n") == 1
    assert costs_mod.load_costs(gpu=True).round_trip_s is None  # a local GPU has no link
    path.write_text(json.dumps({**base, "rpc": {"10.0.0.2:50052": {**rpc, "round_trip_s": 0}}}))
    with pytest.raises(MoespacError, match="is not a calibration profile"):
        costs_mod.load_costs(rpc="10.0.0.2:50052")
