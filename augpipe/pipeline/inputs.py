"""Finding the work units of an input corpus: one per tar shard, or row ranges of Parquet/CSV tables.

An output shard is named after its input: ``day2-00000.tar`` gives ``day2-00000.tar`` and a table
``sentences.csv`` gives ``sentences-00000``, ``sentences-00001``... So inputs added on later nights never
collide with earlier ones, even when their numbering restarts. Names are reduced to letters, digits, ``_`` and
``-`` (keys and shard names never hold a dot); two inputs that reduce to the same name each get a short hash
of their path appended.

Local paths are resolved to absolute ones here, before anything is sent to a worker that may run on another
machine with another working directory.
"""

from __future__ import annotations

import hashlib
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from augpipe.pipeline.config import ConfigError, plain
from augpipe.pipeline.storage import FileStat, Store, is_remote

TABULAR_SUFFIXES = (".parquet", ".csv")
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


@dataclass(frozen=True)
class InputUnit:
    """One unit of work: a tar shard (with its optional Parquet sidecar) or a row range of a table."""

    shard_id: str
    source: Store
    rel: str
    kind: str
    start: int = 0
    stop: int | None = None
    sidecar: str | None = None
    size: int = 0
    mtime_ns: int = 0

    @property
    def name(self) -> str:
        return PurePosixPath(self.rel).name

    @property
    def label(self) -> str:
        """Where the unit came from, for messages."""
        return self.name if self.kind == "tar" else f"{self.name}[{self.start}:{self.stop}]"

    @property
    def path(self) -> str:
        """The input file's full path or URI."""
        return self.source.display(self.rel)

    def identity(self) -> dict[str, Any]:
        """What resume compares to tell whether the input changed since its shard was written."""
        ident: dict[str, Any] = {"path": self.path, "bytes": self.size, "mtime_ns": self.mtime_ns}
        if self.kind != "tar":
            ident["rows"] = [self.start, self.stop]
        return ident


def safe_name(stem: str) -> str:
    return _UNSAFE.sub("_", stem).strip("_") or "shard"


def _path_hash(rel: str) -> str:
    return hashlib.sha256(rel.encode()).hexdigest()[:8]


def _name_tars(tars: list[FileStat]) -> dict[str, str]:
    """rel -> shard id: the tar's safe name, with a path hash where two tars would share one."""
    groups: dict[str, list[str]] = defaultdict(list)
    for tar in tars:
        groups[safe_name(PurePosixPath(tar.rel).stem)].append(tar.rel)
    names = {}
    for name, rels in groups.items():
        for rel in rels:
            names[rel] = name if len(rels) == 1 else f"{name}-{_path_hash(rel)}"
    return names


def _table_rows(source: Store, entry: FileStat) -> int:
    try:
        with source.open_read(entry.rel) as fh:
            if entry.rel.endswith(".parquet"):
                return pq.ParquetFile(fh).metadata.num_rows
            return sum(batch.num_rows for batch in pacsv.open_csv(fh))
    except (pa.ArrowInvalid, pa.ArrowException, OSError) as exc:
        kind = "Parquet" if entry.rel.endswith(".parquet") else "CSV"
        where = source.display(entry.rel)
        raise ConfigError(f"input {where} is not a readable {kind} file: {plain(exc)}") from exc


def _locate(location: str) -> tuple[Store, list[FileStat]]:
    """The store holding the input and the candidate files: a folder's top level, or one file."""
    if not is_remote(location):
        local = Store(location)
        path = local.local_path()
        if not path.exists():
            raise ConfigError(f"input {path} does not exist")
        if path.is_dir():
            return local, local.list_files()
        parent = Store(str(path.parent))
        stat = parent.stat(path.name)
        return parent, [stat] if stat else []
    store = Store(location)
    if store.is_dir():
        return store, store.list_files()
    head, _, query = location.partition("?")
    parent_uri, _, name = head.rpartition("/")
    parent = Store(parent_uri + (f"?{query}" if query else ""))
    stat = parent.stat(name)
    if stat is None:
        raise ConfigError(f"input {head} does not exist")
    return parent, [stat]


def discover_inputs(location: str, shard_size: int) -> list[InputUnit]:
    """Work units under ``location`` (a folder of shards, one tar, or one Parquet/CSV file; path or URI)."""
    source, files = _locate(str(location))
    tars = [f for f in files if f.rel.endswith(".tar")]
    if tars:
        by_rel = {f.rel: f for f in files}
        names = _name_tars(tars)
        return [
            InputUnit(
                shard_id=names[tar.rel],
                source=source,
                rel=tar.rel,
                kind="tar",
                sidecar=sidecar if (sidecar := tar.rel[: -len(".tar")] + ".parquet") in by_rel else None,
                size=tar.size,
                mtime_ns=tar.mtime_ns,
            )
            for tar in tars
        ]
    tables = [f for f in files if f.rel.endswith(TABULAR_SUFFIXES)]
    if not tables:
        raise ConfigError(
            f"input {source.display(files[0].rel) if len(files) == 1 else location} holds no .tar shards "
            "and no .parquet/.csv tables; use 'augpipe ingest' to convert a folder of images and captions"
        )
    units = []
    stems = _name_tars(tables)
    for table in tables:
        rows = _table_rows(source, table)
        kind = table.rel.rsplit(".", 1)[1]
        for i, start in enumerate(range(0, max(rows, 1), shard_size)):
            stop = min(start + shard_size, rows)
            units.append(
                InputUnit(
                    f"{stems[table.rel]}-{i:05d}",
                    source,
                    table.rel,
                    kind,
                    start,
                    stop,
                    size=table.size,
                    mtime_ns=table.mtime_ns,
                )
            )
    return units
