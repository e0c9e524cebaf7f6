"""CMDA maths against the METHODS §2.5 golden values, and the offline driver's invariants."""

from __future__ import annotations

import re
from collections.abc import Callable

import numpy as np
import pytest

from augpipe.methods import cmda

ATOL = 1e-6  # the golden values are printed to 6 decimals

X_S = np.array(
    [[1, 0, 0, 2], [0, 1, 0, 1], [2, 2, 1, 0], [0, 0, 3, 1], [1, 0, 1, 1], [0, 2, 0, 3]], dtype=float
)
Z_S = np.array(
    [
        [1.0, 0.2, 0.0],
        [0.8, 0.6, 0.1],
        [0.1, 1.0, 0.3],
        [-0.9, 0.1, 0.4],
        [-0.2, -1.0, 0.5],
        [0.3, -0.4, -1.0],
    ]
)
Z_T = np.array(
    [
        [0.9, 0.3, -0.1],
        [0.7, 0.7, 0.0],
        [0.0, 0.9, 0.5],
        [-1.0, 0.0, 0.2],
        [-0.1, -0.8, 0.6],
        [0.2, -0.5, -0.9],
    ]
)
F_C = np.array([[0.0, 0.1], [0.2, -0.1], [-0.1, 0.0], [5.0, 5.1], [4.9, 5.2], [5.2, 4.8]])
GROUPS = np.array([0, 0, 0, 1, 1, 1])

FIXED_GMM = {
    "mix_weights": np.array([0.5, 0.5]),
    "means": np.array([[0.0, 0.0], [5.0, 5.0]]),
    "covariances": np.array([16 * np.eye(2), 16 * np.eye(2)]),
}


@pytest.fixture(scope="module")
def selection() -> cmda.GmmSelection:
    return cmda.select_gmm_bic(F_C, m_max=2, seed=0)


@pytest.fixture(scope="module")
def labels(selection: cmda.GmmSelection) -> np.ndarray:
    return selection.model.predict(F_C)


# ---------------------------------------------------------------------------------- GMM and BIC


def test_bic_curve_and_m_star(selection: cmda.GmmSelection) -> None:
    np.testing.assert_allclose(selection.bic, [37.278, -4.637], atol=5e-4)
    assert selection.m_star == 2
    assert selection.model.n_components == 2


def test_gmm_settings_are_the_reference_defaults_with_a_pinned_seed() -> None:
    params = cmda.fit_gmm(F_C, 2, seed=7).get_params()
    assert params["covariance_type"] == "full"
    assert params["tol"] == 1e-3
    assert params["reg_covar"] == 1e-6
    assert params["max_iter"] == 100
    assert params["n_init"] == 1
    assert params["init_params"] == "kmeans"
    assert params["random_state"] == 7


def test_gmm_finds_the_two_groups(labels: np.ndarray) -> None:
    assert len(set(labels[:3])) == 1
    assert len(set(labels[3:])) == 1
    assert labels[0] != labels[3]


def test_bic_selection_rejects_more_components_than_samples() -> None:
    with pytest.raises(ValueError):
        cmda.select_gmm_bic(F_C, m_max=7)


# ---------------------------------------------------------------------------------- weights


def test_affinity_is_absolute_cosine_teacher_rows() -> None:
    a = cmda.abs_cosine_affinity(Z_T, Z_S)
    t0 = Z_T[0] / np.linalg.norm(Z_T[0])
    z3 = Z_S[3] / np.linalg.norm(Z_S[3])
    assert a[0, 3] == pytest.approx(abs(t0 @ z3))
    assert t0 @ z3 < 0  # an anti-aligned pair still gets positive affinity
    assert not np.allclose(a, a.T)  # rows are teacher, columns student


