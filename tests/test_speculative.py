"""Speculative decoding: greedy output equals the target's own; sampling follows the target."""

import json
import subprocess
import sys

import numpy as np
import pytest
from gguf_edit import gguf_copy

from moespac_gguf import MoeSpac, MoespacError
from moespac_gguf.api.text import TextStream
from moespac_gguf.core.paths import SHARED_DIR
from moespac_gguf.decode.sampling import Sampler
from moespac_gguf.decode.speculative import SpeculativeDecoder
from moespac_gguf.demo.synthetic import SyntheticSpec
from moespac_gguf.llama.capture import RouterCapture
from moespac_gguf.llama.session import Session

TARGET = SyntheticSpec(arch="qwen3moe", n_layer=2, seed=1)
# same tokenizer; a near copy of the target (agrees often) and an unrelated dense model (rarely)
NEAR_DRAFT = SyntheticSpec(arch="qwen3moe", n_layer=2, seed=1, n_expert_used=1)
FAR_DRAFT = SyntheticSpec(arch="llama", n_expert=0, n_layer=2, seed=7)


def spec_bench_prompts(n: int) -> list[str]:
    path = SHARED_DIR / "data" / "prompts" / "spec_bench_question.jsonl"
    if not path.exists():
        pytest.skip(f"{path} not found")
    rows = [json.loads(l) for l in path.open()]
    return [rows[i * (len(rows) // n)]["turns"][0][:200] for i in range(n)]


def greedy_reference(session: Session, prompt: list[int], n: int) -> list[int]:
    """Plain greedy decoding, one token at a time, no speculation code involved."""
    session.reset()
    logits = session.decode(prompt)
    out = []
    for _ in range(n):
        tok = int(np.argmax(logits[-1]))
        out.append(tok)
        if session.is_eog(tok):
            break
        logits = session.decode([tok])
    return out


@pytest.fixture(scope="module")
def sessions(tiny_moe):
    made = {
        name: Session(tiny_moe(spec), n_ctx=512, tap=name == "target")
        for name, spec in (("target", TARGET), ("near", NEAR_DRAFT), ("far", FAR_DRAFT))
    }
    yield made
    for s in made.values():
        s.close()


@pytest.mark.parametrize("draft_name", [None, "near", "far", "self"])
@pytest.mark.parametrize("draft_max", [1, 4])
def test_greedy_speculative_equals_target_greedy(sessions, tiny_moe, draft_name, draft_max):
    target = sessions["target"]
    if draft_name == "self":
        draft = Session(tiny_moe(TARGET), n_ctx=512, tap=False)
    else:
        draft = sessions.get(draft_name)
    dec = SpeculativeDecoder(target, draft, draft_max=draft_max, adaptive=False)
    for text in spec_bench_prompts(4):
        prompt = target.tokenize(text)
        want = greedy_reference(target, prompt, 40)
        got = list(dec.generate(prompt, 40, Sampler()))
        assert got == want, f"draft={draft_name} K={draft_max}: speculative output diverged"
    if draft_name == "self":
        assert dec.stats.acceptance_rate == 1.0
        draft.close()
    elif draft_name is None:
        assert dec.stats.acceptance_rate is None and dec.stats.n_steps == dec.stats.n_generated


def test_adaptive_draft_length_keeps_output(sessions):
    target, draft = sessions["target"], sessions["far"]
    dec = SpeculativeDecoder(target, draft, draft_max=6, adaptive=True)
    prompt = target.tokenize("adaptive draft length must not change greedy output")
    assert list(dec.generate(prompt, 60, Sampler())) == greedy_reference(target, prompt, 60)


def test_observers_see_drafts_and_verification_routing(sessions):
    target, draft = sessions["target"], sessions["near"]
    seen = {"draft": [], "verify": []}

    class Recorder:
        def on_draft(self, tokens, ahead=None):
            seen["draft"].append(list(tokens))

        def on_verify(self, ev):
            seen["verify"].append(ev)

    dec = SpeculativeDecoder(target, draft, draft_max=3, adaptive=False)
    dec.subscribe(Recorder())
    out = list(dec.generate(target.tokenize("observe the sensor"), 12, Sampler()))
    verifies = [e for e in seen["verify"] if e.phase == "verify"]
    assert [e.draft for e in verifies] == seen["draft"]
    assert sum(len(e.committed) for e in verifies) >= len(out)
    for ev in verifies:
        assert ev.routing.experts.shape[1] == len(ev.batch) == 1 + len(ev.draft)
        assert (ev.routing.experts >= 0).all()  # logits at every row: every layer routes every token
        assert ev.committed[: ev.accepted] == ev.draft[: ev.accepted]


@pytest.mark.parametrize("draft_max,ahead", [(2, 4), (3, 0), (1, 1)])
def test_draft_ahead_routing_is_the_targets_when_the_draft_is_the_target(sessions, tiny_moe, draft_max, ahead):
    """The target drafting for itself (a copy with a RouterCapture) runs `ahead` tokens ahead: its
    routing of each row the verification then decodes must be the verification's own, row by row
    (same weights, same tokens, same KV), and the output the target's greedy one."""
    target = sessions["target"]
    router = RouterCapture()
    draft = Session(tiny_moe(TARGET), n_ctx=512, tap=False, capture=router)
    seen = []

    class Recorder:
        def on_draft(self, tokens, ahead_rows=None):
            seen.append(["draft", list(tokens), ahead_rows])

        def on_verify(self, ev):
            seen.append(["verify", ev])

    dec = SpeculativeDecoder(target, draft, draft_max=draft_max, adaptive=False, draft_ahead=ahead, draft_router=router)
    dec.subscribe(Recorder())
    prompt = target.tokenize("the draft runs ahead of the target")
    assert list(dec.generate(prompt, 24, Sampler())) == greedy_reference(target, prompt, 24)
    steps = [(a, b[1]) for a, b in zip(seen, seen[1:]) if a[0] == "draft" and b[0] == "verify"]
    assert steps and dec.stats.acceptance_rate == 1.0
    for (_, tokens, rows), ev in steps:
        if rows is None:  # nothing drafted (the last token)
            assert not tokens and ahead == 0
            continue
        # rows: [last committed, d1 .. d(n-1)] for the n tokens drafted (d_n itself is never decoded)
        assert rows.shape == (target.n_layer, max(len(tokens), ahead), target.n_expert_used)
        n = min(len(ev.batch), rows.shape[1])  # the rows both decoded
        assert (np.sort(rows[:, :n], axis=2) == np.sort(ev.routing.experts[:, :n], axis=2)).all()
    draft.close()


@pytest.mark.parametrize("adaptive", [False, True])
def test_a_draft_running_ahead_of_another_file_keeps_greedy_output(sessions, tiny_moe, adaptive):
    """A near copy routing one expert drafts 5 ahead of a 2-token proposal: where the target's token
    after the accepted drafts is the draft's next one, its run carries over to the next step (its
    KV too), elsewhere it is rolled back; either way the output is the target's greedy one, and
    the rows cover the proposals and the run ahead."""
    target, router = sessions["target"], RouterCapture()
    draft = Session(tiny_moe(NEAR_DRAFT), n_ctx=512, tap=False, capture=router)
    widths = []

    class Recorder:
        def on_draft(self, tokens, ahead_rows=None):
            widths.append(ahead_rows.shape[1])

        def on_verify(self, ev):
            pass

    dec = SpeculativeDecoder(target, draft, draft_max=2, adaptive=adaptive, draft_ahead=5, draft_router=router)
    dec.subscribe(Recorder())
    for text in spec_bench_prompts(3):
        prompt = target.tokenize(text)
        assert list(dec.generate(prompt, 30, Sampler())) == greedy_reference(target, prompt, 30)
    assert widths and all(w == 5 for w in widths[:-1])
    draft.close()


def test_a_run_ahead_into_a_full_context_still_ends_in_the_targets_greedy_text(sessions, tiny_moe):
    """The draft runs 4 ahead of the target copy it is until the 256-token context is full: what
    it carried over leaves its KV as the room runs out, and the text is the target's greedy one
    up to the context's end."""
    router = RouterCapture()
    with (
        Session(tiny_moe(TARGET), n_ctx=256, tap=True) as target,
        Session(tiny_moe(TARGET), n_ctx=256, tap=False, capture=router) as draft,
    ):
        dec = SpeculativeDecoder(target, draft, draft_max=1, adaptive=False, draft_ahead=4, draft_router=router)
        prompt = target.tokenize("fill the context")
        out = list(dec.generate(prompt, 400, Sampler()))
        assert dec.stats.finish_reason == "context" and len(prompt) + len(out) >= 255
        assert out == greedy_reference(sessions["target"], prompt, len(out))


def test_sampling_follows_target_distribution(sessions):
    """First generated token over many seeds ~ target softmax at T=1 (chi-square), via rejection sampling."""
    from scipy.stats import chisquare

    target, draft = sessions["target"], sessions["far"]
    prompt = target.tokenize("the")
    target.reset()
    p = Sampler(temperature=1.0).probs(target.decode(prompt)[-1])
    dec = SpeculativeDecoder(target, draft, draft_max=3, adaptive=False)
    n = 1500
    counts = np.zeros(p.size)
    for seed in range(n):
        tok = next(dec.generate(prompt, 4, Sampler(temperature=1.0, seed=seed)))
        counts[tok] += 1
    assert dec.stats.n_drafted > 0
    order = np.argsort(-p)
    big = order[p[order] * n >= 10]  # chi-square wants expected counts >= 5
    rest = np.setdiff1d(np.arange(p.size), big)
    obs = np.append(counts[big], counts[rest].sum())
    exp = np.append(p[big], p[rest].sum()) * n
    assert chisquare(obs, exp).pvalue > 1e-3


def test_accept_rule_matches_target_distribution_exactly():
    """The rejection rule alone, on hand-made p and q, reproduces p (law of total probability)."""
    rng_p = np.array([0.5, 0.3, 0.2, 0.0])
    q = np.array([0.1, 0.1, 0.4, 0.4])
    logits_p = np.log(np.maximum(rng_p, 1e-30))
    n, counts = 20000, np.zeros(4)
    s = Sampler(temperature=1.0, seed=0)
    for _ in range(n):
        d = s.draw(q)
        acc, bonus = SpeculativeDecoder._accept([d], [q], np.stack([logits_p, logits_p]), s)
        counts[d if acc else bonus] += 1
    assert np.allclose(counts / n, rng_p, atol=0.015)


def test_draft_with_other_vocabulary_is_refused(tmp_path, tiny_moe):
    """A draft whose vocabulary differs is refused before any decoding."""
    import gguf

    src = tiny_moe(FAR_DRAFT)
    tokens = gguf.GGUFReader(src).fields["tokenizer.ggml.tokens"].contents()
    tokens[100] = "zz"
    other = gguf_copy(src, tmp_path / "other.gguf", {"tokenizer.ggml.tokens": (tokens, gguf.GGUFValueType.ARRAY)})
    r = subprocess.run(
        [sys.executable, "-m", "moespac_gguf.cli", "run", "-m", str(tiny_moe(TARGET)), "-md", str(other), "-p", "hi"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "different vocabulary" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_run_cli_json_and_errors(tiny_moe, tmp_path):
    target, draft = str(tiny_moe(TARGET)), str(tiny_moe(NEAR_DRAFT))
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "moespac_gguf.cli",
            "run",
            "-m",
            target,
            "-md",
            draft,
            "-p",
            "hello",
            "-n",
            "16",
            "--json",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    d = json.loads(r.stdout)
    assert {"text", "tokens", "n_tokens", "tokens_per_s", "acceptance_rate"} <= d.keys()
    assert d["n_tokens"] == len(d["tokens"]) <= 16 and 0 <= d["acceptance_rate"] <= 1
    plain = json.loads(
        subprocess.run(
            # a draft's output is the target's with flash attention off (-fa auto turns it on without one)
            [sys.executable, "-m", "moespac_gguf.cli", "run", "-m", target, "-p", "hello", "-n", "16", "-fa", "off"]
            + ["--json"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    assert plain["acceptance_rate"] is None and plain["tokens"] == d["tokens"]
    dense = tiny_moe(FAR_DRAFT)
    cases = [
        (["-m", str(tmp_path / "nope.gguf"), "-p", "x"], "no such file"),
        (["-m", str(dense), "-p", "x"], "dense model"),
        (["-m", target, "-md", str(tmp_path / "nod.gguf"), "-p", "x"], "no such file"),
        (["-m", target, "-c", "64", "-p", "word " * 200], "does not fit the context"),
        (["-m", target, "-p", "x", "-n", "0"], "give 1 or more tokens, or -1"),
        (["-m", target, "-p", "x", "-n", "-2"], "give 1 or more tokens, or -1"),
    ]
    for args, msg in cases:
        r = subprocess.run([sys.executable, "-m", "moespac_gguf.cli", "run", *args], capture_output=True, text=True)
        assert r.returncode == 2 and msg in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_minus_one_tokens_runs_to_the_end_and_negative_temperature_is_greedy(tiny_moe):
    """As llama.cpp: -n -1 generates until the end of text or a full context; 0 and other
    negatives are refused; a temperature below 0 is greedy."""
    with MoeSpac(tiny_moe(TARGET), n_ctx=64) as m:
        out = m.create_completion("hello", max_tokens=-1)
        assert out["choices"][0]["finish_reason"] in ("context", "stop")
        assert out["choices"][0]["finish_reason"] == "stop" or m.target.n_past == m.target.n_ctx
        for bad in (0, -2):
            with pytest.raises(MoespacError, match="max_tokens must be 1 or more, or -1"):
                m.create_completion("hello", max_tokens=bad)
        greedy = m.create_completion("hello", max_tokens=8)["choices"][0]["text"]
        assert m.create_completion("hello", max_tokens=8, temperature=-1.0, seed=3)["choices"][0]["text"] == greedy


def test_context_full_stops_cleanly(tiny_moe):
    with MoeSpac(tiny_moe(TARGET), tiny_moe(NEAR_DRAFT), n_ctx=64) as m:
        out = m.create_completion("hello", max_tokens=500)
        assert out["choices"][0]["finish_reason"] == "context"
        assert m.target.n_past <= m.target.n_ctx  # llama.cpp rounds n_ctx up (64 -> 256)


def test_chat_and_streaming(tiny_moe):
    with MoeSpac(tiny_moe(TARGET), tiny_moe(NEAR_DRAFT), n_ctx=256) as m:
        full = m.create_chat_completion([{"role": "user", "content": "hi"}], max_tokens=12)
        chunks = list(m.create_chat_completion([{"role": "user", "content": "hi"}], max_tokens=12, stream=True))
        text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
        assert chunks[0]["choices"][0]["delta"] == {"role": "assistant"}
        assert text == full["choices"][0]["message"]["content"]
        assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
        comp = m.create_completion("hello", max_tokens=12)
        stream = "".join(c["choices"][0]["text"] for c in m.create_completion("hello", max_tokens=12, stream=True))
        assert stream == comp["choices"][0]["text"]


def test_chat_cli_reads_piped_stdin(tiny_moe):
    r = subprocess.run(
        [sys.executable, "-m", "moespac_gguf.cli", "chat", "-m", str(tiny_moe(TARGET)), "-n", "8", "--stats"],
        input="hello\nhow are you\n",
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("tok/s") == 2


def test_text_stream_stop_strings_and_utf8():
    ts = TextStream(["STOP"])
    parts = [ts.feed(b) for b in (b"ab", "é".encode()[:1], "é".encode()[1:], b"cST", b"OPzz")]
    assert "".join(parts) == "abéc" and ts.stopped
    ts = TextStream(["xyz"])
    assert ts.feed(b"abx") == "ab" and ts.feed(b"q") == "xq" and ts.flush() == ""


def test_empty_prompt_is_an_error(sessions):
    with pytest.raises(MoespacError, match="empty prompt"):
        list(SpeculativeDecoder(sessions["target"]).generate([], 4, Sampler()))
