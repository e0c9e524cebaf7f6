"""The Ray executor, and the only module (with ``run``'s ``ray.shutdown``) that imports Ray.

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

Global stages fit on a seeded sample: each shard's sample part stays in the object store and goes
straight into the fit task, so the driver never holds fit data.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import signal
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

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
from augpipe.pipeline.index import IndexSummary, UnitIndex, by_file, find_duplicates, index_file
from augpipe.pipeline.inputs import InputUnit
from augpipe.pipeline.stage import Resources, Stage
from augpipe.pipeline.storage import Store, is_storage_error
from augpipe.pipeline.worker import (
    FitDraw,
    StageRunner,
    commit_lost_shard,
    commit_shard,
    fit_global,
    fit_samples,
    read_cached,
    read_source,
)

TASK_CPUS = 0.25
# Workers never reach a model hub (a missing model is an error, not a download), and print no model
# loading progress bars into the job's log.
WORKER_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "TQDM_DISABLE": "1",
}
LOST_RESTARTS = 5
CLIENT_CONNECT_ATTEMPTS = 3
CLIENT_RETRY_DELAY_S = 5.0
REPLACEMENTS_PER_STEP = 8


def init_ray(address: str | None) -> bool:
    """Join ``address`` or start a local instance; True when this call started Ray (and must stop it).

    Ray's core worker installs its own SIGINT/SIGTERM handlers (a stack dump, then exit 1); the ones the
    caller had are put back, so a signal stops the run cleanly with its documented exit code.
    """
    if ray.is_initialized():
        return False
    env = {k: v for k, v in WORKER_ENV.items() if k not in os.environ}
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    attempts = CLIENT_CONNECT_ATTEMPTS if (address or "").startswith("ray://") else 1
    for attempt in range(1, attempts + 1):
        try:
            ray.init(
                address=address,
                include_dashboard=False,
                configure_logging=True,
                logging_level="WARNING",
                log_to_driver=True,
                runtime_env={"env_vars": env} if env else None,
            )
            break
        except ConnectionError as error:
            # The head's client proxy starts one server process per client; on a busy head that
            # process can fail to come up, and the next connection usually gets one that does.
            if attempt == attempts:
                raise
            log.warning(
                "joining %s failed (attempt %d of %d): %s; retrying",
                address,
                attempt,
                attempts,
                str(error).strip().splitlines()[-1],
            )
            time.sleep(CLIENT_RETRY_DELAY_S * attempt)
    if threading.current_thread() is threading.main_thread():
        for sig, handler in handlers.items():
            if handler is not None:
                signal.signal(sig, handler)
    return True


def shutdown() -> None:
    ray.shutdown()


def describe_cluster() -> dict[str, Any]:
    """Where the run executed, for the manifest: the Ray address, nodes, CPUs and GPUs."""
    resources = ray.cluster_resources()
    try:
        address = ray.get_runtime_context().gcs_address
    except Exception:  # Ray Client connections have no GCS address on the driver side
        address = "ray-client"
    return {
        "executor": "ray",
        "address": address,
        "nodes": sum(1 for node in ray.nodes() if node["Alive"]),
        "cpus": resources.get("CPU", 0.0),
        "gpus": resources.get("GPU", 0.0),
    }


def _largest_node_cpus() -> float:
    return max((n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n["Alive"]), default=1.0)


def _floor(cpus: float) -> float:
    """Round a CPU share down to Ray's resolution: rounded up, the actors' shares add up to more than
    the room left, and the read and commit tasks beside them run one at a time instead of two."""
    return math.floor(cpus * 1000) / 1000


def fit_resources(stages: list[Stage]) -> dict[str, Resources]:
    """Each stage's resources, scaled so every actor fits the cluster beside the read and commit tasks.

    A 2-core laptop cannot give five stages a CPU each, nor its memory 8 GiB per diffusion worker; they
    still run, sharing what there is, instead of waiting forever for resources that do not exist (Ray
    would queue those actors silently). No actor asks for more CPUs than the largest node has. GPUs are
    never invented or oversubscribed: a stage that asks for one on a cluster without any runs on CPU when
    its device is ``auto`` and fails when it is ``cuda``, and GPU shares that add up to more than the
    cluster has fail with the numbers.
    """
    cluster = ray.cluster_resources()
    gpus_total = cluster.get("GPU", 0.0)
    wanted = {s.name: s.effective_resources() for s in stages}
    gpu = {name: r.gpus if gpus_total > 0 else 0.0 for name, r in wanted.items()}
    for stage in stages:
        if wanted[stage.name].gpus > 0 and gpus_total == 0:
            if stage.settings.device == "cuda":
                raise RuntimeError(f"stage {stage.name} has device: cuda but the Ray cluster has no GPU")
            log.warning("no GPU in the cluster; %s runs on CPU", stage.name)
    gpus_asked = sum(gpu[s.name] * s.settings.concurrency for s in stages)
    if gpus_asked > gpus_total + 1e-9:
        shares = ", ".join(f"{s.name} {gpu[s.name]} x{s.settings.concurrency}" for s in stages if gpu[s.name])
        raise RuntimeError(
            f"stages ask for {gpus_asked:g} GPUs ({shares}) but the cluster has {gpus_total:g}; "
            "lower their gpus: or concurrency: (e.g. --set caption.gpus=0.25)"
        )

    def scale(asked: float, available: float) -> float:
        return min(1.0, available / asked) if asked > 0 else 1.0

    cpu_scale = scale(
        sum(wanted[s.name].cpus * s.settings.concurrency for s in stages),
        max(cluster.get("CPU", 1.0) - 2 * TASK_CPUS, 0.1),
    )
    node_cpus = max(_largest_node_cpus() - TASK_CPUS, 0.1)
    memory_scale = scale(
        sum(wanted[s.name].memory_gb * s.settings.concurrency for s in stages) * 2**30,
        0.8 * cluster.get("memory", float("inf")),
    )
    return {
        s.name: Resources(
            cpus=_floor(min(wanted[s.name].cpus * cpu_scale, node_cpus)),
            gpus=gpu[s.name],
            memory_gb=wanted[s.name].memory_gb * memory_scale,
        )
        for s in stages
    }


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
class _Pool:
    """The actors of one step; ``busy`` marks those with a call (or a liveness ping) outstanding."""

    handles: list[Any] = field(default_factory=list)
    busy: list[bool] = field(default_factory=list)
    replaced: int = 0

    def free(self) -> int | None:
        return next((i for i, b in enumerate(self.busy) if not b), None)


class RayExecutor:
    """Runs a plan over input units with Ray actor pools; see the module docstring for fault tolerance."""

    def __init__(self, max_attempts: int = 2, max_restarts: int = 4, max_task_retries: int = 1) -> None:
        self.max_attempts = max_attempts
        self.max_restarts = max_restarts
        self.max_task_retries = max_task_retries
        self.pools: dict[int, _Pool] = {}
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

    def _pool(self, work: Work, index: int) -> _Pool:
        """The step's actor pool, created on first use (steps served from cache never load a model)."""
        if index not in self.pools:
            count = work.plan.stages[index].settings.concurrency
            self.pools[index] = _Pool([self._new_actor(work, index) for _ in range(count)], [False] * count)
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
                    _Drive(self, work, progress, state, len(work.plan.stages)).run(work.units)
        except RunAborted as exc:
            state.aborted = exc
        return state

    def _fit(self, work: Work, fit_pass: execution.FitPass, progress: Progress, state: RunState) -> None:
        """Draw every sample of the pass, then fit each step; the shared pass counts in the first fit's
        phase."""
        names = [work.plan.stages[i].name for i in fit_pass.steps]
        with state.timed(f"fit:{names[0]}"):
            parts = _Drive(self, work, progress, state, fit_pass.end, fit_pass).run(work.corpus)
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


def _fit_samples_task(rows: Any, draws: list[FitDraw]) -> Any:
    """``worker.fit_samples`` with one return value per draw (Ray's ``num_returns`` wants a bare one)."""
    parts = fit_samples(rows, draws)
    return parts[0] if len(parts) == 1 else tuple(parts)


def _fit_task(
    entry: Any, context: Any, out: Any, folder: str, cap: int | None, samples: int, *parts: Any
) -> Any:
    """``worker.fit_global`` with the per-shard sample parts as separate arguments (Ray resolves those)."""
    return fit_global(entry, context, list(parts), out, folder, cap, samples)


class _Drive:
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
        self.parts: list[list[Any]] = [[] for _ in self.draws]
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
        return self.parts

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
            for parts, ref in zip(self.parts, call.outputs, strict=True):
                parts.append(ref)
            return
        self.state.committed[shard.unit.shard_id] = result
        self.progress.shards_done += 1

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
