"""`augpipe evaluate`: the linear-probe A/B tells a helpful augmented corpus from a harmful one.

Most corpora here are Parquet tables of generated class-structured vectors (Gaussian classes), so the
probe's answer is known in advance and the tests run in seconds; the image cases run the real embed
stage with the tiny CLIP backend, in-process, and one test runs the same through Ray.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from click.testing import CliRunner
from PIL import Image
from sklearn.metrics import accuracy_score, average_precision_score, f1_score, roc_auc_score

from augpipe.evaluate.command import evaluate
from augpipe.evaluate.corpus import EvaluationError, parse_soft_label
from augpipe.evaluate.protocol import Protocol
from augpipe.evaluate.render import EVALUATION_FILE, evaluation_section
from augpipe.methods.probe import (
    accuracy,
    auroc,
    average_precision,
    bootstrap_counts,
    expand_soft_labels,
    macro_f1,
    stratified_holdout,
    stratified_subsample,
)
from augpipe.pipeline.cli import main

CLASSES, DIM = 4, 16
FAST = Protocol(replicates=200)


# ------------------------------------------------------------------------------------------ corpora


def class_means(seed: int = 0, spread: float = 1.0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(CLASSES, DIM)) * spread


def draw(prefix: str, per_class: int, seed: int, means: np.ndarray) -> list[dict]:
    """``per_class`` samples of each Gaussian class: key, label and a vector."""
    rng = np.random.default_rng(seed)
    return [
        {"key": f"{prefix}{c}x{i}", "label": f"c{c}", "vector": means[c] + rng.normal(size=DIM)}
        for c in range(CLASSES)
        for i in range(per_class)
    ]


def write_table(folder: Path, rows: list[dict], column: str = "text_embedding") -> Path:
    """A Parquet corpus: key, the rows' other fields, and their vectors as a fixed-size list column."""
    folder.mkdir(parents=True, exist_ok=True)
    width = len(rows[0]["vector"]) if rows else DIM
    columns = {
        name: [r.get(name) for r in rows]
        for name in dict.fromkeys(n for r in rows for n in r)
        if name != "vector"
    }
    columns[column] = pa.array(
        [np.asarray(r["vector"]).tolist() for r in rows], pa.list_(pa.float32(), width)
    )
    table = (
        pa.table(columns) if rows else pa.table({"key": pa.array([], pa.string()), column: columns[column]})
    )
    pq.write_table(table, folder / "part-00000.parquet")
    return folder


def augmented_rows(train: list[dict], per_parent: int, seed: int, means: np.ndarray) -> list[dict]:
    """Samples drawn from each parent's true class distribution, keyed and parented as augpipe writes them."""
    rng = np.random.default_rng(seed)
    rows = []
    for parent in train:
        c = int(parent["label"][1:])
        for v in range(per_parent):
            vector = means[c] + rng.normal(size=DIM)
            rows.append(
                {
                    "key": f"{parent['key']}-aug-{v}",
                    "parent_key": parent["key"],
                    "label": parent["label"],
                    "vector": vector,
                }
            )
    return rows


@pytest.fixture(scope="module")
def few_shot(tmp_path_factory) -> dict[str, Path | list[dict] | np.ndarray]:
    """Two shots per class to train on, 50 per class to test on, and augmented samples of the true classes."""
    root = tmp_path_factory.mktemp("few_shot")
    means = class_means()
    train = draw("tr", 2, seed=1, means=means)
    test = draw("te", 50, seed=2, means=means)
    return {
        "means": means,
        "train_rows": train,
        "train": write_table(root / "train", train),
        "test": write_table(root / "test", test),
        "augmented": write_table(root / "augmented", augmented_rows(train, 12, seed=3, means=means)),
        "root": root,
    }


def diff(result: dict, metric: str = "accuracy") -> dict:
    return result["metrics"][metric]["difference"]


# ------------------------------------------------------------------------------------- the verdicts


def test_augmented_samples_from_the_true_classes_help(few_shot):
    result = evaluate(few_shot["train"], few_shot["augmented"], few_shot["test"], FAST)
    for metric in ("accuracy", "macro_f1"):
        row = result["metrics"][metric]
        assert row["difference"]["ci"][0] > 0, row
        assert row["difference"]["verdict"] == "helps"
        assert row["augmented"]["mean"] == pytest.approx(row["original"]["mean"] + row["difference"]["mean"])
    augmented = result["corpora"]["augmented"]
    assert augmented["samples"] == 8 * 12 and augmented["used_per_seed"] == [96]
    assert (
        result["corpora"]["test"]["samples"] == 200 and not result["corpora"]["test"]["held_out_from_train"]
    )
    assert result["features"] == {
        "modality": "text",
        "notes": [],
        "source": "column",
        "columns": {"train": "text_embedding", "augmented": "text_embedding", "test": "text_embedding"},
        "dim": DIM,
    }


