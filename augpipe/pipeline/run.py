"""One augmentation run, from the output folder's lock to its manifest.

1. Lock the output folder (one run at a time), move a 0.1 corpus's files under ``_augpipe/``, check that
   it is writable and has room, and remove only temporary files augpipe itself left.
2. Plan the recipe, find the input units, and refuse to write over another corpus (``corpus``).
3. Index every input (counts, checksums, keys repeated across shards), verify what earlier runs
   committed, set aside outputs of vanished inputs and stray data files.
4. Execute what is left (Ray, or in-process), then write the manifest with this run appended to its
   history. A run stopped by a signal, a full disk or a stage that cannot load still writes the manifest of
   what it finished when it can.
"""

from __future__ import annotations

import resource
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from augpipe.pipeline import corpus, layout
from augpipe.pipeline.address import ClusterAddress, check_address
from augpipe.pipeline.card import write_card
from augpipe.pipeline.config import ConfigError, Recipe
from augpipe.pipeline.execution import Executor, RunAborted, RunState, Work, log
from augpipe.pipeline.index import IndexSummary, drop_digest
from augpipe.pipeline.inputs import InputUnit, discover_inputs
from augpipe.pipeline.lock import OutputLock
from augpipe.pipeline.manifest import ManifestError, build_manifest, read_manifest, run_record, write_manifest
from augpipe.pipeline.plan import Plan, build_plan
from augpipe.pipeline.runlog import close_run_log, open_run_log
from augpipe.pipeline.storage import StorageError, Store, is_storage_error


@dataclass(frozen=True)
class RunOptions:
    """How to run: where, which shards, and what to keep. Defaults are the embedded local run."""

    address: str | None = None
    incremental: bool = False
    max_failure_rate: float = 0.05
    progress: bool = True
    overwrite: bool = False
    keep_cache: bool = False
    verify: bool = False
    executor: str = "ray"
    stop: threading.Event = field(default_factory=threading.Event)


@dataclass(frozen=True)
class RunResult:
    """The manifest as written (None when it could not be), and how the run ended."""

    manifest: dict[str, Any]
    manifest_path: str | None
    max_failure_rate: float
    interrupted: bool = False
    aborted: RunAborted | None = None
    manifest_error: str | None = None

    @property
    def failure_rate(self) -> float:
        return self.manifest["samples"]["failure_rate"]

    @property
    def ok(self) -> bool:
        return (
            self.failure_rate <= self.max_failure_rate
            and not self.manifest["incomplete_shards"]
            and not self.interrupted
            and self.aborted is None
        )


def output_store(out: str | Path) -> Store:
    """The output folder; an existing file there is a usage error, not a corpus."""
    store = Store(out)
    if not store.remote and store.local_path().is_file():
        raise ConfigError(f"--output {store.display()} is a file; give a folder (it is created if missing)")
    return store


def preflight(store: Store, units: list[InputUnit]) -> None:
    """Fail before any work when the output cannot hold one more shard (a rough, generous estimate)."""
    free = store.free_bytes()
    largest = max((u.size for u in units), default=0)
    needed = 2 * largest
    if free is not None and free < needed:
        raise StorageError(
            f"{store.display()} has {free / 2**20:.1f} MiB free; "
            f"one shard needs about {needed / 2**20:.1f} MiB"
        )


def _previous(store: Store) -> dict[str, Any] | None:
    try:
        return read_manifest(store)
    except ManifestError:
        return None


def make_executor(name: str, cluster: ClusterAddress | None) -> tuple[Executor, bool]:
    """The executor, and whether this call started Ray (and must stop it).

    Without an address augpipe starts its own Ray (``"local"``): a bare ``ray.init()`` would join
    whatever cluster ``ray start`` last left on this machine.
    """
    if name == "local":
        from augpipe.pipeline.local_executor import LocalExecutor

        return LocalExecutor(), False
    from augpipe.pipeline.executor import RayExecutor
    from augpipe.pipeline.ray_cluster import init_ray

    started = init_ray(cluster.text if cluster is not None else "local")
    return RayExecutor(), started


