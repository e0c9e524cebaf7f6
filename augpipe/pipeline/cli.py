"""The ``augpipe`` command line.

Exit codes:
  0    the run finished within --max-failure-rate (or the command succeeded)
  1    an unexpected internal error (a bug: please report it with the traceback)
  2    bad usage or configuration: unknown recipe, stage, option or key, bad input, an output folder in use
       by another run or holding another corpus
  3    the run finished but failures exceeded --max-failure-rate, or shards could not be written
  4    a configured model is missing (the message says how to provide it)
  5    validate found problems in a corpus
  6    storage error: the output is full, read-only or not writable (the run stopped cleanly)
  130  interrupted by SIGINT (Ctrl-C), 143 by SIGTERM: finished shards stay, the manifest says what finished
"""

from __future__ import annotations

import json
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import click

from augpipe.evaluate.command import evaluate_command
from augpipe.pipeline.config import ConfigError, available_recipes, load_recipe
from augpipe.pipeline.console import (
    EXIT_FAILURES,
    EXIT_INVALID,
    EXIT_MODEL,
    EXIT_SIGNAL,
    EXIT_STORAGE,
    EXIT_USAGE,
    fail,
    setup_logging,
    stop_on_signals,
)
from augpipe.pipeline.models import ModelNotFoundError


@contextmanager
def _exit_codes() -> Iterator[None]:
    """The documented exit code and a one-line message for each error a user can cause."""
    from augpipe.pipeline.storage import StorageError

    try:
        yield
    except ConfigError as exc:
        fail(str(exc), EXIT_USAGE)
    except ModelNotFoundError as exc:
        fail(str(exc), EXIT_MODEL)
    except StorageError as exc:
        fail(f"storage: {exc}", EXIT_STORAGE)


@click.group(
    epilog="Exit codes: 0 ok, 1 internal error, 2 usage/config, 3 too many failures, "
    "4 missing model, 5 invalid corpus, 6 storage error, 130/143 interrupted (SIGINT/SIGTERM)."
)
@click.version_option(package_name="augpipe")
def main() -> None:
    """Offline cross-modal data augmentation: back-speech, back-captioning, back-imagination, CMDA, mixup."""


@main.command()
@click.argument("recipe")
@click.option(
    "--input",
    "input_path",
    required=True,
    help="Input corpus: a folder of WebDataset shards, one tar, or a Parquet/CSV text table; a local path "
    "or a URL (s3://bucket/prefix?endpoint_override=host:port, gs://...).",
)
@click.option(
    "--output",
    "out_dir",
    required=True,
    help="Output folder (local path or URL); re-running the same command resumes into it.",
)
@click.option(
    "--profile",
    default="cpu",
    show_default=True,
    help="Backend profile from configs/profiles (tiny, cpu, gpu) or a YAML path.",
)
@click.option(
    "--config",
    "config_file",
    type=click.Path(exists=True, dir_okay=False),
    help="YAML overlay of the same shape as a profile.",
)
@click.option(
    "--set",
    "sets",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override one option, e.g. --set transcribe.variants=2 or --set multiple=3.",
)
@click.option("--address", help="Ray cluster address to join; default: start a local Ray instance.")
@click.option("--incremental", is_flag=True, help="Process only input shards new since the last manifest.")
@click.option(
    "--max-failure-rate",
    default=0.05,
    show_default=True,
    type=click.FloatRange(0, 1),
    help="Exit 3 when failed samples / input samples exceeds this.",
)
@click.option("--seed", type=int, help="Run seed (default: the recipe's).")
@click.option(
    "--overwrite",
    is_flag=True,
    help="Rebuild the corpus in --output when it was made with another recipe/config.",
)
@click.option("--keep-cache", is_flag=True, help="Keep per-stage caches of finished shards (for reuse).")
@click.option(
    "--verify", is_flag=True, help="Checksum every committed shard before skipping it (default: size, mtime)."
)
@click.option(
    "--executor",
    type=click.Choice(["ray", "local"]),
    default="ray",
    show_default=True,
    help="ray: actor pools on a local or joined Ray cluster; local: in-process, one shard at a time "
    "(debugging).",
)
@click.option("--quiet", is_flag=True, help="No progress lines.")
def run(
    recipe: str,
    input_path: str,
    out_dir: str,
    profile: str,
    config_file: str | None,
    sets: tuple[str, ...],
    address: str | None,
    incremental: bool,
    max_failure_rate: float,
    seed: int | None,
    overwrite: bool,
    keep_cache: bool,
    verify: bool,
    executor: str,
    quiet: bool,
) -> None:
    """Run RECIPE (a name from 'augpipe recipes' or a YAML path) over --input into --output."""
    from augpipe.pipeline.run import RunOptions, run_recipe

    setup_logging(quiet)
    stop = threading.Event()
    options = RunOptions(
        address=address,
        incremental=incremental,
        max_failure_rate=max_failure_rate,
        progress=not quiet,
        overwrite=overwrite,
        keep_cache=keep_cache,
        verify=verify,
        executor=executor,
        stop=stop,
    )
    with stop_on_signals(stop) as received, _exit_codes():
        resolved = load_recipe(recipe, profile=profile, config_file=config_file, sets=list(sets), seed=seed)
        result = run_recipe(resolved, input_path, out_dir, options)
    _report(result, max_failure_rate, received)