def test_augmented_samples_with_shuffled_labels_hurt(few_shot, tmp_path):
    rows = augmented_rows(few_shot["train_rows"], 12, seed=3, means=few_shot["means"])
    shuffled = np.random.default_rng(4).permutation([r["label"] for r in rows])
    for row, label in zip(rows, shuffled, strict=True):
        row["label"] = str(label)
    result = evaluate(few_shot["train"], write_table(tmp_path / "shuffled", rows), few_shot["test"], FAST)
    for metric in ("accuracy", "macro_f1"):
        assert diff(result, metric)["ci"][1] < 0 and diff(result, metric)["verdict"] == "hurts"


@pytest.mark.parametrize("typed", [False, True], ids=["json-string", "list-of-structs"])
def test_soft_labels_are_used_as_weighted_rows_instead_of_the_hard_label(few_shot, tmp_path, typed):
    """Hard labels all wrong, soft labels right: only a probe that trains on the soft labels gains."""
    rows = augmented_rows(few_shot["train_rows"], 12, seed=3, means=few_shot["means"])
    for row in rows:
        true = row["label"]
        wrong = f"c{(int(true[1:]) + 1) % CLASSES}"
        row["label"] = wrong
        soft = {true: 0.8, wrong: 0.2}
        row["soft_label"] = (
            [{"label": k, "weight": w} for k, w in soft.items()] if typed else json.dumps(soft)
        )
    augmented = write_table(tmp_path / "soft", rows)
    soft_type = pq.read_schema(augmented / "part-00000.parquet").field("soft_label").type
    assert pa.types.is_list(soft_type) if typed else pa.types.is_string(soft_type)
    result = evaluate(few_shot["train"], augmented, few_shot["test"], FAST)
    assert result["corpora"]["augmented"]["soft_labelled"] == len(rows)
    assert diff(result)["ci"][0] > 0
    assert "sample_weight" in result["protocol"]["soft_labels"]


def test_soft_label_expansion_and_both_column_formats():
    x = np.arange(6, dtype=np.float32).reshape(3, 2)
    xe, ye, we = expand_soft_labels(x, np.array([0, 1, -1]), [None, {0: 3.0, 2: 1.0}, {1: 1.0}])
    assert ye.tolist() == [0, 0, 2, 1] and we.tolist() == [1.0, 0.75, 0.25, 1.0]
    assert xe.tolist() == [[0, 1], [2, 3], [2, 3], [4, 5]]
    as_json = parse_soft_label('{"cat": 0.7, "dog": 0.3}', "s")
    typed = parse_soft_label([{"label": "cat", "weight": 0.7}, {"label": "dog", "weight": 0.3}], "s")
    assert as_json == typed == {"cat": 0.7, "dog": 0.3}
    assert parse_soft_label(json.dumps([["cat", 1.0]]), "s") == {"cat": 1.0}
    assert parse_soft_label(None, "s") is None
    with pytest.raises(EvaluationError, match="sample k1: soft_label"):
        parse_soft_label("not json", "sample k1")
    with pytest.raises(EvaluationError, match="non-negative"):
        parse_soft_label({"cat": -1.0}, "sample k1")


# ------------------------------------------------------------------------------------- low resource


def test_stratified_subsample_and_holdout_are_seeded_and_keep_every_class():
    labels = np.repeat([0, 1, 2], [20, 10, 1])
    pick = stratified_subsample(labels, 0.1, seed=7)
    assert np.bincount(labels[pick]).tolist() == [2, 1, 1]
    assert pick.tolist() == stratified_subsample(labels, 0.1, seed=7).tolist()
    assert pick.tolist() != stratified_subsample(labels, 0.1, seed=8).tolist()
    train, test = stratified_holdout(labels, 0.3, seed=0)
    assert np.bincount(labels[test], minlength=3).tolist() == [6, 3, 0]
    assert sorted([*train, *test]) == list(range(len(labels)))


