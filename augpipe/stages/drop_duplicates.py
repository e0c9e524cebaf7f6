"""Drop generated samples that are copies: of the source they were made from, or of a sibling.

A mixing method can hand back its input: a CMDA anchor alone in its pool (or alone in its cluster) gets
weight 1 on itself, and a source in a shard of at most ``pool_size`` rows gets the same mix in every pass.
Such a sample is no augmentation, and a trainer would see it twice. A sample is a copy of its source when
its content equals the source's (``source_field``) or when its lineage names the source as its only
contributor; a copy of a sibling when its content equals an earlier output of the same source. Content is
compared by a digest of the decoded value (image mode, size and pixels; array dtype, shape and bytes).

``drop: false`` keeps copies and only marks them (``lineage.drop_duplicates.duplicate_of``); both ways the
counts (``duplicate_of_source``, ``duplicate_of_sibling``) reach the manifest's stage totals.
"""

from __future__ import annotations

import hashlib
from typing import Any, ClassVar

import numpy as np
from PIL import Image
from pydantic import Field

from augpipe.pipeline.rows import Failure, FieldName, Row, record
from augpipe.pipeline.sidecar import lineage_facts
from augpipe.pipeline.stage import Resources, Stage, StageSettings


class DropDuplicatesSettings(StageSettings):
    field: FieldName = Field(default="generated_image", description="the generated sample")
    source_field: FieldName | None = Field(
        default="image", description="the source sample it was made from (null: compare siblings only)"
    )
    drop: bool = Field(default=True, description="drop copies (false: keep them, marked in lineage)")


def content_digest(value: Any) -> str:
    """A digest of a decoded image, array or scalar, equal exactly when the contents are equal."""
    digest = hashlib.sha256()
    if isinstance(value, Image.Image):
        digest.update(f"image|{value.mode}|{value.size}|".encode())
        digest.update(value.tobytes())
    elif isinstance(value, np.ndarray | list | tuple):
        array = np.ascontiguousarray(np.asarray(value))
        digest.update(f"array|{array.dtype}|{array.shape}|".encode())
        digest.update(array.tobytes())
    else:
        digest.update(f"value|{value!r}".encode())
    return digest.hexdigest()


class DropDuplicates(Stage):
    """A cheap filter over each source's outputs (batches never split one source's rows)."""

    name = "drop_duplicates"
    Settings = DropDuplicatesSettings
    resources = Resources(cpus=0.25, memory_gb=0.5)
    batch_size = 256
    cacheable = False
    settings: DropDuplicatesSettings

    STAT_NAMES: ClassVar[tuple[str, str]] = ("duplicate_of_source", "duplicate_of_sibling")

    def inputs(self) -> frozenset[str]:
        s = self.settings
        return frozenset({s.field, *([s.source_field] if s.source_field else [])})

    def _copy_of(self, row: Row, seen: dict[str, str]) -> tuple[str | None, str]:
        """(what the row copies: "source", a sibling's variant, or None; its content digest)."""
        s = self.settings
        digest = content_digest(row[s.field])
        contributors, _, _ = lineage_facts(row.get("lineage", {}))
        if contributors == [row["key"]]:
            return "source", digest
        source = row.get(s.source_field) if s.source_field else None
        if source is not None and digest == content_digest(source):
            return "source", digest
        return seen.get(digest), digest

    def process_batch(self, rows: list[Row]) -> list[Row | Failure]:
        s = self.settings
        out: list[Row | Failure] = []
        seen_by_source: dict[str, dict[str, str]] = {}
        for row in rows:
            if row.get(s.field) is None:
                out.append(self.fail(row, "bad_input", f"row has no {s.field!r} field"))
                continue
            seen = seen_by_source.setdefault(row["key"], {})
            copy, digest = self._copy_of(row, seen)
            variant = "-".join(map(str, row.get("variant", ())))
            if copy is None:
                seen[digest] = variant
                out.append(row)
                continue
            self.stats[self.STAT_NAMES[0] if copy == "source" else self.STAT_NAMES[1]] += 1
            if not s.drop:
                record(row, self.name, duplicate_of=copy if copy == "source" else f"variant {copy}")
                out.append(row)
        return out
