"""Generated embeddings with known structure, for tests and benchmarks that need ground truth.

Real encoders (CLIP, MiniLM) give unit vectors that share a large common component (every caption is
somewhat like every other) and whose within-class spread is concentrated in a few directions. Both
traits matter to the methods: the common component shrinks the between-class angles, and anisotropic
noise puts noise directions among the leading principal components. The generators below reproduce
them with a seed, so a test knows the right answer: the classes (``clustered_embeddings``) or the exact
map from one modality to the other (``linear_pairs``).
"""

from __future__ import annotations

import numpy as np


def unit_rows(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Rows scaled to unit L2 norm (an all-zero row stays zero)."""
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), eps)


def _rotation(rng: np.random.Generator, dim: int) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(dim, dim)))
    return q * np.sign(np.diag(r))


def clustered_embeddings(
    n: int,
    dim: int,
    classes: int = 10,
    *,
    seed: int = 0,
    noise: float = 0.6,
    common: float = 1.0,
    decay: float = 0.5,
) -> tuple[np.ndarray, np.ndarray]:
    """(x, labels): ``n`` unit vectors in ``dim`` dims from ``classes`` balanced classes.

    A class centre is ``common · g + u_k`` (g shared by all, u_k a random unit vector), so two centres
    have cosine ≈ common²/(1 + common²). A sample is its centre plus noise of total norm ≈ ``noise``,
    whose variance along the i-th axis of a random rotation falls as i^(-2·decay) (0: isotropic), then
    normalised. Labels cycle through the classes, so every class has n/classes members (±1).
    """
    rng = np.random.default_rng(seed)
    shared = unit_rows(rng.normal(size=dim))
    centres = unit_rows(common * shared + unit_rows(rng.normal(size=(classes, dim))))
    scales = np.arange(1, dim + 1, dtype=np.float64) ** -decay
    scales *= noise / np.linalg.norm(scales)
    labels = np.arange(n) % classes
    spread = (rng.normal(size=(n, dim)) * scales) @ _rotation(rng, dim)
    return unit_rows(centres[labels] + spread).astype(np.float32), labels


def linear_pairs(
    n: int, cond_dim: int, target_dim: int, *, seed: int = 0, noise: float = 0.5
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(condition, target, A): unit conditions c and targets z = Normalize(cA + noise).

    A is a random (cond_dim × target_dim) map scaled so that |cA| ≈ 1 on average; the noise is
    isotropic with total norm ≈ ``noise``. The best prediction of z's direction from c is cA itself
    (the noise is symmetric about it), so E[cos(cA, z)] is the ceiling any translator can reach.
    """
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(cond_dim, target_dim))
    c = unit_rows(rng.normal(size=(n, cond_dim)))
    a /= np.sqrt(np.mean(np.sum((c @ a) ** 2, axis=1)))
    mean = c @ a
    z = unit_rows(mean + noise * rng.normal(size=(n, target_dim)) / np.sqrt(target_dim))
    return c.astype(np.float32), z.astype(np.float32), a
