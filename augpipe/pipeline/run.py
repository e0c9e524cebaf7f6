"""One augmentation run: plan, find the work not yet done, execute it, write the manifest."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import ray

from augpipe.pipeline.config import Recipe
from augpipe.pipeline.executor import Executor, RunState, init_ray, is_done
from augpipe.pipeline.inputs import InputUnit, discover_inputs
from augpipe.pipeline.manifest import MANIFEST_NAME, build_manifest, read_manifest, write_manifest
from augpipe.pipeline.plan import build_plan


@dataclass(frozen=True)
class RunResult:
    """The manifest as written, and whether the run stayed within its failure budget."""

    manifest: dict[str, Any]
    manifest_path: Path
    max_failure_rate: float

    @property
    def failure_rate(self) -> float:
        return self.manifest["samples"]["failure_rate"]

    @property
    def ok(self) -> bool:
        return self.failure_rate <= self.max_failure_rate and not self.manifest["incomplete_shards"]


def remove_partials(out_dir: Path) -> int:
    """Temporary files a killed run left behind; they never count as output."""
    stale = list(out_dir.rglob(".*.partial"))
    for path in stale:
        path.unlink()
    return len(stale)


def _previously_seen(out_dir: Path) -> set[str]:
    if not (out_dir / MANIFEST_NAME).exists():
        return set()
    return {entry["path"] for entry in read_manifest(out_dir)["inputs"]}


def run_recipe(
    recipe: Recipe,
    input_path: Path,
    out_dir: Path,
    address: str | None = None,
    incremental: bool = False,
    max_failure_rate: float = 0.05,
    progress: bool = True,
) -> RunResult:
    """Run ``recipe`` over ``input_path`` into ``out_dir``, skipping shards already done (resume)."""
    plan = build_plan(recipe)
    units = discover_inputs(input_path, recipe.shard_size)
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_partials(out_dir)
    done = {u.shard_id: stats for u in units if (stats := is_done(out_dir, u, plan.run_fingerprint))}
    todo: list[InputUnit] = [u for u in units if u.shard_id not in done]
    if incremental:
        seen = _previously_seen(out_dir)
        todo = [u for u in todo if str(u.path) not in seen]
    started = datetime.now(UTC)
    run_id = uuid.uuid4().hex
    state = RunState(total=len(done), done=done)
    if todo:
        started_ray = init_ray(address)
        try:
            state = Executor(plan, out_dir, run_id, progress=progress).run(todo, done, units)
        finally:
            if started_ray:
                ray.shutdown()
    manifest = build_manifest(plan, out_dir, units, state.done, started, state.broken, run_id, state.cluster)
    path = write_manifest(out_dir, manifest)
    return RunResult(manifest=manifest, manifest_path=path, max_failure_rate=max_failure_rate)
