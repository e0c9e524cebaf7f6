"""The Ray executor's dispatch loop: shards move through the steps as object references, one call per actor
at a time, and a worker's death touches only the shard it was working on (see ``executor`` for the
fault-tolerance rules this loop carries out)."""

from __future__ import annotations

import contextlib
import functools
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import ray
from ray.exceptions import (
    NodeDiedError,
    ObjectLostError,
    RayActorError,
    RayTaskError,
    TaskCancelledError,
    WorkerCrashedError,
)

from augpipe.pipeline import execution
from augpipe.pipeline.config import plain
from augpipe.pipeline.execution import Progress, RunAborted, RunState, Work, log
from augpipe.pipeline.fitting import FitDraw, fit_samples, merge_parts
from augpipe.pipeline.inputs import InputUnit
from augpipe.pipeline.ray_cluster import TASK_CPUS
from augpipe.pipeline.storage import is_storage_error
from augpipe.pipeline.worker import commit_lost_shard, commit_shard, read_cached, read_source

if TYPE_CHECKING:
    from augpipe.pipeline.executor import RayExecutor

LOST_RESTARTS = 5
REPLACEMENTS_PER_STEP = 8
# Fit sample parts are merged this many at a time as shards finish. On a large corpus each shard's part
# is small, and Ray keeps objects under its inline limit (100 KB) in the driver's own memory and copies
# them into the task that reads them; merged chunks are large enough to live in the object store.
MERGE_CHUNK = 32


@functools.cache
def remote(fn: Callable[..., Any], returns: int = 1) -> Any:
    """A light Ray task for reading, cache loading and committing (CPU work beside the model actors)."""
    return ray.remote(num_cpus=TASK_CPUS, num_returns=returns, max_retries=3)(fn)


@dataclass
class _Shard:
    """A unit on its way through the steps: where it is, its latest rows and history, its failures."""

    unit: InputUnit
    position: int = 0
    rows: Any = None
    history: Any = None
    attempts: int = 0
    restarts: int = 0


@dataclass
class _Call:
    """What a watched object reference stands for."""

    kind: str
    shard: _Shard | None = None
    step: int = -1
    actor: int = -1
    outputs: tuple[Any, ...] | None = None


@dataclass
class Pool:
    """The actors of one step; ``busy`` marks those with a call (or a liveness ping) outstanding."""

    handles: list[Any] = field(default_factory=list)
    busy: list[bool] = field(default_factory=list)
    replaced: int = 0

    def free(self) -> int | None:
        return next((i for i, b in enumerate(self.busy) if not b), None)


def _fit_samples_task(rows: Any, draws: list[FitDraw]) -> Any:
    """``fitting.fit_samples`` with one return value per draw (Ray's ``num_returns`` wants a bare one)."""
    parts = fit_samples(rows, draws)
    return parts[0] if len(parts) == 1 else tuple(parts)


def _merge_task(cap: int | None, *parts: dict[str, list[Any]]) -> dict[str, list[Any]]:
    """``fitting.merge_parts`` with the parts as separate arguments (Ray resolves those)."""
    return merge_parts(list(parts), cap)


