"""The generated embeddings (``augpipe.methods.synthetic``) keep the structure they promise: unit rows,
balanced cycling labels, the documented defaults, the same data for the same seed, class centres
``common·g + u_k``, and within-class noise of norm ≈ ``noise`` whose variance falls along a random
rotation's axes as i^(-2·decay) (isotropic at decay 0)."""

from __future__ import annotations

import numpy as np

from augpipe.methods.synthetic import clustered_embeddings, unit_rows


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _within_class_spectrum(x: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Eigenvalues (descending) of the pooled within-class covariance."""
    centred = np.concatenate([x[labels == k] - x[labels == k].mean(0) for k in np.unique(labels)])
    return np.linalg.eigvalsh(np.cov(centred.astype(np.float64), rowvar=False))[::-1]


def test_unit_rows_scales_every_row_to_unit_norm_and_keeps_zero_rows():
    x = np.array([[0.03, 0.04], [3.0, 4.0], [0.0, 0.0]])
    np.testing.assert_allclose(unit_rows(x), [[0.6, 0.8], [0.6, 0.8], [0.0, 0.0]])


def test_samples_are_unit_float32_rows_with_balanced_cycling_labels():
    x, labels = clustered_embeddings(53, 16, 5, seed=3)
    assert x.shape == (53, 16) and x.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-6)
    np.testing.assert_array_equal(labels, np.arange(53) % 5)


def test_defaults_are_the_documented_ones_and_the_seed_fixes_the_data():
    x, labels = clustered_embeddings(40, 16)
    explicit = clustered_embeddings(40, 16, 10, seed=0, noise=0.6, common=1.0, decay=0.5)
    np.testing.assert_array_equal(x, explicit[0])
    np.testing.assert_array_equal(labels, explicit[1])
    assert len(np.unique(labels)) == 10
    np.testing.assert_array_equal(
        clustered_embeddings(40, 16, 4, seed=7)[0], clustered_embeddings(40, 16, 4, seed=7)[0]
    )
    assert not np.allclose(
        clustered_embeddings(40, 16, 4, seed=7)[0], clustered_embeddings(40, 16, 4, seed=8)[0]
    )


def test_the_data_is_the_documented_construction_from_the_seeded_stream():
    """Written out: g, then the u_k, then the per-sample noise, then the rotation, all from one
    ``default_rng(seed)``; a sample is Normalize(centre + (N · scales) R)."""
    n, dim, classes, seed, noise, common, decay = 30, 12, 3, 5, 0.4, 1.5, 0.7
    x, labels = clustered_embeddings(n, dim, classes, seed=seed, noise=noise, common=common, decay=decay)
    rng = np.random.default_rng(seed)
    g = _unit(rng.normal(size=dim))
    centres = _unit(common * g + _unit(rng.normal(size=(classes, dim))))
    scales = np.array([i ** (-decay) for i in range(1, dim + 1)])
    scales = scales * noise / np.linalg.norm(scales)
    draws = rng.normal(size=(n, dim))
    q, r = np.linalg.qr(rng.normal(size=(dim, dim)))
    rotation = q * np.sign(np.diag(r))
    np.testing.assert_allclose(x, _unit(centres[labels] + (draws * scales) @ rotation), atol=1e-6)
    clean = clustered_embeddings(n, dim, classes, seed=seed, noise=0.0, common=common, decay=decay)[0]
    np.testing.assert_allclose(clean, centres[labels], atol=1e-6)  # no noise: every sample is its centre


def test_centre_cosine_is_common_squared_over_one_plus_common_squared():
    for common in (1.0, 2.0):
        centres = clustered_embeddings(10, 512, 10, seed=1, noise=0.0, common=common)[0].astype(np.float64)
        cos = centres @ centres.T
        mean_off_diagonal = cos[~np.eye(10, dtype=bool)].mean()
        assert abs(mean_off_diagonal - common**2 / (1 + common**2)) < 0.05


def test_within_class_noise_is_concentrated_in_few_directions_and_isotropic_at_decay_zero():
    dim = 16
    x, labels = clustered_embeddings(4000, dim, 2, seed=4, noise=0.1)
    spectrum = _within_class_spectrum(x, labels)
    assert spectrum[0] > 4 * np.median(spectrum)  # variance ∝ 1/i: the leading axis dominates
    # the within-class spread has total norm ≈ noise (up to the final normalisation)
    assert 0.08**2 < spectrum.sum() < 0.12**2
    x, labels = clustered_embeddings(4000, dim, 2, seed=4, noise=0.1, decay=0)
    assert np.isfinite(x).all()
    spectrum = _within_class_spectrum(x, labels)[:-1]  # the last axis is the radial one normalisation removes
    assert spectrum[0] < 1.6 * np.median(spectrum)
