"""An evaluation pod fetches only what evaluation reads (issue 24), against a real SeaweedFS with the tiny model:
the newest checkpoint's EMA + buffers files and the small files, not model.safetensors, not the optimizer state
(train_state.pt), not older checkpoints; verified against the checkpoint's manifest; the policy loaded from that
copy is the EMA policy training validated, and what it cannot do (resume, raw weights) is refused clearly."""

from __future__ import annotations

import dataclasses
import os
import shutil
import uuid
from pathlib import Path

os.environ.setdefault("MUJOCO_GL", "egl")
os.environ.setdefault("PYOPENGL_PLATFORM", os.environ["MUJOCO_GL"])

import pytest
import torch
from safetensors.torch import load_file, save_file

from vla_core.experiments.cells import checkpoint_objects, fetch_checkpoint_for_eval
from vla_core.storage import StorageError, open_store, publish_run
from vla_core.train.checkpoint import load_policy, load_trained_weights
from vla_core.train.config import OptimConfig, get_preset
from vla_core.train.loop import train
from vla_core.utils import WmvlaError, read_jsonl


@pytest.fixture(scope="module")
def trained(bucket, s3_server, data, tmp_path_factory):
    """One tiny E2 run with EMA, checkpoints at steps 3 and 6 (both kept), uploaded as training does."""
    env = s3_server.env()
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        out = tmp_path_factory.mktemp("train")
        remote = f"{bucket}/run"
        cfg = dataclasses.replace(get_preset("tiny"), dataset=data["dataset"], latents=data["latents"],
                                  out_root=str(out), remote=remote,
                                  optim=OptimConfig(steps=6, batch_size=4, lr=1e-3, warmup_steps=1, ema_decay=0.9),
                                  log_every=1, ckpt_every=3, val_every=6, keep_checkpoints=2)
        summary = train(cfg)
    finally:
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    return {"run": Path(summary["run_dir"]), "remote": remote}


def test_evaluation_fetches_only_the_evaluated_weights_and_loads_the_ema_policy(s3_env, trained, tmp_path, capsys):
    run, remote = trained["run"], trained["remote"]
    assert open_store(remote).exists("checkpoints/step_0000003/train_state.pt")  # both checkpoints are there
    local = tmp_path / "eval-pod"
    got = fetch_checkpoint_for_eval(remote, local)
    ckpt = local / "checkpoints" / "step_0000006"
    files = {p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file()}
    assert not any("step_0000003" in f for f in files)  # not the older checkpoint
    assert not (ckpt / "train_state.pt").exists() and not (ckpt / "model.safetensors").exists()
    for f in ("ema.safetensors", "buffers.safetensors", "config.json", "norm_stats.json", "meta.json",
              "world_spec.json", "tokenizer/tokenizer.json"):
        assert (ckpt / f).is_file(), f
    full = run / "checkpoints" / "step_0000006"
    full_bytes = sum(p.stat().st_size for p in full.rglob("*") if p.is_file())
    ckpt_bytes = sum(p.stat().st_size for p in ckpt.rglob("*") if p.is_file() and p.name != "_manifest.json")
    assert got["bytes"] >= ckpt_bytes and ckpt_bytes < full_bytes - (full / "train_state.pt").stat().st_size

    capsys.readouterr()
    policy, cfg = load_policy(local, device="cpu")
    assert "loaded the EMA weights" in capsys.readouterr().out
    reference, _ = load_policy(run, device="cpu")  # the whole checkpoint on the training pod
    a, b = policy.state_dict(), reference.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the EMA weights are the ones training validated at step 6 (validation swaps the EMA in)
    from vla_core.train.loop import TrainCollate, WorldLatents, _val_data, prepare_run, validate

    setup = prepare_run(cfg)
    val = _val_data(cfg, setup.ds, setup, TrainCollate(policy.processor, WorldLatents(cfg.latents)), policy,
                    setup.stats)
    rec = validate(policy, val, seed=cfg.seed + 12345)
    assert rec["action_mse"] == pytest.approx(read_jsonl(run / "val_log.jsonl")[-1]["action_mse"], rel=1e-6)

    # what the copy cannot serve is refused, saying why
    with pytest.raises(WmvlaError, match="model.safetensors missing.*only what an evaluation reads"):
        load_trained_weights(policy, ckpt, use_ema=False)


def test_a_buffers_file_that_does_not_fit_is_refused(s3_env, trained, tmp_path):
    local = tmp_path / "copy"
    shutil.copytree(trained["run"], local)
    ckpt = local / "checkpoints" / "step_0000006"
    buffers = load_file(str(ckpt / "buffers.safetensors"))
    assert "prophet.latent_mean" in buffers
    buffers.pop("prophet.latent_mean")
    save_file(buffers, str(ckpt / "buffers.safetensors"))
    with pytest.raises(WmvlaError, match=r"(?s)ema.safetensors, buffers.safetensors.*missing from the checkpoint.*prophet.latent_mean"):
        load_policy(local, device="cpu")


def test_a_corrupted_weights_object_is_refused_before_evaluating(s3_env, trained, tmp_path):
    uri = f"{trained['remote'].rsplit('/', 1)[0]}/corrupt-{uuid.uuid4().hex[:6]}"
    store = open_store(uri)
    for o in open_store(trained["remote"]).list():
        store.put_bytes(o.key, open_store(trained["remote"]).get_bytes(o.key))
    key = "checkpoints/step_0000006/ema.safetensors"
    data = bytearray(store.get_bytes(key))
    data[-1] ^= 0xFF  # same size, other bytes
    store.put_bytes(key, bytes(data))
    with pytest.raises(StorageError, match="ema.safetensors: corrupted object"):
        fetch_checkpoint_for_eval(uri, tmp_path / "eval-pod")
    assert not (tmp_path / "eval-pod" / "checkpoints" / "step_0000006" / "ema.safetensors").exists()

    store.delete("checkpoints/step_0000006/_manifest.json")  # an unfinished upload is not evaluated
    with pytest.raises(WmvlaError, match="no manifest"):
        checkpoint_objects(store)


def test_a_checkpoint_without_a_buffers_file_is_fetched_with_its_model_weights(s3_env, trained, tmp_path):
    """Checkpoints written before buffers.safetensors existed: model + EMA (still not the optimizer state)."""
    old = tmp_path / "old-run"
    shutil.copytree(trained["run"], old)
    ckpt = old / "checkpoints" / "step_0000006"
    (ckpt / "buffers.safetensors").unlink()
    uri = f"{trained['remote'].rsplit('/', 1)[0]}/old-{uuid.uuid4().hex[:6]}"
    publish_run(ckpt, f"{uri}/checkpoints/step_0000006")
    open_store(uri).put_bytes("checkpoints/latest", b"step_0000006\n")
    objects, _ = checkpoint_objects(open_store(uri))
    names = {o.key.rsplit("/", 1)[-1] for o in objects}
    assert {"model.safetensors", "ema.safetensors"} <= names and "train_state.pt" not in names
    fetch_checkpoint_for_eval(uri, tmp_path / "eval-pod")
    policy, _ = load_policy(tmp_path / "eval-pod", device="cpu")
    reference, _ = load_policy(trained["run"], device="cpu")
    a, b = policy.state_dict(), reference.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
