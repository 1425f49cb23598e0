"""One MoeSpac shared by threads (what a desktop app embedding it does): generations take turns
in arrival order, an abandoned stream frees the instance, and a thread that would wait for
itself gets an error instead of a deadlock."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from moespac_gguf import MoeSpac, MoespacError

PROMPTS = ["One thread asks", "Another thread asks something else", "A third one"]


@pytest.fixture(scope="module")
def model(tiny_moe):
    with MoeSpac(tiny_moe(), n_ctx=256, mem_budget=None) as m:
        yield m


def text(m: MoeSpac, prompt: str, **kw) -> str:
    return m.create_completion(prompt, max_tokens=24, **kw)["choices"][0]["text"]


def wait_for(cond, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_three_threads_get_their_own_answers(model):
    alone = [text(model, p) for p in PROMPTS]
    with ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(text, model, p) for p in PROMPTS * 3]
        together = [f.result(timeout=120) for f in futures]
    assert together == alone * 3


def test_turns_follow_arrival_order(model):
    order: list[str] = []

    def ask(name: str) -> None:
        def first_token_seen():  # asked after every token: the first call is the start of its turn
            if name not in order:
                order.append(name)
            return False

        text(model, PROMPTS[0], cancel=first_token_seen)

    stream = model.create_completion(PROMPTS[1], max_tokens=200, stream=True)
    next(stream)  # this thread's turn is open
    threads = []
    for i, name in enumerate("ABC"):
        t = threading.Thread(target=ask, args=(name,))
        t.start()
        threads.append(t)
        wait_for(lambda i=i: model._turns.waiting == i + 1)
    stream.close()
    for t in threads:
        t.join(60)
    assert order == ["A", "B", "C"]


def test_abandoned_streams_free_the_instance(model):
    expected = text(model, PROMPTS[2])
    s = model.create_completion(PROMPTS[0], max_tokens=200, stream=True)
    next(s)
    del s  # dropped half-way: CPython closes it, and its turn ends
    with ThreadPoolExecutor(1) as pool:
        assert pool.submit(text, model, PROMPTS[2]).result(timeout=60) == expected
    chat = model.create_chat_completion([{"role": "user", "content": "hi"}], max_tokens=200, stream=True)
    next(chat), next(chat)
    chat.close()
    assert text(model, PROMPTS[2]) == expected
    unstarted = model.create_completion(PROMPTS[0], stream=True)  # never read: never took a turn
    assert text(model, PROMPTS[2]) == expected
    del unstarted


def test_a_thread_cannot_wait_for_its_own_stream(model):
    s = model.create_completion(PROMPTS[0], max_tokens=200, stream=True)
    next(s)
    with pytest.raises(MoespacError, match="stream that is still open"):
        text(model, PROMPTS[1])
    s.close()
    assert text(model, PROMPTS[1])
