"""The linear-probe A/B behind ``augpipe evaluate``, as pure functions over arrays.

A frozen encoder's features feed a seeded scikit-learn logistic regression; what the augmented corpus
changes is only the probe's training rows. Everything here is deterministic for a seed and knows nothing
of corpora, files or models, so each piece is tested against scikit-learn with numpy alone.

- Splits: ``stratified_subsample`` (the papers' low-resource settings) and ``stratified_holdout`` (a test
  set cut from a corpus that has none).
- Soft labels: ``expand_soft_labels`` turns a row with {class: weight} into one row per class whose
  ``sample_weight`` is that weight, so the cross-entropy the probe minimises is the soft-target one.
- Metrics take per-sample weights, either one vector or a (B, n) matrix of bootstrap resample counts, so
  B bootstrap replicates cost a few matrix products instead of B calls into scikit-learn.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from sklearn.linear_model import LogisticRegression

CONFIDENCE = 0.95


# ------------------------------------------------------------------------------------------------ splits


def stratified_subsample(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Sorted indices of a seeded ``fraction`` of each class, at least one sample per class."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    rng = np.random.default_rng(seed)
    chosen = []
    for cls in np.unique(labels):
        members = np.flatnonzero(labels == cls)
        take = max(1, round(fraction * len(members)))
        chosen.append(rng.choice(members, size=take, replace=False))
    return np.sort(np.concatenate(chosen))


def stratified_holdout(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) indices: a seeded ``fraction`` of each class is held out for testing.

    A class with one sample stays whole in train (a test label must be seen in training); every other
    class keeps at least one sample on each side.
    """
    if not 0 < fraction < 1:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    rng = np.random.default_rng(seed)
    test = []
    for cls in np.unique(labels):
        members = np.flatnonzero(labels == cls)
        if len(members) < 2:
            continue
        take = min(len(members) - 1, max(1, round(fraction * len(members))))
        test.append(rng.choice(members, size=take, replace=False))
    test_idx = np.sort(np.concatenate(test)) if test else np.zeros(0, np.int64)
    train_idx = np.setdiff1d(np.arange(len(labels)), test_idx)
    return train_idx, test_idx


# ------------------------------------------------------------------------------------------- soft labels


