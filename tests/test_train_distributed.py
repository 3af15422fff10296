"""Distributed training on CPU: a 2-process DDP run (gloo) equals one process with the same global batch.

The DDP run is launched the way a user launches it, `accelerate launch --multi_gpu --num_processes 2 -m
vla_core.cli train ...` (on a CPU-only machine accelerate's multi-GPU launcher starts torchrun workers and
the Accelerator picks the gloo backend; note that `accelerate launch --cpu` would start ONE process).

Why this configuration is comparable exactly (in exact arithmetic):
- MSE head, experiment E2 (predicted memory): the training forward draws no random numbers (no dropout
  anywhere in the tiny backbone or the new modules; the flow head would draw its noise from each rank's
  own stream `seed + rank`, which a single process cannot reproduce; the random/shuffle memory modes are
  rollout ablations, never used in training);
- the sampler gives optimizer step s the same samples in both runs (rank r takes the r-th slice of the
  global batch), see test_sampler_steps_equal_across_processes_and_accumulation;
- the action and world losses are masked means, and the fixture's episodes are short (10-16 frames,
  chunk 4, horizon 2), so the two ranks' micro-batches hold different numbers of valid terms: the loop
  weights each micro-batch by its share of the global count (`global_loss_weights`), which this test
  checks is needed (the counts differ) and sufficient (the curves agree).
Float reductions happen in another order (two half batches, gloo's all-reduce), so the comparison is
to ~1e-6 relative, not bit-exact.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from test_train_loop import _losses, tiny_cfg
from vla_core.train.config import get_preset
from vla_core.train.loop import train
from vla_core.train.sampler import ResumableBatchSampler
from vla_core.utils import read_jsonl

STEPS = 4
RUN = Path("E2") / "tiny_m2_delta_mse" / "seed0"

# Installed into every Python process of the launched run (PYTHONPATH): records what each rank opens for
# writing, renames, creates or deletes under WMVLA_AUDIT_ROOT, via audit hooks (PEP 578).
SITECUSTOMIZE = r'''
import atexit, json, os, sys
_root, _out = os.environ.get("WMVLA_AUDIT_ROOT"), os.environ.get("WMVLA_AUDIT_OUT")
if _root and _out and os.environ.get("RANK") is not None:
    _writes = set()
    _WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

    def _note(path):
        try:
            p = os.path.abspath(os.fsdecode(path))
        except TypeError:
            return
        if p.startswith(_root):
            _writes.add(p)

    def _hook(event, args):
        if event == "open":
            path, mode, flags = args
            if isinstance(path, int):
                return
            if (mode is not None and any(c in mode for c in "wax+")) or (mode is None and flags & _WRITE_FLAGS):
                _note(path)
        elif event in ("os.rename", "os.replace"):
            _note(args[0]); _note(args[1])
        elif event in ("os.mkdir", "os.remove", "os.rmdir", "shutil.rmtree", "os.truncate"):
            _note(args[0])

    sys.addaudithook(_hook)

    @atexit.register
    def _dump():
        with open(os.path.join(_out, "writes-rank%s.json" % os.environ["RANK"]), "w") as f:
            json.dump(sorted(_writes), f)
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch_ddp(data, out_root: Path, audit_dir: Path, extra: list[str]) -> subprocess.CompletedProcess:
    site = audit_dir / "site"
    site.mkdir(parents=True)
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        [str(site)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])),
        "WMVLA_AUDIT_ROOT": str(out_root.resolve()), "WMVLA_AUDIT_OUT": str(audit_dir)}
    accelerate = Path(sys.executable).parent / "accelerate"
    cmd = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
           "-m", "vla_core.cli", "train", "--preset", "tiny", "--dataset", data["dataset"], "--latents", data["latents"],
           "--out-root", str(out_root), *extra]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)


def _valid_counts(cfg, batch_size: int, world_size: int, steps: int) -> np.ndarray:
    """[steps, ranks] valid action chunk steps in each rank's micro-batch (what the loss averages over)."""
    from vla_core.data.samples import ChunkDataset
    from vla_core.train.loop import prepare_run

    setup = prepare_run(cfg)
    p = setup.cfg.policy
    ds = ChunkDataset(setup.ds, chunk_size=p.chunk_size, history=p.world_history, horizon=p.world_horizon,
                      keys=setup.cfg.keys, episodes=setup.train_episodes, load_images=False)
    counts = np.zeros((steps, world_size), dtype=int)
    for r in range(world_size):
        sampler = ResumableBatchSampler(np.arange(len(ds)), batch_size, seed=cfg.seed, rank=r, world_size=world_size,
                                        num_batches=steps)
        for s, batch in enumerate(sampler):
            counts[s, r] = sum(int(ds[i]["action_mask"].sum()) for i in batch)
    return counts


