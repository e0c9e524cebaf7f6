"""Mixup baselines (METHODS §4): mixup, m²-Mix geodesic mixup and its loss, P-Mixup's λ schedule and
RecursiveMix's box.

Each function fixes the defect METHODS names for it:

- mixup: ỹ = λy_i + (1−λ)y_j (the slide's Eq. 2 says y_i twice);
- geodesic mixup: the cosine is clipped to [−1, 1] and a near-zero sin θ falls back to a normalised lerp
  (the reference ``sph_inter`` returns NaN for a = b and for |a·b| > 1 from rounding); antipodal pairs,
  where the geodesic is undefined, are flagged;
- P-Mixup has no code: the schedule is the paper's formula, with the distances supplied by the caller.

Random draws take a ``numpy.random.Generator`` or an int seed (``np.random.default_rng`` accepts both),
so every draw is reproducible. Pure numpy; no torch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SeedLike = int | np.random.Generator


# ----------------------------------------------------------------------------------------------------
# mixup
# ----------------------------------------------------------------------------------------------------


def _per_row(lam: np.ndarray, ndim: int) -> np.ndarray:
    """λ of shape (n,) reshaped to broadcast over rows of an n×… array."""
    return lam.reshape(lam.shape + (1,) * (ndim - 1))


def mix_pair(
    x_i: np.ndarray, x_j: np.ndarray, y_i: np.ndarray, y_j: np.ndarray, lam: float | np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """x̃ = λx_i + (1−λ)x_j and ỹ = λy_i + (1−λ)y_j, with y_j where the slide's Eq. 2 repeats y_i.

    ``lam`` is a scalar, or one value per row of the batch (shape (n,)).
    """
    x_i, x_j, y_i, y_j = (np.asarray(v) for v in (x_i, x_j, y_i, y_j))
    lam = np.asarray(lam, dtype=np.float64)
    lam_x = _per_row(lam, x_i.ndim) if lam.ndim else lam
    lam_y = _per_row(lam, y_i.ndim) if lam.ndim else lam
    return lam_x * x_i + (1 - lam_x) * x_j, lam_y * y_i + (1 - lam_y) * y_j


@dataclass(frozen=True, eq=False)
class MixupBatch:
    """Mixed samples and their lineage: output i = mix of (i, ``partner[i]``) with weight ``lam[i]``."""

    x: np.ndarray
    y: np.ndarray
    partner: np.ndarray
    lam: np.ndarray


def mixup_batch(
    x: np.ndarray,
    y: np.ndarray,
    seed: SeedLike,
    *,
    alpha: float = 0.25,
    per_sample: bool = False,
) -> MixupBatch:
    """Mixup of a batch with a seeded shuffle of itself, λ ~ Beta(α, α) (α = 0.25: CMDA's baseline).

    ``y`` holds one-hot or soft labels (n×C). One λ per batch, as in the reference training loops,
    unless ``per_sample``. The partner permutation is drawn before λ.
    """
    x = np.asarray(x)
    y = np.asarray(y)
    rng = np.random.default_rng(seed)
    partner = rng.permutation(x.shape[0])
    lam = rng.beta(alpha, alpha, size=x.shape[0] if per_sample else None)
    lam = np.broadcast_to(np.asarray(lam, dtype=np.float64), (x.shape[0],))
    x_mix, y_mix = mix_pair(x, x[partner], y, y[partner], lam)
    return MixupBatch(x=x_mix, y=y_mix, partner=partner, lam=np.array(lam))


# ----------------------------------------------------------------------------------------------------
# m²-Mix: geodesic mixup on the hypersphere, and its contrastive loss
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class GeodesicMix:
    """Mixed unit vectors, the angle θ between each pair, and which pairs were (nearly) antipodal."""

    mixed: np.ndarray
    theta: np.ndarray
    antipodal: np.ndarray


def _lam_column(lam: float | np.ndarray) -> np.ndarray:
    """λ as float64, with a trailing axis when it is given per pair, to broadcast over the vector axis."""
    lam = np.asarray(lam, dtype=np.float64)
    return lam[..., None] if lam.ndim else lam


def normalised_lerp(
    a: np.ndarray, b: np.ndarray, lam: float | np.ndarray, *, eps: float = 1e-12
) -> np.ndarray:
    """(λa + (1−λ)b) / ‖λa + (1−λ)b‖ over the last axis; ``a`` where the lerp vanishes.

    The lerp vanishes only for an antipodal pair at λ = ½, where every great circle through a and b is
    a geodesic; ``a`` is then as good an answer as any, and it keeps the output finite and on the sphere.
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    lerp = _lam_column(lam) * a + (1 - _lam_column(lam)) * b
    norm = np.linalg.norm(lerp, axis=-1, keepdims=True)
    ok = norm > eps
    return np.where(ok, lerp / np.where(ok, norm, 1.0), a)


def geodesic_mix(
    a: np.ndarray, b: np.ndarray, lam: float | np.ndarray, *, sin_eps: float = 1e-7
) -> GeodesicMix:
    """mix_λ(a, b) = [a·sin(λθ) + b·sin((1−λ)θ)] / sin θ, θ = arccos(a·b), over the last axis.

    METHODS convention: **λ weights a** (λ = 1 gives a), the reverse of the usual slerp(a, b, t); this
    is ``sph_inter`` of m²-Mix (``main.py`` L108–111). Inputs are unit vectors. The cosine is clipped
    to [−1, 1] and where sin θ < ``sin_eps`` the result is ``normalised_lerp``, so a = b gives a and
    rounding never gives NaN. Pairs with sin θ < ``sin_eps`` and a·b < 0 are flagged ``antipodal``:
    their geodesic is undefined and callers should drop or re-pair them.
    ``lam`` is a scalar or one value per pair. Computed in float64, returned in the inputs' float type.
    """
    a = np.asarray(a)
    b = np.asarray(b)
    out_dtype = np.result_type(a, b, np.float32)
    a64 = a.astype(np.float64)
    b64 = b.astype(np.float64)
    lam_col = _lam_column(lam)
    cos = np.clip(np.sum(a64 * b64, axis=-1, keepdims=True), -1.0, 1.0)
    theta = np.arccos(cos)
    sin = np.sin(theta)
    degenerate = sin < sin_eps
    safe_sin = np.where(degenerate, 1.0, sin)
    slerp = (np.sin(lam_col * theta) * a64 + np.sin((1 - lam_col) * theta) * b64) / safe_sin
    mixed = np.where(degenerate, normalised_lerp(a64, b64, lam), slerp)
    return GeodesicMix(
        mixed=mixed.astype(out_dtype),
        theta=theta[..., 0],
        antipodal=(degenerate & (cos < 0))[..., 0],
    )


def _logsumexp_rows(logits: np.ndarray) -> np.ndarray:
    top = logits.max(axis=1, keepdims=True)
    return top[:, 0] + np.log(np.exp(logits - top).sum(axis=1))


def m2_loss(image: np.ndarray, text: np.ndarray, lam: float, *, tau2: float = 0.07) -> float:
    """m²-Mix contrastive loss, as the code computes it (METHODS §4; ``main.py`` mmmix branch).

    Negatives are the geodesic mixes m_j = mix_λ(I_j, T_j) (λ weights the image); the diagonal keeps
    the true pair I_i·T_i. Both directions (image rows I_i·m_j, text rows T_i·m_j) use temperature
    τ2 and are **summed** (``clip_loss2``), not halved as in the paper's Eq. 5. Inputs: n×d unit rows.
    """
    image = np.asarray(image, dtype=np.float64)
    text = np.asarray(text, dtype=np.float64)
    mixed = geodesic_mix(image, text, lam).mixed.astype(np.float64)
    positive = np.sum(image * text, axis=1)
    total = 0.0
    for anchor in (image, text):
        logits = anchor @ mixed.T
        np.fill_diagonal(logits, positive)
        logits /= tau2
        total += float(np.mean(_logsumexp_rows(logits) - positive / tau2))
    return total


# ----------------------------------------------------------------------------------------------------
# P-Mixup: progressive λ schedule
# ----------------------------------------------------------------------------------------------------


def pmixup_q(
    d_source: float | np.ndarray, d_target: float | np.ndarray, *, temperature: float = 0.05
) -> np.ndarray:
    """q = exp(−d_s / ((d_s + d_t)·T)), d_s = d_w(G_s, G_mix), d_t = d_w(G_t, G_mix) (METHODS §4).

    With T = 0.05, q ≈ 0 unless d_s ≪ d_t. The Wasserstein estimator is the caller's (unspecified).
    """
    d_s = np.asarray(d_source, dtype=np.float64)
    d_t = np.asarray(d_target, dtype=np.float64)
    if np.any(d_s < 0) or np.any(d_t < 0) or np.any(d_s + d_t <= 0):
        raise ValueError("distances must be non-negative and not both zero")
    return np.exp(-d_s / ((d_s + d_t) * temperature))


def pmixup_step(lam_prev: float, n: int, n_total: int, q: float) -> float:
    """λ_n = n(1−q)/N + qλ_{n−1}: one step of the progressive schedule (iteration n of N, 1-based)."""
    return n * (1 - q) / n_total + q * lam_prev


def pmixup_schedule(
    d_source: np.ndarray,
    d_target: np.ndarray,
    *,
    n_total: int | None = None,
    temperature: float = 0.05,
    lam0: float = 0.0,
) -> np.ndarray:
    """λ_1 … λ_len(d) from the distances measured at each iteration; N defaults to len(d), λ_0 = 0."""
    q = np.atleast_1d(pmixup_q(d_source, d_target, temperature=temperature))
    n_total = q.shape[0] if n_total is None else n_total
    if q.shape[0] > n_total:
        raise ValueError(f"{q.shape[0]} iterations exceed n_total={n_total}")
    lam = []
    prev = lam0
    for n, q_n in enumerate(q, start=1):
        prev = pmixup_step(prev, n, n_total, float(q_n))
        lam.append(prev)
    return np.array(lam)


def pmixup_jitter(lam: float | np.ndarray, seed: SeedLike, *, sigma: float = 0.2) -> np.ndarray:
    """λ̃ = clamp(U(λ − σ, λ + σ), 0, 1), σ = 0.2 (METHODS §4)."""
    lam = np.asarray(lam, dtype=np.float64)
    rng = np.random.default_rng(seed)
    return np.clip(rng.uniform(lam - sigma, lam + sigma), 0.0, 1.0)


# ----------------------------------------------------------------------------------------------------
# RecursiveMix
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RecursiveMixBox:
    """Paste box [top:bottom, left:right] and λ = 1 − box area / image area (the lineage of a step)."""

    top: int
    left: int
    bottom: int
    right: int
    lam: float


def recursive_mix_box(height: int, width: int, seed: SeedLike, *, alpha: float = 0.5) -> RecursiveMixBox:
    """A box of area ratio U(0, α) centred uniformly, clipped to the image (``utils.py`` ``rand_bbox``).

    As in the reference, the side is int(size·√r), the box spans centre ± side//2 and λ is computed
    from the clipped box, so λ is exact for the pixels actually pasted.
    """
    rng = np.random.default_rng(seed)
    ratio = np.sqrt(rng.uniform(0.0, alpha))
    cut_h, cut_w = int(height * ratio), int(width * ratio)
    cy, cx = int(rng.integers(height)), int(rng.integers(width))
    top, bottom = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, height)
    left, right = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, width)
    lam = 1.0 - (bottom - top) * (right - left) / (height * width)
    return RecursiveMixBox(top=top, left=left, bottom=bottom, right=right, lam=lam)


