"""The A/B of ``augpipe evaluate``: one probe trained on the original corpus, one on original + augmented.

Both arms see the same test set, seeds and probe settings; only the augmented rows differ. Decisions:

- **Soft labels.** A row whose ``soft_label`` is {c: w} is expanded into one training row per class with
  sample_weight w (normalised to sum 1), which makes the probe's loss the soft-target cross-entropy.
  Augmented rows without one keep their hard label with weight 1, as original rows do.
- **Which augmented rows.** Dropped, and counted under ``excluded``: a row whose key is an original
  key, i.e. a passed-through source; with ``--train-fraction``, a row whose parent is outside that
  seed's subsample (``used_per_seed`` counts the rest), so both arms see the same real samples. Mixing
  methods (mixup, CMDA) also blend in other *contributors*, which this filter cannot see: for a strict
  low-resource protocol, subsample first and augment only the subsample.
- **No test corpus.** A seeded, stratified ``test_fraction`` of the training corpus is held out (the
  same split for every seed), and the augmented rows whose ``parent_key`` is a held-out sample are
  excluded (``parent_in_test``): they were made from the test set. With ``--test``, keys are not
  compared with the test corpus's, as the keys of two corpora may coincide by chance.
- **Seeds.** Seed s draws the low-resource subsample and seeds the probe. lbfgs is deterministic, so
  without ``--train-fraction`` every seed would fit the same probe: the evaluation then fits one.
- **Anomaly task** (CMDA, METHODS.md §2.4: the abnormal class is held out of training and is the
  positive class). Each class in turn (or ``anomaly_class``) is held out: the probe learns the other
  classes, augmented rows with any weight on the held-out class are dropped, and a test sample's
  score is 1 − its maximum class probability; AUROC and AUPR are averaged over these tasks. CMDA scores
  with a Mahalanobis distance on an encoder trained with the augmentation; here the encoder is frozen,
  so the augmentation reaches the probe alone.
- **Confidence intervals.** A percentile bootstrap (seeded): each replicate resamples the test set
  within each class and the seeds, both arms on the same draw, so the difference's interval is paired.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np

from augpipe.evaluate.corpus import Corpus, EvaluationError
from augpipe.evaluate.render import describe_exclusions
from augpipe.methods.probe import (
    CONFIDENCE,
    accuracy,
    auroc,
    average_precision,
    bootstrap_counts,
    expand_soft_labels,
    fit_probe,
    macro_f1,
    percentile_interval,
    stratified_holdout,
    stratified_subsample,
)

HOLDOUT_SEED = 0
SMALL_TEST_CLASS = 10
BOOTSTRAP_SEED = 0
ARMS = ("original", "augmented")
Metric = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]
METRICS: dict[str, dict[str, Metric]] = {
    "classify": {"accuracy": accuracy, "macro_f1": macro_f1},
    "anomaly": {"auroc": auroc, "aupr": average_precision},
}


@dataclass(frozen=True)
class Protocol:
    """The evaluation's settings; every one is recorded in the result."""

    task: Literal["classify", "anomaly"] = "classify"
    seeds: int = 5
    train_fraction: float | None = None
    test_fraction: float = 0.3
    anomaly_class: str | None = None
    replicates: int = 1000
    c: float = 1.0


# ------------------------------------------------------------------------------------------ checks


def _require_labels(corpus: Corpus, soft_ok: bool = False) -> None:
    for key, label, soft in zip(corpus.keys, corpus.labels, corpus.soft, strict=True):
        if label is None and not (soft_ok and soft):
            raise EvaluationError(
                f"{corpus.where}: sample {key} has no label (evaluate needs one on every sample: "
                f"'label' in KEY.json, a label column{', or a soft_label' if soft_ok else ''})"
            )


def _require_known(corpus: Corpus, classes: list[str]) -> None:
    known = set(classes)
    unseen: Counter[str] = Counter()
    example: dict[str, str] = {}
    for key, label, soft in zip(corpus.keys, corpus.labels, corpus.soft, strict=True):
        for name in {label, *(soft or {})} - {None} - known:
            unseen[name] += 1
            example.setdefault(name, key)
    if unseen:
        listed = ", ".join(f"{name!r} ({n}, e.g. {example[name]})" for name, n in sorted(unseen.items()))
        raise EvaluationError(
            f"{corpus.where} has labels the training corpus never shows: {listed}; "
            f"training labels are {', '.join(map(repr, classes))}"
        )


