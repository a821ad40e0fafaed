"""Content-addressed artifact store.

Every step output lives in its own directory ``<root>/<pipeline>/<step>/<key>/`` where ``key`` is a
hash of everything the output depends on (see ``pipelines.engine.step_key``). A directory counts as
complete only when it holds ``_COMPLETE.json``, written last and listing the size and SHA-256 of every
file; an artifact whose files no longer match its marker is treated as missing, never trusted.

Writes are atomic: a step writes into a private staging directory and the finished directory is
renamed into place (local filesystems) or uploaded with the marker last (object stores reached through
``pyarrow.fs``, e.g. ``s3://bucket/prefix``). A crash at any point leaves either the old state or a
complete artifact, never a directory that looks complete but is not.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs

MARKER = "_COMPLETE.json"
# Files above this size are checked by size only when the store is opened; hashing a multi-GB
# feature cache on every run would cost more than recomputing small steps (benchmarks/engine).
FULL_HASH_LIMIT_BYTES = 256 << 20


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _file_index(directory: Path) -> dict[str, dict]:
    index = {}
    for path in sorted(directory.rglob("*")):
        if path.is_file() and path.name != MARKER:
            rel = path.relative_to(directory).as_posix()
            index[rel] = {"size": path.stat().st_size, "sha256": _sha256(path)}
    return index


def _is_local(uri: str) -> bool:
    return "://" not in uri or uri.startswith("file://")


@dataclass(frozen=True)
class Artifact:
    """One step output: a directory in the store. Picklable (holds only strings)."""

    store_uri: str
    relpath: str  # "<pipeline>/<step>/<key>"

    @property
    def key(self) -> str:
        return self.relpath.rsplit("/", 1)[-1]

    @property
    def uri(self) -> str:
        return f"{self.store_uri.rstrip('/')}/{self.relpath}"

    def local_dir(self) -> Path:
        """A local directory with the artifact's files (downloaded once for remote stores)."""
        store = ArtifactStore(self.store_uri)
        if store.is_local:
            return store.local_root / self.relpath
        cache = Path(tempfile.gettempdir()) / "paperline-cache" / self.relpath
        if not (cache / MARKER).exists():
            tmp = cache.with_name(f".{cache.name}.{uuid.uuid4().hex[:8]}")
            tmp.mkdir(parents=True)
            pafs.copy_files(f"{store.root}/{self.relpath}", str(tmp), source_filesystem=store.fs)
            if cache.exists():
                shutil.rmtree(cache)
            os.replace(tmp, cache)
        return cache

    def path(self, name: str) -> Path:
        """Local path of one file of the artifact."""
        return self.local_dir() / name

    def read_json(self, name: str):
        with open(self.path(name)) as f:
            return json.load(f)


class ArtifactStore:
    """Artifacts under a root URI: a local path (default) or any ``pyarrow.fs`` URI."""

    def __init__(self, uri: str | os.PathLike):
        uri = str(uri)
        if _is_local(uri):
            path = Path(uri.removeprefix("file://")).expanduser().resolve()
            self.uri = str(path)
            self.fs: pafs.FileSystem = pafs.LocalFileSystem()
            self.root = str(path)
        else:
            self.uri = uri.rstrip("/")
            self.fs, self.root = pafs.FileSystem.from_uri(self.uri)

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)

    @property
    def local_root(self) -> Path:
        return Path(self.root)

    def check_writable(self) -> None:
        """Fail early (before any work) when the store cannot be written."""
        probe = f"{self.root}/.write-probe-{uuid.uuid4().hex[:8]}"
        try:
            self.fs.create_dir(self.root, recursive=True)
            with self.fs.open_output_stream(probe) as f:
                f.write(b"ok")
            self.fs.delete_file(probe)
        except OSError as e:
            raise PermissionError(f"{self.uri}: artifact store is not writable ({e})") from e

    def artifact(self, pipeline: str, step: str, key: str) -> Artifact:
        return Artifact(self.uri, f"{pipeline}/{step}/{key}")

    # -- completion ------------------------------------------------------------------------------
    def marker(self, artifact: Artifact) -> dict | None:
        """The completion marker, or None when the artifact is absent, incomplete or corrupt."""
        base = f"{self.root}/{artifact.relpath}"
        try:
            with self.fs.open_input_stream(f"{base}/{MARKER}") as f:
                marker = json.loads(f.read())
        except (OSError, FileNotFoundError, json.JSONDecodeError):
            return None
        files = marker.get("files", {})
        infos = self.fs.get_file_info([f"{base}/{rel}" for rel in files])
        for (rel, meta), info in zip(files.items(), infos, strict=True):
            if info.type != pafs.FileType.File or info.size != meta["size"]:
                return None
            if self.is_local and meta["size"] <= FULL_HASH_LIMIT_BYTES:
                if _sha256(Path(base) / rel) != meta["sha256"]:
                    return None
        return marker

    def is_complete(self, artifact: Artifact) -> bool:
        return self.marker(artifact) is not None

    # -- writing ---------------------------------------------------------------------------------
    @contextlib.contextmanager
    def writer(self, artifact: Artifact, info: dict | None = None) -> Iterator[Path]:
        """Yield an empty local staging directory; on normal exit publish it atomically.

        On an exception nothing is published and the staging directory is removed.
        """
        if self.is_local:
            parent = self.local_root / artifact.relpath
            parent.parent.mkdir(parents=True, exist_ok=True)
            staging = parent.with_name(f".{parent.name}.tmp-{uuid.uuid4().hex[:8]}")
            staging.mkdir()
        else:
            staging = Path(tempfile.mkdtemp(prefix="paperline-stage-"))
        try:
            yield staging
            marker = {
                "artifact": artifact.relpath,
                "created_unix_s": time.time(),
                "files": _file_index(staging),
                **(info or {}),
            }
            (staging / MARKER).write_text(json.dumps(marker, indent=1, sort_keys=True))
            self._publish(staging, artifact)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)

    def _publish(self, staging: Path, artifact: Artifact) -> None:
        if self.is_local:
            final = self.local_root / artifact.relpath
            if final.exists():  # stale or forced: move aside first so the swap stays atomic
                trash = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:8]}")
                os.replace(final, trash)
                shutil.rmtree(trash, ignore_errors=True)
            os.replace(staging, final)
            return
        base = f"{self.root}/{artifact.relpath}"
        with contextlib.suppress(FileNotFoundError, OSError):
            self.fs.delete_dir(base)
        self.fs.create_dir(base, recursive=True)
        for path in sorted(staging.rglob("*")):
            if path.is_file() and path.name != MARKER:
                rel = path.relative_to(staging).as_posix()
                pafs.copy_files(str(path), f"{base}/{rel}", destination_filesystem=self.fs)
        # marker last: until it lands, readers see an incomplete artifact
        pafs.copy_files(str(staging / MARKER), f"{base}/{MARKER}", destination_filesystem=self.fs)
