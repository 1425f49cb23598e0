"""The adaptive draft length (decode.adaptive.DraftLength) on simulated costs: pure logic."""

from __future__ import annotations

import numpy as np

from moespac_gguf.decode.adaptive import DraftLength

T_DRAFT = 0.6  # a draft token costs 60% of a target token (the dense SmolLM2 drafting SmolMoE here)


def verify_cost(n: int) -> float:
    return 1.0 + 0.1 * (n - 1)


def run(ctl: DraftLength, acceptance, steps: int, catch_up: float = 0.0, seed: int = 0):
    """(K of each step, total cost, tokens committed) of `steps` steps whose drafts are accepted
    each with probability acceptance(step); a draft step that is not paying (a measurement or a
    probe) after a plain step first pays `catch_up` for the text the draft has not read."""
    rng = np.random.default_rng(seed)
    ks, cost, tokens = [], 0.0, 0
    for step in range(steps):
        k = ctl.next_k()
        accepted = 0
        while accepted < k and rng.random() < acceptance(step):
            accepted += 1
        t_catch_up = catch_up if k and not ctl.paying and not (ks and ks[-1]) else 0.0
        t_verify = verify_cost(k + 1)
        ctl.observe(k, accepted, T_DRAFT * k, t_verify, t_catch_up)
        ks.append(k)
        cost += T_DRAFT * k + t_verify + t_catch_up
        tokens += accepted + 1
    return ks, cost, tokens


def test_a_draft_that_does_not_pay_falls_to_zero_within_a_few_steps_and_probing_costs_under_3_percent():
    # a probe's catch-up: the 16-token window re-read at 75% of a target token each (measured here)
    ctl = DraftLength(k_max=8)
    ks, cost, tokens = run(ctl, lambda step: 0.3, steps=2000, catch_up=12.0)
    assert ks[0] == 0 and ks[1] == 4  # a plain step, then one that measures the draft
    assert all(k <= 1 for k in ks[3:])  # K = 0 from the third step on, probes aside
    assert tokens / cost >= 0.97  # plain decoding: 1 token per unit of cost


def test_a_draft_slower_than_the_target_is_never_probed():
    ctl = DraftLength(k_max=8)
    ctl.observe(0, 0, 0.0, 1.0)
    ctl.observe(4, 4, 4 * 1.2, 1.3)  # every draft accepted, but 1.2x a target token each
    assert all(ctl.next_k() == 0 for _ in range(5000))


def test_a_draft_that_pays_keeps_drafting():
    ctl = DraftLength(k_max=8)
    ks, cost, tokens = run(ctl, lambda step: 0.95, steps=300)
    assert min(ks[10:]) >= 1 and np.mean(ks[10:]) >= 2
    assert tokens / cost > 1.1  # K = 4 would give 1.19


def test_a_probe_notices_when_the_draft_starts_to_pay():
    """Acceptance 0.2 for 200 steps, then 0.97 (e.g. the text turns into a repeated list):
    probing finds it and drafting resumes."""
    ctl = DraftLength(k_max=8)
    ks, _, _ = run(ctl, lambda step: 0.2 if step < 200 else 0.97, steps=800)
    assert max(ks[20:200]) <= 1
    assert np.mean(ks[-100:]) >= 2


def test_no_probe_when_verification_batches_cost_more_than_they_can_commit():
    """Measured here on SmolMoE: a 2-token verification costs 1.6 one-token ones, a 5-token one
    2.8, and a SmolLM2 draft token 0.65: at acceptance 1, K = 1 gives 2 tokens for 2.25."""
    ctl = DraftLength(k_max=8)
    ctl.observe(0, 0, 0.0, 1.0)
    ctl.observe(4, 4, 4 * 0.65, 2.83)
    ctl.observe(1, 1, 0.65, 1.6)
    assert all(ctl.next_k() == 0 for _ in range(5000))


def test_probes_spend_a_bounded_share_of_the_time():
    """probe_share of the plain steps' time, and one probe more: the first probe of a run cannot
    know its catch-up yet."""
    for catch_up in (0.0, 5.0, 50.0):
        ctl = DraftLength(k_max=4, probe_share=0.015)
        ks, cost, tokens = run(ctl, lambda step: 0.0, steps=5000, catch_up=catch_up)
        probes = sum(1 for k in ks[3:] if k == 1)
        probe_cost = catch_up + T_DRAFT + 0.1
        assert probes >= 1 and probes * probe_cost <= 0.015 * 5000 + probe_cost, (catch_up, probes)
