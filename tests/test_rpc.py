"""llama.cpp's RPC backend as a device (issue 25, first part): `moespac rpc-server` started here on
127.0.0.1, a synthetic F32 MoE with every layer on the server's device, greedy output equal to the
same model computed locally; bad or unreachable endpoints are one-line errors."""

from __future__ import annotations

import subprocess
import sys
import time

import openai
import pytest

from moespac_gguf import MoeSpac, MoespacError
from moespac_gguf.core.child import free_port
from moespac_gguf.core.errors import RemoteDeviceLost
from moespac_gguf.demo.synthetic import SyntheticSpec
from moespac_gguf.server.process import serve

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
        # nothing reads the routing here: no tap splitting the server's graph per layer
        assert remote.target.tap is None
    llama_log = capfd.readouterr().err
    # every layer, and the output layer, on the server's device (llama.cpp's own account)
    assert f"offloaded {SPEC.n_layer + 1}/{SPEC.n_layer + 1} layers to GPU" in llama_log
    assert f"RPC0[{endpoint}] model buffer size" in llama_log
    assert "overridden to CPU" not in llama_log  # llama.cpp's placement: the experts go with their layers
    assert proc.poll() is None


def test_only_a_model_given_the_server_uses_it(tiny_moe, rpc_server, capfd):
    """A server added for one model (registered in ggml for the whole process) is not taken by
    another model that did not ask for it, even with -ngl."""
    endpoint = rpc_server[0]
    path = tiny_moe(SPEC)
    with MoeSpac(path, mem_budget="off", rpc_servers=[endpoint]):
        pass
    capfd.readouterr()
    with MoeSpac(path, mem_budget="off", n_gpu_layers=-1, verbose=True) as local:
        local.create_completion(PROMPT, max_tokens=4)
        assert local.target.link.endpoints == []
    assert "RPC0" not in capfd.readouterr().err


def test_bad_and_unreachable_endpoints_are_one_line_errors(tiny_moe):
    path = tiny_moe(SPEC)
    with pytest.raises(MoespacError, match="HOST:PORT"):
        MoeSpac(path, mem_budget="off", rpc_servers="localhost")
    with pytest.raises(MoespacError, match=r"cannot reach the RPC server at 127.0.0.1:\d+"):
        MoeSpac(path, mem_budget="off", rpc_servers=[f"127.0.0.1:{free_port()}"])


def test_a_server_killed_mid_generation_ends_the_request_and_the_model_runs_on(tiny_moe, start_rpc_server):
    """ggml-rpc used to abort the process here (patches/0015): the request ends with a one-line
    RemoteDeviceLost, and the same instance answers the next request on this machine alone."""
    path = tiny_moe(SPEC)
    with MoeSpac(path, n_ctx=2048, mem_budget="off") as local:
        local.create_completion(PROMPT, max_tokens=24)
        expected = local.completion_tokens
    endpoint, proc = start_rpc_server()
    with MoeSpac(path, n_ctx=2048, mem_budget="off", rpc_servers=[endpoint]) as m:
        stream = m.create_completion(PROMPT, max_tokens=2000, stream=True)
        started = time.monotonic()
        with pytest.raises(RemoteDeviceLost) as lost:
            for i, _ in enumerate(stream):
                if i == 3:
                    proc.kill()
        assert time.monotonic() - started < 10
        assert lost.value.endpoint == endpoint
        message = str(lost.value)
        assert "\n" not in message
        assert f"the RPC server at {endpoint} stopped answering" in message
        assert "loaded again on this machine alone" in message
        assert 3 < len(m.completion_tokens) < 2000
        m.create_completion(PROMPT, max_tokens=24)
        assert m.completion_tokens == expected


def test_run_and_serve_survive_a_killed_server(tiny_moe, start_rpc_server):
    """`moespac run` ends with one line and a non-zero exit, no traceback; `moespac chat` says so
    and answers the next message; `moespac serve` answers the request with a 502 event and the
    next request from this machine alone."""
    path = str(tiny_moe(SPEC))
    endpoint, proc = start_rpc_server()
    # --mem-budget off: every layer on the server however the link compares (MoeSpac._send_every_layer)
    cmd = [sys.executable, "-m", "moespac_gguf.cli", "run", "-m", path, "-c", "4096", "-n", "4000", "--rpc", endpoint]
    cmd += ["--mem-budget", "off"]
    run = subprocess.Popen(cmd + ["-p", PROMPT], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    run.stdout.read(64)  # generating
    proc.kill()
    proc.wait()
    _, err = run.communicate(timeout=30)
    err = err.decode()
    assert run.returncode != 0
    assert "Traceback" not in err
    assert (
        err.strip().splitlines()[-1].startswith(f"moespac run: error: the RPC server at {endpoint} stopped answering")
    )

    endpoint, proc = start_rpc_server()
    chat = [sys.executable, "-m", "moespac_gguf.cli", "chat", "-m", path, "-c", "4096", "-n", "3000", "--rpc", endpoint]
    chat += ["--mem-budget", "off"]
    chat = subprocess.Popen(chat, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    chat.stdin.write(b"tell me everything\n")
    chat.stdin.flush()
    chat.stdout.read(64)  # replying
    proc.kill()
    proc.wait()
    out, err = chat.communicate(b"and now?\n", timeout=60)
    assert chat.returncode == 0, err.decode()
    assert f"moespac chat: the RPC server at {endpoint} stopped answering" in err.decode()
    assert "Traceback" not in err.decode()
    assert out.decode().strip()  # the second message was answered, on this machine

    endpoint, proc = start_rpc_server()
    with serve("-m", path, "-c", "4096", "--rpc", endpoint, "--mem-budget", "off", "--alias", "tiny") as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=60)
        stream = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=4000, temperature=0, stream=True)
        with pytest.raises(openai.APIError, match=f"the RPC server at {endpoint} stopped answering") as e:
            for i, _ in enumerate(stream):
                if i == 3:
                    proc.kill()
        assert e.value.body["code"] == "rpc_server_lost"
        r = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=8, temperature=0)
        assert r.usage.completion_tokens >= 1
        assert server.get_json("/health")
        log = server.log()
        assert "loaded again on this machine alone" in log and "Traceback" not in log
