"""The only module that knows Ray: actor pools per stage, shards chained through object references.

For each shard the driver submits ``read -> stage 1 -> ... -> commit`` as a chain of Ray calls whose
arguments are the previous call's results, so Ray starts each step when its input is ready and several
shards are in flight at once (shard N+1 is transcribed while shard N is synthesised). Model stages are
long-lived actors that load their model once. Stage outputs already cached under the same chain
fingerprint are read back instead of recomputed, and shards whose stats record matches the run are
skipped entirely: that is resume.
"""

from __future__ import annotations

import functools
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray

from augpipe.pipeline.inputs import InputUnit
from augpipe.pipeline.plan import Plan
from augpipe.pipeline.stage import Resources, Stage
from augpipe.pipeline.worker import (
    StageRunner,
    artifact_dir,
    cache_files,
    commit_shard,
    fit_global,
    project_rows,
    read_cached,
    read_fit,
    read_source,
)
from augpipe.pipeline.writer import read_stats

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


@dataclass
class RunState:
    """What the driver knows while a run goes on: finished shards and per-stage progress."""

    total: int
    done: dict[str, dict[str, Any]] = field(default_factory=dict)
    broken: dict[str, str] = field(default_factory=dict)
    cluster: dict[str, Any] = field(default_factory=dict)
    stage_out: dict[str, int] = field(default_factory=dict)
    stage_wall: dict[str, float] = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)

    def count(self, stage: str, record: dict[str, Any]) -> None:
        """Add one shard's record of ``stage`` to its progress, unless an earlier run computed it."""
        if not record["reused"]:
            self.stage_out[stage] = self.stage_out.get(stage, 0) + record["samples_out"]
            self.stage_wall[stage] = self.stage_wall.get(stage, 0.0) + record["wall_s"]


def is_done(out_dir: Path, unit: InputUnit, fingerprint: str) -> dict[str, Any] | None:
    """The shard's stats if it was committed by a run of the same configuration and its files exist."""
    stats = read_stats(out_dir, unit.shard_id)
    if stats is None or stats.get("fingerprint") != fingerprint:
        return None
    if not all((out_dir / entry["path"]).exists() for entry in stats["outputs"]):
        return None
    return stats


def init_ray(address: str | None) -> bool:
    """Join ``address`` or start a local instance; True when this call started Ray (and must stop it)."""
    if ray.is_initialized():
        return False
    env = {k: v for k, v in WORKER_ENV.items() if k not in os.environ}
    ray.init(
        address=address,
        include_dashboard=False,
        configure_logging=True,
        logging_level="WARNING",
        log_to_driver=True,
        runtime_env={"env_vars": env} if env else None,
    )
    return True


def describe_cluster() -> dict[str, Any]:
    """Where the run executed, for the manifest: the Ray address, nodes, CPUs and GPUs."""
    resources = ray.cluster_resources()
    return {
        "address": ray.get_runtime_context().gcs_address,
        "nodes": sum(1 for node in ray.nodes() if node["Alive"]),
        "cpus": resources.get("CPU", 0.0),
        "gpus": resources.get("GPU", 0.0),
    }


def fit_resources(stages: list[Stage]) -> dict[str, Resources]:
    """Each stage's resources, scaled so every actor fits the cluster beside the read and commit tasks.

    A 2-core laptop cannot give five stages a CPU each, nor its memory 8 GiB per diffusion worker; they
    still run, sharing what there is, instead of waiting forever for resources that do not exist (Ray
    would queue those actors silently). GPUs are never invented or oversubscribed: a stage that asks for
    one on a cluster without any runs on CPU when its device is ``auto`` and fails when it is ``cuda``,
    and GPU shares that add up to more than the cluster has fail with the numbers.
    """
    cluster = ray.cluster_resources()
    gpus_total = cluster.get("GPU", 0.0)
    wanted = {s.name: s.effective_resources() for s in stages}
    gpu = {name: r.gpus if gpus_total > 0 else 0.0 for name, r in wanted.items()}
    for stage in stages:
        if wanted[stage.name].gpus > 0 and gpus_total == 0:
            if stage.settings.device == "cuda":
                raise RuntimeError(f"stage {stage.name} has device: cuda but the Ray cluster has no GPU")
            print(f"augpipe: no GPU in the cluster; {stage.name} runs on CPU", file=sys.stderr)
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
    memory_scale = scale(
        sum(wanted[s.name].memory_gb * s.settings.concurrency for s in stages) * 2**30,
        0.8 * cluster.get("memory", float("inf")),
    )
    return {
        s.name: Resources(
            cpus=round(wanted[s.name].cpus * cpu_scale, 3),
            gpus=gpu[s.name],
            memory_gb=wanted[s.name].memory_gb * memory_scale,
        )
        for s in stages
    }


