"""`augpipe estimate`: a projection of the whole corpus's cost from a real run on a seeded sample of shards.

A user decides from it whether tonight's run fits the night, so the projected counts and bytes must match
what the full run then writes, the sample must be chosen reproducibly, and nothing may land in the corpus.
"""

from __future__ import annotations

import json

import pytest

from augpipe.pipeline.config import load_recipe
from augpipe.pipeline.estimate import estimate
from augpipe.pipeline.run import run_recipe
from tests.cli import invoke
from tests.corpora import text_corpus

SHARDS, PER_SHARD = 6, 8


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return text_corpus(tmp_path_factory.mktemp("estimate"), SHARDS, PER_SHARD)


def snapshot(folder):
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}


def test_the_projection_matches_what_the_full_run_writes(corpus, tmp_path):
    before = snapshot(corpus)
    recipe = load_recipe("passthrough")
    projected = estimate(recipe, str(corpus), sample=2, seed=3, executor="local")
    assert snapshot(corpus) == before, "the sample runs elsewhere, never in the corpus"
    assert projected.sampled_samples == 2 * PER_SHARD and len(projected.sampled_shards) == 2
    assert projected.total_shards == SHARDS and not projected.samples_exact
    assert projected.corpus_samples == pytest.approx(SHARDS * PER_SHARD, rel=0.1)

    full = run_recipe(recipe, corpus, tmp_path / "full", progress=False, executor="local")
    written = sum(o["bytes"] for o in full.manifest["outputs"])
    assert projected.output_samples == pytest.approx(full.manifest["samples"]["out"], rel=0.1)
    assert projected.output_bytes == pytest.approx(written, rel=0.2)
    again = estimate(recipe, str(corpus), sample=2, seed=3, executor="local")
    assert again.sampled_shards == projected.sampled_shards, "the same seed samples the same shards"


def test_a_gpu_what_if_projects_gpu_hours_per_stage(corpus):
    recipe = load_recipe("back-speech", profile="tiny", sets=["multiple=1", "transcribe.gpus=0.5"])
    projected = estimate(recipe, str(corpus), sample=1, executor="local", gpus=2)
    stages = {s.name: s for s in projected.stages}
    assert {"read", "synthesize_speech", "transcribe", "select"} <= set(stages)
    transcribe = stages["transcribe"]
    assert transcribe.slots == 4, "two GPUs hold four workers of half a GPU"
    per_sample = transcribe.seconds_per_sample
    assert transcribe.projected_worker_s == pytest.approx(per_sample * projected.corpus_samples)
    assert projected.gpu_hours == pytest.approx(transcribe.projected_worker_s * 0.5 / 3600)
    assert projected.startup_s > 0, "loading the models is measured, and paid once"
    stage_walls = sum(s.projected_wall_s for s in projected.stages)
    assert projected.wall_s == pytest.approx(projected.startup_s + projected.fit_s + stage_walls)
    assert projected.as_dict()["paper"].startswith("35 min"), "back-speech is compared with the paper"


def test_the_command_prints_the_projection_as_json(corpus, ray_session):
    code, output = invoke("estimate", "passthrough", "--input", str(corpus), "--sample", "1", "--json")
    assert code == 0, output
    report = json.loads(output[output.index("{") :])
    assert report["recipe"] == "passthrough" and len(report["sampled_shards"]) == 1
    assert report["stages"][0]["stage"] == "read" and report["output_bytes"] > 0
