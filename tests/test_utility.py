"""Speculative Utility Estimator on hand-made routing with answers worked out by hand."""

import numpy as np
import pytest

from moespac_gguf import MoespacError
from moespac_gguf.core.routing import routing_counts
from moespac_gguf.residency.utility import (
    EwmaUtility,
    SpacUtility,
    TokenPrior,
    UtilityEstimator,
    recall_precision,
    topn_mask,
)


def route(*rows):
    """One layer's routing, a list of per-token expert lists -> experts [1, n_tokens, k]."""
    return np.array([rows])


def test_routing_counts_ignores_missing_experts():
    experts = np.array([[[0, 1], [1, -1]], [[-1, -1], [2, 2]]])
    assert routing_counts(experts, 3).tolist() == [[1, 2, 0], [0, 0, 2]]


def test_spac_moves_one_step_past_each_threshold_and_clips():
    spac = SpacUtility(1, 2, max_state=2, theta_up=2, theta_down=1)
    states = []
    for counts in ([3, 1], [3, 1], [3, 1], [1, 2], [0, 0], [0, 0]):
        spac.update(np.array([counts]))
        states.append(spac.state[0].tolist())
    # expert 0: 3-0>=2 up, 3-1>=2 up, S=2 clip, 2-1>=1 down, 1-0>=1 down, clip at 0
    # expert 1: 1-0<2 stay, ..., 2-0>=2 up, 1-0>=1 down, stay at 0
    assert states == [[1, 0], [2, 0], [2, 0], [1, 1], [0, 0], [0, 0]]


def test_spac_hysteresis_ignores_small_gaps():
    spac = SpacUtility(1, 1, max_state=4, theta_up=3, theta_down=3)
    for count in (2, 2, 2):  # gap of 2 never reaches theta_up=3
        spac.update(np.array([[count]]))
    assert spac.state.tolist() == [[0]]


def test_spac_rejects_thresholds_that_could_fire_both_ways():
    with pytest.raises(MoespacError):
        SpacUtility(1, 1, theta_up=0)


def test_ewma_known_answer():
    ewma = EwmaUtility(1, 3, alpha=0.5, step_alpha=0.5)
    first = route([0, 1], [0, 2])  # counts [2, 1, 1] over 2 rows
    ewma.update(routing_counts(first, 3), np.array([2]))
    assert ewma.utility().tolist() == [[2.0, 1.0, 1.0]]
    second = route([0, 1], [0, 1], [0, 1], [0, 1])  # freq [1, 1, 0] over 4 rows
    ewma.update(routing_counts(second, 3), np.array([4]))
    # forgetting per routed token: 4 rows keep .5**4 of the old estimate
    # freq = .0625*[1, .5, .5] + .9375*[1, 1, 0] = [1, .96875, .03125]; rows per step = .5*2 + .5*4 = 3
    np.testing.assert_allclose(ewma.freq, [[1.0, 0.96875, 0.03125]])
    np.testing.assert_allclose(ewma.utility(), [[3.0, 2.90625, 0.09375]])


def test_ewma_skips_layers_that_routed_nothing():
    est = UtilityEstimator(2, 2, method="ewma", alpha=0.5)
    est.observe_verification([1, 2], np.array([[[0], [0]], [[1], [1]]]))
    est.observe_verification([3, 4], np.array([[[1], [1]], [[-1], [-1]]]))
    # layer 0: two rows keep .5**2: freq .25*[1,0] + .75*[0,1]; layer 1 unchanged [0, 1]; two rows per step
    np.testing.assert_allclose(est.predict(), [[0.5, 1.5], [0.0, 2.0]])


def test_a_prefill_moves_the_frequency_but_not_the_rows_per_step():
    ewma = EwmaUtility(1, 2, alpha=0.5)
    ewma.update(routing_counts(route([0], [0], [1], [1]), 2), np.array([4]), prefill=True)
    np.testing.assert_allclose(ewma.utility(), [[0.5, 0.5]])  # no step seen yet: one row per step
    ewma.update(routing_counts(route([0], [0]), 2), np.array([2]))
    # two rows keep .25: freq .25*[.5, .5] + .75*[1, 0]; rows per step: the first step's 2
    np.testing.assert_allclose(ewma.utility(), [[2 * 0.875, 2 * 0.125]])


def test_predict_over_weighs_the_drafted_ids_as_one_step():
    est = UtilityEstimator(1, 2, method="prior", alpha=0.5)
    est.observe_verification([7, 5], route([0], [1]))  # rate [.5, .5] per row, 2 rows per step
    next_window = est.predict([7])  # (1 [1, 0] + 2 [.5, .5]) / 3 = [2/3, 1/3]
    np.testing.assert_allclose(next_window, [[2 / 3, 1 / 3]])
    np.testing.assert_allclose(est.predict_over(4, [7]), (3 * est.predict() + next_window) / 4)
    np.testing.assert_allclose(est.predict_over(4), est.predict())
    np.testing.assert_allclose(est.predict_over(1, [7]), next_window)


