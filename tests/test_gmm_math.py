"""The clustering maths of methods/gmm.py, checked against scikit-learn as the independent reference.

A cluster model is saved as arrays and rebuilt on every worker (``gmm_from_params``), so a rebuilt
mixture that predicts differently from the fitted one would silently reassign every sample's cluster;
the BIC choice, the budget caps and the closed-form one-component fit are what the manifest records.
"""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.decomposition import PCA
from sklearn.mixture import GaussianMixture

from augpipe.methods import gmm
from augpipe.methods.synthetic import clustered_embeddings


@pytest.fixture(scope="module")
def blobs() -> np.ndarray:
    """Three well-separated 4-d blobs of 30 rows, with unequal spreads so every covariance type differs."""
    rng = np.random.default_rng(3)
    centres = np.array([[0, 0, 0, 0], [6, 0, 0, 0], [0, 6, 6, 0]], dtype=np.float64)
    spread = np.array([0.5, 1.0, 1.5, 0.7])
    return np.concatenate([c + spread * rng.normal(size=(30, 4)) for c in centres])


def test_fit_gmm_spells_out_the_reference_settings_with_the_seed(blobs):
    model = gmm.fit_gmm(blobs, 3, seed=7, covariance_type="diag")
    params = model.get_params()
    expected = {
        "n_components": 3,
        "covariance_type": "diag",
        "tol": 1e-3,
        "reg_covar": 1e-6,
        "max_iter": 100,
        "n_init": 1,
        "init_params": "kmeans",
        "random_state": 7,
    }
    assert {key: params[key] for key in expected} == expected
    assert gmm.fit_gmm(blobs, 3, seed=0).covariance_type == "full"
    reference = GaussianMixture(3, covariance_type="diag", random_state=7).fit(blobs)
    np.testing.assert_allclose(np.sort(model.means_, axis=0), np.sort(reference.means_, axis=0))


def test_bic_curve_is_each_fit_scored_on_its_own_data_and_the_minimum_wins(blobs):
    selection = gmm.select_gmm_bic(blobs, m_max=5, seed=1, covariance_type="tied")
    by_hand = [gmm.fit_gmm(blobs, m, seed=1, covariance_type="tied").bic(blobs) for m in range(1, 6)]
    np.testing.assert_allclose(selection.bic, by_hand)
    assert selection.m_star == int(np.argmin(by_hand)) + 1 == 3
    assert selection.model.n_components == 3 and selection.model.covariance_type == "tied"
    assert (selection.seed, selection.covariance_type) == (1, "tied")


def test_a_bic_tie_goes_to_the_smaller_mixture(monkeypatch, blobs):
    monkeypatch.setattr(GaussianMixture, "bic", lambda self, x: 5.0)
    assert gmm.select_gmm_bic(blobs, m_max=3).m_star == 1


@pytest.mark.parametrize("m_max", [0, 91])
def test_m_max_outside_one_to_the_row_count_is_refused(blobs, m_max):
    with pytest.raises(ValueError, match=r"m_max must be in 1\.\.90 .*got " + str(m_max)):
        gmm.select_gmm_bic(blobs, m_max=m_max)


def test_m_max_may_equal_the_row_count():
    rows = np.array([[0.0, 0.0], [1.0, 0.5], [0.2, 3.0]])
    assert len(gmm.select_gmm_bic(rows, m_max=3).bic) == 3


def test_one_row_gets_the_closed_form_single_component():
    selection = gmm.select_gmm_bic(np.array([[1.0, 2.0, 3.0]]), m_max=1, seed=4, covariance_type="diag")
    assert (selection.m_star, selection.bic, selection.seed, selection.covariance_type) == (1, (), 4, "diag")
    np.testing.assert_allclose(selection.model.means_, [[1.0, 2.0, 3.0]])
    np.testing.assert_allclose(selection.model.covariances_, [[1e-6, 1e-6, 1e-6]])