def test_low_resource_mode_drops_augmented_samples_whose_parent_is_not_in_the_subsample(tmp_path):
    means = class_means(spread=0.6)
    train = draw("tr", 20, seed=1, means=means)
    rows = augmented_rows(train, 2, seed=3, means=means)
    protocol = Protocol(seeds=3, train_fraction=0.1, replicates=200)
    result = evaluate(
        write_table(tmp_path / "train", train),
        write_table(tmp_path / "augmented", rows),
        write_table(tmp_path / "test", draw("te", 30, seed=2, means=means)),
        protocol,
    )
    labels = np.array([r["label"] for r in train])
    expected = []
    for seed in range(3):
        inside = {train[i]["key"] for i in stratified_subsample(labels, 0.1, seed)}
        expected.append(sum(r["parent_key"] in inside for r in rows))
    assert expected == [16, 16, 16]  # 2 of 20 per class, 2 augmented samples each
    assert result["corpora"]["augmented"]["used_per_seed"] == expected
    assert result["protocol"]["seeds_fitted"] == [0, 1, 2]
    per_seed = result["metrics"]["accuracy"]["original"]["per_seed"]
    assert len(per_seed) == 3 and len(set(per_seed)) > 1, "each seed trains on its own subsample"
    assert diff(result)["mean"] > 0


def test_a_test_set_held_out_of_train_excludes_augmented_samples_made_from_it(few_shot, tmp_path):
    means = few_shot["means"]
    train = draw("tr", 10, seed=1, means=means)
    result = evaluate(
        write_table(tmp_path / "train", train),
        write_table(tmp_path / "augmented", augmented_rows(train, 1, seed=3, means=means)),
        None,
        Protocol(test_fraction=0.3, replicates=200),
    )
    corpora = result["corpora"]
    assert corpora["test"]["held_out_from_train"] and corpora["test"]["samples"] == 4 * 3
    assert corpora["train"]["samples"] == 4 * 7
    assert corpora["augmented"]["excluded"] == {"parent_in_test": 12}
    assert corpora["augmented"]["used_per_seed"] == [28]
    assert result["metrics"]["accuracy"]["difference"]["verdict"].endswith("(small test set)")


# ------------------------------------------------------------------------------------------ anomaly


def test_anomaly_mode_holds_each_class_out_and_scores_auroc_and_aupr(few_shot):
    result = evaluate(
        few_shot["train"], few_shot["augmented"], few_shot["test"], Protocol(task="anomaly", replicates=200)
    )
    assert set(result["metrics"]) == {"auroc", "aupr"}
    tasks = result["tasks"]
    assert [t["held_out"] for t in tasks] == ["c0", "c1", "c2", "c3"]
    assert all(t["test_anomalies"] == 50 for t in tasks)
    auroc_row = result["metrics"]["auroc"]
    assert auroc_row["original"]["mean"] == pytest.approx(np.mean([t["original"]["auroc"] for t in tasks]))
    assert 0.5 < auroc_row["original"]["mean"] <= 1 and auroc_row["difference"]["ci"][0] > 0


def test_anomaly_mode_drops_augmented_samples_of_the_held_out_class(few_shot, tmp_path):
    """Every augmented sample belongs to (or mixes in) the held-out class: the arms must be identical."""
    rows = [r for r in augmented_rows(few_shot["train_rows"], 3, seed=3, means=few_shot["means"])]
    for row in rows:
        if row["label"] != "c0":
            row["soft_label"] = json.dumps({row["label"]: 0.9, "c0": 0.1})
    protocol = Protocol(task="anomaly", anomaly_class="c0", replicates=200)
    result = evaluate(few_shot["train"], write_table(tmp_path / "aug", rows), few_shot["test"], protocol)
    assert [t["held_out"] for t in result["tasks"]] == ["c0"]
    for metric in ("auroc", "aupr"):
        assert diff(result, metric)["mean"] == 0 and diff(result, metric)["ci"] == [0.0, 0.0]


# ------------------------------------------------------------------------------------------ metrics


def test_weighted_and_bootstrapped_metrics_equal_scikit_learn():
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 4, 300)
    predicted = np.where(rng.random(300) < 0.6, truth, rng.integers(0, 5, 300))
    positive = truth == 0
    scores = np.round(rng.normal(size=300) + positive, 1)  # rounded: ties must count one half
    weights = bootstrap_counts(truth, 20, seed=1)
    assert (weights[:, truth == 2].sum(axis=1) == (truth == 2).sum()).all(), "resampled within class"
    labels = np.unique(truth)
    for w in weights[:5]:
        assert accuracy(truth, predicted, w) == pytest.approx(
            accuracy_score(truth, predicted, sample_weight=w)
        )
        assert macro_f1(truth, predicted, w) == pytest.approx(
            f1_score(truth, predicted, labels=labels, average="macro", sample_weight=w, zero_division=0)
        )
        assert auroc(positive, scores, w) == pytest.approx(roc_auc_score(positive, scores, sample_weight=w))
        assert average_precision(positive, scores, w) == pytest.approx(
            average_precision_score(positive, scores, sample_weight=w)
        )
    batched = auroc(positive, scores, weights)
    assert batched.shape == (20,) and batched[7] == pytest.approx(auroc(positive, scores, weights[7]))


