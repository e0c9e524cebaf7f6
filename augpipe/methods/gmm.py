"""CMDA's clustering: a Gaussian mixture whose component count M is chosen by BIC (METHODS §2.2-f).

The reference calls a bare ``GaussianMixture(n_components=2)``, i.e. one *full* covariance per
component, fitted per 128-sample mini-batch. That is the right model in a handful of dimensions and
the wrong one at real embedding sizes: a full covariance in d dimensions has d(d+1)/2 parameters
(74k at d = 384), so BIC's penalty for a second component outweighs any gain in fit, and on a
10-class corpus of 10k sentence vectors BIC picks M = 1, where the same-cluster mask does nothing.

``reduce_then_select`` keeps the paper's procedure (fit M = 1 … M_max, keep the lowest BIC) and
changes only the model's parameterisation, as measured on generated 10-class data (see
``benchmarks/cluster_selection.py``): the features are projected onto their leading principal
components, and the components share one full covariance (``covariance_type="tied"``). Class
structure in embeddings lives in a few directions, and the within-class spread is roughly the same
shape for every class, so a shared covariance is the well-specified model; adding a component then
costs BIC only its mean and weight (k + 1 parameters), not a covariance.

``model_budget`` keeps small fits honest: BIC is an asymptotic criterion, and a mixture with more
dimensions or components than the rows can support has a degenerate likelihood (a component sitting
on one point has near-zero variance and unbounded density), which BIC then rewards.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np
from scipy.linalg import solve_triangular
from sklearn.decomposition import PCA
from sklearn.mixture import GaussianMixture

CovarianceType = Literal["full", "tied", "diag", "spherical"]
COVARIANCE_TYPES: tuple[str, ...] = get_args(CovarianceType)
REG_COVAR = 1e-6
ROWS_PER_DIM = 5
"""PCA keeps at most n/5 dimensions: the shared covariance is then estimated from ≥ 5 rows a dimension."""
ROWS_PER_COMPONENT = 4
"""M_max is at most n/4: a component needs a few rows, or BIC rewards a component sitting on one point."""


@dataclass(frozen=True, eq=False)
class GmmSelection:
    """Result of choosing M by BIC: ``bic[m - 1]`` is the BIC of the M = m fit."""

    m_star: int
    bic: tuple[float, ...]
    model: GaussianMixture
    seed: int
    covariance_type: str = "full"


def fit_gmm(
    features: np.ndarray, n_components: int, *, seed: int, covariance_type: CovarianceType = "full"
) -> GaussianMixture:
    """The reference's bare ``GMM(n_components=...)`` settings, spelled out, with a pinned seed.

    The reference leaves ``random_state=None`` and so is not reproducible (METHODS §2.2-f). Its
    covariance is ``full``; ``covariance_type`` is the one setting this module lets differ.
    """
    return GaussianMixture(
        n_components=n_components,
        covariance_type=covariance_type,
        tol=1e-3,
        reg_covar=REG_COVAR,
        max_iter=100,
        n_init=1,
        init_params="kmeans",
        random_state=seed,
    ).fit(np.asarray(features))


def select_gmm_bic(
    features: np.ndarray, *, m_max: int = 5, seed: int = 0, covariance_type: CovarianceType = "full"
) -> GmmSelection:
    """Fit M = 1 … m_max and keep the lowest BIC (the paper's choice; the code hard-codes M = 2).

    The smallest M wins a tie. A single row cannot be fitted by EM; it gets the one-component model
    of ``single_component`` and an empty BIC curve.
    """
    features = np.asarray(features)
    if not 1 <= m_max <= features.shape[0]:
        raise ValueError(f"m_max must be in 1..{features.shape[0]} (the number of samples), got {m_max}")
    if features.shape[0] == 1:
        return GmmSelection(1, (), single_component(features, covariance_type), seed, covariance_type)
    models = [fit_gmm(features, m, seed=seed, covariance_type=covariance_type) for m in range(1, m_max + 1)]
    bic = tuple(float(model.bic(features)) for model in models)
    best = int(np.argmin(bic))
    return GmmSelection(best + 1, bic, models[best], seed, covariance_type)


def model_budget(rows: int, dim: int, pca_dims: int | None, m_max: int) -> tuple[int | None, int]:
    """(PCA dimensions or None, M_max) that ``rows`` fitted rows can support (see the module docstring).

    Dimensions are capped at rows/5 (and at ``dim``), components at rows/4; both at least 1.
    """
    cap = max(1, rows // ROWS_PER_DIM)
    dims = None if pca_dims is None else max(1, min(pca_dims, dim, cap))
    return dims, max(1, min(m_max, rows // ROWS_PER_COMPONENT, rows))


def fit_pca(features: np.ndarray, dims: int) -> tuple[np.ndarray, np.ndarray, float]:
    """(mean, components (dims × d), share of the variance kept) of the leading principal components."""
    pca = PCA(n_components=dims, svd_solver="full").fit(np.asarray(features, dtype=np.float64))
    ratio = np.nan_to_num(pca.explained_variance_ratio_)  # NaN when every row is the same
    return pca.mean_, pca.components_, float(ratio.sum())


def precision_cholesky(covariances: np.ndarray, covariance_type: str) -> np.ndarray:
    """Cholesky factors of the precisions, in scikit-learn's layout for ``covariance_type``."""
    if covariance_type in ("diag", "spherical"):
        return 1.0 / np.sqrt(covariances)

    def factor(cov: np.ndarray) -> np.ndarray:
        chol = np.linalg.cholesky(cov)
        return solve_triangular(chol, np.eye(cov.shape[0]), lower=True).T

    if covariance_type == "tied":
        return factor(covariances)
    return np.stack([factor(c) for c in covariances])


def gmm_from_params(
    weights: np.ndarray,
    means: np.ndarray,
    covariances: np.ndarray,
    precisions_cholesky: np.ndarray,
    covariance_type: str = "full",
) -> GaussianMixture:
    """A fitted ``GaussianMixture`` rebuilt from saved arrays (predicts like the original)."""
    if covariance_type not in COVARIANCE_TYPES:
        raise ValueError(f"unknown covariance type {covariance_type!r}; expected one of {COVARIANCE_TYPES}")
    model = GaussianMixture(n_components=len(weights), covariance_type=covariance_type)
    model.weights_ = weights
    model.means_ = means
    model.covariances_ = covariances
    model.precisions_cholesky_ = precisions_cholesky
    if covariance_type == "full":
        model.precisions_ = np.einsum("kij,klj->kil", precisions_cholesky, precisions_cholesky)
    elif covariance_type == "tied":
        model.precisions_ = precisions_cholesky @ precisions_cholesky.T
    else:
        model.precisions_ = precisions_cholesky**2
    model.n_features_in_ = means.shape[1]
    model.converged_ = True
    return model


def single_component(features: np.ndarray, covariance_type: str) -> GaussianMixture:
    """The M = 1 mixture of ``features`` in closed form: EM cannot start on one row, this needs none.

    Mean and (regularised) covariance are the sample's; on a single row the covariance is reg_covar·I.
    """
    x = np.asarray(features, dtype=np.float64)
    mean = x.mean(axis=0)
    centred = x - mean
    cov = centred.T @ centred / x.shape[0] + REG_COVAR * np.eye(x.shape[1])
    shaped = {
        "full": cov[None],
        "tied": cov,
        "diag": np.diag(cov)[None],
        "spherical": np.array([np.diag(cov).mean()]),
    }[covariance_type]
    return gmm_from_params(
        np.ones(1), mean[None], shaped, precision_cholesky(shaped, covariance_type), covariance_type
    )


@dataclass(frozen=True, eq=False)
class ClusterModel:
    """A BIC-selected mixture over (optionally) PCA-reduced features; ``predict`` takes raw features."""

    selection: GmmSelection
    pca_mean: np.ndarray | None = None
    pca_components: np.ndarray | None = None
    variance_kept: float | None = None

    @property
    def dims(self) -> int:
        return int(self.selection.model.means_.shape[1])

    def features(self, vectors: np.ndarray) -> np.ndarray:
        """What the mixture sees: the vectors, projected onto the PCA basis when there is one."""
        x = np.asarray(vectors, dtype=np.float64)
        if self.pca_components is None:
            return x
        return (x - self.pca_mean) @ self.pca_components.T

    def predict(self, vectors: np.ndarray) -> np.ndarray:
        return self.selection.model.predict(self.features(vectors))


def reduce_then_select(
    features: np.ndarray,
    *,
    pca_dims: int | None = 16,
    m_max: int = 20,
    covariance_type: CovarianceType = "tied",
    seed: int = 0,
) -> ClusterModel:
    """PCA to ``pca_dims`` (None: none), then M by BIC over 1 … ``m_max``, both within ``model_budget``."""
    x = np.asarray(features, dtype=np.float64)
    dims, m_cap = model_budget(x.shape[0], x.shape[1], pca_dims, m_max)
    if dims is None or x.shape[0] < 2:
        return ClusterModel(select_gmm_bic(x, m_max=m_cap, seed=seed, covariance_type=covariance_type))
    mean, components, kept = fit_pca(x, dims)
    reduced = (x - mean) @ components.T
    selection = select_gmm_bic(reduced, m_max=m_cap, seed=seed, covariance_type=covariance_type)
    return ClusterModel(selection, mean, components, kept)
