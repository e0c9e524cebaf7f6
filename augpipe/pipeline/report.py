"""The human summary behind ``augpipe inspect``: counts, stages, failures, and examples side by side."""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import webdataset as wds
from PIL import Image

from augpipe.evaluate.render import evaluation_section


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
    lines.append("examples:")
    lines.extend(_examples(out_dir, manifest, examples))
    return "\n".join(lines)


def _thumbnail(data: bytes, side: int = 128) -> str:
    with Image.open(io.BytesIO(data)) as image:
        image = image.convert("RGB")
        image.thumbnail((side, side))
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _media_of(sample: dict[str, Any]) -> str:
    """An <img> for a sample's image member, else its text, escaped."""
    for ext in ("png", "jpg", "jpeg", "webp"):
        if ext in sample:
            return f'<img src="{_thumbnail(sample[ext])}">'
    text = sample.get("txt", b"")
    return f"<p>{html.escape(text.decode('utf-8', 'replace') if isinstance(text, bytes) else str(text))}</p>"


def _samples(paths: list[Path], wanted: set[str]) -> dict[str, dict[str, Any]]:
    """Raw members of the wanted keys from WebDataset shards (never decoded beyond what is shown)."""
    found: dict[str, dict[str, Any]] = {}
    for path in paths:
        if path.suffix != ".tar" or not path.exists() or wanted <= set(found):
            continue
        for sample in wds.WebDataset(str(path), shardshuffle=False, empty_check=False):
            if sample["__key__"] in wanted:
                found[sample["__key__"]] = sample
    return found


def _contributors(lineage: dict[str, Any], top: int) -> list[tuple[str, float]]:
    """The strongest contributors of a mixed sample (CMDA, mixup), from whichever stage recorded them."""
    for record in lineage.values():
        if isinstance(record, dict) and "contributors" in record and "weights" in record:
            pairs = sorted(
                zip(record["contributors"], record["weights"], strict=True), key=lambda p: -abs(p[1])
            )
            return pairs[:top]
    return []


def html_report(out_dir: Path, manifest: dict[str, Any], examples: int = 8, top: int = 3) -> str:
    """A self-contained page: the summary, then generated samples beside their source and contributors."""
    rows: list[dict[str, Any]] = []
    for entry in manifest["outputs"]:
        if entry["path"].endswith(".parquet") and len(rows) < examples:
            rows += pq.read_table(out_dir / entry["path"]).slice(0, examples - len(rows)).to_pylist()
    lineages = {row["key"]: json.loads(row["lineage"]) for row in rows}
    generated = _samples([out_dir / e["path"] for e in manifest["outputs"]], {r["key"] for r in rows})
    wanted = {r["parent_key"] for r in rows} | {
        k for lin in lineages.values() for k, _ in _contributors(lin, top)
    }
    sources = _samples([Path(i["path"]) for i in manifest["inputs"]], wanted)
    cells = []
    for row in rows:
        parent = sources.get(row["parent_key"], {})
        parts = [
            f"<td><b>{html.escape(row['parent_key'])}</b><br>{_media_of(parent) if parent else ''}</td>",
            f"<td><b>{html.escape(row['key'])}</b> [{html.escape(str(row['label']))}]<br>"
            f"{_media_of(generated.get(row['key'], {}))}</td>",
        ]
        for key, weight in _contributors(lineages[row["key"]], top):
            media = _media_of(sources[key]) if key in sources else ""
            parts.append(f"<td>{html.escape(key)} (w={weight:.3f})<br>{media}</td>")
        cells.append("<tr>" + "".join(parts) + "</tr>")
    summary = html.escape(summary_text(out_dir, manifest, 0))
    return (
        "<!doctype html><meta charset='utf-8'><title>augpipe: "
        + html.escape(manifest["recipe"])
        + "</title><style>body{font-family:sans-serif}td{vertical-align:top;padding:6px}</style>"
        + f"<h1>{html.escape(manifest['recipe'])}</h1><pre>{summary}</pre>"
        + "<h2>Generated samples</h2><table><tr><th>source</th><th>generated</th>"
        + f"<th colspan='{top}'>strongest contributors</th></tr>{''.join(cells)}</table>"
        + evaluation_section(out_dir)
    )