def expand_soft_labels(
    features: np.ndarray, labels: np.ndarray, soft: Sequence[dict[int, float] | None]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(features, labels, sample weights) with each soft-labelled row split into one row per class.

    A row with soft label {c: w_c} becomes rows (x, c) weighted w_c / Σw, so each source row still
    weighs 1 in total; a row without one keeps its hard label with weight 1.
    """
    rows, classes, weights = [], [], []
    for i, dist in enumerate(soft):
        if dist:
            total = sum(dist.values())
            for cls, weight in sorted(dist.items()):
                if weight > 0:
                    rows.append(i)
                    classes.append(cls)
                    weights.append(weight / total)
        else:
            rows.append(i)
            classes.append(int(labels[i]))
            weights.append(1.0)
    index = np.asarray(rows, dtype=np.int64)
    return features[index], np.asarray(classes, dtype=np.int64), np.asarray(weights, dtype=np.float64)


# ------------------------------------------------------------------------------------------------- probe


@dataclass(frozen=True)
class Probe:
    """A fitted logistic-regression probe on standardised features."""

    mean: np.ndarray
    scale: np.ndarray
    model: LogisticRegression

    def _scaled(self, features: np.ndarray) -> np.ndarray:
        return (features - self.mean) / self.scale

    def predict(self, features: np.ndarray) -> np.ndarray:
        return self.model.predict(self._scaled(features))

    def anomaly_scores(self, features: np.ndarray) -> np.ndarray:
        """1 − the largest class probability (maximum softmax probability): high means unlike training."""
        return 1.0 - self.model.predict_proba(self._scaled(features)).max(axis=1)


def fit_probe(
    features: np.ndarray, labels: np.ndarray, weights: np.ndarray, seed: int, c: float = 1.0
) -> Probe:
    """L2-regularised multinomial logistic regression (lbfgs) on features standardised with the
    training rows' weighted mean and standard deviation (a constant feature keeps scale 1)."""
    if len(np.unique(labels)) < 2:
        raise ValueError("a probe needs at least two classes in its training rows")
    w = weights / weights.sum()
    mean = w @ features
    scale = np.sqrt(w @ (features - mean) ** 2)
    scale = np.where(scale > 1e-12, scale, 1.0)
    model = LogisticRegression(C=c, max_iter=2000, random_state=seed)
    model.fit((features - mean) / scale, labels, sample_weight=weights)
    return Probe(mean=mean, scale=scale, model=model)


# --------------------------------------------------------------------------------------------- bootstrap


def bootstrap_counts(labels: np.ndarray, replicates: int, seed: int) -> np.ndarray:
    """(replicates, n) resample counts, drawn with replacement within each class (a stratified bootstrap:
    every replicate keeps the test set's class sizes, so AUROC and macro-F1 stay defined)."""
    rng = np.random.default_rng(seed)
    counts = np.zeros((replicates, len(labels)), dtype=np.float64)
    for cls in np.unique(labels):
        members = np.flatnonzero(labels == cls)
        counts[:, members] = rng.multinomial(
            len(members), np.full(len(members), 1 / len(members)), replicates
        )
    return counts


def percentile_interval(values: np.ndarray, confidence: float = CONFIDENCE) -> tuple[float, float]:
    tail = 50 * (1 - confidence)
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


# ----------------------------------------------------------------------------------------------- metrics
# ``weights`` is (n,) for one evaluation or (B, n) for B bootstrap replicates; results are () or (B,).


def accuracy(y_true: np.ndarray, y_pred: np.ndarray, weights: np.ndarray) -> np.ndarray:
    return (weights @ (y_true == y_pred).astype(np.float64)) / weights.sum(axis=-1)


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """F1 averaged over the classes present in ``y_true`` (scikit-learn's ``f1_score(labels=those,
    average="macro", zero_division=0)``): a class the probe never predicts counts as F1 = 0."""
    scores = []
    for cls in np.unique(y_true):
        is_true, is_pred = y_true == cls, y_pred == cls
        tp = weights @ (is_true & is_pred).astype(np.float64)
        wrong = weights @ (is_true ^ is_pred).astype(np.float64)
        scores.append(np.divide(2 * tp, 2 * tp + wrong, out=np.zeros_like(tp), where=(2 * tp + wrong) > 0))
    return np.mean(scores, axis=0)


def _grouped(is_positive: np.ndarray, scores: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, ...]:
    """Positive and negative weight per distinct score, scores ascending: (…, G) each."""
    order = np.argsort(scores, kind="stable")
    ordered = scores[order]
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
    w, positive_sorted = weights[..., order], is_positive[order]
    positive = np.add.reduceat(w * positive_sorted, starts, axis=-1)
    negative = np.add.reduceat(w * ~positive_sorted, starts, axis=-1)
    return positive, negative


def auroc(is_positive: np.ndarray, scores: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Area under the ROC curve (Mann-Whitney, ties count one half), higher score = more positive."""
    positive, negative = _grouped(is_positive, scores, weights)
    below = np.cumsum(negative, axis=-1) - negative
    pairs = positive.sum(axis=-1) * negative.sum(axis=-1)
    return (positive * (below + 0.5 * negative)).sum(axis=-1) / pairs


def average_precision(is_positive: np.ndarray, scores: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """AUPR as scikit-learn's ``average_precision_score``: Σ (R_k − R_{k−1}) P_k over distinct thresholds."""
    positive, negative = _grouped(is_positive, scores, weights)
    tp = np.cumsum(positive[..., ::-1], axis=-1)
    fp = np.cumsum(negative[..., ::-1], axis=-1)
    precision = np.divide(tp, tp + fp, out=np.ones_like(tp), where=(tp + fp) > 0)
    recall_step = positive[..., ::-1] / positive.sum(axis=-1, keepdims=True)
    return (recall_step * precision).sum(axis=-1)