# ------------------------------------------------------------------------------------------- errors


def invoke(*args: str | Path) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["evaluate", *map(str, args)])
    return result.exit_code, result.output


def error_line(output: str) -> str:
    lines = [line for line in output.splitlines() if line.startswith("augpipe: error:")]
    assert len(lines) == 1 and output.strip().endswith(lines[0]), output
    return lines[0]


def test_bad_input_exits_2_with_one_line_naming_the_cause(few_shot, tmp_path):
    means, train = few_shot["means"], few_shot["train_rows"]

    def corpus(name: str, rows: list[dict], column: str = "text_embedding") -> Path:
        return write_table(tmp_path / name, rows, column)

    unlabelled = [{k: v for k, v in r.items() if k != "label"} for r in train]

    def binary(prefix: str) -> Path:
        return corpus(prefix, [r for r in draw(prefix, 20, 9, means) if r["label"] in {"c0", "c1"}])

    good = {"--train": few_shot["train"], "--augmented": few_shot["augmented"], "--test": few_shot["test"]}
    cases = {
        "test corpus": (
            {"--test": corpus("unseen", [{**r, "label": "zebra"} for r in draw("u", 1, 5, means)])},
            [],
        ),
        "train corpus": ({"--train": corpus("unlabelled", unlabelled)}, []),
        "augmented corpus": ({"--augmented": corpus("aug_unlabelled", unlabelled)}, []),
        "widths": ({"--augmented": corpus("narrow", [{**r, "vector": r["vector"][:8]} for r in train])}, []),
        "modalities": ({"--augmented": corpus("images", train, column="image_embedding")}, []),
        "empty": ({"--augmented": corpus("empty", [])}, []),
        "parents": ({"--augmented": corpus("no_parent", train)}, ["--train-fraction", "0.5"]),
        "anomaly": (
            {"--train": binary("b0"), "--augmented": binary("b1"), "--test": binary("b2")},
            ["--task", "anomaly"],
        ),
        "copies": ({"--augmented": few_shot["train"]}, []),
        "column": ({}, ["--features", "clip"]),
    }
    expected = {
        "test corpus": "has labels the training corpus never shows: 'zebra' (4, e.g. u0x0)",
        "train corpus": f"sample {train[0]['key']} has no label",
        "augmented corpus": f"corpus {tmp_path / 'aug_unlabelled'}: sample {train[0]['key']} has no label",
        "widths": "feature widths differ between corpora (train 16, augmented 8, test 16)",
        "modalities": "share no image or text features (mismatched modalities: train has text_embedding; "
        "augmented has image_embedding; test has text_embedding)",
        "empty": f"augmented corpus {tmp_path / 'empty'} holds no samples",
        "parents": f"sample {train[0]['key']} has no parent_key, which --train-fraction needs",
        "anomaly": "needs at least 3 classes",
        "copies": "none of its 8 samples is usable (8 copy of an original sample)",
        "column": "--features clip: the train corpus has no column 'clip'",
    }
    for case, (paths, options) in cases.items():
        args = [part for flag, path in (good | paths).items() for part in (flag, path)]
        code, output = invoke(*args, *options)
        assert code == 2, (case, output)
        assert expected[case] in error_line(output), (case, output)


# ------------------------------------------------------------------------------------- media, CLI


