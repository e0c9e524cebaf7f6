"""Where corpora live: a local folder or an object-store prefix, addressed by relative POSIX paths.

Every read and write of inputs and outputs goes through a ``Store``, so the engine runs the same against a
local disk and against S3 or GCS (pyarrow filesystems, e.g. ``s3://bucket/corpus?endpoint_override=...``).
Writes are atomic on both: locally a hidden temporary file in the same folder is fsynced and renamed over
the target; an object store makes an object visible only when its upload completes, so writing the final
key directly is already atomic. Temporary names carry a marker no user file has
(``.NAME.augpipe-<12 hex>.partial``), so cleaning up after a killed run never touches a file augpipe did not
write.

A Store pickles as its URI alone (it travels to Ray workers); the filesystem object is rebuilt on first use.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path, PurePosixPath
from typing import IO, Any

PARTIAL_PATTERN = re.compile(r"^\..+\.augpipe-[0-9a-f]{12}\.partial$")
STORAGE_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.EACCES, errno.EPERM}


class StorageError(OSError):
    """The output cannot be written (disk full, read-only, no permission); the run must stop cleanly."""


def is_storage_error(exc: BaseException) -> bool:
    """True for errors no retry or other sample can fix: the storage itself refuses writes."""
    return isinstance(exc, StorageError) or (isinstance(exc, OSError) and exc.errno in STORAGE_ERRNOS)


def is_remote(location: str) -> bool:
    return "://" in location and not location.startswith("file://")


def partial_name(name: str) -> str:
    """A hidden temporary name beside ``name`` that only augpipe produces (see PARTIAL_PATTERN)."""
    return f".{name}.augpipe-{uuid.uuid4().hex[:12]}.partial"


@dataclass(frozen=True)
class FileStat:
    """A file under a store: its relative path, size and modification time (ns since the epoch)."""

    rel: str
    size: int
    mtime_ns: int


class Store:
    """A folder (local path or object-store URI) under which files are read and written atomically."""

    def __init__(self, location: str | os.PathLike[str]) -> None:
        text = str(location)
        if text.startswith("file://"):
            text = text[len("file://") :]
        if is_remote(text):
            self.location = text.rstrip("/")
        else:
            self.location = str(Path(text).expanduser().resolve())

    def __getstate__(self) -> dict[str, Any]:
        return {"location": self.location}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.location = state["location"]

    def __repr__(self) -> str:
        return f"Store({self.location!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Store) and other.location == self.location

    def __hash__(self) -> int:
        return hash(self.location)

    @property
    def remote(self) -> bool:
        return is_remote(self.location)

    @cached_property
    def _fs(self) -> tuple[Any, str]:
        from pyarrow import fs

        filesystem, base = fs.FileSystem.from_uri(self.location)
        return filesystem, base.rstrip("/")

    def _full(self, rel: str) -> str:
        rel = str(PurePosixPath(rel)) if rel else ""
        if self.remote:
            base = self._fs[1]
            return f"{base}/{rel}" if rel and rel != "." else base
        return os.path.join(self.location, rel) if rel and rel != "." else self.location

    def child(self, rel: str) -> Store:
        """The store of a sub-folder."""
        if not rel:
            return self
        if self.remote:
            head, sep, query = self.location.partition("?")
            return Store(f"{head.rstrip('/')}/{rel}{sep}{query}")
        return Store(os.path.join(self.location, rel))

    def display(self, rel: str = "") -> str:
        """The path or URI of ``rel`` for messages (object-store query options left out)."""
        if self.remote:
            head = self.location.partition("?")[0]
            return f"{head}/{rel}" if rel else head
        return self._full(rel)

    def local_path(self, rel: str = "") -> Path:
        """The real path of ``rel``; only for local stores."""
        if self.remote:
            raise ValueError(f"{self.display(rel)} is not on local disk")
        return Path(self._full(rel))

    # ------------------------------------------------------------------------------------- reading

    def stat(self, rel: str) -> FileStat | None:
        """Size and mtime of a file, or None when it does not exist (or is a folder)."""
        if not self.remote:
            try:
                st = os.stat(self._full(rel))
            except (FileNotFoundError, NotADirectoryError):
                return None
            return FileStat(rel, st.st_size, st.st_mtime_ns) if not os.path.isdir(self._full(rel)) else None
        from pyarrow import fs

        info = self._fs[0].get_file_info(self._full(rel))
        if info.type != fs.FileType.File:
            return None
        return FileStat(rel, info.size, info.mtime_ns or 0)

    def exists(self, rel: str) -> bool:
        return self.stat(rel) is not None

    def is_dir(self, rel: str = "") -> bool:
        if not self.remote:
            return os.path.isdir(self._full(rel))
        from pyarrow import fs

        return self._fs[0].get_file_info(self._full(rel)).type == fs.FileType.Directory

    def list_files(self, rel: str = "", recursive: bool = False) -> list[FileStat]:
        """Files under folder ``rel`` (sorted by path), relative to the store; [] when it does not exist."""
        if not self.remote:
            root = Path(self._full(rel))
            if not root.is_dir():
                return []
            paths = root.rglob("*") if recursive else root.iterdir()
            found = []
            for path in paths:
                with contextlib.suppress(FileNotFoundError):
                    if path.is_file() and not path.is_symlink():
                        st = path.stat()
                        found.append(
                            FileStat(path.relative_to(self.location).as_posix(), st.st_size, st.st_mtime_ns)
                        )
            return sorted(found, key=lambda f: f.rel)
        from pyarrow import fs

        selector = fs.FileSelector(self._full(rel), recursive=recursive, allow_not_found=True)
        base = self._fs[1]
        return sorted(
            (
                FileStat(info.path[len(base) :].lstrip("/"), info.size, info.mtime_ns or 0)
                for info in self._fs[0].get_file_info(selector)
                if info.type == fs.FileType.File
            ),
            key=lambda f: f.rel,
        )

    def open_read(self, rel: str) -> IO[bytes]:
        """A seekable binary reader."""
        if not self.remote:
            return open(self._full(rel), "rb")
        return self._fs[0].open_input_file(self._full(rel))

    def read_bytes(self, rel: str) -> bytes:
        with self.open_read(rel) as fh:
            return fh.read()

    def sha256(self, rel: str) -> str:
        digest = hashlib.sha256()
        with self.open_read(rel) as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
        return digest.hexdigest()

    @contextlib.contextmanager
    def local_copy(self, rel: str) -> Iterator[Path]:
        """``rel`` as a file on local disk: itself when local, else a temporary download."""
        if not self.remote:
            yield Path(self._full(rel))
            return
        with tempfile.TemporaryDirectory(prefix="augpipe-") as folder:
            target = Path(folder) / PurePosixPath(rel).name
            with self.open_read(rel) as src, target.open("wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            yield target

    # ------------------------------------------------------------------------------------- writing

    def makedirs(self, rel: str) -> None:
        if not self.remote:
            os.makedirs(self._full(rel), exist_ok=True)
        else:
            self._fs[0].create_dir(self._full(rel), recursive=True)

    def write_atomic(self, rel: str, write: Callable[[IO[bytes]], None]) -> None:
        """Write ``rel`` so that readers see the old file or the whole new one, never a part."""
        if self.remote:
            with self._fs[0].open_output_stream(self._full(rel)) as fh:
                write(fh)
            return
        target = Path(self._full(rel))
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(partial_name(target.name))
        try:
            with partial.open("wb") as fh:
                write(fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(partial, target)
        except BaseException:
            with contextlib.suppress(OSError):
                partial.unlink()
            raise

    def write_bytes(self, rel: str, data: bytes) -> None:
        self.write_atomic(rel, lambda fh: fh.write(data))

    def create_exclusive(self, rel: str, data: bytes) -> bool:
        """Create ``rel`` only if it does not exist; False when it does (a lock held by someone else).

        Exact on local disk (O_EXCL); on an object store it checks then writes, which is good enough to stop
        an accidental second run but not two runs started in the same second.
        """
        if self.remote:
            if self.exists(rel):
                return False
            self.write_bytes(rel, data)
            return True
        target = Path(self._full(rel))
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        return True

    def delete(self, rel: str) -> None:
        """Remove a file; a missing one is not an error."""
        if not self.remote:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._full(rel))
            return
        with contextlib.suppress(FileNotFoundError, OSError):
            self._fs[0].delete_file(self._full(rel))

    def delete_tree(self, rel: str) -> None:
        if not self.remote:
            shutil.rmtree(self._full(rel), ignore_errors=True)
            return
        with contextlib.suppress(FileNotFoundError, OSError):
            self._fs[0].delete_dir(self._full(rel))

    def move(self, src: str, dst: str) -> None:
        """Rename a file within the store (an object store copies, then deletes)."""
        if not self.remote:
            os.makedirs(os.path.dirname(self._full(dst)), exist_ok=True)
            os.replace(self._full(src), self._full(dst))
            return
        self._fs[0].move(self._full(src), self._full(dst))

    def upload_dir(self, local: Path, rel: str) -> None:
        """Copy a local folder's files under ``rel`` (each file atomically)."""
        for path in sorted(p for p in local.rglob("*") if p.is_file()):
            data = path.read_bytes()
            self.write_bytes(f"{rel}/{path.relative_to(local).as_posix()}", data)

    def download_dir(self, rel: str, local: Path) -> None:
        for entry in self.list_files(rel, recursive=True):
            target = local / PurePosixPath(entry.rel).relative_to(rel)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(self.read_bytes(entry.rel))

    def remove_partials(self, rel: str = "", recursive: bool = True) -> int:
        """Delete temporary files a killed run of augpipe left under ``rel``; never any other file."""
        stale = [
            f for f in self.list_files(rel, recursive) if PARTIAL_PATTERN.match(PurePosixPath(f.rel).name)
        ]
        for entry in stale:
            self.delete(entry.rel)
        return len(stale)

    def free_bytes(self) -> int | None:
        """Free space on the local disk holding the store; None for object stores (no such limit)."""
        if self.remote:
            return None
        path = Path(self.location)
        while not path.exists():
            path = path.parent
        return shutil.disk_usage(path).free