def _report(result: object, max_failure_rate: float, received: list[int]) -> None:
    """The closing lines of ``run`` and its exit code."""
    from augpipe.pipeline.run import RunResult

    assert isinstance(result, RunResult)
    samples = result.manifest["samples"]
    where = result.manifest_path or f"not written ({result.manifest_error})"
    click.echo(
        f"augpipe: {samples['in']} samples in, {samples['out']} out, {samples['failed']} failed "
        f"({samples['failure_rate']:.1%}); manifest: {where}"
    )
    if received:
        fail(
            f"interrupted by {signal.Signals(received[0]).name}; re-run the same command to resume",
            EXIT_SIGNAL[received[0]],
        )
    if result.aborted is not None:
        code = EXIT_STORAGE if result.aborted.cause == "storage" else EXIT_FAILURES
        fail(f"run stopped: {result.aborted}", code)
    if not result.ok:
        for example in result.manifest["failures"]["examples"][:10]:
            click.echo(
                f"  {example['key']} [{example['stage']}/{example['cause']}]: {example['message']}", err=True
            )
        for shard, info in result.manifest["incomplete_shards"].items():
            click.echo(f"  {shard} not written: {info['message']}", err=True)
        fail(
            f"failure rate {result.failure_rate:.1%} exceeds --max-failure-rate {max_failure_rate:.1%}"
            if result.failure_rate > max_failure_rate
            else "some shards could not be written",
            EXIT_FAILURES,
        )


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print each recipe's file, stages, input and output.")
def recipes(as_json: bool) -> None:
    """List the recipes shipped in configs/recipes."""
    from augpipe.pipeline.config import describe_recipe

    described = [describe_recipe(name, path) for name, path in available_recipes().items()]
    if as_json:
        click.echo(json.dumps(described, indent=2))
        return
    for recipe in described:
        click.echo(f"{recipe['name']:20s} {recipe['description']}")


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print each stage's options with their defaults.")
def stages(as_json: bool) -> None:
    """List stages with their backends and default resources (options with --json)."""
    from augpipe.pipeline.registry import describe_stage, stage_names

    described = [describe_stage(name) for name in stage_names()]
    if as_json:
        click.echo(json.dumps(described, indent=2))
        return
    for stage in described:
        r = stage["resources"]
        click.echo(
            f"{stage['name']:20s} backends: {', '.join(stage['backends']) or '-'}; "
            f"default: {stage['default_backend'] or '-'}; "
            f"cpus {r['cpus']}, gpus {r['gpus']}, batch {stage['batch_size'] or 'whole shard'}"
        )


@main.command()
@click.argument("out_dir")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
@click.option(
    "--html",
    "html_file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write a report page: generated samples beside their sources and strongest contributors.",
)
@click.option(
    "--samples", default=5, show_default=True, help="Generated samples to show beside their sources."
)
def inspect(out_dir: str, as_json: bool, html_file: Path | None, samples: int) -> None:
    """Summarise an output corpus: counts, per-stage throughput, failures, reuse, example samples."""
    from augpipe.pipeline.manifest import ManifestError, read_manifest
    from augpipe.pipeline.report import summary_text

    try:
        manifest = read_manifest(out_dir)
    except ManifestError as exc:
        fail(str(exc), EXIT_USAGE)
    if as_json:
        click.echo(json.dumps(manifest, indent=2))
        return
    if html_file is not None:
        from augpipe.pipeline.report import html_report

        html_file.write_text(html_report(Path(out_dir), manifest, samples))
        click.echo(f"wrote {html_file}")
        return
    click.echo(summary_text(Path(out_dir), manifest, samples))


