"""`wmvla report` from synthetic matrix results with known success patterns.

A fake RUN_ROOT (E0/E1/E2/E3 training runs with train_log.jsonl, evaluation folders with episodes.jsonl and
summary.json, laid out as docs/report.md describes) is built with exactly chosen McNemar cells, so Wilson
intervals and p-values can be checked against values computed by hand here.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from PIL import Image

from vla_core.cli import main as cli_main
from vla_core.experiments.report import ReportConfig, build_report, run_report
from vla_core.utils import WmvlaError, append_jsonl, atomic_write_json

TASKS = ("reach-v3", "push-v3")
Z95 = 1.959963984540054


# ------------------------------------------------------------------------------- hand computations


def wilson_by_hand(k: int, n: int) -> tuple[float, float]:
    p = k / n
    denom = 1 + Z95**2 / n
    center = (p + Z95**2 / (2 * n)) / denom
    half = Z95 * math.sqrt(p * (1 - p) / n + Z95**2 / (4 * n * n)) / denom
    return center - half, center + half


def mcnemar_by_hand(b: int, c: int) -> float:
    """Two-sided exact McNemar: twice the smaller binomial tail of Bin(b + c, 1/2), capped at 1."""
    d = b + c
    tail = sum(math.comb(d, i) for i in range(min(b, c) + 1)) / 2**d
    return min(1.0, 2 * tail)


# ------------------------------------------------------------------------------ synthetic run root


def paired_pattern(n: int, both: int, a_only: int, b_only: int) -> tuple[list[bool], list[bool]]:
    """Two outcome lists over the same n matched episodes with the given McNemar cells."""
    neither = n - both - a_only - b_only
    assert neither >= 0
    a = [True] * both + [True] * a_only + [False] * b_only + [False] * neither
    b = [True] * both + [False] * a_only + [True] * b_only + [False] * neither
    return a, b


def keys(seeds: tuple[int, ...], per_seed: int, interleave: bool = True) -> list[tuple[int, str, int]]:
    """(seed, task, init_index) for `per_seed` episodes per seed, spread over TASKS. Interleaved, the cells
    of `paired_pattern` spread evenly over seeds; otherwise seed 0 gets the first block of the pattern."""
    out = [(s, TASKS[i % len(TASKS)], i // len(TASKS)) for i in range(per_seed) for s in seeds]
    return out if interleave else sorted(out)


def write_eval(root: Path, exp: str, head: str, memory: str, seed: int, episodes: list[tuple[str, int, bool]],
               max_steps: int = 150, replan_steps: int = 5, name: str | None = None) -> Path:
    tag = f"{'none' if exp == 'E0' else 'tiny'}_m4_delta_{head}"
    run = root / exp / tag / f"seed{seed}"
    folder = run / (name or f"eval_metaworld_mt_{memory}")
    folder.mkdir(parents=True, exist_ok=True)
    # one write per file (append_jsonl fsyncs every line, too slow for thousands of synthetic episodes)
    with open(folder / "episodes.jsonl", "a", encoding="utf-8") as f:
        for task, init, ok in episodes:
            f.write(json.dumps({
                "env": "metaworld", "suite": "mt", "task": task, "init_index": init, "seed": 1000 + init,
                "condition": memory, "success": ok, "steps": 40 if ok else max_steps, "wall_s": 0.1,
                "error": None}) + "\n")
    k = sum(ok for _, _, ok in episodes)
    atomic_write_json(folder / "summary.json", {
        "overall": {"success_rate": k / len(episodes), "n": len(episodes), "ci95": [0, 1]},
        "per_task": {},
        "config": {"experiment": exp, "head": head, "seed": seed, "rollout_memory": memory,
                   "checkpoint": str(run / "checkpoints" / "final"), "env": "metaworld", "suite": "mt",
                   "max_steps": max_steps, "replan_steps": replan_steps}})
    return folder


def write_train_log(root: Path, exp: str, head: str, seed: int, steps: int = 50, gate_fn=None) -> None:
    tag = f"{'none' if exp == 'E0' else 'tiny'}_m4_delta_{head}"
    log = root / exp / tag / f"seed{seed}" / "train_log.jsonl"
    for step in range(0, steps, 5):
        rec = {"step": step, "action_loss": 1.0 / (1 + 0.1 * step), "lr": 1e-4}
        if exp in ("E2", "E3"):
            rec["world_loss"] = 0.5 / (1 + 0.05 * step)
        if exp != "E0":
            rec["gate"] = gate_fn(step) if gate_fn else 0.002 * step
        append_jsonl(log, rec)
        if step % 20 == 0:  # validation rows go to val_log.jsonl (as vla_core.train.loop.validate writes them)
            append_jsonl(log.parent / "val_log.jsonl", {
                "step": step, "action_mse": 0.8 / (1 + 0.1 * step), "mean_baseline_mse": 0.9,
                "action_mae_real": 0.05 / (1 + 0.1 * step), "mean_baseline_mae_real": 0.06,
                "action_mae_real_per_dim": [0.1] * 7, "beats_mean_baseline": True})
    atomic_write_json(log.parent / "done.json", {"final_step": steps})


def write_condition(root: Path, exp: str, head: str, memory: str, outcomes: list[bool],
                    ks: list[tuple[int, str, int]], **kw) -> None:
    by_seed: dict[int, list] = {}
    for (seed, task, init), ok in zip(ks, outcomes, strict=True):
        by_seed.setdefault(seed, []).append((task, init, ok))
    for seed, eps in by_seed.items():
        write_eval(root, exp, head, memory, seed, eps, **kw)


def make_root(root: Path, *, seeds=(0, 1), per_seed=50, e2_e0=(30, 20, 2), e1_e0=(30, 3, 2),
              e3_e0=(32, 25, 0), heads=("mse",), train_logs=True, interleave=True) -> Path:
    """E2-pred vs E0 has cells (both, E2 only, E0 only) = e2_e0; E2-zero / random / shuffle and E1 are built
    relative to E0's outcomes, so pred vs zero has the same cells as E2 vs E0."""
    ks = keys(seeds, per_seed, interleave)
    n = len(ks)
    for head in heads:
        e2, e0 = paired_pattern(n, *e2_e0)
        e1 = _relative(e0, *e1_e0)
        e3 = _relative(e0, *e3_e0)
        write_condition(root, "E0", head, "none", e0, ks)
        write_condition(root, "E1", head, "zero", e1, ks)
        write_condition(root, "E2", head, "pred", e2, ks)
        for mem in ("zero", "random", "shuffle"):
            write_condition(root, "E2", head, mem, e0, ks)  # ablations fall back to the baseline's outcomes
        write_condition(root, "E3", head, "pred", e3, ks)  # E3: trained on the true future, evaluated with the prediction
        if train_logs:
            for s in seeds:
                for exp in ("E0", "E1", "E2", "E3"):
                    write_train_log(root, exp, head, s)
    return root


