"""``manifest.json``: what a corpus is and how it was made, assembled from the shards' stats records.

Built from the per-shard records rather than from the driver's memory, so the manifest of a resumed run
accounts for the shards an earlier, killed run committed. Validated against ``manifests/manifest.schema.json``
before it is written.
"""

from __future__ import annotations

import json
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jsonschema

import augpipe
from augpipe.pipeline.inputs import InputUnit, file_sha256
from augpipe.pipeline.plan import Plan
from augpipe.pipeline.rowcodec import json_default
from augpipe.pipeline.worker import artifact_dir, read_fit
from augpipe.pipeline.writer import QUARANTINE_DIR, atomic_write

SCHEMA_VERSION = "1.0"
MANIFEST_NAME = "manifest.json"


def schema_path() -> Path:
    return Path(__file__).resolve().parents[2] / "manifests" / "manifest.schema.json"


def validate_manifest(manifest: dict[str, Any]) -> None:
    """Raise jsonschema.ValidationError when ``manifest`` breaks the published schema."""
    jsonschema.validate(manifest, json.loads(schema_path().read_text()))


def _stage_totals(shards: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    totals: dict[str, dict[str, Any]] = {}
    for shard in shards:
        for record in shard["stages"]:
            entry = totals.setdefault(
                record["stage"],
                {
                    "samples_in": 0,
                    "samples_out": 0,
                    "failed": 0,
                    "wall_s": 0.0,
                    "device_s": 0.0,
                    "counts": Counter(),
                    "reused_shards": 0,
                    "device": record["device"],
                },
            )
            for name in ("samples_in", "samples_out", "failed"):
                entry[name] += record[name]
            entry["counts"].update(record.get("counts", {}))
            entry["wall_s"] += record["wall_s"]
            if record["device"] != "cpu":
                entry["device_s"] += record["wall_s"]
            entry["reused_shards"] += int(record["reused"])
    for entry in totals.values():
        entry["counts"] = dict(entry["counts"])
        entry["samples_per_s"] = entry["samples_out"] / entry["wall_s"] if entry["wall_s"] > 0 else 0.0
        entry["yield"] = entry["samples_out"] / entry["samples_in"] if entry["samples_in"] else 0.0
    return totals


def _failures(shards: list[dict[str, Any]]) -> dict[str, Any]:
    by_cause: Counter[str] = Counter()
    examples: list[dict[str, Any]] = []
    for shard in shards:
        for failure in shard["failures"]:
            by_cause[failure["cause"]] += 1
            if len(examples) < 20:
                examples.append({k: failure[k] for k in ("key", "stage", "cause", "message")})
    return {
        "total": sum(by_cause.values()),
        "by_cause": dict(by_cause),
        "examples": examples,
        "quarantine": QUARANTINE_DIR,
    }


def _artifacts(plan: Plan, out_dir: Path) -> dict[str, Any]:
    """What each global stage fitted (e.g. the GMM's M and BIC curve), with where its state is saved."""
    found = {}
    for stage, chain_fp in zip(plan.stages, plan.chain, strict=True):
        if stage.needs_fit:
            folder = artifact_dir(out_dir, stage.name, chain_fp)
            record = read_fit(folder)
            if record is not None:
                found[stage.name] = {"path": str(folder.relative_to(out_dir)), **record}
    return found


def build_manifest(
    plan: Plan,
    out_dir: Path,
    units: list[InputUnit],
    shards: dict[str, dict[str, Any]],
    started: datetime,
    broken: dict[str, str],
    run_id: str,
    cluster: dict[str, Any],
) -> dict[str, Any]:
    """The manifest of the corpus as it stands: every committed shard, including earlier runs'."""
    recipe = plan.recipe
    ordered = [shards[u.shard_id] for u in units if u.shard_id in shards]
    inputs = {u.path for u in units if u.shard_id in shards}
    samples_in = sum(s["stages"][0]["samples_in"] for s in ordered if s["stages"])
    failures = _failures(ordered)
    stages = _stage_totals(ordered)
    return {
        "schema_version": SCHEMA_VERSION,
        "run_id": run_id,
        "augpipe_version": augpipe.__version__,
        "recipe": recipe.name,
        "config": recipe.model_dump(mode="json"),
        "config_hash": recipe.config_hash(),
        "fingerprint": plan.run_fingerprint,
        "seed": recipe.seed,
        "multiple": recipe.multiple,
        "models": [stage.describe() for stage in plan.stages],
        "inputs": [
            {"path": str(p), "sha256": file_sha256(p), "bytes": p.stat().st_size} for p in sorted(inputs)
        ],
        "outputs": [{"shard": s["shard"], **entry} for s in ordered for entry in s["outputs"]],
        "samples": {
            "in": samples_in,
            "out": sum(s["samples_out"] for s in ordered),
            "failed": failures["total"],
            "failure_rate": failures["total"] / samples_in if samples_in else 0.0,
        },
        "stages": stages,
        "reused": {
            name: totals["reused_shards"] for name, totals in stages.items() if totals["reused_shards"]
        },
        "failures": failures,
        "artifacts": _artifacts(plan, out_dir),
        "incomplete_shards": broken,
        "cluster": cluster,
        "started_at": started.isoformat(),
        "finished_at": datetime.now(UTC).isoformat(),
    }


def write_manifest(out_dir: Path, manifest: dict[str, Any]) -> Path:
    validate_manifest(manifest)
    path = out_dir / MANIFEST_NAME
    blob = json.dumps(manifest, indent=2, default=json_default).encode()
    atomic_write(path, lambda fh: fh.write(blob))
    return path


def read_manifest(out_dir: Path) -> dict[str, Any]:
    return json.loads((out_dir / MANIFEST_NAME).read_text())