@main.command()
@click.argument("path")
def validate(path: str) -> None:
    """Check an output corpus (folder or URL: manifest, checksums, counts, strays) or a recipe YAML."""
    from augpipe.pipeline.validate import validate_path

    problems = validate_path(path)
    for problem in problems:
        click.echo(f"invalid: {problem}", err=True)
    if problems:
        sys.exit(EXIT_INVALID)
    click.echo(f"{path}: valid")


@main.command()
@click.argument("source", type=click.Path(exists=True, path_type=Path))
@click.option("--output", "out_dir", required=True, type=click.Path(path_type=Path))
@click.option("--shard-size", default=1000, show_default=True, help="Samples per output shard.")
def ingest(source: Path, out_dir: Path, shard_size: int) -> None:
    """Convert a CSV/Parquet text table, a folder of images with captions, or an img2dataset output."""
    from augpipe.pipeline.ingest import ingest as do_ingest

    try:
        written = do_ingest(source, out_dir, shard_size)
    except ConfigError as exc:
        fail(str(exc), EXIT_USAGE)
    click.echo(f"wrote {len(written)} files to {out_dir}")


@main.command()
@click.argument("out_dir")
@click.option("--json", "as_json", is_flag=True, help="Print the run history as JSON.")
def runs(out_dir: str, as_json: bool) -> None:
    """List the runs that built a corpus: when, what each added, and what failed."""
    from augpipe.pipeline.manifest import ManifestError, read_manifest

    try:
        history = read_manifest(out_dir).get("runs", [])
    except ManifestError as exc:
        fail(str(exc), EXIT_USAGE)
    if as_json:
        click.echo(json.dumps(history, indent=2))
        return
    for entry in history:
        samples = entry["samples"]
        flags = [name for name in ("incremental", "overwrite", "interrupted") if entry.get(name)]
        click.echo(
            f"{entry['started_at'][:19]}  run {entry['run_id'][:12]}  config {entry['config_hash']}  "
            f"+{len(entry['shards_added'])} shards  {samples['in']} in, {samples['out']} out, "
            f"{samples['failed']} failed" + (f"  [{', '.join(flags)}]" if flags else "")
        )


@main.command()
@click.argument("recipe")
@click.option("--input", "input_path", required=True, help="The corpus to estimate for (path or URL).")
@click.option("--sample", default=2, show_default=True, type=click.IntRange(1), help="Input shards to run.")
@click.option("--seed", "sample_seed", default=0, show_default=True, help="Seed of the shard sample.")
@click.option("--profile", default="cpu", show_default=True, help="Backend profile (tiny, cpu, gpu) or YAML.")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Override one option, as in run.")
@click.option("--address", help="Ray cluster to measure on (and project for); default: this machine.")
@click.option("--gpus", type=click.FloatRange(0), help="What if the cluster had this many GPUs.")
@click.option("--cpus", type=click.FloatRange(0, min_open=True), help="What if it had this many CPUs.")
@click.option("--json", "as_json", is_flag=True, help="Print the projection as JSON.")
def estimate(
    recipe: str,
    input_path: str,
    sample: int,
    sample_seed: int,
    profile: str,
    sets: tuple[str, ...],
    address: str | None,
    gpus: float | None,
    cpus: float | None,
    as_json: bool,
) -> None:
    """Project wall time, GPU-hours and output size of RECIPE over --input from a run on a sample."""
    from augpipe.pipeline.estimate import estimate as project
    from augpipe.pipeline.estimate import render

    setup_logging(quiet=True)
    with _exit_codes():
        resolved = load_recipe(recipe, profile=profile, sets=list(sets))
        result = project(resolved, input_path, sample, sample_seed, address, cpus, gpus)
    click.echo(json.dumps(result.as_dict(), indent=2) if as_json else render(result))


@main.command("demo-data")
@click.argument("out_dir", type=click.Path(path_type=Path))
def demo_data(out_dir: Path) -> None:
    """Write the bundled demo corpora (labelled sentences) under OUT_DIR."""
    from augpipe.pipeline.demo import write_demo_data

    for name, paths in write_demo_data(out_dir).items():
        click.echo(f"{name}: {len(paths)} shards in {out_dir / name}")


main.add_command(evaluate_command)

if __name__ == "__main__":
    main()