def _relative(ref: list[bool], both: int, a_only: int, b_only: int) -> list[bool]:
    """An outcome list whose McNemar cells against `ref` are (both, a_only, b_only, rest)."""
    succ = [i for i, r in enumerate(ref) if r]
    fail = [i for i, r in enumerate(ref) if not r]
    assert both + b_only == len(succ) and a_only <= len(fail)
    out = [False] * len(ref)
    for i in succ[:both]:
        out[i] = True
    for i in fail[:a_only]:
        out[i] = True
    return out


def report(root: Path, **kw) -> dict:
    kw.setdefault("plots", False)
    kw.setdefault("print_table", False)
    return build_report(ReportConfig(run_root=root, **kw))


def comparison(summary: dict, name: str, head: str = "mse") -> dict:
    (c,) = [c for c in summary["comparisons"] if c["name"] == name and c["head"] == head]
    return c


# ------------------------------------------------------------------------------------------- tests


def test_supported_case_numbers_and_verdict(tmp_path):
    # E0 has 32/100 successes (30 both + 2 E0-only); E2 50/100; 20:2 discordant -> p = 2*(1+22+231)/2^22.
    root = make_root(tmp_path)
    s = report(root)
    json_summary = json.loads((root / "summary.json").read_text())
    assert json_summary["verdict"]["overall"] == s["verdict"]["overall"] == "supported"

    conds = json_summary["conditions"]
    assert set(conds) == {"E0-mse-none", "E1-mse-zero", "E2-mse-pred", "E2-mse-zero", "E2-mse-random",
                          "E2-mse-shuffle", "E3-mse-pred"}
    e0, e2 = conds["E0-mse-none"], conds["E2-mse-pred"]
    assert (e0["successes"], e0["n"], e0["seeds"]) == (32, 100, 2)
    assert (e2["successes"], e2["n"], e2["seeds"]) == (50, 100, 2)
    assert e2["success_rate"] == pytest.approx(0.5)
    assert e2["ci95"] == pytest.approx([0.4038, 0.5962], abs=1e-4)  # textbook Wilson value for 50/100
    assert e0["ci95"] == pytest.approx(wilson_by_hand(32, 100), abs=1e-9)
    # per seed and per task are consistent with the pooled numbers
    assert sum(v["successes"] for v in e2["per_seed"].values()) == 50
    assert sum(v["n"] for v in e2["per_task"].values()) == 100
    assert e2["per_task"]["reach-v3"]["ci95"] == pytest.approx(
        wilson_by_hand(e2["per_task"]["reach-v3"]["successes"], 50), abs=1e-9)

    c = comparison(json_summary, "E2 vs E0")
    assert c["status"] == "ok"
    assert (c["n_pairs"], c["both"], c["a_only"], c["b_only"], c["neither"]) == (100, 30, 20, 2, 48)
    assert c["p_value"] == pytest.approx(508 / 2**22, rel=1e-9)
    assert c["p_value"] == pytest.approx(mcnemar_by_hand(20, 2), rel=1e-9)
    assert c["significant"] is True
    c1 = comparison(json_summary, "E1 vs E0")
    assert (c1["a_only"], c1["b_only"]) == (3, 2)
    assert c1["p_value"] == pytest.approx(1.0)
    assert comparison(json_summary, "E2 pred vs zero")["p_value"] == pytest.approx(mcnemar_by_hand(20, 2))
    assert comparison(json_summary, "E2 pred vs random")["significant"] is True
    assert comparison(json_summary, "E3 vs E0")["p_value"] == pytest.approx(mcnemar_by_hand(25, 0))

    v = json_summary["verdict"]["per_head"]["mse"]
    assert {k: c["status"] for k, c in v["criteria"].items()} == {
        "capacity_control": "holds", "e2_beats_e0": "supported", "pred_beats_zero": "supported",
        "pred_beats_random": "supported"}
    assert "SUPPORTED" in json_summary["verdict"]["sentence"]
    assert c["per_seed_diff"] == pytest.approx({"0": 9 / 50, "1": 9 / 50})  # 10:1 discordant in each seed
    assert "Caveat" not in v["criteria"]["e2_beats_e0"]["sentence"]
    md = (root / "report.md").read_text()
    assert "## Verdict" in md and "**supported**" in md and "E2 vs E0" in md
    assert "32/100" in md and "50/100" in md


