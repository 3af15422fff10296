"""Checkpoint uploads off the training step (vla_core.train.remote.CheckpointUploader) against a real SeaweedFS,
with the tiny model: training goes on while a checkpoint uploads, `latest` and the manifest come last, a failed
upload fails the training with the store's message, and a pod killed mid-upload leaves the previous checkpoint
whole and resumable. The uploads are frozen at exact objects by a loopback proxy (vla_core.storage.netproxy)
that holds the bytes of the first request naming a key, so nothing here depends on timing."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

os.environ.setdefault("MUJOCO_GL", "egl")
os.environ.setdefault("PYOPENGL_PLATFORM", os.environ["MUJOCO_GL"])

import pytest

from vla_core import env_names
from vla_core.storage import MANIFEST, open_store, pull_run
from vla_core.storage.netproxy import LatencyProxy
from vla_core.train.config import OptimConfig, get_preset
from vla_core.train.loop import train
from vla_core.train.remote import CheckpointUploader, CheckpointUploadFailed
from vla_core.utils import read_jsonl

BOUND_S = 300  # a bound on waiting for the training subprocess / thread, never an assertion on speed


@pytest.fixture
def gate(s3_server, monkeypatch):
    """The session's SeaweedFS behind a loopback proxy that the test can freeze; the process talks to the proxy."""
    with LatencyProxy(s3_server.port) as proxy:
        monkeypatch.setenv(env_names.AWS_ENDPOINT_URL, proxy.endpoint)
        yield proxy
        proxy.release()


def _cfg(data, out_root, remote, **changes):
    cfg = get_preset("tiny")
    return dataclasses.replace(cfg, dataset=data["dataset"], latents=data["latents"], out_root=str(out_root),
                               remote=remote, optim=OptimConfig(steps=6, batch_size=4, lr=1e-3, warmup_steps=1),
                               log_every=1, ckpt_every=3, val_every=0, keep_checkpoints=1, **changes)


def _keys(s3_server, uri: str) -> set[str]:
    """Object keys under uri, listed straight from the server (not through the frozen proxy)."""
    bucket, _, prefix = uri[len("s3://"):].partition("/")
    page = s3_server.client().list_objects_v2(Bucket=bucket, Prefix=prefix + "/")
    return {o["Key"][len(prefix) + 1:] for o in page.get("Contents", [])}


def _put(uri: str, key: str) -> bytes:
    """The request line of the PUT of `key` under uri: what the proxy freezes on."""
    return f"PUT /{uri[len('s3://'):]}/{key} ".encode()


def test_uploader_returns_at_once_and_writes_the_manifest_then_latest_last(s3, s3_server, gate, data, tmp_path):
    run = Path(train(_cfg(data, tmp_path, "", stop_after=3))["run_dir"])  # a real checkpoint, saved locally
    ckpt = run / "checkpoints" / "step_0000003"
    remote = f"{s3}/run"
    gate.hold_on(_put(remote, f"checkpoints/step_0000003/{MANIFEST}"))
    up = CheckpointUploader(run, remote, log=lambda *a: None, background=True)
    up.submit(ckpt)  # returns while the upload goes on
    assert gate.held.wait(BOUND_S)
    # frozen at the manifest: every file is there, neither the manifest nor `latest` is
    keys = _keys(s3_server, remote)
    assert {f"checkpoints/step_0000003/{p.relative_to(ckpt).as_posix()}"
            for p in ckpt.rglob("*") if p.is_file()} <= keys
    assert f"checkpoints/step_0000003/{MANIFEST}" not in keys and "checkpoints/latest" not in keys
    gate.release()
    up.wait()
    store = open_store(remote)
    assert store.get_bytes("checkpoints/latest") == b"step_0000003\n"
    res = pull_run(f"{remote}/checkpoints/step_0000003", tmp_path / "pulled")  # verified against the manifest
    assert res["complete"] and res["files"] == len([p for p in ckpt.rglob("*") if p.is_file()])
    assert up.uploads[0]["checkpoint"] == "step_0000003"


def test_a_failed_upload_is_raised_by_the_next_wait_with_the_stores_message(s3_env, data, tmp_path):
    run = Path(train(_cfg(data, tmp_path, "", stop_after=3))["run_dir"])
    up = CheckpointUploader(run, f"s3://no-such-bucket-{uuid.uuid4().hex[:6]}/run", log=lambda *a: None)
    up.submit(run / "checkpoints" / "step_0000003")
    with pytest.raises(CheckpointUploadFailed, match=r"step_0000003.*NoSuchBucket"):
        up.wait()
    up.wait()  # reported once; nothing in flight any more