def test_reference_cra_golden(labels: np.ndarray) -> None:
    w = cmda.cmda_weights(Z_T, Z_S, labels, mode="reference_cra")
    np.testing.assert_allclose(w[0], [0.437032, 0.360708, 0.206597, 0, 0, 0], atol=ATOL)
    np.testing.assert_allclose(
        w.sum(axis=1), [1.004337, 1.177997, 0.870648, 1.036827, 0.977819, 0.974506], atol=ATOL
    )
    np.testing.assert_allclose(cmda.generate(w, X_S)[0], [0.850226, 0.773902, 0.206597, 1.234771], atol=ATOL)


def test_rownorm_cra_golden(labels: np.ndarray) -> None:
    w = cmda.cmda_weights(Z_T, Z_S, labels, mode="rownorm_cra")
    np.testing.assert_allclose(w[0], [0.437032, 0.405715, 0.157253, 0, 0, 0], atol=ATOL)
    np.testing.assert_allclose(w.sum(axis=1), np.ones(6), atol=1e-12)
    x_new = cmda.generate(w, X_S)
    np.testing.assert_allclose(x_new[0], [0.751537, 0.720221, 0.157253, 1.279779], atol=ATOL)
    np.testing.assert_allclose(x_new[5], [0.005324, 1.268513, 1.086581, 2.268513], atol=ATOL)


def test_rownorm_is_the_default_and_accepts_the_short_name(labels: np.ndarray) -> None:
    expected = cmda.cmda_weights(Z_T, Z_S, labels, mode="rownorm_cra")
    np.testing.assert_array_equal(cmda.cmda_weights(Z_T, Z_S, labels), expected)
    np.testing.assert_array_equal(cmda.cmda_weights(Z_T, Z_S, labels, mode="rownorm"), expected)
    with pytest.raises(ValueError):
        cmda.cmda_weights(Z_T, Z_S, labels, mode="softmax")


def test_reference_cma_golden() -> None:
    w = cmda.cmda_weights(Z_T, Z_S, mode="reference_cma")
    np.testing.assert_allclose(cmda.generate(w, X_S)[0], [0.644515, 0.636732, 1.040185, 1.445371], atol=ATOL)
    assert np.all(w > 0)  # no mask
    a = cmda.abs_cosine_affinity(Z_T, Z_S)
    np.testing.assert_allclose(w, a / a.sum(axis=1)[None, :])  # no diagonal change, broadcast bug
    with pytest.raises(ValueError):
        cmda.cmda_weights(Z_T, Z_S, GROUPS, mode="reference_cma")


def test_cra_self_weight_is_one_before_normalisation() -> None:
    w = cmda.cmda_weights(Z_T, Z_S, GROUPS, mode="rownorm_cra")
    a = cmda.abs_cosine_affinity(Z_T, Z_S)
    row_sum = 1.0 + a[0, 1] + a[0, 2]
    assert w[0, 0] == pytest.approx(1.0 / row_sum)


def test_no_labels_means_one_cluster() -> None:
    w = cmda.cmda_weights(Z_T, Z_S, None)
    np.testing.assert_array_equal(w, cmda.cmda_weights(Z_T, Z_S, np.zeros(6, dtype=int)))
    assert np.all(w > 0)


def test_zero_rows_are_guarded_not_nan() -> None:
    zeros = np.zeros((4, 3))
    w = cmda.cmda_weights(zeros, zeros, mode="reference_cma")
    assert np.all(np.isfinite(w))
    np.testing.assert_array_equal(w, 0.0)
    w = cmda.cmda_weights(zeros, zeros, np.array([0, 0, 1, 1]))
    np.testing.assert_allclose(w, np.eye(4))  # only the self-weight survives


def test_generate_keeps_trailing_shape() -> None:
    rng = np.random.default_rng(0)
    images = rng.standard_normal((6, 3, 4, 4))
    w = cmda.cmda_weights(Z_T, Z_S, GROUPS)
    out = cmda.generate(w, images)
    assert out.shape == images.shape
    np.testing.assert_allclose(out[2], np.tensordot(w[2], images, axes=1))