class Drive:
    """One pass of units through steps ``[0, end)``, then a finishing task per shard: the commit, or, for
    a fit pass, the shard's part of each fit sample (kept as references, never fetched)."""

    def __init__(
        self,
        executor: RayExecutor,
        work: Work,
        progress: Progress,
        state: RunState,
        end: int,
        fit_pass: execution.FitPass | None = None,
    ) -> None:
        self.x, self.work, self.progress, self.state, self.end = executor, work, progress, state, end
        self.fitting = fit_pass is not None
        self.ready: dict[int, deque[_Shard]] = {i: deque() for i in range(end)}
        self.running: dict[Any, _Call] = {}
        self.in_flight = 0
        self.limit = max(2, sum(s.settings.concurrency for s in work.plan.stages[:end]) + 1)
        self.draws = fit_pass.draws(work.plan, work.corpus_samples) if fit_pass else []
        self.caps = [execution.fit_cap(work.plan, i) for i in fit_pass.steps] if fit_pass else []
        self.parts: list[list[Any]] = [[] for _ in self.draws]
        self.unmerged: list[list[Any]] = [[] for _ in self.draws]
        self.skip_media = fit_pass.skip_media(work.plan) if fit_pass else set()

    def run(self, units: list[InputUnit]) -> list[list[Any]]:
        queue = deque(units)
        while queue or self.running or any(self.ready.values()):
            if self.work.stop.is_set():
                self._interrupt()
                break
            while queue and self.in_flight < self.limit:
                self._start(_Shard(queue.popleft()))
            self._dispatch()
            if not self.running:
                continue
            done, _ = ray.wait(list(self.running), num_returns=1, timeout=0.5, fetch_local=False)
            for ref in done:
                self._handle(ref, self.running.pop(ref))
            self._show()
        self._show(force=not self.fitting)
        return [parts + rest for parts, rest in zip(self.parts, self.unmerged, strict=True)]

    def _show(self, force: bool = False) -> None:
        progress = self.progress
        if not (progress.due() or (force and progress.enabled)):
            return
        with contextlib.suppress(ray.exceptions.GetTimeoutError):
            progress.samples = Counter(ray.get(self.x.sink.snapshot.remote(), timeout=5))
        progress.show(force)

    def _interrupt(self) -> None:
        self.state.interrupted = True
        for ref in list(self.running):
            ray.cancel(ref)
        self.running.clear()

    # -------------------------------------------------------------------------------- submitting

    def _start(self, shard: _Shard) -> None:
        """Submit the shard's first call: its deepest cached step output, or its input."""
        work, unit = self.work, shard.unit
        start = execution.deepest_cache(work.out, work.plan, unit, self.end)
        if start is None:
            rows, history = remote(read_source, 2).remote(
                unit,
                work.plan.recipe,
                work.run_id,
                work.index.get(unit.shard_id),
                work.drops.get(unit.shard_id, {}),
                self.skip_media,
            )
            shard.position = 0
        else:
            rows, history = remote(read_cached, 2).remote(work.out, start[1], start[2], work.run_id)
            shard.position = start[0] + 1
        if shard.restarts == 0 and shard.attempts == 0:
            self.in_flight += 1
        self.running[history] = _Call("read", shard, outputs=(rows, history))

    def _dispatch(self) -> None:
        for index in range(self.end):
            queue = self.ready[index]
            while queue:
                pool = self.x._pool(self.work, index)
                actor = pool.free()
                if actor is None:
                    break
                shard = queue.popleft()
                rows, history = (
                    pool.handles[actor]
                    .run.options(num_returns=2)
                    .remote(shard.unit.shard_id, shard.rows, shard.history)
                )
                pool.busy[actor] = True
                self.running[history] = _Call("step", shard, index, actor, (rows, history))

    def _advance(self, shard: _Shard) -> None:
        if shard.position < self.end:
            self.ready[shard.position].append(shard)
            return
        work, unit = self.work, shard.unit
        if self.fitting:
            parts = remote(_fit_samples_task, len(self.draws)).remote(shard.rows, self.draws)
            parts = [parts] if len(self.draws) == 1 else list(parts)
            self.running[parts[0]] = _Call("finish", shard, outputs=tuple(parts))
            return
        prune = [] if work.keep_cache else execution.cache_rels(work.plan, unit)
        plan = work.plan
        ref = remote(commit_shard).remote(
            work.out, unit, plan.output, plan.run_fingerprint, shard.rows, shard.history, prune
        )
        self.running[ref] = _Call("finish", shard)

    # ---------------------------------------------------------------------------------- results

    def _handle(self, ref: Any, call: _Call) -> None:
        if call.kind == "ping":
            self._pinged(ref, call)
            return
        if call.kind == "step":
            self.x.pools[call.step].busy[call.actor] = False
        shard = call.shard
        assert shard is not None
        try:
            result = ray.get(ref) if call.kind != "finish" or not self.fitting else None
        except Exception as exc:
            self._failed(call, shard, exc)
            return
        if call.kind == "finish":
            self._finished(shard, call, result)
            return
        if call.kind == "read" and shard.position > 0:
            execution.count_reused(result, self.progress, self.state)
        shard.rows, shard.history = call.outputs  # type: ignore[misc]
        if call.kind == "step":
            shard.position = call.step + 1
        self._advance(shard)

    def _finished(self, shard: _Shard, call: _Call, result: Any) -> None:
        self.in_flight -= 1
        if self.fitting:
            for draw, ref in enumerate(call.outputs or ()):
                self._collect(draw, ref)
            return
        self.state.committed[shard.unit.shard_id] = result
        self.progress.shards_done += 1

    def _collect(self, draw: int, ref: Any) -> None:
        """Keep a shard's part of a fit sample; every ``MERGE_CHUNK`` parts become one merged part (the
        same sample: see ``fitting.merge_parts``) that lives in the object store. The small parts stay
        in the driver only as the merge task's lineage, not again inside the fit task's arguments."""
        unmerged = self.unmerged[draw]
        unmerged.append(ref)
        if len(unmerged) >= MERGE_CHUNK:
            self.parts[draw].append(remote(_merge_task).remote(self.caps[draw], *unmerged))
            unmerged.clear()

    def _failed(self, call: _Call, shard: _Shard, exc: Exception) -> None:
        unit = shard.unit
        if isinstance(exc, TaskCancelledError):
            return
        log.debug("%s: %s failed", unit.shard_id, call.kind, exc_info=exc)
        if isinstance(exc, RayActorError):
            self._actor_died(call, shard, exc)
            return
        if isinstance(exc, ObjectLostError | WorkerCrashedError | NodeDiedError):
            shard.restarts += 1
            if shard.restarts <= LOST_RESTARTS:
                log.warning(
                    "shard %s: %s; restarting it from its last saved step", unit.shard_id, type(exc).__name__
                )
                self._start(shard)
                return
        cause = exc.cause if isinstance(exc, RayTaskError) and exc.cause is not None else exc
        if is_storage_error(cause):
            raise RunAborted("storage", f"{type(cause).__name__}: {cause}") from exc
        self._give_up(shard, type(cause).__name__, f"{type(cause).__name__}: {cause}")

    def _give_up(self, shard: _Shard, cause: str, message: str) -> None:
        self.in_flight -= 1
        index = self.work.index.get(shard.unit.shard_id)
        if self.fitting:
            log.warning("shard %s left out of the fit sample: %s", shard.unit.shard_id, plain(message))
            return
        self.state.break_shard(shard.unit, cause, message, index.samples if index else None)

    def _actor_died(self, call: _Call, shard: _Shard, exc: RayActorError) -> None:
        step_name = self.work.plan.stages[call.step].name if call.step >= 0 else "read"
        if exc.actor_init_failed:
            raise RunAborted("stage_setup", f"stage {step_name} could not start: {plain(str(exc))}")
        if call.kind == "step":
            pool = self.x.pools[call.step]
            pool.busy[call.actor] = True
            ping = pool.handles[call.actor].ping.remote()
            self.running[ping] = _Call("ping", None, call.step, call.actor)
        shard.attempts += 1
        if shard.attempts < self.x.max_attempts:
            log.warning(
                "%s: the %s worker died (attempt %d of %d); resubmitting",
                shard.unit.shard_id,
                step_name,
                shard.attempts,
                self.x.max_attempts,
            )
            self.ready[call.step].appendleft(shard)
            return
        tries = self.x.max_attempts * (self.x.max_task_retries + 1)
        message = (
            f"the {step_name} worker died {tries} times processing shard {shard.unit.shard_id} (a sample in "
            "it crashes the worker, e.g. a native decoder fault); its samples are quarantined"
        )
        log.warning("%s is a poison shard: %s", shard.unit.shard_id, message)
        if self.fitting:
            self._give_up(shard, "worker_crashed", message)
            return
        work, plan = self.work, self.work.plan
        prune = [] if work.keep_cache else execution.cache_rels(plan, shard.unit)
        ref = remote(commit_lost_shard).remote(
            work.out,
            shard.unit,
            plan.output,
            plan.run_fingerprint,
            shard.rows,
            shard.history,
            step_name,
            message,
            prune,
        )
        self.running[ref] = _Call("finish", shard)

    def _pinged(self, ref: Any, call: _Call) -> None:
        """A suspect actor answered (free again) or is dead for good (replaced by a fresh one)."""
        pool = self.x.pools[call.step]
        try:
            ray.get(ref)
        except RayActorError as exc:
            if exc.actor_init_failed:
                name = self.work.plan.stages[call.step].name
                raise RunAborted("stage_setup", f"stage {name} could not start: {plain(str(exc))}") from exc
            pool.replaced += 1
            if pool.replaced > REPLACEMENTS_PER_STEP:
                name = self.work.plan.stages[call.step].name
                raise RunAborted(
                    "worker_crashed", f"the {name} workers keep dying ({pool.replaced} replaced)"
                ) from exc
            pool.handles[call.actor] = self.x._new_actor(self.work, call.step)
        pool.busy[call.actor] = False
