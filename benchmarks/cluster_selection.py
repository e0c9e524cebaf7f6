"""Which GMM parameterisation lets BIC find the classes of real-size embeddings (METHODS §2.2-f)?

    python benchmarks/cluster_selection.py [--n 200 1000 5000] [--dims 384 512] [--noise 0.6 1.2]

Generated corpora with known labels (``augpipe.methods.synthetic.clustered_embeddings``: 10 classes
of unit vectors sharing a common component, anisotropic within-class noise of total norm ``noise``).
For each corpus, BIC chooses M in 1 … ``--m-max`` under each alternative; the script prints the
chosen M, the adjusted Rand index of the clusters against the labels, and the seconds per selection.

Alternatives: the reference's model (a full covariance per component on the raw features; skipped
above 1,000 rows, where it takes minutes and still picks M = 1), diagonal and spherical covariances on
the raw features, and 16 or 32 PCA dimensions with full or tied (shared) covariance. augpipe's default
is ``tied`` on 16 PCA dimensions, within ``augpipe.methods.gmm.model_budget``.
"""

from __future__ import annotations

import argparse
import time

from sklearn.metrics import adjusted_rand_score

from augpipe.methods.gmm import reduce_then_select
from augpipe.methods.synthetic import clustered_embeddings

ALTERNATIVES: list[tuple[str, str, int | None]] = [
    ("reference: full, raw", "full", None),
    ("diag, raw", "diag", None),
    ("spherical, raw", "spherical", None),
    ("full, 16 PCA dims", "full", 16),
    ("tied, 16 PCA dims (default)", "tied", 16),
    ("tied, 32 PCA dims", "tied", 32),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, nargs="+", default=[200, 1000, 5000])
    parser.add_argument("--dims", type=int, nargs="+", default=[384, 512])
    parser.add_argument("--noise", type=float, nargs="+", default=[0.6, 1.2])
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--m-max", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(f"{'rows':>6} {'dim':>4} {'noise':>5}  {'alternative':<28} {'M':>3} {'ARI':>6} {'s':>7}")
    for n in args.n:
        for dim in args.dims:
            for noise in args.noise:
                x, labels = clustered_embeddings(n, dim, args.classes, seed=args.seed, noise=noise)
                for name, covariance, pca_dims in ALTERNATIVES:
                    if covariance == "full" and pca_dims is None and n > 1000:
                        continue
                    started = time.perf_counter()
                    model = reduce_then_select(
                        x, pca_dims=pca_dims, m_max=args.m_max, covariance_type=covariance, seed=args.seed
                    )
                    seconds = time.perf_counter() - started
                    ari = adjusted_rand_score(labels, model.predict(x))
                    m = model.selection.m_star
                    print(
                        f"{n:>6} {dim:>4} {noise:>5}  {name:<28} {m:>3} {ari:>6.3f} {seconds:>7.1f}",
                        flush=True,
                    )


if __name__ == "__main__":
    main()
