"""cluster (global): one GMM over the corpus, its component count M chosen by BIC, a cluster id per row.

METHODS §2.2-e/f. The GMM is fitted once, on ``cluster_on`` (default ``text_embedding``: the paper's
Sec. IV-C clusters the language modality, and the reference fits on the caption vectors), with the
reference's EM settings and a pinned seed (tol 1e-3, reg_covar 1e-6, 100 iterations, one k-means
init). M* is the lowest BIC over M = 1 … ``m_max`` (the smallest M wins a tie).

Defaults that find structure at real embedding sizes (``augpipe.methods.gmm``, measured in
``benchmarks/cluster_selection.py``): the features are projected onto their first ``pca_dims`` (16)
principal components, fitted on the same rows, and the components share one full covariance
(``covariance: tied``); ``m_max`` is 20. The reference's own model (a full covariance per component on
the raw features: ``--set cluster.covariance=full --set cluster.pca_dims=null``) makes BIC choose
M = 1 on 384-d sentence vectors of 10 well-separated classes, because every extra component costs
74k parameters. A small corpus gets fewer dimensions and components (at most rows/5 and rows/4), so
BIC never compares degenerate fits; a one-row corpus gets M = 1 without EM.

Unlike the reference, which refits a 2-component GMM on every mini-batch, the fit is global and the
labels are fixed, so an anchor's cluster does not depend on which batch it lands in (METHODS's offline
driver: "BIC over {1…M_max} on the clustering features, then fixed"). The engine hands ``fit`` a seeded
uniform sample of at most ``fit_max_rows`` rows (EM is O(n·M·k²) per iteration); every row is still
labelled.

The fit summary (in the manifest under ``artifacts[<step>]``) holds the BIC curve (``bic[m-1]`` is the
BIC of M = m), ``m_star``, the covariance type, the feature and GMM dimensions, the variance the PCA
kept, and the fitted and total row counts. Cluster sizes over the whole corpus are counted as rows are
labelled (``cluster_<c>_rows`` in the stage's counts), since the fit may see only a sample.

Artifacts (no pickle): ``gmm.npz`` (weights, means, covariances, Cholesky precisions, the BIC curve, the
PCA basis) and ``cluster.json`` (format version, settings, summary).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from pydantic import Field

from augpipe.methods.gmm import (
    ClusterModel,
    CovarianceType,
    GmmSelection,
    gmm_from_params,
    reduce_then_select,
)
from augpipe.pipeline.rows import Failure, FieldName, Row, derive_seed, record
from augpipe.pipeline.stage import GlobalStageSettings, Resources, Stage, StageSettings

FORMAT_VERSION = 2
PARAMS_FILE = "gmm.npz"
STATE_FILE = "cluster.json"


class ClusterSettings(GlobalStageSettings):
    cluster_on: FieldName = Field(default="text_embedding", description="the features the GMM is fitted on")
    output: FieldName = Field(default="cluster", description="field for the row's cluster id (int)")
    m_max: int = Field(default=20, ge=1, description="BIC chooses M in 1..m_max")
    covariance: CovarianceType = Field(
        default="tied", description="GMM covariance: tied (one shared full matrix), full (the reference's)"
    )
    pca_dims: int | None = Field(
        default=16, ge=1, description="PCA the features to this many dims first; null: raw features"
    )
    seed: int | None = Field(
        default=None, ge=0, lt=2**32, description="GMM and subsample seed; default from the run seed"
    )


class Cluster(Stage):
    name: ClassVar[str] = "cluster"
    consumes: ClassVar[frozenset[str]] = frozenset({"text_embedding"})
    produces: ClassVar[frozenset[str]] = frozenset({"cluster"})
    Settings: ClassVar[type[StageSettings]] = ClusterSettings
    resources: ClassVar[Resources] = Resources(cpus=1.0, gpus=0.0, memory_gb=2.0)
    batch_size: ClassVar[int] = 4096
    cacheable: ClassVar[bool] = False
    keeps_rows: ClassVar[bool] = True
    needs_fit: ClassVar[bool] = True

    settings: ClusterSettings

    def __init__(self, settings: StageSettings, context: Any) -> None:
        super().__init__(settings, context)
        self.model: ClusterModel | None = None
        self.fitted: dict[str, Any] = {}

    def inputs(self) -> frozenset[str]:
        return frozenset({self.settings.cluster_on})

    def outputs(self) -> frozenset[str]:
        return frozenset({self.settings.output})

    @property
    def seed(self) -> int:
        s = self.settings.seed
        return s if s is not None else derive_seed(self.context.run_seed, "corpus", self.name) % 2**32

    def fit(self, columns: dict[str, list[Any]], artifact_dir: Path) -> dict[str, Any]:
        """Choose M by BIC on ``cluster_on`` (optionally subsampled, PCA'd); save; summarise."""
        s = self.settings
        values = [v for v in columns[s.cluster_on] if v is not None]
        if not values:
            raise ValueError(f"cluster: no row has {s.cluster_on!r}")
        x = np.stack([np.asarray(v, dtype=np.float64).reshape(-1) for v in values])
        seed = self.seed
        self.model = reduce_then_select(
            x, pca_dims=s.pca_dims, m_max=s.m_max, covariance_type=s.covariance, seed=seed
        )
        selection = self.model.selection
        summary = {
            "m_star": selection.m_star,
            "bic": list(selection.bic),
            "m_range": [1, len(selection.bic) or 1],
            "m_max": s.m_max,
            "covariance_type": s.covariance,
            "seed": seed,
            "cluster_on": s.cluster_on,
            "fit_rows": len(x),
            "feature_dim": int(x.shape[1]),
            "gmm_dim": self.model.dims,
            "pca_dims": None if self.model.pca_components is None else self.model.dims,
            "pca_variance_kept": self.model.variance_kept,
            "converged": bool(selection.model.converged_),
            "weights": [float(w) for w in selection.model.weights_],
        }
        self.fitted = summary
        self._save(artifact_dir, summary)
        return summary

    def _save(self, folder: Path, summary: dict[str, Any]) -> None:
        assert self.model is not None
        folder.mkdir(parents=True, exist_ok=True)
        m = self.model.selection.model
        empty = np.zeros((0,))
        np.savez(
            folder / PARAMS_FILE,
            weights=m.weights_,
            means=m.means_,
            covariances=m.covariances_,
            precisions_cholesky=m.precisions_cholesky_,
            bic=np.asarray(summary["bic"]),
            pca_mean=empty if self.model.pca_mean is None else self.model.pca_mean,
            pca_components=empty if self.model.pca_components is None else self.model.pca_components,
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
        summary = state["summary"]
        with np.load(artifact_dir / PARAMS_FILE, allow_pickle=False) as saved:
            kind = summary["covariance_type"]
            gmm = gmm_from_params(
                saved["weights"], saved["means"], saved["covariances"], saved["precisions_cholesky"], kind
            )
            selection = GmmSelection(summary["m_star"], tuple(summary["bic"]), gmm, summary["seed"], kind)
            reduced = saved["pca_mean"].size > 0
            self.model = ClusterModel(
                selection,
                saved["pca_mean"] if reduced else None,
                saved["pca_components"] if reduced else None,
                summary["pca_variance_kept"],
            )
        self.fitted = summary

    def predict(self, vectors: np.ndarray) -> np.ndarray:
        if self.model is None:
            raise RuntimeError("cluster has not been fitted: call fit() or load_fitted() first")
        return self.model.predict(vectors)

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
            self.stats[f"cluster_{int(label)}_rows"] += 1
        self.stats["clustered"] += len(todo)
        return results
