"""cluster (global): one GMM over the corpus, its component count M chosen by BIC, a cluster id per row.

METHODS §2.2-e/f. The GMM is fitted once, on ``cluster_on`` (default ``text_embedding``: the paper's
Sec. IV-C clusters the language modality, and the reference fits on the caption vectors), with the
reference's settings spelled out and a pinned seed (``augpipe.methods.cmda.fit_gmm``: full covariance,
tol 1e-3, reg_covar 1e-6, 100 EM iterations, one k-means init). M* is the lowest BIC over M = 1 …
``m_max`` (``select_gmm_bic``; the smallest M wins a tie); ``m_max`` is capped at the number of fitted rows.

Unlike the reference, which refits a 2-component GMM on every mini-batch, the fit is global and the
labels are fixed, so an anchor's cluster does not depend on which batch it lands in (METHODS's offline
driver: "BIC over {1…M_max} on the clustering features, then fixed").

Options beyond the paper, both off by default:

- ``fit_max_samples``: fit on a seeded uniform subsample (the GMM's EM is O(n·M·d²) per iteration);
  every row is still labelled.
- ``pca_dims``: project the features onto their first principal components (fitted on the same rows)
  before the GMM. A full covariance in d dimensions has d(d+1)/2 parameters per component, so on a
  corpus much smaller than that BIC's penalty always wins and M* = 1 (no DCA); a few PCA dimensions give
  BIC something to choose between.

Artifacts (no pickle): ``gmm.npz`` (weights, means, covariances, Cholesky precisions, the BIC curve, the
PCA basis) and ``cluster.json`` (format version, settings, summary). The summary, recorded in the
manifest, has ``m_star`` and ``bic`` (``bic[m-1]`` is the BIC of M = m).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from pydantic import Field, field_validator
from sklearn.mixture import GaussianMixture

from augpipe.methods.cmda import select_gmm_bic
from augpipe.pipeline.rows import Failure, Row, check_field_name, derive_seed, record
from augpipe.pipeline.stage import GlobalStageSettings, Resources, Stage, StageSettings

FORMAT_VERSION = 1
PARAMS_FILE = "gmm.npz"
STATE_FILE = "cluster.json"


class ClusterSettings(GlobalStageSettings):
    cluster_on: str = Field(default="text_embedding", description="the features the GMM is fitted on")
    output: str = Field(default="cluster", description="field for the row's cluster id (int)")
    m_max: int = Field(default=5, ge=1, description="BIC chooses M in 1..m_max")
    seed: int | None = Field(
        default=None, ge=0, lt=2**32, description="GMM and subsample seed; default from the run seed"
    )
    fit_max_samples: int | None = Field(default=None, ge=2, description="fit on a seeded subsample")
    pca_dims: int | None = Field(default=None, ge=1, description="PCA the features to this many dims first")

    @field_validator("cluster_on", "output")
    @classmethod
    def _field_name(cls, value: str) -> str:
        return check_field_name(value)


def gmm_from_params(
    weights: np.ndarray, means: np.ndarray, covariances: np.ndarray, prec_chol: np.ndarray
) -> Any:
    """A fitted full-covariance ``GaussianMixture`` rebuilt from saved arrays (predicts like the original)."""
    model = GaussianMixture(n_components=len(weights), covariance_type="full")
    model.weights_ = weights
    model.means_ = means
    model.covariances_ = covariances
    model.precisions_cholesky_ = prec_chol
    model.precisions_ = np.einsum("kij,klj->kil", prec_chol, prec_chol)
    model.n_features_in_ = means.shape[1]
    model.converged_ = True
    return model


class Cluster(Stage):
    name: ClassVar[str] = "cluster"
    consumes: ClassVar[frozenset[str]] = frozenset({"text_embedding"})
    produces: ClassVar[frozenset[str]] = frozenset({"cluster"})
    Settings: ClassVar[type[StageSettings]] = ClusterSettings
    resources: ClassVar[Resources] = Resources(cpus=1.0, gpus=0.0, memory_gb=2.0)
    batch_size: ClassVar[int] = 4096
    cacheable: ClassVar[bool] = False
    needs_fit: ClassVar[bool] = True

    settings: ClusterSettings

    def __init__(self, settings: StageSettings, context: Any) -> None:
        super().__init__(settings, context)
        self.model: Any = None
        self.pca: tuple[np.ndarray, np.ndarray] | None = None
        self.fitted: dict[str, Any] = {}

    def inputs(self) -> frozenset[str]:
        return frozenset({self.settings.cluster_on})

    def outputs(self) -> frozenset[str]:
        return frozenset({self.settings.output})

    @property
    def seed(self) -> int:
        s = self.settings.seed
        return s if s is not None else derive_seed(self.context.run_seed, "corpus", self.name) % 2**32

    def features(self, vectors: np.ndarray) -> np.ndarray:
        """What the GMM sees: the vectors, projected onto the PCA basis when one was fitted."""
        x = np.asarray(vectors, dtype=np.float64)
        if self.pca is None:
            return x
        mean, components = self.pca
        return (x - mean) @ components.T

    def fit(self, columns: dict[str, list[Any]], artifact_dir: Path) -> dict[str, Any]:
        """Choose M by BIC on ``cluster_on`` (optionally subsampled, PCA'd); save; summarise."""
        s = self.settings
        values = columns[s.cluster_on]
        present = [i for i, v in enumerate(values) if v is not None]
        if not present:
            raise ValueError(f"cluster: no row has {s.cluster_on!r}")
        x = np.stack([np.asarray(values[i], dtype=np.float64).reshape(-1) for i in present])
        seed = self.seed
        fit_idx = np.arange(len(x))
        if s.fit_max_samples is not None and len(x) > s.fit_max_samples:
            rng = np.random.default_rng(seed)
            fit_idx = np.sort(rng.choice(len(x), size=s.fit_max_samples, replace=False))
        self.pca = None
        if s.pca_dims is not None:
            from sklearn.decomposition import PCA

            k = min(s.pca_dims, len(fit_idx), x.shape[1])
            pca = PCA(n_components=k, svd_solver="full").fit(x[fit_idx])
            self.pca = (pca.mean_, pca.components_)
        z = self.features(x)
        m_max = min(s.m_max, len(fit_idx))
        selection = select_gmm_bic(z[fit_idx], m_max=m_max, seed=seed)
        self.model = selection.model
        labels = self.model.predict(z)
        sizes = Counter(int(c) for c in labels)
        summary = {
            "m_star": selection.m_star,
            "bic": list(selection.bic),
            "m_range": [1, m_max],
            "seed": seed,
            "cluster_on": s.cluster_on,
            "rows": len(x),
            "fit_rows": len(fit_idx),
            "feature_dim": int(x.shape[1]),
            "gmm_dim": int(z.shape[1]),
            "pca_dims": None if self.pca is None else int(z.shape[1]),
            "converged": bool(self.model.converged_),
            "cluster_sizes": {str(c): sizes[c] for c in sorted(sizes)},
        }
        self.fitted = summary
        self._save(artifact_dir, summary)
        return summary

    def _save(self, folder: Path, summary: dict[str, Any]) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        m = self.model
        empty = np.zeros((0,))
        np.savez(
            folder / PARAMS_FILE,
            weights=m.weights_,
            means=m.means_,
            covariances=m.covariances_,
            precisions_cholesky=m.precisions_cholesky_,
            bic=np.asarray(summary["bic"]),
            pca_mean=empty if self.pca is None else self.pca[0],
            pca_components=empty if self.pca is None else self.pca[1],
        )
        state = {
            "format": FORMAT_VERSION,
            "stage": self.name,
            "settings": self.settings.model_dump(mode="json", exclude=set(self.settings.EXECUTION_ONLY)),
            "summary": summary,
        }
        (folder / STATE_FILE).write_text(json.dumps(state, indent=1))

    def load_fitted(self, artifact_dir: Path) -> None:
        """Rebuild the fitted GMM (and PCA basis) from ``gmm.npz``; refuse another format."""
        state = json.loads((artifact_dir / STATE_FILE).read_text())
        if state.get("format") != FORMAT_VERSION:
            raise ValueError(
                f"{artifact_dir / STATE_FILE}: cluster artifact format {state.get('format')!r}, "
                f"this augpipe reads format {FORMAT_VERSION}; delete the folder to refit"
            )
        with np.load(artifact_dir / PARAMS_FILE, allow_pickle=False) as saved:
            self.model = gmm_from_params(
                saved["weights"], saved["means"], saved["covariances"], saved["precisions_cholesky"]
            )
            self.pca = (saved["pca_mean"], saved["pca_components"]) if saved["pca_mean"].size else None
        self.fitted = state["summary"]

    def predict(self, vectors: np.ndarray) -> np.ndarray:
        if self.model is None:
            raise RuntimeError("cluster has not been fitted: call fit() or load_fitted() first")
        return self.model.predict(self.features(vectors))

    def process_batch(self, rows: list[Row]) -> list[Row | Failure]:
        s = self.settings
        if self.model is None:
            raise RuntimeError("cluster has not been fitted: call fit() or load_fitted() first")
        dim = self.fitted["feature_dim"]
        results: list[Row | Failure] = []
        todo: list[Row] = []
        for row in rows:
            value = row.get(s.cluster_on)
            if value is None or np.asarray(value).size != dim:
                got = "missing" if value is None else f"{np.asarray(value).size} values, not {dim}"
                results.append(self.fail(row, "missing_field", f"field {s.cluster_on!r} is {got}"))
            else:
                todo.append(row)
                results.append(row)
        if not todo:
            return results
        labels = self.predict(np.stack([np.asarray(r[s.cluster_on]).reshape(-1) for r in todo]))
        m_star, seed = self.fitted["m_star"], self.fitted["seed"]
        for row, label in zip(todo, labels, strict=True):
            row[s.output] = int(label)
            record(row, self.name, cluster=int(label), m=m_star, seed=seed, cluster_on=s.cluster_on)
        self.stats["clustered"] += len(todo)
        return results
