"""CMDA's clustering at real embedding sizes (METHODS §2.2-f) and its degenerate cases.

Generated corpora with known labels: 10 classes of unit vectors sharing a common component, with
anisotropic within-class noise (``augpipe.methods.synthetic.clustered_embeddings``), at the sizes of
MiniLM (384-d) and CLIP ViT-B/32 (512-d) embeddings. The defaults must find the classes; the
reference's own model (a full covariance per component on the raw features) finds one cluster."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

from augpipe.methods import cmda
from augpipe.methods.gmm import model_budget
from augpipe.methods.synthetic import clustered_embeddings
from augpipe.pipeline.rows import Failure
from augpipe.pipeline.stage import StageContext
from augpipe.stages.cluster import Cluster
from augpipe.stages.interpolate import Interpolate

CTX = StageContext(run_seed=0, recipe="cmda", multiple=1, tag="cmda")


def make(cls, **options):
    stage = cls(cls.settings_from(options), CTX)
    stage.setup()
    return stage


def rows_of(x: np.ndarray) -> list[dict]:
    return [{"key": f"r{i:05d}", "variant": (), "lineage": {}, "text_embedding": v} for i, v in enumerate(x)]


@pytest.mark.parametrize("dim", [384, 512])
def test_defaults_recover_ten_classes_at_real_embedding_sizes(dim, tmp_path):
    x, labels = clustered_embeddings(1000, dim, 10, seed=dim)
    stage = make(Cluster, seed=3)
    summary = stage.fit({"key": [None] * len(x), "text_embedding": list(x)}, tmp_path)
    assert 8 <= summary["m_star"] <= 12, summary["bic"]
    assert (summary["covariance_type"], summary["pca_dims"], summary["m_range"]) == ("tied", 16, [1, 20])
    assert len(summary["bic"]) == 20 and summary["m_star"] == int(np.argmin(summary["bic"])) + 1
    rows = rows_of(x)
    for start in range(0, len(rows), 300):  # cluster sizes are counted over every batch, not in fit
        stage.process_batch(rows[start : start + 300])
    found = [r["cluster"] for r in rows]
    assert adjusted_rand_score(labels, found) >= 0.9
    sizes = {k: v for k, v in stage.stats.items() if k.endswith("_rows")}
    assert sum(sizes.values()) == 1000 and len(sizes) == len(set(found))


def test_the_reference_model_finds_one_cluster_on_the_same_data():
    x, _ = clustered_embeddings(1000, 384, 10, seed=384)
    assert cmda.select_gmm_bic(x, m_max=2, seed=3).m_star == 1  # full covariance, raw 384-d: 74k params each


def test_small_fits_get_fewer_dimensions_and_components():
    assert model_budget(10_000, 384, 16, 20) == (16, 20)
    assert model_budget(18, 384, 16, 20) == (3, 4)
    assert model_budget(3, 384, 16, 20) == (1, 1)
    assert model_budget(50, 384, None, 20) == (None, 12)


@pytest.mark.parametrize("n", [1, 2, 3])
def test_a_corpus_of_one_to_three_rows_gets_one_cluster(n, tmp_path):
    x, _ = clustered_embeddings(n, 384, 2, seed=1)
    stage = make(Cluster, seed=3)
    summary = stage.fit({"key": [None] * n, "text_embedding": list(x)}, tmp_path)
    assert summary["m_star"] == 1 and summary["fit_rows"] == n
    assert summary["bic"] == ([] if n == 1 else summary["bic"]) and len(summary["bic"]) <= 1
    loaded = make(Cluster, seed=3)
    loaded.load_fitted(tmp_path)
    rows = rows_of(x)
    assert not [r for r in loaded.process_batch(rows) if isinstance(r, Failure)]
    assert [r["cluster"] for r in rows] == [0] * n and loaded.stats["cluster_0_rows"] == n


def test_identical_rows_do_not_break_the_fit(tmp_path):
    x = np.tile(clustered_embeddings(1, 64, 1, seed=2)[0], (40, 1))
    summary = make(Cluster, seed=3).fit({"key": [None] * 40, "text_embedding": list(x)}, tmp_path)
    assert summary["pca_variance_kept"] == 0.0 and summary["m_star"] >= 1


def test_a_zero_teacher_vector_is_clamped_in_the_maths_and_failed_by_the_stage():
    rng = np.random.default_rng(0)
    teacher, student = rng.normal(size=(5, 4)), rng.normal(size=(5, 4))
    teacher[2] = 0.0
    w = cmda.cmda_weights(teacher, student, mode="reference_cma")
    assert np.isfinite(w).all() and w.max() < 10, w.max()  # was ≈ 4e11: column 2 divided by ε
    np.testing.assert_array_equal(w[:, 2], 0.0)

    stage = make(
        Interpolate,
        student="text",
        teacher="image",
        weight_mode="reference_cma",
        cluster_field=None,
        pool_size=8,
    )
    rows = [
        {
            "key": f"k{i}",
            "variant": (),
            "lineage": {},
            "teacher_latent": teacher[i].astype(np.float32),
            "student_latent": student[i].astype(np.float32),
            "text_embedding": student[i].astype(np.float32),
        }
        for i in range(5)
    ]
    out = stage.process_batch(rows)
    failed = [r for r in out if isinstance(r, Failure)]
    assert [(f.key, f.cause) for f in failed] == [("k2", "zero_teacher_latent")]
    generated = [r for r in out if not isinstance(r, Failure)]
    assert len(generated) == 4 and all(np.abs(r["generated_text_embedding"]).max() < 100 for r in generated)