def _set_aside(store: Store, units: list[InputUnit], run_id: str, incremental: bool) -> dict[str, Any]:
    """Move out what the corpus no longer owns; an incremental run keeps shards of vanished inputs."""
    found: dict[str, Any] = {}
    if not incremental:
        orphans = corpus.orphan_shards(store, units)
        for stats in orphans:
            corpus.set_aside(store, corpus.shard_files(stats), run_id, "orphans")
        if orphans:
            log.warning(
                "set aside %d shards whose inputs are gone (%s) under %s/%s",
                len(orphans),
                ", ".join(s["shard"] for s in orphans),
                layout.SET_ASIDE_DIR,
                run_id,
            )
        found["orphans_set_aside"] = sorted(s["shard"] for s in orphans)
    strays = corpus.set_aside(store, corpus.strays(store), run_id, "strays")
    if strays:
        log.warning("set aside %d data files no shard owns (%s)", len(strays), ", ".join(strays))
    found["strays_set_aside"] = strays
    return found


@dataclass
class _Prepared:
    """The run's plan, its input units and those left to process, and what it found on the way."""

    plan: Plan
    units: list[InputUnit]
    todo: list[InputUnit]
    index: dict[str, IndexSummary]
    drops: dict[str, dict[bytes, str]]
    runs: list[dict[str, Any]]
    extra: dict[str, Any]
    labels: list[str]
    """Label names an earlier manifest gave ids to (kept in order)."""


def _todo(
    store: Store,
    plan: Plan,
    units: list[InputUnit],
    executor: Executor,
    previous: dict[str, Any] | None,
    options: RunOptions,
) -> tuple[list[InputUnit], dict[str, IndexSummary], dict[str, dict[bytes, str]]]:
    """Index the inputs, verify committed shards, and return the units left to process."""
    index, drops = executor.index(units, store)
    digests = {shard: drop_digest(drop) for shard, drop in drops.items()}
    verified = corpus.verify_done(store, units, plan.run_fingerprint, index, digests, options.verify)
    for shard, reason in verified.redo.items():
        log.warning("%s: %s, redone", shard, reason)
    todo = [u for u in units if u.shard_id not in verified.done]
    if options.incremental and previous is not None:
        seen = {entry["path"] for entry in previous.get("inputs", [])}
        todo = [u for u in todo if u.path not in seen]
    return todo, index, drops


def _execute(
    prepared: _Prepared, executor: Executor, store: Store, run_id: str, options: RunOptions
) -> RunState:
    if not prepared.todo:
        return RunState()
    work = Work(
        plan=prepared.plan,
        out=store,
        run_id=run_id,
        units=prepared.todo,
        corpus=prepared.units,
        index=prepared.index,
        drops=prepared.drops,
        keep_cache=options.keep_cache,
        progress=options.progress,
        stop=options.stop,
    )
    return executor.run(work)


