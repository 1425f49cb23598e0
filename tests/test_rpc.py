"""llama.cpp's RPC backend as a device (issue 25, first part): `moespac rpc-server` started here on
127.0.0.1, a synthetic F32 MoE with every layer on the server's device, greedy output equal to the
same model computed locally; bad or unreachable endpoints are one-line errors."""

from __future__ import annotations

import pytest

from moespac_gguf import MoeSpac, MoespacError
from moespac_gguf.demo.synthetic import SyntheticSpec
from moespac_gguf.server.process import free_port

SPEC = SyntheticSpec(arch="qwen3moe", n_layer=3, n_embd=128, n_ff_exp=128, n_expert=8, seed=9)
PROMPT = "layers computed on another machine"


def test_layers_on_an_rpc_device_give_the_local_greedy_output(tiny_moe, rpc_server, capfd):
    endpoint, proc, log = rpc_server
    path = tiny_moe(SPEC)
    with MoeSpac(path, n_ctx=256, mem_budget="off") as local:
        local.create_completion(PROMPT, max_tokens=24)
        expected = local.completion_tokens
    capfd.readouterr()
    with MoeSpac(path, n_ctx=256, mem_budget="off", rpc_servers=[endpoint], n_gpu_layers=-1, verbose=True) as remote:
        remote.create_completion(PROMPT, max_tokens=24)
        assert remote.completion_tokens == expected
    llama_log = capfd.readouterr().err
    # every layer, and the output layer, on the server's device (llama.cpp's own account)
    assert f"offloaded {SPEC.n_layer + 1}/{SPEC.n_layer + 1} layers to GPU" in llama_log
    assert f"RPC0[{endpoint}] model buffer size" in llama_log
    assert proc.poll() is None


def test_bad_and_unreachable_endpoints_are_one_line_errors(tiny_moe):
    path = tiny_moe(SPEC)
    with pytest.raises(MoespacError, match="HOST:PORT"):
        MoeSpac(path, mem_budget="off", rpc_servers="localhost")
    with pytest.raises(MoespacError, match=r"cannot reach the RPC server at 127.0.0.1:\d+"):
        MoeSpac(path, mem_budget="off", rpc_servers=[f"127.0.0.1:{free_port()}"])
