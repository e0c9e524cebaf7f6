"""Rows shed the fields no later step reads: what travels between workers shrinks, what is written does
not change."""

from __future__ import annotations

from pathlib import Path

from augpipe.pipeline import execution
from augpipe.pipeline.config import load_recipe
from augpipe.pipeline.execution import KEPT_ALWAYS, dropped_fields
from augpipe.pipeline.plan import build_plan
from augpipe.pipeline.run import run_recipe
from tests.corpora import precomputed_corpus

SMALL = ["latent_space.epochs=3", "cluster.pca_dims=2", "cluster.m_max=3", "multiple=2"]
LATENTS = {"image_embedding", "text_embedding", "student_latent", "teacher_latent"}


def test_fields_go_once_no_later_step_or_the_output_reads_them():
    plan = build_plan(load_recipe("cmda-precomputed"), check_models=False)
    steps = {stage.name: dropped_fields(plan, i) for i, stage in enumerate(plan.stages)}
    assert steps["latent_space"] == {"image_embedding"}, "cluster still reads text_embedding"
    assert steps["interpolate"] == LATENTS, "drop_duplicates still compares with the source image"
    assert steps["drop_duplicates"] == LATENTS | {"image"}
    written = set(plan.output.output.values())
    assert not (written | KEPT_ALWAYS) & set().union(*steps.values())


def test_a_later_fit_keeps_what_it_samples():
    plan = build_plan(
        load_recipe("cmda-precomputed", sets=["cluster.cluster_on=image_embedding"]), check_models=False
    )
    assert "image_embedding" not in dropped_fields(plan, 0)


def corpus_files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.suffix in {".tar", ".parquet"}}


def test_dropping_fields_leaves_the_written_corpus_byte_identical(tmp_path, monkeypatch):
    corpus = precomputed_corpus(tmp_path / "in", shards=2, per_shard=10)
    recipe = load_recipe("cmda-precomputed", sets=SMALL)
    assert run_recipe(recipe, corpus, tmp_path / "lean", executor="local", progress=False).ok
    monkeypatch.setattr(execution, "dropped_fields", lambda plan, index: frozenset())
    assert run_recipe(recipe, corpus, tmp_path / "full", executor="local", progress=False).ok
    lean, full = corpus_files(tmp_path / "lean"), corpus_files(tmp_path / "full")
    assert len(lean) == 4 and lean == full