def test_token_prior_smooths_toward_global_frequency():
    prior = TokenPrior(1, 3, strength=1.0)
    prior.observe([7, 7, 9], route([0], [0], [2]))
    np.testing.assert_allclose(prior.frequency(), [[2 / 3, 0, 1 / 3]])
    # token 7: ([2, 0, 0] + 1 * [2/3, 0, 1/3]) / (2 + 1)
    np.testing.assert_allclose(prior.predict([7]), [[8 / 9, 0, 1 / 9]])
    np.testing.assert_allclose(prior.predict([5]), [[2 / 3, 0, 1 / 3]])  # unseen: the global frequency
    np.testing.assert_allclose(prior.predict([7, 5]), [[8 / 9 + 2 / 3, 0, 1 / 9 + 1 / 3]])
    firmer = TokenPrior(1, 3, strength=2.0)  # more pseudo-rows lean harder on the fallback
    firmer.observe([7, 7, 9], route([0], [0], [2]))
    np.testing.assert_allclose(firmer.predict([7]), [[5 / 6, 0, 1 / 6]])  # ([2, 0, 0] + 2 * global) / 4


def test_token_prior_forgets_least_recently_seen_tokens():
    prior = TokenPrior(1, 2, strength=1.0, max_tokens=1)
    prior.observe([7], route([0]))
    prior.observe([9], route([1]))
    np.testing.assert_allclose(prior.predict([7]), prior.frequency())  # 7 evicted
    np.testing.assert_allclose(prior.predict([9]), [[0.25, 0.75]])


def test_estimator_prior_falls_back_to_recent_frequency_for_unseen_drafts():
    est = UtilityEstimator(1, 2, method="prior", alpha=1.0, prior_strength=1.0)
    est.observe_verification([1, 2], route([0], [0]))
    est.observe_verification([3, 4], route([1], [1]))
    # recent frequency [0, 1] (alpha=1), not the global [.5, .5]; three drafted rows
    np.testing.assert_allclose(est.predict([10, 11, 12]), [[0.0, 3.0]])
    # token 1 was seen once on expert 0: ([1, 0] + [0, 1]) / 2
    np.testing.assert_allclose(est.predict([1]), [[0.5, 0.5]])
    np.testing.assert_allclose(est.predict(), [[0.0, 2.0]])  # no drafts: the EWMA estimate


def test_estimator_methods_answer_in_one_space():
    experts = np.array([[[0, 1], [0, 2]], [[1, 2], [1, 3]]])
    for method in ("spac", "ewma", "prior"):
        est = UtilityEstimator(2, 4, method=method)
        est.observe_verification([5, 6], experts)
        utility = est.predict([5, 6])
        assert utility.shape == (2, 4) and utility.dtype == np.float64
        assert utility[0, 0] > utility[0, 3] and utility[1, 1] > utility[1, 0]


def test_recall_precision_known_cases():
    predicted = np.array([[True, True, False, False]])
    used = np.array([[True, False, True, False]])
    assert recall_precision(predicted, used) == (0.5, 0.5)
    assert recall_precision(used, used) == (1.0, 1.0)
    assert recall_precision(np.ones((1, 4), bool), used) == (1.0, 0.5)
    assert recall_precision(np.zeros((1, 4), bool), np.zeros((1, 4), bool)) == (1.0, 1.0)


def test_topn_mask_breaks_ties_to_lower_ids():
    mask = topn_mask(np.array([[0.5, 2.0, 0.5, 1.0]]), 2)
    assert mask.tolist() == [[False, True, False, True]]
    assert topn_mask(np.array([[1.0, 1.0, 1.0]]), 2).tolist() == [[True, True, False]]


@pytest.mark.parametrize(
    "call",
    [
        lambda est: est.observe_verification([1], np.array([[[4]]])),  # expert id out of range
        lambda est: est.observe_verification([1, 2], np.array([[[0]]])),  # two ids for one row
        lambda est: est.observe_verification([1], np.array([[[0]], [[0]]])),  # two layers for one
        lambda est: recall_precision(np.ones((1, 2), bool), np.ones((1, 3), bool)),
    ],
)
def test_bad_input_raises_moespac_error(call):
    with pytest.raises(MoespacError):
        call(UtilityEstimator(1, 4, method="prior"))


def test_unknown_method_raises():
    with pytest.raises(MoespacError, match="unknown utility method"):
        UtilityEstimator(1, 1, method="lru")
