"""``augpipe evaluate``: does an augmented corpus help? A linear-probe A/B, from the command line or code."""

from __future__ import annotations

import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click

from augpipe.evaluate.protocol import Protocol
from augpipe.pipeline.console import EXIT_MODEL, EXIT_USAGE, fail


def evaluate(
    train: Path,
    augmented: Path,
    test: Path | None = None,
    protocol: Protocol | None = None,
    features: str = "auto",
    embed_options: dict[str, Any] | None = None,
    engine: str = "auto",
    address: str | None = None,
) -> dict[str, Any]:
    """Run the A/B and return its result; it is also saved as ``<augmented>/_augpipe/evaluation.json``
    when the augmented corpus is a folder (the HTML report shows it). Raises EvaluationError on bad input."""
    import augpipe
    from augpipe.evaluate.features import load_corpora
    from augpipe.evaluate.protocol import evaluate_ab
    from augpipe.evaluate.render import EVALUATION_FILE, save_evaluation

    paths = {"train": train, "augmented": augmented} | ({"test": test} if test is not None else {})
    with tempfile.TemporaryDirectory(prefix="augpipe-evaluate-") as scratch:
        # Ray-embedded vectors are cached beside the augmented corpus, so a re-run reuses them.
        cache = augmented / "_augpipe" / "cache" / "evaluate" if augmented.is_dir() else Path(scratch)
        corpora, features_info = load_corpora(paths, features, embed_options, engine, cache, address)
    result = {
        "augpipe_version": augpipe.__version__,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "features": features_info,
    } | evaluate_ab(corpora["train"], corpora["augmented"], corpora.get("test"), protocol or Protocol())
    if augmented.is_dir():
        save_evaluation(result, augmented / EVALUATION_FILE)
    return result


CORPUS = click.Path(exists=True, path_type=Path)


@click.command("evaluate")
@click.option("--train", "train", required=True, type=CORPUS, help="The original (training) corpus.")
@click.option("--augmented", required=True, type=CORPUS, help="The augmented corpus (augpipe's output).")
@click.option(
    "--test",
    type=CORPUS,
    help="Held-out test corpus. Without it, a seeded stratified --test-fraction of --train is held out.",
)
@click.option(
    "--features",
    default="auto",
    show_default=True,
    help="image, text, auto, or an embedding column every corpus carries (e.g. text_embedding).",
)
@click.option(
    "--task",
    type=click.Choice(["classify", "anomaly"]),
    default="classify",
    show_default=True,
    help="classify: accuracy, macro-F1; anomaly: AUROC, AUPR with a class held out of training (CMDA).",
)
@click.option(
    "--seeds",
    default=5,
    show_default=True,
    type=click.IntRange(1),
    help="Seeds; each draws its own --train-fraction subsample and seeds the probe.",
)
@click.option(
    "--train-fraction",
    type=click.FloatRange(0, 1, min_open=True),
    help="Low-resource mode: train on this seeded, stratified fraction of --train (per seed).",
)
@click.option(
    "--test-fraction",
    default=0.3,
    show_default=True,
    type=click.FloatRange(0, 1, min_open=True, max_open=True),
    help="Share of each class held out of --train when --test is not given.",
)
@click.option("--anomaly-class", help="Anomaly task: the class held out (default: each class in turn).")
@click.option(
    "--bootstrap",
    "replicates",
    default=1000,
    show_default=True,
    type=click.IntRange(100),
    help="Bootstrap replicates for the intervals.",
)
@click.option(
    "--set",
    "sets",
    multiple=True,
    metavar="KEY=VALUE",
    help="Option of the embed stage, e.g. backend=clip, model=/models/clip, batch_size=128, gpus=0.5.",
)
@click.option(
    "--engine",
    type=click.Choice(["auto", "in-process", "ray"]),
    default="auto",
    show_default=True,
    help="Where the encoder runs; auto: Ray above 2,000 images or 50,000 texts.",
)
@click.option("--address", help="Ray cluster to join when embedding on Ray; default: a local instance.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), help="Write JSON here.")
def evaluate_command(
    train: Path,
    augmented: Path,
    test: Path | None,
    features: str,
    task: str,
    seeds: int,
    train_fraction: float | None,
    test_fraction: float,
    anomaly_class: str | None,
    replicates: int,
    sets: tuple[str, ...],
    engine: str,
    address: str | None,
    json_path: Path | None,
) -> None:
    """Does --augmented help? Trains the same linear probe on frozen-encoder features of --train and
    of --train + --augmented, and reports both scores on --test with bootstrap intervals.

    Exit codes: 0 done, 2 bad input (no labels, unseen test labels, mismatched features), 4 missing model.
    """
    from augpipe.evaluate.corpus import EvaluationError
    from augpipe.evaluate.render import save_evaluation, summary_text
    from augpipe.pipeline.config import ConfigError, parse_set
    from augpipe.pipeline.models import ModelNotFoundError

    protocol = Protocol(
        task=task,
        seeds=seeds,
        train_fraction=train_fraction,
        test_fraction=test_fraction,
        anomaly_class=anomaly_class,
        replicates=replicates,
    )
    try:
        overlay = parse_set(list(sets))
        if overlay.pop("stages"):
            raise ConfigError(
                "--set takes embed options as KEY=VALUE (e.g. backend=clip), without a stage name"
            )
        result = evaluate(train, augmented, test, protocol, features, overlay, engine, address)
    except (EvaluationError, ConfigError) as exc:
        fail(str(exc), EXIT_USAGE)
    except ModelNotFoundError as exc:
        fail(str(exc), EXIT_MODEL)
    click.echo(summary_text(result))
    if json_path is not None:
        save_evaluation(result, json_path)
        click.echo(f"wrote {json_path}")
