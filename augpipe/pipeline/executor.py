"""The Ray executor. With its two helpers, ``ray_cluster`` (joining a cluster, sizing actors to it) and
``ray_dispatch`` (the loop that moves shards through the steps), it is all of augpipe that imports Ray.

Each step of the recipe has a pool of long-lived stage actors that load their model once. Shards move
through the steps as object references: the driver holds references, never rows. An actor gets one call at
a time, so work goes to whichever actor is free (load-aware dispatch) and a worker's death touches only the
shard it was working on.

Fault tolerance uses Ray's own mechanisms, bounded:
- stage actors restart after a crash (``max_restarts``) and the interrupted call is retried on the
  restarted actor (``max_task_retries``); read, fit and commit tasks retry when their worker dies
  (``max_retries``); objects lost with a node are rebuilt by restarting the shard from its deepest cache;
- an actor whose restarts are spent is replaced by a fresh one; a shard whose step still fails because its
  worker died is resubmitted, and after ``max_attempts`` such failures it is a *poison* shard: it is
  committed with every remaining sample quarantined as ``worker_crashed``, and the other shards go on.
- an actor whose constructor raises (a model that cannot load) or storage that refuses writes stops the
  run: no retry can fix either.

Global stages fit on a seeded sample. Each shard's part of it stays with Ray; tasks merge the parts
``MERGE_CHUNK`` at a time as shards finish, and the merged parts go straight into the fit task. The
driver holds references, and the parts small enough for Ray to keep in its memory once, as the merge
tasks' lineage (what rebuilds a merged part lost with a node).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import ray
from ray.exceptions import RayTaskError

from augpipe.pipeline import execution
from augpipe.pipeline.config import plain
from augpipe.pipeline.execution import Progress, RunAborted, RunState, Work, log
from augpipe.pipeline.fitting import fit_global
from augpipe.pipeline.index import IndexSummary, UnitIndex, by_file, find_duplicates, index_file
from augpipe.pipeline.inputs import InputUnit
from augpipe.pipeline.ray_cluster import describe_cluster, fit_resources
from augpipe.pipeline.ray_dispatch import Drive, Pool, remote
from augpipe.pipeline.stage import Resources
from augpipe.pipeline.storage import Store
from augpipe.pipeline.worker import StageRunner


@ray.remote(num_cpus=0)
class _ProgressSink:
    """Counts rows per step as actors finish batches, so progress moves inside a shard."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    def add(self, step: str, samples: int) -> None:
        self.counts[step] += samples

    def snapshot(self) -> dict[str, int]:
        return dict(self.counts)


