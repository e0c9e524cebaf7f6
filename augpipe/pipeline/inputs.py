"""Finding the work units of an input corpus: one per tar shard, or row ranges of Parquet/CSV files.

Output shard ``shard-NNNNN`` comes from input unit ``shard-NNNNN``. A tar's number comes from the digits
in its name (``shard-00003.tar`` and img2dataset's ``00003.tar`` both give 3) so that adding shards for an
incremental run never renumbers the old ones.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from augpipe.pipeline.config import ConfigError

TABULAR_SUFFIXES = {".parquet", ".csv"}


@dataclass(frozen=True)
class InputUnit:
    """One unit of work: a tar shard (with its optional Parquet sidecar) or a row range of a table."""

    shard_id: str
    path: Path
    kind: str
    start: int = 0
    stop: int | None = None
    sidecar: Path | None = None

    @property
    def label(self) -> str:
        """Where the unit came from, for messages."""
        if self.kind == "tar":
            return self.path.name
        return f"{self.path.name}[{self.start}:{self.stop}]"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _shard_number(path: Path, fallback: int) -> int:
    digits = re.findall(r"\d+", path.stem)
    return int(digits[-1]) if digits else fallback


def _table_rows(path: Path) -> int:
    if path.suffix == ".parquet":
        return pq.ParquetFile(path).metadata.num_rows
    return pacsv.read_csv(path).num_rows


def discover_inputs(path: Path, shard_size: int) -> list[InputUnit]:
    """Work units under ``path`` (a directory of shards, one tar, or one Parquet/CSV file)."""
    if not path.exists():
        raise ConfigError(f"input {path} does not exist")
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file())
    tars = [p for p in files if p.suffix == ".tar"]
    if tars:
        units = []
        for i, tar in enumerate(tars):
            sidecar = tar.with_suffix(".parquet")
            units.append(
                InputUnit(
                    shard_id=f"shard-{_shard_number(tar, i):05d}",
                    path=tar,
                    kind="tar",
                    sidecar=sidecar if sidecar.exists() else None,
                )
            )
        _check_unique(units)
        return units
    tables = [p for p in files if p.suffix in TABULAR_SUFFIXES]
    if not tables:
        raise ConfigError(
            f"input {path} holds no .tar shards and no .parquet/.csv files; "
            "use 'augpipe ingest' to convert a folder of images and captions"
        )
    units, number = [], 0
    for table in tables:
        rows = _table_rows(table)
        for start in range(0, max(rows, 1), shard_size):
            stop = min(start + shard_size, rows)
            units.append(InputUnit(f"shard-{number:05d}", table, table.suffix[1:], start, stop))
            number += 1
    return units


def _check_unique(units: list[InputUnit]) -> None:
    seen: dict[str, Path] = {}
    for unit in units:
        if unit.shard_id in seen:
            raise ConfigError(
                f"input shards {seen[unit.shard_id].name} and {unit.path.name} both map to "
                f"{unit.shard_id}; shard names must carry distinct numbers"
            )
        seen[unit.shard_id] = unit.path
