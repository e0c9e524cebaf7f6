"""Fitting a global stage on a seeded sample of the corpus, drawn shard by shard.

Each shard gives the rows whose seeded rank falls under the sample rate; parts merge by keeping the lowest
ranks, so the sample is the same whatever order shards finish in and however parts are grouped before the
fit. Nothing here imports Ray: both executors call these functions.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from augpipe.pipeline.config import StageEntry
from augpipe.pipeline.registry import build_stage
from augpipe.pipeline.rows import Row, derive_seed
from augpipe.pipeline.stage import StageContext
from augpipe.pipeline.storage import Store
from augpipe.pipeline.worker import artifact_folder

FIT_RECORD = "fit.json"
ARTIFACT_FORMAT = 1


def sample_rate(cap: int | None, corpus_samples: int) -> float:
    """The share of rows a fit sample keeps: everything on small corpora, about ``cap`` rows on large ones.

    A little above cap/N so the hash threshold rarely leaves the sample short; ``fit_global`` trims it.
    """
    if cap is None or corpus_samples <= cap:
        return 1.0
    return min(1.0, 1.1 * cap / corpus_samples)


def _row_rank(seed: int, row: Row) -> int:
    return derive_seed(seed, row["key"], "fit-sample", tuple(row.get("variant", ())))


@dataclass(frozen=True)
class FitDraw:
    """What one global step's fit takes from each shard: ``fields`` of the rows its seeded sample keeps."""

    fields: tuple[str, ...]
    seed: int
    rate: float


def fit_sample(rows: list[Row], draw: FitDraw) -> dict[str, list[Any]]:
    """The fit fields of this shard's rows that fall in the seeded sample (rank below rate of the range)."""
    bound = draw.rate * 2**63
    kept = [row for row in rows if draw.rate >= 1.0 or _row_rank(draw.seed, row) < bound]
    columns: dict[str, list[Any]] = {
        "key": [r["key"] for r in kept],
        "_rank": [_row_rank(draw.seed, r) for r in kept],
    }
    for name in draw.fields:
        columns[name] = [row.get(name) for row in kept]
    return columns


def fit_samples(rows: list[Row], draws: list[FitDraw]) -> list[dict[str, list[Any]]]:
    """This shard's part of each fit sample a pass draws."""
    return [fit_sample(rows, draw) for draw in draws]


def merge_parts(parts: list[dict[str, list[Any]]], cap: int | None) -> dict[str, list[Any]]:
    """Concatenate sample parts and keep the ``cap`` lowest ranks, in rank order, ranks included.

    Merging chunks of parts first and then the chunks gives the same sample as merging them all at once:
    the ``cap`` lowest ranks overall are among each chunk's ``cap`` lowest.
    """
    names = list(parts[0]) if parts else ["key", "_rank"]
    merged = {name: [v for part in parts for v in part[name]] for name in names}
    order = np.argsort(np.asarray(merged["_rank"], dtype=np.uint64), kind="stable")
    if cap is not None:
        order = order[:cap]
    return {name: [merged[name][i] for i in order] for name in names}


def fit_global(
    entry: StageEntry,
    context: StageContext,
    parts: list[dict[str, list[Any]]],
    out: Store,
    folder: str,
    cap: int | None,
    corpus_samples: int,
) -> dict[str, Any]:
    """Fit a global stage once on the corpus sample; its record is written last, so a half fit is unused."""
    stage = build_stage(entry, context)
    stage.check()
    stage.setup()
    columns = merge_parts(parts, cap)
    del columns["_rank"]
    started = time.perf_counter()
    with artifact_folder(out, folder, upload=True) as local:
        summary = stage.fit(columns, local)
    record = {
        "format": ARTIFACT_FORMAT,
        "stage": stage.name,
        "describe": stage.describe(),
        "rows": len(columns.get("key", [])),
        "corpus_samples": corpus_samples,
        "fit_max_rows": cap,
        "fit_s": time.perf_counter() - started,
        "summary": summary,
    }
    out.write_bytes(f"{folder}/{FIT_RECORD}", json.dumps(record, indent=1, default=str).encode())
    return record


def read_fit(out: Store, folder: str) -> dict[str, Any] | None:
    """The fit record of a global stage, or None if it was never completed."""
    try:
        return json.loads(out.read_bytes(f"{folder}/{FIT_RECORD}"))
    except (FileNotFoundError, json.JSONDecodeError, OSError):
        return None
