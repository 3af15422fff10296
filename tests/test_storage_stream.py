"""Downloads hashed while they stream (vla_core.storage.store.S3Store.get_file) against a real SeaweedFS: every
size around the part boundaries, a connection cut in the middle of a part (resumed where it stopped), an object
replaced in the middle of a download (refused, never mixed). The faults come from a loopback proxy
(vla_core.storage.netproxy) that cuts or freezes exact transfers."""

from __future__ import annotations

import hashlib
import os
import threading
import uuid

import pytest

from vla_core import env_names
from vla_core.storage import StorageError
from vla_core.storage.netproxy import LatencyProxy
from vla_core.storage.store import S3Store

PART = 64 * 1024  # download part size for these tests: many parts from small objects


@pytest.fixture(scope="module")
def bucket(s3_server):
    return s3_server.create_bucket("s" + uuid.uuid4().hex[:12])[len("s3://"):]


@pytest.fixture
def proxy(s3_server, s3_env, monkeypatch):
    with LatencyProxy(s3_server.port) as p:
        monkeypatch.setenv(env_names.AWS_ENDPOINT_URL, p.endpoint)
        monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
        yield p
        p.release()


def _store(bucket: str) -> S3Store:
    return S3Store(bucket, uuid.uuid4().hex[:8], multipart_chunksize=PART)


@pytest.mark.parametrize("size", [0, 1, PART - 1, PART, PART + 1, 17 * PART + 123])
def test_streamed_download_is_whole_and_hashed(s3_env, bucket, size, tmp_path):
    st = _store(bucket)
    data = os.urandom(size)
    st.put_bytes("obj", data)
    assert st.get_file("obj", tmp_path / "x") == hashlib.sha256(data).hexdigest()
    assert (tmp_path / "x").read_bytes() == data
    assert [p.name for p in tmp_path.iterdir()] == ["x"]  # no temp file left


@pytest.mark.parametrize("size", [PART - 100, 9 * PART + 5])  # one part (no threads), several parts
def test_a_connection_cut_mid_part_resumes_the_part(proxy, bucket, tmp_path, size):
    st = _store(bucket)
    data = os.urandom(size)
    st.put_bytes("obj", data)
    proxy.cut_once(after=PART // 2 + 700)  # inside the first part's body (headers are a few hundred bytes)
    assert st.get_file("obj", tmp_path / "x") == hashlib.sha256(data).hexdigest()
    assert proxy.cuts == 1 and (tmp_path / "x").read_bytes() == data


def test_an_object_replaced_mid_download_is_refused(proxy, s3_server, bucket, tmp_path):
    st = _store(bucket)
    st.put_bytes("obj", os.urandom(6 * PART))
    proxy.hold_on(f"bytes={3 * PART}-".encode())  # the request of the fourth part
    result: dict = {}

    def download():
        try:
            result["sha"] = st.get_file("obj", tmp_path / "x")
        except StorageError as e:
            result["error"] = str(e)

    t = threading.Thread(target=download)
    t.start()
    assert proxy.held.wait(120)
    s3_server.client().put_object(Bucket=bucket, Key=st._key("obj"), Body=os.urandom(6 * PART))  # not via proxy
    proxy.release()
    t.join(120)
    assert "error" in result, result
    assert "changed while it was being downloaded" in result["error"]
    assert "obj" in result["error"] and not (tmp_path / "x").exists()
