"""vla_core.storage against a real S3 server (SeaweedFS on loopback with authentication, tests/conftest.py):
round trip, multipart, the manifest written last, list_runs, an interrupted upload re-run, an interrupted
pull resumed, a corrupted object refused, wrong credentials / missing bucket / unreachable endpoint (clear
errors without the secret), datasets from the bucket, and the `wmvla results` commands."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

from vla_core import env_names
from vla_core.storage import (
    MANIFEST,
    RunCorrupted,
    RunIncomplete,
    StorageError,
    list_runs,
    open_store,
    publish_run,
    pull_run,
    sha256_file,
    sync_dataset,
    sync_up,
)
from vla_core.storage import store as store_mod
from vla_core.storage.store import S3Store


@pytest.fixture
def s3(s3, monkeypatch):
    """conftest's s3 (the server's credentials in the environment, a fresh prefix) with few retries."""
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    return s3


def _tree(root: Path) -> Path:
    """A small results folder: report, summary with a verdict, a plot, per-condition episodes."""
    (root / "plots").mkdir(parents=True)
    (root / "E0" / "tag" / "seed0" / "eval" / "c").mkdir(parents=True)
    (root / "report.md").write_text("# report\n")
    (root / "summary.json").write_text(json.dumps({"verdict": {"overall": "inconclusive: underpowered"},
                                                   "conditions": {"E0-mse": {}, "E2-mse": {}}}))
    (root / "plots" / "success.png").write_bytes(os.urandom(3000))
    (root / "E0" / "tag" / "seed0" / "eval" / "c" / "episodes.jsonl").write_text('{"success": true}\n' * 5)
    (root / "empty.txt").write_bytes(b"")
    return root


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


class Spy(S3Store):
    """A real S3Store that records the order of its writes and can be told to fail after n transfers
    (an interrupted upload / pull: the process dies between two files)."""

    def __init__(self, base: S3Store, fail_after: int | None = None):
        super().__init__(base.bucket, base.prefix, base.multipart_threshold, base.multipart_chunksize)
        self.writes: list[str] = []
        self.gets: list[str] = []
        self.fail_after = fail_after

    def _tick(self):
        if self.fail_after is not None and len(self.writes) + len(self.gets) >= self.fail_after:
            raise KeyboardInterrupt("simulated kill")

    def put_file(self, local_path, key, sha256=None, **kw):
        self._tick()
        digest = super().put_file(local_path, key, sha256, **kw)
        self.writes.append(key)
        return digest

    def put_bytes(self, key, data):
        self._tick()
        super().put_bytes(key, data)
        self.writes.append(key)

    def get_file(self, key, local_path):
        self._tick()
        digest = super().get_file(key, local_path)
        self.gets.append(key)
        return digest


# ------------------------------------------------------------------------------------------ round trip


@pytest.mark.parametrize("kind", ["s3", "local"])
def test_store_round_trip(kind, s3, tmp_path):
    uri = f"{s3}/pre/fix" if kind == "s3" else f"file://{tmp_path / 'store'}"
    st = open_store(uri)
    src = tmp_path / "f.bin"
    src.write_bytes(os.urandom(10_000))
    st.put_file(src, "a/f.bin")
    st.put_bytes("a/b/note.txt", b"hello")
    assert {(o.key, o.size) for o in st.list()} == {("a/f.bin", 10_000), ("a/b/note.txt", 5)}
    assert [o.key for o in st.list("a/b/")] == ["a/b/note.txt"]
    assert st.list_dirs() == ["a"] and st.list_dirs("a") == ["b"]
    assert st.get_bytes("a/b/note.txt") == b"hello"
    st.get_file("a/f.bin", tmp_path / "back" / "f.bin")
    assert (tmp_path / "back" / "f.bin").read_bytes() == src.read_bytes()
    assert st.stored_sha256("a/f.bin") == sha256_file(src)
    assert st.exists("a/f.bin") and not st.exists("a/missing")
    assert st.child("a").get_bytes("b/note.txt") == b"hello"
    st.delete("a/f.bin")
    assert not st.exists("a/f.bin")
    with pytest.raises(StorageError, match="a/missing"):
        st.get_bytes("a/missing")


def test_small_puts_send_their_body_with_the_headers(s3, tmp_path, monkeypatch):
    # no "Expect: 100-continue" wait (a round trip per small file) below EXPECT_CONTINUE_MIN; big bodies keep it
    monkeypatch.setattr(store_mod, "EXPECT_CONTINUE_MIN", 64 * 1024)
    st = open_store(f"{s3}/expect")
    sent: list[tuple[int, bool, str]] = []

    def record(request, **_):
        body = request.body
        n = len(body) if isinstance(body, (bytes, bytearray)) else len(body.getvalue())
        sent.append((n, "Expect" in request.headers, request.headers.get("x-amz-checksum-crc32", b"").decode()))

    st.client.meta.events.register("before-send.s3.PutObject", record, unique_id="test-expect")
    try:
        small, big = os.urandom(64 * 1024 - 1), os.urandom(64 * 1024)
        st.put_bytes("small.bin", small)
        (tmp_path / "small.json").write_bytes(small[:5000])
        st.put_file(tmp_path / "small.json", "small.json")
        st.put_bytes("big.bin", big)
    finally:
        st.client.meta.events.unregister("before-send.s3.PutObject", unique_id="test-expect")
    assert [(n, expect) for n, expect, _ in sent] == [(len(small), False), (5000, False), (len(big), True)]
    assert all(crc for _, _, crc in sent)  # botocore's checksum is still computed and sent (the server checks it)
    assert st.get_bytes("small.bin") == small and st.get_bytes("small.json") == small[:5000]
    assert st.get_bytes("big.bin") == big and st.stored_sha256("small.bin") == hashlib.sha256(small).hexdigest()


def test_a_body_altered_on_the_way_is_refused_by_the_server(s3):
    """botocore's CRC32 of each upload body (its default since 1.36) is what makes the server refuse bytes
    changed in transit: SeaweedFS does not check the SigV4-signed SHA-256 of the payload (measured: a body
    altered after signing was stored when sent without the CRC32). So the client keeps that default."""
    st = open_store(f"{s3}/altered")

    def flip_first_byte(request, **_):  # after signing and checksumming, as a faulty link or proxy would
        request.body = bytes([request.body[0] ^ 1]) + request.body[1:]

    st.client.meta.events.register("before-send.s3.PutObject", flip_first_byte, unique_id="test-altered")
    try:
        with pytest.raises(StorageError, match="BadDigest"):
            st.put_bytes("x.bin", os.urandom(5000))
    finally:
        st.client.meta.events.unregister("before-send.s3.PutObject", unique_id="test-altered")
    assert not st.exists("x.bin")


def test_multipart_upload_and_download(s3, tmp_path, monkeypatch):
    # 5 MiB is S3's smallest part: a 12 MiB file goes up in 3 concurrent parts
    monkeypatch.setattr(store_mod, "MULTIPART_THRESHOLD", 5 * store_mod.MiB)
    monkeypatch.setattr(store_mod, "MULTIPART_CHUNKSIZE", 5 * store_mod.MiB)
    src = tmp_path / "big.bin"
    src.write_bytes(os.urandom(12 * store_mod.MiB))
    st = open_store(f"{s3}/mp")
    assert st.put_file(src, "big.bin") == sha256_file(src)
    head = st.client.head_object(Bucket=st.bucket, Key=st._key("big.bin"))
    assert head["ETag"].strip('"').endswith("-3"), head["ETag"]  # a multipart ETag names its part count
    assert head["Metadata"]["sha256"] == sha256_file(src)
    # another tool's multipart upload has no sha256 metadata: the parts' ETag is recomputed locally
    from boto3.s3.transfer import TransferConfig

    st.client.upload_file(str(src), st.bucket, st._key("foreign.bin"),
                          Config=TransferConfig(multipart_threshold=5 * store_mod.MiB, multipart_chunksize=5 * store_mod.MiB))
    foreign = st.client.head_object(Bucket=st.bucket, Key=st._key("foreign.bin"))
    assert st.stored_sha256("foreign.bin") is None, foreign
    assert st.matches("foreign.bin", src), (foreign, store_mod.multipart_etag(src, 5 * store_mod.MiB))
    (tmp_path / "other.bin").write_bytes(src.read_bytes()[:-1] + b"x")
    assert not st.matches("foreign.bin", tmp_path / "other.bin")
    assert st.get_file("big.bin", tmp_path / "back.bin") == sha256_file(src)
    assert sha256_file(tmp_path / "back.bin") == sha256_file(src)


# ------------------------------------------------------------------- a push hashed while it uploads

def _big_run(root: Path, seed: bytes = b"") -> Path:
    """A checkpoint-like folder: one file above the (test-sized) multipart threshold and a small one."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "model.safetensors").write_bytes(seed + os.urandom(12 * store_mod.MiB - len(seed)))
    (root / "config.json").write_text('{"x": 1}')
    return root