def _resize_nearest(x: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest-neighbour resize of the last two axes, with torch's ``mode="nearest"`` index rule."""
    rows = np.minimum((np.arange(height) * (x.shape[-2] / height)).astype(np.int64), x.shape[-2] - 1)
    cols = np.minimum((np.arange(width) * (x.shape[-1] / width)).astype(np.int64), x.shape[-1] - 1)
    return x[..., rows[:, None], cols[None, :]]


def recursive_mix(
    x: np.ndarray, y: np.ndarray, old_x: np.ndarray, old_y: np.ndarray, box: RecursiveMixBox
) -> tuple[np.ndarray, np.ndarray]:
    """Paste the previous mixed batch, resized into ``box``, and mix labels y = λy + (1−λ)y_old.

    ``x`` is N×C×H×W; the first N rows of the previous batch are used, as in the reference. An empty
    box leaves the batch unchanged (λ = 1). The ROI consistency loss is a training term, not here.
    """
    x = np.array(x, copy=True)
    n = x.shape[0]
    h, w = box.bottom - box.top, box.right - box.left
    if h > 0 and w > 0:
        x[:, :, box.top : box.bottom, box.left : box.right] = _resize_nearest(np.asarray(old_x)[:n], h, w)
    return x, box.lam * np.asarray(y) + (1 - box.lam) * np.asarray(old_y)[:n]