def _require_parents(augmented: Corpus, why: str) -> None:
    missing = next((k for k, p in zip(augmented.keys, augmented.parents, strict=True) if p is None), None)
    if missing is not None:
        raise EvaluationError(
            f"{augmented.where}: sample {missing} has no parent_key, which {why} needs to exclude "
            "augmented samples made from samples the original arm does not train on"
        )


# ---------------------------------------------------------------------------------------- the A/B


@dataclass
class _Data:
    """Class indices and feature matrices of the three corpora, after splits and exclusions."""

    classes: list[str]
    train: Corpus
    test: Corpus
    augmented: Corpus
    kept: np.ndarray
    excluded: Counter[str]

    def __post_init__(self) -> None:
        index = {c: i for i, c in enumerate(self.classes)}
        self.x_train, self.y_train = self.train.features, np.array([index[y] for y in self.train.labels])
        self.x_test, self.y_test = self.test.features, np.array([index[y] for y in self.test.labels])
        self.x_aug = self.augmented.features
        self.y_aug = np.array([index[y] if y is not None else -1 for y in self.augmented.labels])
        self.soft_aug = [
            {index[c]: w for c, w in soft.items()} if soft else None for soft in self.augmented.soft
        ]

    def touches(self, i: int, cls: int) -> bool:
        """Whether augmented row ``i`` carries any weight on class ``cls`` (hard or soft)."""
        soft = self.soft_aug[i]
        return self.y_aug[i] == cls or bool(soft and soft.get(cls, 0) > 0)


def _holdout(train: Corpus, fraction: float) -> tuple[Corpus, Corpus]:
    """(train, test) cut from one corpus; the augmented samples made from the test part are excluded."""
    train_idx, test_idx = stratified_holdout(np.array(train.labels), fraction, HOLDOUT_SEED)
    if not len(test_idx):
        raise EvaluationError(f"{train.where} has too few samples per class to hold out a test set")
    kept = train.subset(train_idx)
    kept.unreadable = train.unreadable
    return kept, train.subset(test_idx)


def _usable(augmented: Corpus, originals: set[str], held_out: set[str]) -> tuple[np.ndarray, Counter[str]]:
    """Indices of the augmented samples to train on, and why the others were excluded.

    ``held_out`` holds test keys only when the test set was cut from the training corpus: keys of two
    corpora (e.g. the row numbers of two CSV files without a key column) may coincide by chance.
    """
    excluded: Counter[str] = Counter()
    kept = []
    for i, (key, parent) in enumerate(zip(augmented.keys, augmented.parents, strict=True)):
        if key in originals or key in held_out:
            excluded["copy_of_an_original_sample"] += 1
        elif parent in held_out:
            excluded["parent_in_test"] += 1
        else:
            kept.append(i)
    if not kept:
        raise EvaluationError(
            f"{augmented.where}: none of its {len(augmented)} samples is usable "
            f"({describe_exclusions(excluded)})"
        )
    return np.array(kept), excluded


def _prepare(train: Corpus, augmented: Corpus, test: Corpus | None, protocol: Protocol) -> tuple[_Data, dict]:
    _require_labels(train)
    _require_labels(augmented, soft_ok=True)
    split: dict[str, Any] = {"held_out_from_train": test is None}
    if test is None:
        _require_parents(augmented, "holding a test set out of --train")
        train, test = _holdout(train, protocol.test_fraction)
        split.update(fraction=protocol.test_fraction, seed=HOLDOUT_SEED)
    else:
        _require_labels(test)
    classes = sorted({label for label in train.labels if label is not None})
    if len(classes) < 2:
        raise EvaluationError(f"{train.where} has one class ({classes[0]!r}); a probe needs two or more")
    _require_known(test, classes)
    _require_known(augmented, classes)
    if protocol.train_fraction is not None:
        _require_parents(augmented, "--train-fraction")
    held_out = set(test.keys) if split["held_out_from_train"] else set()
    kept, excluded = _usable(augmented, set(train.keys), held_out)
    return _Data(classes, train, test, augmented, kept, excluded), split


