"""Fit passes: global steps whose samples need the same steps share one read of the corpus, and a step
that keeps its rows is not run for a fit that reads none of its outputs (cmda-precomputed's cluster fit
reads input embeddings, so it no longer waits for a pass through latent_space's heads)."""

from __future__ import annotations

from pathlib import Path

import pytest

from augpipe.pipeline import local_executor
from augpipe.pipeline.config import load_recipe
from augpipe.pipeline.execution import FitPass, fit_passes
from augpipe.pipeline.plan import build_plan
from augpipe.pipeline.run import run_recipe
from augpipe.pipeline.storage import Store
from augpipe.stages.latent_space import LatentSpace
from tests.corpora import precomputed_corpus

SMALL = ["latent_space.epochs=3", "cluster.pca_dims=2", "cluster.m_max=3", "multiple=2"]


def passes(recipe: str, tmp_path: Path, sets: tuple[str, ...] = ()) -> list[FitPass]:
    plan = build_plan(load_recipe(recipe, sets=list(sets)), check_models=False)
    return fit_passes(plan, Store(tmp_path))


def test_fits_that_read_input_fields_share_one_pass_over_the_raw_input(tmp_path):
    assert passes("cmda-precomputed", tmp_path) == [FitPass((0, 1), 0)]


def test_fits_that_read_embed_outputs_share_one_pass_after_the_embeds(tmp_path):
    assert passes("cmda", tmp_path) == [FitPass((2, 3), 2)]


def test_a_fit_that_reads_an_earlier_steps_output_gets_its_own_pass_through_that_step(tmp_path):
    sets = ("cluster.cluster_on=teacher_latent",)
    assert passes("cmda-precomputed", tmp_path, sets) == [FitPass((0,), 0), FitPass((1,), 1)]


def test_a_step_that_may_change_rows_is_run_before_a_later_fit_draws(tmp_path, monkeypatch):
    monkeypatch.setattr(LatentSpace, "keeps_rows", False)
    assert passes("cmda-precomputed", tmp_path) == [FitPass((0,), 0), FitPass((1,), 1)]


def test_a_pass_leaves_media_undecoded_when_nothing_in_it_reads_them(tmp_path):
    plan = build_plan(load_recipe("cmda-precomputed"), check_models=False)
    assert FitPass((0, 1), 0).skip_media(plan) == {"image", "audio"}
    assert FitPass((3,), 3).skip_media(plan) == {"audio"}, "interpolate reads the images"


@pytest.fixture()
def counted_reads(monkeypatch) -> list[tuple[str, frozenset[str]]]:
    """Every read of an input shard by the local executor: (shard, media left undecoded)."""
    reads: list[tuple[str, frozenset[str]]] = []
    real = local_executor.read_source

    def counting(unit, *args):
        reads.append((unit.shard_id, frozenset(args[-1] or ())))
        return real(unit, *args)

    monkeypatch.setattr(local_executor, "read_source", counting)
    return reads


def run_precomputed(corpus: Path, out: Path, executor: str = "local", sets: tuple[str, ...] = ()) -> bytes:
    result = run_recipe(
        load_recipe("cmda-precomputed", sets=[*SMALL, *sets]), corpus, out, executor=executor, progress=False
    )
    assert result.ok, result.manifest["failures"]
    return b"".join(p.read_bytes() for p in sorted(out.glob("*.tar")))


def test_sharing_a_fit_pass_reads_each_input_once_less_and_writes_the_same_corpus(
    tmp_path, counted_reads, monkeypatch
):
    corpus = precomputed_corpus(tmp_path / "in", shards=2, per_shard=12)
    shared = run_precomputed(corpus, tmp_path / "shared")
    assert len(counted_reads) == 2 * 2, "one fit pass and the processing pass"
    assert [skip for _, skip in counted_reads[:2]] == [frozenset({"image", "audio"})] * 2
    counted_reads.clear()

    monkeypatch.setattr(LatentSpace, "keeps_rows", False)  # as before: the cluster sample after latent_space
    separate = run_precomputed(corpus, tmp_path / "separate")
    assert len(counted_reads) == 3 * 2
    assert shared == separate


def test_steps_an_earlier_run_fitted_are_not_drawn_again(tmp_path):
    corpus = precomputed_corpus(tmp_path / "in", shards=1, per_shard=12)
    out = tmp_path / "out"
    run_precomputed(corpus, out)
    plan = build_plan(load_recipe("cmda-precomputed", sets=SMALL), check_models=False)
    assert fit_passes(plan, Store(out)) == []
    cluster_fit = next((out / "_augpipe/artifacts").glob("cluster-*/fit.json"))
    cluster_fit.unlink()
    assert fit_passes(plan, Store(out)) == [FitPass((1,), 0)]


def test_ray_merges_fit_parts_in_chunks_and_writes_what_the_local_executor_writes(
    tmp_path, ray_session, monkeypatch
):
    """Small parts stay in the driver's memory until a task reads them, so they are merged as they come."""
    from augpipe.pipeline import executor, ray_dispatch

    monkeypatch.setattr(ray_dispatch, "MERGE_CHUNK", 2)
    parts_per_fit: list[int] = []
    real_fit_step = executor.RayExecutor._fit_step

    def counting(self, work, index, parts):
        parts_per_fit.append(len(parts))
        return real_fit_step(self, work, index, parts)

    monkeypatch.setattr(executor.RayExecutor, "_fit_step", counting)
    corpus = precomputed_corpus(tmp_path / "in", shards=5, per_shard=12)
    sampled = ("latent_space.fit_max_rows=30", "cluster.fit_max_rows=30")
    on_ray = run_precomputed(corpus, tmp_path / "ray", "ray", sampled)
    assert parts_per_fit == [3, 3], "two merged chunks of two shards each, and the fifth shard's part"
    assert on_ray == run_precomputed(corpus, tmp_path / "local", "local", sampled)
