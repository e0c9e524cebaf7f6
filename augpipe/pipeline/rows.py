"""Rows: the unit that flows between stages, and the helpers every stage uses to fan out and record.

A row is a plain dict so that stages stay ignorant of the engine and of Ray. Reserved fields:

- ``key``: the source sample's key; it does not change while a row moves through the chain.
- ``variant``: a tuple of fan-out indices, one per fan-out stage passed (e.g. ``(0, 2, 1)`` for
  TTS voice 0, perturbation 2, ASR sample 1). Together with ``key`` it names a candidate.
- ``lineage``: ``{stage_name: {...}}``, what each stage did to this row (parameters, seeds, scores),
  written by the stage that knows it rather than reconstructed from logs.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import AfterValidator

Row = dict[str, Any]
RESERVED_FIELDS = frozenset({"key", "variant", "lineage"})


def check_field_name(value: str) -> str:
    """A row field a stage may read or write: an identifier, and not one the engine reserves."""
    if not value or not value.isidentifier() or value in RESERVED_FIELDS:
        raise ValueError(
            f"{value!r} is not a usable field name (an identifier, not one of key/variant/lineage)"
        )
    return value


FieldName = Annotated[str, AfterValidator(check_field_name)]
"""A settings type for options that name a row field."""


@dataclass(frozen=True)
class Failure:
    """A sample that could not be processed; it goes to quarantine and is counted by cause."""

    key: str
    stage: str
    cause: str
    message: str
    variant: tuple[int, ...] = ()


def derive_seed(run_seed: int, key: str, stage: str, variant: tuple[int, ...] = ()) -> int:
    """A 63-bit seed that depends only on what identifies the work, so re-runs and resumes agree."""
    text = f"{run_seed}\x1f{key}\x1f{stage}\x1f{','.join(map(str, variant))}"
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") >> 1


def key_digest(key: str) -> bytes:
    """A 128-bit digest of a sample key: how keys are compared across shards without holding them."""
    return hashlib.blake2b(key.encode(), digest_size=16).digest()


def fan_out(row: Row, index: int) -> Row:
    """A copy of ``row`` for variant ``index`` of a fan-out stage; lineage is copied, not shared."""
    child = dict(row)
    child["variant"] = (*row.get("variant", ()), index)
    child["lineage"] = {name: dict(info) for name, info in row.get("lineage", {}).items()}
    return child


def record(row: Row, stage: str, **info: Any) -> None:
    """Attach what ``stage`` did to ``row`` (parameters, seed, scores) to the row's lineage."""
    row.setdefault("lineage", {}).setdefault(stage, {}).update(info)


def candidate_id(row: Row) -> str:
    """A readable name for a candidate inside its source's pool, e.g. ``v0-2-1``."""
    return "v" + "-".join(map(str, row.get("variant", ()))) if row.get("variant") else "v"
