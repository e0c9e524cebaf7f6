"""``augpipe estimate``: what a run over the whole corpus will cost, from a real run over a seeded sample.

A projection has to come from measurement: model speed depends on the machine, the backend and the data
(speech length, image size), none of which a formula knows. So the recipe runs, through the normal engine,
on ``sample`` input shards chosen with a seed, and every figure is scaled from that run's manifest:

- samples: exact for tables (row counts are in the metadata); for tar shards, the sampled shards' samples
  per byte times the corpus's bytes (shards of one corpus hold samples of similar size);
- per stage (and the read step, which decodes every input): worker-seconds per input sample, times the
  corpus's samples, divided by the number of workers the cluster holds at once (its GPUs / the stage's GPU
  share, or CPUs / the stage's CPU share). Shards pass the stages in turn, so the sum of the stages' walls
  is the projected wall time (less on many shards, because Ray overlaps stages across shards), plus the
  sample's startup (Ray, model loading), which a run pays once;
- fits of global stages: measured once; they see at most ``fit_max_rows`` rows, so they scale with the
  corpus only up to that cap;
- output bytes per input sample, times the corpus's samples.

The cluster is the one the sample ran on (``--address``, or this machine) unless ``gpus``/``cpus`` ask
"what if": a sample measured on CPUs says nothing about GPU speed, and the report says which it was.
"""

from __future__ import annotations

import random
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from augpipe.pipeline.config import ConfigError, Recipe
from augpipe.pipeline.inputs import InputUnit, discover_inputs
from augpipe.pipeline.plan import Plan, build_plan
from augpipe.pipeline.reader import READ_STAGE, table_records
from augpipe.pipeline.run import RunOptions, run_recipe
from augpipe.pipeline.stage import GlobalStageSettings, Resources

TABLE_SHARD_ROWS = 1000
"""Rows per unit when the input is a table: the run's default shard size."""

PAPER_COSTS = {
    "back-speech": "35 min 27 s for SST-2 on one RTX A6000 (back-translation: 5 h 22 min 4 s)",
    "back-captioning": "11 h 35 min on one RTX A6000, dominated by diffusion",
    "back-imagination": "4 h 13 min 45 s for TNCC on one RTX A6000 (back-translation: 5 h 38 min 12 s)",
}
"""Extra compute the Back-Modality paper reports for its recipes (METHODS.md §1.3), for comparison."""


@dataclass
class StageCost:
    """One stage's measured rate and projected cost over the corpus."""

    name: str
    device: str
    cpus: float
    gpus: float
    seconds_per_sample: float
    slots: float
    projected_worker_s: float

    @property
    def projected_wall_s(self) -> float:
        return self.projected_worker_s / self.slots if self.slots else float("inf")


@dataclass
class Estimate:
    """The projection, and what it was measured on."""

    recipe: str
    sampled_shards: list[str]
    total_shards: int
    sampled_samples: int
    corpus_samples: int
    samples_exact: bool
    cpus: float
    gpus: float
    measured_on: dict[str, Any]
    sample_wall_s: float
    stages: list[StageCost] = field(default_factory=list)
    fit_s: float = 0.0
    startup_s: float = 0.0
    output_bytes: float = 0.0
    output_samples: float = 0.0

    @property
    def wall_s(self) -> float:
        return self.startup_s + self.fit_s + sum(s.projected_wall_s for s in self.stages)

    @property
    def gpu_hours(self) -> float:
        return sum(s.projected_worker_s * s.gpus for s in self.stages) / 3600

    def as_dict(self) -> dict[str, Any]:
        return {
            "recipe": self.recipe,
            "sampled_shards": self.sampled_shards,
            "total_shards": self.total_shards,
            "sampled_samples": self.sampled_samples,
            "corpus_samples": self.corpus_samples,
            "samples_exact": self.samples_exact,
            "cluster": {"cpus": self.cpus, "gpus": self.gpus},
            "measured_on": self.measured_on,
            "sample_wall_s": self.sample_wall_s,
            "stages": [
                {
                    "stage": s.name,
                    "device": s.device,
                    "cpus": s.cpus,
                    "gpus": s.gpus,
                    "seconds_per_sample": s.seconds_per_sample,
                    "workers": s.slots,
                    "projected_worker_s": s.projected_worker_s,
                    "projected_wall_s": s.projected_wall_s,
                }
                for s in self.stages
            ],
            "fit_s": self.fit_s,
            "startup_s": self.startup_s,
            "wall_s": self.wall_s,
            "gpu_hours": self.gpu_hours,
            "output_bytes": self.output_bytes,
            "output_samples": self.output_samples,
            "paper": PAPER_COSTS.get(self.recipe),
        }