def test_ddp_two_processes_equal_one_process_with_the_same_global_batch(data, tmp_path):
    common = ["--optim.steps", str(STEPS), "--log-every", "1", "--val-every", "0", "--ckpt-every", "1",
              "--keep-checkpoints", "10", "--mean-baseline-check", "off"]
    t0 = time.perf_counter()
    res = _launch_ddp(data, tmp_path / "ddp", tmp_path / "audit", common + ["--optim.batch-size", "2"])
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    assert "x 2 processes" in res.stdout, res.stdout[-2000:]  # really two processes, not one
    t_ddp = time.perf_counter() - t0

    base = get_preset("tiny")
    cfg = tiny_cfg(data, tmp_path / "single", optim=dataclasses.replace(base.optim, steps=STEPS, batch_size=4),
                   log_every=1, val_every=0, ckpt_every=1, keep_checkpoints=10, mean_baseline_check="off")
    single = train(cfg)
    run_1, run_2 = Path(single["run_dir"]), tmp_path / "ddp" / RUN

    # the two ranks' halves differ in valid terms: an unweighted mean of the two means would differ
    counts = _valid_counts(cfg, batch_size=2, world_size=2, steps=STEPS)
    assert (counts[:, 0] != counts[:, 1]).any(), counts

    # same loss curve (the logged loss is the global batch's, not rank 0's) and gradient norm
    l1, l2 = _losses(run_1), _losses(run_2)
    assert [r[0] for r in l1] == [r[0] for r in l2] == list(range(1, STEPS + 1))
    np.testing.assert_allclose(np.array(l2)[:, 1:], np.array(l1)[:, 1:], rtol=2e-5, atol=1e-7)

    # the parameter update of step 1 (Adam: ~lr * sign(grad), so this also compares the gradients' signs
    # and relative sizes) and the weights after the last step
    init = _initial_trainable(cfg)
    for step in (1, STEPS):
        w1 = load_file(str(run_1 / "checkpoints" / f"step_{step:07d}" / "model.safetensors"))
        w2 = load_file(str(run_2 / "checkpoints" / f"step_{step:07d}" / "model.safetensors"))
        assert w1.keys() == w2.keys()
        worst = max(float((w1[k] - w2[k]).abs().max()) for k in w1)
        assert worst < 5e-5, (step, worst)
        if step == 1:
            lr1 = read_jsonl(run_1 / "train_log.jsonl")[0]["lr"]
            moved = [k for k in init if float((w1[k] - init[k]).abs().max()) > 0.5 * lr1]
            assert len(moved) > 50  # step 1 really moved most tensors by ~lr (so the comparison is not vacuous)
            for k in moved:
                torch.testing.assert_close(w2[k] - init[k], w1[k] - init[k], atol=5e-6, rtol=1e-3)

    # validation on rank 0 with the DDP-trained weights agrees too
    v1, v2 = read_jsonl(run_1 / "val_log.jsonl"), read_jsonl(run_2 / "val_log.jsonl")
    assert len(v1) == len(v2) == 1
    assert v2[0]["action_mse"] == pytest.approx(v1[0]["action_mse"], rel=1e-4)

    # only rank 0 wrote into the run folder (rank 1 wrote nothing at all under the output root)
    writes = {r: json.loads((tmp_path / "audit" / f"writes-rank{r}.json").read_text()) for r in (0, 1)}
    assert writes[1] == [], writes[1][:10]
    # (the hook works: rank 0's list has the log and the checkpoint renames; safetensors writes from Rust,
    # which Python's audit hooks do not see, but it is inside the renamed folder)
    assert any(p.endswith("train_log.jsonl") for p in writes[0])
    assert any(p.endswith(f"checkpoints/step_{STEPS:07d}") for p in writes[0])
    assert not list((run_2 / "checkpoints").glob(".tmp-*"))
    train_state = torch.load(run_2 / "checkpoints" / f"step_{STEPS:07d}" / "train_state.pt", weights_only=False)
    assert train_state["world_size"] == 2 and len(train_state["rng"]) == 2  # both ranks' RNG streams

    # the DDP checkpoint loads in one process through evaluation's rebuild path and acts like the
    # single-process one
    pol_2 = assert_checkpoints_act_alike(run_1, run_2)
    assert pol_2.rollout_memory == "pred" and pol_2.describe()["experiment"] == "E2"
    print(f"ddp run {t_ddp:.1f} s")


