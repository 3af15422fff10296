"""`wmvla report RUN_ROOT`: tables, plots, paired tests and a written verdict from a matrix run folder.

Reads every evaluation folder under RUN_ROOT (a `summary.json` next to an `episodes.jsonl`) and every
training log (`<experiment>/<tag>/seed<k>/train_log.jsonl`), and writes

- `RUN_ROOT/report.md`: verdict, conditions with Wilson 95 % intervals, per-task table, paired exact
  McNemar tests, power remark, training health and curves, warnings, evaluation settings;
- `RUN_ROOT/summary.json`: {"conditions", "comparisons", "verdict", ...} (the demo copies it);
- `RUN_ROOT/plots/*.png`: success by condition, success by task, gate curves, loss curves.

The layout contract with the matrix runner and the decision rules of the verdict are documented in
docs/report.md. Episode-level data (`episodes.jsonl`) is the source of truth; each folder's
`summary.json` is only cross-checked against it.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import math
import re
from collections import defaultdict
from dataclasses import dataclass, field
from fnmatch import fnmatch
from pathlib import Path
from typing import Annotated, Any

import tyro

from vla_core.eval.stats import (
    PAIR_KEY,
    mcnemar_exact,
    min_detectable_difference,
    pair_records,
    rate_summary,
    required_n_two_proportions,
    success_summary,
)
from vla_core.train.config import EXPERIMENT_ROLLOUT_MEMORY, EXPERIMENTS
from vla_core.utils import WmvlaError, atomic_path, atomic_write_json, atomic_write_text, read_jsonl


@dataclass
class ReportConfig:
    """Build the report of a matrix run folder."""

    run_root: Annotated[Path, tyro.conf.Positional, tyro.conf.arg(metavar="RUN_ROOT")]
    """Folder written by `wmvla matrix` (RUN_ROOT/<E0..E3>/<tag>/seed<k>/... with evaluation folders)."""

    # statistics
    alpha: float = 0.05
    """Significance level of the two-sided exact McNemar tests."""
    min_effect: float = 0.10
    """Smallest difference in success rate (absolute, 0.10 = 10 points) that counts as meaningful. A gain
    that is not significant is called "not supported" only when the study had `power` to detect this
    difference; otherwise the verdict is "inconclusive: underpowered"."""
    power: float = 0.8
    """Power used for the minimal detectable difference."""

    # inputs and outputs
    exclude: tuple[str, ...] = ()
    """Glob patterns (relative to run_root, e.g. 'E2/*/seed0/eval_old*') of evaluation folders to ignore,
    e.g. an older evaluation of the same checkpoint."""
    plots: bool = True
    """Write the PNG plots (matplotlib, Agg backend)."""
    print_table: bool = True
    """Print the main table to the console."""
    run_uri: str = ""
    """What the report calls the run: where it is published (s3://bucket/prefix/<run>); "" = the run folder."""
    kfp_run: str = ""
    """The Kubeflow Pipelines run that produced it (name and id), shown under the title."""
    strict: bool = False
    """Fail (exit code 2) when a comparison is refused (mismatched episodes or settings) instead of
    reporting the refusal and going on."""


# Short labels for tables and legends (the full meanings: vla_core.train.config.EXPERIMENT_MEANING).
EXPERIMENT_MEANING = {
    "E0": "no memory (baseline)",
    "E1": "zero memory (capacity control)",
    "E2": "predicted memory",
    "E3": "oracle-trained memory (upper bound)",
}
# The rollout memory that is each experiment's own condition (training's EXPERIMENT_ROLLOUT_MEMORY: E3 is
# trained on the true future but evaluated with the prediction); other rollout memories evaluated on the
# same checkpoints (zero / random / shuffle) are ablations of it. "oracle" is accepted for E3 as well.
PRIMARY_MEMORY = {e: (m, "oracle") if e == "E3" else (m,) for e, m in EXPERIMENT_ROLLOUT_MEMORY.items()}
# Settings that must be equal for two conditions to be compared (and across the seeds of one condition).
MATCH_FIELDS = ("env", "suite", "max_steps", "replan_steps")
# The value a zero-initialised parameter stalls at under bf16 AdamW without fp32 master weights
# (LESSONS.md: every E2 run of the earlier attempt reported this gate).
BF16_STALL = 2.0**-6


# ------------------------------------------------------------------------------------------ loading


@dataclass
class EvalRun:
    """One evaluation folder: one checkpoint (one training seed) under one rollout memory."""

    path: Path
    experiment: str
    head: str
    rollout_memory: str
    seed: int
    config: dict
    episodes: list[dict]
    settings: dict = field(default_factory=dict)  # MATCH_FIELDS, resolved from the config
    checkpoint: str | None = None


@dataclass
class TrainRun:
    path: Path  # the run folder (holds train_log.jsonl)
    experiment: str
    tag: str
    seed: int | None
    records: list[dict]  # train_log.jsonl rows, plus val_log.jsonl rows with keys prefixed "val_"
    finished: bool = False  # done.json present

    @property
    def label(self) -> str:
        return f"{self.experiment}/{self.tag}/seed{self.seed}"


@dataclass
class Condition:
    """(experiment, head, rollout memory) pooled over training seeds."""

    experiment: str
    head: str
    rollout_memory: str
    runs: list[EvalRun] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"{self.experiment}-{self.head}-{self.rollout_memory}"

    @property
    def episodes(self) -> list[dict]:
        return [e for r in self.runs for e in r.episodes]

    @property
    def seeds(self) -> list[int]:
        return sorted(r.seed for r in self.runs)


def _seed_from_path(rel: Path) -> int | None:
    for part in rel.parts:
        m = re.fullmatch(r"seed(\d+)", part)
        if m:
            return int(m.group(1))
    return None


def _experiment_from_path(rel: Path) -> str | None:
    for part in rel.parts:
        if part in EXPERIMENTS:
            return part
    return None


def _excluded(rel: Path, patterns: tuple[str, ...]) -> bool:
    s = rel.as_posix()
    return any(fnmatch(s, p) or fnmatch(s, p.rstrip("/") + "/*") for p in patterns)


def _looks_like_eval(path: Path) -> bool:
    """Whether a JSONL file holds evaluation episodes (its first row has `success`)."""
    with open(path, encoding="utf-8") as f:
        first = f.readline()
    try:
        return isinstance(row := json.loads(first), dict) and "success" in row
    except json.JSONDecodeError:
        return False


def load_eval_runs(run_root: Path, exclude: tuple[str, ...] = ()
                   ) -> tuple[list[EvalRun], list[str], list[tuple[Path, dict]]]:
    """Every evaluation folder under run_root -> EvalRun; returns (runs, warnings, references), references
    being (relative folder, summary.json) of evaluations outside the E0..E3 layout (e.g. scripted)."""
    runs, warnings, references = [], [], []
    for ep_path in sorted(run_root.rglob("episodes.jsonl")):
        folder = ep_path.parent
        rel = folder.relative_to(run_root)
        if _excluded(rel, exclude):
            continue
        summary_path = folder / "summary.json"
        if not summary_path.exists():
            if not _looks_like_eval(ep_path):  # e.g. a LeRobot v2.1 dataset's meta/episodes.jsonl
                continue
            warnings.append(f"{rel}: episodes.jsonl without summary.json (an unfinished evaluation); skipped.")
            continue
        try:
            summary = json.loads(summary_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise WmvlaError(f"{summary_path}: not valid JSON ({e}). Re-run the evaluation or exclude the folder.")
        cfg = summary.get("config") or {}
        experiment = cfg.get("experiment") or _experiment_from_path(rel)
        if experiment is None or (experiment not in EXPERIMENTS and cfg.get("experiment") is None):
            # not a matrix condition (e.g. the scripted expert as a reference): listed, never compared
            references.append((rel, summary))
            continue
        if experiment not in EXPERIMENTS:
            raise WmvlaError(f"{summary_path}: experiment {experiment!r}, expected one of {EXPERIMENTS}.")
        # The training seed: the config's (`wmvla eval --checkpoint` and `wmvla matrix` record it), else the run
        # folder's seed<k> (evaluations sit inside it).
        seed = cfg.get("seed")
        seed = _seed_from_path(rel) if seed is None else seed
        head = _resolve_head(cfg, rel)
        missing = [k for k, v in (("head", head), ("seed", seed)) if v is None]
        if missing:
            raise WmvlaError(
                f"{summary_path}: cannot tell the {' and '.join(missing)} of this evaluation (expected "
                "summary.json['config'] with 'head' and 'seed', or the folder layout <E>/<tag ending in _mse or "
                f"_flow>/seed<k>/...). Re-run it through `wmvla matrix`, or exclude it with --exclude "
                f"'{rel.as_posix()}'."
            )
        episodes = read_jsonl(ep_path)
        for i, e in enumerate(episodes):
            lacking = [k for k in ("task", "init_index", "success") if k not in e]
            if lacking:
                raise WmvlaError(f"{ep_path}: episode line {i + 1} lacks {lacking}; the file is not an episodes.jsonl "
                                 "written by `wmvla eval`.")
        if not episodes:
            warnings.append(f"{rel}: episodes.jsonl is empty; skipped.")
            continue
        labels = sorted({str(e.get("condition")) for e in episodes})
        if len(labels) > 1:  # one folder must be one rollout memory; pooling several would mix conditions
            warnings.append(f"{rel}: episodes.jsonl mixes conditions {labels} under one summary.json; skipped. "
                            "Evaluate each rollout memory into its own folder.")
            continue
        n_summary = (summary.get("overall") or {}).get("n")
        if n_summary is not None and n_summary != len(episodes):
            warnings.append(f"{rel}: summary.json says n={n_summary} but episodes.jsonl has {len(episodes)} "
                            "episodes; the report uses the episodes.")
        policy = cfg.get("policy") if isinstance(cfg.get("policy"), dict) else {}
        # E0 has no memory whatever label its evaluation carries
        memory = "none" if experiment == "E0" else (cfg.get("rollout_memory") or policy.get("rollout_memory") or "none")
        settings = {
            "env": cfg.get("env"), "suite": cfg.get("suite"),
            # `wmvla eval` records the resolved per-task limits; a matrix config may give one number
            "max_steps": cfg.get("max_steps", cfg.get("max_steps_per_task")),
            "replan_steps": cfg.get("replan_steps"),
        }
        checkpoint = cfg.get("checkpoint") or policy.get("checkpoint")
        runs.append(EvalRun(folder, experiment, head, str(memory), int(seed), cfg, episodes, settings, checkpoint))
    return runs, warnings, references


def _resolve_head(cfg: dict, rel: Path) -> str | None:
    """Action head: config.head, else config.policy.details.head, else the run tag's suffix (_mse / _flow)."""
    if cfg.get("head"):
        return str(cfg["head"])
    details = (cfg.get("policy") or {}).get("details") if isinstance(cfg.get("policy"), dict) else None
    if isinstance(details, dict) and details.get("head"):
        return str(details["head"])
    for part in rel.parts:
        m = re.search(r"_(mse|flow)$", part)
        if m:
            return m.group(1)
    return None


def load_train_runs(run_root: Path) -> list[TrainRun]:
    out = []
    for log in sorted(run_root.rglob("train_log.jsonl")):
        rel = log.parent.relative_to(run_root)
        parts = rel.parts
        experiment = _experiment_from_path(rel) or (parts[0] if parts else "?")
        tag = parts[1] if len(parts) >= 3 else rel.as_posix()
        records = read_jsonl(log)
        for r in read_jsonl(log.parent / "val_log.jsonl"):  # vla_core.train.rundir.VAL_LOG
            records.append({(k if k == "step" or k.startswith("val_") else f"val_{k}"): v for k, v in r.items()})
        records.sort(key=lambda r: r.get("step", 0))  # stable: train rows keep their order
        out.append(TrainRun(log.parent, experiment, tag, _seed_from_path(rel), records,
                            finished=(log.parent / "done.json").exists()))
    return out


def group_conditions(runs: list[EvalRun]) -> dict[str, Condition]:
    conds: dict[str, Condition] = {}
    for r in runs:
        c = conds.setdefault(f"{r.experiment}-{r.head}-{r.rollout_memory}",
                             Condition(r.experiment, r.head, r.rollout_memory))
        c.runs.append(r)
    for c in conds.values():
        by_seed = defaultdict(list)
        for r in c.runs:
            by_seed[r.seed].append(r)
        dups = {s: rs for s, rs in by_seed.items() if len(rs) > 1}
        if dups:
            s, rs = next(iter(dups.items()))
            raise WmvlaError(
                f"condition {c.name}: {len(rs)} evaluations of training seed {s}: "
                f"{[str(r.path) for r in rs]}. Pooling them would count that seed twice. Keep one and pass the "
                "others to --exclude (patterns relative to the run folder)."
            )
    order = {e: i for i, e in enumerate(EXPERIMENTS)}
    # within an experiment: its own condition first, then the rollout ablations
    def mem_rank(c: Condition) -> int:
        own = PRIMARY_MEMORY[c.experiment]
        ablations = ("zero", "random", "shuffle")
        return own.index(c.rollout_memory) if c.rollout_memory in own else (
            len(own) + (ablations.index(c.rollout_memory) if c.rollout_memory in ablations else 9))

    return dict(sorted(conds.items(), key=lambda kv: (kv[1].head, order[kv[1].experiment], mem_rank(kv[1]),
                                                      kv[0])))


# --------------------------------------------------------------------------------------- statistics


def _settings(c: Condition) -> dict[str, list]:
    """MATCH_FIELDS -> sorted distinct values over the condition's evaluation folders."""
    return {f: sorted({json.dumps(r.settings.get(f), sort_keys=True) for r in c.runs}) for f in MATCH_FIELDS}


def summarize_condition(c: Condition) -> dict:
    pooled = success_summary(c.episodes, by="task")  # Wilson intervals, errored episodes as failures
    block = {"experiment": c.experiment, "head": c.head, "rollout_memory": c.rollout_memory, **pooled["overall"],
             "seeds": len(c.runs), "seed_list": c.seeds}
    block["per_seed"] = {str(r.seed): rate_summary(e["success"] for e in r.episodes)
                         for r in sorted(c.runs, key=lambda r: r.seed)}
    block["per_task"] = pooled["per_task"]
    block["settings"] = {f: [json.loads(v) for v in vals] for f, vals in _settings(c).items()}
    block["eval_dirs"] = [str(r.path) for r in sorted(c.runs, key=lambda r: r.seed)]
    return block


@dataclass
class Comparison:
    """One paired comparison A vs B (A is the treatment, B the reference)."""

    name: str
    kind: str  # "gain" (A > B is the hypothesis), "control" (A ~ B is the hypothesis) or "info"
    head: str
    a: str
    b: str
    status: str = "ok"  # ok | refused | missing
    reason: str = ""
    n_pairs: int = 0
    a_rate: float | None = None
    b_rate: float | None = None
    diff: float | None = None  # a_rate - b_rate
    both: int = 0  # A and B succeed
    a_only: int = 0  # A succeeds, B fails (discordant in A's favour)
    b_only: int = 0  # B succeeds, A fails
    neither: int = 0
    p_value: float | None = None  # two-sided exact McNemar
    significant: bool | None = None
    mdd: float | None = None  # minimal detectable difference at this n (see ReportConfig.min_effect)
    mdd_ceiling: bool = False  # even the largest possible change (to 100 %) is not detectable at this n
    per_seed_diff: dict[str, float] = field(default_factory=dict)  # training seed -> a_rate - b_rate


def compare(name: str, kind: str, head: str, a: Condition | None, b: Condition | None, a_name: str, b_name: str,
            cfg: ReportConfig, same_checkpoint: bool = False) -> Comparison:
    cmp = Comparison(name=name, kind=kind, head=head, a=a.name if a else a_name, b=b.name if b else b_name)
    if a is None or b is None:
        cmp.status = "missing"
        cmp.reason = f"no evaluation of {' and '.join(n for n, c in ((a_name, a), (b_name, b)) if c is None)}"
        return cmp
    reasons = []
    # The same protocol on both sides: a different max_steps or replan interval changes success by itself.
    sa, sb = _settings(a), _settings(b)
    for f in MATCH_FIELDS:
        if len(sa[f]) > 1:
            reasons.append(f"{a.name} mixes {f} values {sa[f]} across seeds")
        if len(sb[f]) > 1:
            reasons.append(f"{b.name} mixes {f} values {sb[f]} across seeds")
        if len(sa[f]) == 1 and len(sb[f]) == 1 and sa[f] != sb[f]:
            reasons.append(f"{f} differs: {a.name} {sa[f][0]} vs {b.name} {sb[f][0]}")
    na, nb = len(a.episodes), len(b.episodes)
    if na != nb:
        hint = ""
        if a.seeds != b.seeds:
            extra = sorted(set(a.seeds) ^ set(b.seeds))
            hint = (f" (finish seeds {extra} on both sides, or leave them out with --exclude "
                    f"'E?/*/seed{extra[0]}/*')")
        reasons.append(f"different episode counts: {a.name} n={na} (seeds {a.seeds}) vs {b.name} n={nb} "
                       f"(seeds {b.seeds}){hint}")
    elif a.seeds != b.seeds:
        reasons.append(f"different training seeds: {a.name} {a.seeds} vs {b.name} {b.seeds}")
    # Pairs are matched within each training seed (seed k of A with seed k of B) on stats.PAIR_KEY
    # (env, suite, task, init_index, episode seed); every episode must find its partner.
    paired: dict[int, list[tuple[bool, bool]]] = {}
    if not reasons:
        runs_b = {r.seed: r for r in b.runs}
        for ra in sorted(a.runs, key=lambda r: r.seed):
            try:
                pe = pair_records(ra.episodes, runs_b[ra.seed].episodes)
            except WmvlaError as e:
                reasons.append(f"seed {ra.seed}: {e}")
                continue
            if pe.only_in_a or pe.only_in_b:
                reasons.append(f"the episodes are not matched ({', '.join(PAIR_KEY)}): training seed {ra.seed} has "
                               f"{pe.only_in_a} episodes only in {a.name} and {pe.only_in_b} only in {b.name}")
            paired[ra.seed] = pe.pairs
    if same_checkpoint:
        ca = {r.seed: r.checkpoint for r in a.runs}
        cb = {r.seed: r.checkpoint for r in b.runs}
        diff_ckpt = [s for s in ca if s in cb and ca[s] != cb[s]]
        if diff_ckpt:
            s = diff_ckpt[0]
            reasons.append(f"a rollout ablation must use the same checkpoint, but seed {s} used {ca[s]!r} for "
                           f"{a.name} and {cb[s]!r} for {b.name}")
    cmp.a_rate = sum(bool(e["success"]) for e in a.episodes) / na
    cmp.b_rate = sum(bool(e["success"]) for e in b.episodes) / nb
    cmp.diff = cmp.a_rate - cmp.b_rate
    if reasons:
        cmp.status = "refused"
        cmp.reason = "; ".join(reasons)
        return cmp
    for seed, pairs in paired.items():
        cmp.per_seed_diff[str(seed)] = sum(int(x) - int(y) for x, y in pairs) / len(pairs)
    res = mcnemar_exact([p for pairs in paired.values() for p in pairs])
    cmp.n_pairs = res.n_pairs
    cmp.both, cmp.a_only, cmp.b_only, cmp.neither = res.both, res.only_a, res.only_b, res.neither
    cmp.p_value = float(res.p_value)
    cmp.significant = cmp.p_value < cfg.alpha
    # at a 100 % baseline no increase exists; the mirror (a drop from 100 %) is what could be detected
    p0 = cmp.b_rate if cmp.b_rate < 1.0 else 0.0
    cmp.mdd = float(min_detectable_difference(cmp.n_pairs, p0, alpha=cfg.alpha, power=cfg.power))
    # min_detectable_difference clips at 1 - p0: then no change at all is detectable, not "changes of mdd"
    cmp.mdd_ceiling = cmp.mdd >= (1.0 - p0) - 1e-9
    return cmp


def primary_condition(conds: dict[str, Condition], experiment: str, head: str) -> Condition | None:
    """The experiment's own condition: its primary rollout memory, or its only one."""
    mine = [c for c in conds.values() if c.experiment == experiment and c.head == head]
    for mem in PRIMARY_MEMORY[experiment]:
        for c in mine:
            if c.rollout_memory == mem:
                return c
    return mine[0] if len(mine) == 1 else None


def build_comparisons(conds: dict[str, Condition], cfg: ReportConfig) -> list[Comparison]:
    out = []
    for head in sorted({c.head for c in conds.values()}):
        e0 = primary_condition(conds, "E0", head)
        e2 = primary_condition(conds, "E2", head)

        def ablation(mem: str) -> Condition | None:
            return conds.get(f"E2-{head}-{mem}")

        out.append(compare("E2 vs E0", "gain", head, e2, e0, f"E2-{head}-pred", f"E0-{head}-none", cfg))
        out.append(compare("E1 vs E0", "control", head, primary_condition(conds, "E1", head), e0,
                           f"E1-{head}-zero", f"E0-{head}-none", cfg))
        for mem in ("zero", "random", "shuffle"):
            out.append(compare(f"E2 pred vs {mem}", "gain" if mem != "shuffle" else "info", head, e2,
                               ablation(mem), f"E2-{head}-pred", f"E2-{head}-{mem}", cfg, same_checkpoint=True))
        e3 = primary_condition(conds, "E3", head)
        if e3 is not None:
            out.append(compare("E3 vs E0", "info", head, e3, e0, f"E3-{head}-pred", f"E0-{head}-none", cfg))
    return out


# ------------------------------------------------------------------------------------------ verdict


def _pct(x: float | None, signed: bool = False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{100 * x:+.1f} pts" if signed else f"{100 * x:.1f} %"


def _pts(x: float) -> str:
    return f"{100 * x:.1f} points"


def _detectable(c: Comparison, cfg: ReportConfig) -> str:
    """What this comparison's n can detect, said correctly when even a jump to 100 % cannot be."""
    if c.mdd_ceiling:
        return (f"at n={c.n_pairs} no difference is detected with {cfg.power:.0%} power: even the largest possible "
                f"one ({_pts(c.mdd)}, up to 100 %) would usually be missed")
    return f"at n={c.n_pairs} only differences of {_pts(c.mdd)} or more are detected with {cfg.power:.0%} power"


def _p(p: float | None) -> str:
    if p is None:
        return "n/a"
    return f"{p:.2e}" if p < 1e-3 else f"{p:.3f}"


def _numbers(c: Comparison) -> str:
    return (f"{c.a} {_pct(c.a_rate)} vs {c.b} {_pct(c.b_rate)} ({_pct(c.diff, signed=True)}, n={c.n_pairs} pairs, "
            f"discordant {c.a_only}:{c.b_only}, exact McNemar p={_p(c.p_value)})")


def judge(c: Comparison, cfg: ReportConfig) -> dict:
    """One criterion -> {"status", "sentence"} (status: supported | not supported | inconclusive | holds |
    violated | missing | refused | reported; build_verdict turns a missing capacity control into "not run")."""
    if c.status == "missing":
        return {"status": "missing", "sentence": f"{c.name} ({c.head}): cannot be tested, {c.reason}."}
    if c.status == "refused":
        return {"status": "refused", "sentence": f"{c.name} ({c.head}): REFUSED, {c.reason}."}
    nums = _numbers(c)
    power_note = (f"a difference of {_pts(cfg.min_effect)} would have been detected with {cfg.power:.0%} power "
                  f"(minimal detectable difference {_pts(c.mdd)})")
    if c.kind == "control":
        if c.significant:
            return {"status": "violated",
                    "sentence": f"{nums}: E1 differs significantly from E0, so the extra parameters alone change "
                                "success and an E2 gain cannot be credited to the world signal."}
        shown = ("and " + power_note) if c.mdd <= cfg.min_effect and not c.mdd_ceiling else (
            f"but {_detectable(c, cfg)}, so this is no evidence of equivalence")
        return {"status": "holds", "sentence": f"{nums}: no significant difference ({shown})."}
    if c.kind == "info":
        sig = "significant" if c.significant else "not significant"
        return {"status": "reported", "sentence": f"{nums}: {sig} (reported, not a criterion)."}
    if c.significant and c.diff > 0:
        # The pooled test treats episodes as independent; training seeds add variance it does not see, so a
        # gain carried by some seeds only is said so.
        favour = sum(d > 0 for d in c.per_seed_diff.values())
        caveat = ""
        if len(c.per_seed_diff) > 1 and favour < len(c.per_seed_diff):
            caveat = (f" Caveat: the gain is not consistent across training seeds (A better in {favour} of "
                      f"{len(c.per_seed_diff)} seeds: "
                      + ", ".join(f"s{s} {_pct(d, signed=True)}" for s, d in c.per_seed_diff.items()) + ").")
        return {"status": "supported", "seed_consistent": not caveat,
                "sentence": f"{nums}: {c.a} > {c.b} significantly (p < {cfg.alpha}).{caveat}"}
    if c.significant and c.diff < 0:
        return {"status": "not supported", "sentence": f"{nums}: {c.a} is significantly WORSE than {c.b}."}
    if c.b_rate + cfg.min_effect > 1.0:
        # B is so close to 100 % that a meaningful gain is impossible; a null result says nothing.
        return {"status": "inconclusive", "ceiling": True,
                "sentence": f"{nums}: no significant difference, but {c.b} is at {_pct(c.b_rate)}, too close to "
                            f"100 % for a {_pts(cfg.min_effect)} gain to exist (ceiling; use harder tasks)."}
    if c.mdd <= cfg.min_effect and not c.mdd_ceiling:
        return {"status": "not supported",
                "sentence": f"{nums}: no significant gain, and {power_note}; a gain smaller than "
                            f"{_pts(c.mdd)} is not excluded."}
    return {"status": "inconclusive",
            "sentence": f"{nums}: no significant difference, but underpowered: {_detectable(c, cfg)}."}


CRITERIA = (  # (key, comparison name, what it tests)
    ("capacity_control", "E1 vs E0", "E1 ~ E0: the added parameters with zero memory do not change success"),
    ("e2_beats_e0", "E2 vs E0", "E2 > E0: predicted world memory improves success over the baseline"),
    ("pred_beats_zero", "E2 pred vs zero", "pred > zero: the content of the memory matters, not its presence"),
    ("pred_beats_random", "E2 pred vs random", "pred > random: the prediction beats an uninformative signal"),
)


def build_verdict(comparisons: list[Comparison], cfg: ReportConfig) -> dict:
    per_head = {}
    for head in sorted({c.head for c in comparisons}):
        mine = {c.name: c for c in comparisons if c.head == head}
        criteria = {}
        for key, cname, what in CRITERIA:
            j = judge(mine[cname], cfg)
            criteria[key] = {"criterion": what, "comparison": cname, **j}
        st = {k: v["status"] for k, v in criteria.items()}
        gains = [st[k] for k in ("e2_beats_e0", "pred_beats_zero", "pred_beats_random")]
        e2 = mine["E2 vs E0"]
        n_txt = f"n={e2.n_pairs} paired episodes per condition" if e2.status == "ok" else "n unknown"
        # The design card's minimal matrix (E0 / E2 x MSE / flow) has no E1. Without it the capacity control is
        # "not run", not a failure: pred vs zero / random (the same E2 weights) still separate the memory's
        # content from the added parameters, and the sentence says what E1 would have added.
        no_e1 = st["capacity_control"] == "missing"
        if no_e1:
            st["capacity_control"] = criteria["capacity_control"]["status"] = "not run"
        unavailable = [k for k, s in st.items() if s in ("missing", "refused")]
        if "not supported" in gains:
            failed = [k for k in ("e2_beats_e0", "pred_beats_zero", "pred_beats_random") if st[k] == "not supported"]
            overall = "not supported"
            sentence = (f"{head}: NOT SUPPORTED — {', '.join(failed)} failed "
                        "(a significant loss, or no significant gain although the study had the power to see a "
                        f"{_pts(cfg.min_effect)} gain).")
        elif unavailable:
            overall = "inconclusive: " + ", ".join(f"{k} {st[k]}" for k in unavailable)
            sentence = f"{head}: INCONCLUSIVE — cannot test {', '.join(unavailable)} (see the comparisons)."
        elif st["capacity_control"] == "violated":
            overall = "inconclusive: capacity control failed"
            sentence = (f"{head}: INCONCLUSIVE — E1 differs significantly from E0, so gains of E2 cannot be "
                        "attributed to the world signal.")
        elif all(g == "supported" for g in gains):
            overall = "supported"
            sentence = (f"{head}: SUPPORTED — E2 beats E0 and predicted memory beats zero and random memory "
                        f"significantly (each p < {cfg.alpha})"
                        + ("" if no_e1 else ", with no significant E1-E0 difference") + f" ({n_txt}).")
            if not all(criteria[k].get("seed_consistent", True) for k in ("e2_beats_e0", "pred_beats_zero",
                                                                           "pred_beats_random")):
                sentence += " Not every training seed shows the gain (see the criteria), so it may not be robust."
        elif any(criteria[k].get("ceiling") for k in ("e2_beats_e0", "pred_beats_zero", "pred_beats_random")):
            overall = "inconclusive: ceiling"
            sentence = (f"{head}: INCONCLUSIVE — the reference conditions succeed almost always, so no meaningful "
                        "gain can be measured on these tasks.")
        else:
            weak = [k for k in ("e2_beats_e0", "pred_beats_zero", "pred_beats_random") if st[k] != "supported"]
            weak_cmps = [mine[c] for k, c, _ in CRITERIA if k in weak and mine[c].mdd is not None]
            overall = f"inconclusive: underpowered (n={e2.n_pairs})"
            sentence = f"{head}: INCONCLUSIVE, UNDERPOWERED ({n_txt}) — {', '.join(weak)} not significant; "
            if any(c.mdd_ceiling for c in weak_cmps):
                sentence += "at this n not even the largest possible differences are detected reliably."
            else:
                mdd = max((c.mdd for c in weak_cmps), default=float("nan"))
                sentence += f"differences below about {_pts(mdd)} cannot be detected reliably at this n."
            if e2.b_rate is not None and e2.b_rate + cfg.min_effect <= 1.0:
                need = required_n_two_proportions(e2.b_rate, e2.b_rate + cfg.min_effect, cfg.alpha, cfg.power)
                sentence += (f" Detecting a {_pts(cfg.min_effect)} gain over E0's {_pct(e2.b_rate)} with "
                             f"{cfg.power:.0%} power needs about {math.ceil(need)} episodes per condition.")
        if no_e1:
            sentence += (" The capacity control E1 was not in this matrix, so E2 vs E0 alone does not exclude an "
                         "effect of the added parameters; pred vs zero and random memory (the same weights) do.")
        per_head[head] = {"overall": overall, "sentence": sentence, "criteria": criteria}

    if not per_head:
        return {"overall": "no data", "sentence": "No evaluations were found.", "per_head": {}}
    kinds = {v["overall"] for v in per_head.values()}
    if len(kinds) == 1:
        overall = kinds.pop()
    else:
        overall = "mixed: " + "; ".join(f"{h} {v['overall']}" for h, v in per_head.items())
    heads = ", ".join(per_head)
    lead = {
        "supported": "The hypothesis (a predicted world signal as memory improves closed-loop success) is "
                     f"SUPPORTED for {heads}.",
        "not supported": f"The hypothesis is NOT SUPPORTED for {heads}.",
    }.get(overall, f"Verdict for the hypothesis: {overall} (heads: {heads}).")
    sentence = lead + " " + " ".join(v["sentence"] for v in per_head.values())
    if len(per_head) > 1:
        sentence += (f" (Each head is judged at alpha={cfg.alpha} without correction across heads; within a head "
                     "all criteria must hold, which keeps the per-head error rate at alpha.)")
    return {"overall": overall, "sentence": sentence, "per_head": per_head}


# ------------------------------------------------------------------------------------ training logs


def _gate_value(v: Any) -> float | None:
    """A logged gate: a number, or a list / dict of per-layer values (-> mean |value|)."""
    if isinstance(v, dict):
        v = list(v.values())
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, (list, tuple)) and v and all(isinstance(x, (int, float)) for x in v):
        return float(sum(abs(x) for x in v) / len(v))
    return None


def _series(records: list[dict], key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for i, r in enumerate(records):
        if key not in r:
            continue
        y = _gate_value(r[key]) if key == "gate" else r[key]
        if isinstance(y, (int, float)):
            xs.append(float(r.get("step", i)))
            ys.append(float(y))
    return xs, ys


def training_health(run: TrainRun) -> dict:
    """Last values and red flags of one training log (the earlier attempt's logs showed a stuck gate and a
    flat loss, and nothing turned them into a visible warning)."""
    out: dict[str, Any] = {"run": run.label, "path": str(run.path), "experiment": run.experiment, "tag": run.tag,
                           "seed": run.seed, "records": len(run.records), "finished": run.finished, "flags": []}
    steps, loss = _series(run.records, "action_loss")
    out["last_step"] = int(max((r.get("step", 0) for r in run.records), default=0))
    if loss:
        w = max(1, len(loss) // 10)
        first, last = sum(loss[:w]) / w, sum(loss[-w:]) / w
        out["action_loss_first"], out["action_loss_last"] = first, last
        if any(math.isnan(v) or math.isinf(v) for v in loss):
            out["flags"].append("action loss is NaN/inf")
        elif len(loss) >= 4 and last > 0.95 * first:
            out["flags"].append(f"action loss did not decrease ({first:.4g} -> {last:.4g})")
    val = [r for r in run.records if _numeric(r.get("val_action_mse")) and _numeric(r.get("val_mean_baseline_mse"))]
    if val:
        last = val[-1]
        out["val_action_mse_last"] = last["val_action_mse"]
        out["val_mean_baseline_mse"] = last["val_mean_baseline_mse"]
        if last["val_action_mse"] >= last["val_mean_baseline_mse"]:
            out["flags"].append(f"validation action MSE {last['val_action_mse']:.4g} does not beat predicting the mean "
                                f"action ({last['val_mean_baseline_mse']:.4g})")
    _, world = _series(run.records, "world_loss")
    if world:
        out["world_loss_last"] = world[-1]
    _, gate = _series(run.records, "gate")
    if gate:
        out["gate_last"] = gate[-1]
        if len(gate) >= 4 and max(gate) - min(gate) < 1e-7:
            out["flags"].append(f"gate never changed (always {gate[0]:.6g}): it receives no gradient or no update")
        elif any(abs(abs(gate[-1]) - v) < 1e-7 for v in (BF16_STALL, math.tanh(BF16_STALL))):
            out["flags"].append(f"gate ends at {gate[-1]:.7g} = ±2^-6 (or its tanh), the bf16-without-master-weights "
                                "stall value (LESSONS.md)")
    return out


# ------------------------------------------------------------------------------------------- plots


def _save(fig, path: Path) -> None:
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


EXP_COLORS = {"E0": "#4c72b0", "E1": "#8c8c8c", "E2": "#dd8452", "E3": "#55a868"}
MEM_HATCH = {"zero": "//", "random": "xx", "shuffle": "..", "none": "", "pred": "", "oracle": ""}


def _bar_errs(blocks: list[dict]) -> tuple[list[float], list[list[float]]]:
    rates = [b["success_rate"] for b in blocks]
    errs = [[r - b["ci95"][0] for r, b in zip(rates, blocks)], [b["ci95"][1] - r for r, b in zip(rates, blocks)]]
    return rates, errs


def plot_conditions(summaries: dict[str, dict], path: Path) -> None:
    plt = _plt()
    names = list(summaries)
    blocks = [summaries[n] for n in names]
    rates, errs = _bar_errs(blocks)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(names) + 2), 4.2))
    bars = ax.bar(range(len(names)), rates, yerr=errs, capsize=4,
                  color=[EXP_COLORS.get(b["experiment"], "#999999") for b in blocks], edgecolor="black")
    for bar, b in zip(bars, blocks):
        bar.set_hatch(MEM_HATCH.get(b["rollout_memory"], ""))
        ax.annotate(f"{b['successes']}/{b['n']}", (bar.get_x() + bar.get_width() / 2, b["ci95"][1] + 0.015),
                    ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("success rate")
    ax.set_title("Closed-loop success by condition (pooled over seeds, Wilson 95 % CI)")
    ax.grid(axis="y", alpha=0.3)
    _save(fig, path)
    plt.close(fig)


def plot_tasks(summaries: dict[str, dict], path: Path) -> None:
    plt = _plt()
    tasks = sorted({t for s in summaries.values() for t in s["per_task"]})
    names = list(summaries)
    ncols = min(4, len(tasks))
    nrows = math.ceil(len(tasks) / ncols)
    w = max(3.2, 0.45 * len(names) + 1.2)
    fig, axes = plt.subplots(nrows, ncols, figsize=(w * ncols, 3.0 * nrows), squeeze=False, sharey=True)
    for ax, task in zip(axes.flat, tasks):
        blocks = [summaries[n]["per_task"].get(task) for n in names]
        xs = [i for i, b in enumerate(blocks) if b]
        present = [b for b in blocks if b]
        rates, errs = _bar_errs(present)
        bars = ax.bar(xs, rates, yerr=errs, capsize=2, edgecolor="black",
                      color=[EXP_COLORS.get(summaries[names[i]]["experiment"], "#999999") for i in xs])
        for bar, i in zip(bars, xs):
            bar.set_hatch(MEM_HATCH.get(summaries[names[i]]["rollout_memory"], ""))
        ax.set_title(task if len(task) <= 40 else task[:37] + "...", fontsize=9)
        ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=7)
        ax.set_ylim(0, 1.05)
        ax.grid(axis="y", alpha=0.3)
    for ax in list(axes.flat)[len(tasks):]:
        ax.set_visible(False)
    for ax in axes[:, 0]:
        ax.set_ylabel("success rate")
    fig.suptitle("Success by task and condition (Wilson 95 % CI)")
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def _run_style(run: TrainRun) -> dict:
    head_ls = "--" if run.tag.endswith("flow") else "-"
    return {"color": EXP_COLORS.get(run.experiment, "#999999"), "linestyle": head_ls, "linewidth": 1.2,
            "alpha": 0.85}


def _style_legend(ax, runs: list[TrainRun]) -> None:
    """One legend entry per experiment colour and head line style (one per run would not fit at 3+ seeds)."""
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=EXP_COLORS.get(e, "#999999"), label=f"{e}: {EXPERIMENT_MEANING.get(e, '')}")
               for e in sorted({r.experiment for r in runs})]
    if any(r.tag.endswith("flow") for r in runs):
        handles += [Line2D([], [], color="black", linestyle="-", label="mse head"),
                    Line2D([], [], color="black", linestyle="--", label="flow head")]
    ax.legend(handles=handles, fontsize=7)