@pytest.mark.parametrize(
    ("rows", "dim", "pca_dims", "m_max", "expected"),
    [
        (100, 384, 16, 20, (16, 20)),  # enough rows: the asked-for sizes
        (50, 384, 16, 20, (10, 12)),  # rows/5 dimensions, rows/4 components
        (54, 384, 16, 20, (10, 13)),  # floors, not rounding
        (100, 8, 16, 20, (8, 20)),  # never more dimensions than the features have
        (3, 384, 16, 20, (1, 1)),  # at least one of each
        (40, 384, None, 20, (None, 10)),  # no PCA asked for: none given, components still capped
        (100, 384, 16, 3, (16, 3)),
    ],
)
def test_model_budget_caps_dimensions_and_components_by_rows(rows, dim, pca_dims, m_max, expected):
    assert gmm.model_budget(rows, dim, pca_dims, m_max) == expected


def test_fit_pca_is_sklearns_leading_components(blobs):
    mean, components, kept = gmm.fit_pca(blobs, 2)
    reference = PCA(n_components=2, svd_solver="full").fit(blobs)
    np.testing.assert_allclose(mean, reference.mean_)
    np.testing.assert_allclose(np.abs(components), np.abs(reference.components_), atol=1e-10)
    assert kept == pytest.approx(reference.explained_variance_ratio_.sum())
    assert 0.5 < kept < 1.0


@pytest.mark.filterwarnings("ignore:invalid value encountered in divide:RuntimeWarning")
def test_fit_pca_of_identical_rows_keeps_no_variance_instead_of_nan():
    assert gmm.fit_pca(np.ones((6, 3)), 2)[2] == 0.0


@pytest.mark.parametrize("covariance_type", gmm.COVARIANCE_TYPES)
def test_precision_cholesky_matches_sklearns_for_its_covariances(blobs, covariance_type):
    model = GaussianMixture(3, covariance_type=covariance_type, random_state=0).fit(blobs)
    np.testing.assert_allclose(
        gmm.precision_cholesky(model.covariances_, covariance_type), model.precisions_cholesky_, rtol=1e-7
    )


@pytest.mark.parametrize("covariance_type", gmm.COVARIANCE_TYPES)
def test_a_mixture_rebuilt_from_its_arrays_predicts_like_the_fitted_one(blobs, covariance_type):
    fitted = GaussianMixture(3, covariance_type=covariance_type, random_state=0).fit(blobs)
    rebuilt = gmm.gmm_from_params(
        fitted.weights_, fitted.means_, fitted.covariances_, fitted.precisions_cholesky_, covariance_type
    )
    probe = blobs + 0.8
    np.testing.assert_allclose(rebuilt.precisions_, fitted.precisions_, rtol=1e-7)
    np.testing.assert_allclose(rebuilt.predict_proba(probe), fitted.predict_proba(probe), atol=1e-12)
    np.testing.assert_allclose(rebuilt.score_samples(probe), fitted.score_samples(probe))
    assert rebuilt.n_features_in_ == 4 and rebuilt.converged_ is True
    assert (rebuilt.n_components, rebuilt.covariance_type) == (3, covariance_type)


def test_an_unknown_covariance_type_is_refused_by_name():
    with pytest.raises(ValueError, match=r"unknown covariance type 'banded'; expected one of \('full'"):
        gmm.gmm_from_params(np.ones(1), np.zeros((1, 2)), np.eye(2)[None], np.eye(2)[None], "banded")


@pytest.mark.parametrize("covariance_type", gmm.COVARIANCE_TYPES)
def test_single_component_is_the_em_fit_of_one_component(blobs, covariance_type):
    closed = gmm.single_component(blobs, covariance_type)
    em = GaussianMixture(1, covariance_type=covariance_type, reg_covar=1e-6, random_state=0).fit(blobs)
    np.testing.assert_allclose(closed.means_, em.means_)
    np.testing.assert_allclose(closed.covariances_, em.covariances_, rtol=1e-9)
    np.testing.assert_allclose(closed.score_samples(blobs), em.score_samples(blobs), rtol=1e-9)
    assert closed.covariance_type == covariance_type


def test_cluster_model_projects_raw_vectors_before_predicting():
    vectors = clustered_embeddings(200, 32, classes=4, seed=2)[0].astype(np.float64)
    model = gmm.reduce_then_select(vectors, pca_dims=6, m_max=8, seed=0)
    reference = PCA(n_components=6, svd_solver="full").fit(vectors)
    np.testing.assert_allclose(
        np.abs(model.features(vectors)), np.abs(reference.transform(vectors)), rtol=1e-6, atol=1e-9
    )
    assert model.dims == 6 and model.variance_kept == pytest.approx(reference.explained_variance_ratio_.sum())
    np.testing.assert_array_equal(
        model.predict(vectors), model.selection.model.predict(model.features(vectors))
    )
    assert model.selection.m_star == 4 and model.selection.covariance_type == "tied"


