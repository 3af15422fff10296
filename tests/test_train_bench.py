"""Smoke test of benchmarks/bench_train.py --tiny: both steps run and the JSON has the documented fields."""

from __future__ import annotations

import importlib.util
from pathlib import Path


def _load_bench(name: str = "bench_train"):
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_bench_train_tiny_runs():
    bench = _load_bench()
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
    bench = _load_bench()
    result = bench.main(["--tiny", "--iters", "1", "--warmup", "1", "--finetune", "frozen_vision",
                         "--rows", "ours_cached_vision", "--check"])
    row = result["results"]["frozen_vision"]["ours_cached_vision"]
    assert row["samples_per_s"] > 0 and row["model_flop_per_step"] > 0
    same = result["same_numbers_cached_vision"]["cached_vision"]  # fp32 on the CPU: the live numbers
    assert same["loss_rel_diff"] < 1e-6 and same["grad_rel_l2_all"] < 1e-5
    backbone = result["same_numbers"]["transformers_backbone_forward"]  # the sync-free forward: the same ops
    assert backbone["loss_rel_diff"] == 0.0 and backbone["grad_rel_l2_all"] == 0.0
    hf = result["same_numbers"]["transformers_path"]
    assert hf["loss_rel_diff"] < 1e-5 and hf["grad_rel_l2_all"] < 1e-4


def test_bench_train_sync_cost_times_the_step_with_and_without_the_pre_update_read():
    result = _load_bench().main(["--tiny", "--iters", "1", "--warmup", "1", "--finetune", "full", "--rows", "none",
                                 "--sync-cost", "2"])
    cost = result["sync_cost"]
    assert len(cost["with_read_ms"]) == len(cost["without_read_ms"]) == 2
    assert min(cost["with_read_ms"] + cost["without_read_ms"]) > 0
    # per round: the step with the read minus the step without it (the rows are rounded to 0.1 ms)
    paired = sorted(w - wo for w, wo in zip(cost["with_read_ms"], cost["without_read_ms"]))
    assert all(abs(a - b) <= 0.11 for a, b in zip(paired, cost["read_cost_ms_per_round_sorted"]))
    assert abs(cost["read_cost_ms_median"] - sum(cost["read_cost_ms_per_round_sorted"]) / 2) <= 0.01


def test_compile_variant_rows_name_a_mode_or_inductor_options():
    """--compile-variants: each extra row is compiled as its name says (a mode, or inductor options parsed as
    JSON values); the plain ours_compiled row keeps --compile-mode."""
    bench = _load_bench()
    assert bench.compile_variant("ours_compiled", None) == (None, None, {})
    assert bench.compile_variant("ours_compiled", "max-autotune") == ("max-autotune", None, {})
    assert bench.compile_variant("ours_compiled[reduce-overhead]", None) == ("reduce-overhead", None, {})
    assert bench.compile_variant("ours_compiled[opt:cpp_wrapper=true,triton.cudagraphs=false,x=3]", None) == (
        None, {"cpp_wrapper": True, "triton.cudagraphs": False, "x": 3}, {})
    assert bench.compile_variant("ours_compiled[tower]", None) == (
        None, None, {"vision_region": "tower", "vision_mode": None})
    assert bench.compile_variant("ours_compiled[tower:reduce-overhead]", None) == (
        None, None, {"vision_region": "tower", "vision_mode": "reduce-overhead"})
    stack = bench.compile_variant("ours_compiled[stack:reduce-overhead]", None)
    assert stack == (None, None, {"vision_region": "tower", "vision_mode": "reduce-overhead",
                                  "decoder_region": "stack", "decoder_mode": "reduce-overhead"})
    assert bench.uses_cuda_graphs(*stack) and not bench.uses_cuda_graphs(*bench.compile_variant("ours_compiled[stack]",
                                                                                                None))
    assert bench.uses_cuda_graphs("reduce-overhead", None, {})


def test_bench_trainer_tiny_times_the_training_loop_and_the_ideal_step():
    """benchmarks/bench_trainer.py --tiny: the preset's run through the real loop (data, processor, EMA, logs,
    checks) on generated data, timed from its log windows, and bench_train's step on the same backbone."""
    result = _load_bench("bench_trainer").main(["--tiny"])
    trainer = result["trainer"]
    assert trainer["steps"] == 6 and trainer["windows"] == 3
    assert len(trainer["samples_per_s_per_window"]) == 2  # the first window (compilation on a GPU) left out
    assert trainer["ms_per_step"] > 0 and result["ideal_step_ms"] > 0 and result["trainer_over_ideal"] > 0