def test_soft_labels() -> None:
    w = cmda.cmda_weights(Z_T, Z_S, GROUPS)
    y = np.array([0, 1, 0, 1, 1, 0])
    soft = cmda.soft_labels(w, y, 2)
    np.testing.assert_allclose(soft[0], [0.437032 + 0.157253, 0.405715], atol=2 * ATOL)
    np.testing.assert_allclose(soft.sum(axis=1), 1.0)
    ref = cmda.soft_labels(cmda.cmda_weights(Z_T, Z_S, GROUPS, mode="reference_cra"), y, 2)
    np.testing.assert_allclose(ref.sum(axis=1), 1.0)  # renormalised despite the bug's row sums


def test_float32_inputs_stay_float32() -> None:
    w = cmda.cmda_weights(Z_T.astype(np.float32), Z_S.astype(np.float32), GROUPS)
    assert w.dtype == np.float32
    np.testing.assert_allclose(w[0], [0.437032, 0.405715, 0.157253, 0, 0, 0], atol=1e-6)
    assert cmda.soft_labels(w, np.array([0, 1, 0, 1, 1, 0]), 2).dtype == np.float32


def test_mixed_precision_computes_in_float64_and_half_precision_in_float32() -> None:
    """Either input in float64 makes the affinity float64; float16 is widened: its squared norms overflow."""
    assert cmda.abs_cosine_affinity(Z_T, Z_S.astype(np.float32)).dtype == np.float64
    assert cmda.abs_cosine_affinity(Z_T.astype(np.float32), Z_S).dtype == np.float64
    half = np.full((2, 4), 200, dtype=np.float16)  # squared norm 160000 > float16's max 65504
    a = cmda.abs_cosine_affinity(half, half)
    assert a.dtype == np.float32
    np.testing.assert_allclose(a, 1.0, rtol=1e-6)


def test_reference_column_of_a_teacher_summing_to_exactly_eps_gets_weight_zero() -> None:
    """The zero-row guard is strict (row sum > ε): at exactly ε the 1/ε blow-up must not come back."""
    teacher = np.array([[1.0, 0.0], [0.0, 1.0]])
    student = np.array([[cmda.EPS, 1.0], [0.0, 1.0]])
    assert cmda.abs_cosine_affinity(teacher, student)[0].sum() == cmda.EPS
    w = cmda.cmda_weights(teacher, student, mode="reference_cma")
    np.testing.assert_array_equal(w, [[0.0, 0.0], [0.0, 0.5]])


def test_a_callers_eps_reaches_the_norm_guard() -> None:
    """With ε below the embeddings' norms, tiny embeddings mix like any others (|cos| is scale-free)."""
    tiny_t, tiny_s = Z_T * 1e-14, Z_S * 1e-14  # norms below the default ε = 1e-12
    w = cmda.cmda_weights(tiny_t, tiny_s, GROUPS, eps=1e-30)
    np.testing.assert_allclose(w, cmda.cmda_weights(Z_T, Z_S, GROUPS), rtol=1e-12)
    outs = cmda.iter_offline(
        6, teacher=tiny_t, student=tiny_s, x_student=X_S, cluster_labels=GROUPS, batch_size=6, eps=1e-30
    )
    by_anchor = {o.anchor: o for o in outs}
    np.testing.assert_allclose(by_anchor[0].x_new, [0.751537, 0.720221, 0.157253, 1.279779], atol=ATOL)


def test_labels_may_be_column_vectors() -> None:
    """Cluster and class labels read as an (n, 1) column (one column of a table) act as the flat labels."""
    w = cmda.cmda_weights(Z_T, Z_S, GROUPS)
    np.testing.assert_array_equal(cmda.cmda_weights(Z_T, Z_S, GROUPS[:, None]), w)
    y = np.array([0, 1, 0, 1, 1, 0])
    np.testing.assert_array_equal(cmda.soft_labels(w, y[:, None], 2), cmda.soft_labels(w, y, 2))
    labels = np.random.default_rng(1).integers(0, 3, size=30)
    flat = list(cmda.cluster_batches(30, 4, labels, seed=5, pass_index=0))
    column = list(cmda.cluster_batches(30, 4, labels[:, None], seed=5, pass_index=0))
    for a, b in zip(flat, column, strict=True):
        np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------------------------- paper-literal soft DCA


