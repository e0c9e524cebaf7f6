"""What runs inside workers: reading a unit, a stage over one shard's rows, the cache, the commit (fitting a
global stage is in ``fitting``).

Nothing here imports Ray: both executors call these functions, the Ray one inside actors and tasks. A
shard's ``history`` (its input identity, per-stage records and every failure so far) travels with its rows,
so whichever worker commits the shard, or reads a cached stage output later, has the full account of how
its rows were made.
"""

from __future__ import annotations

import io
import json
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from augpipe.pipeline import layout
from augpipe.pipeline.config import Recipe, StageEntry
from augpipe.pipeline.index import IndexSummary, drop_digest
from augpipe.pipeline.inputs import InputUnit
from augpipe.pipeline.reader import READ_STAGE, read_unit
from augpipe.pipeline.records import StageRecord
from augpipe.pipeline.registry import build_stage
from augpipe.pipeline.rowcodec import rows_to_table, table_to_rows
from augpipe.pipeline.rows import Failure, Row, candidate_id
from augpipe.pipeline.sidecar import OutputSpec, label_counts
from augpipe.pipeline.stage import StageContext
from augpipe.pipeline.storage import Store
from augpipe.pipeline.writer import write_quarantine, write_shard, write_stats

History = dict[str, Any]
FAILURE_EXAMPLES = 5
BatchReport = Callable[[str, int], None]
"""Called after every batch a stage finishes: (step name, rows it produced)."""


def new_history(unit: InputUnit, index: IndexSummary | None, drop: dict[bytes, str]) -> History:
    identity = dict(index.identity) if index else unit.identity()
    if index:
        identity["sha256"] = index.sha256
    return {
        "shard": unit.shard_id,
        "input": unit.label,
        "input_identity": identity,
        "drop_digest": drop_digest(drop),
        "stages": [],
        "failures": [],
    }


def read_source(
    unit: InputUnit,
    recipe: Recipe,
    run_id: str,
    index: IndexSummary | None,
    drop: dict[bytes, str],
    skip_media: set[str] | None = None,
) -> tuple[list[Row], History]:
    """Decode an input unit; bad samples become failures of the ``read`` stage."""
    started = time.perf_counter()
    result = read_unit(unit, recipe.input, recipe.limits, drop, skip_media)
    history = new_history(unit, index, drop)
    counts = dict(result.counts)
    samples_in = counts.pop("samples_in", 0)
    record = StageRecord(
        stage=READ_STAGE,
        samples_in=samples_in,
        samples_out=len(result.rows),
        failed=len(result.failures),
        wall_s=time.perf_counter() - started,
        device="cpu",
        run_id=run_id,
        counts=counts,
    )
    history["stages"].append(record.to_json())
    history["failures"].extend(asdict(f) for f in result.failures)
    return result.rows, history


def read_cached(out: Store, parquet: str, history_file: str, run_id: str) -> tuple[list[Row], History]:
    """A saved stage output; stages an earlier run computed are marked reused (this run's own are not)."""
    with out.open_read(parquet) as fh:
        rows = table_to_rows(pq.read_table(fh))
    history = json.loads(out.read_bytes(history_file))
    history["stages"] = [
        {**data, "reused": StageRecord.from_json(data).run_id != run_id} for data in history["stages"]
    ]
    return rows, history


def batches_by_key(rows: list[Row], size: int | None) -> Iterator[list[Row]]:
    """Batches of about ``size`` rows that never split one source's rows (``select`` needs them whole);
    ``size`` None (whole-shard scope) gives every row in one batch, grouped by source the same way."""
    if size is None:
        size = len(rows)
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


@contextmanager
def artifact_folder(out: Store, rel: str, upload: bool = False) -> Iterator[Path]:
    """A global stage's artifact folder on local disk (downloaded from, or uploaded to, an object store)."""
    if not out.remote:
        path = out.local_path(rel)
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="augpipe-artifact-") as folder:
        local = Path(folder)
        if not upload:
            out.download_dir(rel, local)
        yield local
        if upload:
            out.upload_dir(local, rel)