def plot_gates(train_runs: list[TrainRun], path: Path) -> bool:
    runs = [r for r in train_runs if _series(r.records, "gate")[0]]
    if not runs:
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    for r in runs:
        xs, ys = _series(r.records, "gate")
        ax.plot(xs, ys, label=r.label, **_run_style(r))
    ax.axhline(0, color="black", linewidth=0.6)
    ax.set_xlabel("step")
    ax.set_ylabel("gate (mean |tanh g|)")
    ax.set_title(f"Memory gate during training ({len(runs)} runs, one line per seed)")
    _style_legend(ax, runs)
    ax.grid(alpha=0.3)
    _save(fig, path)
    plt.close(fig)
    return True


# Validation keys plotted first (written by vla_core.train.loop.validate into val_log.jsonl), each with its
# mean-action baseline (the earlier attempt's policy regressed to the mean; the baseline line shows it).
PREFERRED_VAL_KEYS = ("val_action_mse", "val_action_mae_real")


def _baseline_key(key: str) -> str:
    return key.replace("val_action_", "val_mean_baseline_", 1)


def _numeric(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def plot_losses(train_runs: list[TrainRun], path: Path) -> bool:
    present = {k for r in train_runs for rec in r.records for k, v in rec.items() if _numeric(v)}
    panels = [k for k in ("action_loss", "world_loss") if k in present]
    val_keys = [k for k in PREFERRED_VAL_KEYS if k in present]
    if not val_keys:  # other loggers: any val_* number, action errors first
        val_keys = sorted((k for k in present if k.startswith("val_")), key=lambda k: ("action" not in k, k))[:2]
    panels += val_keys
    if not panels:
        return False
    plt = _plt()
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 3.8), squeeze=False)
    for ax, key in zip(axes[0], panels):
        base = _baseline_key(key) if key.startswith("val_action_") else None
        values = []
        for r in train_runs:
            xs, ys = _series(r.records, key)
            if xs:
                ax.plot(xs, ys, marker="o" if key.startswith("val_") else None, markersize=3, **_run_style(r))
                values += ys
            if base and base in present:
                bx, by = _series(r.records, base)
                if bx:
                    ax.plot(bx, by, color="black", linestyle=":", linewidth=1.0, alpha=0.6)
                    values += by
        if values and all(v > 0 for v in values):
            ax.set_yscale("log")
        ax.set_title(key + (" (dotted: predict-the-mean baseline)" if base and base in present else ""),
                     fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    _style_legend(axes[0][0], train_runs)
    fig.suptitle(f"Training curves ({len(train_runs)} runs, one line per seed)")
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return True


# ------------------------------------------------------------------------------------------ writing


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(x).replace("|", "\\|") for x in row) + " |" for row in rows]
    return "\n".join(lines)