def test_responsibilities_golden() -> None:
    gamma = cmda.gmm_responsibilities(F_C, **FIXED_GMM)
    np.testing.assert_allclose(gamma[0], [0.822189, 0.177811], atol=ATOL)
    np.testing.assert_allclose(gamma.sum(axis=1), 1.0)


def test_responsibilities_match_sklearn_predict_proba(selection: cmda.GmmSelection) -> None:
    m = selection.model
    gamma = cmda.gmm_responsibilities(F_C, m.weights_, m.means_, m.covariances_)
    np.testing.assert_allclose(gamma, m.predict_proba(F_C), atol=1e-9)


def test_soft_dca_intra_weights_golden() -> None:
    w_intra = cmda.soft_dca_intra_weights(cmda.gmm_responsibilities(F_C, **FIXED_GMM))
    np.testing.assert_allclose(w_intra[0], [1.644378, 1.644378, 1.644378, 1, 1, 1], atol=ATOL)
    np.testing.assert_allclose(w_intra[0, 3:], 1.0, atol=1e-12)  # the M = 2 defect: exactly 1


def test_paper_literal_generation_golden() -> None:
    gamma = cmda.gmm_responsibilities(F_C, **FIXED_GMM)
    x_new = cmda.paper_literal_generate(Z_T, Z_S, X_S, gamma)
    np.testing.assert_allclose(x_new[0], [0.852168, 0.822039, 0.953178, 1.766967], atol=ATOL)


# ---------------------------------------------------------------------------------- offline driver


def _collect(n: int, batch_size: int, seed: int, pass_index: int = 0) -> list[np.ndarray]:
    return list(cmda.permuted_batches(n, batch_size, seed=seed, pass_index=pass_index))


@pytest.mark.parametrize(
    ("n", "batch_size"), [(1, 4), (2, 1), (3, 2), (5, 2), (6, 6), (37, 8), (1000, 128), (1025, 128)]
)
def test_batches_partition_the_corpus(n: int, batch_size: int) -> None:
    batches = _collect(n, batch_size, seed=3)
    assert [len(b) for b in batches[:-1]] == [batch_size] * (len(batches) - 1)
    assert 1 <= len(batches[-1]) <= batch_size
    np.testing.assert_array_equal(np.sort(np.concatenate(batches)), np.arange(n))


def test_permutation_is_seeded() -> None:
    first = np.concatenate(_collect(1000, 128, seed=3))
    np.testing.assert_array_equal(first, np.concatenate(_collect(1000, 128, seed=3)))
    assert not np.array_equal(first, np.concatenate(_collect(1000, 128, seed=4)))
    assert not np.array_equal(first, np.concatenate(_collect(1000, 128, seed=3, pass_index=1)))
    assert not np.array_equal(first, np.arange(1000))


# (n, seed, pass_index) -> the first 8 positions of the pass, as the current generator draws them
PINNED_PERMUTATIONS = {
    (3, 0, 0): [0, 1, 2],
    (3, 1, 0): [1, 2, 0],
    (4, 0, 0): [3, 1, 2, 0],
    (5, 0, 1): [4, 1, 3, 0, 2],
    (10, 0, 0): [1, 9, 6, 4, 7, 0, 8, 3],
    (10, 1, 0): [1, 5, 4, 8, 9, 3, 7, 2],
    (10, 2024, 3): [7, 2, 6, 8, 3, 1, 4, 0],
    (1000, 7, 2): [859, 483, 879, 359, 57, 694, 663, 445],
}


def test_permutations_are_pinned_across_versions() -> None:
    """A resumed shard must redraw the pools an uninterrupted run drew, so the generator may never change."""
    for (n, seed, pass_index), expected in PINNED_PERMUTATIONS.items():
        drawn = np.concatenate(_collect(n, 8, seed=seed, pass_index=pass_index))[:8]
        assert drawn.tolist() == expected, (n, seed, pass_index)


