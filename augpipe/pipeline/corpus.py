"""The corpus already in an output folder: whose it is, what of it can be trusted, what does not belong.

- **Protection**: a run whose recipe or configuration differs from the corpus in its output folder is
  refused, naming the difference, unless ``--overwrite`` asks to rebuild it (upstream stage outputs cached
  with ``--keep-cache`` are then reused, and the run says so).
- **Verification**: a shard is skipped only when its stats record matches this run, its input is the one
  it was made from (checksum from the index pre-pass), the keys it must leave to earlier shards are the
  same, and its files are intact: size always, checksum when the mtime moved or ``verify`` asks.
- **Set-aside**: shards of inputs that no longer exist (on a plain run) and data files no stats record
  owns are moved to ``_augpipe/set-aside/<run id>/``, never deleted, and reported in the run history.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

from augpipe.pipeline import layout
from augpipe.pipeline.config import ConfigError, Recipe
from augpipe.pipeline.index import IndexSummary
from augpipe.pipeline.inputs import InputUnit
from augpipe.pipeline.stage import StageSettings
from augpipe.pipeline.storage import Store
from augpipe.pipeline.writer import read_stats


class CorpusConflict(ConfigError):
    """The output folder holds a corpus of another recipe or configuration."""


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        flat: dict[str, Any] = {}
        for key, inner in value.items():
            flat.update(_flatten(inner, f"{prefix}{key}."))
        return flat
    return {prefix.rstrip("."): value}


def _comparable(config: dict[str, Any]) -> dict[str, Any]:
    """A recipe config as dotted keys, without options that change how a run executes, not what it makes."""
    flat = _flatten({k: v for k, v in config.items() if k not in {"stages", "description"}})
    for entry in config.get("stages", []):
        for option, value in entry.get("options", {}).items():
            if option not in StageSettings.EXECUTION_ONLY:
                flat[f"stages.{entry['name']}.{option}"] = value
        flat[f"stages.{entry['name']}"] = entry.get("stage")
    return flat


def config_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``key: old -> new`` for every setting that differs (execution-only options left out)."""
    a, b = _comparable(old), _comparable(new)
    missing = object()
    lines = []
    for key in sorted(set(a) | set(b)):
        before, after = a.get(key, missing), b.get(key, missing)
        if before != after:
            shown = ["(unset)" if v is missing else json.dumps(v, default=str) for v in (before, after)]
            lines.append(f"{key}: {shown[0]} -> {shown[1]}")
    return lines


def check_protection(
    store: Store, recipe: Recipe, fingerprint: str, overwrite: bool, previous: dict[str, Any] | None
) -> bool:
    """Refuse to write over another corpus; True when the run must clear the old corpus (``--overwrite``)."""
    if previous is not None:
        same = previous.get("recipe") == recipe.name and previous.get("fingerprint") == fingerprint
        if same:
            return False
        if overwrite:
            return True
        if previous.get("recipe") != recipe.name:
            detail = f"it holds a {previous.get('recipe')!r} corpus; this run is {recipe.name!r}"
        else:
            changes = config_differences(previous.get("config", {}), recipe.model_dump(mode="json"))
            detail = "its configuration differs: " + ("; ".join(changes[:8]) or "upstream inputs or limits")
        raise CorpusConflict(
            f"{store.display()} already holds a corpus and {detail}. Pass --overwrite to rebuild it "
            "(stage outputs cached with --keep-cache are reused), or choose another --output"
        )
    foreign = [s for s in stats_records(store) if s.get("fingerprint") != fingerprint]
    if foreign and not overwrite:
        raise CorpusConflict(
            f"{store.display()} holds {len(foreign)} shards written with another configuration (a run that "
            "did not finish?); pass --overwrite to rebuild, or choose another --output"
        )
    return bool(foreign)


