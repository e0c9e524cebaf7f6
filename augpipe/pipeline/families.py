"""Family bases that own a stage's loop, so a stage writes only what is particular to it.

``GeneratorStage``: model stages that fan rows out (synthesize_speech, transcribe, caption,
generate_image). Each input row is checked and becomes its jobs (``jobs_for``), every job of the batch
goes through one backend call (``run_jobs``: models batch far better than they loop), and each job's
result becomes its child rows or Failures (``rows_for``). The base runs the loop, keeps the order and
zips results to jobs strictly, so a backend that returns one result too few fails the batch loudly.

``FilterStage``: stages that keep or drop each row on its own (filter_paraphrase, filter_images).
``judge`` says why a row is dropped, or keeps it (recording its scores); the base counts each drop as
``dropped:<reason>`` in the stage's stats.

The order a stage returns reaches the output (the quarantine tar lists failures in the order stages
returned them), so each family keeps the order its stages had when they wrote the loop themselves.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import ClassVar, Generic, TypeVar

from augpipe.pipeline.rows import Failure, Row
from augpipe.pipeline.stage import Stage

JobT = TypeVar("JobT")
ResultT = TypeVar("ResultT")


class GeneratorStage(Stage, Generic[JobT, ResultT]):
    """Rows -> jobs -> one batched backend call -> child rows; see the module docstring.

    A subclass defines a small frozen dataclass for its job (what one backend input needs, and the child
    rows its result will fill) and the three hooks below.
    """

    checks_first: ClassVar[bool] = False
    """Return order: True puts every failed input check first (in input order), then each job's rows in
    job order; False keeps everything grouped by input row (a row's check failure or its children)."""

    def jobs_for(self, row: Row) -> Sequence[JobT] | Failure:
        """The jobs ``row`` becomes (its fan-out), or the Failure that says why it cannot be processed."""
        raise NotImplementedError

    def run_jobs(self, jobs: list[JobT]) -> Sequence[ResultT]:
        """The one backend call for a batch: one result per job, in job order (never called empty)."""
        raise NotImplementedError

    def rows_for(self, job: JobT, result: ResultT) -> Iterable[Row | Failure]:
        """What one job's result becomes: its finished child rows (lineage recorded) or Failures."""
        raise NotImplementedError

    def process_batch(self, rows: list[Row]) -> list[Row | Failure]:
        checks: list[Failure] = []
        groups: list[list[Row | Failure]] = [[] for _ in rows]
        owners: list[int] = []
        jobs: list[JobT] = []
        for i, row in enumerate(rows):
            made = self.jobs_for(row)
            if isinstance(made, Failure):
                (checks if self.checks_first else groups[i]).append(made)
                continue
            jobs.extend(made)
            owners.extend([i] * len(made))
        results = self.run_jobs(jobs) if jobs else []
        for owner, job, result in zip(owners, jobs, results, strict=True):
            groups[owner].extend(self.rows_for(job, result))
        return [*checks, *(item for group in groups for item in group)]


class FilterStage(Stage):
    """Keep or drop each row on its own; see the module docstring."""

    def judge(self, row: Row) -> str | Failure | None:
        """Why ``row`` is dropped (a reason, counted as ``dropped:<reason>``), a Failure when it cannot be
        judged, or None to keep it (after recording its scores on it)."""
        raise NotImplementedError

    def process_batch(self, rows: list[Row]) -> list[Row | Failure]:
        out: list[Row | Failure] = []
        for row in rows:
            verdict = self.judge(row)
            if isinstance(verdict, str):
                self.stats[f"dropped:{verdict}"] += 1
            else:
                out.append(row if verdict is None else verdict)
        return out
