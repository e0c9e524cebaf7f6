"""The maths of `augpipe evaluate` (augpipe.methods.probe) on small hand-made arrays, model-free.

Splits keep every class with exact, seeded sizes; soft labels expand into weighted rows; the probe is
scikit-learn's logistic regression on StandardScaler-standardised features; metrics equal scikit-learn's
with sample weights, and a (B, n) matrix of bootstrap counts gives the same as B separate calls.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, average_precision_score, f1_score, roc_auc_score
from sklearn.preprocessing import StandardScaler

from augpipe.methods.probe import (
    CONFIDENCE,
    accuracy,
    auroc,
    average_precision,
    bootstrap_counts,
    expand_soft_labels,
    fit_probe,
    macro_f1,
    percentile_interval,
    stratified_holdout,
    stratified_subsample,
)

# ------------------------------------------------------------------------------------------- splits


@pytest.mark.parametrize("fraction", [0, -0.5, 1.5])
def test_stratified_subsample_rejects_a_fraction_outside_0_1(fraction):
    with pytest.raises(ValueError) as caught:
        stratified_subsample(np.array([0, 0, 1, 1]), fraction, seed=0)
    assert str(caught.value) == f"fraction must be in (0, 1], got {fraction}"


def test_stratified_subsample_draws_distinct_indices_and_fraction_1_keeps_everything():
    labels = np.repeat([2, 0, 1], [20, 10, 3])
    assert stratified_subsample(labels, 1, seed=3).tolist() == list(range(len(labels)))
    half = stratified_subsample(labels, 0.5, seed=3)
    assert len(set(half.tolist())) == len(half) and (np.diff(half) > 0).all(), "sorted, no repeats"
    assert np.bincount(labels[half]).tolist() == [5, 2, 10]  # round(0.5 * 3) == 2


@pytest.mark.parametrize("fraction", [0, 1, 1.5])
def test_stratified_holdout_rejects_a_fraction_outside_0_1(fraction):
    with pytest.raises(ValueError) as caught:
        stratified_holdout(np.array([0, 0, 1, 1]), fraction, seed=0)
    assert str(caught.value) == f"fraction must be in (0, 1), got {fraction}"


@pytest.mark.parametrize(("fraction", "sizes"), [(0.9, [0, 1, 2, 36]), (0.1, [0, 1, 1, 4])])
def test_stratified_holdout_sizes_keep_a_sample_of_every_class_on_each_side(fraction, sizes):
    """A singleton class (listed first) stays in train; every other class has ≥ 1 sample on each side."""
    labels = np.repeat([0, 1, 2, 3], [1, 2, 3, 40])
    train, test = stratified_holdout(labels, fraction, seed=5)
    assert np.bincount(labels[test], minlength=4).tolist() == sizes
    assert np.bincount(labels[train]).tolist() == [n - s for n, s in zip([1, 2, 3, 40], sizes, strict=True)]
    assert not set(train.tolist()) & set(test.tolist())
    assert sorted([*train, *test]) == list(range(len(labels)))
    again = stratified_holdout(labels, fraction, seed=5)
    assert again[0].tolist() == train.tolist() and again[1].tolist() == test.tolist()
    assert (
        stratified_holdout(labels, 0.5, seed=5)[1].tolist() != stratified_holdout(labels, 0.5, 6)[1].tolist()
    )


def test_stratified_holdout_of_singleton_classes_is_an_empty_integer_test_set():
    """The evaluate protocol reports 'too few samples' on an empty test set, so it must not raise here."""
    labels = np.array([4, 7, 9])
    train, test = stratified_holdout(labels, 0.3, seed=0)
    assert train.tolist() == [0, 1, 2]
    assert test.shape == (0,) and test.dtype == np.int64
    assert labels[test].tolist() == []


# -------------------------------------------------------------------------------------- soft labels


def test_soft_label_classes_with_zero_weight_add_no_row():
    x = np.arange(4.0).reshape(2, 2)
    xe, ye, we = expand_soft_labels(x, np.array([0, 1]), [{0: 2.0, 1: 0.0}, None])
    assert ye.tolist() == [0, 1] and we.tolist() == [1.0, 1.0] and xe.tolist() == x.tolist()


def test_expanding_no_rows_gives_empty_integer_labels_and_float_weights():
    """The arms stack this onto the original rows: empty labels must stay integer."""
    xe, ye, we = expand_soft_labels(np.zeros((0, 3)), np.zeros(0, np.int64), [])
    assert xe.shape == (0, 3) and ye.dtype == np.int64 and we.dtype == np.float64
    assert np.r_[np.array([1, 2]), ye].dtype == np.int64


# -------------------------------------------------------------------------------------------- probe


def reference_probe(x, y, w, c=1.0):
    with np.errstate(invalid="ignore"):  # a constant feature's weighted variance may round below 0
        scaler = StandardScaler().fit(x, sample_weight=w)
    model = LogisticRegression(C=c, max_iter=2000).fit(scaler.transform(x), y, sample_weight=w)
    return scaler, model


def test_probe_equals_weighted_standard_scaler_and_logistic_regression():
    """Mean and scale are the weighted ones (a constant feature keeps scale 1); default C is 1."""
    rng = np.random.default_rng(0)
    offsets, spreads = np.array([10.0, -3.0, 0.0, 7.0]), np.array([0.3, 5.0, 1.0, 0.0])
    y = np.arange(60) % 3
    x = rng.normal(size=(60, 4)) * spreads + offsets + np.outer(y, [0.2, 3.0, 0.5, 0.0])
    w = rng.uniform(0.2, 3.0, 60)
    probe = fit_probe(x, y, w, seed=0)
    scaler, model = reference_probe(x, y, w)
    np.testing.assert_allclose(probe.mean, scaler.mean_, rtol=1e-9)
    np.testing.assert_allclose(probe.scale, scaler.scale_, rtol=1e-9)
    assert probe.scale[3] == 1.0
    np.testing.assert_allclose(probe.model.coef_, model.coef_, rtol=1e-4, atol=1e-6)
    new = rng.normal(size=(25, 4)) * spreads + offsets
    expected = model.predict_proba(scaler.transform(new))
    np.testing.assert_allclose(probe.anomaly_scores(new), 1 - expected.max(axis=1), atol=1e-6)
    assert probe.predict(new).tolist() == model.predict(scaler.transform(new)).tolist()


def test_probe_uses_the_given_c_and_iterates_to_convergence():
    """Nearly collinear features with weak regularisation need well over 100 lbfgs iterations."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(28, 1)) @ rng.normal(size=(1, 10)) + 0.02 * rng.normal(size=(28, 10))
    y = np.arange(28) % 3
    probe = fit_probe(x, y, np.ones(28), seed=0, c=400.0)
    assert 100 < probe.model.n_iter_[0] < 2000
    reference = LogisticRegression(C=400.0, max_iter=2000).fit((x - probe.mean) / probe.scale, y)
    np.testing.assert_allclose(probe.model.coef_, reference.coef_, rtol=1e-6, atol=1e-6)