def _fmt_setting(v: Any) -> str:
    """A setting for the table; per-task dicts (e.g. max_steps_per_task) shown compactly."""
    if isinstance(v, dict) and v and all(isinstance(x, (int, float)) for x in v.values()):
        lo, hi = min(v.values()), max(v.values())
        return f"{lo} (all {len(v)} tasks)" if lo == hi else f"{lo}-{hi} over {len(v)} tasks"
    return str(v)


def _ci(b: dict) -> str:
    return f"[{100 * b['ci95'][0]:.1f}, {100 * b['ci95'][1]:.1f}]"


def render_markdown(run_root: Path, summary: dict, plots: dict[str, str], cfg: ReportConfig) -> str:
    conds, comps, verdict = summary["conditions"], summary["comparisons"], summary["verdict"]
    out = [f"# wmvla report: `{summary.get('run_uri') or run_root}`", ""]
    if summary.get("kfp_run"):
        out += [f"KFP run: `{summary['kfp_run']}`", ""]
    out += [f"Generated {summary['generated']} from {summary['n_eval_dirs']} evaluation folders and "
            f"{len(summary['training'])} training logs. Statistics: Wilson 95 % intervals, two-sided exact "
            f"McNemar tests on matched episodes, alpha = {cfg.alpha}, meaningful effect = {_pts(cfg.min_effect)}, "
            f"power = {cfg.power:.0%} (decision rules: docs/report.md).", ""]

    out += ["## Verdict", "", f"**{verdict['overall']}**", "", verdict["sentence"], ""]
    for head, v in verdict["per_head"].items():
        out += [f"### head `{head}`: {v['overall']}", ""]
        out.append(_md_table(["criterion", "result", "evidence"],
                             [[c["criterion"], f"**{c['status']}**", c["sentence"]] for c in v["criteria"].values()]))
        out.append("")

    refused = [c for c in comps if c["status"] == "refused"]
    if refused or summary["warnings"]:
        out += ["## Warnings", ""]
        out += [f"- **REFUSED comparison** {c['name']} ({c['head']}): {c['reason']}" for c in refused]
        out += [f"- {w}" for w in summary["warnings"]]
        out.append("")

    out += ["## Conditions", "",
            "Success pooled over the episodes of all training seeds; CI is the Wilson 95 % interval of the pooled "
            "rate. Per-seed rates show the spread between seeds.", ""]
    rows = []
    for name, b in conds.items():
        per_seed = ", ".join(f"s{s}: {_pct(v['success_rate'])}" for s, v in b["per_seed"].items())
        rows.append([f"`{name}`", EXPERIMENT_MEANING.get(b["experiment"], ""), b["head"], b["rollout_memory"],
                     f"**{_pct(b['success_rate'])}**", f"{b['successes']}/{b['n']}", str(b["seeds"]), _ci(b), per_seed,
                     str(b["errors"])])
    out.append(_md_table(["condition", "experiment", "head", "rollout memory", "success", "k/n", "seeds",
                          "95 % CI (%)", "per seed", "errored episodes"], rows))
    if "conditions" in plots:
        out += ["", f"![success by condition]({plots['conditions']})"]
    out.append("")
    if summary["references"]:
        out += ["Reference evaluations found in the run folder (outside E0-E3; not part of any test):", ""]
        out.append(_md_table(["folder", "condition", "success", "k/n", "95 % CI (%)"], [
            [f"`{rel}`", str(r["condition"]), _pct(r["success_rate"]), f"{r['successes']}/{r['n']}",
             _ci(r) if r["ci95"] else "-"] for rel, r in summary["references"].items()]))
        out.append("")

    tasks = sorted({t for b in conds.values() for t in b["per_task"]})
    out += ["## Per task", "", "Success (k/n) per task and condition; 95 % CI in the plot.", ""]
    names = list(conds)
    rows = []
    for t in tasks:
        row = [t]
        for n in names:
            b = conds[n]["per_task"].get(t)
            row.append(f"{_pct(b['success_rate'])} ({b['successes']}/{b['n']})" if b else "-")
        rows.append(row)
    out.append(_md_table(["task"] + [f"`{n}`" for n in names], rows))
    if "tasks" in plots:
        out += ["", f"![success by task]({plots['tasks']})"]
    out.append("")

    out += ["## Paired comparisons", "",
            "Exact McNemar test (two-sided) over episodes matched by training seed and (env, suite, task, init index, "
            "episode seed). "
            "\"A only\" counts pairs where A succeeded and B failed. MDD: minimal detectable difference at this n "
            f"(alpha {cfg.alpha}, power {cfg.power:.0%}, at B's rate); \"(none)\": not even a change to 100 % is "
            "detectable at this n.", ""]
    rows = []
    for c in comps:
        if c["status"] == "ok":
            rows.append([c["name"], c["head"], f"`{c['a']}`", f"`{c['b']}`", _pct(c["a_rate"]), _pct(c["b_rate"]),
                         _pct(c["diff"], signed=True), str(c["n_pairs"]), str(c["a_only"]), str(c["b_only"]),
                         _p(c["p_value"]), "yes" if c["significant"] else "no",
                         f"> {100 * c['mdd']:.1f} pts (none)" if c["mdd_ceiling"] else f"{100 * c['mdd']:.1f} pts",
                         ", ".join(f"s{s}: {100 * d:+.0f}" for s, d in c["per_seed_diff"].items()), "ok"])
        else:
            rows.append([c["name"], c["head"], f"`{c['a']}`", f"`{c['b']}`", _pct(c["a_rate"]), _pct(c["b_rate"]),
                         _pct(c["diff"], signed=True), "-", "-", "-", "-", "-", "-", "-",
                         f"**{c['status'].upper()}**: {c['reason']}"])
    out.append(_md_table(["comparison", "head", "A", "B", "A success", "B success", "A-B", "pairs", "A only",
                          "B only", "p", f"p<{cfg.alpha}", "MDD", "A-B per seed (pts)", "status"], rows))
    out.append("")

    ok = [c for c in comps if c["status"] == "ok" and c["mdd"] is not None]
    out += ["## Power", ""]
    if ok:
        ns = sorted({c["n_pairs"] for c in ok})
        mdds = [c["mdd"] for c in ok if not c["mdd_ceiling"]]
        n_ceiling = sum(c["mdd_ceiling"] for c in ok)
        text = f"With {', '.join(map(str, ns))} matched episodes per comparison, a two-sided test at alpha {cfg.alpha} "
        if mdds:
            span = (f"{_pts(min(mdds))} (at the reference's success rate)" if max(mdds) - min(mdds) < 5e-4 else
                    f"{_pts(min(mdds))} to {_pts(max(mdds))} (depending on the reference's success rate)")
            text += f"detects with {cfg.power:.0%} power only differences of about {span}"
            if n_ceiling:
                text += f"; in {n_ceiling} of {len(ok)} comparisons not even a change to 100 % is detectable"
        else:
            text += f"detects with {cfg.power:.0%} power no difference in any comparison, not even a change to 100 %"
        out.append(text + ". Smaller true effects will usually come out non-significant; the McNemar test gains "
                   "power when outcomes of matched episodes are correlated, so these numbers are conservative.")
    else:
        out.append("No comparison could be computed.")
    out.append("")

    out += ["## Training", ""]
    tr = summary["training"]
    if tr:
        rows = [[f"`{t['run']}`", str(t["last_step"]), "yes" if t["finished"] else "no",
                 f"{t['action_loss_first']:.4g} -> {t['action_loss_last']:.4g}" if "action_loss_last" in t else "-",
                 f"{t['world_loss_last']:.4g}" if "world_loss_last" in t else "-",
                 f"{t['gate_last']:.4g}" if "gate_last" in t else "-",
                 f"{t['val_action_mse_last']:.4g} ({t['val_mean_baseline_mse']:.4g})" if "val_action_mse_last" in t
                 else "-",
                 "; ".join(t["flags"]) or "ok"] for t in tr]
        out.append(_md_table(["run", "last step", "finished", "action loss (first -> last)", "world loss (last)",
                              "gate (last)", "val action MSE (mean baseline)", "flags"], rows))
        for key, title in (("gates", "gate curves"), ("losses", "loss curves")):
            if key in plots:
                out += ["", f"![{title}]({plots[key]})"]
    else:
        out.append("No train_log.jsonl found under the run folder.")
    out.append("")

    out += ["## Evaluation settings", ""]
    rows = [[f"`{n}`"] + [", ".join(_fmt_setting(v) for v in b["settings"][f]) for f in MATCH_FIELDS] +
            ["<br>".join(f"`{Path(d).relative_to(run_root) if Path(d).is_relative_to(run_root) else d}`"
                         for d in b["eval_dirs"])] for n, b in conds.items()]
    out.append(_md_table(["condition", *MATCH_FIELDS, "evaluation folders"], rows))
    out.append("")
    return "\n".join(out)


