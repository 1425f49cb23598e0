"""`moespac serve` against OpenAI's own Python client, curl-shaped raw HTTP and a Prometheus
parser: a real server process on a free localhost port, a real GGUF (a tiny synthetic MoE for
speed; the SmolMoE demo pair where a generation must be slow enough to interrupt, and for a
real draft)."""

from __future__ import annotations

import json
import signal
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from moespac_gguf.demo.catalog import resolve_model
from moespac_gguf.server.process import serve

GREEDY = {"temperature": 0, "seed": 1}
CHAT = [{"role": "user", "content": "Say something about experts."}]


@pytest.fixture(scope="module")
def tiny(tiny_moe):
    with serve("-m", str(tiny_moe()), "-c", "512", "--alias", "tiny") as server:
        yield server


@pytest.fixture(scope="module")
def client(tiny):
    return openai.OpenAI(base_url=tiny.base_url, api_key="unused", max_retries=0, timeout=60)


def demo_pair() -> tuple[str, str]:
    try:
        return str(resolve_model("smolmoe")), str(resolve_model("smollm2"))
    except Exception as e:  # not built (MOESPAC_SKIP_MODELS=1)
        pytest.skip(f"demo models not built: {e}")


@pytest.fixture(scope="module")
def smol():
    """SmolMoE drafted by SmolLM2, one waiting request at most: slow enough (tens of tokens a
    second) to disconnect from, and to fill the queue of."""
    target, draft = demo_pair()
    with serve("-m", target, "-md", draft, "-c", "1024", "--max-queue", "1", "-a", "smolmoe") as server:
        yield server


def post(server, path: str, body, headers: dict | None = None, raw: bytes | None = None) -> tuple[int, dict]:
    """(status, JSON body) of a POST, errors included."""
    data = raw if raw is not None else json.dumps(body).encode()
    req = urllib.request.Request(
        server.url + path, data=data, headers={"Content-Type": "application/json", **(headers or {})}
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_models_and_chat(client):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    r = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=12, **GREEDY)
    assert r.object == "chat.completion" and r.model == "tiny"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason in ("stop", "length")
    u = r.usage
    assert u.prompt_tokens > 5 and 1 <= u.completion_tokens <= 12
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens


def test_completion_usage_counts_tokens(client):
    r = client.completions.create(model="tiny", prompt="The experts of a layer", max_tokens=10, **GREEDY)
    assert r.choices[0].finish_reason in ("stop", "length")  # random weights: an end-of-text token may come
    assert r.usage.completion_tokens == 10 if r.choices[0].finish_reason == "length" else r.usage.completion_tokens < 10
    # the same prompt as token ids (as OpenAI's API allows) is the same request
    ids = client.completions.create(model="tiny", prompt=[1, 2, 3], max_tokens=3, **GREEDY)
    assert ids.usage.prompt_tokens == 3


@pytest.mark.parametrize("kind", ["chat", "completion"])
def test_streaming_equals_non_streaming_greedy(client, kind):
    if kind == "chat":
        args = dict(model="tiny", messages=CHAT, max_tokens=40, **GREEDY)
        whole = client.chat.completions.create(**args).choices[0]
        chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **args))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == whole.message.content
    else:
        args = dict(model="tiny", prompt="Once upon a time", max_tokens=40, **GREEDY)
        whole = client.completions.create(**args).choices[0]
        chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **args))
        text = "".join(c.choices[0].text for c in chunks if c.choices)
        assert text == whole.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0  # include_usage's last chunk


def test_stop_strings(client):
    args = dict(model="tiny", prompt="Once upon a time", max_tokens=40, **GREEDY)
    full = client.completions.create(**args).choices[0].text
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    assert stop.strip(), full
    cut = client.completions.create(stop=[stop], **args).choices[0]
    assert cut.finish_reason == "stop"
    assert cut.text == full[: full.index(stop)]
    streamed = "".join(c.choices[0].text for c in client.completions.create(stop=stop, stream=True, **args))
    assert streamed == cut.text


