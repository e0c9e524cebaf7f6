"""What every executor shares: the work it is given, the state it returns, caching rules and progress.

Two executors implement ``Executor``: ``executor.RayExecutor`` (the default; the only module that imports
Ray) and ``local_executor.LocalExecutor`` (in-process, one shard at a time: for debugging with pdb and for
fast tests). Both run the same per-shard steps from ``worker``: read, each stage, commit; and the same fit
phase for global stages.

Caching: a step's per-shard output is cached only when its stage is expensive (``cacheable``: model
stages) and an expensive step follows it (the shard itself is the last step's result, and cheap filters
after a step are redone in milliseconds). Caches serve two
purposes, resuming a shard a killed run left half done and re-running with a changed downstream option
(``--overwrite``), and they are pruned when their shard commits unless ``keep_cache`` asks otherwise.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

from augpipe.pipeline import layout
from augpipe.pipeline.config import plain
from augpipe.pipeline.fitting import FitDraw, read_fit, sample_rate
from augpipe.pipeline.index import IndexSummary
from augpipe.pipeline.inputs import InputUnit
from augpipe.pipeline.plan import SOURCE_FIELDS, Plan
from augpipe.pipeline.records import StageRecord
from augpipe.pipeline.storage import Store

log = logging.getLogger("augpipe")


class RunAborted(RuntimeError):
    """The run cannot go on (storage refuses writes, a stage cannot load); what finished stays committed."""

    def __init__(self, cause: str, message: str) -> None:
        super().__init__(message)
        self.cause = cause


@dataclass
class Work:
    """Everything an executor needs for one run."""

    plan: Plan
    out: Store
    run_id: str
    units: list[InputUnit]
    """Units to process (not already committed)."""
    corpus: list[InputUnit]
    """Every unit of the input: global stages fit on a sample of all of them."""
    index: dict[str, IndexSummary]
    drops: dict[str, dict[bytes, str]]
    keep_cache: bool = False
    progress: bool = True
    stop: threading.Event = field(default_factory=threading.Event)

    @property
    def corpus_samples(self) -> int:
        return sum(ix.samples for ix in self.index.values())


@dataclass
class RunState:
    """What an executor reports: committed shards' stats, shards it could not write, and why."""

    committed: dict[str, dict[str, Any]] = field(default_factory=dict)
    broken: dict[str, dict[str, Any]] = field(default_factory=dict)
    cluster: dict[str, Any] = field(default_factory=dict)
    reused: Counter[str] = field(default_factory=Counter)
    """Step -> shards started from a cache an earlier run wrote."""
    interrupted: bool = False
    aborted: RunAborted | None = None
    phases: dict[str, float] = field(default_factory=dict)
    """Wall seconds of each phase (``fit:<step>``, ``process``), for the run history."""

    @contextmanager
    def timed(self, phase: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.phases[phase] = self.phases.get(phase, 0.0) + time.perf_counter() - started

    def break_shard(self, unit: InputUnit, cause: str, message: str, samples: int | None) -> None:
        self.broken[unit.shard_id] = {"cause": cause, "message": plain(message), "samples": samples}
        log.warning("%s not written: %s", unit.shard_id, plain(message))


class Executor(Protocol):
    """Indexes inputs, and runs a plan's steps over input units."""

    def index(
        self, units: list[InputUnit], out: Store
    ) -> tuple[dict[str, IndexSummary], dict[str, dict[bytes, str]]]:
        """Each unit's index summary, and per unit the key digests it must leave to an earlier unit."""
        ...

    def run(self, work: Work) -> RunState: ...


def cached_steps(plan: Plan) -> list[bool]:
    """Which steps' per-shard outputs are cached: expensive ones with expensive work after them.

    Never the last step (the shard itself is its result), nor one followed only by cheap steps (filters,
    selection): redoing those costs milliseconds, while their cache would be a second copy of the shard.
    """
    stages = plan.stages
    return [
        stage.cacheable and any(later.cacheable for later in stages[i + 1 :])
        for i, stage in enumerate(stages)
    ]


def cache_rels(plan: Plan, unit: InputUnit) -> list[str]:
    """Every cache file a shard may have (what its commit prunes)."""
    rels = []
    for index, cached in enumerate(cached_steps(plan)):
        if cached:
            rels.extend(layout.cache_files(plan.stages[index].name, plan.chain[index], unit.shard_id))
    return rels


def deepest_cache(out: Store, plan: Plan, unit: InputUnit, limit: int) -> tuple[int, str, str] | None:
    """(step, parquet, history) of the deepest cached step output before ``limit``, or None."""
    flags = cached_steps(plan)
    for index in range(min(limit, len(plan.stages)) - 1, -1, -1):
        if not flags[index]:
            continue
        parquet, history = layout.cache_files(plan.stages[index].name, plan.chain[index], unit.shard_id)
        if out.exists(history) and out.exists(parquet):
            return index, parquet, history
    return None


KEPT_ALWAYS = SOURCE_FIELDS | {"label_name", "output_key", "sample_rate"}
"""The source fields, and those the commit or a stage may read without any stage declaring them."""


def dropped_fields(plan: Plan, index: int) -> frozenset[str]:
    """The fields rows leave step ``index`` without: input or stage fields that no later step, fit or
    the output reads.

    Rows travel between workers as Ray objects; cmda's rows would otherwise carry four embeddings and
    the source image to the commit, which writes none of them (a 1,000-sample cmda-precomputed shard
    leaves drop_duplicates as 10 MB of pickled rows instead of 18).
    Fields no recipe declares (scores, a backend's extras) and the source fields always stay. A step's
    cache holds its rows before this, so a changed downstream stage can still read what it needs.
    """
    declared = set(plan.recipe.input).union(*(stage.outputs() for stage in plan.stages[: index + 1]))
    later = plan.stages[index + 1 :]
    needed = set(plan.output.output.values()) | set(plan.output.scores) | KEPT_ALWAYS
    needed = needed.union(*(stage.inputs() | stage.fit_fields() for stage in later))
    return frozenset(declared - needed)


def global_steps(plan: Plan) -> list[int]:
    return [i for i, stage in enumerate(plan.stages) if stage.needs_fit]


def artifact_rel(plan: Plan, index: int) -> str:
    return layout.artifact_dir(plan.stages[index].name, plan.chain[index])


def _drawn_after(plan: Plan, index: int) -> int:
    """How many steps must run before step ``index``'s fit sample is drawn.

    Steps just before it that keep their rows (``Stage.keeps_rows``) and write nothing its fit reads
    change nothing in the sample, so they are not run for it.
    """
    reads = plan.stages[index].fit_fields()
    end = index
    while end > 0 and plan.stages[end - 1].keeps_rows and not plan.stages[end - 1].outputs() & reads:
        end -= 1
    return end


@dataclass(frozen=True)
class FitPass:
    """One pass over the corpus through steps ``[0, end)`` that draws the fit samples of ``steps``.

    Global steps whose samples need no step from the first of them on share a pass: cmda's cluster fit
    reads embeddings only, so its sample is drawn beside latent_space's from the same read of each
    shard, not in a second pass that first projects every row through the latent heads.
    """

    steps: tuple[int, ...]
    end: int

    def draws(self, plan: Plan, corpus_samples: int) -> list[FitDraw]:
        return [
            FitDraw(
                tuple(sorted(plan.stages[i].fit_fields())),
                fit_seed(plan, i),
                sample_rate(fit_cap(plan, i), corpus_samples),
            )
            for i in self.steps
        ]

    def skip_media(self, plan: Plan) -> set[str]:
        """Media no draw and no step of the pass reads: left undecoded by the reader."""
        wanted = {"label"}.union(*(plan.stages[i].fit_fields() for i in self.steps))
        wanted = wanted.union(*(stage.inputs() for stage in plan.stages[: self.end]))
        return {"image", "audio"} - wanted


def fit_passes(plan: Plan, out: Store) -> list[FitPass]:
    """The passes that fit the global steps not yet fitted in ``out`` (an earlier run's fits are reused)."""
    passes: list[FitPass] = []
    todo = [i for i in global_steps(plan) if read_fit(out, artifact_rel(plan, i)) is None]
    for index in todo:
        end = _drawn_after(plan, index)
        if passes and end <= passes[-1].steps[0]:
            last = passes.pop()
            passes.append(FitPass((*last.steps, index), max(last.end, end)))
        else:
            passes.append(FitPass((index,), end))
    return passes


def fit_cap(plan: Plan, index: int) -> int | None:
    return getattr(plan.stages[index].settings, "fit_max_rows", None)


def fit_seed(plan: Plan, index: int) -> int:
    from augpipe.pipeline.rows import derive_seed

    return derive_seed(plan.recipe.seed, "fit-sample", plan.stages[index].name) >> 1


class Progress:
    """Per-step samples and samples/s, shards done and an ETA, at most every ``every`` seconds.

    Counts move per batch (executors call ``add``), so a stage working through a 1,000-row shard shows
    its progress before the shard finishes; steps a shard skipped because an earlier run cached them are
    shown as ``reused``.
    """

    def __init__(
        self, names: list[str], total: int, enabled: bool, every: float = 5.0, heartbeat: float = 30.0
    ) -> None:
        self.names, self.total, self.enabled = names, total, enabled
        self.every, self.heartbeat = every, heartbeat
        self.samples: Counter[str] = Counter()
        self.reused: Counter[str] = Counter()
        self.shards_done = 0
        self.started = time.perf_counter()
        self.last = 0.0
        self.last_line = ""

    def add(self, step: str, samples: int) -> None:
        self.samples[step] += samples

    def due(self) -> bool:
        return self.enabled and time.perf_counter() - self.last >= self.every

    def show(self, force: bool = False) -> None:
        """Log a line when due and something moved (or ``heartbeat`` seconds passed), or when forced."""
        if not self.enabled or not (force or self.due()):
            return
        now = time.perf_counter()
        elapsed = now - self.started
        parts = [f"shards {self.shards_done}/{self.total}"]
        for name in self.names:
            part = f"{name} {self.samples[name]} ({self.samples[name] / elapsed if elapsed else 0:.1f}/s)"
            if self.reused[name]:
                part += f", reused on {self.reused[name]}"
            parts.append(part)
        line = " | ".join(parts)
        counts = line.replace("/s)", "").split("(")[0] + str(sorted(self.samples.items()))
        if not force and counts == self.last_line and now - self.last < self.heartbeat:
            return
        self.last, self.last_line = now, counts
        done = self.shards_done
        eta = f"{elapsed / done * (self.total - done):.0f}s" if done else "?"
        log.info("%s | %.0fs elapsed, ETA %s", line, elapsed, eta)


def count_reused(history: dict[str, Any], progress: Progress, state: RunState) -> None:
    """Count, per step, the cached steps of ``history`` that an earlier run computed (read excluded)."""
    for data in history["stages"][1:]:
        record = StageRecord.from_json(data)
        if record.reused:
            progress.reused[record.stage] += 1
            state.reused[record.stage] += 1