def print_console_table(summary: dict) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    table = Table(title="wmvla: closed-loop success by condition (Wilson 95 % CI)")
    for col in ("condition", "success", "k/n", "seeds", "95 % CI"):
        table.add_column(col, justify="left" if col == "condition" else "right")
    for name, b in summary["conditions"].items():
        table.add_row(name, _pct(b["success_rate"]), f"{b['successes']}/{b['n']}", str(b["seeds"]), _ci(b) + " %")
    console = Console()
    console.print(table)

    tests = Table(title="paired comparisons (exact McNemar)")
    for col in ("comparison", "head", "A - B", "A only : B only", "p", "status"):
        tests.add_column(col, justify="left" if col in ("comparison", "status") else "right")
    for c in summary["comparisons"]:
        ok = c["status"] == "ok"
        tests.add_row(c["name"], c["head"], _pct(c["diff"], signed=True),
                      f"{c['a_only']} : {c['b_only']}" if ok else "-", _p(c["p_value"]) if ok else "-",
                      "ok" if ok else f"[bold red]{c['status'].upper()}[/]")
    console.print(tests)
    for c in summary["comparisons"]:
        if c["status"] == "refused":
            console.print(f"[bold red]REFUSED[/] {escape(c['name'])} ({escape(c['head'])}): {escape(c['reason'])}")
    console.print(f"[bold]verdict: {escape(summary['verdict']['overall'])}[/]")
    for v in summary["verdict"]["per_head"].values():
        console.print("  " + escape(v["sentence"]))