def test_empty_corpus_has_no_batches_and_batch_size_one_is_allowed() -> None:
    assert _collect(0, 4, seed=0) == []
    assert [len(b) for b in _collect(5, 1, seed=0)] == [1] * 5


def test_permutation_is_not_local() -> None:
    # a shuffle should carry the first batch's positions all over the corpus
    first_batch = _collect(100_000, 128, seed=0)[0]
    assert first_batch.max() - first_batch.min() > 50_000


def test_cluster_batches_are_single_cluster_and_partition() -> None:
    n, batch_size = 103, 8
    labels = np.random.default_rng(1).integers(0, 3, size=n)
    batches = list(cmda.cluster_batches(n, batch_size, labels, seed=5, pass_index=0))
    for b in batches:
        assert len(set(labels[b])) == 1
        assert 1 <= len(b) <= batch_size
    np.testing.assert_array_equal(np.sort(np.concatenate(batches)), np.arange(n))
    assert sum(len(b) < batch_size for b in batches) <= 3  # at most one remainder per cluster


def test_cluster_batches_stream_a_full_batch_as_soon_as_it_fills() -> None:
    """A cluster's batch leaves as soon as it has B members, so what is pending stays O(M·B)."""
    fetched: list[int] = []

    def one_cluster(idx: np.ndarray) -> np.ndarray:
        fetched.append(len(idx))
        return np.zeros(len(idx), dtype=int)

    first = next(cmda.cluster_batches(12, 4, one_cluster, seed=0, pass_index=0))
    assert len(first) == 4
    assert fetched == [4]  # emitted from the first block, before the second is read


def _corpus(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "teacher": rng.standard_normal((n, 5)),
        "student": rng.standard_normal((n, 5)),
        "x_student": rng.standard_normal((n, 7)),
        "cluster_labels": rng.integers(0, 3, size=n),
    }


@pytest.mark.parametrize("pool", ["batch", "cluster"])
def test_each_pass_emits_one_output_per_source(pool: str) -> None:
    n, passes = 53, 3
    outputs = list(cmda.iter_offline(n, **_corpus(n), passes=passes, batch_size=8, seed=2, pool=pool))
    assert len(outputs) == n * passes
    for p in range(passes):
        anchors = sorted(o.anchor for o in outputs if o.pass_index == p)
        assert anchors == list(range(n))


def test_driver_outputs_match_the_batch_maths() -> None:
    n = 40
    corpus = _corpus(n)
    for batch in cmda.iter_offline_batches(n, **corpus, batch_size=16, seed=9):
        idx = batch.indices
        w = cmda.cmda_weights(corpus["teacher"][idx], corpus["student"][idx], corpus["cluster_labels"][idx])
        np.testing.assert_allclose(batch.weights, w)
        np.testing.assert_allclose(batch.x_new, w @ corpus["x_student"][idx])
        for anchor in batch.anchors():
            r = int(np.flatnonzero(idx == anchor.anchor)[0])
            assert anchor.anchor in anchor.contributors  # the anchor's own sample is included
            assert np.all(corpus["cluster_labels"][anchor.contributors] == corpus["cluster_labels"][idx[r]])
            np.testing.assert_allclose(
                anchor.x_new, anchor.weights @ corpus["x_student"][anchor.contributors]
            )
            assert anchor.weight_sum == pytest.approx(1.0)


def test_driver_is_reproducible_and_seed_dependent() -> None:
    n = 60
    corpus = _corpus(n)

    def run(seed: int) -> np.ndarray:
        outs = cmda.iter_offline(n, **corpus, passes=2, batch_size=8, seed=seed)
        return np.stack([o.x_new for o in outs])

    np.testing.assert_array_equal(run(11), run(11))
    assert not np.allclose(run(11), run(12))


