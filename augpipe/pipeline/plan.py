"""A recipe turned into checked stage instances and fingerprints, before any worker or model starts.

Building the plan is where a recipe fails fast: unknown stages or options, a field no earlier stage
produces, a missing model. The fingerprints chain (stage i's includes stages 0..i-1), so a cached stage
output is reused exactly when nothing upstream of it changed.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import augpipe
from augpipe.pipeline.config import ConfigError, Recipe
from augpipe.pipeline.registry import build_stage
from augpipe.pipeline.sidecar import OutputSpec
from augpipe.pipeline.stage import Stage, StageContext

SOURCE_FIELDS = frozenset({"key", "variant", "lineage", "label", "meta"})


@dataclass(frozen=True)
class Plan:
    """Checked stages in order with their chain fingerprints, the fingerprint of the whole run, and how
    its rows become output samples (what the commit tasks need, without the stages themselves)."""

    recipe: Recipe
    stages: list[Stage]
    chain: list[str]
    run_fingerprint: str
    output: OutputSpec


def context_of(recipe: Recipe) -> StageContext:
    return StageContext(run_seed=recipe.seed, recipe=recipe.name, multiple=recipe.multiple, tag=recipe.tag)


def _check_fields(recipe: Recipe, stages: list[Stage]) -> None:
    available = set(recipe.input) | SOURCE_FIELDS
    for entry, stage in zip(recipe.stages, stages, strict=True):
        missing = stage.inputs() - available
        if missing:
            raise ConfigError(
                f"stages.{entry.name} needs {sorted(missing)}, which neither the input ({recipe.input}) "
                f"nor an earlier stage produces"
            )
        available |= stage.outputs()
    missing_out = {source for source in recipe.output.values() if source not in available}
    if missing_out:
        raise ConfigError(f"output maps fields {sorted(missing_out)} that no stage produces")


def _chain(previous: str, link: str) -> str:
    return hashlib.sha256(f"{previous}/{link}".encode()).hexdigest()[:16]


def build_plan(recipe: Recipe, check_models: bool = True) -> Plan:
    """Instantiate and check every stage; raise ConfigError or ModelNotFoundError naming the problem."""
    context = context_of(recipe)
    stages = [build_stage(entry, context) for entry in recipe.stages]
    _check_fields(recipe, stages)
    if check_models:
        for stage in stages:
            stage.check()
    chain, link = [], _chain("input", ",".join(sorted(recipe.input)) + recipe.limits.model_dump_json())
    for stage in stages:
        link = _chain(link, stage.fingerprint())
        chain.append(link)
    tail = _chain(link, f"{recipe.tag}|{sorted(recipe.output.items())}")
    scores = sorted({name for stage in stages for name in stage.outputs() if name.startswith("score_")})
    metadata = {
        "recipe": recipe.name,
        "config_hash": recipe.config_hash(),
        "fingerprint": tail,
        "augpipe_version": augpipe.__version__,
    }
    spec = OutputSpec(recipe.name, recipe.tag, dict(recipe.output), tuple(scores), metadata)
    return Plan(recipe=recipe, stages=stages, chain=chain, run_fingerprint=tail, output=spec)