def test_bad_requests_get_openai_errors(client, tiny):
    with pytest.raises(openai.BadRequestError, match="max_tokens must be 1 to 512"):
        client.completions.create(model="tiny", prompt="x", max_tokens=0)
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=10**9)
    with pytest.raises(openai.BadRequestError, match=r"prompt of \d+ tokens does not fit the context of 512"):
        client.completions.create(model="tiny", prompt="word " * 700, max_tokens=4)
    with pytest.raises(openai.BadRequestError, match=r"prompt of \d+ tokens does not fit"):  # streamed: still a 400
        client.completions.create(model="tiny", prompt="word " * 700, max_tokens=4, stream=True)
    with pytest.raises(openai.NotFoundError, match="serves 'tiny'"):
        client.chat.completions.create(model="gpt-4", messages=CHAT)
    for body, field in [
        ({"prompt": "x", "temperature": "hot"}, "temperature"),
        ({"prompt": "x", "top_p": 0}, "top_p"),
        ({"prompt": "x", "n": 2}, "n"),
        ({"prompt": [1, 10**9]}, "prompt"),
        ({"max_tokens": 4}, "prompt"),
    ]:
        status, got = post(tiny, "/v1/completions", body)
        assert status == 400 and got["error"]["type"] == "invalid_request_error", got
        assert field in got["error"]["message"], got
    status, got = post(tiny, "/v1/chat/completions", {"messages": []})
    assert status == 400 and "messages" in got["error"]["message"]
    status, got = post(tiny, "/v1/chat/completions", None, raw=b'{"messages": [')
    assert status == 400 and "not valid JSON" in got["error"]["message"]
    status, got = post(tiny, "/v1/nothing", {})
    assert status == 404 and got["error"]["message"]
    assert "Traceback" not in tiny.log()


def test_api_key(tiny_moe):
    with serve("-m", str(tiny_moe()), "-c", "256", "--api-key", "s3cret", "-a", "tiny") as server:
        c = openai.OpenAI(base_url=server.base_url, api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            c.models.list()
        status, got = post(server, "/v1/completions", {"prompt": "x", "max_tokens": 1})  # no key at all
        assert status == 401 and got["error"]["code"] == "invalid_api_key"
        with pytest.raises(urllib.error.HTTPError, match="401"):
            server.get_json("/metrics")
        good = openai.OpenAI(base_url=server.base_url, api_key="s3cret", max_retries=0)
        assert good.completions.create(model="tiny", prompt="x", max_tokens=2).choices[0].finish_reason
        assert server.get_json("/health")["status"] == "ok"  # no key: a liveness probe


def test_six_concurrent_clients_all_answered(client):
    prompts = [f"Client {i} asks about layer {i}" for i in range(6)]
    alone = [
        client.completions.create(model="tiny", prompt=p, max_tokens=24, **GREEDY).choices[0].text for p in prompts
    ]
    with ThreadPoolExecutor(6) as pool:
        together = list(
            pool.map(
                lambda p: client.completions.create(model="tiny", prompt=p, max_tokens=24, **GREEDY).choices[0].text,
                prompts,
            )
        )
    assert together == alone  # each its own answer, none mixed up


def test_metrics_parse_as_prometheus(tiny, client):
    client.completions.create(model="tiny", prompt="count me", max_tokens=5, **GREEDY)
    with urllib.request.urlopen(tiny.url + "/metrics", timeout=30) as r:
        assert r.headers["Content-Type"].startswith("text/plain")
        families = {f.name: f for f in text_string_to_metric_families(r.read().decode())}
    tokens = families["moespac_tokens_generated"].samples[0].value
    assert tokens >= 5
    assert {"moespac_info", "moespac_requests", "moespac_queue_depth", "moespac_resident_experts"} <= set(families)
    stats = tiny.get_json("/v1/moespac/stats")
    assert stats["tokens_generated_total"] >= tokens
    ex = stats["experts"]
    assert len(ex["tier"]) == len(ex["layers"]) == len(ex["activity"]) and len(ex["tier"][0]) == ex["n_expert"]
    assert max(max(row) for row in ex["activity"]) == 1.0  # routing was heard


def test_draft_pair_streams_what_it_answers(smol):
    c = openai.OpenAI(base_url=smol.base_url, api_key="x", max_retries=0, timeout=120)
    args = dict(model="smolmoe", messages=[{"role": "user", "content": "What is a mixture of experts?"}], max_tokens=32)
    whole = c.chat.completions.create(**args, **GREEDY).choices[0].message.content
    streamed = "".join(
        ch.choices[0].delta.content or "" for ch in c.chat.completions.create(stream=True, **args, **GREEDY)
    )
    assert streamed == whole and len(whole) > 20
    stats = smol.get_json("/v1/moespac/stats")
    assert stats["draft"].startswith("smollm2") and stats["acceptance_rate_total"] is not None


def test_disconnect_mid_stream_frees_the_model(smol):
    c = openai.OpenAI(base_url=smol.base_url, api_key="x", max_retries=0, timeout=120)
    stream = c.completions.create(model="smolmoe", prompt="A long story:", max_tokens=900, stream=True, **GREEDY)
    for _, _ in zip(range(3), stream):
        pass
    stream.close()  # the client goes away with ~900 tokens (tens of seconds) left
    t0 = time.monotonic()
    r = c.completions.create(model="smolmoe", prompt="Next,", max_tokens=4, **GREEDY)
    assert r.usage.completion_tokens == 4
    assert time.monotonic() - t0 < 10, "the abandoned generation kept the model"
    assert smol.get_json("/v1/moespac/stats")["requests"]["cancelled"] >= 1


def test_full_queue_answers_503(smol):
    c = openai.OpenAI(base_url=smol.base_url, api_key="x", max_retries=0, timeout=120)
    running = c.completions.create(model="smolmoe", prompt="Count:", max_tokens=300, stream=True, **GREEDY)
    next(iter(running))  # generating now; the queue (--max-queue 1) is empty
    waiting = ThreadPoolExecutor(1).submit(c.completions.create, model="smolmoe", prompt="Wait", max_tokens=2)
    deadline = time.monotonic() + 10
    while smol.get_json("/health")["queue_depth"] < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    with pytest.raises(openai.APIStatusError) as e:
        c.completions.create(model="smolmoe", prompt="No room", max_tokens=2)
    assert e.value.status_code == 503 and e.value.body["code"] == "queue_full"
    running.close()
    assert waiting.result(timeout=60).choices[0].finish_reason  # the waiting one is still served


def test_sigterm_cancels_and_exits():
    target, draft = demo_pair()
    with serve("-m", target, "-c", "1024", "-a", "smolmoe") as server:
        c = openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0, timeout=60)
        stream = c.completions.create(model="smolmoe", prompt="Forever:", max_tokens=1000, stream=True, **GREEDY)
        next(iter(stream))
        got = []
        reader = threading.Thread(target=lambda: got.extend(stream), daemon=True)
        reader.start()
        t0 = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(30) == 0, server.log()
        assert time.monotonic() - t0 < 15
        reader.join(10)
        assert not reader.is_alive()  # the stream ended; the client is not left hanging
        assert "Traceback" not in server.log()