def test_driver_reproduces_golden_values_under_any_permutation() -> None:
    # per-anchor results do not depend on the order of the batch, so a single batch of 6 gives 2.5's rows
    for mode, cluster_labels, row, expected in [
        ("rownorm_cra", GROUPS, 0, [0.751537, 0.720221, 0.157253, 1.279779]),
        ("rownorm_cra", GROUPS, 5, [0.005324, 1.268513, 1.086581, 2.268513]),
        ("reference_cra", GROUPS, 0, [0.850226, 0.773902, 0.206597, 1.234771]),
        ("reference_cma", None, 0, [0.644515, 0.636732, 1.040185, 1.445371]),
    ]:
        outs = cmda.iter_offline(
            6,
            teacher=Z_T,
            student=Z_S,
            x_student=X_S,
            cluster_labels=cluster_labels,
            batch_size=6,
            seed=1,
            mode=mode,
        )
        by_anchor = {o.anchor: o for o in outs}
        np.testing.assert_allclose(by_anchor[row].x_new, expected, atol=ATOL)


def _recording_fetch(rows: np.ndarray, sizes: list[int]) -> Callable[[np.ndarray], np.ndarray]:
    """A row source as a callable that records how many rows each fetch asked for."""

    def fetch(idx: np.ndarray) -> np.ndarray:
        sizes.append(len(idx))
        return rows[idx]

    return fetch


def test_callable_sources_match_arrays() -> None:
    n = 30
    corpus = _corpus(n)
    fetched: list[int] = []
    fetch_teacher = _recording_fetch(corpus["teacher"], fetched)
    from_arrays = list(cmda.iter_offline_batches(n, **corpus, batch_size=8, seed=4))
    from_callable = list(
        cmda.iter_offline_batches(n, **{**corpus, "teacher": fetch_teacher}, batch_size=8, seed=4)
    )
    assert max(fetched) <= 8  # rows are fetched a batch at a time
    for a, b in zip(from_arrays, from_callable, strict=True):
        np.testing.assert_array_equal(a.x_new, b.x_new)


def test_driver_soft_labels_and_student_reuse() -> None:
    n = 24
    corpus = _corpus(n)
    y = np.arange(n) % 4
    batches = cmda.iter_offline_batches(
        n,
        teacher=corpus["teacher"],
        student=corpus["student"],
        x_student=corpus["student"],
        cluster_labels=corpus["cluster_labels"],
        class_labels=y,
        n_classes=4,
        batch_size=8,
        seed=0,
    )
    for batch in batches:
        np.testing.assert_allclose(batch.x_new, batch.weights @ corpus["student"][batch.indices])
        np.testing.assert_allclose(batch.soft_labels, batch.weights @ np.eye(4)[y[batch.indices]])
        for r, anchor in enumerate(batch.anchors()):
            assert anchor.soft_label is not None
            np.testing.assert_array_equal(anchor.soft_label, batch.soft_labels[r])


def test_student_passed_as_x_student_is_fetched_once_per_batch() -> None:
    n = 20
    corpus = _corpus(n)
    calls: list[int] = []
    student = _recording_fetch(corpus["student"], calls)
    batches = list(
        cmda.iter_offline_batches(
            n, teacher=corpus["teacher"], student=student, x_student=student, batch_size=8, seed=0
        )
    )
    assert calls == [len(b.indices) for b in batches]


def test_driver_defaults_are_one_pass_of_b128_with_seed_0() -> None:
    """B = 128 is the paper's batch (METHODS §2.3); one pass and seed 0 are what omitting them gives."""
    n = 300
    batches = list(cmda.iter_offline_batches(n, **_corpus(n)))
    assert [b.pass_index for b in batches] == [0, 0, 0]
    for batch, expected in zip(batches, _collect(n, 128, seed=0), strict=True):
        np.testing.assert_array_equal(batch.indices, expected)
    assert [len(b.indices) for b in batches] == [128, 128, 44]