def _choose(units: list[InputUnit], sample: int, seed: int) -> list[InputUnit]:
    chosen = random.Random(seed).sample(range(len(units)), min(sample, len(units)))
    return [units[i] for i in sorted(chosen)]


def _copy_sample(units: list[InputUnit], folder: Path) -> None:
    """The chosen units as a corpus of their own: tars (and sidecars) copied, table ranges rewritten."""
    for unit in units:
        if unit.kind == "tar":
            for rel in filter(None, [unit.rel, unit.sidecar]):
                suffix = Path(rel).suffix
                with unit.source.local_copy(rel) as path:
                    shutil.copyfile(path, folder / f"{unit.shard_id}{suffix}")
        else:
            rows = list(table_records(unit))
            pq.write_table(pa.Table.from_pylist(rows), folder / f"{unit.shard_id}.parquet")


def _stage_slots(cpus: float, gpus: float, stage_cpus: float, stage_gpus: float) -> float:
    """Workers of a stage the cluster holds at once."""
    if stage_gpus > 0:
        return gpus / stage_gpus if gpus else 0.0
    return max(cpus / max(stage_cpus, 1e-9), 1.0) if cpus else 0.0


def _sample_manifest(
    recipe: Recipe, chosen: list[InputUnit], address: str | None, executor: str
) -> dict[str, Any]:
    """The manifest of ``recipe`` run through the normal engine on copies of the ``chosen`` shards."""
    with tempfile.TemporaryDirectory(prefix="augpipe-estimate-") as tmp:
        sample_in, sample_out = Path(tmp) / "in", Path(tmp) / "out"
        sample_in.mkdir()
        _copy_sample(chosen, sample_in)
        result = run_recipe(
            recipe,
            sample_in,
            sample_out,
            RunOptions(address=address, progress=False, executor=executor, max_failure_rate=1.0),
        )
    return result.manifest


def _corpus_samples(units: list[InputUnit], chosen: list[InputUnit], measured: int) -> tuple[int, bool]:
    """The corpus's sample count, and whether it is exact (tables know it; tars scale it by bytes)."""
    if all(u.kind != "tar" for u in units):
        return sum((u.stop or 0) - u.start for u in units), True
    sampled_bytes = sum(u.size for u in chosen) or 1
    return round(measured * sum(u.size for u in units) / sampled_bytes), len(chosen) == len(units)


def _project_stages(
    projection: Estimate, recipe: Recipe, plan: Plan, manifest: dict[str, Any], shards: int
) -> float:
    """Add each step's cost (and its fit's) to ``projection``; return the sample's seconds in stages on
    the cluster it ran on."""
    where = manifest.get("cluster") or {}
    run = manifest["runs"][-1]
    measured, corpus = projection.sampled_samples, projection.corpus_samples
    steps = [
        (READ_STAGE, None, Resources()),
        *((e.name, s, s.effective_resources()) for e, s in zip(recipe.stages, plan.stages, strict=True)),
    ]
    measured_cpus, measured_gpus = float(where.get("cpus") or 1), float(where.get("gpus") or 0)
    busy = 0.0
    for name, stage, wanted in steps:
        totals = manifest["stages"].get(name)
        if totals is None:
            continue
        per_sample = totals["wall_s"] / measured
        on_gpu = wanted.gpus if measured_gpus else 0.0
        workers = _stage_slots(measured_cpus, measured_gpus, wanted.cpus, on_gpu)
        busy += totals["wall_s"] / max(min(workers, shards), 1.0)  # a shard is one worker's at a time
        projection.stages.append(
            StageCost(
                name=name,
                device=totals["device"],
                cpus=wanted.cpus,
                gpus=wanted.gpus,
                seconds_per_sample=per_sample,
                slots=_stage_slots(projection.cpus, projection.gpus, wanted.cpus, wanted.gpus),
                projected_worker_s=per_sample * corpus,
            )
        )
        fit = (run.get("phases") or {}).get(f"fit:{name}")
        if fit is not None and stage is not None:
            cap = stage.settings.fit_max_rows if isinstance(stage.settings, GlobalStageSettings) else None
            rows = min(corpus, cap) if cap else corpus
            projection.fit_s += fit * rows / min(measured, cap or measured)
    return busy


