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
to ~1e-6 relative, not bit-exact, and only of what that rounding cannot change much (`assert_same_training`):
the gradients of step 1 (computed from identical weights and data) everywhere, and Adam's updates only where
they are well conditioned. Adam's first update is lr * g / (|g| + eps): where a gradient is ~eps (1e-8) the
update is anything in (-lr, lr) for ~1e-9 of rounding noise, and one such element out of 8192 once failed a
whole-tensor comparison under load. Those elements are left out of the update comparisons, not given a
looser tolerance; the gradient comparison still covers them.
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
LAUNCH_TIMEOUT_S = 600

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
    # a guard against a hung process group, not a speed check (the launch: ~40 s on an idle 2-core machine; the
    # whole test took up to 3.5 min at load average 15)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)


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

    # the gradients of step 1, Adam's update of step 1 and the weights after the last step (where well defined)
    assert_same_training(run_1, run_2, cfg, STEPS)

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
    return _initial_state(cfg)[0]


def _initial_state(cfg) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The trained tensors before step 1 and the optimizer's parameter names in the order its state_dict
    numbers them (the policy and its AdamW are rebuilt the way the loop builds them)."""
    from vla_core.train.checkpoint import trained_state_dict
    from vla_core.train.loop import build_optimizer, build_policy, prepare_run

    setup = prepare_run(cfg)
    policy = build_policy(setup.cfg, setup.stats, setup.cache)
    name_of = {id(p): n for n, p in policy.named_parameters()}
    order = [name_of[id(p)] for g in build_optimizer(policy, setup.cfg, fused=False).param_groups for p in g["params"]]
    return {k: v.clone() for k, v in trained_state_dict(policy).items()}, order


# Tolerances of "several processes == one process with the same global batch" (assert_same_training).
# GRAD_TOL: step 1's gradients come from identical weights and data and differ only by the order of float
# reductions: measured <= 1e-6 of each tensor's largest gradient, checked at 1e-5 of it. A wrong weighting of
# the ranks' losses changes them by percents (the ranks' shares of valid terms differ by ~10 %), and a missing
# all-reduce by tens of percents, so this is the check that catches loss-weighting bugs: Adam's first update
# ~ lr * sign(g) hardly sees a gradient's scale.
GRAD_TOL = 1e-5
# Later gradients are computed at weights that already differ in the ill-conditioned elements below (measured
# <= 5e-5 of the tensor's largest gradient): used only to decide which elements are well conditioned.
LATER_GRAD_TOL = 1e-3
# Adam's update where a gradient error dg moves it by at most UPDATE_TOL * lr (see _well_conditioned) must agree
# to that plus the float32 rounding of the weights (measured: 1 ulp).
UPDATE_TOL = 1e-3


def _well_conditioned(denom: torch.Tensor, dg: float, eps: float) -> torch.Tensor:
    """Elements where Adam's step lr * m / (denom + eps) moves by at most UPDATE_TOL * lr when the gradient moves
    by dg: d(g / (|g| + eps)) / dg = eps / (|g| + eps)^2, so |g| >= sqrt(eps * dg / UPDATE_TOL) bounds it, and
    |g| >= 10 dg keeps the sign (at step 1 denom = |g|; later, denom = sqrt(v_hat), the gradients' RMS)."""
    return denom >= max(10 * dg, (eps * dg / UPDATE_TOL) ** 0.5)


def _adam_gradients(run: Path, steps: int, order: list[str], beta1: float) -> list[dict[str, torch.Tensor]]:
    """The (clipped) gradient of each optimizer step 1..steps, read back from AdamW's first moment in the
    checkpoint of every step: m_s = beta1 m_(s-1) + (1 - beta1) g_s (needs --ckpt-every 1, --keep-checkpoints
    >= steps)."""
    grads, prev = [], None
    for s in range(1, steps + 1):
        state = torch.load(run / "checkpoints" / f"step_{s:07d}" / "train_state.pt", weights_only=False)["optimizer"]["state"]
        m = {order[int(i)]: v["exp_avg"] for i, v in state.items()}
        grads.append({k: (v - beta1 * prev[k]) / (1 - beta1) if prev else v / (1 - beta1) for k, v in m.items()})
        prev = m
    return grads


def assert_same_training(run_1: Path, run_2: Path, cfg, steps: int, extra_weights: tuple[str, ...] = ()) -> None:
    """run_2 (several processes) computed the same optimizer steps as run_1 (one process, the same global
    batch), compared where that is well defined under float reordering:
    - step 1's gradients, every element, to GRAD_TOL of each tensor's largest gradient;
    - step 1's update, on the elements whose update is well conditioned, to UPDATE_TOL * lr (+ rounding);
    - the weights after `steps` (and `extra_weights` files such as ema.safetensors), on the elements well
      conditioned at every step, to UPDATE_TOL * the sum of the learning rates (+ rounding).
    Both runs need a checkpoint after every step."""
    init, order = _initial_state(cfg)
    ck = lambda run, s: run / "checkpoints" / f"step_{s:07d}"  # noqa: E731
    groups = torch.load(ck(run_1, 1) / "train_state.pt", weights_only=False)["optimizer"]["param_groups"]
    beta1, beta2 = groups[0]["betas"]
    eps = groups[0]["eps"]
    lrs = [r["lr"] for r in read_jsonl(run_1 / "train_log.jsonl")][:steps]  # the new modules' lr of each step
    assert len(lrs) == steps, lrs
    lr_scale = {order[int(i)]: g["lr_scale"] for g in groups for i in g["params"]}  # the backbone's groups: scaled
    g1, g2 = _adam_gradients(run_1, steps, order, beta1), _adam_gradients(run_2, steps, order, beta1)
    assert g1[0].keys() == g2[0].keys() == set(order)

    # step 1's gradients: every element (a tensor whose gradient is all zero must stay so)
    nonzero = [k for k in order if float(g1[0][k].abs().max()) > 0]
    assert len(nonzero) > 50, len(nonzero)  # most tensors got a gradient (the comparison is not vacuous)
    for k in order:
        scale = float(g1[0][k].abs().max())
        torch.testing.assert_close(g2[0][k], g1[0][k], rtol=0, atol=GRAD_TOL * scale,
                                   msg=lambda m, k=k: f"step-1 gradient of {k}: {m}")

    # step 1's update (lr * g / (|g| + eps) - lr * wd * w) where well conditioned
    w1 = load_file(str(ck(run_1, 1) / "model.safetensors"))
    w2 = load_file(str(ck(run_2, 1) / "model.safetensors"))
    assert w1.keys() == w2.keys() == init.keys()
    rounding = lambda w: 2 * torch.finfo(torch.float32).eps * max(1.0, float(w.abs().max()))  # noqa: E731
    compared = total = 0
    for k in order:
        g, scale = g1[0][k], float(g1[0][k].abs().max())
        ok = _well_conditioned(g.abs(), GRAD_TOL * scale, eps) & (g != 0)
        compared, total = compared + int(ok.sum()), total + int((g != 0).sum())
        u1, u2 = (w1[k] - init[k])[ok], (w2[k] - init[k])[ok]
        lr = lrs[0] * lr_scale[k]
        torch.testing.assert_close(u2, u1, rtol=0, atol=UPDATE_TOL * lr + rounding(init[k]),
                                   msg=lambda m, k=k: f"step-1 update of {k} (well-conditioned elements): {m}")
    assert compared > 0.8 * total, (compared, total)  # the ill-conditioned elements are few
    for k in init.keys() - set(order):  # saved buffers (e.g. the Prophet's latent normalisation)
        torch.testing.assert_close(w2[k], w1[k], rtol=0, atol=0)

    # the weights after the last step, on elements well conditioned at every step (Adam's denominator
    # sqrt(v_hat) large against the gradients' error at that step, v read from the run's checkpoints)
    ok = {k: torch.ones_like(init[k], dtype=torch.bool) for k in order}
    for s in range(1, steps + 1):
        state = torch.load(ck(run_1, s) / "train_state.pt", weights_only=False)["optimizer"]["state"]
        tol = GRAD_TOL if s == 1 else LATER_GRAD_TOL
        for i, v in state.items():
            k = order[int(i)]
            ok[k] &= _well_conditioned((v["exp_avg_sq"] / (1 - beta2 ** s)).sqrt(),
                                       tol * float(g1[s - 1][k].abs().max()), eps)
    n_ok = sum(int(m.sum()) for m in ok.values())
    assert n_ok > 0.8 * total, (n_ok, total)
    for name in ("model.safetensors", *extra_weights):
        f1, f2 = (load_file(str(ck(r, steps) / name)) for r in (run_1, run_2))
        assert f1.keys() == f2.keys()
        for k in f1:
            if k not in ok:
                torch.testing.assert_close(f2[k], f1[k], rtol=0, atol=0)
                continue
            atol = UPDATE_TOL * sum(lrs) * lr_scale[k] + rounding(f1[k])
            torch.testing.assert_close(f2[k][ok[k]], f1[k][ok[k]], rtol=0, atol=atol,
                                       msg=lambda m, k=k: f"{name} {k} after step {steps} (well-conditioned elements): {m}")


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