def coloured(colour: tuple[int, int, int], seed: int) -> bytes:
    noise = np.random.default_rng(seed).integers(-40, 40, (32, 32, 3))
    pixels = np.clip(np.array(colour) + noise, 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


COLOURS = {"red": (200, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 200)}


def write_image_corpus(folder: Path, per_class: int, prefix: str, seed: int, parents: bool = False) -> Path:
    """One WebDataset shard of noisy coloured squares labelled by colour; with ``parents``, a sidecar of
    parent keys and soft labels as augpipe writes them."""
    folder.mkdir(parents=True, exist_ok=True)
    keys, sidecar = [], {"key": [], "parent_key": [], "soft_label": []}
    with wds.TarWriter(str(folder / "shard-00000.tar")) as sink:
        for c, (name, colour) in enumerate(COLOURS.items()):
            for i in range(per_class):
                key = f"{prefix}{c}x{i}"
                keys.append(key)
                sink.write(
                    {
                        "__key__": key,
                        "png": coloured(colour, seed * 1000 + c * 100 + i),
                        "json": {"label": name},
                    }
                )
                sidecar["key"].append(key)
                sidecar["parent_key"].append(f"tr{c}x{i % 2}")
                sidecar["soft_label"].append(json.dumps({name: 1.0}))
    if parents:
        pq.write_table(pa.table(sidecar), folder / "shard-00000.parquet")
    return folder


def test_cli_end_to_end_on_image_shards_with_the_tiny_encoder(tmp_path):
    train = write_image_corpus(tmp_path / "train", 2, "tr", seed=1)
    augmented = write_image_corpus(tmp_path / "augmented", 6, "au", seed=2, parents=True)
    test = write_image_corpus(tmp_path / "test", 10, "te", seed=3)
    report = tmp_path / "report.json"
    code, output = invoke(
        "--train", train, "--augmented", augmented, "--test", test, "--set", "backend=tiny",
        "--seeds", "2", "--bootstrap", "200", "--json", report,
    )  # fmt: skip
    assert code == 0, output
    assert "image embedded by tiny tiny-clip(seed=0,dim=32) (32-d, in-process)" in output
    assert "18 soft-labelled: each expanded into one row per class, sample_weight = its weight" in output
    assert output.splitlines()[-1] == f"wrote {report}"
    saved = json.loads(report.read_text())
    assert saved == json.loads((augmented / EVALUATION_FILE).read_text())
    assert saved["features"]["engine"] == "in-process" and saved["features"]["dim"] == 32
    assert set(saved["metrics"]) == {"accuracy", "macro_f1"}
    for row in saved["metrics"].values():
        for arm in ("original", "augmented"):
            low, high = row[arm]["ci"]
            assert 0 <= low <= row[arm]["mean"] <= high <= 1
    section = evaluation_section(augmented)
    assert section.startswith("<h2>Evaluation</h2>") and "original + augmented" in section
    assert "accuracy" in section and evaluation_section(train) == ""


def test_mixup_output_evaluated_on_ray_matches_in_process_and_reaches_the_html_report(tmp_path, ray_session):
    from augpipe.pipeline.config import load_recipe
    from augpipe.pipeline.manifest import read_manifest
    from augpipe.pipeline.report import html_report
    from augpipe.pipeline.run import run_recipe

    train = write_image_corpus(tmp_path / "train", 4, "tr", seed=1)
    test = write_image_corpus(tmp_path / "test", 8, "te", seed=3)
    out = tmp_path / "mixup"
    assert run_recipe(load_recipe("mixup", sets=["multiple=2"]), train, out, progress=False).ok
    tiny = {"backend": "tiny"}
    protocol = Protocol(seeds=2, train_fraction=0.5, replicates=200)
    on_ray = evaluate(train, out, test, protocol, "image", tiny, engine="ray")
    assert on_ray["features"]["engine"] == "ray"
    augmented = on_ray["corpora"]["augmented"]
    written = read_manifest(out)["samples"]["out"]  # 24 mixes less the copies that were dropped
    assert 0 < written <= 24 and augmented["samples"] == augmented["soft_labelled"] == written
    caches = sorted((out / "_augpipe" / "cache" / "evaluate").iterdir())
    assert [p.name.split("-")[0] for p in caches] == ["augmented", "test", "train"]
    markers = {p: p.stat().st_mtime_ns for cache in caches for p in cache.glob("_augpipe/stats/*.json")}
    assert len(markers) == 3

    again = evaluate(train, out, test, protocol, "image", tiny, engine="ray")
    assert {p: p.stat().st_mtime_ns for p in markers} == markers, "a re-run reuses the cached embeddings"
    in_process = evaluate(train, out, test, protocol, "image", tiny, engine="in-process")
    for result in (again, in_process):
        assert result["metrics"] == on_ray["metrics"]
        assert result["corpora"] == on_ray["corpora"]

    page = html_report(out, read_manifest(out))
    section = page[page.index("<h2>Evaluation</h2>") :]
    assert "accuracy" in section and "macro_f1" in section and "original + augmented" in section