def _finish(
    prepared: _Prepared, store: Store, run_id: str, started: datetime, state: RunState, options: RunOptions
) -> RunResult:
    """Write the manifest of the corpus as it stands (or say why it could not be written)."""
    order = {u.shard_id: i for i, u in enumerate(prepared.units)}
    records = [
        s for s in corpus.stats_records(store) if s.get("fingerprint") == prepared.plan.run_fingerprint
    ]
    shards = sorted(records, key=lambda s: (order.get(s["shard"], len(order)), s["shard"]))
    extra = {
        **prepared.extra,
        "interrupted": state.interrupted,
        "aborted": None if state.aborted is None else str(state.aborted),
        "reused_caches": dict(state.reused),
        "phases": {name: round(seconds, 3) for name, seconds in state.phases.items()},
        "driver_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    record = run_record(run_id, started, datetime.now(UTC), prepared.plan, state.committed, extra)
    manifest = build_manifest(
        prepared.plan, store, shards, state.broken, [*prepared.runs, record], state.cluster, prepared.labels
    )
    path, error = None, None
    try:
        path = write_manifest(store, manifest)
        write_card(store, manifest)
    except OSError as exc:
        if not is_storage_error(exc):
            raise
        error = f"{type(exc).__name__}: {exc}"
    return RunResult(manifest, path, options.max_failure_rate, state.interrupted, state.aborted, error)


def _run_locked(
    plan: Plan,
    units: list[InputUnit],
    store: Store,
    run_id: str,
    options: RunOptions,
    cluster: ClusterAddress | None,
) -> RunResult:
    started = datetime.now(UTC)
    recipe = plan.recipe
    if layout.is_legacy(store):
        moved = layout.migrate_legacy(store)
        log.info("moved %d files of an augpipe 0.1 corpus under %s/", len(moved), layout.AUGPIPE_DIR)
    removed = store.remove_partials(layout.AUGPIPE_DIR) + store.remove_partials("", recursive=False)
    if removed:
        log.info("removed %d temporary files a killed run left", removed)
    preflight(store, units)
    previous = _previous(store)
    clear = corpus.check_protection(store, recipe, plan.run_fingerprint, options.overwrite, previous)
    if clear:
        log.info("--overwrite: removed the %d shards of the previous corpus", corpus.clear_corpus(store))
    executor, started_ray = make_executor(options.executor, cluster)
    state = None
    try:
        indexed = time.perf_counter()
        todo, index, drops = _todo(store, plan, units, executor, previous, options)
        index_s = time.perf_counter() - indexed
        extra = {"incremental": options.incremental, "overwrite": clear}
        extra |= _set_aside(store, units, run_id, options.incremental)
        kept = previous if previous is not None and not clear else {}
        runs, labels = list(kept.get("runs", [])), list(kept.get("labels", {}).get("names", []))
        prepared = _Prepared(plan, units, todo, index, drops, runs, extra, labels)
        state = _execute(prepared, executor, store, run_id, options)
        state.phases = {"index": index_s, **state.phases}
    finally:
        if started_ray:
            from augpipe.pipeline.ray_cluster import shutdown

            shutdown()
        if state is None or state.interrupted or state.aborted is not None:
            _sweep_unfinished(store, run_id)  # a run that finished cleanly committed every shard it began
    return _finish(prepared, store, run_id, started, state, options)


def _sweep_unfinished(store: Store, run_id: str) -> None:
    """Leave only what the manifest lists: a run stopped mid-commit (a full disk, a signal) can leave a
    shard's tar without its sidecar or stats record, which a trainer globbing the folder would read."""
    try:
        store.remove_partials("", recursive=False)
        unfinished = corpus.set_aside(store, corpus.strays(store), run_id, "unfinished")
    except OSError as exc:
        log.warning("could not tidy the output after the run: %s", exc.strerror or exc)
        return
    if unfinished:
        log.warning(
            "set aside %d data files of shards that did not finish (%s)",
            len(unfinished),
            ", ".join(unfinished),
        )


def run_recipe(
    recipe: Recipe,
    input_path: str | Path,
    out_dir: str | Path,
    options: RunOptions | None = None,
    **kwargs: Any,
) -> RunResult:
    """Run ``recipe`` over ``input_path`` into ``out_dir``, skipping shards already done (resume).

    ``kwargs`` are ``RunOptions`` fields, for callers that set one or two.
    """
    options = options or RunOptions(**kwargs)
    cluster = check_address(options.address) if options.executor == "ray" else None
    store = output_store(out_dir)
    plan = build_plan(recipe)
    units = discover_inputs(str(input_path), recipe.shard_size)
    run_id = uuid.uuid4().hex
    try:
        store.makedirs(layout.AUGPIPE_DIR)
        lock = OutputLock.acquire(store, run_id)
    except OSError as exc:
        raise StorageError(f"{store.display()} is not writable: {exc.strerror or exc}") from exc
    handler = open_run_log(store, run_id)
    try:
        return _run_locked(plan, units, store, run_id, options, cluster)
    finally:
        close_run_log(handler)
        lock.release()
