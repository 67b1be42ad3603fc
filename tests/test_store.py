"""One contract for every object store: the local folder and a real S3 server pass the same tests."""

from __future__ import annotations

import uuid

import pytest

from infra.store import BadKey, LocalStore, NotFound, PreconditionFailed, S3Store, check_key


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return LocalStore(tmp_path / "store")
    request.getfixturevalue("s3_env")
    server = request.getfixturevalue("s3_server")
    return S3Store(f"s3://{server['bucket']}/t-{uuid.uuid4().hex[:8]}")


def test_roundtrip_and_missing(store):
    store.put("a/b.txt", b"hello")
    assert store.get("a/b.txt") == b"hello"
    assert store.exists("a/b.txt") and not store.exists("a/c.txt")
    with pytest.raises(NotFound, match="a/c.txt"):
        store.get("a/c.txt")


def test_create_only_write_refuses_to_overwrite(store):
    store.put("m.json", b"first", if_absent=True)
    with pytest.raises(PreconditionFailed, match="already exists"):
        store.put("m.json", b"second", if_absent=True)
    assert store.get("m.json") == b"first"


def test_compare_and_swap(store):
    store.put("alias.json", b"v1")
    _, version = store.get_versioned("alias.json")
    store.put("alias.json", b"v2", if_version=version)
    with pytest.raises(PreconditionFailed, match="changed"):
        store.put("alias.json", b"v3", if_version=version)  # stale version loses
    assert store.get("alias.json") == b"v2"


def test_list_by_prefix_and_delete(store):
    for key in ("blobs/aa/1", "blobs/ab/2", "manifests/x.json"):
        store.put(key, key.encode())
    assert sorted(o.key for o in store.list("blobs/")) == ["blobs/aa/1", "blobs/ab/2"]
    assert [o.key for o in store.list("blobs/ab")] == ["blobs/ab/2"]
    assert {o.size for o in store.list("manifests/")} == {len(b"manifests/x.json")}
    store.delete("blobs/aa/1")
    assert [o.key for o in store.list("blobs/")] == ["blobs/ab/2"]


def test_file_transfer_large_enough_for_multipart(store, tmp_path):
    src = tmp_path / "big.bin"
    src.write_bytes(bytes(range(256)) * (9 * 4096))  # 9 MiB: boto3 switches to multipart at 8 MiB
    store.put_file("big/blob", src)
    dest = tmp_path / "back.bin"
    store.get_file("big/blob", dest)
    assert dest.read_bytes() == src.read_bytes()


@pytest.mark.parametrize("key", ["../escape", "a/../../b", "/etc/passwd", "a//b", "a/./b", "", "a/b c", "C:/x"])
def test_bad_keys_are_refused(store, key):
    with pytest.raises(BadKey):
        store.put(key, b"x")


def test_local_store_never_writes_outside_root(tmp_path):
    store = LocalStore(tmp_path / "root")
    (tmp_path / "root" / "link").symlink_to(tmp_path)  # a link pointing out of the root
    with pytest.raises(BadKey, match="outside"):
        store.put("link/evil", b"x")
    assert not (tmp_path / "evil").exists()
    assert check_key("blobs/sha256/ab/abc") == "blobs/sha256/ab/abc"
