"""Statistics against textbook values."""

from __future__ import annotations

import json

import pytest

from vla_core.eval.stats import (
    compare_episode_files,
    mcnemar_exact,
    min_detectable_difference,
    pair_episode_files,
    pair_records,
    required_n_two_proportions,
    success_summary,
    wilson_interval,
)
from vla_core.utils import WmvlaError


def test_wilson_known_values():
    # Newcombe (1998), Table I / Brown, Cai & DasGupta (2001): 95 % Wilson intervals
    assert wilson_interval(8, 10) == pytest.approx((0.4902, 0.9433), abs=1e-4)
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson_interval(10, 10) == pytest.approx((0.7225, 1.0), abs=1e-4)
    assert wilson_interval(81, 263) == pytest.approx((0.2553, 0.3662), abs=1e-4)  # Newcombe's example
    assert wilson_interval(0, 0) == (0.0, 1.0)
    lo, hi = wilson_interval(50, 100)
    assert lo + hi == pytest.approx(1.0)  # symmetric at p = 0.5
    with pytest.raises(WmvlaError):
        wilson_interval(3, 2)


def test_mcnemar_exact_known_values():
    # b = 1, c = 9: two-sided p = 2 * P(X <= 1 | 10, 0.5) = 2 * 11 / 1024
    r = mcnemar_exact([(True, False)] + [(False, True)] * 9 + [(True, True)] * 5 + [(False, False)] * 3)
    assert (r.n_pairs, r.both, r.only_a, r.only_b, r.neither) == (18, 5, 1, 9, 3)
    assert r.p_value == pytest.approx(22 / 1024)
    assert r.rate_a == pytest.approx(6 / 18) and r.rate_b == pytest.approx(14 / 18)
    assert r.difference == pytest.approx(8 / 18)
    # no discordant pairs: no evidence either way
    assert mcnemar_exact([(True, True), (False, False)]).p_value == 1.0
    # b = c: p = 1
    assert mcnemar_exact([(True, False), (False, True)]).p_value == pytest.approx(1.0)
    # b = 0, c = 6: p = 2 / 64
    assert mcnemar_exact([(False, True)] * 6).p_value == pytest.approx(2 / 64)
    assert set(r.to_dict()) >= {"both", "only_a", "only_b", "neither", "p_value"}


def test_power_known_values():
    # Fleiss (no continuity correction): 0.5 -> 0.6 at alpha 0.05, power 0.8 needs 387.3 per group
    assert required_n_two_proportions(0.5, 0.6) == pytest.approx(387.34, abs=0.05)
    assert min_detectable_difference(387.34, 0.5) == pytest.approx(0.1, abs=1e-3)
    # 0.2 -> 0.4: 81.2 per group (standard tables: 82 with rounding up)
    assert required_n_two_proportions(0.2, 0.4) == pytest.approx(81.2, abs=0.2)
    # more episodes -> smaller detectable difference; too few -> clipped at 1 - p0
    assert min_detectable_difference(1000, 0.5) < min_detectable_difference(100, 0.5)
    assert min_detectable_difference(2, 0.5) == 0.5


def test_success_summary_per_task_and_errors():
    recs = [{"task": "a", "success": True}, {"task": "a", "success": False, "error": "env: boom"},
            {"task": "b", "success": True}, {"task": "b", "success": True}]
    s = success_summary(recs)
    assert s["overall"]["n"] == 4 and s["overall"]["success_rate"] == 0.75 and s["overall"]["errors"] == 1
    assert s["overall"]["ci95"] == pytest.approx(list(wilson_interval(3, 4)))
    assert s["per_task"]["a"] == {"success_rate": 0.5, "n": 2, "successes": 1,
                                  "ci95": pytest.approx(list(wilson_interval(1, 2))), "errors": 1}
    assert s["overall"]["mean_task_success_rate"] == 0.75


def _rec(task, k, success, condition="c", seed=1000):
    return {"env": "metaworld", "suite": "mt50", "task": task, "init_index": k, "seed": seed,
            "condition": condition, "success": success}


def test_pairing_matches_task_init_seed(tmp_path):
    a = [_rec("t", 0, True, "A"), _rec("t", 1, False, "A"), _rec("t", 2, True, "A"), _rec("u", 0, True, "A")]
    b = [_rec("t", 1, True, "B"), _rec("t", 0, True, "B"), _rec("t", 2, False, "B"), _rec("t", 0, True, "B", seed=7)]
    p = pair_records(a, b)
    assert p.keys == [("metaworld", "mt50", "t", 0, 1000), ("metaworld", "mt50", "t", 1, 1000),
                      ("metaworld", "mt50", "t", 2, 1000)]
    assert p.pairs == [(True, True), (False, True), (True, False)]
    assert (p.only_in_a, p.only_in_b) == (1, 1)
    pa, pb = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    pa.write_text("".join(json.dumps(r) + "\n" for r in a))
    pb.write_text("".join(json.dumps(r) + "\n" for r in b))
    assert pair_episode_files(pa, pb).pairs == p.pairs
    out = compare_episode_files(pa, pb)
    assert out["mcnemar"]["only_a"] == 1 and out["mcnemar"]["only_b"] == 1 and out["mcnemar"]["p_value"] == 1.0
    with pytest.raises(WmvlaError, match="two episodes"):
        pair_records(a + a, b)
    mixed = tmp_path / "m.jsonl"
    mixed.write_text("".join(json.dumps(r) + "\n" for r in a + b))
    with pytest.raises(WmvlaError, match="several conditions"):
        pair_episode_files(mixed, pb)
    assert pair_episode_files(mixed, mixed, condition_a="A", condition_b="B").pairs == p.pairs