class Progress:
    """Per-stage samples/s and an ETA on stderr: at most every ``every`` seconds while work moves (at once
    when a shard finishes), and a heartbeat when nothing does."""

    def __init__(
        self,
        state: RunState,
        stage_names: list[str],
        enabled: bool,
        every: float = 2.0,
        heartbeat: float = 30.0,
    ) -> None:
        self.state, self.names, self.enabled = state, stage_names, enabled
        self.every, self.heartbeat = every, heartbeat
        self.last_line, self.last_time = "", 0.0

    def update(self) -> None:
        if not self.enabled:
            return
        state = self.state
        finished = len(state.done)
        parts = [f"shards {finished}/{state.total}"]
        for name in self.names:
            wall = state.stage_wall.get(name, 0.0)
            rate = state.stage_out.get(name, 0) / wall if wall > 0 else 0.0
            parts.append(f"{name} {state.stage_out.get(name, 0)} ({rate:.1f}/s)")
        line = " | ".join(parts)
        now = time.perf_counter()
        quiet_for = now - self.last_time
        shard_finished = not self.last_line.startswith(parts[0] + " ")
        if line == self.last_line and quiet_for < self.heartbeat:
            return
        if not shard_finished and quiet_for < self.every:
            return
        elapsed = now - state.started
        eta = f"{elapsed / finished * (state.total - finished):.0f}s" if finished else "?"
        print(f"augpipe: {line} | {elapsed:.0f}s elapsed, ETA {eta}", file=sys.stderr, flush=True)
        self.last_line, self.last_time = line, now


