"""An evaluation result for people: the text summary ``augpipe evaluate`` prints, and the "Evaluation"
section of the HTML report (``augpipe inspect --html``), read from ``OUT/_augpipe/evaluation.json``."""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

from augpipe.pipeline.storage import Store

EVALUATION_FILE = Path("_augpipe") / "evaluation.json"
ARM_TITLES = {"original": "original", "augmented": "original + augmented"}


def save_evaluation(result: dict[str, Any], path: Path) -> None:
    Store(path.parent).write_bytes(path.name, json.dumps(result, indent=1).encode())


def read_evaluation(out_dir: Path) -> dict[str, Any] | None:
    """The last evaluation saved beside a corpus, or None."""
    path = out_dir / EVALUATION_FILE
    return json.loads(path.read_text()) if path.exists() else None


def describe_exclusions(excluded: dict[str, int]) -> str:
    """``{"parent_in_test": 3}`` as "3 parent in test", for messages and summaries."""
    return ", ".join(f"{n} {why.replace('_', ' ')}" for why, n in excluded.items())


def _interval(summary: dict[str, Any], signed: bool = False) -> str:
    fmt = "{:+.3f}" if signed else "{:.3f}"
    low, high = (fmt.format(v) for v in summary["ci"])
    return f"{fmt.format(summary['mean'])} [{low}, {high}]"


def _features_line(features: dict[str, Any]) -> str:
    if features["source"] == "column":
        names = features["columns"]
        columns = ", ".join(f"{role} {column}" for role, column in names.items())
        given = next(iter(names.values())) if len(set(names.values())) == 1 else columns
        return f"{features['modality']} vectors as given ({given}), {features['dim']}-d"
    model = f" {features['model']}" if "model" in features else ""
    where = f"{features['dim']}-d, {features['engine']}"
    return f"{features['field']} embedded by {features['backend']}{model} ({where})"


def _corpus_lines(result: dict[str, Any]) -> list[str]:
    corpora, protocol = result["corpora"], result["protocol"]
    train, test, aug = corpora["train"], corpora["test"], corpora["augmented"]
    split = protocol["test_split"]
    source = (
        f"held out of train ({split['fraction']:.0%} per class, seed {split['seed']})"
        if split["held_out_from_train"]
        else test["path"]
    )
    fraction = protocol["train_fraction"]
    low_resource = f"; low-resource: {fraction:.0%} per class, seeded" if fraction is not None else ""
    used = aug["used_per_seed"]
    used_text = str(used[0]) if len(set(used)) == 1 else f"{min(used)}-{max(used)} (per seed)"
    excluded = describe_exclusions(aug["excluded"])
    lines = [
        f"train      {train['path']}: {train['samples']} samples, "
        f"{len(train['classes'])} classes{low_resource}",
        f"test       {source}: {test['samples']} samples",
        f"augmented  {aug['path']}: {aug['samples']} samples, {used_text} used"
        + (f"; excluded: {excluded}" if excluded else ""),
    ]
    if aug["soft_labelled"]:
        lines.append(
            f"           {aug['soft_labelled']} soft-labelled: each expanded into one row per class, "
            "sample_weight = its weight"
        )
    for role in ("train", "test", "augmented"):
        if "unreadable" in corpora[role]:
            bad = corpora[role]["unreadable"]
            lines.append(
                f"warning: {bad['count']} {role} samples unreadable and skipped, e.g. {bad['example']}"
            )
    return lines


def summary_text(result: dict[str, Any]) -> str:
    protocol = result["protocol"]
    seeds = protocol["seeds_fitted"]
    lines = [
        f"augpipe evaluate ({result['task']}): a linear probe trained on original vs original + augmented",
        f"features   {_features_line(result['features'])}",
        *_corpus_lines(result),
        f"probe      {protocol['probe']}; {len(seeds)} seed{'s' * (len(seeds) > 1)}",
        "",
        f"{'':10s} {ARM_TITLES['original']:24s} {ARM_TITLES['augmented']:24s} difference",
    ]
    for name, row in result["metrics"].items():
        diff = row["difference"]
        lines.append(
            f"{name:10s} {_interval(row['original']):24s} {_interval(row['augmented']):24s} "
            f"{_interval(diff, signed=True)}  {diff['verdict']}"
        )
    for task in result.get("tasks", []):
        scores = "  ".join(
            f"{name} {task['original'][name]:.3f} -> {task['augmented'][name]:.3f}"
            for name in task["original"]
        )
        lines.append(f"  held out {task['held_out']!r} ({task['test_anomalies']} test anomalies): {scores}")
    lines.append(
        f"[low, high]: {protocol['confidence']:.0%} intervals by percentile {protocol['bootstrap']} "
        f"({protocol['replicates']} replicates)"
    )
    lines.extend(f"note: {note}" for note in [*result["features"]["notes"], *result["notes"]])
    return "\n".join(lines)


def evaluation_html(result: dict[str, Any]) -> str:
    """The "Evaluation" section of the HTML report: the metric table, then the summary it came from."""
    rows = []
    for name, row in result["metrics"].items():
        cells = [html.escape(name), _interval(row["original"]), _interval(row["augmented"])]
        cells += [_interval(row["difference"], signed=True), row["difference"]["verdict"]]
        rows.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
    head = "".join(
        f"<th>{html.escape(h)}</th>"
        for h in ("metric", ARM_TITLES["original"], ARM_TITLES["augmented"], "difference", "verdict")
    )
    return (
        f"<h2>Evaluation</h2><p>Linear probe, {html.escape(result['task'])}: does the augmented corpus "
        f"help? (<code>augpipe evaluate</code>, {html.escape(result.get('created', ''))})</p>"
        f"<table><tr>{head}</tr>{''.join(rows)}</table><pre>{html.escape(summary_text(result))}</pre>"
    )


def evaluation_section(out_dir: Path) -> str:
    """The report's Evaluation section for the corpus in ``out_dir``; empty when it was never evaluated."""
    result = read_evaluation(out_dir)
    return evaluation_html(result) if result is not None else ""
