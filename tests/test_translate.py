"""The translate stage (METHODS §3): fitted on generated pairs whose target is a known linear map of the
condition plus noise, so the best achievable held-out cosine is known; then end to end through
``run_recipe`` on a generated corpus whose embeddings sit in a Parquet sidecar."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds

from augpipe.methods.synthetic import linear_pairs
from augpipe.methods.translation import holdout_split, mean_cosine
from augpipe.pipeline.config import load_recipe
from augpipe.pipeline.manifest import read_manifest
from augpipe.pipeline.rows import Failure
from augpipe.pipeline.run import run_recipe
from augpipe.pipeline.stage import StageContext
from augpipe.stages.translate import Translate

CTX = StageContext(run_seed=0, recipe="modality-translation", multiple=1, tag="mt")
SMALL = {"hidden": 64, "layers": 3, "steps": 4, "train_batch_size": 100, "lr": 3e-3, "dropout": 0.0}


def make(**options) -> Translate:
    stage = Translate(Translate.settings_from(options), CTX)
    stage.check()
    stage.setup()
    return stage


def columns(c: np.ndarray, z: np.ndarray) -> dict[str, list]:
    return {
        "key": [f"k{i:04d}" for i in range(len(c))],
        "image_embedding": list(c),
        "text_embedding": list(z),
    }


def rows_of(c: np.ndarray, z: np.ndarray, start: int = 0) -> list[dict]:
    return [
        {"key": f"k{i:04d}", "variant": (), "lineage": {}, "image_embedding": a, "text_embedding": b}
        for i, (a, b) in enumerate(zip(c, z, strict=True), start=start)
    ]


@pytest.fixture(scope="module")
def linear_fit(tmp_path_factory):
    c, z, a = linear_pairs(800, 16, 12, seed=3, noise=0.5)
    stage = make(**SMALL, epochs=40, holdout=0.2, seed=0)
    folder = tmp_path_factory.mktemp("translate")
    return stage, stage.fit(columns(c, z), folder), folder, (c, z, a)


def test_held_out_cosine_approaches_the_analytic_optimum(linear_fit):
    _, summary, _, (c, z, a) = linear_fit
    _, held = holdout_split(len(c), 0.2, seed=0)
    optimum = mean_cosine(c[held] @ a, z[held])  # cA is the best direction: the noise is symmetric about it
    baseline = mean_cosine(np.broadcast_to(z.mean(axis=0), z[held].shape), z[held])  # ignores the condition
    cos = summary["holdout_cosine"]
    assert (summary["train_rows"], summary["holdout_rows"], summary["metric"]) == (640, 160, "Sim_txt")
    assert 0.85 < optimum < 0.95 and baseline < 0.3
    assert optimum - 0.02 < cos["without_ddim"] <= optimum + 0.01, cos  # M alone is a linear regression
    assert optimum - 0.05 < cos["full"] <= optimum + 0.01, cos
    assert optimum - 0.06 < cos["without_projection"] <= optimum + 0.01, cos
    curve = summary["loss_curve"]
    assert len(curve) == 40 and curve[-1] < 0.5 * curve[0]
    assert set(summary["train_s"]) == {"full", "without_projection", "without_ddim"}


def test_translations_are_the_saved_model_and_carry_lineage(linear_fit):
    stage, summary, folder, (c, z, _) = linear_fit
    state = json.loads((folder / "translate.json").read_text())
    assert state["shape"]["projection"] and state["shape"]["ddim"] and state["gamma"] == 1.0
    assert [e["epoch"] for e in state["curves"]["full"]] == list(range(1, 41))
    assert set(state["curves"]) == {"full", "without_projection", "without_ddim"}

    rows = rows_of(c[:5], z[:5])
    rows.append({"key": "broken", "variant": (), "lineage": {}, "image_embedding": np.ones(3, np.float32)})
    out = stage.process_batch(rows)
    assert isinstance(out[-1], Failure) and out[-1].cause == "missing_field" and "16" in out[-1].message
    loaded = make(**SMALL, epochs=40, holdout=0.2, seed=0)
    loaded.load_fitted(folder)
    again = loaded.process_batch(rows_of(c[:5], z[:5]))
    for first, second in zip(out[:5], again, strict=True):
        np.testing.assert_array_equal(first["translated_text_embedding"], second["translated_text_embedding"])
        assert first["translated_text_embedding"].dtype == np.float32
        assert first["translated_text_embedding"].shape == (12,)
    info = out[0]["lineage"]["translate"]
    assert info["direction"] == "image_to_text" and info["checkpoint"] == summary["checkpoint"]
    assert (info["gamma"], info["guidance"], info["steps"]) == (1.0, 5.0, 4)
    assert info["noise_seed"] == stage.seed_for(out[0]) and info["encoders"] == {
        "condition": None,
        "target": None,
    }
    alone = stage.process_batch(rows_of(c[3:4], z[3:4], start=3))[
        0
    ]  # its own noise: batch-mates do not matter
    np.testing.assert_allclose(
        alone["translated_text_embedding"], out[3]["translated_text_embedding"], atol=1e-5
    )
    assert stage.stats["translated"] == 6


def test_fit_is_deterministic_under_a_seed_and_the_seed_matters(tmp_path):
    c, z, _ = linear_pairs(120, 8, 6, seed=1)
    options = {**SMALL, "hidden": 16, "epochs": 2, "direction": "text_to_image"}
    first = make(**options, seed=5).fit(columns(c, z), tmp_path / "a")
    second = make(**options, seed=5).fit(columns(c, z), tmp_path / "b")
    other = make(**options, seed=6).fit(columns(c, z), tmp_path / "c")
    assert first["checkpoint"] == second["checkpoint"] != other["checkpoint"]
    assert first["holdout_cosine"] == second["holdout_cosine"] and first["loss_curve"] == second["loss_curve"]
    assert (first["condition"], first["target"], first["metric"]) == (
        "text_embedding",
        "image_embedding",
        "Sim_img",
    )
    weights = (tmp_path / "a" / "translator.safetensors").read_bytes()
    assert weights == (tmp_path / "b" / "translator.safetensors").read_bytes()


def test_fit_refuses_too_few_pairs_and_skips_incomplete_rows(tmp_path):
    c, z, _ = linear_pairs(6, 8, 6, seed=1)
    cols = columns(c, z)
    cols["text_embedding"][0] = None
    cols["image_embedding"][1] = np.full(8, np.nan, np.float32)
    summary = make(**{**SMALL, "hidden": 8}, epochs=1, ablations=False).fit(cols, tmp_path / "ok")
    assert (summary["rows"], summary["skipped_rows"], summary["holdout_rows"]) == (4, 2, 1)
    assert list(summary["holdout_cosine"]) == ["full"]
    with pytest.raises(ValueError, match="at least 2 rows"):
        make(**SMALL).fit(columns(c[:1], z[:1]), tmp_path / "one")


# ------------------------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def sidecar_corpus(tmp_path_factory):
    """Two shards of 30 captioned images whose sidecars carry 24-d image and 16-d text embeddings."""
    root = tmp_path_factory.mktemp("pairs")
    image, text, _ = linear_pairs(60, 24, 16, seed=7)
    pixels = np.zeros((8, 8, 3), np.uint8)
    for shard in range(2):
        keys = [f"s{shard}x{i:03d}" for i in range(30)]
        rows = range(shard * 30, shard * 30 + 30)
        with wds.TarWriter(str(root / f"shard-{shard:05d}.tar")) as sink:
            for key in keys:
                sink.write({"__key__": key, "txt": f"caption {key}", "png": pixels, "json": {"label": "a"}})
        table = pa.table(
            {
                "key": keys,
                "image_embedding": pa.array([image[i].tolist() for i in rows], pa.list_(pa.float32(), 24)),
                "text_embedding": pa.array([text[i].tolist() for i in rows], pa.list_(pa.float32(), 16)),
            }
        )
        pq.write_table(table, root / f"shard-{shard:05d}.parquet")
    return root


def test_precomputed_recipe_translates_both_directions_end_to_end(ray_session, sidecar_corpus, tmp_path):
    sets = ["image_to_text.image_encoder=clip-test", "text_to_image.holdout=0.2"]
    recipe = load_recipe("modality-translation-precomputed", profile="tiny", sets=sets)
    result = run_recipe(recipe, sidecar_corpus, tmp_path, progress=False)
    assert result.ok, result.manifest["failures"]
    manifest = read_manifest(tmp_path)
    assert manifest["samples"]["in"] == manifest["samples"]["out"] == 60
    for step, held, metric in (("image_to_text", 6, "Sim_txt"), ("text_to_image", 12, "Sim_img")):
        artifact = manifest["artifacts"][step]
        summary = artifact["summary"]
        assert (summary["rows"], summary["holdout_rows"], summary["metric"]) == (60, held, metric)
        assert set(summary["holdout_cosine"]) == {"full", "without_projection", "without_ddim"}
        assert all(-1 <= v <= 1 for v in summary["holdout_cosine"].values())
        assert len(summary["loss_curve"]) == 3  # the tiny profile's epochs
        files = {p.name for p in (tmp_path / artifact["path"]).iterdir()}
        assert {"translator.safetensors", "translate.json"} <= files
    table = pq.read_table(tmp_path / "shard-00001.parquet")
    assert table.schema.field("translated_text_embedding").type == pa.list_(pa.float32(), 16)
    assert table.schema.field("translated_image_embedding").type == pa.list_(pa.float32(), 24)
    lineage = json.loads(table["lineage"][0].as_py())
    forward, backward = lineage["image_to_text"], lineage["text_to_image"]
    assert forward["encoders"] == {"condition": "clip-test", "target": None}
    assert forward["checkpoint"] == manifest["artifacts"]["image_to_text"]["summary"]["checkpoint"]
    assert backward["direction"] == "text_to_image" and backward["noise_seed"] != forward["noise_seed"]
    assert manifest["stages"]["image_to_text"]["counts"]["translated"] == 60
