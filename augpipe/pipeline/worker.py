"""What runs inside Ray workers: a stage over one shard's rows, the cache, and the shard's commit.

Nothing here imports Ray: the executor wraps these in actors and tasks. A shard's ``history`` (per-stage
counts and every failure so far) travels with its rows, so whichever worker commits the shard, or reads
a cached stage output later, has the full account of how its rows were made.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from augpipe.pipeline.config import Recipe, StageEntry
from augpipe.pipeline.inputs import InputUnit
from augpipe.pipeline.reader import READ_STAGE, read_unit
from augpipe.pipeline.registry import build_stage
from augpipe.pipeline.rowcodec import rows_to_table, table_to_rows
from augpipe.pipeline.rows import Failure, Row, candidate_id
from augpipe.pipeline.stage import StageContext
from augpipe.pipeline.writer import atomic_write, write_quarantine, write_shard, write_stats

History = dict[str, Any]
CACHE_DIR = ".cache"
ARTIFACTS_DIR = "artifacts"
FIT_RECORD = "fit.json"
ARTIFACT_FORMAT = 1


def new_history(unit: InputUnit) -> History:
    return {"shard": unit.shard_id, "input": unit.label, "stages": [], "failures": []}


def cache_files(out_dir: Path, stage_name: str, chain_fp: str, shard_id: str) -> tuple[Path, Path]:
    folder = out_dir / CACHE_DIR / f"{stage_name}-{chain_fp}"
    return folder / f"{shard_id}.parquet", folder / f"{shard_id}.history.json"


def artifact_dir(out_dir: Path, stage_name: str, chain_fp: str) -> Path:
    """Where a global stage's fitted state lives: versioned by the stage's chain fingerprint."""
    return out_dir / ARTIFACTS_DIR / f"{stage_name}-{chain_fp}"


def read_fit(folder: Path) -> dict[str, Any] | None:
    """The fit record of a global stage, or None if it was never completed."""
    try:
        return json.loads((folder / FIT_RECORD).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def fit_global(
    entry: StageEntry, context: StageContext, columns: dict[str, list[Any]], folder: str
) -> dict[str, Any]:
    """Fit a global stage once over the corpus; its record is written last, so a half fit is never used."""
    stage = build_stage(entry, context)
    stage.check()
    stage.setup()
    path = Path(folder)
    path.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    summary = stage.fit(columns, path)
    record = {
        "format": ARTIFACT_FORMAT,
        "stage": stage.name,
        "describe": stage.describe(),
        "rows": len(columns.get("key", [])),
        "fit_s": time.perf_counter() - started,
        "summary": summary,
    }
    blob = json.dumps(record, indent=1, default=str).encode()
    atomic_write(path / FIT_RECORD, lambda fh: fh.write(blob))
    return record


def project_rows(rows: list[Row], fields: list[str]) -> dict[str, list[Any]]:
    """Only the fields a global fit reads, so the driver gathers columns, not whole rows with media."""
    return {name: [row.get(name) for row in rows] for name in ["key", *fields]}


def read_source(unit: InputUnit, recipe: Recipe, run_id: str) -> tuple[list[Row], History]:
    """Decode an input unit; bad samples become failures of the ``read`` stage."""
    started = time.perf_counter()
    result = read_unit(unit, recipe.input, recipe.limits)
    history = new_history(unit)
    history["stages"].append(
        {
            "stage": READ_STAGE,
            "samples_in": result.counts["samples_in"],
            "samples_out": len(result.rows),
            "failed": len(result.failures),
            "counts": dict(result.counts),
            "wall_s": time.perf_counter() - started,
            "device": "cpu",
            "run_id": run_id,
            "reused": False,
        }
    )
    history["failures"].extend(asdict(f) for f in result.failures)
    return result.rows, history


def read_cached(parquet: Path, history_file: Path, run_id: str) -> tuple[list[Row], History]:
    """A saved stage output; stages an earlier run computed are marked reused (this run's own are not)."""
    rows = table_to_rows(pq.read_table(parquet))
    history = json.loads(history_file.read_text())
    for stage in history["stages"]:
        stage["reused"] = stage.get("run_id") != run_id
    return rows, history


def batches_by_key(rows: list[Row], size: int) -> Iterator[list[Row]]:
    """Batches of about ``size`` rows that never split one source's rows (``select`` needs them whole)."""
    groups: dict[str, list[Row]] = {}
    for row in rows:
        groups.setdefault(row["key"], []).append(row)
    batch: list[Row] = []
    for group in groups.values():
        if batch and len(batch) + len(group) > size:
            yield batch
            batch = []
        batch.extend(group)
    if batch:
        yield batch


def _cause(exc: BaseException) -> str:
    if "out of memory" in str(exc).lower():
        return "out_of_memory"
    return getattr(exc, "cause", None) or type(exc).__name__


class StageRunner:
    """One stage loaded once (in a Ray actor), run shard by shard with failure isolation and caching."""

    def __init__(
        self,
        entry: StageEntry,
        context: StageContext,
        chain_fp: str,
        out_dir: str,
        run_id: str,
        always_cache: bool = False,
        fitted: str | None = None,
    ) -> None:
        self.stage = build_stage(entry, context)
        self.stage.check()
        self.stage.setup()
        if fitted is not None:
            self.stage.load_fitted(Path(fitted))
        self.chain_fp = chain_fp
        self.out_dir = Path(out_dir)
        self.always_cache = always_cache
        self.run_id = run_id

    def _run_batch(self, batch: list[Row]) -> tuple[list[Row], list[Failure]]:
        try:
            produced = self.stage.process_batch(batch)
        except Exception as exc:
            if len(batch) > 1:
                rows: list[Row] = []
                failures: list[Failure] = []
                for row in batch:
                    more_rows, more_failures = self._run_batch([row])
                    rows += more_rows
                    failures += more_failures
                return rows, failures
            row = batch[0]
            message = f"{self.stage.name} failed on {row['key']} ({candidate_id(row)}): {exc}"
            return [], [Failure(row["key"], self.stage.name, _cause(exc), message, tuple(row["variant"]))]
        rows = [r for r in produced if not isinstance(r, Failure)]
        return rows, [f for f in produced if isinstance(f, Failure)]

    def run(self, shard_id: str, rows: list[Row], history: History) -> tuple[list[Row], History]:
        """Process one shard's rows; save them to the cache when the stage is worth caching."""
        started = time.perf_counter()
        self.stage.stats.clear()
        out: list[Row] = []
        failures: list[Failure] = []
        for batch in batches_by_key(rows, self.stage.effective_batch_size()):
            batch_rows, batch_failures = self._run_batch(batch)
            out += batch_rows
            failures += batch_failures
        history = {**history, "stages": [*history["stages"]], "failures": [*history["failures"]]}
        history["stages"].append(
            {
                "stage": self.stage.name,
                "samples_in": len(rows),
                "samples_out": len(out),
                "failed": len(failures),
                "counts": dict(self.stage.stats),
                "wall_s": time.perf_counter() - started,
                "device": self.stage.device,
                "run_id": self.run_id,
                "reused": False,
            }
        )
        history["failures"].extend(asdict(f) for f in failures)
        if self.stage.cacheable or self.always_cache:
            self._save(shard_id, out, history)
        return out, history

    def _save(self, shard_id: str, rows: list[Row], history: History) -> None:
        parquet, history_file = cache_files(self.out_dir, self.stage.name, self.chain_fp, shard_id)
        table = rows_to_table(rows)
        atomic_write(parquet, lambda fh: pq.write_table(table, fh))
        blob = json.dumps(history, default=str).encode()
        atomic_write(history_file, lambda fh: fh.write(blob))


def commit_shard(
    out_dir: Path, unit: InputUnit, recipe: Recipe, run_fingerprint: str, rows: list[Row], history: History
) -> History:
    """Write the shard's outputs, quarantine and, last, its stats record (the done marker)."""
    failures = [Failure(**{**f, "variant": tuple(f.get("variant", ()))}) for f in history["failures"]]
    written = write_shard(out_dir, unit.shard_id, rows, recipe.name, recipe.tag, recipe.output)
    quarantine = write_quarantine(out_dir, unit.shard_id, failures)
    stats = {
        **history,
        "fingerprint": run_fingerprint,
        "samples_out": len(rows),
        "outputs": [asdict(w) for w in written],
        "quarantine": quarantine,
    }
    write_stats(out_dir, unit.shard_id, stats)
    return stats
