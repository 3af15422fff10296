"""`wmvla demo` with its defaults: finishes within the 15-minute budget on a 2-core machine and produces
policies that solve the easy tasks (slow: ~6-8 minutes)."""

from __future__ import annotations

import json
import os
import time

import pytest

os.environ.setdefault("MUJOCO_GL", "egl")


@pytest.mark.slow
def test_demo_defaults_within_budget_and_successful(tmp_path):
    from vla_core.experiments.demo import DemoConfig, run_demo_steps

    t0 = time.perf_counter()
    summary = run_demo_steps(DemoConfig(out=tmp_path / "demo", progress=False))
    minutes = (time.perf_counter() - t0) / 60
    assert minutes < 15, f"the demo took {minutes:.1f} min"
    out = tmp_path / "demo"
    assert (out / "report.md").exists() and (out / "summary.json").exists()
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["verdict"] and on_disk["conditions"] == summary["conditions"]
    conds = summary["conditions"]
    assert set(conds) == {"E0-mse-none", "E1-mse-zero", "E2-mse-pred", "E2-mse-zero", "E2-mse-random",
                          "E2-mse-shuffle", "E3-mse-pred"}
    for name, c in conds.items():
        assert c["n"] == 45 and {"success_rate", "ci95"} <= set(c)
        assert c["success_rate"] > 0.2, (name, c["success_rate"])
    for name in ("E0-mse-none", "E1-mse-zero", "E2-mse-pred", "E3-mse-pred"):
        assert conds[name]["success_rate"] >= 0.5, (name, conds[name]["success_rate"])
    timings = json.loads((out / "demo.json").read_text())["timings_s"]
    assert {"data", "latents", "matrix"} <= set(timings)
