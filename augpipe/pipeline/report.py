"""What ``augpipe inspect`` shows a person: a text summary, or an HTML report (``--html``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jinja2
import pyarrow.parquet as pq

from augpipe.evaluate.render import evaluation_section
from augpipe.pipeline import plots, report_samples
from augpipe.pipeline.report_samples import Candidate


def _examples(out_dir: Path, manifest: dict[str, Any], limit: int) -> list[str]:
    lines: list[str] = []
    for entry in manifest["outputs"]:
        if not entry["path"].endswith(".parquet") or len(lines) >= limit:
            continue
        table = pq.read_table(out_dir / entry["path"])
        columns = set(table.column_names)
        for record in table.slice(0, limit - len(lines)).to_pylist():
            scores = ", ".join(
                f"{k[6:]} {record[k]:.2f}"
                for k in sorted(columns)
                if k.startswith("score_") and record[k] is not None
            )
            source = f"{record['source_text']!r} -> " if "source_text" in columns else ""
            words = next(
                (record[c] for c in ("text", "caption", "prompt") if c in columns and record[c]), None
            )
            text = repr(words) if words is not None else "(media)"
            lines.append(
                f"  {record['key']} [{record['label']}]: {source}{text}" + (f"  ({scores})" if scores else "")
            )
    return lines


def summary_text(out_dir: Path, manifest: dict[str, Any], examples: int = 5) -> str:
    samples = manifest["samples"]
    lines = [
        f"corpus {out_dir}: recipe {manifest['recipe']} (seed {manifest['seed']}, k={manifest['multiple']}), "
        f"augpipe {manifest['augpipe_version']}",
        f"samples: {samples['in']} in, {samples['out']} out, {samples['failed']} failed "
        f"({samples['failure_rate']:.1%}); {len(manifest['outputs']) // 2} shards",
        "stages:",
    ]
    for name, stage in manifest["stages"].items():
        counts = ", ".join(f"{k} {v}" for k, v in sorted(stage["counts"].items()))
        reused = f", reused on {stage['reused_shards']} shards" if stage["reused_shards"] else ""
        ratio = stage["samples_out"] / stage["samples_in"] if stage["samples_in"] else 0.0
        lines.append(
            f"  {name:18s} {stage['samples_in']:6d} in {stage['samples_out']:6d} out "
            f"{stage['failed']:4d} failed "
            f"{stage['samples_per_s']:8.1f}/s on {stage['device']}, yield {ratio:.2f}{reused}"
            + (f"  [{counts}]" if counts else "")
        )
    for model in manifest["models"]:
        if "model" in model:
            lines.append(
                f"model: {model['stage']}: {model['backend']} {model['model']} ({model['revision']})"
            )
    failures = manifest["failures"]
    if failures["total"]:
        causes = ", ".join(f"{cause} {n}" for cause, n in sorted(failures["by_cause"].items()))
        lines.append(f"failures by cause: {causes} (quarantine: {out_dir / failures['quarantine']})")
        lines.extend(f"  {f['key']} [{f['stage']}]: {f['message']}" for f in failures["examples"][:5])
    shown = _examples(out_dir, manifest, examples)
    if shown:
        lines += ["examples:", *shown]
    return "\n".join(lines)


def _wall(manifest: dict[str, Any]) -> str:
    seconds = sum((manifest["runs"][-1].get("phases") or {}).values()) if manifest.get("runs") else 0.0
    return f"{seconds:,.1f} s"


def _overrides(manifest: dict[str, Any]) -> list[str]:
    """Settings of this corpus that differ from the shipped recipe file (profile, --config, --set)."""
    from augpipe.pipeline.config import ConfigError, load_recipe
    from augpipe.pipeline.corpus import config_differences

    try:
        shipped = load_recipe(manifest["recipe"], profile=None).model_dump(mode="json")
    except ConfigError:
        return []
    return config_differences(shipped, manifest["config"])


def _stage_charts(manifest: dict[str, Any]) -> list[str]:
    stages = manifest["stages"]
    names = list(stages)
    return [
        plots.bars(names, [stages[n]["yield"] for n in names], "yield per stage (samples out / in)"),
        plots.bars(names, [stages[n]["samples_per_s"] for n in names], "throughput per stage", " /s"),
    ]


def _fits(manifest: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """What each global stage fitted: facts, and for the GMM the BIC curve and the cluster sizes."""
    found = {}
    for name, artifact in manifest.get("artifacts", {}).items():
        summary = artifact.get("summary", {})
        facts = [
            (k, f"{v:.4g}" if isinstance(v, float) else v)
            for k, v in summary.items()
            if isinstance(v, int | float | str) and k != "seed"
        ]
        charts = []
        if "bic" in summary and "m_range" in summary:
            low = summary["m_range"][0]
            ms = list(range(low, low + len(summary["bic"])))
            charts.append(
                plots.line(ms, summary["bic"], "BIC by number of clusters M", summary.get("m_star"))
            )
        if "weights" in summary and "fit_rows" in summary:
            sizes = [w * summary["fit_rows"] for w in summary["weights"]]
            charts.append(
                plots.bars([f"cluster {i}" for i in range(len(sizes))], sizes, "cluster sizes (fit rows)")
            )
        found[name] = {"facts": facts, "charts": charts}
    return found


def _score_charts(pool: list[Candidate]) -> list[str]:
    names = sorted({k for c in pool for k in c.row if k.startswith("score_")})
    return [plots.histogram([c.row.get(n) for c in pool], f"{n} (sampled rows)") for n in names]


def html_report(out_dir: Path, manifest: dict[str, Any], examples: int = 8, top: int = 3) -> str:
    """A self-contained page (Jinja2 template, inline SVG, thumbnails as data URIs): the run, its stages
    and fits, informative examples beside their sources and contributors, failures, and the evaluation."""
    environment = jinja2.Environment(
        loader=jinja2.PackageLoader("augpipe.pipeline", "templates"),
        autoescape=jinja2.select_autoescape(["html", "j2"]),
    )
    manifest = {"labels": {"names": [], "counts": {}}, **manifest}
    shown, warnings = report_samples.examples(out_dir, manifest, examples, top)
    pool = report_samples.candidates(out_dir, manifest)
    duplicates = manifest["stages"].get("drop_duplicates", {}).get("counts", {})
    return environment.get_template("report.html.j2").render(
        m=manifest,
        shards=sum(1 for o in manifest["outputs"] if o["path"].endswith(".tar")),
        duplicates=", ".join(f"{k.replace('_', ' ')} {v}" for k, v in sorted(duplicates.items())) or "none",
        wall=_wall(manifest),
        overrides=_overrides(manifest),
        charts=[*_stage_charts(manifest), *_score_charts(pool)],
        fits=_fits(manifest),
        examples=shown,
        warnings=warnings,
        evaluation=evaluation_section(out_dir),
    )
