"""The ``augpipe`` command line.

Exit codes:
  0  the run finished within --max-failure-rate (or the command succeeded)
  1  an unexpected internal error (a bug: please report it with the traceback)
  2  bad usage or configuration: unknown recipe, stage, option or key, bad input path
  3  the run finished but failures exceeded --max-failure-rate, or shards could not be written
  4  a configured model is missing (the message says how to provide it)
  5  validate found problems in a corpus
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from augpipe.evaluate.command import evaluate_command
from augpipe.pipeline.config import ConfigError, available_recipes, load_recipe
from augpipe.pipeline.models import ModelNotFoundError

EXIT_FAILURES, EXIT_MODEL, EXIT_INVALID = 3, 4, 5


def _fail(message: str, code: int) -> None:
    click.echo(f"augpipe: error: {message}", err=True)
    sys.exit(code)


@click.group(
    epilog="Exit codes: 0 ok, 1 internal error, 2 usage/config, 3 too many failures, "
    "4 missing model, 5 invalid corpus."
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
    type=click.Path(path_type=Path),
    help="Input corpus: a folder of WebDataset shards, one tar, or a Parquet/CSV text table.",
)
@click.option(
    "--output",
    "out_dir",
    required=True,
    type=click.Path(path_type=Path),
    help="Output folder; re-running the same command resumes into it.",
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
@click.option("--quiet", is_flag=True, help="No progress lines.")
def run(
    recipe: str,
    input_path: Path,
    out_dir: Path,
    profile: str,
    config_file: str | None,
    sets: tuple[str, ...],
    address: str | None,
    incremental: bool,
    max_failure_rate: float,
    seed: int | None,
    quiet: bool,
) -> None:
    """Run RECIPE (a name from 'augpipe recipes' or a YAML path) over --input into --output."""
    from augpipe.pipeline.run import run_recipe

    try:
        resolved = load_recipe(recipe, profile=profile, config_file=config_file, sets=list(sets), seed=seed)
        result = run_recipe(
            resolved,
            input_path,
            out_dir,
            address=address,
            incremental=incremental,
            max_failure_rate=max_failure_rate,
            progress=not quiet,
        )
    except ConfigError as exc:
        _fail(str(exc), 2)
    except ModelNotFoundError as exc:
        _fail(str(exc), EXIT_MODEL)
    samples = result.manifest["samples"]
    click.echo(
        f"augpipe: {samples['in']} samples in, {samples['out']} out, {samples['failed']} failed "
        f"({samples['failure_rate']:.1%}); manifest: {result.manifest_path}"
    )
    if not result.ok:
        for example in result.manifest["failures"]["examples"][:10]:
            click.echo(
                f"  {example['key']} [{example['stage']}/{example['cause']}]: {example['message']}", err=True
            )
        for shard, reason in result.manifest["incomplete_shards"].items():
            click.echo(f"  {shard} not written: {reason}", err=True)
        _fail(
            f"failure rate {result.failure_rate:.1%} exceeds --max-failure-rate {max_failure_rate:.1%}"
            if result.failure_rate > max_failure_rate
            else "some shards could not be written",
            EXIT_FAILURES,
        )


@main.command()
def recipes() -> None:
    """List the recipes shipped in configs/recipes."""
    import yaml

    for name, path in available_recipes().items():
        description = (yaml.safe_load(path.read_text()) or {}).get("description", "")
        click.echo(f"{name:20s} {description}")


@main.command()
def stages() -> None:
    """List stages with their fields, backends and default resources."""
    from augpipe.pipeline.registry import stage_class, stage_names

    for name in stage_names():
        cls = stage_class(name)
        backends = ", ".join(sorted(cls.backends)) or "-"
        r = cls.resources
        click.echo(
            f"{name:20s} backends: {backends}; default: {cls.default_backend or '-'}; "
            f"cpus {r.cpus}, gpus {r.gpus}, batch {cls.batch_size}"
        )


@main.command()
@click.argument("out_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
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
def inspect(out_dir: Path, as_json: bool, html_file: Path | None, samples: int) -> None:
    """Summarise an output corpus: counts, per-stage throughput, failures, reuse, example samples."""
    from augpipe.pipeline.manifest import read_manifest
    from augpipe.pipeline.report import summary_text

    manifest = read_manifest(out_dir)
    if as_json:
        click.echo(json.dumps(manifest, indent=2))
        return
    if html_file is not None:
        from augpipe.pipeline.report import html_report

        html_file.write_text(html_report(out_dir, manifest, samples))
        click.echo(f"wrote {html_file}")
        return
    click.echo(summary_text(out_dir, manifest, samples))


@main.command()
@click.argument("path", type=click.Path(exists=True, path_type=Path))
def validate(path: Path) -> None:
    """Check an output corpus (manifest schema, checksums, tar/Parquet agreement) or a recipe YAML."""
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
        _fail(str(exc), 2)
    click.echo(f"wrote {len(written)} files to {out_dir}")


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