def stats_records(store: Store) -> list[dict[str, Any]]:
    records = []
    for entry in store.list_files(layout.STATS_DIR):
        if entry.rel.endswith(".json"):
            try:
                records.append(json.loads(store.read_bytes(entry.rel)))
            except (json.JSONDecodeError, OSError):
                continue
    return records


def shard_files(stats: dict[str, Any]) -> list[str]:
    """Every file a committed shard owns: data files, quarantine, stats record."""
    files = [entry["path"] for entry in stats.get("outputs", [])]
    if stats.get("quarantine"):
        files.append(stats["quarantine"])
    files.append(layout.stats_file(stats["shard"]))
    return files


def clear_corpus(store: Store) -> int:
    """Remove the old corpus's shards (``--overwrite``); caches and fitted artifacts stay for reuse."""
    records = stats_records(store)
    for stats in records:
        for rel in shard_files(stats):
            store.delete(rel)
    store.delete(layout.MANIFEST)
    return len(records)


def damage(store: Store, stats: dict[str, Any], full_hash: bool) -> str | None:
    """Why a committed shard's files cannot be trusted, or None when they are intact."""
    for entry in stats.get("outputs", []):
        found = store.stat(entry["path"])
        if found is None:
            return f"{entry['path']} is missing"
        if found.size != entry.get("bytes", found.size):
            return f"{entry['path']} has {found.size:,} bytes, not {entry['bytes']:,}"
        if (full_hash or found.mtime_ns != entry.get("mtime_ns")) and store.sha256(entry["path"]) != entry[
            "sha256"
        ]:
            return f"{entry['path']} checksum differs"
    quarantine = stats.get("quarantine")
    if quarantine and not store.exists(quarantine):
        return f"{quarantine} is missing"
    return None


@dataclass
class Verified:
    """The shards a run may skip, and what it found wrong with the others."""

    done: dict[str, dict[str, Any]] = field(default_factory=dict)
    redo: dict[str, str] = field(default_factory=dict)


def verify_done(
    store: Store,
    units: Iterable[InputUnit],
    fingerprint: str,
    index: dict[str, IndexSummary],
    drop_digests: dict[str, str],
    full_hash: bool,
) -> Verified:
    found = Verified()
    for unit in units:
        stats = read_stats(store, unit.shard_id)
        if stats is None:
            continue
        if stats.get("fingerprint") != fingerprint:
            found.redo[unit.shard_id] = "made with another configuration"
            continue
        known = index.get(unit.shard_id)
        recorded = stats.get("input_identity", {}).get("sha256")
        if known is not None and recorded != known.sha256:
            found.redo[unit.shard_id] = f"its input {unit.label} changed"
            continue
        if stats.get("drop_digest", "") != drop_digests.get(unit.shard_id, ""):
            found.redo[unit.shard_id] = "the keys it shares with earlier shards changed"
            continue
        problem = damage(store, stats, full_hash)
        if problem:
            found.redo[unit.shard_id] = f"output damaged ({problem})"
            continue
        found.done[unit.shard_id] = stats
    return found


def set_aside(store: Store, rels: Iterable[str], run_id: str, reason: str) -> list[str]:
    """Move files under ``_augpipe/set-aside/<run id>/<reason>/``; returns what moved."""
    moved = []
    for rel in rels:
        if store.exists(rel):
            store.move(rel, f"{layout.SET_ASIDE_DIR}/{run_id}/{reason}/{rel}")
            moved.append(rel)
    return moved


def orphan_shards(store: Store, units: list[InputUnit]) -> list[dict[str, Any]]:
    """Committed shards whose input unit is no longer in the input."""
    current = {u.shard_id for u in units}
    return [s for s in stats_records(store) if s.get("shard") not in current]


def strays(store: Store) -> list[str]:
    """Top-level data files no stats record owns (a trainer globbing the folder would read them)."""
    owned = {rel for stats in stats_records(store) for rel in shard_files(stats)}
    return [
        rel for rel in layout.top_level_data(store) if rel not in owned and PurePosixPath(rel).name == rel
    ]