def _tasks(data: _Data, protocol: Protocol) -> list[int | None]:
    """None for classification; for anomaly detection, the class index held out by each task."""
    if protocol.task == "classify":
        return [None]
    if len(data.classes) < 3:
        raise EvaluationError(
            f"anomaly mode holds one class out and trains the probe on the others, which needs at least "
            f"3 classes; {data.train.where} has {len(data.classes)}"
        )
    if protocol.anomaly_class is not None:
        if protocol.anomaly_class not in data.classes:
            raise EvaluationError(
                f"--anomaly-class {protocol.anomaly_class!r} is not a training label "
                f"({', '.join(map(repr, data.classes))})"
            )
        held = [data.classes.index(protocol.anomaly_class)]
    else:
        held = list(range(len(data.classes)))
    usable = [c for c in held if (data.y_test == c).any() and (data.y_test != c).any()]
    if not usable:
        raise EvaluationError(f"{data.test.where} has no sample of the held-out class(es)")
    return usable


def _fit_arms(data: _Data, rows: np.ndarray, extra: list[int], seed: int, c: float) -> tuple[Any, Any]:
    """The two probes of one seed and task: original rows only, and the same plus augmented rows."""
    x, y = data.x_train[rows], data.y_train[rows]
    original = fit_probe(x, y, np.ones(len(rows)), seed, c)
    xe, ye, we = expand_soft_labels(data.x_aug[extra], data.y_aug[extra], [data.soft_aug[i] for i in extra])
    augmented = fit_probe(np.vstack([x, xe]), np.r_[y, ye], np.r_[np.ones(len(rows)), we], seed, c)
    return original, augmented


def _run(
    data: _Data, protocol: Protocol, seeds: list[int], tasks: list[int | None]
) -> tuple[dict, list[int]]:
    """Per arm an (S, T, n_test) array of predicted classes (classify) or anomaly scores, and the number
    of augmented rows each seed used."""
    shape = (len(seeds), len(tasks), len(data.y_test))
    outputs = {arm: np.zeros(shape) for arm in ARMS}
    used = []
    for s, seed in enumerate(seeds):
        rows = np.arange(len(data.y_train))
        allowed = list(data.kept)
        if protocol.train_fraction is not None:
            rows = stratified_subsample(data.y_train, protocol.train_fraction, seed)
            inside = {data.train.keys[i] for i in rows}
            allowed = [i for i in allowed if data.augmented.parents[i] in inside]
        used.append(len(allowed))
        for t, held in enumerate(tasks):
            task_rows = rows if held is None else rows[data.y_train[rows] != held]
            extra = allowed if held is None else [i for i in allowed if not data.touches(i, held)]
            probes = _fit_arms(data, task_rows, extra, seed, protocol.c)
            for arm, probe in zip(ARMS, probes, strict=True):
                out = probe.predict(data.x_test) if held is None else probe.anomaly_scores(data.x_test)
                outputs[arm][s, t] = out
    return outputs, used


def _summary(point: np.ndarray, resampled: np.ndarray) -> dict[str, Any]:
    low, high = percentile_interval(resampled)
    return {"mean": float(point.mean()), "ci": [low, high], "per_seed": point.tolist()}


def _metrics(data: _Data, protocol: Protocol, outputs: dict, tasks: list[int | None]) -> dict[str, Any]:
    weights = bootstrap_counts(data.y_test, protocol.replicates, BOOTSTRAP_SEED)
    ones = np.ones(len(data.y_test))
    n_seeds = next(iter(outputs.values())).shape[0]
    rng = np.random.default_rng(BOOTSTRAP_SEED + 1)
    draws = rng.integers(0, n_seeds, size=(protocol.replicates, n_seeds))
    replicate = np.arange(protocol.replicates)[:, None]
    targets = [data.y_test if held is None else data.y_test == held for held in tasks]
    table: dict[str, Any] = {}
    for name, metric in METRICS[protocol.task].items():
        point, boot = {}, {}
        for arm in ARMS:
            out = outputs[arm]
            point[arm] = np.array(
                [
                    np.mean([metric(targets[t], out[s, t], ones) for t in range(len(tasks))])
                    for s in range(n_seeds)
                ]
            )
            per_seed = np.array(
                [
                    np.mean([metric(targets[t], out[s, t], weights) for t in range(len(tasks))], axis=0)
                    for s in range(n_seeds)
                ]
            )
            boot[arm] = per_seed[draws, replicate].mean(axis=1)
        diff = _summary(point["augmented"] - point["original"], boot["augmented"] - boot["original"])
        low, high = diff["ci"]
        diff["verdict"] = "helps" if low > 0 else "hurts" if high < 0 else "no clear difference"
        table[name] = {arm: _summary(point[arm], boot[arm]) for arm in ARMS} | {"difference": diff}
    return table


