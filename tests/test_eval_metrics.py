"""Metric arithmetic of the robustness evaluation against hand-computed cases."""

from __future__ import annotations

import pytest

from coin_ds.eval.metrics import accuracy, level_summary, mean_std, pdr, summarize


def test_accuracy_counts_unparseable_as_wrong():
    assert accuracy(["a", "b", None, "a"], ["a", "a", "a", "a"]) == 0.5
    with pytest.raises(ValueError):
        accuracy(["a"], ["a", "b"])


def test_mean_and_population_std():
    mean, std = mean_std([0.5, 1.0, None])  # None (a skipped instruction) drops out
    assert mean == pytest.approx(0.75)
    assert std == pytest.approx(0.25)  # population std: sqrt(((0.25)^2 + (0.25)^2) / 2), not / 1
    assert mean_std([0.2, 0.4, 0.9]) == (pytest.approx(0.5), pytest.approx(0.2943920288775949))
    assert mean_std([None]) == (None, None)


def test_pdr_definition():
    assert pdr(0.6, 0.8) == pytest.approx(0.25)
    assert pdr(0.9, 0.8) == pytest.approx(-0.125)  # negative: the perturbation helped
    assert pdr(0.5, 0.0) is None  # undefined, not infinite
    assert pdr(None, 0.8) is None


def test_level_summary_pairs_by_index():
    s = level_summary([0.4, 0.6, None], [0.8, 0.6, 0.5])
    assert s["mean"] == pytest.approx(0.5) and s["std"] == pytest.approx(0.1)
    assert s["pdr"] == [pytest.approx(0.5), pytest.approx(0.0), None]
    assert s["pdr_mean"] == pytest.approx(0.25)
    assert "pdr" not in level_summary([0.8, 0.6], None)  # the clean level has no PDR


def test_summarize_averages_tasks_unweighted():
    accs = {
        "a": {"clean": [1.0, 0.5], "typo": [0.5, 0.5]},  # PDR [0.5, 0.0] -> 0.25
        "b": {"clean": [0.5, 0.5], "typo": [0.5, 0.25]},  # PDR [0.0, 0.5] -> 0.25; mean 0.375, std 0.125
    }
    s = summarize(accs)
    assert s["tasks"]["a"]["clean"]["mean"] == pytest.approx(0.75)
    assert s["tasks"]["b"]["typo"]["std"] == pytest.approx(0.125)
    assert s["overall"]["clean"]["mean"] == pytest.approx((0.75 + 0.5) / 2)
    assert s["overall"]["typo"]["mean"] == pytest.approx((0.5 + 0.375) / 2)
    assert s["overall"]["typo"]["std"] == pytest.approx((0.0 + 0.125) / 2)
    assert s["overall"]["typo"]["pdr_mean"] == pytest.approx(0.25)
    assert "pdr_mean" not in s["overall"]["clean"]