class _Reporter:
    """A stage runner's per-batch callback that forwards counts to the progress sink (fire and forget).

    It travels by the sink's name, not its handle: an actor handle in a constructor argument puts the
    argument in the object store, where an actor restart cannot count on finding it (ray#53727).
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.sink: Any = None
        self.sink_name = ""

    def __getstate__(self) -> dict[str, Any]:
        return {"name": self.name}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.name, self.sink = state["name"], None

    def __call__(self, step: str, samples: int) -> None:
        if self.sink is None:
            self.sink = ray.get_actor(self.name)
        self.sink.add.remote(step, samples)


class RayExecutor:
    """Runs a plan over input units with Ray actor pools; see the module docstring for fault tolerance."""

    def __init__(self, max_attempts: int = 2, max_restarts: int = 4, max_task_retries: int = 1) -> None:
        self.max_attempts = max_attempts
        self.max_restarts = max_restarts
        self.max_task_retries = max_task_retries
        self.pools: dict[int, Pool] = {}
        self.resources: dict[str, Resources] = {}
        self.sink: Any = None

    # ------------------------------------------------------------------------------------- actors

    def _new_actor(self, work: Work, index: int) -> Any:
        plan = work.plan
        stage = plan.stages[index]
        r = self.resources[stage.name]
        actor_cls = ray.remote(StageRunner).options(
            num_cpus=r.cpus,
            num_gpus=r.gpus,
            memory=int(r.memory_gb * 2**30),
            max_concurrency=1,
            max_restarts=self.max_restarts,
            max_task_retries=self.max_task_retries,
        )
        return actor_cls.remote(
            plan.recipe.stages[index],
            stage.context,
            plan.chain[index],
            work.out,
            work.run_id,
            execution.cached_steps(plan)[index],
            execution.artifact_rel(plan, index) if stage.needs_fit else None,
            _Reporter(self.sink_name),
            execution.dropped_fields(plan, index),
        )

    def _pool(self, work: Work, index: int) -> Pool:
        """The step's actor pool, created on first use (steps served from cache never load a model)."""
        if index not in self.pools:
            count = work.plan.stages[index].settings.concurrency
            self.pools[index] = Pool([self._new_actor(work, index) for _ in range(count)], [False] * count)
        return self.pools[index]

    # --------------------------------------------------------------------------------------- run

    def index(
        self, units: list[InputUnit], out: Store
    ) -> tuple[dict[str, IndexSummary], dict[str, dict[bytes, str]]]:
        """One task per input file; the keys go from those tasks to one duplicate-finding task, not here."""
        calls = [remote(_index_task, 2).remote(group, out) for group in by_file(units)]
        summaries = [s for batch in ray.get([c[0] for c in calls]) for s in batch]
        labels = {u.shard_id: u.label for u in units}
        drops = ray.get(remote(_duplicates_task).remote(labels, *[c[1] for c in calls]))
        return {s.shard_id: s for s in summaries}, drops

    def run(self, work: Work) -> RunState:
        state = RunState(cluster=describe_cluster())
        self.resources = fit_resources(work.plan.stages)
        self.sink_name = f"augpipe-progress-{work.run_id}"
        self.sink = _ProgressSink.options(name=self.sink_name).remote()
        progress = Progress([s.name for s in work.plan.stages], len(work.units), work.progress)
        try:
            for fit_pass in execution.fit_passes(work.plan, work.out):
                self._fit(work, fit_pass, progress, state)
                if state.interrupted:
                    break
            if not state.interrupted:
                with state.timed("process"):
                    Drive(self, work, progress, state, len(work.plan.stages)).run(work.units)
        except RunAborted as exc:
            state.aborted = exc
        return state

    def _fit(self, work: Work, fit_pass: execution.FitPass, progress: Progress, state: RunState) -> None:
        """Draw every sample of the pass, then fit each step; the shared pass counts in the first fit's
        phase."""
        names = [work.plan.stages[i].name for i in fit_pass.steps]
        with state.timed(f"fit:{names[0]}"):
            parts = Drive(self, work, progress, state, fit_pass.end, fit_pass).run(work.corpus)
            if state.interrupted:
                return
            self._fit_step(work, fit_pass.steps[0], parts[0])
        for index, name, step_parts in zip(fit_pass.steps[1:], names[1:], parts[1:], strict=True):
            with state.timed(f"fit:{name}"):
                self._fit_step(work, index, step_parts)

    def _fit_step(self, work: Work, index: int, parts: list[Any]) -> None:
        plan = work.plan
        folder = execution.artifact_rel(plan, index)
        cap = execution.fit_cap(plan, index)
        log.info("fitting %s on a sample of %d samples", plan.stages[index].name, work.corpus_samples)
        r = self.resources[plan.stages[index].name]
        task = ray.remote(num_cpus=r.cpus, num_gpus=r.gpus, max_retries=2)(_fit_task)
        ref = task.remote(
            plan.recipe.stages[index],
            plan.stages[index].context,
            work.out,
            folder,
            cap,
            work.corpus_samples,
            *parts,
        )
        try:
            ray.get(ref)
        except RayTaskError as exc:
            cause = exc.cause if exc.cause is not None else exc
            raise RunAborted(
                "fit_failed", f"fitting {plan.stages[index].name} failed: {plain(str(cause))}"
            ) from exc


def _index_task(units: list[InputUnit], out: Store) -> tuple[list[IndexSummary], list[UnitIndex]]:
    indexes = index_file(units, out)
    return [ix.summary() for ix in indexes], indexes


def _duplicates_task(labels: dict[str, str], *groups: list[UnitIndex]) -> dict[str, dict[bytes, str]]:
    return find_duplicates([ix for group in groups for ix in group], labels)


def _fit_task(
    entry: Any, context: Any, out: Any, folder: str, cap: int | None, samples: int, *parts: Any
) -> Any:
    """``fitting.fit_global`` with the per-shard sample parts as separate arguments (Ray resolves those)."""
    return fit_global(entry, context, list(parts), out, folder, cap, samples)