def _per_task(data: _Data, outputs: dict, tasks: list[int | None]) -> list[dict[str, Any]]:
    ones = np.ones(len(data.y_test))
    rows = []
    for t, held in enumerate(tasks):
        assert held is not None
        target = data.y_test == held
        entry: dict[str, Any] = {"held_out": data.classes[held], "test_anomalies": int(target.sum())}
        for arm in ARMS:
            entry[arm] = {
                name: float(
                    np.mean([metric(target, outputs[arm][s, t], ones) for s in range(outputs[arm].shape[0])])
                )
                for name, metric in METRICS["anomaly"].items()
            }
        rows.append(entry)
    return rows


def _corpus_info(corpus: Corpus) -> dict[str, Any]:
    info: dict[str, Any] = {"path": str(corpus.path), "samples": len(corpus)}
    info["classes"] = dict(sorted(Counter(label for label in corpus.labels if label is not None).items()))
    if corpus.unreadable:
        first = corpus.unreadable[0]
        info["unreadable"] = {"count": len(corpus.unreadable), "example": f"{first.key}: {first.message}"}
    return info


def evaluate_ab(train: Corpus, augmented: Corpus, test: Corpus | None, protocol: Protocol) -> dict[str, Any]:
    """The A/B result as a JSON-able dict (protocol, corpora, metrics with CIs and differences)."""
    data, split = _prepare(train, augmented, test, protocol)
    tasks = _tasks(data, protocol)
    seeds = list(range(protocol.seeds)) if protocol.train_fraction is not None else [0]
    outputs, used = _run(data, protocol, seeds, tasks)
    soft = sum(1 for i in data.kept if data.soft_aug[i])
    result: dict[str, Any] = {
        "task": protocol.task,
        "protocol": asdict(protocol)
        | {
            "seeds_fitted": seeds,
            "confidence": CONFIDENCE,
            "probe": f"LogisticRegression(C={protocol.c}, lbfgs) on standardised features",
            "soft_labels": "each soft-labelled row expanded into one row per class, sample_weight = weight",
            "bootstrap": "bootstrap: test samples resampled within class, and seeds, both arms alike",
            "test_split": split,
        },
        "corpora": {
            "train": _corpus_info(data.train),
            "test": _corpus_info(data.test) | {"held_out_from_train": split["held_out_from_train"]},
            "augmented": _corpus_info(augmented)
            | {
                "used_per_seed": used,
                "soft_labelled": soft,
                "excluded": dict(data.excluded),
            },
        },
        "metrics": _metrics(data, protocol, outputs, tasks),
    }
    if protocol.task == "anomaly":
        result["tasks"] = _per_task(data, outputs, tasks)
    result["notes"] = _notes(data, protocol, used)
    if min(Counter(data.y_test.tolist()).values()) < SMALL_TEST_CLASS:
        for row in result["metrics"].values():
            row["difference"]["verdict"] += " (small test set)"
    return result


def _notes(data: _Data, protocol: Protocol, used: list[int]) -> list[str]:
    """What a reader of the numbers should know about how far they can be trusted."""
    notes = []
    smallest = min(Counter(data.y_test.tolist()).values())
    if smallest < SMALL_TEST_CLASS:
        notes.append(
            f"a test class has only {smallest} sample(s): the intervals (resampled within class) "
            "understate the uncertainty; use a larger --test"
        )
    if min(used) == 0:
        notes.append("no augmented sample was used by some seed: the arms are then identical")
    if protocol.train_fraction is None and protocol.seeds > 1:
        notes.append(
            f"without --train-fraction every seed trains on the same rows and lbfgs is deterministic, "
            f"so one probe per arm was fitted (not {protocol.seeds})"
        )
    return notes