@pytest.fixture
def five_mib_parts(monkeypatch):
    # 5 MiB is S3's smallest part: a 12 MiB file goes up in 3 concurrent parts
    monkeypatch.setattr(store_mod, "MULTIPART_THRESHOLD", 5 * store_mod.MiB)
    monkeypatch.setattr(store_mod, "MULTIPART_CHUNKSIZE", 5 * store_mod.MiB)


def test_publish_hashes_big_files_while_they_upload_and_the_manifest_holds_their_sha256(s3, five_mib_parts,
                                                                                       tmp_path):
    run = _big_run(tmp_path / "ckpt")
    publish_run(run, f"{s3}/ckpt")
    st = open_store(f"{s3}/ckpt")
    m = json.loads(st.get_bytes(MANIFEST))
    for rel in ("model.safetensors", "config.json"):
        assert m["files"][rel] == {"size": (run / rel).stat().st_size, "sha256": sha256_file(run / rel)}
    head = st.client.head_object(Bucket=st.bucket, Key=st._key("model.safetensors"))
    assert head["ETag"].strip('"').endswith("-3"), head["ETag"]
    # the manifest, not the object, carries a published big file's sha256 (S3 fixes metadata before the hash
    # is known); a small file still has it in its metadata
    assert st.stored_sha256("model.safetensors") is None and st.stored_sha256("config.json") == m["files"][
        "config.json"]["sha256"]
    res = pull_run(f"{s3}/ckpt", tmp_path / "pulled")
    assert res["complete"] and (tmp_path / "pulled" / "model.safetensors").read_bytes() == \
        (run / "model.safetensors").read_bytes()
    # re-publishing the same files sends nothing but the manifest: the big object is matched by its ETag
    spy = Spy(open_store(f"{s3}/ckpt"))
    publish_run(run, spy)
    assert spy.writes == [MANIFEST]
    # a changed file of the same size is sent again (its ETag differs), and the new manifest says so
    (run / "model.safetensors").write_bytes(b"changed" + (run / "model.safetensors").read_bytes()[7:])
    spy = Spy(open_store(f"{s3}/ckpt"))
    publish_run(run, spy)
    assert sorted(spy.writes) == sorted([MANIFEST, "model.safetensors"]) and spy.writes[-1] == MANIFEST
    assert json.loads(st.get_bytes(MANIFEST))["files"]["model.safetensors"]["sha256"] == \
        sha256_file(run / "model.safetensors")
    assert pull_run(f"{s3}/ckpt", tmp_path / "pulled2")["complete"]