def test_driver_rejects_inconsistent_options() -> None:
    corpus = _corpus(10)
    with pytest.raises(ValueError):
        next(cmda.iter_offline_batches(10, **corpus, mode="reference_cma"))
    with pytest.raises(ValueError):
        next(cmda.iter_offline_batches(10, **{**corpus, "cluster_labels": None}, pool="cluster"))
    with pytest.raises(ValueError):
        next(cmda.iter_offline_batches(10, **corpus, class_labels=np.zeros(10, dtype=int)))


def _exactly(message: str) -> str:
    return f"^{re.escape(message)}$"


_CORPUS_10 = _corpus(10)
_NO_CLUSTERS = {**_CORPUS_10, "cluster_labels": None}


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (
            lambda: cmda.cmda_weights(Z_T, Z_S, mode="softmax"),
            "unknown CMDA weight mode 'softmax'; expected one of "
            "('rownorm_cra', 'reference_cra', 'reference_cma')",
        ),
        (
            lambda: cmda.cmda_weights(Z_T, Z_S, GROUPS, mode="reference_cma"),
            "reference_cma has no DCA mask: pass labels=None",
        ),
        (lambda: _collect(-1, 4, seed=0), "need n >= 0 and batch_size >= 1, got n=-1, batch_size=4"),
        (lambda: _collect(5, 0, seed=0), "need n >= 0 and batch_size >= 1, got n=5, batch_size=0"),
        (
            lambda: next(cmda.iter_offline_batches(10, **_CORPUS_10, pool="mixed")),
            'pool must be "batch" or "cluster", got \'mixed\'',
        ),
        (
            lambda: next(cmda.iter_offline_batches(10, **_NO_CLUSTERS, pool="cluster")),
            'pool="cluster" needs cluster_labels',
        ),
        (
            lambda: next(cmda.iter_offline_batches(10, **_CORPUS_10, mode="reference_cma")),
            "reference_cma has no DCA mask: pass cluster_labels=None",
        ),
        (
            lambda: next(cmda.iter_offline_batches(10, **_CORPUS_10, n_classes=3)),
            "class_labels and n_classes go together",
        ),
    ],
)
def test_invalid_arguments_raise_exact_messages(call: Callable[[], object], message: str) -> None:
    with pytest.raises(ValueError, match=_exactly(message)):
        call()


def test_responsibilities_with_unequal_covariances_match_the_densities_and_survive_far_points() -> None:
    from scipy.stats import multivariate_normal

    means = np.array([[0.0, 0.0], [3.0, 1.0]])
    covariances = np.array([[[1.0, 0.3], [0.3, 0.5]], [[4.0, -1.0], [-1.0, 2.0]]])
    weights = np.array([0.3, 0.7])
    f = np.array([[0.1, 0.2], [2.5, 1.5], [-1.0, 3.0]], dtype=np.float32)
    parts = zip(weights, means, covariances, strict=True)
    dens = np.stack([w * multivariate_normal(m, c).pdf(f) for w, m, c in parts], axis=1)
    gamma = cmda.gmm_responsibilities(f, weights, means, covariances)
    assert gamma.dtype == np.float64
    np.testing.assert_allclose(gamma, dens / dens.sum(axis=1, keepdims=True), rtol=1e-12)
    far = cmda.gmm_responsibilities(np.array([[300.0, 0.0]]), weights, means, covariances)
    np.testing.assert_allclose(far, [[0.0, 1.0]], atol=1e-12)  # densities underflow; the ratio does not
    with pytest.raises(ValueError):
        cmda.gmm_responsibilities(f, weights[:1], means, covariances)  # mismatched components


def test_responsibilities_normalise_each_row_by_its_own_scale() -> None:
    means = np.array([[0.0], [1.0]])
    covariances = np.array([[[1.0]], [[1.0]]])
    gamma = cmda.gmm_responsibilities(np.array([[0.5], [60.0]]), np.array([0.5, 0.5]), means, covariances)
    np.testing.assert_allclose(gamma, [[0.5, 0.5], [np.exp(-59.5), 1.0]], rtol=1e-9, atol=1e-30)