class Executor:
    """Runs a plan over input units with Ray; the result holds every shard's stats record."""

    def __init__(self, plan: Plan, out_dir: Path, run_id: str, progress: bool = True) -> None:
        self.plan = plan
        self.run_id = run_id
        self.out_dir = out_dir
        self.progress_enabled = progress
        self.pools: dict[int, list[Any]] = {}
        self.turn: dict[int, int] = {}
        self.resources: dict[str, Resources] = {}

    def _actor(self, index: int) -> Any:
        """Round-robin over the stage's actor pool, created on first use (cached stages never load)."""
        if index not in self.pools:
            stage, entry = self.plan.stages[index], self.plan.recipe.stages[index]
            r = self.resources[stage.name]
            actor_cls = ray.remote(StageRunner).options(
                num_cpus=r.cpus, num_gpus=r.gpus, memory=int(r.memory_gb * 2**30), max_concurrency=1
            )
            fitted = str(self._artifact(index)) if stage.needs_fit else None
            self.pools[index] = [
                actor_cls.remote(
                    entry,
                    stage.context,
                    self.plan.chain[index],
                    str(self.out_dir),
                    self.run_id,
                    self._feeds_fit(index),
                    fitted,
                )
                for _ in range(stage.settings.concurrency)
            ]
            self.turn[index] = 0
        pool = self.pools[index]
        self.turn[index] += 1
        return pool[self.turn[index] % len(pool)]

    def _feeds_fit(self, index: int) -> bool:
        """The stage just before a global stage always caches: the fit and the processing both read it."""
        following = index + 1
        return following < len(self.plan.stages) and self.plan.stages[following].needs_fit

    def _artifact(self, index: int) -> Path:
        return artifact_dir(self.out_dir, self.plan.stages[index].name, self.plan.chain[index])

    def _start(self, unit: InputUnit, limit: int | None = None) -> tuple[Any, Any, int]:
        """The deepest cached stage output before ``limit``, or the input: (rows, history, next stage)."""
        end = len(self.plan.stages) if limit is None else limit
        for index in range(end - 1, -1, -1):
            stage = self.plan.stages[index]
            parquet, history = cache_files(self.out_dir, stage.name, self.plan.chain[index], unit.shard_id)
            if (stage.cacheable or self._feeds_fit(index)) and history.exists() and parquet.exists():
                rows, hist = remote(read_cached, 2).remote(parquet, history, self.run_id)
                return rows, hist, index + 1
        rows, hist = remote(read_source, 2).remote(unit, self.plan.recipe, self.run_id)
        return rows, hist, 0

    def _chain(self, unit: InputUnit, end: int) -> tuple[Any, Any, dict[Any, tuple[str, int]]]:
        """Submit the shard's steps up to stage ``end`` (exclusive) from its deepest cache."""
        rows, history, first = self._start(unit, end)
        watch: dict[Any, tuple[str, int]] = {}
        for index in range(first, end):
            method = self._actor(index).run.options(num_returns=2)
            rows, history = method.remote(unit.shard_id, rows, history)
            watch[history] = (unit.shard_id, index)
        return rows, history, watch

    def _fit(self, index: int, units: list[InputUnit], state: RunState) -> None:
        """Run everything before global stage ``index`` over the whole corpus, then fit it once."""
        folder = self._artifact(index)
        if read_fit(folder) is not None:
            return
        stage, entry = self.plan.stages[index], self.plan.recipe.stages[index]
        fields = sorted(stage.fit_fields())
        columns: dict[str, list[Any]] = {name: [] for name in ["key", *fields]}
        pending, watched = [], {}
        for unit in units:
            rows, _, watch = self._chain(unit, index)
            pending.append(remote(project_rows, 1).remote(rows, fields))
            watched.update(watch)
        for part in ray.get(pending):
            for name, values in part.items():
                columns[name].extend(values)
        for ref, (_, position) in watched.items():
            state.count(self.plan.stages[position].name, ray.get(ref)["stages"][-1])
        if self.progress_enabled:
            print(f"augpipe: fitting {stage.name} on {len(columns['key'])} rows", file=sys.stderr, flush=True)
        r = self.resources[stage.name]
        task = ray.remote(num_cpus=r.cpus, num_gpus=r.gpus)(fit_global)
        ray.get(task.remote(entry, stage.context, columns, str(folder)))

    def _submit(self, unit: InputUnit) -> dict[Any, tuple[str, int]]:
        """Chain the shard's remaining steps and its commit; returns refs to watch with their position."""
        rows, history, watch = self._chain(unit, len(self.plan.stages))
        committed = remote(commit_shard, 1).remote(
            self.out_dir, unit, self.plan.recipe, self.plan.run_fingerprint, rows, history
        )
        watch[committed] = (unit.shard_id, len(self.plan.stages))
        return watch

    def run(
        self, units: list[InputUnit], done: dict[str, dict[str, Any]], corpus: list[InputUnit]
    ) -> RunState:
        """Process ``units`` (the shards not yet done); global stages fit over the whole ``corpus``."""
        state = RunState(total=len(units) + len(done), done=dict(done), cluster=describe_cluster())
        self.resources = fit_resources(self.plan.stages)
        for index, stage in enumerate(self.plan.stages):
            if stage.needs_fit:
                self._fit(index, corpus, state)
        progress = Progress(state, [s.name for s in self.plan.stages], self.progress_enabled)
        limit = max(2, sum(s.settings.concurrency for s in self.plan.stages) + 1)
        queue = list(units)
        watching: dict[Any, tuple[str, int]] = {}
        in_flight = 0
        while queue or watching:
            while queue and in_flight < limit:
                watching.update(self._submit(queue.pop(0)))
                in_flight += 1
            ready, _ = ray.wait(list(watching), num_returns=1, timeout=1.0)
            for ref in ready:
                shard_id, position = watching.pop(ref)
                try:
                    result = ray.get(ref)
                except (ray.exceptions.RayError, OSError) as exc:
                    if position == len(self.plan.stages):
                        state.broken[shard_id] = f"{type(exc).__name__}: {exc}"
                        in_flight -= 1
                        print(f"augpipe: shard {shard_id} failed and was not written: {exc}", file=sys.stderr)
                    continue
                if position == len(self.plan.stages):
                    state.done[shard_id] = result
                    in_flight -= 1
                else:
                    state.count(self.plan.stages[position].name, result["stages"][-1])
            progress.update()
        return state


@functools.cache
def remote(fn: Callable[..., Any], returns: int) -> Any:
    """A light Ray task for reading, cache loading and committing (CPU work beside the model actors)."""
    return ray.remote(num_cpus=TASK_CPUS, num_returns=returns, max_retries=2)(fn)
