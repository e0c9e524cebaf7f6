"""Mixup baselines against the METHODS §4 golden tests (C: m²-Mix, D: P-Mixup) and edge cases."""

from __future__ import annotations

import numpy as np
import pytest

from augpipe.methods import mixup

ATOL = 1e-6


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _reference_sph_inter(a: np.ndarray, b: np.ndarray, s: float) -> np.ndarray:
    """m²-Mix ``sph_inter`` as written (no clip): the defect the safe version fixes."""
    with np.errstate(invalid="ignore", divide="ignore"):
        theta = np.arccos(np.sum(a * b, axis=-1, keepdims=True))
        return np.sin(s * theta) / np.sin(theta) * a + np.sin((1 - s) * theta) / np.sin(theta) * b


# ---------------------------------------------------------------------------------- golden test C


def test_geodesic_orthogonal_golden() -> None:
    out = mixup.geodesic_mix(np.array([1.0, 0, 0]), np.array([0, 1.0, 0]), 0.3)
    np.testing.assert_allclose(out.mixed, [0.453990, 0.891007, 0.0], atol=ATOL)


def test_geodesic_golden_and_lambda_weights_a() -> None:
    a = np.array([1.0, 2.0, 2.0]) / 3
    b = np.array([0.0, 0.6, 0.8])
    out = mixup.geodesic_mix(a, b, 0.25)
    assert float(out.theta) == pytest.approx(0.367208, abs=ATOL)
    np.testing.assert_allclose(out.mixed, [0.085116, 0.624711, 0.776203], atol=ATOL)
    np.testing.assert_allclose(mixup.normalised_lerp(a, b, 0.25), [0.084395, 0.624523, 0.776434], atol=ATOL)
    np.testing.assert_allclose(mixup.geodesic_mix(a, b, 1.0).mixed, a, atol=1e-12)  # λ = 1 gives a
    np.testing.assert_allclose(mixup.geodesic_mix(a, b, 0.0).mixed, b, atol=1e-12)
    assert not out.antipodal


def test_geodesic_a_equals_b_is_a_where_the_reference_is_nan() -> None:
    a = np.array([[0.6, 0.8, 0.0]])
    assert np.all(np.isnan(_reference_sph_inter(a, a, 0.3)))
    out = mixup.geodesic_mix(a, a, 0.3)
    np.testing.assert_allclose(out.mixed, a, atol=1e-15)
    assert not out.antipodal.any()


def test_geodesic_cosine_rounding_above_one_is_nan_free() -> None:
    a = np.array([[0.33333333333333337, 0.6666666666666667, 0.6666666666666667]])  # (1, 2, 2)/3, normalised
    assert np.sum(a * a, axis=-1)[0] > 1.0  # rounding puts the cosine just above 1
    assert np.all(np.isnan(_reference_sph_inter(a, a, 0.7)))
    out = mixup.geodesic_mix(a, a, 0.7)
    assert np.all(np.isfinite(out.mixed))
    np.testing.assert_allclose(out.mixed, a, atol=1e-15)
    assert out.theta[0] == 0.0