def test_unsupported_when_e2_significantly_worse(tmp_path):
    root = make_root(tmp_path, e2_e0=(10, 1, 22))  # E2 loses 22:1 discordant pairs
    s = report(root)
    c = comparison(s, "E2 vs E0")
    assert c["diff"] < 0 and c["p_value"] == pytest.approx(mcnemar_by_hand(1, 22))
    assert s["verdict"]["per_head"]["mse"]["criteria"]["e2_beats_e0"]["status"] == "not supported"
    assert s["verdict"]["overall"] == "not supported"


def test_unsupported_when_powered_and_no_difference(tmp_path):
    # 800 matched episodes, E2 identical to E0 except 6:5 discordant pairs: not significant, and a 10-point
    # effect would have been detected (MDD < 10 points) -> "not supported", not "underpowered".
    root = make_root(tmp_path, per_seed=400, e2_e0=(395, 6, 5), e1_e0=(400, 2, 0), e3_e0=(400, 0, 0),
                     train_logs=False)
    s = report(root)
    c = comparison(s, "E2 vs E0")
    assert c["n_pairs"] == 800 and not c["significant"]
    assert c["mdd"] < 0.10
    assert s["verdict"]["per_head"]["mse"]["criteria"]["e2_beats_e0"]["status"] == "not supported"
    assert s["verdict"]["overall"] == "not supported"


