"""Turning corpora users already have into WebDataset shards augpipe (and any trainer) can read.

Accepted: a CSV or Parquet table with ``text`` (and optional ``key``, ``label``), a folder of images each
with a same-named ``.txt`` caption (and optional ``.json`` metadata), or an img2dataset output folder,
whose shards are already WebDataset and are copied with their sidecars unchanged.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import webdataset as wds

from augpipe.pipeline.config import ConfigError, plain
from augpipe.pipeline.storage import Store

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp"}


def _safe_key(text: str) -> str:
    """Keys contain no '.' (WebDataset splits member names at the first dot) and no path tricks."""
    return re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_") or "sample"


def write_shards(samples: Iterator[dict[str, Any]], out_dir: Path, shard_size: int) -> list[Path]:
    """Samples (``__key__`` plus extension -> bytes) into ``shard-NNNNN.tar`` files of ``shard_size``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    store = Store(out_dir)
    paths: list[Path] = []
    batch: list[dict[str, Any]] = []

    def flush() -> None:
        name = f"shard-{len(paths):05d}.tar"

        def write(fh: Any) -> None:
            with wds.TarWriter(fh, mtime=0, user="augpipe", group="augpipe", encoder=False) as sink:
                for sample in batch:
                    sink.write(sample)

        store.write_atomic(name, write)
        paths.append(out_dir / name)
        batch.clear()

    for sample in samples:
        batch.append(sample)
        if len(batch) == shard_size:
            flush()
    if batch:
        flush()
    return paths


def unique_keys(raw: list[str], what: str) -> list[str]:
    """Safe keys for ``raw`` names; refuses repeated names and names that only differ in unsafe characters.

    Samples are joined on their keys downstream: two rows under one key would be merged by a WebDataset
    reader or dropped as duplicates, so ingest refuses rather than lose one silently.
    """
    keys = [_safe_key(name) for name in raw]
    first: dict[str, int] = {}
    for i, key in enumerate(keys):
        if key in first:
            j = first[key]
            same = raw[i] == raw[j]
            detail = (
                f"{what} {j} and {i} share the key {raw[i]!r}"
                if same
                else f"{what} {j} ({raw[j]!r}) and {i} ({raw[i]!r}) both become the key {key!r}"
            )
            raise ConfigError(f"cannot ingest: {detail}; keys must be unique (rename or drop one)")
        first[key] = i
    return keys


def table_samples(table: pa.Table) -> Iterator[dict[str, Any]]:
    if "text" not in table.column_names:
        raise ConfigError(f"a text table needs a 'text' column; found {table.column_names}")
    records = table.to_pylist()
    keys = unique_keys([str(r.get("key") or f"row{i:09d}") for i, r in enumerate(records)], "rows")
    for key, record in zip(keys, records, strict=True):
        meta = {k: v for k, v in record.items() if k not in {"key", "text"} and v is not None}
        yield {"__key__": key, "txt": str(record["text"] or "").encode(), "json": json.dumps(meta).encode()}


def _folder_samples(folder: Path) -> Iterator[dict[str, Any]]:
    images = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise ConfigError(f"{folder} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    keys = unique_keys([str(image.relative_to(folder).with_suffix("")) for image in images], "images")
    for key, image in zip(keys, images, strict=True):
        sample = {"__key__": key, image.suffix.lower().lstrip(".").replace("jpeg", "jpg"): image.read_bytes()}
        for suffix in (".txt", ".json"):
            companion = image.with_suffix(suffix)
            if companion.exists():
                sample[suffix[1:]] = companion.read_bytes()
        yield sample


def ingest(source: Path, out_dir: Path, shard_size: int = 1000) -> list[Path]:
    """Convert ``source`` into shards under ``out_dir``; returns the shards written."""
    if source.is_file() and source.suffix in {".csv", ".parquet"}:
        try:
            table = pacsv.read_csv(source) if source.suffix == ".csv" else pq.read_table(source)
        except (pa.ArrowException, OSError) as exc:
            kind = "CSV" if source.suffix == ".csv" else "Parquet"
            raise ConfigError(f"{source} is not a readable {kind} file: {plain(exc)}") from exc
        return write_shards(table_samples(table), out_dir, shard_size)
    if source.is_dir() and any(source.glob("*.tar")):
        out_dir.mkdir(parents=True, exist_ok=True)
        copied = []
        for item in sorted(source.iterdir()):
            if item.suffix in {".tar", ".parquet"} or item.name.endswith("_stats.json"):
                shutil.copy2(item, out_dir / item.name)
                copied.append(out_dir / item.name)
        return copied
    if source.is_dir():
        return write_shards(_folder_samples(source), out_dir, shard_size)
    raise ConfigError(f"cannot ingest {source}: expected a .csv/.parquet file or a folder")
