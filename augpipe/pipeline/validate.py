"""``augpipe validate``: does a corpus hold exactly what its manifest says, readable the way trainers read it?

Guarantees when it passes:
- the manifest is valid against the published schema and unchanged since augpipe wrote it (its
  ``integrity`` checksum matches its content);
- every listed file exists with the recorded size and checksum;
- every tar holds exactly the listed number of samples, with unique keys, and its Parquet sidecar holds the
  same keys in the same order; the manifest's totals equal the sum over its shards;
- no data file (``*.tar``, ``*.parquet``) sits in the folder without being listed.
Problems are returned as one-line messages; nothing here raises on a damaged corpus.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jsonschema
import pyarrow as pa
import pyarrow.parquet as pq

from augpipe.pipeline import layout
from augpipe.pipeline.config import ConfigError, load_recipe
from augpipe.pipeline.manifest import ManifestError, integrity, read_manifest, validate_manifest
from augpipe.pipeline.storage import Store, is_remote
from augpipe.pipeline.tarscan import Damage, Sample, scan_samples


def _tar_keys(store: Store, rel: str) -> tuple[list[str], str | None]:
    """The sample keys of a tar, and the first damage found in it (None when intact)."""
    keys: list[str] = []
    with store.local_copy(rel) as path, path.open("rb") as fh:
        for item in scan_samples(fh, path.stat().st_size):
            if isinstance(item, Damage):
                return keys, f"damaged at byte {item.offset:,}: {item.message}"
            if isinstance(item, Sample):
                keys.append(item.key)
    return keys, None


def _parquet_keys(store: Store, rel: str) -> tuple[list[str] | None, str | None]:
    try:
        with store.open_read(rel) as fh:
            return pq.read_table(fh, columns=["key"])["key"].to_pylist(), None
    except (pa.ArrowException, OSError, KeyError) as exc:
        return None, f"unreadable Parquet ({type(exc).__name__}: {exc})"


def _check_files(store: Store, manifest: dict[str, Any]) -> list[str]:
    problems = []
    for entry in manifest.get("outputs", []):
        rel = entry["path"]
        found = store.stat(rel)
        if found is None:
            problems.append(f"{rel}: listed in the manifest but missing")
        elif "bytes" in entry and found.size != entry["bytes"]:
            problems.append(f"{rel}: {found.size:,} bytes, the manifest says {entry['bytes']:,}")
        elif store.sha256(rel) != entry["sha256"]:
            problems.append(f"{rel}: checksum differs from the manifest")
    return problems


def _check_contents(store: Store, manifest: dict[str, Any]) -> list[str]:
    """Sample counts and keys of every listed shard against the manifest and each other."""
    problems: list[str] = []
    total = 0
    for entry in manifest.get("outputs", []):
        rel = entry["path"]
        if not rel.endswith(".tar") or not store.exists(rel):
            continue
        keys, damaged = _tar_keys(store, rel)
        total += len(keys)
        if damaged:
            problems.append(f"{rel}: {damaged}")
        if len(keys) != entry.get("samples"):
            problems.append(f"{rel}: holds {len(keys)} samples, the manifest says {entry.get('samples')}")
        if len(keys) != len(set(keys)):
            problems.append(f"{rel}: repeated keys")
        sidecar = rel[: -len(".tar")] + ".parquet"
        if not store.exists(sidecar):
            continue
        sidecar_keys, error = _parquet_keys(store, sidecar)
        if error:
            problems.append(f"{sidecar}: {error}")
        elif sidecar_keys != keys:
            problems.append(f"{sidecar}: keys differ from {rel}")
    listed_out = manifest.get("samples", {}).get("out")
    if listed_out is not None and listed_out != total:
        problems.append(f"{layout.MANIFEST}: samples.out is {listed_out}, the shards hold {total}")
    return problems


def _check_strays(store: Store, manifest: dict[str, Any]) -> list[str]:
    listed = {entry["path"] for entry in manifest.get("outputs", [])}
    return [
        f"{rel}: a data file the manifest does not list (a trainer globbing the folder would read it)"
        for rel in layout.top_level_data(store)
        if rel not in listed
    ]


def validate_corpus(out_dir: Path | str) -> list[str]:
    store = Store(out_dir)
    try:
        manifest = read_manifest(store)
    except ManifestError as exc:
        return [str(exc)]
    if not isinstance(manifest, dict):
        return [f"{layout.MANIFEST}: not a JSON object"]
    problems: list[str] = []
    try:
        validate_manifest(manifest)
    except jsonschema.ValidationError as exc:
        problems.append(f"manifest: {exc.message} at {'/'.join(map(str, exc.absolute_path))}")
    if "integrity" in manifest and manifest["integrity"] != integrity(manifest):
        problems.append("manifest: edited since augpipe wrote it (its integrity checksum does not match)")
    problems += _check_files(store, manifest)
    problems += _check_contents(store, manifest)
    problems += _check_strays(store, manifest)
    return problems


def validate_path(location: str | Path) -> list[str]:
    """Problems found in a corpus folder (path or URL), a manifest file, or a recipe YAML; [] when valid."""
    if is_remote(str(location)):
        return validate_corpus(str(location))
    path = Path(location)
    if not path.exists():
        return [f"{path} does not exist"]
    if path.is_dir():
        return validate_corpus(path)
    if path.name == "manifest.json":
        parent = path.parent.parent if path.parent.name == layout.AUGPIPE_DIR else path.parent
        return validate_corpus(parent)
    if path.suffix not in {".yaml", ".yml"}:
        return [f"{path}: not a corpus folder, a manifest.json or a recipe YAML (.yaml)"]
    try:
        load_recipe(str(path), profile=None)
    except ConfigError as exc:
        return [str(exc)]
    return []
