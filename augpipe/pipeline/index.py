"""The pre-pass over every input before any work: sample counts, checksums and keys seen twice.

Reading keys (tar headers, or a table's key column) costs little next to decoding, and knowing them first
settles three things no shard can settle alone: which copy of a key repeated across shards is kept (the
first in input order; later copies fail as ``duplicate_key``), how many samples the corpus holds (for the
progress ETA, the fit sample rate, and to count the samples of a shard that vanishes before it is read),
and each input's checksum, taken once here rather than re-read at the end. Indexes are cached per input
under ``_augpipe/index/`` and reused while the input's size and mtime are unchanged.

Keys are compared as 128-bit BLAKE2b digests, so the cross-shard check holds 16 bytes per sample in one
worker, never the keys themselves on the driver.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from augpipe.pipeline import layout
from augpipe.pipeline.inputs import InputUnit
from augpipe.pipeline.reader import table_key
from augpipe.pipeline.rows import key_digest
from augpipe.pipeline.storage import Store
from augpipe.pipeline.tarscan import Damage, Sample, scan_samples

INDEX_FORMAT = 1


def digests(keys: Iterable[str]) -> np.ndarray:
    """(n,) array of 16-byte key digests (numpy ``V16``, raw bytes)."""
    return np.array([key_digest(k) for k in keys], dtype="V16")


@dataclass
class UnitIndex:
    """What the pre-pass learnt about one input unit; ``keys`` stays in workers (it grows with the unit)."""

    shard_id: str
    samples: int
    sha256: str
    identity: dict[str, Any]
    keys: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype="V16"))

    def summary(self) -> IndexSummary:
        return IndexSummary(self.shard_id, self.samples, self.sha256, self.identity)


@dataclass(frozen=True)
class IndexSummary:
    """The small part of a unit's index the driver keeps."""

    shard_id: str
    samples: int
    sha256: str
    identity: dict[str, Any]


def _tar_keys(unit: InputUnit) -> tuple[list[str], int, str]:
    with unit.source.local_copy(unit.rel) as path:
        digest = hashlib.sha256()
        with path.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
        keys, samples = [], 0
        with path.open("rb") as fh:
            for item in scan_samples(fh, path.stat().st_size):
                if isinstance(item, Sample):
                    keys.append(item.key)
                    samples += 1
                elif isinstance(item, Damage):
                    samples += 1
    return keys, samples, digest.hexdigest()


def _table_keys(units: list[InputUnit]) -> tuple[list[list[str]], str]:
    """Each unit's keys of one table file, and the file's checksum (one read of the key column)."""
    unit = units[0]
    with unit.source.local_copy(unit.rel) as path:
        blob = path.read_bytes()
    sha = hashlib.sha256(blob).hexdigest()
    if unit.kind == "parquet":
        schema = pq.read_schema(io.BytesIO(blob))
        table = pq.read_table(io.BytesIO(blob), columns=["key"] if "key" in schema.names else [])
    else:
        table = pacsv.read_csv(io.BytesIO(blob))
    column = table["key"].to_pylist() if "key" in table.column_names else [None] * table.num_rows
    keys = [table_key({"key": value}, i) for i, value in enumerate(column)]
    return [keys[u.start : u.stop] for u in units], sha


def _cache_rel(unit: InputUnit) -> str:
    return f"{layout.INDEX_DIR}/{unit.shard_id}.npz"


def _load_cached(out: Store, unit: InputUnit) -> UnitIndex | None:
    try:
        with np.load(io.BytesIO(out.read_bytes(_cache_rel(unit))), allow_pickle=False) as saved:
            meta = json.loads(saved["meta"].tobytes().decode())
            if meta.get("format") != INDEX_FORMAT or meta["identity"] != unit.identity():
                return None
            return UnitIndex(unit.shard_id, meta["samples"], meta["sha256"], meta["identity"], saved["keys"])
    except (FileNotFoundError, OSError, ValueError, KeyError):
        return None


def _save(out: Store, unit: InputUnit, index: UnitIndex) -> None:
    meta = {
        "format": INDEX_FORMAT,
        "samples": index.samples,
        "sha256": index.sha256,
        "identity": index.identity,
    }
    buffer = io.BytesIO()
    np.savez(buffer, keys=index.keys, meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8))
    out.write_bytes(_cache_rel(unit), buffer.getvalue())


def index_file(units: list[InputUnit], out: Store) -> list[UnitIndex]:
    """Index the units of one input file (one tar, or every row range of one table), using the cache."""
    cached = [_load_cached(out, u) for u in units]
    if all(c is not None for c in cached):
        return [c for c in cached if c is not None]
    if units[0].kind == "tar":
        keys, samples, sha = _tar_keys(units[0])
        found = [UnitIndex(units[0].shard_id, samples, sha, units[0].identity(), digests(keys))]
    else:
        per_unit, sha = _table_keys(units)
        found = [
            UnitIndex(u.shard_id, len(keys), sha, u.identity(), digests(keys))
            for u, keys in zip(units, per_unit, strict=True)
        ]
    for unit, index in zip(units, found, strict=True):
        _save(out, unit, index)
    return found


def by_file(units: list[InputUnit]) -> list[list[InputUnit]]:
    """Units grouped by the file they come from, in input order."""
    groups: dict[str, list[InputUnit]] = {}
    for unit in units:
        groups.setdefault(unit.rel, []).append(unit)
    return list(groups.values())


def find_duplicates(indexes: list[UnitIndex], labels: dict[str, str]) -> dict[str, dict[bytes, str]]:
    """shard id -> {key digest: label of the earlier unit that keeps it}, for keys repeated across units.

    ``indexes`` are in input order; within one unit the reader itself keeps the first copy.
    """
    if not indexes:
        return {}
    keys = np.concatenate([ix.keys for ix in indexes])
    owner = np.concatenate([np.full(len(ix.keys), i, dtype=np.int64) for i, ix in enumerate(indexes)])
    _, first = np.unique(keys, return_index=True)
    first_owner = np.empty(len(keys), dtype=np.int64)
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    group_start = np.r_[0, np.flatnonzero(sorted_keys[1:] != sorted_keys[:-1]) + 1]
    group_of = np.repeat(np.arange(len(group_start)), np.diff(np.r_[group_start, len(keys)]))
    first_owner[order] = owner[first][group_of]
    repeated = np.flatnonzero(first_owner != owner)
    drops: dict[str, dict[bytes, str]] = {}
    for position in repeated:
        unit = indexes[owner[position]].shard_id
        keeper = indexes[first_owner[position]].shard_id
        drops.setdefault(unit, {})[bytes(keys[position])] = labels.get(keeper, keeper)
    return drops


def drop_digest(drop: dict[bytes, str]) -> str:
    """A fingerprint of a unit's drop set, stored with its shard so a change in it redoes the shard."""
    digest = hashlib.sha256()
    for key in sorted(drop):
        digest.update(key)
    return digest.hexdigest()[:16] if drop else ""
