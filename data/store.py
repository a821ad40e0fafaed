"""Content-addressed artifact store.

Every step output lives in its own directory ``<root>/<pipeline>/<step>/<key>/`` where ``key`` is a
hash of everything the output depends on (see ``pipelines.engine.step_key``). A directory counts as
complete only when it holds ``_COMPLETE.json``, written last and listing the size, mtime and SHA-256
of every file; an artifact whose files no longer match its marker is treated as missing, never
trusted. Checking costs no read of the data: on a local store a file whose size and mtime are those
recorded is taken as written (a file whose mtime changed is hashed again), on an object store the
size is compared; ``verify`` (``paperline verify``) hashes every byte on demand.

Writes are atomic: a step writes into a private staging directory and the finished directory is
renamed into place (local filesystems) or uploaded with the marker last (object stores reached through
``pyarrow.fs``, e.g. ``s3://bucket/prefix``). A crash at any point leaves either the old state or a
complete artifact, never a directory that looks complete but is not.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

MARKER = "_COMPLETE.json"
# A lock whose holder stopped refreshing it for this long is abandoned (its process died on another
# host); on the holder's own host a dead pid is detected at once. Holders refresh every LOCK_BEAT_S.
LOCK_STALE_S = 60.0
LOCK_BEAT_S = 5.0


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _file_index(directory: Path, known: dict[str, dict] | None = None) -> dict[str, dict]:
    """Marker entries of every file under ``directory``. A file that remote work wrote and hashed
    where it wrote it (``known``, from `OutputRef.write`) keeps that hash when its size and mtime
    are still the reported ones; any other file is hashed here, where its bytes were just written
    (the process publishing the step)."""
    known = known or {}
    index = {}
    for path in sorted(directory.rglob("*")):
        if path.is_file() and path.name != MARKER:
            rel = path.relative_to(directory).as_posix()
            st = path.stat()
            meta = known.get(rel, {})
            if (meta.get("size"), meta.get("mtime_ns")) == (st.st_size, st.st_mtime_ns):
                index[rel] = dict(meta)
            else:
                index[rel] = {
                    "size": st.st_size,
                    "mtime_ns": st.st_mtime_ns,
                    "sha256": _sha256(path),
                }
    return index


# Remote artifacts downloaded by this process (relpaths), for tests that count them.
DOWNLOADS: list[str] = []


def node_cache_dir() -> Path:
    """Where this node keeps copies of a remote store's artifacts: ``$PAPERLINE_CACHE_DIR``, else
    ``<tmp>/paperline-cache``. Each copy is named after its artifact's completion marker, filled
    once per node and artifact version, and never changed once in place."""
    return Path(
        os.environ.get("PAPERLINE_CACHE_DIR") or Path(tempfile.gettempdir()) / "paperline-cache"
    )


def join_uri(base: str, *parts: str) -> str:
    """``base`` with path ``parts`` appended, before its query string if it has one:
    ``s3://b/store?endpoint_override=h:9000`` + ``_work`` → ``s3://b/store/_work?endpoint_...``
    (a plain ``f"{base}/_work"`` would put the path into the last query parameter)."""
    path, sep, query = str(base).partition("?")
    return "/".join([path.rstrip("/"), *(p.strip("/") for p in parts)]) + sep + query


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
        return join_uri(self.store_uri, self.relpath)

    def local_dir(self) -> Path:
        """A local directory with the artifact's files (downloaded once for remote stores).

        A remote artifact's copy is named after its completion marker's hash: an artifact
        republished under the same key (``--force``) gets a new copy instead of the stale one,
        and a copy is never deleted or replaced under a reader (sweep trials share a node)."""
        store = ArtifactStore(self.store_uri)
        if store.is_local:
            return store.local_root / self.relpath
        base = f"{store.root}/{self.relpath}"
        with store.fs.open_input_stream(f"{base}/{MARKER}") as f:
            marker_bytes = f.read()
        version = hashlib.sha256(marker_bytes).hexdigest()[:16]
        cache = node_cache_dir() / self.relpath / version
        if (cache / MARKER).exists():
            return cache
        cache.parent.mkdir(parents=True, exist_ok=True)
        # one download per node: concurrent readers on this node (map tasks, actors, trials)
        # wait for the first instead of fetching the same bytes each
        lock_path = cache.parent / f".{cache.name}.lock"
        with open(lock_path, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not (cache / MARKER).exists():
                self._download(store, base, marker_bytes, cache)
            # the copy is in place: later readers never take the lock (safe to remove while
            # others wait on it: each checks for the copy once it holds the lock)
            lock_path.unlink(missing_ok=True)
        return cache

    def _download(self, store: ArtifactStore, base: str, marker_bytes: bytes, cache: Path) -> None:
        tmp = cache.with_name(f".{cache.name}.{uuid.uuid4().hex[:8]}")
        tmp.mkdir(parents=True)
        try:
            pafs.copy_files(base, str(tmp), source_filesystem=store.fs)
            # the copy is checked against the marker it was named after before anyone trusts it
            # (a partial download or a republish mid-copy never becomes the copy)
            marker = json.loads(marker_bytes)
            for rel, meta in marker.get("files", {}).items():
                if _sha256(tmp / rel) != meta["sha256"]:
                    raise OSError(f"{self.uri}/{rel}: downloaded bytes differ from the marker")
            (tmp / MARKER).write_bytes(marker_bytes)
            DOWNLOADS.append(self.relpath)
            os.rename(tmp, cache)  # atomic
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def read_bytes(self, name: str) -> bytes | None:
        """One file of the artifact straight from the store (no copy of the rest), or None."""
        store = ArtifactStore(self.store_uri)
        try:
            with store.fs.open_input_stream(f"{store.root}/{self.relpath}/{name}") as f:
                return f.read()
        except (FileNotFoundError, OSError):
            return None

    def parquet_rows(self, name: str) -> int:
        """Rows of one Parquet file of the artifact, from its footer alone (no copy of the file
        or of the rest of the artifact)."""
        store = ArtifactStore(self.store_uri)
        with store.fs.open_input_file(f"{store.root}/{self.relpath}/{name}") as f:
            return pq.ParquetFile(f).metadata.num_rows

    def file_bytes(self, prefix: str = "") -> int:
        """Bytes of the artifact's files (those under ``prefix``, a file or folder name), from
        its marker alone: nothing is copied or listed."""
        raw = self.read_bytes(MARKER)
        if raw is None:
            raise FileNotFoundError(f"{self.uri}: no completion marker (not a complete artifact)")
        files = json.loads(raw).get("files", {})
        return sum(
            m["size"]
            for rel, m in files.items()
            if not prefix or rel == prefix or rel.startswith(prefix.rstrip("/") + "/")
        )

    def copy_out(self, name: str, dest: Path) -> None:
        """Copy one file or folder of the artifact to ``dest`` (absent names are skipped)."""
        store = ArtifactStore(self.store_uri)
        src = f"{store.root}/{self.relpath}/{name}"
        info = store.fs.get_file_info(src)
        if info.type == pafs.FileType.Directory:
            dest.mkdir(parents=True, exist_ok=True)
            pafs.copy_files(src, str(dest), source_filesystem=store.fs)
        elif info.type == pafs.FileType.File:
            pafs.copy_files(src, str(dest), source_filesystem=store.fs)

    def file(self, name: str = "") -> ArtifactFile:
        """A reference to one file of the artifact, for remote work to resolve on its node."""
        return ArtifactFile(self, name)

    def path(self, name: str) -> Path:
        """Local path of one file of the artifact."""
        return self.local_dir() / name

    def read_json(self, name: str):
        with open(self.path(name)) as f:
            return json.load(f)


@dataclass(frozen=True)
class ArtifactFile:
    """A reference to one file (or folder) of an artifact, resolved where it is used: remote work
    (map tasks, Tune trials, Train workers) gets this, not a path of the driver's disk, and
    ``os.fspath(ref)`` / ``str(ref)`` / ``Path(ref)`` give a path on the node that runs it — the
    store's own path on a mounted filesystem, else this node's verified copy (issue 18).
    Picklable: it holds two strings and a name."""

    artifact: Artifact
    name: str = ""  # relative to the artifact's directory; "" = the directory itself

    def path(self) -> Path:
        base = self.artifact.local_dir()
        return base / self.name if self.name else base

    def __fspath__(self) -> str:
        return str(self.path())

    def __str__(self) -> str:
        return str(self.path())

    def __truediv__(self, name: str) -> ArtifactFile:
        return ArtifactFile(self.artifact, f"{self.name}/{name}" if self.name else name)


@dataclass(frozen=True)
class OutputRef:
    """Where remote work (a Ray Data actor on any node) writes a file of the artifact its step is
    computing, straight into the store from the node that computed it — no round trip through the
    driver, and no driver path handed out (issue 18). On a local store (a filesystem every node
    mounts at the same path) that is the step's staging directory; on an object store, the
    artifact's own prefix, emptied when the step started and complete only once the step's process
    writes the marker last. Picklable: three strings."""

    store_uri: str
    location: str  # the staging directory (local store) or the artifact's prefix (object store)
    name: str = ""

    def __truediv__(self, name: str) -> OutputRef:
        return OutputRef(
            self.store_uri, self.location, f"{self.name}/{name}" if self.name else name
        )

    def write(self, write_fn) -> dict:
        """Call ``write_fn(path)`` to write this file, hash it here, put it in place; returns its
        marker entry (``size``, ``sha256``, and ``mtime_ns`` on a local store) for the step's
        process to pass to ``StepContext.add_files`` — so the bytes are hashed once, where they
        were written, not read again by the publishing process."""
        if not self.name:
            raise ValueError("OutputRef.write needs a file name: ref / 'dir' / 'file.parquet'")
        store = ArtifactStore(self.store_uri)
        if store.is_local:
            final = Path(self.location) / self.name
            final.parent.mkdir(parents=True, exist_ok=True)
            # written beside the staging directory, not in it: a writer killed mid-file leaves
            # nothing the marker would list (`gc` removes it with the staging leftovers)
            staging = Path(self.location)
            tmp = staging.with_name(f"{staging.name}.part-{uuid.uuid4().hex[:8]}")
            try:
                write_fn(tmp)
                meta = {"size": tmp.stat().st_size, "sha256": _sha256(tmp)}
                os.replace(tmp, final)  # a retried writer never leaves a half-written file
            finally:
                tmp.unlink(missing_ok=True)
            return {**meta, "mtime_ns": final.stat().st_mtime_ns}
        with tempfile.TemporaryDirectory(prefix="paperline-out-") as d:
            tmp = Path(d) / Path(self.name).name
            write_fn(tmp)
            meta = {"size": tmp.stat().st_size, "sha256": _sha256(tmp)}
            dest = f"{self.location}/{self.name}"
            store.fs.create_dir(dest.rsplit("/", 1)[0], recursive=True)  # no-op on object stores
            pafs.copy_files(str(tmp), dest, destination_filesystem=store.fs)
        return meta

    def open_input(self):
        """This file, written through `write` by this step, for reading back before the step
        publishes it (a pyarrow file: local, or streamed from the object store's prefix)."""
        store = ArtifactStore(self.store_uri)
        if store.is_local:
            return pafs.LocalFileSystem().open_input_file(str(Path(self.location) / self.name))
        return store.fs.open_input_file(f"{self.location}/{self.name}")

    def delete(self) -> None:
        """Remove this file, written through `write` by this step and read back: scratch that the
        artifact does not keep (never added to the marker). A file already gone is no error, so a
        retried step may delete again."""
        store = ArtifactStore(self.store_uri)
        if store.is_local:
            (Path(self.location) / self.name).unlink(missing_ok=True)
            return
        try:
            store.fs.delete_file(f"{self.location}/{self.name}")
        except FileNotFoundError:
            pass


def filesystem_from_uri(uri: str) -> tuple[pafs.FileSystem, str]:
    """``(filesystem, root path)`` of a non-local store URI (one place, for tests to stand in)."""
    return pafs.FileSystem.from_uri(uri)


class StoreError(ValueError):
    """A store URI that pyarrow cannot open (unknown scheme, malformed)."""


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
            try:
                self.fs, self.root = filesystem_from_uri(self.uri)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError, ValueError) as e:
                raise StoreError(
                    f"{uri}: not a usable artifact store URI ({e}); expected a local path or a "
                    "pyarrow.fs URI such as s3://bucket/prefix or gs://bucket/prefix"
                ) from None

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

    def clear_work(self, pipeline: str, name: str) -> None:
        """Delete ``_work/<pipeline>/<name>`` (a Train run's checkpoints, a Tune experiment), so
        that a recomputation starts from scratch instead of resuming from it."""
        with contextlib.suppress(FileNotFoundError, OSError):
            self.fs.delete_dir(f"{self.root}/_work/{pipeline}/{name}")

    # -- cleaning up -----------------------------------------------------------------------------
    def gc(self, dry_run: bool = False) -> dict[str, list[str]]:
        """Remove what no run will read again (``paperline gc``): staging and moved-aside
        directories of steps that are not being computed now, stale locks, Train checkpoints and
        Tune experiments under ``_work/`` whose artifact is complete, and this node's downloaded
        copies that a republished artifact superseded. Returns what was (or would be) removed."""
        removed: dict[str, list[str]] = {"staging": [], "locks": [], "work": [], "cache": []}
        entries = self.fs.get_file_info(
            pafs.FileSelector(self.root, recursive=True, allow_not_found=True)
        )
        complete_keys = set()
        for info in entries:
            rel = info.path[len(self.root) :].lstrip("/")
            parts = rel.split("/")
            if parts[-1] == MARKER and len(parts) == 4 and not parts[0].startswith(("_", ".")):
                complete_keys.add(parts[2])
        for info in entries:
            rel = info.path[len(self.root) :].lstrip("/")
            parts = rel.split("/")
            name = parts[-1]
            if len(parts) == 3 and name.endswith(".lock"):
                if self._lock_is_stale(info.path, self._lock_owner(info.path)):
                    removed["locks"].append(rel)
            elif len(parts) == 3 and name.startswith(".") and (".tmp-" in name or ".old-" in name):
                key = name[1:].split(".", 1)[0]
                lock = f"{self.root}/{'/'.join(parts[:2])}/{key}.lock"
                if self.fs.get_file_info(lock).type == pafs.FileType.NotFound or (
                    self._lock_is_stale(lock, self._lock_owner(lock))
                ):
                    removed["staging"].append(rel)
            elif len(parts) == 3 and parts[0] == "_work" and info.type == pafs.FileType.Directory:
                if name.rsplit("-", 1)[-1] in complete_keys:  # "<step>-<key>": nothing to resume
                    removed["work"].append(rel)
        if not dry_run:
            for kind in ("locks", "staging", "work"):
                for rel in removed[kind]:
                    path = f"{self.root}/{rel}"
                    with contextlib.suppress(OSError, FileNotFoundError):
                        if kind == "locks":
                            self.fs.delete_file(path)
                        else:
                            self.fs.delete_dir(path)
        if not self.is_local:
            removed["cache"] = self._gc_cache(dry_run)
        return removed

    def _gc_cache(self, dry_run: bool) -> list[str]:
        """This node's copies of this store's artifacts whose marker is no longer the store's."""
        out = []
        cache_root = node_cache_dir()
        for art in self.artifacts():
            local = cache_root / art.relpath
            if not local.is_dir():
                continue
            current = art.read_bytes(MARKER)
            version = hashlib.sha256(current).hexdigest()[:16] if current else None
            for copy in local.iterdir():
                if copy.name != version:
                    out.append(str(copy))
                    if not dry_run:
                        shutil.rmtree(copy, ignore_errors=True)
        return out

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
            if self.is_local and info.mtime_ns != meta.get("mtime_ns"):
                # touched since it was written (or a marker from before mtimes were recorded):
                # its bytes decide
                if _sha256(Path(base) / rel) != meta["sha256"]:
                    return None
        return marker

    def verify(self, artifact: Artifact) -> list[str]:
        """Every file of a complete artifact hashed in full against its marker (any store, any
        size): the problems found, empty when it is intact."""
        base = f"{self.root}/{artifact.relpath}"
        try:
            with self.fs.open_input_stream(f"{base}/{MARKER}") as f:
                marker = json.loads(f.read())
        except (OSError, FileNotFoundError, json.JSONDecodeError) as e:
            return [f"{artifact.relpath}: no readable {MARKER} ({e})"]
        problems = []
        for rel, meta in marker.get("files", {}).items():
            h, size = hashlib.sha256(), 0
            try:
                with self.fs.open_input_stream(f"{base}/{rel}") as f:
                    while chunk := f.read(1 << 20):
                        h.update(chunk)
                        size += len(chunk)
            except (OSError, FileNotFoundError):
                problems.append(f"{artifact.relpath}/{rel}: missing")
                continue
            if size != meta["size"] or h.hexdigest() != meta["sha256"]:
                problems.append(
                    f"{artifact.relpath}/{rel}: {size} bytes, sha256 {h.hexdigest()[:12]}…; "
                    f"marker says {meta['size']} bytes, {meta['sha256'][:12]}…"
                )
        return problems

    def artifacts(self) -> list[Artifact]:
        """Every artifact with a completion marker (``<pipeline>/<step>/<key>/``)."""
        sel = pafs.FileSelector(self.root, recursive=True, allow_not_found=True)
        out = []
        for info in self.fs.get_file_info(sel):
            rel = info.path[len(self.root) :].lstrip("/")
            parts = rel.split("/")
            if parts[-1] == MARKER and len(parts) == 4 and not parts[0].startswith(("_", ".")):
                if not any(p.startswith(".") for p in parts):
                    out.append(Artifact(self.uri, "/".join(parts[:3])))
        return sorted(out, key=lambda a: a.relpath)

    def is_complete(self, artifact: Artifact) -> bool:
        return self.marker(artifact) is not None

    # -- computing an artifact once -----------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self, artifact: Artifact, poll_s: float = 0.2) -> Iterator[float]:
        """Hold the right to compute ``artifact``; yields the seconds spent waiting for it.

        Concurrent runs (sweep trials, two ``paperline run`` commands) that need the same artifact
        compute it once: the first takes the lock, the others wait here and then find it complete.
        Local stores use an ``O_EXCL`` lock file beside the artifact with a heartbeat, broken when
        its holder's pid is gone (same host) or its heartbeat is older than ``LOCK_STALE_S``. On
        object stores, which have no exclusive create, the lock is best effort (write, then read
        back the owner token).
        """
        path = f"{self.root}/{artifact.relpath}.lock"
        token = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        t0 = time.monotonic()
        while not self._try_lock(path, token):
            time.sleep(poll_s)
        waited = time.monotonic() - t0
        stop = threading.Event()
        beat = threading.Thread(target=self._heartbeat, args=(path, token, stop), daemon=True)
        beat.start()
        try:
            yield waited
        finally:
            stop.set()
            beat.join()
            if self._lock_owner(path) == token:
                with contextlib.suppress(OSError, FileNotFoundError):
                    self.fs.delete_file(path)

    def _lock_owner(self, path: str) -> str | None:
        try:
            with self.fs.open_input_stream(path) as f:
                return f.read().decode().strip() or None
        except (OSError, FileNotFoundError):
            return None

    def _lock_is_stale(self, path: str, owner: str | None) -> bool:
        info = self.fs.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            return False
        host, _, rest = (owner or "").partition(":")
        pid = rest.partition(":")[0]
        if host == socket.gethostname() and pid.isdigit():
            try:
                os.kill(int(pid), 0)
            except ProcessLookupError:
                return True
            except PermissionError:
                pass
        age = time.time() - info.mtime.timestamp() if info.mtime else 0.0
        return age > LOCK_STALE_S

    def _try_lock(self, path: str, token: str) -> bool:
        owner = self._lock_owner(path)
        # an empty or unreadable lock (its holder died before writing, a power loss) has no
        # owner to ask: it is judged by age alone, like any lock whose holder cannot be checked
        held = owner is not None or self.fs.get_file_info(path).type != pafs.FileType.NotFound
        if held and self._lock_is_stale(path, owner):
            self._break_lock(path, owner)
        elif held:
            return False
        if self.is_local:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            # the lock appears already holding its token: written aside, then hard-linked into
            # place (link fails if the lock exists, as O_EXCL would, but never leaves it empty)
            aside = f"{path}.{uuid.uuid4().hex[:8]}.new"
            Path(aside).write_text(token)
            try:
                os.link(aside, path)
            except FileExistsError:
                return False
            except OSError:  # no hard links here (some FUSE mounts): exclusive create, then write
                return self._create_exclusive(path, token)
            finally:
                os.unlink(aside)
            return True
        self.fs.create_dir(path.rsplit("/", 1)[0], recursive=True)  # no-op on object stores
        with self.fs.open_output_stream(path) as f:  # best effort: last writer wins, then check
            f.write(token.encode())
        time.sleep(0.5)
        return self._lock_owner(path) == token

    @staticmethod
    def _create_exclusive(path: str, token: str) -> bool:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(token)
        return True

    def _break_lock(self, path: str, owner: str | None) -> None:
        if self.is_local:
            # rename is atomic: of several waiters breaking the same lock exactly one succeeds
            with contextlib.suppress(FileNotFoundError):
                aside = f"{path}.stale-{uuid.uuid4().hex[:8]}"
                os.replace(path, aside)
                if self._lock_owner(aside) != owner:  # it was re-taken meanwhile: put it back
                    with contextlib.suppress(OSError):
                        os.link(aside, path)
                os.unlink(aside)
        elif self._lock_owner(path) == owner:
            with contextlib.suppress(OSError, FileNotFoundError):
                self.fs.delete_file(path)

    def _heartbeat(self, path: str, token: str, stop: threading.Event) -> None:
        while not stop.wait(LOCK_BEAT_S):
            if self._lock_owner(path) != token:
                return
            if self.is_local:
                with contextlib.suppress(OSError):
                    os.utime(path)
            else:
                with contextlib.suppress(OSError):
                    with self.fs.open_output_stream(path) as f:
                        f.write(token.encode())

    # -- writing ---------------------------------------------------------------------------------
    @contextlib.contextmanager
    def writer(
        self, artifact: Artifact, info: dict | None = None, remote: dict | None = None
    ) -> Iterator[Path]:
        """Yield an empty local staging directory; on normal exit publish it atomically.

        On an exception nothing is published and the staging directory is removed. ``remote``
        (filled while the step runs) maps the names of files that remote work wrote through
        `output_ref` to their marker entries; they are part of the artifact without being read
        again here. On an object store the artifact's prefix is emptied first (the caller holds
        the artifact's lock), since remote writers fill it before the marker lands.
        """
        if self.is_local:
            parent = self.local_root / artifact.relpath
            parent.parent.mkdir(parents=True, exist_ok=True)
            staging = parent.with_name(f".{parent.name}.tmp-{uuid.uuid4().hex[:8]}")
            staging.mkdir()
        else:
            with contextlib.suppress(FileNotFoundError, OSError):
                self.fs.delete_dir(f"{self.root}/{artifact.relpath}")
            staging = Path(tempfile.mkdtemp(prefix="paperline-stage-"))
        remote = {} if remote is None else remote
        try:
            yield staging
            files = _file_index(staging, remote if self.is_local else None)
            if not self.is_local:
                files.update({rel: dict(meta) for rel, meta in remote.items()})
            marker = {
                "artifact": artifact.relpath,
                "created_unix_s": time.time(),
                "files": dict(sorted(files.items())),
                **(info or {}),
            }
            (staging / MARKER).write_text(json.dumps(marker, indent=1, sort_keys=True))
            self._publish(staging, artifact)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)

    def output_ref(self, artifact: Artifact, staging: Path) -> OutputRef:
        """Where remote work writes files of ``artifact`` while it is staged in ``staging``."""
        if self.is_local:
            return OutputRef(self.uri, str(staging))
        return OutputRef(self.uri, f"{self.root}/{artifact.relpath}")

    def _publish(self, staging: Path, artifact: Artifact) -> None:
        if self.is_local:
            final = self.local_root / artifact.relpath
            if final.exists():  # stale or forced: move aside first so the swap stays atomic
                trash = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:8]}")
                os.replace(final, trash)
                shutil.rmtree(trash, ignore_errors=True)
            os.replace(staging, final)
            return
        base = f"{self.root}/{artifact.relpath}"  # emptied by `writer`; may hold remote files
        self.fs.create_dir(base, recursive=True)
        for path in sorted(staging.rglob("*")):
            if path.is_file() and path.name != MARKER:
                rel = path.relative_to(staging).as_posix()
                pafs.copy_files(str(path), f"{base}/{rel}", destination_filesystem=self.fs)
        # marker last: until it lands, readers see an incomplete artifact
        pafs.copy_files(str(staging / MARKER), f"{base}/{MARKER}", destination_filesystem=self.fs)
