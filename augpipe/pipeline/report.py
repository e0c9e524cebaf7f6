"""The human summary behind ``augpipe inspect``: counts, stages, failures, and examples side by side."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow.parquet as pq


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
            text = repr(record["text"]) if "text" in columns else "(media)"
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
        lines.append(
            f"  {name:18s} {stage['samples_in']:6d} in {stage['samples_out']:6d} out "
            f"{stage['failed']:4d} failed "
            f"{stage['samples_per_s']:8.1f}/s on {stage['device']}{reused}"
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
    lines.append("examples:")
    lines.extend(_examples(out_dir, manifest, examples))
    return "\n".join(lines)