class StageRunner:
    """One stage loaded once (in a Ray actor, or in-process), run shard by shard with failure isolation."""

    def __init__(
        self,
        entry: StageEntry,
        context: StageContext,
        chain_fp: str,
        out: Store,
        run_id: str,
        cache: bool = False,
        fitted: str | None = None,
        on_batch: BatchReport | None = None,
        drop: frozenset[str] = frozenset(),
    ) -> None:
        self.stage = build_stage(entry, context)
        self.stage.check()
        self.stage.setup()
        if fitted is not None:
            with artifact_folder(out, fitted) as folder:
                self.stage.load_fitted(folder)
        self.chain_fp = chain_fp
        self.out = out
        self.cache = cache
        self.run_id = run_id
        self.on_batch = on_batch
        self.drop = drop
        """Fields the rows leave this step without (``execution.dropped_fields``)."""

    def ping(self) -> bool:
        """Answers once the stage is loaded: the executor's check that a worker is alive."""
        return True

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
        """Process one shard's rows; save them to the cache when this step is cached, then hand them on
        without the fields no later step reads."""
        started = time.perf_counter()
        self.stage.stats.clear()
        out: list[Row] = []
        failures: list[Failure] = []
        for batch in batches_by_key(rows, self.stage.effective_batch_size()):
            batch_rows, batch_failures = self._run_batch(batch)
            out += batch_rows
            failures += batch_failures
            if self.on_batch is not None:
                self.on_batch(self.stage.name, len(batch_rows))
        history = {**history, "stages": [*history["stages"]], "failures": [*history["failures"]]}
        record = StageRecord(
            stage=self.stage.name,
            samples_in=len(rows),
            samples_out=len(out),
            failed=len(failures),
            wall_s=time.perf_counter() - started,
            device=self.stage.device,
            run_id=self.run_id,
            counts=dict(self.stage.stats),
        )
        history["stages"].append(record.to_json())
        history["failures"].extend(asdict(f) for f in failures)
        if self.cache:
            self._save(shard_id, out, history)
        if self.drop:
            out = [{k: v for k, v in row.items() if k not in self.drop} for row in out]
        return out, history

    def _save(self, shard_id: str, rows: list[Row], history: History) -> None:
        parquet, history_file = layout.cache_files(self.stage.name, self.chain_fp, shard_id)
        buffer = io.BytesIO()
        pq.write_table(rows_to_table(rows), buffer)
        self.out.write_bytes(parquet, buffer.getvalue())
        self.out.write_bytes(history_file, json.dumps(history, default=str).encode())


# ------------------------------------------------------------------------------------------ committing


def _failure_summary(failures: list[dict[str, Any]]) -> dict[str, Any]:
    by_cause: dict[str, int] = {}
    for failure in failures:
        by_cause[failure["cause"]] = by_cause.get(failure["cause"], 0) + 1
    examples = [{k: f[k] for k in ("key", "stage", "cause", "message")} for f in failures[:FAILURE_EXAMPLES]]
    return {"total": len(failures), "by_cause": by_cause, "examples": examples}


def commit_shard(
    out: Store,
    unit: InputUnit,
    spec: OutputSpec,
    run_fingerprint: str,
    rows: list[Row],
    history: History,
    prune: list[str],
) -> dict[str, Any]:
    """Write the shard's outputs and quarantine, then its stats record (the done marker), then drop its
    caches (``prune``). If writing fails, the shard's new data files are removed, so no data file is left
    without its stats record."""
    failures = [Failure(**{**f, "variant": tuple(f.get("variant", ()))}) for f in history["failures"]]
    tar_rel, parquet_rel = layout.data_files(unit.shard_id)
    steps = [StageRecord.from_json(data) for data in history["stages"]]
    try:
        written = write_shard(out, unit.shard_id, rows, spec)
        quarantine = write_quarantine(out, unit.shard_id, failures)
        stats = {
            **{k: v for k, v in history.items() if k != "failures"},
            "failures": _failure_summary(history["failures"]),
            "fingerprint": run_fingerprint,
            "run_id": steps[-1].run_id if steps else "",
            "committed_at": datetime.now(UTC).isoformat(),
            "samples_in": steps[0].samples_in if steps else 0,
            "samples_out": len(rows),
            "labels": label_counts(rows, spec),
            "outputs": [asdict(w) for w in written],
            "quarantine": quarantine,
        }
        write_stats(out, unit.shard_id, stats)
    except BaseException:
        for rel in (
            tar_rel,
            parquet_rel,
            layout.quarantine_file(unit.shard_id),
            layout.stats_file(unit.shard_id),
        ):
            out.delete(rel)
        raise
    for rel in prune:
        out.delete(rel)
    return stats


def commit_lost_shard(
    out: Store,
    unit: InputUnit,
    spec: OutputSpec,
    run_fingerprint: str,
    rows: list[Row],
    history: History,
    step: str,
    message: str,
    prune: list[str],
) -> dict[str, Any]:
    """Commit a poison shard: each source sample still in it fails as ``worker_crashed`` with ``message``."""
    keys = sorted({row["key"] for row in rows})
    lost = [asdict(Failure(key, step, "worker_crashed", message)) for key in keys]
    history = {**history, "failures": [*history["failures"], *lost]}
    return commit_shard(out, unit, spec, run_fingerprint, [], history, prune)