def test_geodesic_antipodal_flag() -> None:
    a = _unit(np.array([[1.0, 2.0, 2.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]))
    b = np.array([-a[0], [1.0, 0.0, 0.0], a[2]])
    out = mixup.geodesic_mix(a, b, np.array([0.5, 0.5, 0.5]))
    np.testing.assert_array_equal(out.antipodal, [True, False, False])
    assert np.all(np.isfinite(out.mixed))
    np.testing.assert_allclose(np.linalg.norm(out.mixed, axis=1), 1.0)
    np.testing.assert_allclose(out.mixed[0], a[0])  # λ = ½ on an antipodal pair: a, by convention
    np.testing.assert_allclose(mixup.geodesic_mix(a[0], -a[0], 0.2).mixed, -a[0])  # lerp's limit


def test_geodesic_per_pair_lambda_and_float32() -> None:
    rng = np.random.default_rng(0)
    a = _unit(rng.standard_normal((5, 8))).astype(np.float32)
    b = _unit(rng.standard_normal((5, 8))).astype(np.float32)
    lam = np.linspace(0.1, 0.9, 5)
    out = mixup.geodesic_mix(a, b, lam)
    assert out.mixed.dtype == np.float32
    for i in range(5):
        np.testing.assert_allclose(out.mixed[i], mixup.geodesic_mix(a[i], b[i], lam[i]).mixed, atol=1e-7)
    np.testing.assert_allclose(np.linalg.norm(out.mixed, axis=1), 1.0, atol=1e-6)
    # on the geodesic: the angle to a is (1 − λ)θ
    cos_to_a = np.sum(out.mixed.astype(np.float64) * a, axis=1)
    np.testing.assert_allclose(np.arccos(np.clip(cos_to_a, -1, 1)), (1 - lam) * out.theta, atol=1e-3)


def _loss_pairs() -> tuple[np.ndarray, np.ndarray]:
    image = _unit(np.array([[1.0, 0.1, 0.0], [0.0, 1.0, 0.2], [0.3, 0.0, 1.0]]))
    text = _unit(np.array([[0.8, 0.3, 0.1], [0.1, 0.9, -0.2], [0.2, 0.2, 0.9]]))
    return image, text


@pytest.mark.parametrize(("tau2", "expected"), [(0.07, 0.000420), (1.0, 1.374140)])
def test_m2_loss_golden(tau2: float, expected: float) -> None:
    image, text = _loss_pairs()
    assert mixup.m2_loss(image, text, 0.5, tau2=tau2) == pytest.approx(expected, abs=ATOL)


def test_m2_loss_sums_two_directions() -> None:
    image, text = _loss_pairs()
    mixed = mixup.geodesic_mix(image, text, 0.5).mixed
    positive = np.sum(image * text, axis=1)
    directions = []
    for anchor in (image, text):
        logits = anchor @ mixed.T
        np.fill_diagonal(logits, positive)
        probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
        directions.append(-np.mean(np.log(np.diag(probs))))
    assert mixup.m2_loss(image, text, 0.5, tau2=1.0) == pytest.approx(sum(directions), abs=1e-12)


# ---------------------------------------------------------------------------------- mixup


def test_mix_pair_uses_y_j() -> None:
    x, y = mixup.mix_pair(
        np.array([1.0, 0.0]), np.array([0.0, 1.0]), np.array([1.0, 0.0]), np.array([0.0, 1.0]), 0.3
    )
    np.testing.assert_allclose(x, [0.3, 0.7])
    np.testing.assert_allclose(y, [0.3, 0.7])  # the slide's typo would give [1, 0]


def test_mixup_batch_is_seeded_and_consistent() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((16, 3, 2, 2))
    y = np.eye(4)[rng.integers(0, 4, size=16)]
    out = mixup.mixup_batch(x, y, 42)
    again = mixup.mixup_batch(x, y, 42)
    np.testing.assert_array_equal(out.x, again.x)
    assert not np.array_equal(out.x, mixup.mixup_batch(x, y, 43).x)
    ref = np.random.default_rng(42)
    np.testing.assert_array_equal(out.partner, ref.permutation(16))
    lam = ref.beta(0.25, 0.25)
    np.testing.assert_allclose(out.lam, lam)
    np.testing.assert_allclose(out.x, lam * x + (1 - lam) * x[out.partner])
    np.testing.assert_allclose(out.y, lam * y + (1 - lam) * y[out.partner])
    np.testing.assert_allclose(out.y.sum(axis=1), 1.0)


def test_mixup_per_sample_lambda() -> None:
    x = np.arange(20.0).reshape(10, 2)
    y = np.eye(10)
    out = mixup.mixup_batch(x, y, 0, per_sample=True, alpha=1.0)
    assert len(set(out.lam.tolist())) == 10
    np.testing.assert_allclose(out.x, out.lam[:, None] * x + (1 - out.lam[:, None]) * x[out.partner])


def test_beta_025_is_u_shaped() -> None:
    lam = np.array([mixup.mixup_batch(np.zeros((2, 1)), np.zeros((2, 1)), s).lam[0] for s in range(400)])
    assert np.mean((lam < 0.1) | (lam > 0.9)) > 0.5  # Beta(0.25, 0.25) piles up at the ends


# ---------------------------------------------------------------------------------- golden test D


def test_pmixup_schedule_golden() -> None:
    lam = mixup.pmixup_schedule(np.array([0.5, 0.4, 0.3, 0.2, 0.1]), np.array([0.5, 0.6, 0.7, 0.8, 0.9]))
    np.testing.assert_allclose(lam, [0.199991, 0.399933, 0.599504, 0.796328, 0.972436], atol=ATOL)


def test_pmixup_constant_distances_golden() -> None:
    assert float(mixup.pmixup_q(0.05, 1.0)) == pytest.approx(0.385821, abs=ATOL)
    lam = mixup.pmixup_schedule(np.full(5, 0.05), np.full(5, 1.0))
    np.testing.assert_allclose(lam, [0.122836, 0.293064, 0.481578, 0.677146, 0.875436], atol=ATOL)


def test_pmixup_step_and_bad_distances() -> None:
    assert mixup.pmixup_step(0.5, 2, 4, 0.25) == pytest.approx(2 * 0.75 / 4 + 0.25 * 0.5)
    with pytest.raises(ValueError):
        mixup.pmixup_q(0.0, 0.0)
    with pytest.raises(ValueError):
        mixup.pmixup_schedule(np.ones(3), np.ones(3), n_total=2)


def test_pmixup_jitter_range_clamp_and_seed() -> None:
    lam = np.array([0.0, 0.5, 0.95] * 200)
    out = mixup.pmixup_jitter(lam, 3)
    np.testing.assert_array_equal(out, mixup.pmixup_jitter(lam, 3))
    assert np.all(out >= np.maximum(lam - 0.2, 0)) and np.all(out <= np.minimum(lam + 0.2, 1))
    assert np.any(out[0::3] == 0.0) and np.any(out[2::3] == 1.0)  # clamped at both ends
    assert np.std(out[1::3]) > 0.05


# ---------------------------------------------------------------------------------- RecursiveMix


def test_recursive_mix_box_lambda_is_the_uncovered_fraction() -> None:
    for seed in range(50):
        box = mixup.recursive_mix_box(32, 24, seed)
        assert 0 <= box.top <= box.bottom <= 32 and 0 <= box.left <= box.right <= 24
        area = (box.bottom - box.top) * (box.right - box.left)
        assert box.lam == pytest.approx(1 - area / (32 * 24))
        assert box.lam >= 0.5 - 1e-12  # area ratio is at most α = 0.5


def test_recursive_mix_pastes_resized_previous_batch() -> None:
    x = np.zeros((2, 1, 8, 8))
    old_x = np.arange(2 * 16, dtype=float).reshape(2, 1, 4, 4)
    y, old_y = np.eye(2), np.eye(2)[::-1]
    box = mixup.RecursiveMixBox(top=2, left=0, bottom=6, right=8, lam=0.5)
    out_x, out_y = mixup.recursive_mix(x, y, old_x, old_y, box)
    np.testing.assert_array_equal(out_x[:, :, :2], 0.0)
    np.testing.assert_array_equal(out_x[0, 0, 2:6, ::2], old_x[0, 0])  # rows 1:1, columns doubled
    np.testing.assert_array_equal(out_x[0, 0, 2:6, 1::2], old_x[0, 0])
    np.testing.assert_allclose(out_y, [[0.5, 0.5], [0.5, 0.5]])
    assert np.all(x == 0)  # the input is not modified


# ------------------------------------------------------------------ boundaries the golden values miss


def _reference_rand_bbox(height, width, seed, alpha):
    """CutMix's ``rand_bbox`` as RecursiveMix's ``utils.py`` has it, written out with np.clip."""
    rng = np.random.default_rng(seed)
    ratio = np.sqrt(rng.uniform(0.0, alpha))
    cut_h, cut_w = int(height * ratio), int(width * ratio)
    cy, cx = int(rng.integers(height)), int(rng.integers(width))
    box = (
        int(np.clip(cy - cut_h // 2, 0, height)),
        int(np.clip(cx - cut_w // 2, 0, width)),
        int(np.clip(cy + cut_h // 2, 0, height)),
        int(np.clip(cx + cut_w // 2, 0, width)),
    )
    return box


@pytest.mark.parametrize(("height", "width"), [(32, 32), (17, 40), (40, 9)])
def test_recursive_mix_box_is_the_reference_box_and_lambda_is_its_exact_area(height, width):
    boxes = set()
    for seed in range(200):
        box = mixup.recursive_mix_box(height, width, seed, alpha=0.9)
        assert (box.top, box.left, box.bottom, box.right) == _reference_rand_bbox(height, width, seed, 0.9)
        assert box.lam == 1.0 - (box.bottom - box.top) * (box.right - box.left) / (height * width)
        assert box == mixup.recursive_mix_box(height, width, seed, alpha=0.9)
        boxes.add(box)
    assert len(boxes) > 150  # the seed matters


def test_resize_nearest_matches_torch_on_non_square_shapes():
    import torch

    x = np.arange(2 * 3 * 5 * 7, dtype=np.float32).reshape(2, 3, 5, 7)
    for height, width in [(3, 11), (9, 4), (5, 7), (1, 2)]:
        expected = torch.nn.functional.interpolate(torch.from_numpy(x), size=(height, width), mode="nearest")
        np.testing.assert_array_equal(mixup._resize_nearest(x, height, width), expected.numpy())


def test_recursive_mix_pastes_into_an_offset_box_from_a_larger_history():
    x = np.zeros((2, 1, 6, 8))
    old = np.ones((3, 1, 4, 4))  # the previous batch had more rows: its first two are used
    y, old_y = np.eye(2), np.eye(2)[::-1].repeat(2, axis=0)[:3]
    box = mixup.RecursiveMixBox(top=1, left=3, bottom=2, right=7, lam=1 - 4 / 48)
    mixed, labels = mixup.recursive_mix(x, y, old, old_y, box)
    assert mixed[:, :, 1, 3:7].min() == 1 and mixed.sum() == 2 * 4  # one row of four pixels per sample
    assert not x.any()  # the input batch is not modified
    np.testing.assert_allclose(labels, box.lam * y + (1 - box.lam) * old_y[:2])
    for empty in (mixup.RecursiveMixBox(2, 3, 2, 7, 1.0), mixup.RecursiveMixBox(1, 3, 2, 3, 1.0)):
        unchanged, _ = mixup.recursive_mix(x, y, old, old_y, empty)
        assert not unchanged.any()


def test_pmixup_q_accepts_one_zero_distance_and_refuses_negatives():
    assert mixup.pmixup_q(0.0, 1.0) == 1.0  # the mix is the source: q = 1
    assert mixup.pmixup_q(1.0, 0.0) == pytest.approx(np.exp(-20))
    for d_s, d_t in [(-0.1, 1.0), (1.0, -0.1), (0.0, 0.0)]:
        with pytest.raises(ValueError, match=r"^distances must be non-negative and not both zero$"):
            mixup.pmixup_q(d_s, d_t)


def test_pmixup_schedule_uses_its_temperature_and_bounds_the_iterations():
    d_s, d_t = np.array([0.2, 0.1]), np.array([1.0, 1.0])
    warm = mixup.pmixup_schedule(d_s, d_t, temperature=1.0)
    q = np.exp(-d_s / (d_s + d_t))
    np.testing.assert_allclose(warm, [(1 - q[0]) / 2, 2 * (1 - q[1]) / 2 + q[1] * (1 - q[0]) / 2])
    with pytest.raises(ValueError, match=r"^2 iterations exceed n_total=1$"):
        mixup.pmixup_schedule(d_s, d_t, n_total=1)


def test_logsumexp_rows_shifts_each_row_by_its_own_maximum():
    logits = np.array([[0.0, 0.0], [-1000.0, -1000.0]])
    np.testing.assert_allclose(mixup._logsumexp_rows(logits), [np.log(2), -1000 + np.log(2)])


def test_m2_loss_default_temperature_is_the_reference_0_07():
    rng = np.random.default_rng(0)
    image = rng.normal(size=(4, 3))
    text = rng.normal(size=(4, 3))
    image /= np.linalg.norm(image, axis=1, keepdims=True)
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    assert mixup.m2_loss(image, text, 0.3) == mixup.m2_loss(image, text, 0.3, tau2=0.07)
    assert mixup.m2_loss(image, text, 0.3) != mixup.m2_loss(image, text, 0.3, tau2=1.07)


def test_recursive_mix_pastes_a_box_one_pixel_wide():
    x, old = np.zeros((1, 1, 4, 4)), np.ones((1, 1, 4, 4))
    box = mixup.RecursiveMixBox(top=0, left=2, bottom=4, right=3, lam=0.75)
    mixed, _ = mixup.recursive_mix(x, np.eye(2)[:1], old, np.eye(2)[1:], box)
    assert mixed.sum() == 4 and mixed[0, 0, :, 2].min() == 1


# ------------------------------------------------------------- dtypes, rounding and exact thresholds


def test_mix_pair_integer_lambda_and_pixels_mix_as_float():
    """λ = 0 or 1 given as an int still mixes as a float: uint8 pixels come back float64, not int64."""
    x_i, x_j = np.array([[0, 255], [7, 9]], dtype=np.uint8), np.array([[255, 1], [3, 4]], dtype=np.uint8)
    y_i, y_j = np.array([[1, 0], [1, 0]]), np.array([[0, 1], [0, 1]])
    for lam, rows in [(1, [0, 0]), (0, [1, 1]), (np.array([1, 0]), [0, 1])]:
        x, y = mixup.mix_pair(x_i, x_j, y_i, y_j, lam)
        assert x.dtype == np.float64 and y.dtype == np.float64
        np.testing.assert_array_equal(x, [(x_i, x_j)[r][k] for k, r in enumerate(rows)])
        np.testing.assert_array_equal(y, [(y_i, y_j)[r][k] for k, r in enumerate(rows)])
    x, _ = mixup.mix_pair(x_i, x_j, y_i, y_j, 0.5)
    np.testing.assert_array_equal(x, [[127.5, 128.0], [5.0, 6.5]])  # no integer truncation


def test_geodesic_mix_returns_the_wider_float_type_of_its_inputs():
    """The output dtype is np.result_type(a, b, float32): float64 on either side wins over float32, and
    integer (one-hot) axes mix to floats rather than being truncated to zeros."""
    a, b = np.array([1.0, 0.0, 0.0]), np.array([0.0, 1.0, 0.0])
    golden = [0.453990, 0.891007, 0.0]
    for x, y in [(a, b.astype(np.float32)), (a.astype(np.float32), b)]:
        mixed = mixup.geodesic_mix(x, y, 0.3).mixed
        assert mixed.dtype == np.float64
        np.testing.assert_allclose(mixed, golden, atol=ATOL)
    for dtype, expected in [(np.int64, np.float64), (np.int8, np.float32)]:
        mixed = mixup.geodesic_mix(a.astype(dtype), b.astype(dtype), 0.3).mixed
        assert mixed.dtype == expected
        np.testing.assert_allclose(mixed, golden, atol=ATOL)


def test_geodesic_cosine_rounding_below_minus_one_is_flagged_antipodal_not_nan():
    a = np.array([[0.33333333333333337, 0.6666666666666667, 0.6666666666666667]])  # (1, 2, 2)/3, normalised
    assert np.sum(a * -a, axis=-1)[0] < -1.0  # rounding puts the cosine just below −1
    assert np.all(np.isnan(_reference_sph_inter(a, -a, 0.3)))
    out = mixup.geodesic_mix(a, -a, 0.3)
    assert out.antipodal[0] and out.theta[0] == np.pi
    np.testing.assert_allclose(out.mixed, -a, atol=1e-15)  # the lerp's limit at λ < ½


def test_geodesic_sin_exactly_sin_eps_takes_the_slerp():
    """The fallback is for sin θ < sin_eps (METHODS: "if sinθ < 1e-7"): sin θ = sin_eps still slerps."""
    a, b = np.array([1.0, 0.0, 0.0]), np.array([0.0, 1.0, 0.0])  # θ = π/2: sin θ is exactly 1
    np.testing.assert_allclose(
        mixup.geodesic_mix(a, b, 0.3, sin_eps=1.0).mixed, [0.453990, 0.891007, 0.0], atol=ATOL
    )
    above = mixup.geodesic_mix(a, b, 0.3, sin_eps=np.nextafter(1.0, 2.0)).mixed
    np.testing.assert_allclose(above, mixup.normalised_lerp(a, b, 0.3), atol=1e-15)


def test_normalised_lerp_falls_back_to_a_when_the_norm_is_at_most_eps():
    a, b = np.array([1.0, 0.0]), np.array([-1.0, 0.0])  # λ = ¼: the lerp is (−½, 0), of norm ½ exactly
    np.testing.assert_array_equal(mixup.normalised_lerp(a, b, 0.25, eps=0.5), a)
    np.testing.assert_array_equal(mixup.normalised_lerp(a, b, 0.25, eps=np.nextafter(0.5, 0.0)), b)


def test_geodesic_degenerate_pairs_compute_without_floating_point_errors():
    """sin θ = 0 for a = b: the slerp must not divide 0/0, which raises under np.errstate(all="raise")."""
    a = np.array([[0.6, 0.8, 0.0]])
    with np.errstate(all="raise"):
        same = mixup.geodesic_mix(a, a, 0.3)
        opposite = mixup.geodesic_mix(a, -a, 0.5)
    np.testing.assert_allclose(same.mixed, a, atol=1e-15)
    np.testing.assert_allclose(opposite.mixed, a, atol=1e-15)


def test_geodesic_antipodal_flag_needs_an_obtuse_pair():
    """Only degenerate pairs with a·b < 0 are flagged, not nearly parallel or orthogonal degenerate ones."""
    theta = 3e-8
    a, b = np.array([1.0, 0.0, 0.0]), np.array([np.cos(theta), np.sin(theta), 0.0])  # a·b rounds below 1
    out = mixup.geodesic_mix(a, b, 0.4)
    assert 0.0 < out.theta < 1e-7 and not out.antipodal  # degenerate (sin θ < 1e-7), yet not antipodal
    acute_orthogonal_obtuse = np.array([[0.6, 0.8, 0.0], [0.0, 1.0, 0.0], [-0.6, 0.8, 0.0]])
    out = mixup.geodesic_mix(np.tile(a, (3, 1)), acute_orthogonal_obtuse, 0.5, sin_eps=1.5)  # all degenerate
    np.testing.assert_array_equal(out.antipodal, [False, False, True])