def test_training_goes_on_while_its_checkpoint_uploads(s3, s3_server, gate, data, tmp_path):
    """The step-3 upload is frozen at its manifest; steps 4 and 5 still run. The step-6 checkpoint then waits
    for it (one upload in flight), and the run ends with both uploaded in order."""
    remote = f"{s3}/run"
    gate.hold_on(_put(remote, f"checkpoints/step_0000003/{MANIFEST}"))
    seen: dict = {}

    def watch():
        if not gate.held.wait(BOUND_S):
            return
        log = next(iter(tmp_path.rglob("train_log.jsonl")), None)
        deadline = time.monotonic() + BOUND_S
        while time.monotonic() < deadline:  # the steps after the checkpoint, run while its upload is frozen
            log = log or next(iter(tmp_path.rglob("train_log.jsonl")), None)
            if log is not None and len(read_jsonl(log)) >= 5:
                break
            time.sleep(0.05)
        seen["steps"] = len(read_jsonl(log)) if log else 0
        seen["remote"] = _keys(s3_server, remote)
        gate.release()

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        summary = train(_cfg(data, tmp_path, remote))
    finally:
        gate.release()
        watcher.join()
    assert summary["finished"] and summary["step"] == 6
    assert seen["steps"] >= 5  # the loop ran steps 4 and 5 with the step-3 upload unfinished ...
    assert f"checkpoints/step_0000003/{MANIFEST}" not in seen["remote"]  # ... (frozen at its manifest)
    assert "checkpoints/latest" not in seen["remote"]
    store = open_store(remote)
    assert store.get_bytes("checkpoints/latest") == b"step_0000006\n"
    assert store.exists(f"checkpoints/step_0000006/{MANIFEST}") and store.exists("done.json")
    # step 3 was pruned locally (keep_checkpoints=1) only after its upload: then removed remotely too
    assert not [k for k in _keys(s3_server, remote) if k.startswith("checkpoints/step_0000003/")]


def test_a_failed_background_upload_fails_the_training_and_the_rerun_resumes(data, tmp_path):
    """The store refuses step 3's files (a file stands where its folder must go): the training fails at the next
    checkpoint with the store's error, keeps step 3 locally, and the same command resumes once the store is fixed."""
    remote = tmp_path / "bucket"
    (remote / "checkpoints").mkdir(parents=True)
    (remote / "checkpoints" / "step_0000003").write_text("in the way")
    cfg = _cfg(data, tmp_path / "pod", str(remote))
    with pytest.raises(CheckpointUploadFailed) as err:
        train(cfg)
    msg = str(err.value)
    assert "step_0000003" in msg and str(remote) in msg and "Error" in msg  # the store's own error is quoted
    run = next((tmp_path / "pod").rglob("checkpoints")).parent
    assert (run / "checkpoints" / "latest").read_text() == "step_0000003\n"  # step 6 was not written over it
    assert not (run / "done.json").exists()

    (remote / "checkpoints" / "step_0000003").unlink()
    summary = train(cfg)
    assert summary["finished"] and summary["step"] == 6
    assert [r["step"] for r in read_jsonl(run / "train_log.jsonl")] == list(range(1, 7))
    assert (remote / "checkpoints" / "latest").read_text() == "step_0000006\n"
    assert (remote / "checkpoints" / "step_0000006" / MANIFEST).is_file()


_CHILD = """
import dataclasses, sys
from vla_core.train.config import OptimConfig, get_preset
from vla_core.train.loop import train
import torch
torch.set_num_threads(1)
cfg = dataclasses.replace(get_preset("tiny"), dataset=sys.argv[1], latents=sys.argv[2], out_root=sys.argv[3],
                          remote=sys.argv[4], optim=OptimConfig(steps=6, batch_size=4, lr=1e-3, warmup_steps=1),
                          log_every=1, ckpt_every=3, val_every=0, keep_checkpoints=1, progress=False)
train(cfg)
"""


def test_a_pod_killed_mid_upload_resumes_from_the_previous_complete_checkpoint(s3, s3_server, gate, data, tmp_path):
    remote = f"{s3}/run"
    gate.hold_on(b"step_0000006/")  # the final checkpoint's first upload request
    env = {**os.environ, env_names.AWS_ENDPOINT_URL: gate.endpoint}
    errors = tmp_path / "child.err"
    with open(errors, "wb") as err:
        child = subprocess.Popen([sys.executable, "-c", _CHILD, data["dataset"], data["latents"],
                                  str(tmp_path / "pod1"), remote], env=env, stdout=subprocess.DEVNULL, stderr=err)
        try:
            held = gate.held.wait(BOUND_S)
        finally:
            child.kill()  # the pod dies while step 6 uploads
            child.wait(60)
    assert held, errors.read_text()[-2000:]
    gate.release()
    keys = _keys(s3_server, remote)
    assert f"checkpoints/step_0000003/{MANIFEST}" in keys  # the previous checkpoint is whole ...
    assert f"checkpoints/step_0000006/{MANIFEST}" not in keys  # ... the interrupted one has no manifest
    assert open_store(remote).get_bytes("checkpoints/latest") == b"step_0000003\n"

    shutil.rmtree(tmp_path / "pod1")  # a new pod: empty disk
    summary = train(_cfg(data, tmp_path / "pod2", remote))
    assert summary["finished"] and summary["step"] == 6
    log = read_jsonl(Path(summary["run_dir"]) / "train_log.jsonl")
    assert [r["step"] for r in log] == list(range(1, 7))  # steps 1-3 came back from the bucket, 4-6 ran again
    assert json.loads(open_store(remote).get_bytes("done.json"))["step"] == 6
    assert open_store(remote).get_bytes("checkpoints/latest") == b"step_0000006\n"