def test_probe_fits_two_classes_and_refuses_one():
    x = np.array([[0.0], [1.0], [2.0], [3.0]])
    assert fit_probe(x, np.array([0, 0, 1, 1]), np.ones(4), seed=0).predict(x).tolist() == [0, 0, 1, 1]
    with pytest.raises(ValueError) as caught:
        fit_probe(x, np.array([1, 1, 1, 1]), np.ones(4), seed=0)
    assert str(caught.value) == "a probe needs at least two classes in its training rows"


# ---------------------------------------------------------------------------------------- bootstrap


def test_bootstrap_counts_are_seeded_stratified_and_differ_between_replicates():
    labels = np.repeat([0, 1, 2], [7, 5, 9])
    counts = bootstrap_counts(labels, 30, seed=4)
    assert counts.shape == (30, 21) and counts.dtype == np.float64
    assert np.array_equal(counts, bootstrap_counts(labels, 30, seed=4))
    assert not np.array_equal(counts, bootstrap_counts(labels, 30, seed=5))
    for cls, size in enumerate([7, 5, 9]):
        assert (counts[:, labels == cls].sum(axis=1) == size).all()
    assert len({row.tobytes() for row in counts}) > 20, "each replicate draws its own resample"


def test_percentile_interval_is_the_central_95_percent_and_contains_the_point_estimate():
    values = np.random.default_rng(1).normal(size=1001) ** 3
    assert CONFIDENCE == 0.95
    assert percentile_interval(values) == pytest.approx(np.percentile(values, [2.5, 97.5]), rel=1e-9)
    assert percentile_interval(values, 0.8) == pytest.approx(np.percentile(values, [10, 90]), rel=1e-9)
    truth = np.repeat([0, 1, 2], 30)
    predicted = np.where(np.arange(90) % 4 == 0, (truth + 1) % 3, truth)
    point = accuracy(truth, predicted, np.ones(90))
    low, high = percentile_interval(accuracy(truth, predicted, bootstrap_counts(truth, 500, seed=0)))
    assert low < point < high


