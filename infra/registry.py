"""The artifact registry: content-addressed blobs, JSON manifests, aliases, lineage.

Layout inside a store::

    blobs/sha256/ab/abcdef…         file contents, named by their hash, verified on every read
    manifests/<kind>/<id>.json      one per artifact; written last and create-only
    aliases/<task>/<alias>.json     {"target": id, "history": […]}; moved by compare-and-swap

A writer uploads every blob first and the manifest last, so a writer that dies half-way leaves
only unreferenced blobs (``gc`` removes them) and no visible artifact.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import re
import secrets
import subprocess
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from infra.store import NotFound, PreconditionFailed, StoreError, check_key, open_store

KINDS = ("dataset", "run", "model", "eval", "deployment")
DEFAULT_REGISTRY = "file://.crucible/registry"
_TASK = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
_ALIAS = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")
_ID = re.compile(r"^(?P<kind>[a-z]+)-(?P<task>[a-z0-9][a-z0-9_-]*)-(?P<stamp>\d{14})-(?P<rand>[0-9a-f]{8})$")
_CHUNK = 1 << 20


class RegistryError(StoreError):
    """A registry operation failed; the message says what and where."""


class RefError(RegistryError, ValueError):
    """A ref that is malformed or names nothing."""


class AliasConflict(RegistryError):
    """Someone else moved the alias between our read and our write."""


class CorruptBlob(RegistryError):
    """A blob's bytes do not match its hash."""


@dataclass
class Manifest:
    id: str
    kind: str
    task: str
    created_at: str
    files: dict[str, dict[str, Any]] = field(default_factory=dict)  # relpath -> {sha256, size}
    inputs: dict[str, Any] = field(default_factory=dict)  # lineage: spec_hash, dataset, base_model…
    metadata: dict[str, Any] = field(default_factory=dict)  # figures and facts for people

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), indent=2, sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> "Manifest":
        return cls(**json.loads(data))

    @property
    def size(self) -> int:
        return sum(f["size"] for f in self.files.values())


def check_task(task: str) -> str:
    if not isinstance(task, str) or not _TASK.match(task):
        raise RefError(f"task {task!r}: use 1-64 lowercase letters, digits, '-' or '_', starting with a letter or digit")
    return task


def check_alias(alias: str) -> str:
    if not isinstance(alias, str) or not _ALIAS.match(alias):
        raise RefError(f"alias {alias!r}: use lowercase letters, digits, '-' or '_', starting with a letter")
    return alias


def parse_id(artifact_id: str) -> dict[str, str] | None:
    m = _ID.match(artifact_id) if isinstance(artifact_id, str) else None
    return m.groupdict() if m and m["kind"] in KINDS else None