def assert_checkpoints_act_alike(run_1, run_2, atol: float = 1e-3):
    """Both checkpoints rebuilt through evaluation's path (load_checkpoint_policy) give the same action chunks
    for the same two observations; returns the second policy."""
    from vla_core.eval.checkpoint_policy import load_checkpoint_policy
    from vla_core.policy.tiny import random_observation

    pol_1, pol_2 = (load_checkpoint_policy(r, None, "cpu", seed=0, print_prompt=False) for r in (run_1, run_2))
    obs = [random_observation(pol_2.policy.cfg, seed=i, image_hw=32) for i in range(2)]
    for p in (pol_1, pol_2):
        for slot in range(2):
            p.reset(slot, "task", "pick up the bowl")
    a1 = pol_1.act([0, 1], obs, ["pick up the bowl"] * 2)
    a2 = pol_2.act([0, 1], obs, ["pick up the bowl"] * 2)
    for x, y in zip(a1, a2):
        np.testing.assert_allclose(y, x, atol=atol)
    return pol_2


def _initial_trainable(cfg) -> dict[str, torch.Tensor]:
    """The trainable weights before step 1 (the policy is rebuilt from the same seed)."""
    from vla_core.train.checkpoint import trained_state_dict
    from vla_core.train.loop import build_policy, prepare_run

    setup = prepare_run(cfg)
    return trained_state_dict(build_policy(setup.cfg, setup.stats, setup.cache))


def test_grad_accumulation_equals_the_full_batch(data, tmp_path):
    """One process, 2 micro-batches of 2 == one batch of 4 (the masked losses are weighted by counts)."""
    base = get_preset("tiny")
    runs = {}
    for name, bs, accum in (("full", 4, 1), ("accum", 2, 2)):
        cfg = tiny_cfg(data, tmp_path / name, optim=dataclasses.replace(base.optim, steps=3, batch_size=bs,
                                                                         grad_accum=accum),
                       log_every=1, val_every=0, ckpt_every=3, mean_baseline_check="off")
        runs[name] = Path(train(cfg)["run_dir"])
    np.testing.assert_allclose(np.array(_losses(runs["accum"]))[:, 1:], np.array(_losses(runs["full"]))[:, 1:],
                               rtol=2e-5, atol=1e-7)
    wa = load_file(str(runs["accum"] / "checkpoints" / "step_0000003" / "model.safetensors"))
    wf = load_file(str(runs["full"] / "checkpoints" / "step_0000003" / "model.safetensors"))
    assert max(float((wa[k] - wf[k]).abs().max()) for k in wf) < 5e-5


def test_sampler_steps_equal_across_processes_and_accumulation():
    """Optimizer step s sees the same samples with P processes x A accumulation as one process with a
    batch of b x P x A, also across epoch boundaries (epochs end between optimizer steps)."""
    idx = np.arange(100, 151)  # 51 samples: not a multiple of any step size below
    steps = 25  # several epochs
    for b, world, accum in ((2, 2, 1), (2, 1, 2), (1, 2, 3), (3, 2, 2)):
        ref = list(ResumableBatchSampler(idx, b * world * accum, seed=5, num_batches=steps))
        per_rank = [list(ResumableBatchSampler(idx, b, seed=5, rank=r, world_size=world, grad_accum=accum,
                                               num_batches=steps * accum)) for r in range(world)]
        for s in range(steps):
            got = [i for r in range(world) for m in range(accum) for i in per_rank[r][s * accum + m]]
            assert sorted(got) == sorted(ref[s]), (b, world, accum, s)
            assert len(set(got)) == len(got)


def test_fsdp_and_deepspeed_launches_are_refused():
    """accelerate's own FSDP/DeepSpeed configs must fail loudly (the loop shards the model itself with
    `--distributed fsdp`, tests/test_train_fsdp.py; a plugin would wrap it a second time), pointing at that
    flag. (On CPU accelerate ignores FSDP configs and runs DDP, so this is checked on the decision function.)"""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from vla_core.train.loop import _refuse_sharded_training
    from vla_core.utils import WmvlaError

    for kind in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        with pytest.raises(WmvlaError, match=f"does not support {kind.value}(.|\n)*--distributed fsdp"):
            _refuse_sharded_training(SimpleNamespace(distributed_type=kind))
    for kind in (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU):
        _refuse_sharded_training(SimpleNamespace(distributed_type=kind))
