"""`wmvla demo` with its defaults: the Kubeflow pipeline through kfp.local on the offline MetaWorld benchmark,
results in an embedded SeaweedFS and pulled back; within the 15-minute budget on a 2-core machine, with
every cell's policy solving the easy tasks (slow: `bash scripts/test.sh --slow`)."""

from __future__ import annotations

import json
import os
import time

import pytest

os.environ.setdefault("MUJOCO_GL", "egl")


@pytest.mark.slow
def test_demo_defaults_within_budget_and_successful(tmp_path):
    from pipelines.demo import DemoConfig, run_demo_steps

    t0 = time.perf_counter()
    summary = run_demo_steps(DemoConfig(out=tmp_path / "demo"))
    minutes = (time.perf_counter() - t0) / 60
    assert minutes < 15, f"the demo took {minutes:.1f} min"
    pulled = tmp_path / "demo" / "results"
    assert (pulled / "report.md").exists() and (pulled / "_manifest.json").exists()
    on_disk = json.loads((pulled / "summary.json").read_text())
    assert on_disk["verdict"] and on_disk["conditions"] == summary["conditions"]
    conds = summary["conditions"]
    assert set(conds) == {"E0-mse-none", "E2-mse-pred", "E2-mse-zero", "E2-mse-random", "E2-mse-shuffle",
                          "E0-flow-none", "E2-flow-pred", "E2-flow-zero", "E2-flow-random", "E2-flow-shuffle"}
    for name, c in conds.items():
        assert c["n"] == 45 and {"success_rate", "ci95"} <= set(c)
    for name in ("E0-mse-none", "E2-mse-pred", "E0-flow-none", "E2-flow-pred"):  # every cell's own condition
        assert conds[name]["success_rate"] >= 0.3, (name, conds[name]["success_rate"])
