"""``_augpipe/manifest.json``: what a corpus is and how it was made, assembled from the shards' stats records.

Built from the per-shard records on disk, streaming, rather than from the driver's memory: the manifest of a
resumed run accounts for the shards an earlier, killed run committed, and its size grows with the number of
shards, not samples. It keeps the history of runs (``runs``: nightly ``--incremental`` runs append), lists
every output with the run that wrote it (so a trainer can select tonight's shards), and carries a checksum of
its own content (``integrity``) so an edited manifest is detected. Validated against
``manifests/manifest.schema.json`` before it is written.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Any

import jsonschema

import augpipe
from augpipe.pipeline import layout
from augpipe.pipeline.execution import global_steps
from augpipe.pipeline.fitting import read_fit
from augpipe.pipeline.plan import Plan
from augpipe.pipeline.records import StageRecord, StageTotal
from augpipe.pipeline.rowcodec import json_default
from augpipe.pipeline.storage import Store

SCHEMA_VERSION = "2.0"
EXAMPLES = 20


def schema_path() -> Path:
    return Path(__file__).resolve().parents[2] / "manifests" / "manifest.schema.json"


def validate_manifest(manifest: dict[str, Any]) -> None:
    """Raise jsonschema.ValidationError when ``manifest`` breaks the published schema."""
    jsonschema.validate(manifest, json.loads(schema_path().read_text()))


def _stage_totals(shards: list[dict[str, Any]]) -> dict[str, StageTotal]:
    totals: dict[str, StageTotal] = {}
    for shard in shards:
        for data in shard["stages"]:
            record = StageRecord.from_json(data)
            totals.setdefault(record.stage, StageTotal(record.device)).add(record)
    return totals


def _failures(shards: list[dict[str, Any]], broken: dict[str, dict[str, Any]]) -> dict[str, Any]:
    by_cause: Counter[str] = Counter()
    examples: list[dict[str, Any]] = []
    for shard in shards:
        summary = shard["failures"]
        by_cause.update(summary["by_cause"])
        examples.extend(summary["examples"][: max(0, EXAMPLES - len(examples))])
    for shard_id, info in broken.items():
        if info.get("samples"):
            by_cause[f"shard_not_written:{info['cause']}"] += info["samples"]
        if len(examples) < EXAMPLES:
            examples.append(
                {"key": shard_id, "stage": "shard", "cause": info["cause"], "message": info["message"]}
            )
    return {
        "total": sum(by_cause.values()),
        "by_cause": dict(by_cause),
        "examples": examples,
        "quarantine": layout.QUARANTINE_DIR,
    }


def _artifacts(plan: Plan, store: Store) -> dict[str, Any]:
    """What each global stage fitted (e.g. the GMM's M and BIC curve), with where its state is saved."""
    from augpipe.pipeline.execution import artifact_rel

    found = {}
    for index in global_steps(plan):
        folder = artifact_rel(plan, index)
        record = read_fit(store, folder)
        if record is not None:
            found[plan.stages[index].name] = {"path": folder, **record}
    return found


def _inputs(shards: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each input file once, with the checksum taken when it was indexed."""
    seen: dict[str, dict[str, Any]] = {}
    for shard in shards:
        ident = shard.get("input_identity", {})
        if ident.get("path") and ident.get("sha256") and ident["path"] not in seen:
            seen[ident["path"]] = {k: ident[k] for k in ("path", "sha256", "bytes", "mtime_ns") if k in ident}
    return [seen[p] for p in sorted(seen)]


def label_vocabulary(shards: list[dict[str, Any]], known: list[str]) -> dict[str, Any]:
    """The corpus's label names and their sample counts. Names keep the order an earlier manifest gave
    them and new ones are appended (sorted), so class ids (the dataset card's ``ClassLabel``) stay stable
    across nightly runs."""
    counts: Counter[str] = Counter()
    seen: set[str] = set()
    for shard in shards:
        for name, n in shard.get("labels", {}).items():
            counts[name] += n
            seen.add(name)
    names = [*known, *sorted(seen - set(known))]
    return {"names": names, "counts": {name: counts.get(name, 0) for name in names}}


def _cache_use(store: Store) -> dict[str, int]:
    files = store.list_files(layout.CACHE_DIR, recursive=True)
    return {"bytes": sum(f.size for f in files), "files": len(files)}


def integrity(manifest: dict[str, Any]) -> str:
    """The checksum of a manifest's content without its ``integrity`` field (canonical JSON)."""
    body = {k: v for k, v in manifest.items() if k != "integrity"}
    blob = json.dumps(body, sort_keys=True, separators=(",", ":"), default=json_default).encode()
    return hashlib.sha256(blob).hexdigest()


def run_record(
    run_id: str,
    started: datetime,
    finished: datetime,
    plan: Plan,
    committed: dict[str, dict[str, Any]],
    extra: dict[str, Any],
) -> dict[str, Any]:
    """One entry of ``runs``: what this run added to the corpus."""
    failed = sum(s["failures"]["total"] for s in committed.values())
    return {
        "run_id": run_id,
        "started_at": started.isoformat(),
        "finished_at": finished.isoformat(),
        "config_hash": plan.recipe.config_hash(),
        "fingerprint": plan.run_fingerprint,
        "shards_added": sorted(committed),
        "samples": {
            "in": sum(s["samples_in"] for s in committed.values()),
            "out": sum(s["samples_out"] for s in committed.values()),
            "failed": failed,
        },
        **extra,
    }


def build_manifest(
    plan: Plan,
    store: Store,
    shards: list[dict[str, Any]],
    broken: dict[str, dict[str, Any]],
    runs: list[dict[str, Any]],
    cluster: dict[str, Any],
    known_labels: list[str] | None = None,
) -> dict[str, Any]:
    """The manifest of the corpus as it stands: every committed shard, including earlier runs'."""
    recipe = plan.recipe
    current = runs[-1]
    samples_in = sum(s["samples_in"] for s in shards) + sum(b.get("samples") or 0 for b in broken.values())
    failures = _failures(shards, broken)
    totals = _stage_totals(shards)
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "run_id": current["run_id"],
        "augpipe_version": augpipe.__version__,
        "recipe": recipe.name,
        "config": recipe.model_dump(mode="json"),
        "config_hash": recipe.config_hash(),
        "fingerprint": plan.run_fingerprint,
        "seed": recipe.seed,
        "multiple": recipe.multiple,
        "models": [stage.describe() for stage in plan.stages],
        "inputs": _inputs(shards),
        "outputs": [
            {
                "shard": s["shard"],
                "run_id": s.get("run_id", ""),
                **{k: e[k] for k in ("path", "sha256", "bytes", "samples")},
            }
            for s in shards
            for e in s["outputs"]
        ],
        "samples": {
            "in": samples_in,
            "out": sum(s["samples_out"] for s in shards),
            "failed": failures["total"],
            "failure_rate": failures["total"] / samples_in if samples_in else 0.0,
        },
        "labels": label_vocabulary(shards, known_labels or []),
        "stages": {name: t.to_json() for name, t in totals.items()},
        "reused": {name: t.reused_shards for name, t in totals.items() if t.reused_shards},
        "failures": failures,
        "artifacts": _artifacts(plan, store),
        "incomplete_shards": broken,
        "cluster": cluster,
        "storage": {"cache": _cache_use(store)},
        "runs": runs,
        "started_at": current["started_at"],
        "finished_at": current["finished_at"],
    }
    manifest["integrity"] = integrity(manifest)
    return manifest


def write_manifest(store: Store, manifest: dict[str, Any]) -> str:
    validate_manifest(manifest)
    blob = json.dumps(manifest, indent=2, default=json_default).encode()
    store.write_bytes(layout.MANIFEST, blob)
    return store.display(layout.MANIFEST)


class ManifestError(ValueError):
    """A folder without a readable manifest."""


def read_manifest(location: Store | str | Path) -> dict[str, Any]:
    """The manifest of a corpus (in ``_augpipe/``, or at the top for augpipe 0.1 corpora)."""
    store = location if isinstance(location, Store) else Store(location)
    rel = layout.manifest_path(store)
    if rel is None:
        raise ManifestError(f"{store.display()} has no augpipe manifest (not an augpipe output folder?)")
    try:
        return json.loads(store.read_bytes(rel))
    except json.JSONDecodeError as exc:
        raise ManifestError(f"{store.display(rel)} is not valid JSON: {exc}") from exc