def test_without_pca_the_mixture_sees_the_raw_features(blobs):
    model = gmm.reduce_then_select(blobs, pca_dims=None, m_max=5, covariance_type="full", seed=0)
    assert model.pca_components is None and model.dims == 4
    np.testing.assert_array_equal(model.features(blobs), blobs)
    assert model.selection.m_star == 3 and model.selection.covariance_type == "full"


def test_reduce_then_select_asks_for_no_more_than_the_budget(monkeypatch, blobs):
    asked = {}

    def spy(features, *, m_max, seed, covariance_type):
        asked.update(dims=features.shape[1], m_max=m_max, seed=seed, covariance_type=covariance_type)
        return real(features, m_max=m_max, seed=seed, covariance_type=covariance_type)

    real = gmm.select_gmm_bic
    monkeypatch.setattr(gmm, "select_gmm_bic", spy)
    gmm.reduce_then_select(blobs[:20], pca_dims=16, m_max=20, covariance_type="diag", seed=9)
    assert asked == {"dims": 4, "m_max": 5, "seed": 9, "covariance_type": "diag"}


def test_the_documented_defaults_are_the_ones_a_bare_call_uses(blobs):
    bare = gmm.select_gmm_bic(blobs)
    assert (len(bare.bic), bare.seed, bare.covariance_type) == (5, 0, "full")
    vectors = clustered_embeddings(200, 32, classes=4, seed=2)[0]
    model = gmm.reduce_then_select(vectors)  # 200 rows support 16 dimensions and 20 components
    assert (model.dims, len(model.selection.bic), model.selection.seed) == (16, 20, 0)
    assert model.selection.covariance_type == "tied"
    fitted = GaussianMixture(2, random_state=0).fit(blobs)
    rebuilt = gmm.gmm_from_params(
        fitted.weights_, fitted.means_, fitted.covariances_, fitted.precisions_cholesky_
    )
    assert rebuilt.covariance_type == "full"
    np.testing.assert_allclose(rebuilt.predict_proba(blobs), fitted.predict_proba(blobs), atol=1e-12)


def test_float32_embeddings_are_fitted_and_projected_in_float64(blobs):
    """Sidecars hold float32: the fit must not depend on whether a column arrived as float32 or float64."""
    low = blobs.astype(np.float32)
    assert gmm.fit_pca(low, 2)[0].dtype == np.float64
    assert gmm.single_component(low, "full").means_.dtype == np.float64
    raw = gmm.reduce_then_select(low, pca_dims=None, m_max=3)
    assert raw.selection.model.means_.dtype == np.float64 and raw.features(low).dtype == np.float64


def test_pca_needs_two_rows_and_a_lone_row_is_clustered_as_it_is():
    lone = gmm.reduce_then_select(np.array([[1.0, 2.0, 3.0]]), pca_dims=16, seed=5)
    assert lone.pca_components is None and lone.selection.seed == 5
    pair = gmm.reduce_then_select(np.array([[1.0, 2.0, 3.0], [2.0, 0.0, 1.0]]), pca_dims=16)
    assert pair.pca_components is not None and pair.dims == 1


def test_the_seed_reaches_the_fit_without_pca(blobs):
    assert gmm.reduce_then_select(blobs, pca_dims=None, m_max=2, seed=9).selection.seed == 9


def test_the_mixture_is_fitted_on_the_centred_projection(blobs):
    """EM's M-step puts the weighted component means at the data mean: 0 for centred PCA scores."""
    model = gmm.reduce_then_select(blobs + 50.0, pca_dims=3, m_max=3)
    fitted = model.selection.model
    np.testing.assert_allclose(fitted.weights_ @ fitted.means_, 0.0, atol=1e-6)
    np.testing.assert_allclose(model.features(blobs + 50.0).mean(axis=0), 0.0, atol=1e-9)