def estimate(
    recipe: Recipe,
    input_location: str,
    sample: int = 2,
    seed: int = 0,
    address: str | None = None,
    cpus: float | None = None,
    gpus: float | None = None,
    executor: str = "ray",
) -> Estimate:
    """Run ``recipe`` on ``sample`` seeded input shards and project the whole corpus's cost."""
    units = discover_inputs(input_location, TABLE_SHARD_ROWS)
    chosen = _choose(units, sample, seed)
    plan = build_plan(recipe)
    manifest = _sample_manifest(recipe, chosen, address, executor)
    measured = manifest["samples"]["in"]
    if not measured:
        names = ", ".join(u.label for u in chosen)
        raise ConfigError(f"the sampled shards ({names}) hold no readable samples")
    corpus, exact = _corpus_samples(units, chosen, measured)
    scale = corpus / measured
    where = manifest.get("cluster") or {}
    run = manifest["runs"][-1]
    wall = sum((run.get("phases") or {}).values())
    projection = Estimate(
        recipe=recipe.name,
        sampled_shards=[u.shard_id for u in chosen],
        total_shards=len(units),
        sampled_samples=measured,
        corpus_samples=corpus,
        samples_exact=exact,
        cpus=cpus if cpus is not None else float(where.get("cpus") or 1),
        gpus=gpus if gpus is not None else float(where.get("gpus") or 0),
        measured_on={"cpus": where.get("cpus"), "gpus": where.get("gpus"), "address": where.get("address")},
        sample_wall_s=wall,
        output_bytes=sum(o["bytes"] for o in manifest["outputs"]) * scale,
        output_samples=manifest["samples"]["out"] * scale,
    )
    busy = _project_stages(projection, recipe, plan, manifest, len(chosen))
    # What the sample's wall time holds beyond its stages and fits (starting Ray, loading every model):
    # paid once per run, whatever the corpus's size.
    fits = sum(v for k, v in (run.get("phases") or {}).items() if k.startswith("fit:"))
    projection.startup_s = max(wall - busy - fits, 0.0)
    return projection


def _duration(seconds: float) -> str:
    if seconds == float("inf"):
        return "never (no worker fits)"
    hours, rest = divmod(round(seconds), 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {secs:02d} s"


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def render(result: Estimate) -> str:
    """The projection as a person reads it."""
    measured = result.measured_on
    lines = [
        f"augpipe estimate: {result.recipe} over {result.corpus_samples:,} samples "
        f"({'exact' if result.samples_exact else 'projected from bytes'}) in {result.total_shards} shards",
        f"measured    {result.sampled_samples} samples from {len(result.sampled_shards)} shards "
        f"({', '.join(result.sampled_shards)}) in {result.sample_wall_s:.1f} s on "
        f"{measured.get('cpus')} CPUs, {measured.get('gpus')} GPUs",
        f"projected   for {result.cpus:g} CPUs, {result.gpus:g} GPUs",
        "",
        f"{'stage':<22} {'device':<7} {'s/sample':>9} {'workers':>8} {'worker time':>14} {'wall':>14}",
    ]
    for s in result.stages:
        lines.append(
            f"{s.name:<22} {s.device:<7} {s.seconds_per_sample:>9.4f} {s.slots:>8.1f} "
            f"{_duration(s.projected_worker_s):>14} {_duration(s.projected_wall_s):>14}"
        )
    lines += [
        "",
        f"startup     {_duration(result.startup_s)} (Ray and model loading, as measured; once per run)",
        f"fits        {_duration(result.fit_s)} (global stages; capped by fit_max_rows)",
        f"wall time   {_duration(result.wall_s)} (stages one after another; Ray overlaps them across shards)",
        f"GPU-hours   {result.gpu_hours:.2f}",
        f"output      {_size(result.output_bytes)}, {result.output_samples:,.0f} samples",
    ]
    if any(s.gpus and s.device == "cpu" for s in result.stages):
        lines.append("note: GPU stages were measured on CPU here; on a GPU they run many times faster")
    if result.recipe in PAPER_COSTS:
        lines.append(f"paper       {PAPER_COSTS[result.recipe]} (METHODS.md §1.3)")
    return "\n".join(lines)
