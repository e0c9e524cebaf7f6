"""CMDA, cross-modal data augmentation, in its offline form (METHODS §2).

Each teacher "anchor" i gets a new raw student-space sample x_new,i = Σ_j W_ij x̂_j, a mix of the
student samples of its mini-batch weighted by cross-modal affinity and restricted to its cluster.

The paper's formulas are ill-posed in several places; each function follows the resolution chosen in
METHODS §2.2 and names the reference-code defect it reproduces or fixes:

- inter-modal affinity A_ij = |cos(t_i, ẑ_j)|, rows = teacher, columns = student (§2.2-b, the code's
  form; the paper's raw dot products can sum to ≈ 0 and flip sign);
- DCA as a hard same-cluster mask with the self-weight A_ii := 1 (§2.2-d, ``trainers.py`` L281–282);
- three weight modes, named as the lineage ``variant`` of §2.1:

  ``rownorm_cra`` (default)   A_ii := 1, mask, W_ij = A_ij / Σ_k A_ik (the fix commented out at L286);
  ``reference_cra``           A_ii := 1, mask, W_ij = A_ij / Σ_k A_jk (the (B,B)/(B,) broadcast bug);
  ``reference_cma``           no DCA: no mask, no diagonal change, the broadcast bug (``ssl_with_CMA``
                              and the text trainer, the code paths the reference actually runs, §2.2-i).

The paper-literal soft DCA (garbled Eq. 11 with GMM responsibilities, Alg. 1 without normalisation) is
kept as separate functions so the §2.5 golden values can be reproduced; it is not used for generation.

The offline driver streams index batches through a seeded permutation that is computed per batch, so
its memory grows with the batch size B and never with the corpus: rows are fetched by index from arrays
(or memory maps) or from a callable.

Pure numpy; no torch, no I/O. The GMM and its BIC selection live in ``augpipe.methods.gmm`` (``fit_gmm``,
``select_gmm_bic`` and ``GmmSelection`` are re-exported here).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal, get_args

import numpy as np

from augpipe.methods.gmm import GmmSelection as GmmSelection
from augpipe.methods.gmm import fit_gmm as fit_gmm
from augpipe.methods.gmm import select_gmm_bic as select_gmm_bic

WeightMode = Literal["rownorm_cra", "reference_cra", "reference_cma"]
WEIGHT_MODES: tuple[str, ...] = get_args(WeightMode)
_MODE_ALIASES = {"rownorm": "rownorm_cra"}

Pool = Literal["batch", "cluster"]

RowSource = np.ndarray | Callable[[np.ndarray], np.ndarray]
"""Rows by corpus index: an array (or ``np.memmap``) indexed as ``source[idx]``, or ``fetch(idx)``."""

EPS = 1e-12
_FEISTEL_ROUNDS = 4


# ----------------------------------------------------------------------------------------------------
# Weights
# ----------------------------------------------------------------------------------------------------


def _float_dtype(*arrays: np.ndarray) -> np.dtype:
    """float32 stays float32 (throughput), everything else computes in float64."""
    return np.result_type(*arrays, np.float32)


def _unit_rows(x: np.ndarray, eps: float) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, eps)


def abs_cosine_affinity(teacher: np.ndarray, student: np.ndarray, *, eps: float = EPS) -> np.ndarray:
    """A_ij = |cos(t_i, ẑ_j)|, rows = teacher, columns = student (METHODS §2.2-b).

    The absolute value is the reference's (``trainers.py`` L130–135): an anti-aligned student sample
    weighs as much as an aligned one. A zero vector has zero affinity to everything instead of NaN.
    """
    teacher = np.asarray(teacher)
    student = np.asarray(student)
    dtype = _float_dtype(teacher, student)
    t = _unit_rows(teacher.astype(dtype, copy=False), eps)
    z = _unit_rows(student.astype(dtype, copy=False), eps)
    return np.abs(t @ z.T)


def same_cluster_mask(labels: np.ndarray) -> np.ndarray:
    """M_ij = 1[c_i = c_j], the hard DCA mask (METHODS §2.2-d; ``trainers.py`` L227)."""
    labels = np.asarray(labels).reshape(-1)
    return labels[:, None] == labels[None, :]


def _row_normalise(a: np.ndarray, eps: float) -> np.ndarray:
    """W_ij = A_ij / Σ_k A_ik, the intended normalisation (§2.2-c), with ε for an all-zero row."""
    return a / np.maximum(a.sum(axis=1, keepdims=True), eps)


def _reference_normalise(a: np.ndarray, eps: float) -> np.ndarray:
    """W_ij = A_ij / Σ_k A_jk: ``cor / torch.sum(cor, dim=1)`` broadcasts (B,) along columns (§2.2-c).

    Column j is scaled by teacher j's row sum, so a zero teacher vector (row sum 0) would scale every
    anchor's weight on student j by 1/ε (≈ 4e11 with ε = 1e-12). Such a column gets weight 0 instead:
    a teacher without a direction vouches for nothing. (The stage fails that sample before it gets here.)
    """
    sums = a.sum(axis=1)
    scale = np.divide(1.0, sums, out=np.zeros_like(sums), where=sums > eps)
    return a * scale[None, :]


def resolve_mode(mode: str) -> WeightMode:
    """Canonical weight-mode name; ``"rownorm"`` is accepted for ``"rownorm_cra"``."""
    mode = _MODE_ALIASES.get(mode, mode)
    if mode not in WEIGHT_MODES:
        raise ValueError(f"unknown CMDA weight mode {mode!r}; expected one of {WEIGHT_MODES}")
    return mode  # type: ignore[return-value]


def cmda_weights(
    teacher: np.ndarray,
    student: np.ndarray,
    labels: np.ndarray | None = None,
    *,
    mode: str = "rownorm_cra",
    eps: float = EPS,
) -> np.ndarray:
    """Mixing weights W (B×B) for one batch; row i mixes the student samples for teacher anchor i.

    ``labels`` are the cluster labels of the batch members; ``None`` means one cluster (M* = 1, an
    all-ones mask). ``reference_cma`` has no DCA, so it refuses labels rather than silently ignore them.
    Rows sum to 1 only in ``rownorm_cra``; the reference modes keep the bug that scales the output.
    """
    mode = resolve_mode(mode)
    a = abs_cosine_affinity(teacher, student, eps=eps)
    if mode == "reference_cma":
        if labels is not None:
            raise ValueError("reference_cma has no DCA mask: pass labels=None")
        return _reference_normalise(a, eps)
    np.fill_diagonal(a, 1.0)  # A_ii := 1 (trainers.py L281); the first commit used 10 and no mask
    if labels is not None:
        a *= same_cluster_mask(labels)
    if mode == "rownorm_cra":
        return _row_normalise(a, eps)
    return _reference_normalise(a, eps)


def generate(weights: np.ndarray, x_student: np.ndarray) -> np.ndarray:
    """x_new,i = Σ_j W_ij x̂_j (METHODS §2.2-h) for raw student samples of any trailing shape."""
    x_student = np.asarray(x_student)
    flat = x_student.reshape(x_student.shape[0], -1)
    return (np.asarray(weights) @ flat).reshape((weights.shape[0], *x_student.shape[1:]))


def soft_labels(
    weights: np.ndarray, class_labels: np.ndarray, n_classes: int, *, eps: float = EPS
) -> np.ndarray:
    """ỹ_i = Σ_j W_ij onehot(y_j), renormalised to sum to 1 (METHODS §2.2-j, optional label policy).

    Renormalising makes the reference modes, whose rows do not sum to 1, give proper distributions.
    """
    class_labels = np.asarray(class_labels).reshape(-1)
    onehot = np.zeros((class_labels.shape[0], n_classes), dtype=weights.dtype)
    onehot[np.arange(class_labels.shape[0]), class_labels] = 1.0
    return _row_normalise(weights @ onehot, eps)


# ----------------------------------------------------------------------------------------------------
# Paper-literal soft DCA (Eq. 11 read literally, Alg. 1), for the golden test only
# ----------------------------------------------------------------------------------------------------


def gmm_responsibilities(
    features: np.ndarray, mix_weights: np.ndarray, means: np.ndarray, covariances: np.ndarray
) -> np.ndarray:
    """γ_i(h) = α_h φ(f_i|θ_h) / Σ_h' α_h' φ(f_i|θ_h') for a given full-covariance GMM.

    Computed in log space so far-away points do not underflow to 0/0. For a fitted scikit-learn model
    this equals ``model.predict_proba(features)``.
    """
    f = np.asarray(features, dtype=np.float64)
    d = f.shape[1]
    log_p = np.empty((f.shape[0], len(mix_weights)))
    for h, (alpha, mean, cov) in enumerate(zip(mix_weights, means, covariances, strict=True)):
        chol = np.linalg.cholesky(np.asarray(cov, dtype=np.float64))
        y = np.linalg.solve(chol, (f - mean).T)
        log_det = 2.0 * np.log(np.diag(chol)).sum()
        log_p[:, h] = np.log(alpha) - 0.5 * (d * np.log(2 * np.pi) + log_det + (y * y).sum(axis=0))
    log_p -= log_p.max(axis=1, keepdims=True)
    p = np.exp(log_p)
    return p / p.sum(axis=1, keepdims=True)


def soft_dca_intra_weights(gamma: np.ndarray) -> np.ndarray:
    """w_ij = γ_i(c_j) + γ_i(c_i) with c = argmax γ (garbled Eq. 11 read literally, METHODS §2.2-d).

    Defect kept on purpose: for M = 2 and c_j ≠ c_i this is exactly 1, so cross-cluster mixing is never
    suppressed; the spec's generation uses the hard mask instead.
    """
    gamma = np.asarray(gamma)
    c = gamma.argmax(axis=1)
    own = gamma[np.arange(gamma.shape[0]), c]
    return gamma[:, c] + own[:, None]


def paper_literal_generate(
    teacher: np.ndarray,
    student: np.ndarray,
    x_student: np.ndarray,
    gamma: np.ndarray,
    *,
    eps: float = EPS,
) -> np.ndarray:
    """Alg. 1 with soft DCA: x_new,i = Σ_j w_inter,ij · w_intra,ij · x̂_j, not renormalised.

    w_inter is the well-posed reading of Eq. 10 that reproduces the §2.5 golden value: |cos| per the
    code (§2.2-b), normalised along the row (§2.2-c), A_ii unchanged; the raw dot products of Eq. 10
    do not reproduce it. The product is left unnormalised, as Alg. 1 writes it.
    """
    w_inter = _row_normalise(abs_cosine_affinity(teacher, student, eps=eps), eps)
    return generate(w_inter * soft_dca_intra_weights(gamma), x_student)


# ----------------------------------------------------------------------------------------------------
# Offline driver
# ----------------------------------------------------------------------------------------------------


def _take(source: RowSource, idx: np.ndarray) -> np.ndarray:
    return np.asarray(source(idx)) if callable(source) else np.asarray(source[idx])


def _mix64(z: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: a fast bijective 64-bit mixer, the Feistel round function."""
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9
    z = (z ^ (z >> 27)) * 0x94D049BB133111EB
    return z ^ (z >> 31)


def _permute_positions(positions: np.ndarray, n: int, keys: np.ndarray) -> np.ndarray:
    """π(p) for a seeded bijection π of [0, n): a Feistel network on 2h bits plus cycle-walking.

    Evaluated per batch, so a pass never holds an n-long permutation (memory grows with B, not n).
    """
    half = max(1, ((n - 1).bit_length() + 1) // 2)
    mask = np.uint64((1 << half) - 1)

    def feistel(v: np.ndarray) -> np.ndarray:
        left, right = v >> half, v & mask
        for key in keys:
            left, right = right, left ^ (_mix64(right ^ key) & mask)
        return (left << half) | right

    out = feistel(positions.astype(np.uint64))
    outside = out >= n
    while outside.any():  # cycle-walk back into [0, n); terminates because π is a bijection
        out[outside] = feistel(out[outside])
        outside = out >= n
    return out.astype(np.int64)


def permuted_batches(n: int, batch_size: int, *, seed: int, pass_index: int) -> Iterator[np.ndarray]:
    """Corpus indices of pass ``pass_index``: a seeded permutation of range(n) cut into batches of B.

    Every batch has B indices except possibly the last; together they partition range(n). The same
    (seed, pass_index) always gives the same batches; passes of one seed differ.
    """
    if n < 0 or batch_size < 1:
        raise ValueError(f"need n >= 0 and batch_size >= 1, got n={n}, batch_size={batch_size}")
    keys = np.random.SeedSequence([seed, pass_index]).generate_state(_FEISTEL_ROUNDS, dtype=np.uint64)
    for start in range(0, n, batch_size):
        yield _permute_positions(np.arange(start, min(start + batch_size, n)), n, keys)


def cluster_batches(
    n: int, batch_size: int, cluster_labels: RowSource, *, seed: int, pass_index: int
) -> Iterator[np.ndarray]:
    """Same-cluster batches: the permutation of ``permuted_batches`` split by cluster, then cut into B.

    This is the ``pool="cluster"`` option: every anchor mixes with up to B same-cluster samples instead
    of the ≈ B/M that a mixed batch leaves after masking. Full batches stream out as soon as a cluster
    has B pending members (memory O(M·B)); each cluster's remainder is emitted at the end of the pass.
    """
    pending: dict[int, np.ndarray] = {}
    for block in permuted_batches(n, batch_size, seed=seed, pass_index=pass_index):
        labels = _take(cluster_labels, block).reshape(-1)
        for label in np.unique(labels):
            key = label.item()
            members = np.concatenate([pending.get(key, block[:0]), block[labels == label]])
            while members.shape[0] >= batch_size:
                yield members[:batch_size]
                members = members[batch_size:]
            pending[key] = members
    for key in sorted(pending):
        if pending[key].shape[0]:
            yield pending[key]


@dataclass(frozen=True, eq=False)
class CmdaAnchor:
    """One generated sample and its lineage (METHODS §2.1): the anchor and who contributed how much."""

    pass_index: int
    batch_index: int
    anchor: int
    contributors: np.ndarray
    weights: np.ndarray
    weight_sum: float
    x_new: np.ndarray
    soft_label: np.ndarray | None


@dataclass(frozen=True, eq=False)
class CmdaBatch:
    """The outputs of one batch: row r is anchor ``indices[r]``, mixed with weights ``weights[r]``."""

    pass_index: int
    batch_index: int
    indices: np.ndarray
    weights: np.ndarray
    x_new: np.ndarray
    soft_labels: np.ndarray | None

    def anchors(self) -> Iterator[CmdaAnchor]:
        """Per-anchor records; contributors are the batch members with non-zero weight."""
        for r, anchor in enumerate(self.indices):
            row = self.weights[r]
            nonzero = np.flatnonzero(row)
            yield CmdaAnchor(
                pass_index=self.pass_index,
                batch_index=self.batch_index,
                anchor=int(anchor),
                contributors=self.indices[nonzero],
                weights=row[nonzero],
                weight_sum=float(row.sum()),
                x_new=self.x_new[r],
                soft_label=None if self.soft_labels is None else self.soft_labels[r],
            )


def iter_offline_batches(
    n: int,
    *,
    teacher: RowSource,
    student: RowSource,
    x_student: RowSource,
    cluster_labels: RowSource | None = None,
    passes: int = 1,
    batch_size: int = 128,
    seed: int = 0,
    mode: str = "rownorm_cra",
    pool: Pool = "batch",
    class_labels: RowSource | None = None,
    n_classes: int | None = None,
    eps: float = EPS,
) -> Iterator[CmdaBatch]:
    """Offline CMDA (METHODS §2.2, "Offline driver"): k passes, each emitting one output per source.

    Pass p draws a seeded permutation, cuts it into batches of B and mixes within each batch.
    ``cluster_labels`` are the corpus-wide labels of one global GMM fit (``select_gmm_bic`` then
    ``model.predict``); the mask uses the labels of the batch members. A callable that fits a GMM on
    the batch's features and returns its labels gives the reference's per-batch fit instead.
    ``pool="cluster"`` forms same-cluster batches (``cluster_batches``). Pass ``x_student=student``
    when the raw student sample is the embedding itself (text CMDA): it is then fetched once.
    Batches are 0-based (``pass_index`` 0 … passes-1).
    """
    mode = resolve_mode(mode)
    if pool not in get_args(Pool):
        raise ValueError(f'pool must be "batch" or "cluster", got {pool!r}')
    if pool == "cluster" and cluster_labels is None:
        raise ValueError('pool="cluster" needs cluster_labels')
    if mode == "reference_cma" and cluster_labels is not None:
        raise ValueError("reference_cma has no DCA mask: pass cluster_labels=None")
    if (class_labels is None) != (n_classes is None):
        raise ValueError("class_labels and n_classes go together")
    for pass_index in range(passes):
        if pool == "cluster":
            batches = cluster_batches(n, batch_size, cluster_labels, seed=seed, pass_index=pass_index)
        else:
            batches = permuted_batches(n, batch_size, seed=seed, pass_index=pass_index)
        for batch_index, idx in enumerate(batches):
            z = _take(student, idx)
            x = z if x_student is student else _take(x_student, idx)
            labels = None if cluster_labels is None else _take(cluster_labels, idx)
            w = cmda_weights(_take(teacher, idx), z, labels, mode=mode, eps=eps)
            soft = None
            if class_labels is not None:
                soft = soft_labels(w, _take(class_labels, idx), n_classes, eps=eps)
            yield CmdaBatch(
                pass_index=pass_index,
                batch_index=batch_index,
                indices=idx,
                weights=w,
                x_new=generate(w, x),
                soft_labels=soft,
            )


def iter_offline(n: int, **kwargs: Any) -> Iterator[CmdaAnchor]:
    """``iter_offline_batches`` flattened to one ``CmdaAnchor`` per output (same keyword arguments)."""
    for batch in iter_offline_batches(n, **kwargs):
        yield from batch.anchors()
