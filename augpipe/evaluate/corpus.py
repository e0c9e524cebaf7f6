"""A corpus as ``augpipe evaluate`` sees it: per sample a key, a label or soft label, a parent and a vector.

``open_corpus`` is the one place that knows how augpipe reads a corpus (a folder of WebDataset shards with
optional Parquet sidecars, one tar, or Parquet/CSV tables; augpipe's output folders are such corpora), so
a change of the reader's signatures is adapted here alone.
"""

from __future__ import annotations

import json
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
from webdataset.tariterators import base_plus_ext

from augpipe.pipeline.config import ConfigError, Limits
from augpipe.pipeline.inputs import InputUnit, discover_inputs
from augpipe.pipeline.reader import ReadResult, read_unit
from augpipe.pipeline.rows import Failure

TABLE_UNIT_ROWS = 1000
"""Rows read at a time from a Parquet/CSV table (one unit), bounding the memory of a streaming pass."""


class EvaluationError(ValueError):
    """Input that cannot be evaluated; the command line prints it on one line and exits 2."""


def _unit_size(unit: InputUnit) -> int:
    """Samples in a unit without decoding any: a table's row range, a sidecar's rows, or a tar's keys."""
    if unit.kind != "tar":
        return (unit.stop or 0) - unit.start
    if unit.sidecar is not None:
        with unit.source.open_read(unit.sidecar) as fh:
            return pq.ParquetFile(fh).metadata.num_rows
    with unit.source.local_copy(unit.rel) as path, tarfile.open(path) as tar:
        return len({base_plus_ext(name)[0] for name in tar.getnames()} - {None})


def open_corpus(path: Path) -> tuple[int, Iterator[ReadResult]]:
    """The number of samples in the corpus at ``path``, and its rows read one unit at a time.

    Units are read lazily, so a large corpus is never held in memory at once. Today this is
    ``inputs.discover_inputs`` + ``reader.read_unit``; samples the reader refuses come back as failures.
    """
    try:
        units = discover_inputs(str(path), TABLE_UNIT_ROWS)
    except ConfigError as exc:
        raise EvaluationError(str(exc)) from exc
    return sum(map(_unit_size, units)), (read_unit(unit, [], Limits()) for unit in units)


def parse_soft_label(value: Any, where: str) -> dict[str, float] | None:
    """{label: weight} from a ``soft_label`` value: a JSON object string (augpipe today), or a typed
    list of {label, weight} structs (as a list of dicts or pairs, or its JSON); None when absent."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    try:
        if isinstance(value, str | bytes):
            value = json.loads(value)
        if isinstance(value, dict):
            pairs = value.items()
        else:
            pairs = [
                (item["label"], item["weight"]) if isinstance(item, dict) else tuple(item) for item in value
            ]
        dist = {str(label): float(weight) for label, weight in pairs}
    except (TypeError, ValueError, KeyError) as exc:
        raise EvaluationError(
            f"{where}: soft_label {str(value)[:80]!r} is neither a JSON object {{label: weight}} "
            f"nor a list of {{label, weight}}"
        ) from exc
    if any(not np.isfinite(w) or w < 0 for w in dist.values()) or sum(dist.values()) <= 0:
        raise EvaluationError(f"{where}: soft_label {dist} needs non-negative weights with a positive sum")
    return dist


@dataclass
class Corpus:
    """One corpus reduced to what the probe needs; media are dropped as soon as they are embedded."""

    role: str
    path: Path
    keys: list[str] = field(default_factory=list)
    labels: list[str | None] = field(default_factory=list)
    soft: list[dict[str, float] | None] = field(default_factory=list)
    parents: list[str | None] = field(default_factory=list)
    vectors: list[np.ndarray] = field(default_factory=list)
    unreadable: list[Failure] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def features(self) -> np.ndarray:
        """(n, d) float32; the widths were checked when the vectors were added."""
        return np.stack(self.vectors) if self.vectors else np.zeros((0, 0), np.float32)

    @property
    def where(self) -> str:
        return f"{self.role} corpus {self.path}"

    def add(self, row: dict[str, Any], vector: Any) -> None:
        """Keep ``row``'s key, label, soft label and parent with its feature vector."""
        where = f"{self.role} sample {row['key']}"
        array = np.asarray(vector, dtype=np.float32).reshape(-1)
        if not array.size or not np.isfinite(array).all():
            raise EvaluationError(f"{where}: its feature vector is empty or not finite")
        if self.vectors and array.size != self.vectors[0].size:
            raise EvaluationError(
                f"{where}: feature width {array.size} differs from the corpus's {self.vectors[0].size} "
                f"(sample {self.keys[0]})"
            )
        label = row.get("label")
        self.keys.append(row["key"])
        self.labels.append(None if label is None else str(label))
        self.soft.append(parse_soft_label(row.get("soft_label"), where))
        self.parents.append(row.get("parent_key"))
        self.vectors.append(array)

    def subset(self, index: Sequence[int] | np.ndarray) -> Corpus:
        """The samples at ``index``, in that order (unreadable samples stay with the whole corpus)."""
        return Corpus(
            self.role,
            self.path,
            [self.keys[i] for i in index],
            [self.labels[i] for i in index],
            [self.soft[i] for i in index],
            [self.parents[i] for i in index],
            [self.vectors[i] for i in index],
        )