def test_underpowered_case(tmp_path):
    # 10 episodes per condition, E2 wins 3:0 discordant pairs: p = 0.25, far from significance.
    root = make_root(tmp_path, seeds=(0,), per_seed=10, e2_e0=(2, 3, 0), e1_e0=(2, 0, 0), e3_e0=(2, 1, 0))
    s = report(root)
    c = comparison(s, "E2 vs E0")
    assert c["p_value"] == pytest.approx(0.25)
    assert c["mdd"] > 0.3  # at n=10 only huge differences are detectable
    assert s["verdict"]["overall"] == "inconclusive: underpowered (n=10)"
    assert s["verdict"]["per_head"]["mse"]["criteria"]["e2_beats_e0"]["status"] == "inconclusive"
    md = (root / "report.md").read_text()
    assert "underpowered" in md and "minimal detectable difference" in md.lower()
    # E0 succeeds 2/10: a 10-point gain (20 % -> 30 %) needs ceil(293.2) = 294 episodes per condition
    # (Fleiss without continuity correction, 80 % power; the textbook value)
    assert "needs about 294 episodes per condition" in s["verdict"]["sentence"]


def test_detectable_difference_at_the_ceiling_is_said_to_be_none(tmp_path):
    # the demo's situation: E0 40/45 (88.9 %), E2 45/45 with 5:0 discordant pairs, p = 0.0625. Even a rise to
    # 100 % (+11.1 points) needs more than 45 episodes for 80 % power, so the report must not claim that
    # "differences of 11.1 points or more are detected".
    root = make_root(tmp_path, seeds=(0,), per_seed=45, e2_e0=(40, 5, 0), e1_e0=(40, 0, 0), e3_e0=(40, 0, 0))
    s = report(root)
    c = comparison(s, "E2 vs E0")
    assert c["p_value"] == pytest.approx(mcnemar_by_hand(5, 0)) and not c["significant"]
    assert c["mdd"] == pytest.approx(5 / 45) and c["mdd_ceiling"] is True
    crit = s["verdict"]["per_head"]["mse"]["criteria"]["e2_beats_e0"]
    assert crit["status"] == "inconclusive" and "no difference is detected" in crit["sentence"]
    assert "or more are detected" not in crit["sentence"]
    md = (root / "report.md").read_text()
    assert "> 11.1 pts (none)" in md and "not even a change to 100 %" in md
    # a comparison with room to 100 % keeps the plain wording (test_underpowered_case): E0 at 20 %, n=10
    low = report(make_root(tmp_path / "low", seeds=(0,), per_seed=10, e2_e0=(2, 3, 0), e1_e0=(2, 0, 0),
                           e3_e0=(2, 1, 0)))
    assert comparison(low, "E2 vs E0")["mdd_ceiling"] is False