# --------------------------------------------------------------------------------------------- main


def build_report(cfg: ReportConfig) -> dict:
    """Read the run folder, write report.md, summary.json and plots; return the summary dict."""
    run_root = Path(cfg.run_root)
    if not run_root.is_dir():
        raise WmvlaError(f"run folder {run_root} does not exist; pass the run folder that `wmvla matrix` wrote.")
    runs, warnings, reference_dirs = load_eval_runs(run_root, cfg.exclude)
    if not runs:
        raise WmvlaError(
            f"no evaluation folders under {run_root} (expected folders holding summary.json next to "
            "episodes.jsonl, written by `wmvla eval`). Run `wmvla matrix` or `wmvla eval` first."
        )
    conds = group_conditions(runs)
    cond_summaries = {name: summarize_condition(c) for name, c in conds.items()}
    for name, b in cond_summaries.items():
        if b["errors"]:
            warnings.append(f"{name}: {b['errors']} of {b['n']} episodes ended with an error (counted as failures).")
        for f, vals in b["settings"].items():
            if len(vals) > 1:
                warnings.append(f"{name}: seeds were evaluated with different {f}: {vals}.")
    comps = build_comparisons(conds, cfg)
    verdict = build_verdict(comps, cfg)
    train_runs = load_train_runs(run_root)
    training = [training_health(r) for r in train_runs]
    warnings += [f"training {t['run']}: {flag}" for t in training for flag in t["flags"]]

    plots: dict[str, str] = {}
    if cfg.plots:
        plot_dir = run_root / "plots"
        plot_conditions(cond_summaries, plot_dir / "success_by_condition.png")
        plots["conditions"] = "plots/success_by_condition.png"
        plot_tasks(cond_summaries, plot_dir / "success_by_task.png")
        plots["tasks"] = "plots/success_by_task.png"
        if plot_gates(train_runs, plot_dir / "gate_curves.png"):
            plots["gates"] = "plots/gate_curves.png"
        if plot_losses(train_runs, plot_dir / "loss_curves.png"):
            plots["losses"] = "plots/loss_curves.png"

    summary = {
        "run_root": str(run_root),
        "run_uri": cfg.run_uri or str(run_root),
        "kfp_run": cfg.kfp_run,
        "generated": _dt.datetime.now().isoformat(timespec="seconds"),
        "settings": {"alpha": cfg.alpha, "min_effect": cfg.min_effect, "power": cfg.power},
        "n_eval_dirs": len(runs),
        "conditions": cond_summaries,
        "comparisons": [dataclasses.asdict(c) for c in comps],
        "verdict": verdict,
        "references": {rel.as_posix(): {"condition": (ref.get("config") or {}).get("condition"),
                                        **{k: (ref.get("overall") or {}).get(k)
                                           for k in ("success_rate", "successes", "n", "ci95")}}
                       for rel, ref in reference_dirs},
        "training": training,
        "warnings": warnings,
        "plots": plots,
    }
    atomic_write_text(run_root / "report.md", render_markdown(run_root, summary, plots, cfg))
    atomic_write_json(run_root / "summary.json", summary)
    return summary


def run_report(cfg: ReportConfig) -> int:
    summary = build_report(cfg)
    if cfg.print_table:
        print_console_table(summary)
        print(f"report: {Path(cfg.run_root) / 'report.md'}")
    refused = [c for c in summary["comparisons"] if c["status"] == "refused"]
    if cfg.strict and refused:
        raise WmvlaError(
            "refused comparisons (report written anyway): "
            + "; ".join(f"{c['name']} ({c['head']}): {c['reason']}" for c in refused)
        )
    return 0
