"""Statistics of closed-loop results: Wilson intervals, success summaries, paired exact McNemar tests.

Hand-written on purpose (each is a few lines of textbook formula; the binomial tail comes from scipy):
- Wilson score interval (Wilson 1927), the interval recommended for binomial proportions at small n and
  near 0 or 1 (Brown, Cai & DasGupta 2001); the normal "p +- 1.96 se" interval is wrong exactly there.
- Exact McNemar test: for paired outcomes only the discordant pairs carry information; under H0 the
  number of pairs where only A succeeds is Binomial(b + c, 1/2). Two-sided p from scipy.stats.binomtest.
- Minimum detectable difference: Fleiss' sample size formula for two independent proportions (normal
  approximation, no continuity correction), solved for the alternative p1 > p0.
"""

from __future__ import annotations

import math
import os
from collections import defaultdict
from dataclasses import asdict, dataclass
from typing import Iterable

from vla_core.utils import WmvlaError, read_jsonl

PAIR_KEY = ("env", "suite", "task", "init_index", "seed")


def _z(confidence: float) -> float:
    from scipy.stats import norm

    return float(norm.ppf(0.5 + confidence / 2))


def wilson_interval(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for k successes out of n; (0, 1) when n == 0."""
    if n < 0 or k < 0 or k > n:
        raise WmvlaError(f"wilson_interval needs 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return (0.0, 1.0)
    z = _z(confidence)
    p = k / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # exact bounds at the edges (floating point would give 1e-17 instead of 0)
    lo = 0.0 if k == 0 else max(0.0, center - half)
    hi = 1.0 if k == n else min(1.0, center + half)
    return (lo, hi)


def rate_summary(successes: Iterable[bool], confidence: float = 0.95) -> dict:
    """{"success_rate", "n", "successes", "ci95": [lo, hi]} of a list of outcomes."""
    s = [bool(x) for x in successes]
    n, k = len(s), sum(s)
    lo, hi = wilson_interval(k, n, confidence)
    return {"success_rate": (k / n) if n else None, "n": n, "successes": k, "ci95": [lo, hi]}


def success_summary(records: list[dict], by: str = "task") -> dict:
    """Per-task (or per `by` value) and overall success with 95 % Wilson intervals.

    Records are episodes.jsonl rows; rows with an `error` count as failures and are also counted in
    `errors`, so infrastructure problems are visible instead of silently lowering the rate.
    """
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        groups[str(r[by])].append(r)
    per = {}
    for name in sorted(groups):
        rs = groups[name]
        per[name] = rate_summary(r["success"] for r in rs) | {"errors": sum(bool(r.get("error")) for r in rs)}
    overall = rate_summary(r["success"] for r in records) | {"errors": sum(bool(r.get("error")) for r in records)}
    # the mean of per-task rates weighs tasks equally (differs from the pooled rate with unequal n)
    rates = [v["success_rate"] for v in per.values() if v["success_rate"] is not None]
    overall["mean_task_success_rate"] = sum(rates) / len(rates) if rates else None
    return {"overall": overall, f"per_{by}": per}


@dataclass(frozen=True)
class McNemarResult:
    n_pairs: int
    both: int  # A and B succeed
    only_a: int  # A succeeds, B fails
    only_b: int  # B succeeds, A fails
    neither: int
    p_value: float  # two-sided exact McNemar (binomial test on the discordant pairs)
    rate_a: float | None
    rate_b: float | None
    difference: float | None  # rate_b - rate_a

    def to_dict(self) -> dict:
        return asdict(self)


def mcnemar_exact(pairs: Iterable[tuple[bool, bool]]) -> McNemarResult:
    """Exact McNemar test of paired outcomes (success_a, success_b) on matched initial conditions."""
    from scipy.stats import binomtest

    both = only_a = only_b = neither = 0
    for a, b in pairs:
        a, b = bool(a), bool(b)
        both += a and b
        only_a += a and not b
        only_b += b and not a
        neither += not a and not b
    n = both + only_a + only_b + neither
    discordant = only_a + only_b
    p = 1.0 if discordant == 0 else float(binomtest(only_a, discordant, 0.5, alternative="two-sided").pvalue)
    rate_a = (both + only_a) / n if n else None
    rate_b = (both + only_b) / n if n else None
    diff = (rate_b - rate_a) if n else None
    return McNemarResult(n, both, only_a, only_b, neither, min(1.0, p), rate_a, rate_b, diff)


@dataclass(frozen=True)
class PairedEpisodes:
    pairs: list[tuple[bool, bool]]
    keys: list[tuple]  # (env, suite, task, init_index, seed) of each pair
    only_in_a: int  # episodes without a partner, left out of the test
    only_in_b: int


def pair_records(records_a: list[dict], records_b: list[dict], key: tuple[str, ...] = PAIR_KEY) -> PairedEpisodes:
    """Match two conditions' episodes on (env, suite, task, init_index, seed)."""

    def index(records: list[dict], name: str) -> dict[tuple, bool]:
        out: dict[tuple, bool] = {}
        for r in records:
            k = tuple(r[f] for f in key)
            if k in out:
                raise WmvlaError(f"condition {name} has two episodes for {dict(zip(key, k))}; pass one condition "
                                 "per record list (filter by `condition` first)")
            out[k] = bool(r["success"])
        return out

    a, b = index(records_a, "A"), index(records_b, "B")
    common = sorted(set(a) & set(b), key=lambda k: tuple(str(x) for x in k))
    return PairedEpisodes([(a[k], b[k]) for k in common], common, len(set(a) - set(b)), len(set(b) - set(a)))


def pair_episode_files(path_a: str | os.PathLike, path_b: str | os.PathLike, condition_a: str | None = None,
                       condition_b: str | None = None) -> PairedEpisodes:
    """Pair two episodes.jsonl files (optionally selecting one condition from each)."""
    ra, rb = read_jsonl(path_a), read_jsonl(path_b)
    if condition_a is not None:
        ra = [r for r in ra if r["condition"] == condition_a]
    if condition_b is not None:
        rb = [r for r in rb if r["condition"] == condition_b]
    for path, rs in ((path_a, ra), (path_b, rb)):
        if not rs:
            raise WmvlaError(f"{path}: no episodes (for the selected condition)")
        conds = {r["condition"] for r in rs}
        if len(conds) > 1:
            raise WmvlaError(f"{path} holds several conditions {sorted(conds)}; choose one (condition_a/condition_b)")
    return pair_records(ra, rb)


def compare_episode_files(path_a: str | os.PathLike, path_b: str | os.PathLike, **kw) -> dict:
    """McNemar comparison of two runs: {"mcnemar": {...}, "unpaired_a", "unpaired_b"}."""
    paired = pair_episode_files(path_a, path_b, **kw)
    if not paired.pairs:
        raise WmvlaError(f"{path_a} and {path_b} have no episode in common (task, init_index, seed); "
                         "were they run with the same seed and tasks?")
    return {"mcnemar": mcnemar_exact(paired.pairs).to_dict(), "unpaired_a": paired.only_in_a,
            "unpaired_b": paired.only_in_b}


def required_n_two_proportions(p0: float, p1: float, alpha: float = 0.05, power: float = 0.8) -> float:
    """Episodes per condition to detect p0 -> p1 with a two-sided test (Fleiss, no continuity correction)."""
    from scipy.stats import norm

    if p0 == p1:
        return math.inf
    za, zb = float(norm.ppf(1 - alpha / 2)), float(norm.ppf(power))
    pbar = (p0 + p1) / 2
    num = za * math.sqrt(2 * pbar * (1 - pbar)) + zb * math.sqrt(p0 * (1 - p0) + p1 * (1 - p1))
    return num * num / (p1 - p0) ** 2


def min_detectable_difference(n: float, p0: float, alpha: float = 0.05, power: float = 0.8) -> float:
    """Smallest increase d over baseline p0 that n episodes per condition detect with the given power.

    Solves required_n_two_proportions(p0, p0 + d) = n for d in (0, 1 - p0]; returns 1 - p0 when even
    p1 = 1 needs more than n episodes.
    """
    from scipy.optimize import brentq

    if not 0 <= p0 < 1:
        raise WmvlaError(f"p0 must be in [0, 1), got {p0}")
    if n <= 0:
        raise WmvlaError(f"n must be positive, got {n}")
    hi = 1.0 - p0
    if required_n_two_proportions(p0, 1.0, alpha, power) > n:
        return hi
    # required n decreases monotonically in d on (0, 1 - p0]
    return float(brentq(lambda d: required_n_two_proportions(p0, p0 + d, alpha, power) - n, 1e-9, hi, xtol=1e-10))
