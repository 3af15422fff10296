"""End-to-end tests of `wmvla train` on a tiny LIBERO-like dataset (CPU, seconds each).

- exact resume: stopping (or SIGKILL) mid-run and starting again gives the same loss curve and weights
  as an uninterrupted run;
- run folders are never overwritten: finished runs are skipped, a different config is refused;
- the first-steps check fires on the earlier attempt's bugs (gate skipped while closed, a trainable
  parameter missing from the optimizer);
- checkpoints hold no frozen base weights and reload into a policy with identical predictions.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vla_core.train.config import OptimConfig, get_preset
from vla_core.train.loop import train
from vla_core.utils import WmvlaError, read_jsonl



def tiny_cfg(data, out_root, **changes):
    cfg = get_preset("tiny")
    cfg = dataclasses.replace(cfg, dataset=data["dataset"], latents=data["latents"], out_root=str(out_root))
    return dataclasses.replace(cfg, **changes)


def _losses(run_dir: Path) -> list[tuple]:
    return [(r["step"], r["loss"], r["action_loss"], r["world_loss"], r["grad_norm"]) for r in
            read_jsonl(run_dir / "train_log.jsonl")]


def _weights(run_dir: Path) -> dict:
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    return load_file(str(run_dir / "checkpoints" / latest / "model.safetensors"))


def test_resume_after_stop_equals_uninterrupted(data, tmp_path):
    # flow head (random noise every step) + EMA: every piece of state must be restored exactly
    changes = dict(policy=dataclasses.replace(get_preset("tiny").policy, head="flow"),
                   optim=OptimConfig(steps=10, batch_size=4, lr=1e-3, warmup_steps=2, ema_decay=0.9),
                   log_every=1, ckpt_every=5, val_every=5)
    full = train(tiny_cfg(data, tmp_path / "a", **changes))
    first = train(tiny_cfg(data, tmp_path / "b", stop_after=5, **changes))
    assert first["finished"] is False
    run_b = Path(first["run_dir"])
    assert not (run_b / "done.json").exists()
    second = train(tiny_cfg(data, tmp_path / "b", **changes))
    assert second["finished"] and second["step"] == 10
    run_a = Path(full["run_dir"])
    assert _losses(run_a) == _losses(run_b)  # bit-identical curve, no duplicated lines
    assert [r["step"] for r in read_jsonl(run_b / "train_log.jsonl")] == list(range(1, 11))
    wa, wb = _weights(run_a), _weights(run_b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    ea = load_file(str(run_a / "checkpoints" / "step_0000010" / "ema.safetensors"))
    eb = load_file(str(run_b / "checkpoints" / "step_0000010" / "ema.safetensors"))
    assert all(torch.equal(ea[k], eb[k]) for k in ea)
    assert read_jsonl(run_a / "val_log.jsonl") == read_jsonl(run_b / "val_log.jsonl")


def test_resume_after_sigkill(data, tmp_path):
    """A real kill -9 while training: rerunning the same command continues the same curve."""
    args = [sys.executable, "-m", "vla_core.cli", "train", "--preset", "tiny", "--dataset", data["dataset"],
            "--latents", data["latents"], "--optim.steps", "24", "--log-every", "1", "--ckpt-every", "3",
            "--val-every", "0", "--keep-checkpoints", "100"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ref = subprocess.run(args + ["--out-root", str(tmp_path / "ref")], env=env, capture_output=True, text=True)
    assert ref.returncode == 0, ref.stderr[-3000:]
    out = tmp_path / "killed"
    proc = subprocess.Popen(args + ["--out-root", str(out)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    ckpts = out / "E2" / "tiny_m2_delta_mse" / "seed0" / "checkpoints"
    deadline = time.time() + 120
    while time.time() < deadline and not (ckpts / "step_0000006").exists() and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    run = ckpts.parent
    assert not (run / "done.json").exists(), "the run finished before it could be killed; make it longer"
    res = subprocess.run(args + ["--out-root", str(out)], env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resuming" in res.stdout
    ref_run = tmp_path / "ref" / "E2" / "tiny_m2_delta_mse" / "seed0"
    assert _losses(ref_run) == _losses(run)
    wa, wb = _weights(ref_run), _weights(run)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_never_overwrites(data, tmp_path):
    cfg = tiny_cfg(data, tmp_path, optim=OptimConfig(steps=4, batch_size=4, lr=1e-3, warmup_steps=1),
                   ckpt_every=4, val_every=0)
    s1 = train(cfg)
    run = Path(s1["run_dir"])
    assert run == tmp_path / "E2" / "tiny_m2_delta_mse" / "seed0"
    mtime = (run / "checkpoints" / "step_0000004" / "model.safetensors").stat().st_mtime_ns
    s2 = train(cfg)  # finished: skipped, nothing rewritten
    assert s2 == s1
    assert (run / "checkpoints" / "step_0000004" / "model.safetensors").stat().st_mtime_ns == mtime
    # same run folder, different settings: refused (unfinished runs are compared too)
    (run / "done.json").unlink()
    with pytest.raises(WmvlaError, match="different configuration"):
        train(dataclasses.replace(cfg, optim=OptimConfig(steps=4, batch_size=4, lr=5e-4, warmup_steps=1)))
    # other experiments / heads / seeds get their own folders
    s3 = train(dataclasses.replace(cfg, seed=1, experiment="E0"))
    assert Path(s3["run_dir"]) == tmp_path / "E0" / "tiny_m2_delta_mse" / "seed1"
    # a folder that is not a run is never written into
    bad = tmp_path / "E1" / "tiny_m2_delta_mse" / "seed0"
    bad.mkdir(parents=True)
    (bad / "notes.txt").write_text("mine")
    with pytest.raises(WmvlaError, match="not a wmvla run folder"):
        train(dataclasses.replace(cfg, experiment="E1"))


def test_first_steps_check_fires_on_closed_gate_shortcut(data, tmp_path, monkeypatch):
    """LESSONS: `if |tanh(gate)| < 1e-6: return h` starves the gate of gradient; training must fail loudly."""
    from vla_core.policy import memory as memory_mod

    original = memory_mod.GatedMemoryAttention.forward

    def buggy(self, h, memory, **kwargs):
        if torch.tanh(self.gate).abs().max() < 1e-6:
            return h, {"gate": torch.tanh(self.gate.detach()).abs().mean(), "attn_entropy": torch.tensor(0.0)}
        return original(self, h, memory, **kwargs)

    monkeypatch.setattr(memory_mod.GatedMemoryAttention, "forward", buggy)
    cfg = tiny_cfg(data, tmp_path, optim=OptimConfig(steps=6, batch_size=4, lr=1e-3, warmup_steps=1), val_every=0)
    with pytest.raises(WmvlaError, match=r"memory\.gate"):
        train(cfg)


def test_first_steps_check_fires_on_parameter_missing_from_optimizer(data, tmp_path, monkeypatch):
    """LESSONS: LoRA adapters / ACT rows were never given to the optimizer."""
    from vla_core.train import loop

    original = loop.build_optimizer

    def forgetful(policy, cfg, fused, plan=None):
        opt = original(policy, cfg, fused, plan)
        act = policy.backbone.act_embedding.act_weight
        for g in opt.param_groups:
            g["params"] = [p for p in g["params"] if p is not act]
        return opt

    monkeypatch.setattr(loop, "build_optimizer", forgetful)
    with pytest.raises(WmvlaError, match="act_weight"):
        train(tiny_cfg(data, tmp_path))


def test_checkpoint_has_no_frozen_weights_and_reloads_identically(data, tmp_path):
    from vla_core.train.checkpoint import load_policy

    policy_cfg = dataclasses.replace(get_preset("tiny").policy, finetune="frozen_vision")
    cfg = tiny_cfg(data, tmp_path, policy=policy_cfg, optim=OptimConfig(steps=6, batch_size=4, lr=1e-3, warmup_steps=1),
                   val_every=6, ckpt_every=6)
    summary = train(cfg)
    run = Path(summary["run_dir"])
    ckpt = run / "checkpoints" / "step_0000006"
    saved = load_file(str(ckpt / "model.safetensors"))
    assert saved and not any(".visual." in k for k in saved), "frozen vision tower weights were saved"
    assert any(k.endswith("act_weight") for k in saved) and any(k.startswith("prophet.") for k in saved)
    assert "prophet.latent_mean" in saved  # buffers the policy needs travel with the weights
    for f in ("config.json", "norm_stats.json", "world_spec.json", "meta.json", "train_state.pt",
              "tokenizer/tokenizer.json"):
        assert (ckpt / f).exists(), f
    world = json.loads((ckpt / "world_spec.json").read_text())
    assert world["spec"]["window"] == 2 and world["spec"]["encoder"] == "tiny" and world["spec"]["dim"] == 64

    policy, rcfg = load_policy(run, device="cpu")
    assert rcfg.experiment == "E2" and rcfg.policy.finetune == "frozen_vision"
    # identical policy: the reloaded one reproduces the final validation exactly
    from vla_core.train.loop import _val_data, prepare_run, TrainCollate, WorldLatents, validate

    setup = prepare_run(rcfg)
    collate = TrainCollate(policy.processor, WorldLatents(rcfg.latents))
    val = _val_data(rcfg, setup.ds, setup, collate, policy, setup.stats)
    rec = validate(policy, val, seed=rcfg.seed + 12345)
    logged = read_jsonl(run / "val_log.jsonl")[-1]
    assert rec["action_mse"] == pytest.approx(logged["action_mse"], rel=1e-6)
    assert rec["world_loss"] == pytest.approx(logged["world_loss"], rel=1e-6)

    # mismatches are refused with what differs
    with pytest.raises(WmvlaError, match="policy.backbone"):
        load_policy(run, device="cpu", expect={"policy": {"backbone": "Qwen/Qwen3-VL-2B-Instruct"}})
    meta = json.loads((ckpt / "meta.json").read_text())
    meta["frozen"]["sum_sq"] *= 1.5
    (ckpt / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(WmvlaError, match="frozen base-model weights"):
        load_policy(run, device="cpu")


def test_latent_cache_mismatch_is_refused(data, tmp_path):
    from vla_core.world.encoder import WorldEncoderSpec

    cfg = tiny_cfg(data, tmp_path, world=WorldEncoderSpec(encoder="tiny", window=4, image_size=32))
    with pytest.raises(WmvlaError, match="window"):
        train(cfg)