# ------------------------------------------------------------------------------------------ metrics


def hand_made(n: int = 40, seed: int = 2):
    """Labels 0..3 where class 3 is never predicted and class 2 mostly wrong; tied scores."""
    rng = np.random.default_rng(seed)
    truth = np.arange(n) % 4
    predicted = np.where(rng.random(n) < 0.7, truth, rng.integers(0, 3, n))
    predicted[truth == 3] = 0
    predicted[(truth == 2) & (np.arange(n) % 3 > 0)] = 1
    positive = truth == 0
    scores = np.round(rng.normal(size=n) + positive, 0)
    return truth, predicted, positive, scores


def test_metrics_with_fractional_weights_equal_scikit_learn():
    """Weights summing to 1 (all below 1), a class never predicted and a class with F1 below 1/2."""
    truth, predicted, positive, scores = hand_made()
    w = np.random.default_rng(3).uniform(0.1, 1.0, len(truth))
    w /= w.sum()
    labels = np.unique(truth)
    assert accuracy(truth, predicted, w) == pytest.approx(accuracy_score(truth, predicted, sample_weight=w))
    assert macro_f1(truth, predicted, w) == pytest.approx(
        f1_score(truth, predicted, labels=labels, average="macro", sample_weight=w, zero_division=0)
    )
    assert auroc(positive, scores, w) == pytest.approx(roc_auc_score(positive, scores, sample_weight=w))
    assert average_precision(positive, scores, w) == pytest.approx(
        average_precision_score(positive, scores, sample_weight=w)
    )


def test_macro_f1_of_a_single_class_and_of_a_class_with_zero_weight_equals_scikit_learn():
    truth, predicted, _, _ = hand_made()
    one = np.zeros(6, np.int64)
    assert macro_f1(one, np.array([0, 0, 1, 0, 2, 0]), np.ones(6)) == pytest.approx(
        f1_score(one, [0, 0, 1, 0, 2, 0], labels=[0], average="macro", zero_division=0)
    )
    w = np.where(truth == 3, 0.0, 1.0)  # class 3: present, never predicted, no weight at all
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = macro_f1(truth, predicted, w)
    expected = f1_score(
        truth, predicted, labels=[0, 1, 2, 3], average="macro", sample_weight=w, zero_division=0
    )
    assert got == pytest.approx(expected)


@pytest.mark.parametrize("metric", [accuracy, macro_f1, auroc, average_precision])
def test_a_matrix_of_bootstrap_counts_gives_one_result_per_replicate(metric):
    truth, predicted, positive, scores = hand_made(n=37)
    counts = bootstrap_counts(truth, 5, seed=9)
    y_true, y_pred = (truth, predicted) if metric in (accuracy, macro_f1) else (positive, scores)
    batched = metric(y_true, y_pred, counts)
    assert batched.shape == (5,)
    np.testing.assert_allclose(batched, [metric(y_true, y_pred, w) for w in counts], rtol=1e-12)


def test_average_precision_with_unweighted_top_scores_equals_scikit_learn_without_warnings():
    """A bootstrap replicate often gives the top-scored samples count 0; 1,000 replicates must not warn."""
    _, _, positive, scores = hand_made()
    w = np.where(scores >= scores.max(), 0.0, 1.0)
    expected = average_precision_score(positive, scores, sample_weight=w)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = average_precision(positive, scores, np.stack([w, w]))
    np.testing.assert_allclose(got, [expected, expected], rtol=1e-12)
