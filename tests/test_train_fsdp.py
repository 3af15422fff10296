"""FSDP (`wmvla train --distributed fsdp`, PyTorch FSDP2 applied by the loop) on CPU with 2 gloo processes.

The same comparison as tests/test_train_distributed.py's DDP test (E2, MSE head: a deterministic training
forward; the two ranks' halves have different numbers of valid terms), with the weights, gradients and
AdamW state sharded: every tensor the loop reads whole (checks, clipping, EMA, checkpoint) goes through
the shards. What this proves and what only a GPU run can show: docs/training.md "Multiple GPUs".

- a 2-process FSDP run (accelerate launch, 2 x 1 sample x 2 accumulation steps, EMA on) and one process
  with the same global batch of 4 have the same loss / gradient-norm curve, the same update in step 1 and
  the same weights, EMA and Adam state after 4 steps; rank 1 writes nothing; the checkpoint has the
  single-process format (tensor names, optimizer state by parameter index) and loads in one process
  through evaluation's rebuild path, acting like the single-process run's checkpoint;
- a run stopped after step 2 and started again (the optimizer / EMA / RNG state round trip through the
  gathered checkpoint and back into the shards) continues bit for bit;
- LoRA with bf16 frozen weights (trainable fp32 and frozen bf16 parameters in one FSDP unit) and the
  frozen vision tower (torchrun): the trainable set moves, nothing frozen does, the checkpoint loads; the
  frozen-tower run reading the vision-feature cache (`--vision-cache`) has the live run's loss curve.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from test_train_distributed import (
    LATER_GRAD_TOL,
    LAUNCH_TIMEOUT_S,
    RUN,
    _free_port,
    _initial_trainable,
    _launch_ddp,
    assert_checkpoints_act_alike,
    assert_same_training,
)
from test_train_loop import _losses, tiny_cfg
from vla_core.train.config import get_preset
from vla_core.train.loop import train
from vla_core.utils import read_jsonl

STEPS = 4
# 2 processes x 1 sample x 2 micro-batches (FSDP's reduce-scatter skipped on the first) == one batch of 4
COMMON = ["--optim.steps", str(STEPS), "--log-every", "1", "--val-every", "0", "--ckpt-every", "1",
          "--keep-checkpoints", "10", "--mean-baseline-check", "off", "--optim.ema-decay", "0.9",
          "--distributed", "fsdp"]
FSDP_ARGS = COMMON + ["--optim.batch-size", "1", "--optim.grad-accum", "2"]


def _ckpt(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"step_{step:07d}"


def _single_cfg(data, out_root: Path, **policy_changes):
    base = get_preset("tiny")
    return tiny_cfg(data, out_root, optim=dataclasses.replace(base.optim, steps=STEPS, batch_size=4, ema_decay=0.9),
                    policy=dataclasses.replace(base.policy, **policy_changes), log_every=1, val_every=0,
                    ckpt_every=1, keep_checkpoints=10, mean_baseline_check="off")


@pytest.fixture(scope="module")
def fsdp_run(data, tmp_path_factory):
    """One uninterrupted 2-process FSDP run (launched as a user does) with audit hooks on both ranks."""
    tmp = tmp_path_factory.mktemp("fsdp")
    t0 = time.perf_counter()
    res = _launch_ddp(data, tmp / "fsdp", tmp / "audit", FSDP_ARGS)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    assert "x 2 processes" in res.stdout and "FSDP2 over 2 processes" in res.stdout, res.stdout[-2000:]
    print(f"fsdp run {time.perf_counter() - t0:.1f} s")
    return {"run": tmp / "fsdp" / RUN, "audit": tmp / "audit", "out_root": tmp / "fsdp", "stdout": res.stdout}


def test_fsdp_two_processes_equal_one_process_and_checkpoint_loads_in_one(data, fsdp_run, tmp_path):
    cfg = _single_cfg(data, tmp_path / "single")
    run_1, run_2 = Path(train(cfg)["run_dir"]), fsdp_run["run"]

    # same loss curve (the global batch's) and gradient norm (DTensor clip_grad_norm_ over the shards)
    l1, l2 = _losses(run_1), _losses(run_2)
    assert [r[0] for r in l1] == [r[0] for r in l2] == list(range(1, STEPS + 1))
    np.testing.assert_allclose(np.array(l2)[:, 1:], np.array(l1)[:, 1:], rtol=2e-5, atol=1e-7)
    assert "first-steps check passed" in fsdp_run["stdout"]  # on local shards, empty ones included

    # the gradients and update of step 1 and the weights and EMA after the last step, gathered from the shards
    # (compared where well defined, as in the DDP test: Adam's step is ill-conditioned where a gradient is ~eps)
    assert_same_training(run_1, run_2, cfg, STEPS, extra_weights=("ema.safetensors",))

    # the optimizer state is in one process's format: indices, groups and hyperparameters equal, whole tensors
    # (its values after the last step: to LATER_GRAD_TOL of each tensor's largest, as later steps' gradients are
    # computed at weights that differ in Adam's ill-conditioned elements; step 1's gradients are checked above)
    s1, s2 = (torch.load(_ckpt(r, STEPS) / "train_state.pt", weights_only=False) for r in (run_1, run_2))
    assert s2["world_size"] == 2 and len(s2["rng"]) == 2
    assert s1["optimizer"]["param_groups"] == s2["optimizer"]["param_groups"]
    assert s1["optimizer"]["state"].keys() == s2["optimizer"]["state"].keys()
    for i, st in s1["optimizer"]["state"].items():
        for k, v in st.items():
            assert s2["optimizer"]["state"][i][k].shape == v.shape
            torch.testing.assert_close(s2["optimizer"]["state"][i][k], v, rtol=0,
                                       atol=LATER_GRAD_TOL * float(v.abs().max()))
    m1, m2 = (json.loads((_ckpt(r, STEPS) / "meta.json").read_text()) for r in (run_1, run_2))
    assert m1["tensors"] == m2["tensors"] and m1["frozen"] == m2["frozen"]

    # validation ran on both ranks (sharded forward); rank 0 logged it, with the EMA weights
    v1, v2 = read_jsonl(run_1 / "val_log.jsonl"), read_jsonl(run_2 / "val_log.jsonl")
    assert len(v1) == len(v2) == 1
    assert v2[0]["action_mse"] == pytest.approx(v1[0]["action_mse"], rel=1e-4)

    # rank 1 wrote nothing at all under the output root
    writes = {r: json.loads((fsdp_run["audit"] / f"writes-rank{r}.json").read_text()) for r in (0, 1)}
    assert writes[1] == [], writes[1][:10]
    assert any(p.endswith(f"checkpoints/step_{STEPS:07d}") for p in writes[0])

    # the FSDP checkpoint loads in one process through evaluation's rebuild path and acts like the
    # single-process one
    assert_checkpoints_act_alike(run_1, run_2)


def test_fsdp_resume_after_stop_continues_exactly(data, fsdp_run, tmp_path):
    """Stop after step 2, start the same command again: the optimizer state (gathered, saved, set back into
    the shards), EMA, RNG and data position make the rest of the run bit-identical to the uninterrupted one."""
    out = tmp_path / "resumed"
    first = _launch_ddp(data, out, tmp_path / "audit1", FSDP_ARGS + ["--stop-after", "2"])
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-5000:]
    run = out / RUN
    assert not (run / "done.json").exists() and (run / "checkpoints" / "latest").read_text().strip() == "step_0000002"
    second = _launch_ddp(data, out, tmp_path / "audit2", FSDP_ARGS)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-5000:]
    assert "resuming" in second.stdout and (run / "done.json").exists()

    ref = fsdp_run["run"]
    assert _losses(run) == _losses(ref)  # bit-identical curve, steps 3-4 computed after the resume
    for name in ("model.safetensors", "ema.safetensors"):
        a, b = load_file(str(_ckpt(ref, STEPS) / name)), load_file(str(_ckpt(run, STEPS) / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    sa, sb = (torch.load(_ckpt(r, STEPS) / "train_state.pt", weights_only=False)["optimizer"] for r in (ref, run))
    assert sa["param_groups"] == sb["param_groups"]
    assert all(torch.equal(sa["state"][i][k], sb["state"][i][k]) for i in sa["state"] for k in sa["state"][i])


def _launch_torchrun(data, out_root: Path, extra: list[str]) -> subprocess.CompletedProcess:
    torchrun = Path(sys.executable).parent / "torchrun"
    cmd = [str(torchrun), "--nproc_per_node", "2", "--master_port", str(_free_port()), "-m", "vla_core.cli", "train",
           "--preset", "tiny", "--dataset", data["dataset"], "--latents", data["latents"], "--out-root", str(out_root),
           *extra]
    return subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=LAUNCH_TIMEOUT_S)


@pytest.mark.parametrize("mode", ["lora", "frozen_vision"])
def test_fsdp_with_frozen_parameters_trains_and_loads(data, tmp_path, mode):
    """Trainable and frozen parameters in one FSDP unit (LoRA in the decoder layers; with bf16 frozen weights
    under autocast, as on a GPU, the unit also mixes dtypes), launched with torchrun."""
    from vla_core.train.checkpoint import load_policy

    precision = (["--policy.autocast-bf16", "--policy.frozen-dtype", "bfloat16"] if mode == "lora" else [])
    res = _launch_torchrun(data, tmp_path / "fsdp", COMMON + ["--optim.batch-size", "2", "--policy.finetune", mode,
                                                              "--optim.steps", "3", *precision])
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    assert "FSDP2 over 2 processes" in res.stdout
    # the first-steps check: every trainable tensor got a gradient and moved, no frozen one changed
    checked = re.search(r"first-steps check passed .*; (\d+) frozen tensors unchanged", res.stdout)
    assert checked and int(checked.group(1)) > 0, res.stdout[-2000:]
    run = tmp_path / "fsdp" / RUN
    assert all(np.isfinite(r[1]) for r in _losses(run))

    policy_changes = {"finetune": mode}
    if mode == "lora":
        policy_changes.update(autocast_bf16=True, frozen_dtype="bfloat16")
    cfg = _single_cfg(data, tmp_path / "single", **policy_changes)
    init = _initial_trainable(cfg)
    w = load_file(str(_ckpt(run, 3) / "model.safetensors"))
    assert w.keys() == init.keys()
    assert any("lora_B" in k for k in w) == (mode == "lora") and not any(".visual." in k for k in w)
    buffers = {"prophet.latent_mean", "prophet.latent_std"}  # saved too: the Prophet's latent normalisation
    assert buffers <= w.keys()
    assert [k for k in w if torch.equal(w[k], init[k])] == sorted(buffers)  # every trained tensor moved

    # loads in one process (the frozen weights' fingerprint and the tokenizer checked) and acts like a
    # single-process run of the same global batch
    train(dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, steps=3)))
    from vla_core.policy.tiny import random_observation

    (p1, _), (p2, _) = (load_policy(r, device="cpu") for r in (tmp_path / "single" / RUN, run))
    obs = [random_observation(p2.cfg, seed=i, image_hw=32) for i in range(2)]
    h = np.zeros((p2.cfg.world_history, p2.cfg.world_dim), dtype=np.float32)
    a1, a2 = (p.predict_action(obs, world_history=np.stack([h, h])) for p in (p1, p2))
    np.testing.assert_allclose(a2, a1, atol=0.05 if mode == "lora" else 1e-3)  # bf16 autocast: batch-dependent rounding
    if mode == "frozen_vision":  # the same FSDP run reading the vision-feature cache: the same curve
        _fsdp_with_the_vision_cache_equals_the_live_tower(data, tmp_path, run)


def _fsdp_with_the_vision_cache_equals_the_live_tower(data, tmp_path, live_run: Path):
    """`--vision-cache` under FSDP2 (the tower is frozen and wrapped with the trained parts; its outputs come
    from the cache on both ranks): the loss curve of the live-tower run of the same flags."""
    from vla_core.cli import main

    assert main(["vision-cache", "--preset", "tiny", "--dataset", data["dataset"], "--policy.finetune",
                 "frozen_vision", "--cache-root", str(tmp_path / "vcache")]) == 0
    path = next((tmp_path / "vcache").rglob("*.npy"))
    res = _launch_torchrun(data, tmp_path / "cached", COMMON + ["--optim.batch-size", "2", "--policy.finetune",
                                                                "frozen_vision", "--optim.steps", "3",
                                                                "--vision-cache", str(path)])
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    assert "FSDP2 over 2 processes" in res.stdout and "vision tower outputs read from" in res.stdout
    got, want = _losses(tmp_path / "cached" / RUN), _losses(live_run)
    assert [r[0] for r in got] == [r[0] for r in want] and len(got) == 3
    np.testing.assert_allclose([r[1] for r in got], [r[1] for r in want], rtol=1e-4)
