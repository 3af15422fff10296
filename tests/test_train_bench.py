"""Smoke test of benchmarks/bench_train.py --tiny: both steps run and the JSON has the documented fields."""

from __future__ import annotations

import importlib.util
from pathlib import Path


def test_bench_train_tiny_runs():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_train.py"
    spec = importlib.util.spec_from_file_location("bench_train", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    result = bench.main(["--tiny", "--iters", "1", "--warmup", "1"])
    assert result["shapes"] == "tiny" and result["seq_len_hf"] > 0 and result["seq_len_ours"] > 0
    for finetune in ("full", "frozen_vision"):
        row = result["results"][finetune]
        for name in ("hf_bf16", "hf_autocast", "ours"):
            assert row[name]["samples_per_s"] > 0, (finetune, name)
        assert row["ours_over_hf_bf16"] > 0 and row["ours_ref"]["samples_per_s"] > 0
        assert row["ours"]["model_flop_per_step"] > 0  # the MFU column's FLOP count
    assert result["results"]["lora"]["ours"]["samples_per_s"] > 0  # LoRA: our rows only


def test_bench_train_tiny_cached_vision_row_and_check():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_train.py"
    spec = importlib.util.spec_from_file_location("bench_train", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    result = bench.main(["--tiny", "--iters", "1", "--warmup", "1", "--finetune", "frozen_vision",
                         "--rows", "ours_cached_vision", "--check"])
    row = result["results"]["frozen_vision"]["ours_cached_vision"]
    assert row["samples_per_s"] > 0 and row["model_flop_per_step"] > 0
    same = result["same_numbers_cached_vision"]["cached_vision"]  # fp32 on the CPU: the live numbers
    assert same["loss_rel_diff"] < 1e-6 and same["grad_rel_l2_all"] < 1e-5
