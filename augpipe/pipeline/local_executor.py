"""The in-process executor: every step of every shard in this process, one shard at a time.

No Ray, no parallelism, no fault tolerance: for debugging (``pdb`` stops where the bug is) and for fast
tests. Results are the same bytes as the Ray executor's: both call the same ``worker`` functions.
"""

from __future__ import annotations

from typing import Any

from augpipe.pipeline import execution
from augpipe.pipeline.execution import Progress, RunAborted, RunState, Work, log
from augpipe.pipeline.fitting import fit_global, fit_samples
from augpipe.pipeline.index import IndexSummary, by_file, find_duplicates, index_file
from augpipe.pipeline.inputs import InputUnit
from augpipe.pipeline.rows import Row
from augpipe.pipeline.storage import Store, is_storage_error
from augpipe.pipeline.worker import History, StageRunner, commit_shard, read_cached, read_source


class LocalExecutor:
    """Runs a plan in this process."""

    def __init__(self) -> None:
        self.runners: dict[int, StageRunner] = {}

    def index(
        self, units: list[InputUnit], out: Store
    ) -> tuple[dict[str, IndexSummary], dict[str, dict[bytes, str]]]:
        indexes = [ix for group in by_file(units) for ix in index_file(group, out)]
        labels = {u.shard_id: u.label for u in units}
        return {ix.shard_id: ix.summary() for ix in indexes}, find_duplicates(indexes, labels)

    def _runner(self, work: Work, index: int, progress: Progress) -> StageRunner:
        if index not in self.runners:
            plan = work.plan
            stage = plan.stages[index]
            self.runners[index] = StageRunner(
                plan.recipe.stages[index],
                stage.context,
                plan.chain[index],
                work.out,
                work.run_id,
                cache=execution.cached_steps(plan)[index],
                fitted=execution.artifact_rel(plan, index) if stage.needs_fit else None,
                on_batch=progress.add,
                drop=execution.dropped_fields(plan, index),
            )
        return self.runners[index]

    def _rows_until(
        self,
        work: Work,
        unit: InputUnit,
        end: int,
        progress: Progress,
        state: RunState,
        skip_media: set[str] | None = None,
    ) -> tuple[list[Row], History]:
        start = execution.deepest_cache(work.out, work.plan, unit, end)
        if start is None:
            rows, history = read_source(
                unit,
                work.plan.recipe,
                work.run_id,
                work.index.get(unit.shard_id),
                work.drops.get(unit.shard_id, {}),
                skip_media,
            )
            first = 0
        else:
            rows, history = read_cached(work.out, start[1], start[2], work.run_id)
            first = start[0] + 1
            execution.count_reused(history, progress, state)
        for index in range(first, end):
            rows, history = self._runner(work, index, progress).run(unit.shard_id, rows, history)
        return rows, history

    def _fit(self, work: Work, fit_pass: execution.FitPass, progress: Progress, state: RunState) -> None:
        plan = work.plan
        draws = fit_pass.draws(plan, work.corpus_samples)
        skip_media = fit_pass.skip_media(plan)
        parts: list[list[dict[str, list[Any]]]] = [[] for _ in draws]
        with state.timed(f"fit:{plan.stages[fit_pass.steps[0]].name}"):
            for unit in work.corpus:
                rows, _ = self._rows_until(work, unit, fit_pass.end, progress, state, skip_media)
                for step_parts, part in zip(parts, fit_samples(rows, draws), strict=True):
                    step_parts.append(part)
            self._fit_step(work, fit_pass.steps[0], parts[0])
        for index, step_parts in zip(fit_pass.steps[1:], parts[1:], strict=True):
            with state.timed(f"fit:{plan.stages[index].name}"):
                self._fit_step(work, index, step_parts)

    @staticmethod
    def _fit_step(work: Work, index: int, parts: list[dict[str, list[Any]]]) -> None:
        plan = work.plan
        execution.log.info("fitting %s on a sample of the corpus", plan.stages[index].name)
        fit_global(
            plan.recipe.stages[index],
            plan.stages[index].context,
            parts,
            work.out,
            execution.artifact_rel(plan, index),
            execution.fit_cap(plan, index),
            work.corpus_samples,
        )

    def run(self, work: Work) -> RunState:
        state = RunState(cluster={"executor": "local", "nodes": 1})
        progress = Progress([s.name for s in work.plan.stages], len(work.units), work.progress)
        try:
            for fit_pass in execution.fit_passes(work.plan, work.out):
                self._fit(work, fit_pass, progress, state)
            with state.timed("process"):
                for unit in work.units:
                    if work.stop.is_set():
                        state.interrupted = True
                        break
                    self._shard(work, unit, progress, state)
                    progress.show()
        except RunAborted as exc:
            state.aborted = exc
        progress.show(force=True)
        return state

    def _shard(self, work: Work, unit: InputUnit, progress: Progress, state: RunState) -> None:
        plan = work.plan
        try:
            rows, history = self._rows_until(work, unit, len(plan.stages), progress, state)
            prune = [] if work.keep_cache else execution.cache_rels(plan, unit)
            stats: dict[str, Any] = commit_shard(
                work.out, unit, plan.output, plan.run_fingerprint, rows, history, prune
            )
        except Exception as exc:
            log.debug("%s failed", unit.shard_id, exc_info=exc)
            if is_storage_error(exc):
                raise RunAborted("storage", f"{type(exc).__name__}: {exc}") from exc
            index = work.index.get(unit.shard_id)
            state.break_shard(
                unit, type(exc).__name__, f"{type(exc).__name__}: {exc}", index.samples if index else None
            )
            return
        state.committed[unit.shard_id] = stats
        progress.shards_done += 1