def code_version() -> str:
    """The crucible version plus the git commit it runs from, when there is one."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        v = version("crucible")
    except PackageNotFoundError:
        v = "0+unknown"
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=Path(__file__).parent,
                             capture_output=True, text=True, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=Path(__file__).parent,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        if sha:
            v += f"+g{sha}" + (".dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return v


def file_sha256(path: str | os.PathLike) -> tuple[str, int]:
    h, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


def _blob_key(sha: str) -> str:
    return f"blobs/sha256/{sha[:2]}/{sha}"


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def resolve_registry_uri(uri: str | None = None) -> str:
    """``--registry``, else ``$CRUCIBLE_REGISTRY``, else the local default under the working dir."""
    uri = uri or os.environ.get("CRUCIBLE_REGISTRY") or DEFAULT_REGISTRY
    if uri.startswith("file://") and not uri.startswith("file:///"):
        uri = "file://" + str(Path(uri[len("file://"):]).resolve())
    elif "://" not in uri:
        uri = "file://" + str(Path(uri).resolve())
    return uri


class Registry:
    def __init__(self, store, cache_dir: str | os.PathLike | None = None):
        self.store = store
        self.uri = store.uri
        self.cache_dir = Path(cache_dir or os.environ.get("CRUCIBLE_CACHE") or ".cache/crucible").resolve()

    @classmethod
    def open(cls, uri: str | None = None, **kw) -> "Registry":
        return cls(open_store(resolve_registry_uri(uri)), **kw)

    # -- blobs ---------------------------------------------------------------------------------
    def put_bytes(self, data: bytes) -> tuple[str, int]:
        sha = hashlib.sha256(data).hexdigest()
        if not self.store.exists(_blob_key(sha)):
            self.store.put(_blob_key(sha), data)
        return sha, len(data)

    def put_file(self, path: str | os.PathLike) -> tuple[str, int]:
        sha, size = file_sha256(path)
        if not self.store.exists(_blob_key(sha)):
            self.store.put_file(_blob_key(sha), path)
        return sha, size

    def get_blob(self, sha: str) -> bytes:
        try:
            data = self.store.get(_blob_key(sha))
        except NotFound:
            raise CorruptBlob(f"blob {sha[:12]}…: missing from {self.uri}") from None
        if hashlib.sha256(data).hexdigest() != sha:
            raise CorruptBlob(f"blob {sha[:12]}…: content does not match its sha256 (corrupted in {self.uri})")
        return data

    def _fetch_blob_to(self, sha: str, dest: Path) -> None:
        tmp = dest.with_name(f".tmp-{dest.name}-{secrets.token_hex(4)}")
        try:
            self.store.get_file(_blob_key(sha), tmp)
        except NotFound:
            raise CorruptBlob(f"blob {sha[:12]}…: missing from {self.uri}") from None
        got, _ = file_sha256(tmp)
        if got != sha:
            tmp.unlink()
            raise CorruptBlob(f"blob {sha[:12]}… ({dest.name}): content does not match its sha256 in {self.uri}")
        os.replace(tmp, dest)

    # -- artifacts -----------------------------------------------------------------------------
    def create(self, kind: str, task: str, files: dict[str, str | os.PathLike | bytes] | None = None,
               inputs: dict[str, Any] | None = None, metadata: dict[str, Any] | None = None) -> Manifest:
        """Upload ``files`` (relpath -> local path or bytes), then write the manifest, last."""
        if kind not in KINDS:
            raise RefError(f"kind {kind!r}: must be one of {', '.join(KINDS)}")
        check_task(task)
        entries = {}
        for rel, src in sorted((files or {}).items()):
            _check_relpath(rel)
            sha, size = self.put_bytes(src) if isinstance(src, bytes) else self.put_file(src)
            entries[rel] = {"sha256": sha, "size": size}
        inputs = {"code_version": code_version(), **(inputs or {})}
        now = _now()
        for _ in range(5):
            m = Manifest(id=f"{kind}-{task}-{now:%Y%m%d%H%M%S}-{secrets.token_hex(4)}", kind=kind, task=task,
                         created_at=now.isoformat(timespec="microseconds"), files=entries, inputs=inputs,
                         metadata=metadata or {})
            try:
                self.store.put(self._manifest_key(m.id), m.to_json(), if_absent=True)
                return m
            except PreconditionFailed:
                continue  # an id collision: draw another
        raise RegistryError("could not allocate a unique artifact id after 5 tries")

    def add_directory(self, kind: str, task: str, folder: str | os.PathLike, **kw) -> Manifest:
        folder = Path(folder)
        files = {p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*"))
                 if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)}
        return self.create(kind, task, files, **kw)

    @staticmethod
    def _manifest_key(artifact_id: str) -> str:
        parsed = parse_id(artifact_id)
        if not parsed:
            raise RefError(f"ref {artifact_id!r}: not an artifact id (<kind>-<task>-<stamp>-<hex>) or TASK@ALIAS")
        return f"manifests/{parsed['kind']}/{artifact_id}.json"

    def resolve(self, ref: str) -> str:
        """An artifact id for ``ref`` (an id or ``TASK@ALIAS``)."""
        if isinstance(ref, str) and "@" in ref:
            task, alias = ref.split("@", 1)
            record = self.alias(check_task(task), check_alias(alias))
            if record is None or record["target"] is None:
                raise RefError(f"ref {ref!r}: alias '{alias}' is not set for task '{task}' in {self.uri}")
            return record["target"]
        self._manifest_key(ref)
        return ref

    def get(self, ref: str) -> Manifest:
        artifact_id = self.resolve(ref)
        try:
            return Manifest.from_json(self.store.get(self._manifest_key(artifact_id)))
        except NotFound:
            raise RefError(f"ref {ref!r}: no such artifact in {self.uri}") from None

    def list(self, kind: str | None = None, task: str | None = None) -> list[Manifest]:
        if kind is not None and kind not in KINDS:
            raise RefError(f"kind {kind!r}: must be one of {', '.join(KINDS)}")
        prefix = f"manifests/{kind}/" if kind else "manifests/"
        if kind and task:
            prefix += f"{kind}-{check_task(task)}-"
        out = [Manifest.from_json(self.store.get(o.key)) for o in self.store.list(prefix) if o.key.endswith(".json")]
        out = [m for m in out if task is None or m.task == task]
        return sorted(out, key=lambda m: (m.created_at, m.id))

    def read_file(self, ref: str, relpath: str) -> bytes:
        m = self.get(ref)
        if relpath not in m.files:
            raise RefError(f"{m.id}: has no file {relpath!r} (files: {', '.join(sorted(m.files)) or 'none'})")
        return self.get_blob(m.files[relpath]["sha256"])

    def materialize(self, ref: str, dest: str | os.PathLike | None = None) -> Path:
        """The artifact's files in a local folder, every blob verified. Cached by artifact id."""
        m = self.get(ref)
        dest = Path(dest) if dest else self.cache_dir / "artifacts" / m.id
        marker = dest / ".crucible-complete"
        if marker.exists() and marker.read_text() == m.id:
            return dest
        dest.mkdir(parents=True, exist_ok=True)
        for rel, entry in m.files.items():
            target = dest / _check_relpath(rel)
            target.parent.mkdir(parents=True, exist_ok=True)
            self._fetch_blob_to(entry["sha256"], target)
        marker.write_text(m.id)
        return dest

    def verify(self, ref: str) -> Manifest:
        """Read every blob of an artifact and check its hash; raises ``CorruptBlob``."""
        m = self.get(ref)
        with tempfile.TemporaryDirectory() as tmp:
            for rel, entry in m.files.items():
                self._fetch_blob_to(entry["sha256"], Path(tmp) / "blob")
        return m

    # -- aliases -------------------------------------------------------------------------------
    def _alias_key(self, task: str, alias: str) -> str:
        return f"aliases/{check_task(task)}/{check_alias(alias)}.json"

    def _alias_versioned(self, task: str, alias: str) -> tuple[dict | None, str | None]:
        try:
            data, version = self.store.get_versioned(self._alias_key(task, alias))
        except NotFound:
            return None, None
        return json.loads(data), version

    def alias(self, task: str, alias: str) -> dict | None:
        return self._alias_versioned(task, alias)[0]

    def aliases(self, task: str | None = None) -> dict[str, dict[str, str]]:
        prefix = f"aliases/{check_task(task)}/" if task else "aliases/"
        out: dict[str, dict[str, str]] = {}
        for o in self.store.list(prefix):
            if o.key.endswith(".json"):
                record = json.loads(self.store.get(o.key))
                if record["target"]:
                    out.setdefault(record["task"], {})[record["alias"]] = record["target"]
        return out

    _ANY = object()

    def set_alias(self, task: str, alias: str, ref: str | None, *, expected: Any = _ANY,
                  note: str = "") -> dict:
        """Point ``task@alias`` at ``ref`` (None clears it) with a compare-and-swap.

        ``expected`` is the target the caller believes is current (None: unset); leave it out to
        accept whatever is there now. Either way a concurrent writer makes this raise
        ``AliasConflict`` instead of being overwritten.
        """
        target = None
        if ref is not None:
            target = self.get(ref).id  # the target must exist
            if self.get(target).task != task:
                raise RefError(f"{target}: belongs to task '{self.get(target).task}', not '{task}'")
        record, version = self._alias_versioned(task, alias)
        current = record["target"] if record else None
        if expected is not self._ANY and expected != current:
            raise AliasConflict(f"{task}@{alias}: expected {expected or 'unset'}, found {current or 'unset'}")
        history = (record or {}).get("history", [])
        if current:
            history = ([{"target": current, "until": _now().isoformat(timespec="seconds")}] + history)[:50]
        new = {"task": task, "alias": alias, "target": target, "updated_at": _now().isoformat(timespec="seconds"),
               "note": note, "history": history}
        data = json.dumps(new, indent=2).encode()
        try:
            if version is None:
                self.store.put(self._alias_key(task, alias), data, if_absent=True)
            else:
                self.store.put(self._alias_key(task, alias), data, if_version=version)
        except PreconditionFailed:
            raise AliasConflict(f"{task}@{alias}: changed by another writer while updating it; "
                                "re-read it and try again") from None
        return new

    # -- lineage and housekeeping --------------------------------------------------------------
    def lineage(self, ref: str) -> list[tuple[int, str, Manifest | None]]:
        """Depth-first chain of (depth, input name, manifest) following every input that is an id."""
        out: list[tuple[int, str, Manifest | None]] = []
        seen: set[str] = set()

        def walk(artifact_id: str, depth: int, via: str) -> None:
            try:
                m = self.get(artifact_id)
            except RefError:
                out.append((depth, via, None))
                return
            out.append((depth, via, m))
            if m.id in seen:
                return
            seen.add(m.id)
            for name, value in sorted(m.inputs.items()):
                for v in value if isinstance(value, list) else [value]:
                    if parse_id(v):
                        walk(v, depth + 1, name)

        walk(self.resolve(ref), 0, "")
        return out

    def gc(self, *, min_age_s: float = 3600.0, dry_run: bool = False) -> dict[str, Any]:
        """Delete blobs no manifest references and older than ``min_age_s``.

        The age floor protects a writer that has uploaded blobs but not yet its manifest.
        """
        referenced = {e["sha256"] for m in self.list() for e in m.files.values()}
        now = _now().timestamp()
        removed, kept_young, freed = [], 0, 0
        for o in list(self.store.list("blobs/sha256/")):
            sha = o.key.rsplit("/", 1)[-1]
            if sha in referenced:
                continue
            if now - o.modified < min_age_s:
                kept_young += 1
                continue
            removed.append(sha)
            freed += o.size
            if not dry_run:
                self.store.delete(o.key)
        return {"removed": len(removed), "freed_bytes": freed, "kept_recent_unreferenced": kept_young,
                "referenced": len(referenced), "dry_run": dry_run}


def _check_relpath(rel: str) -> str:
    return check_key(rel)

