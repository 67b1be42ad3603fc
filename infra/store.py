"""Object stores: a local folder or S3, behind one small interface.

The registry needs only a handful of operations, and two of them are conditional:
``put(..., if_absent=True)`` (create-only) and ``put(..., if_version=v)`` (compare-and-swap).
Locally they are an atomic ``link``/``rename`` under an ``flock``; on S3 they are conditional
writes (``If-None-Match: *`` / ``If-Match: <etag>``). Every key is checked before use, so no
caller can escape the store's root.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator
from urllib.parse import urlparse


class StoreError(Exception):
    """Base class for object store failures."""


class NotFound(StoreError, KeyError):
    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else "not found"


class PreconditionFailed(StoreError):
    """A conditional write lost: the key exists, or changed since it was read."""


class BadKey(StoreError, ValueError):
    pass


_KEY_PART = re.compile(r"^[A-Za-z0-9._@=+-]+$")


def check_key(key: str) -> str:
    """Return ``key`` if it is a safe relative key, else raise ``BadKey`` naming the problem."""
    if not isinstance(key, str) or not key:
        raise BadKey("key: empty")
    if key.startswith("/") or key.startswith("\\") or re.match(r"^[A-Za-z]:", key):
        raise BadKey(f"key {key!r}: absolute paths are not allowed")
    for part in key.split("/"):
        if part in ("", ".", ".."):
            raise BadKey(f"key {key!r}: empty, '.' or '..' segments are not allowed")
        if not _KEY_PART.match(part):
            raise BadKey(f"key {key!r}: segment {part!r} has characters outside [A-Za-z0-9._@=+-]")
    return key


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    modified: float  # unix seconds


class LocalStore:
    """A folder. Writes go to a temp file then ``rename``, so readers never see half a file."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.uri = f"file://{self.root}"

    def _path(self, key: str) -> Path:
        path = (self.root / check_key(key)).resolve()
        if self.root not in path.parents:
            raise BadKey(f"key {key!r}: resolves outside the store root")
        return path

    def get(self, key: str) -> bytes:
        data, _ = self.get_versioned(key)
        return data

    def get_versioned(self, key: str) -> tuple[bytes, str]:
        try:
            data = self._path(key).read_bytes()
        except FileNotFoundError:
            raise NotFound(f"{key}: not found in {self.uri}") from None
        return data, hashlib.sha256(data).hexdigest()

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def put(self, key: str, data: bytes, *, if_absent: bool = False, if_version: str | None = None) -> str:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            if if_absent:
                try:  # link() fails if the target exists: an atomic create-only.
                    os.link(tmp, path)
                except FileExistsError:
                    raise PreconditionFailed(f"{key}: already exists") from None
            elif if_version is not None:
                with self._lock(path):
                    try:
                        current = hashlib.sha256(path.read_bytes()).hexdigest()
                    except FileNotFoundError:
                        raise PreconditionFailed(f"{key}: was deleted since it was read") from None
                    if current != if_version:
                        raise PreconditionFailed(f"{key}: changed since it was read")
                    os.replace(tmp, path)
            else:
                os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return hashlib.sha256(data).hexdigest()

    def put_file(self, key: str, src: str | os.PathLike) -> None:
        self.put(key, Path(src).read_bytes())

    def get_file(self, key: str, dest: str | os.PathLike) -> None:
        Path(dest).write_bytes(self.get(key))

    @contextlib.contextmanager
    def _lock(self, path: Path):
        with open(path.with_name(f".lock-{path.name}"), "a+") as f:
            fcntl.flock(f, fcntl.LOCK_EX)  # the kernel releases it if this process dies
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def delete(self, key: str) -> None:
        try:
            self._path(key).unlink()
        except FileNotFoundError:
            pass

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Objects whose key starts with ``prefix`` (a plain string prefix, as in S3)."""
        folder = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
        start = self._path(folder) if folder else self.root
        if not start.is_dir():
            return
        for dirpath, dirs, files in os.walk(start):
            dirs.sort()
            for name in sorted(files):
                if name.startswith((".tmp-", ".lock-")):
                    continue
                full = Path(dirpath) / name
                key = full.relative_to(self.root).as_posix()
                if key.startswith(prefix):
                    st = full.stat()
                    yield ObjectInfo(key, st.st_size, st.st_mtime)


class S3Store:
    """``s3://bucket/prefix`` through boto3. ``AWS_ENDPOINT_URL`` selects any S3-compatible server.

    Race safety rests on conditional writes (AWS S3 has had them since 2024; SeaweedFS has them).
    Before the first conditional write we probe the server once; a server that ignores the
    conditions is refused with an error rather than silently losing an alias update.
    """

    def __init__(self, uri: str, client=None):
        parsed = urlparse(uri)
        if parsed.scheme != "s3" or not parsed.netloc:
            raise BadKey(f"registry: {uri!r} is not an s3://bucket[/prefix] URI")
        self.uri = uri.rstrip("/")
        self.bucket = parsed.netloc
        self.prefix = parsed.path.strip("/")
        if self.prefix:
            check_key(self.prefix)
        self.client = client or _s3_client()
        self._conditional_ok: bool | None = None

    def _key(self, key: str) -> str:
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def get(self, key: str) -> bytes:
        data, _ = self.get_versioned(key)
        return data

    def get_versioned(self, key: str) -> tuple[bytes, str]:
        from botocore.exceptions import ClientError

        try:
            obj = self.client.get_object(Bucket=self.bucket, Key=self._key(key))
        except ClientError as e:
            if e.response["Error"]["Code"] in ("NoSuchKey", "404", "NotFound"):
                raise NotFound(f"{key}: not found in {self.uri}") from None
            raise
        return obj["Body"].read(), obj["ETag"]

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(key))
            return True
        except ClientError as e:
            if e.response["ResponseMetadata"]["HTTPStatusCode"] == 404:
                return False
            raise

    def put(self, key: str, data: bytes, *, if_absent: bool = False, if_version: str | None = None) -> str:
        from botocore.exceptions import ClientError

        kwargs = {}
        if if_absent or if_version is not None:
            self._check_conditional_writes()
        if if_absent:
            kwargs["IfNoneMatch"] = "*"
        elif if_version is not None:
            kwargs["IfMatch"] = if_version
        try:
            r = self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data, **kwargs)
        except ClientError as e:
            code = e.response["Error"]["Code"]
            status = e.response["ResponseMetadata"]["HTTPStatusCode"]
            if status in (409, 412) or code in ("PreconditionFailed", "ConditionalRequestConflict"):
                what = "already exists" if if_absent else "changed since it was read"
                raise PreconditionFailed(f"{key}: {what}") from None
            if status == 404 and if_version is not None:
                raise PreconditionFailed(f"{key}: was deleted since it was read") from None
            raise
        return r["ETag"]

    def put_file(self, key: str, src: str | os.PathLike) -> None:
        self.client.upload_file(str(src), self.bucket, self._key(key))  # multipart for big files

    def get_file(self, key: str, dest: str | os.PathLike) -> None:
        from botocore.exceptions import ClientError

        try:
            self.client.download_file(self.bucket, self._key(key), str(dest))
        except ClientError as e:
            if e.response["Error"]["Code"] in ("NoSuchKey", "404", "NotFound"):
                raise NotFound(f"{key}: not found in {self.uri}") from None
            raise

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self._key(key))

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        root = f"{self.prefix}/" if self.prefix else ""
        if prefix:
            check_key(prefix.rstrip("/"))
        full, strip = root + prefix, len(root)
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full):
            for obj in page.get("Contents", []):
                yield ObjectInfo(obj["Key"][strip:], obj["Size"], obj["LastModified"].timestamp())

    def _check_conditional_writes(self) -> None:
        if self._conditional_ok:
            return
        probe = self._key(f"_probe/conditional-{os.getpid()}-{time.time_ns()}")
        self.client.put_object(Bucket=self.bucket, Key=probe, Body=b"1", IfNoneMatch="*")
        try:
            self.client.put_object(Bucket=self.bucket, Key=probe, Body=b"2", IfNoneMatch="*")
            honoured = False
        except Exception:
            honoured = True
        finally:
            self.client.delete_object(Bucket=self.bucket, Key=probe)
        if not honoured:
            raise StoreError(
                f"{self.uri}: this S3 server ignores conditional writes (If-None-Match), so aliases "
                "could be lost in a race; use a server that supports them (AWS S3, SeaweedFS, MinIO)")
        self._conditional_ok = True


def _s3_client():
    import boto3
    from botocore.config import Config

    # boto3 reads AWS_ENDPOINT_URL, credentials and region from the environment by itself;
    # path-style addressing works with every S3-compatible server.
    return boto3.client(
        "s3",
        region_name=os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
        config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 5, "mode": "standard"}),
    )


def open_store(uri: str):
    """``file:///abs``, ``file://./rel``, a plain path, or ``s3://bucket/prefix``."""
    if uri.startswith("s3://"):
        return S3Store(uri)
    if uri.startswith("file://"):
        path = uri[len("file://"):]
        return LocalStore(path or ".")
    if "://" in uri:
        raise BadKey(f"registry: unsupported scheme in {uri!r} (use file:// or s3://)")
    return LocalStore(uri)