def test_a_corrupted_or_truncated_big_object_without_metadata_is_refused(s3, five_mib_parts, tmp_path):
    run = _big_run(tmp_path / "ckpt")
    publish_run(run, f"{s3}/ckpt")
    st = open_store(f"{s3}/ckpt")
    good = (run / "model.safetensors").read_bytes()
    key = st._key("model.safetensors")
    # same size, one byte different, stored by another client (no metadata): only the manifest's sha256 tells
    st.client.put_object(Bucket=st.bucket, Key=key, Body=good[:-1] + bytes([good[-1] ^ 1]))
    with pytest.raises(StorageError, match=r"corrupted object.*sha256"):
        pull_run(f"{s3}/ckpt", tmp_path / "p")
    assert not (tmp_path / "p" / "model.safetensors").exists()
    st.client.put_object(Bucket=st.bucket, Key=key, Body=good[: len(good) // 2])  # truncated
    with pytest.raises(RunCorrupted, match="model.safetensors"):
        pull_run(f"{s3}/ckpt", tmp_path / "p")
    assert not (tmp_path / "p" / "model.safetensors").exists()


def test_a_push_cut_mid_upload_leaves_no_manifest_and_the_rerun_completes_it(s3, s3_server, five_mib_parts,
                                                                            tmp_path, monkeypatch):
    import threading

    from vla_core.storage.netproxy import LatencyProxy

    old = _big_run(tmp_path / "v1")
    publish_run(old, f"{s3}/run")
    st = open_store(f"{s3}/run")
    new = _big_run(tmp_path / "v2")
    errors: list[BaseException] = []
    with LatencyProxy(s3_server.port) as gate:
        monkeypatch.setenv(env_names.AWS_ENDPOINT_URL, gate.endpoint)
        monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
        gate.hold_on(b"partNumber=2")  # the second part's request: the big file is half sent

        def push() -> None:
            try:
                publish_run(new, f"{s3}/run")
            except BaseException as e:  # noqa: BLE001 - the test checks it below
                errors.append(e)

        t = threading.Thread(target=push)
        t.start()
        assert gate.held.wait(60), "the upload never reached its second part"
        gate.close()  # the store goes away mid-upload (every connection dropped, nothing listens)
        t.join(120)
    assert not t.is_alive() and len(errors) == 1 and isinstance(errors[0], StorageError), errors
    monkeypatch.setenv(env_names.AWS_ENDPOINT_URL, s3_server.endpoint)
    # never a manifest naming a half-sent file: the old one went first, the new one was not written
    assert not st.exists(MANIFEST)
    with pytest.raises(RunIncomplete, match="no _manifest.json"):
        pull_run(f"{s3}/run", tmp_path / "p")
    # the unfinished multipart upload replaced nothing: the object still holds the old bytes, whole
    st.get_file("model.safetensors", tmp_path / "still.bin")
    assert (tmp_path / "still.bin").read_bytes() == (old / "model.safetensors").read_bytes()
    publish_run(new, f"{s3}/run")
    res = pull_run(f"{s3}/run", tmp_path / "p")
    assert res["complete"]
    assert (tmp_path / "p" / "model.safetensors").read_bytes() == (new / "model.safetensors").read_bytes()


# ---------------------------------------------------------------------------------------- runs


def test_publish_writes_manifest_last_and_pull_verifies(s3, tmp_path):
    run = _tree(tmp_path / "mt10")
    spy = Spy(open_store(f"{s3}/results/mt10"))
    assert publish_run(run, spy) == f"{s3}/results/mt10"
    assert spy.writes[-1] == MANIFEST and sorted(spy.writes[:-1]) == sorted(_files(run))
    m = json.loads(spy.get_bytes(MANIFEST))
    assert m["format"] == "wmvla-run-manifest-v1" and m["run"] == "mt10"
    assert m["files"]["report.md"] == {"size": 9, "sha256": sha256_file(run / "report.md")}
    assert set(m["files"]) == set(_files(run)) and m["total_bytes"] == sum(map(len, _files(run).values()))
    assert m["summary"] == {"verdict": "inconclusive: underpowered", "cells": ["E0-mse", "E2-mse"]}

    res = pull_run(f"{s3}/results/mt10", tmp_path / "pulled")
    assert res["complete"] and res["downloaded"] == len(m["files"])
    pulled = _files(tmp_path / "pulled")
    assert json.loads(pulled.pop(MANIFEST)) == m
    assert pulled == _files(run)
    again = pull_run(f"{s3}/results/mt10", tmp_path / "pulled")  # everything there and verified
    assert again["downloaded"] == 0 and again["skipped"] == len(m["files"])


def test_list_runs_shows_complete_and_incomplete(s3, tmp_path):
    publish_run(_tree(tmp_path / "a"), f"{s3}/res/a")
    sync_up(_tree(tmp_path / "b"), f"{s3}/res/b")  # files without a manifest: an upload that did not finish
    runs = {r["name"]: r for r in list_runs(f"{s3}/res")}
    assert set(runs) == {"a", "b"}
    assert runs["a"]["complete"] and runs["a"]["verdict"] == "inconclusive: underpowered"
    assert runs["a"]["cells"] == ["E0-mse", "E2-mse"] and runs["a"]["created"]
    assert not runs["b"]["complete"] and "no _manifest.json" in runs["b"]["problem"]


def test_interrupted_upload_is_incomplete_and_a_rerun_finishes_it(s3, tmp_path):
    run = _tree(tmp_path / "r")
    n = len(_files(run))
    with pytest.raises(KeyboardInterrupt):
        publish_run(run, Spy(open_store(f"{s3}/r"), fail_after=2), workers=1)
    with pytest.raises(RunIncomplete, match="no _manifest.json"):
        pull_run(f"{s3}/r", tmp_path / "p")
    assert not (tmp_path / "p").exists()
    again = Spy(open_store(f"{s3}/r"))
    publish_run(run, again)
    assert len(again.writes) == n - 2 + 1  # the two uploaded before the kill are skipped (same size + sha256)
    assert pull_run(f"{s3}/r", tmp_path / "p")["complete"]


def test_interrupted_pull_resumes(s3, tmp_path):
    run = _tree(tmp_path / "r")
    publish_run(run, f"{s3}/r")
    with pytest.raises(KeyboardInterrupt):
        pull_run(Spy(open_store(f"{s3}/r"), fail_after=3), tmp_path / "p", workers=1)
    assert not list((tmp_path / "p").rglob("*.part"))  # nothing half-written left behind
    spy = Spy(open_store(f"{s3}/r"))
    res = pull_run(spy, tmp_path / "p")
    assert res["complete"] and len(spy.gets) == len(_files(run)) - 3 and res["skipped"] == 3
    assert {k: v for k, v in _files(tmp_path / "p").items() if k != MANIFEST} == _files(run)


def test_corrupted_object_is_refused(s3, tmp_path):
    run = _tree(tmp_path / "r")
    publish_run(run, f"{s3}/r")
    st = open_store(f"{s3}/r")
    key = "E0/tag/seed0/eval/c/episodes.jsonl"
    good = (run / key).read_bytes()
    bad = good.replace(b"true", b"fals")  # same size, different bytes: only the checksum can tell
    st.client.put_object(Bucket=st.bucket, Key=st._key(key), Body=bad)
    with pytest.raises(StorageError, match=r"corrupted object.*sha256") as e:
        pull_run(f"{s3}/r", tmp_path / "p")
    assert key in str(e.value) and st.bucket in str(e.value)
    assert not (tmp_path / "p" / key).exists()
    res = pull_run(f"{s3}/r", tmp_path / "p", allow_incomplete=True)
    assert not res["complete"] and any(key in p for p in res["problems"])
    assert (tmp_path / "p" / "report.md").exists() and not (tmp_path / "p" / key).exists()
    st.put_bytes("report.md", b"short")  # a different size is refused before anything is downloaded
    with pytest.raises(RunCorrupted, match="report.md"):
        pull_run(f"{s3}/r", tmp_path / "p2")


# ------------------------------------------------------------------------------------------ errors


def test_wrong_credentials_missing_bucket_unreachable(s3, s3_server, tmp_path, monkeypatch):
    run = _tree(tmp_path / "r")
    bucket = s3[len("s3://"):].split("/")[0]
    monkeypatch.setenv(env_names.AWS_SECRET_ACCESS_KEY, "not-the-secret-xyz")
    with pytest.raises(StorageError) as e:
        publish_run(run, f"{s3}/r")
    msg = str(e.value)
    assert "SignatureDoesNotMatch" in msg and bucket in msg and s3_server.endpoint in msg
    assert "not-the-secret-xyz" not in msg and s3_server.secret_key not in msg
    monkeypatch.setenv(env_names.AWS_SECRET_ACCESS_KEY, s3_server.secret_key)

    with pytest.raises(StorageError, match=r"NoSuchBucket.*create it") as e:
        publish_run(run, "s3://no-such-bucket-here/r")
    assert "no-such-bucket-here" in str(e.value)
    with pytest.raises(StorageError, match="NoSuchBucket"):
        pull_run("s3://no-such-bucket-here/r", tmp_path / "p")

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    monkeypatch.setenv(env_names.AWS_ENDPOINT_URL, f"http://127.0.0.1:{dead}")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    with pytest.raises(StorageError, match=f"127.0.0.1:{dead}.*cannot connect") as e:
        list_runs(f"{s3}/res")
    assert s3_server.secret_key not in str(e.value)


def test_seaweed_requires_auth_and_one_server_per_folder(s3_server):
    with pytest.raises(urllib.error.HTTPError) as e:  # an unsigned write is refused
        urllib.request.urlopen(urllib.request.Request(f"{s3_server.endpoint}/anon-bucket", method="PUT"), timeout=5)
    assert e.value.code == 403
    from vla_core.storage.seaweed import SeaweedFS

    with pytest.raises(StorageError, match="another SeaweedFS server is using this data folder") as e:
        SeaweedFS(s3_server.data_dir).start()
    # names the server, the process that owns it (this one, still running) and the command that stops it
    msg = str(e.value)
    assert f"server pid {s3_server.proc.pid}, started by pid {os.getpid()}" in msg, msg
    assert f"`kill {s3_server.proc.keeper.pid}`" in msg and str(s3_server.data_dir) in msg, msg
    assert s3_server.proc.poll() is None


def test_seaweed_grows_volumes_for_a_bucket(s3_server, s3_env, tmp_path):
    """The benchmark grows a bucket's volumes before it measures (a volume filling up mid-step stalls that
    write): the master allocates them, and the bucket keeps working across them."""
    name = "g" + uuid.uuid4().hex[:12]
    bucket = s3_server.create_bucket(name)
    store = open_store(f"{bucket}/x")
    store.put_bytes("a.bin", b"a" * 1000)  # the first write makes the bucket's collection and its first volume
    before = s3_server.volumes(name)
    assert before >= 1
    assert s3_server.grow_volumes(name, 3) == before + 3 == s3_server.volumes(name)
    for i in range(8):  # writes land on the new volumes too and read back whole
        store.put_bytes(f"b{i}.bin", bytes([i]) * 5000)
    assert [store.get_bytes(f"b{i}.bin") for i in range(8)] == [bytes([i]) * 5000 for i in range(8)]
    assert s3_server.volumes("no-such-bucket-" + name) == 0
    with pytest.raises(ValueError, match="expected 1..64 volumes, found 0"):
        s3_server.grow_volumes(name, 0)


# ---------------------------------------------------------------------------------------- datasets


def test_dataset_from_the_bucket(s3, data, tmp_path, monkeypatch):
    from vla_core.data.lerobot import LeRobotDataset

    sync_up(data["dataset"], f"{s3}/datasets/libero_like")
    monkeypatch.setenv(env_names.DATASET_CACHE, str(tmp_path / "cache"))
    uri = f"{s3}/datasets/libero_like"
    ds = LeRobotDataset.open(uri)
    assert ds.root == (tmp_path / "cache" / s3[len("s3://"):] / "datasets" / "libero_like").resolve()
    assert ds.source == uri and len(ds.episodes) == len(LeRobotDataset.open(data["dataset"]).episodes)
    spy_logs = []
    sync_dataset(uri, log=spy_logs.append)  # a second sync downloads nothing but the info.json it re-checks
    assert "1 files downloaded" in spy_logs[0]
    with pytest.raises(StorageError, match="meta/info.json"):
        sync_dataset(f"{s3}/datasets/nothing-here")


# ---------------------------------------------------------------------------------------- commands


def test_results_commands_and_report_on_the_pulled_run(s3, tmp_path, capsys):
    from vla_core.cli import main

    run = _tree(tmp_path / "mt10")
    assert main(["results", "push", str(run), f"{s3}/results"]) == 0
    assert main(["results", "list", f"{s3}/results"]) == 0
    out = capsys.readouterr().out
    assert "mt10" in out and "complete" in out and "inconclusive" in out
    assert main(["results", "list", f"{s3}/results", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["complete"] is True
    assert main(["results", "pull", f"{s3}/results/mt10", str(tmp_path / "pulled")]) == 0
    assert (tmp_path / "pulled" / "report.md").read_text() == "# report\n"
    assert main(["results", "pull", f"{s3}/results/nope", str(tmp_path / "x")]) == 2
    assert "no such run" in capsys.readouterr().err


def test_report_works_on_a_pulled_run(s3, tmp_path):
    """A matrix-shaped run (the report tests' builder) published, pulled, and reported from the pulled copy:
    the same conditions and verdict as from the original folder."""
    from test_report import make_root

    from vla_core.cli import main

    run = make_root(tmp_path / "mt10")
    assert main(["report", str(run)]) == 0
    assert main(["results", "push", str(run), f"{s3}/results"]) == 0
    assert main(["results", "pull", f"{s3}/results/mt10", str(tmp_path / "pulled")]) == 0
    pulled = tmp_path / "pulled"
    (pulled / "report.md").unlink()
    assert main(["report", str(pulled)]) == 0
    a, b = (json.loads((d / "summary.json").read_text()) for d in (run, pulled))
    assert a["verdict"] == b["verdict"] and a["comparisons"] == b["comparisons"]
    rates = [{k: (c["success_rate"], c["n"]) for k, c in x["conditions"].items()} for x in (a, b)]
    assert rates[0] == rates[1] and len(rates[0]) == 7  # E0, E1, E2 x 4 memories, E3
    assert (pulled / "report.md").exists()