def test_soak_with_random_disconnects(tiny):
    """100 requests from 4 clients, a third of them abandoned (mid-stream, or by a client timeout
    while waiting): every kept one is answered, none hangs, RSS stays flat, /health answers."""
    import random

    import httpx

    rss = lambda: int(next(l for l in open(f"/proc/{tiny.proc.pid}/status") if l.startswith("VmRSS")).split()[1])  # noqa: E731
    before = None
    results: list[str] = []

    def one(i: int) -> None:
        rnd = random.Random(i)
        body = {"model": "tiny", "prompt": f"soak {i}", "max_tokens": rnd.randint(4, 64), "temperature": 0.8, "seed": i}
        with httpx.Client(base_url=tiny.url, timeout=60) as h:
            if rnd.random() < 0.2:  # abandon mid-stream
                with h.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
                    assert r.status_code == 200
                    for _, _ in zip(range(2), r.iter_lines()):
                        pass
                results.append("abandoned")
            elif rnd.random() < 0.15:  # give up while it waits or runs
                try:
                    h.post("/v1/completions", json={**body, "max_tokens": 400}, timeout=0.05)
                except httpx.TimeoutException:
                    pass
                results.append("timed out")
            else:
                r = h.post("/v1/completions", json=body)
                assert r.status_code == 200, r.text
                assert r.json()["choices"][0]["finish_reason"] in ("stop", "length")
                results.append("ok")

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(one, range(10)))  # warm up: allocator and caches reach their size
        before = rss()
        list(pool.map(one, range(10, 110)))
    assert len(results) == 110 and results.count("ok") > 50
    assert tiny.get_json("/health")["status"] == "ok"
    assert rss() - before < 64 * 1024, f"RSS grew {(rss() - before) / 1024:.0f} MiB over 100 requests"
    assert "Traceback" not in tiny.log()


def test_serve_refuses_bad_options(tiny_moe, tmp_path):
    import subprocess
    import sys

    def run(*args):
        return subprocess.run(
            [sys.executable, "-m", "moespac_gguf.cli", "serve", *args], capture_output=True, text=True, timeout=60
        )

    r = run("-m", str(tmp_path / "missing.gguf"))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "error" in r.stderr
    r = run("-m", str(tiny_moe()), "--max-queue", "0")
    assert r.returncode == 2 and "--max-queue" in r.stderr
    with serve("-m", str(tiny_moe()), "-c", "256") as server:
        port = server.url.rsplit(":", 1)[1]
        r = run("-m", str(tiny_moe()), "--port", port)
        assert r.returncode == 2 and "cannot listen" in r.stderr and r.stderr.count("\n") == 1