def test_refuses_mismatched_episode_counts(tmp_path):
    root = make_root(tmp_path)
    # a second, larger E0 run would make E0 n=150 vs E2 n=100: McNemar needs the same matched episodes
    extra = [(TASKS[i % 2], i // 2, i % 3 == 0) for i in range(50)]
    write_eval(tmp_path, "E0", "mse", "none", 2, extra)
    s = report(root)
    c = comparison(s, "E2 vs E0")
    assert c["status"] == "refused"
    assert "different episode counts" in c["reason"] and "n=100" in c["reason"] and "n=150" in c["reason"]
    assert c["p_value"] is None
    v = s["verdict"]["per_head"]["mse"]
    assert v["criteria"]["e2_beats_e0"]["status"] == "refused"
    assert v["overall"].startswith("inconclusive") and s["verdict"]["overall"] != "supported"
    md = (root / "report.md").read_text()
    assert "REFUSED" in md
    # --strict turns the refusal into an error (exit code 2 through the CLI)
    with pytest.raises(WmvlaError, match="refused"):
        run_report(ReportConfig(run_root=root, plots=False, print_table=False, strict=True))
    assert cli_main(["report", str(root), "--strict", "--no-plots"]) == 2
    # the reason names the fix; following it makes the comparison valid again
    assert "--exclude 'E?/*/seed2/*'" in c["reason"]
    assert comparison(report(root, exclude=("E?/*/seed2/*",)), "E2 vs E0")["status"] == "ok"


def test_refuses_different_max_steps(tmp_path):
    root = make_root(tmp_path, train_logs=False)
    ks = keys((0, 1), 50)
    e2, _ = paired_pattern(100, 30, 20, 2)
    for p in (root / "E2").rglob("eval_metaworld_mt_pred"):
        for f in p.iterdir():
            f.unlink()
        p.rmdir()
    write_condition(root, "E2", "mse", "pred", e2, ks, max_steps=300)
    s = report(root)
    c = comparison(s, "E2 vs E0")
    assert c["status"] == "refused" and "max_steps differs" in c["reason"]
    assert comparison(s, "E2 pred vs zero")["status"] == "refused"


def test_refuses_unmatched_init_states(tmp_path):
    root = make_root(tmp_path, train_logs=False)
    # same counts, but E1 seed 1 used init states 100.. instead of 0..: not matched pairs
    folder = next((root / "E1").rglob("seed1/eval_*"))
    lines = (folder / "episodes.jsonl").read_text().splitlines()
    shifted = []
    for line in lines:
        e = json.loads(line)
        e["init_index"] += 100
        shifted.append(json.dumps(e))
    (folder / "episodes.jsonl").write_text("\n".join(shifted) + "\n")
    c = comparison(report(root), "E1 vs E0")
    assert c["status"] == "refused" and "not matched" in c["reason"]


def test_capacity_control_violation_makes_verdict_inconclusive(tmp_path):
    root = make_root(tmp_path, e1_e0=(32, 25, 0), train_logs=False)
    s = report(root)
    v = s["verdict"]["per_head"]["mse"]
    assert v["criteria"]["capacity_control"]["status"] == "violated"
    assert v["overall"] == "inconclusive: capacity control failed"


def test_missing_ablation_and_two_heads(tmp_path):
    root = make_root(tmp_path, heads=("mse", "flow"), train_logs=False)
    for p in list((root / "E2").rglob("eval_metaworld_mt_random")):
        if "flow" in str(p):
            for f in p.iterdir():
                f.unlink()
            p.rmdir()
    s = report(root)
    assert s["verdict"]["per_head"]["mse"]["overall"] == "supported"
    flow = s["verdict"]["per_head"]["flow"]
    assert flow["criteria"]["pred_beats_random"]["status"] == "missing"
    assert flow["overall"].startswith("inconclusive")
    assert s["verdict"]["overall"].startswith("mixed:")


def test_duplicate_evaluation_of_one_seed_is_an_error_until_excluded(tmp_path):
    root = make_root(tmp_path, train_logs=False)
    eps = [(TASKS[i % 2], i // 2, True) for i in range(50)]
    write_eval(root, "E0", "mse", "none", 0, eps, name="eval_old")
    with pytest.raises(WmvlaError, match="--exclude"):
        report(root)
    s = report(root, exclude=("E0/*/seed0/eval_old",))
    assert s["conditions"]["E0-mse-none"]["n"] == 100


def test_training_health_flags_stuck_gate(tmp_path):
    root = make_root(tmp_path)
    write_train_log(root, "E2", "flow", 7, gate_fn=lambda step: -0.015625)
    s = report(root)
    flags = {t["run"]: t["flags"] for t in s["training"]}
    stuck = flags["E2/tiny_m4_delta_flow/seed7"]
    assert any("never changed" in f for f in stuck)
    assert all(f == [] for run, f in flags.items() if not run.endswith("seed7"))
    assert any("never changed" in w for w in s["warnings"])


def test_training_health_flags_bf16_stall_and_flat_loss(tmp_path):
    # the earlier attempt's signature: a gate that moved once to -2^-6 (logged as tanh) and then stalled
    root = make_root(tmp_path)
    write_train_log(root, "E2", "flow", 8, gate_fn=lambda step: 0.0 if step == 0 else -math.tanh(2**-6))
    log = root / "E1" / "tiny_m4_delta_flow" / "seed9" / "train_log.jsonl"
    for step in range(10):
        append_jsonl(log, {"step": step, "action_loss": 0.2, "gate": 0.001 * step})
    flags = {t["run"]: t["flags"] for t in report(root)["training"]}
    assert any("stall value" in f for f in flags["E2/tiny_m4_delta_flow/seed8"])
    assert flags["E1/tiny_m4_delta_flow/seed9"] == ["action loss did not decrease (0.2 -> 0.2)"]


def test_training_health_flags_policy_no_better_than_the_mean(tmp_path):
    root = make_root(tmp_path)
    run = root / "E2" / "tiny_m4_delta_mse" / "seed0"
    append_jsonl(run / "val_log.jsonl", {"step": 60, "action_mse": 0.21, "mean_baseline_mse": 0.2})
    s = report(root)
    t = next(t for t in s["training"] if t["run"] == "E2/tiny_m4_delta_mse/seed0")
    assert t["val_action_mse_last"] == 0.21
    assert t["flags"] == ["validation action MSE 0.21 does not beat predicting the mean action (0.2)"]
    assert "0.21 (0.2)" in (root / "report.md").read_text()


def test_plots_are_valid_pngs_and_cli_writes_everything(tmp_path, capsys):
    root = make_root(tmp_path)
    assert cli_main(["report", str(root)]) == 0
    out = capsys.readouterr().out
    assert "E2-mse-pred" in out and "50/100" in out and "verdict" in out
    summary = json.loads((root / "summary.json").read_text())
    assert set(summary["plots"]) == {"conditions", "tasks", "gates", "losses"}
    assert all(t["finished"] for t in summary["training"])
    e2 = next(t for t in summary["training"] if t["run"] == "E2/tiny_m4_delta_mse/seed0")
    assert e2["action_loss_last"] < e2["action_loss_first"] and e2["gate_last"] == pytest.approx(0.09)
    md = (root / "report.md").read_text()
    for rel in summary["plots"].values():
        path = root / rel
        assert f"]({rel})" in md
        with Image.open(path) as im:
            im.verify()
        with Image.open(path) as im:
            assert im.format == "PNG" and im.size[0] > 300 and im.size[1] > 200
            # not a blank canvas: a real plot has many distinct colours
            assert len(im.convert("RGB").getcolors(maxcolors=1_000_000)) > 20


def test_no_evaluations_is_a_clear_error(tmp_path):
    (tmp_path / "E0").mkdir()
    with pytest.raises(WmvlaError, match="no evaluation folders"):
        report(tmp_path)


def test_gain_carried_by_one_seed_is_flagged(tmp_path):
    # all 20 E2-only pairs fall in seed 0, both E0-only pairs in seed 1: pooled p is tiny, seeds disagree
    root = make_root(tmp_path, interleave=False, train_logs=False)
    s = report(root)
    c = comparison(s, "E2 vs E0")
    assert c["per_seed_diff"] == pytest.approx({"0": 20 / 50, "1": -2 / 50})
    crit = s["verdict"]["per_head"]["mse"]["criteria"]["e2_beats_e0"]
    assert crit["status"] == "supported" and crit["seed_consistent"] is False
    assert "not consistent across training seeds" in crit["sentence"] and "1 of 2 seeds" in crit["sentence"]
    assert "may not be robust" in s["verdict"]["sentence"]


def test_ceiling_is_not_called_unsupported(tmp_path):
    # E0 succeeds in 96 of 100 episodes: a 10-point gain cannot exist, so a null result is inconclusive
    root = make_root(tmp_path, e2_e0=(95, 2, 1), e1_e0=(96, 0, 0), e3_e0=(96, 4, 0), train_logs=False)
    s = report(root)
    crit = s["verdict"]["per_head"]["mse"]["criteria"]["e2_beats_e0"]
    assert crit["status"] == "inconclusive" and "ceiling" in crit["sentence"]
    assert s["verdict"]["overall"] == "inconclusive: ceiling"


def test_warnings_for_errors_unfinished_and_mixed_folders(tmp_path):
    root = make_root(tmp_path, train_logs=False)
    # an episode that crashed counts as a failure and is reported
    folder = next((root / "E0").rglob("seed0/eval_*"))
    lines = [json.loads(x) for x in (folder / "episodes.jsonl").read_text().splitlines()]
    lines[0]["success"], lines[0]["error"] = False, "worker died"
    (folder / "episodes.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    # an unfinished evaluation (no summary.json yet) and a folder mixing two rollout memories are skipped
    write_eval(root, "E2", "mse", "pred", 5, [("reach-v3", 0, True)], name="eval_unfinished")
    (root / "E2" / "tiny_m4_delta_mse" / "seed5" / "eval_unfinished" / "summary.json").unlink()
    mixed = write_eval(root, "E2", "mse", "pred", 6, [("reach-v3", 0, True)], name="eval_mixed")
    with open(mixed / "episodes.jsonl", "a") as f:
        f.write(json.dumps({**lines[1], "condition": "zero"}) + "\n")
    # a LeRobot v2.1 dataset inside the run folder has a meta/episodes.jsonl that is no evaluation
    append_jsonl(root / "data" / "mt" / "meta" / "episodes.jsonl", {"episode_index": 0, "tasks": ["x"], "length": 9})
    s = report(root)
    assert s["conditions"]["E0-mse-none"]["errors"] == 1
    warnings = "\n".join(s["warnings"])
    assert "1 of 100 episodes ended with an error" in warnings
    assert "eval_unfinished: episodes.jsonl without summary.json" in warnings
    assert "eval_mixed: episodes.jsonl mixes conditions" in warnings
    assert "meta" not in warnings
    assert s["conditions"]["E2-mse-pred"]["seed_list"] == [0, 1]  # neither skipped folder was pooled
    assert "ended with an error" in (root / "report.md").read_text()


def test_different_episode_seeds_are_not_matched(tmp_path):
    # E1 evaluated with another env seed: the init conditions may differ, so the pairs are not matched
    root = make_root(tmp_path, train_logs=False)
    for ep in (root / "E1").rglob("episodes.jsonl"):
        rows = [json.loads(x) for x in ep.read_text().splitlines()]
        ep.write_text("".join(json.dumps({**r, "seed": r["seed"] + 1}) + "\n" for r in rows))
    c = comparison(report(root), "E1 vs E0")
    assert c["status"] == "refused" and "not matched" in c["reason"]


def test_reads_summaries_written_by_wmvla_eval(tmp_path):
    """Summaries from the real `wmvla eval` writer (config without experiment/head/seed: taken from the
    <E>/<tag>/seed<k> layout; per-task max_steps), plus a scripted reference outside the E0-E3 layout."""
    from vla_core.envs.registry import EnvConfig
    from vla_core.eval.cli import result_config, write_summary
    from vla_core.eval.engine import EngineConfig

    def write(folder: Path, outcomes: list[bool], memory: str, max_steps: int | None = None) -> None:
        env_cfg = EnvConfig(env="metaworld", suite="mt10", max_steps=max_steps)
        inits = list(range(len(outcomes) // 2))
        policy = {"kind": "checkpoint", "checkpoint": str(folder.parent / "checkpoints" / "final"),
                  "rollout_memory": memory, "seed": 0}
        config = result_config(env_cfg, list(TASKS), inits, EngineConfig(replan_steps=5), policy, f"ckpt-{memory}")
        records = [{"env": "metaworld", "suite": "mt10", "task": t, "init_index": k, "seed": 1000,
                    "condition": f"ckpt-{memory}", "success": ok, "steps": 50, "wall_s": 0.1, "error": None}
                   for (t, k), ok in zip([(t, k) for t in TASKS for k in inits], outcomes, strict=True)]
        folder.mkdir(parents=True)
        (folder / "episodes.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        write_summary(folder, records, config)

    e2, e0 = paired_pattern(40, 10, 12, 1)
    for seed in (0, 1):
        sl = slice(20 * seed, 20 * seed + 20)
        write(tmp_path / "E0" / "tiny_m4_delta_mse" / f"seed{seed}" / "eval_mt10_pred", e0[sl], "pred")
        write(tmp_path / "E2" / "tiny_m4_delta_mse" / f"seed{seed}" / "eval_mt10_pred", e2[sl], "pred")
        write(tmp_path / "E2" / "tiny_m4_delta_mse" / f"seed{seed}" / "eval_mt10_zero", e0[sl], "zero")
        write(tmp_path / "E2" / "tiny_m4_delta_mse" / f"seed{seed}" / "eval_mt10_random", e0[sl], "random",
              max_steps=200 if seed == 1 else None)
    write(tmp_path / "reference" / "scripted_expert", [True] * 19 + [False], "expert")

    s = report(tmp_path)
    assert set(s["conditions"]) == {"E0-mse-none", "E2-mse-pred", "E2-mse-zero", "E2-mse-random"}
    assert s["conditions"]["E0-mse-none"]["seed_list"] == [0, 1]
    c = comparison(s, "E2 vs E0")
    assert c["status"] == "ok" and (c["a_only"], c["b_only"]) == (12, 1)
    assert c["p_value"] == pytest.approx(mcnemar_by_hand(12, 1))
    assert comparison(s, "E2 pred vs zero")["status"] == "ok"
    refused = comparison(s, "E2 pred vs random")
    assert refused["status"] == "refused" and "max_steps" in refused["reason"]
    assert comparison(s, "E1 vs E0")["status"] == "missing"
    assert s["references"]["reference/scripted_expert"]["n"] == 20
    assert s["references"]["reference/scripted_expert"]["successes"] == 19
    md = (tmp_path / "report.md").read_text()
    assert "150 (all 2 tasks)" in md and "reference/scripted_expert" in md


def test_config_keys_win_over_the_folder_layout(tmp_path):
    """summary.json's top-level experiment/head/seed/rollout_memory (written by `wmvla eval --checkpoint` and
    the matrix) are used even where the folder names say otherwise; the layout is only the fallback."""
    from vla_core.experiments.report import load_eval_runs

    folder = write_eval(tmp_path, "E2", "mse", "pred", 0, [("reach-v3", 0, True), ("push-v3", 0, False)])
    summary = json.loads((folder / "summary.json").read_text())
    summary["config"].update(seed=5, head="flow", rollout_memory="zero")
    atomic_write_json(folder / "summary.json", summary)
    (run,), _, _ = load_eval_runs(tmp_path)
    assert (run.experiment, run.head, run.seed, run.rollout_memory) == ("E2", "flow", 5, "zero")
    # without the keys: from the layout (E2 / tag suffix _mse / seed0), as before
    for k in ("experiment", "head", "seed", "rollout_memory"):
        summary["config"].pop(k)
    summary["config"]["policy"] = {"rollout_memory": "pred"}
    atomic_write_json(folder / "summary.json", summary)
    (run,), _, _ = load_eval_runs(tmp_path)
    assert (run.experiment, run.head, run.seed, run.rollout_memory) == ("E2", "mse", 0, "pred")


def test_matrix_without_e1_is_judged_on_the_other_criteria_and_says_so(tmp_path):
    """The design card's four cells (E0 / E2 x heads) have no E1: the capacity control is 'not run' (not a
    reason for 'inconclusive'), the verdict rests on E2 vs E0 and pred vs zero / random, and says E1 is absent."""
    import shutil

    root = make_root(tmp_path)
    shutil.rmtree(root / "E1")
    v = report(root)["verdict"]
    mse = v["per_head"]["mse"]
    assert mse["criteria"]["capacity_control"]["status"] == "not run"
    assert mse["overall"] == "supported", mse["sentence"]
    assert "E1 was not in this matrix" in mse["sentence"] and "E1-E0" not in mse["sentence"]
    # a refused or failing criterion still decides as before: E2 no better than E0 is not 'supported'
    root2 = make_root(tmp_path / "flat", e2_e0=(30, 2, 2))
    shutil.rmtree(root2 / "E1")
    assert report(root2)["verdict"]["per_head"]["mse"]["overall"] != "supported"
