"""``augpipe validate``: does a corpus hold what its manifest says, readable the way trainers read it?"""

from __future__ import annotations

from pathlib import Path

import jsonschema
import pyarrow as pa
import pyarrow.parquet as pq
import webdataset as wds

from augpipe.pipeline.config import ConfigError, load_recipe
from augpipe.pipeline.inputs import file_sha256
from augpipe.pipeline.manifest import MANIFEST_NAME, read_manifest, validate_manifest


def _tar_keys(path: Path) -> list[str]:
    dataset = wds.WebDataset(str(path), shardshuffle=False, empty_check=False)
    return [sample["__key__"] for sample in dataset]


def validate_corpus(out_dir: Path) -> list[str]:
    problems: list[str] = []
    if not (out_dir / MANIFEST_NAME).exists():
        return [f"{out_dir}: no {MANIFEST_NAME}"]
    manifest = read_manifest(out_dir)
    try:
        validate_manifest(manifest)
    except jsonschema.ValidationError as exc:
        problems.append(f"{MANIFEST_NAME}: {exc.message} at {'/'.join(map(str, exc.absolute_path))}")
    for entry in manifest.get("outputs", []):
        path = out_dir / entry["path"]
        if not path.exists():
            problems.append(f"{entry['path']}: listed in the manifest but missing")
            continue
        if file_sha256(path) != entry["sha256"]:
            problems.append(f"{entry['path']}: checksum differs from the manifest")
    for tar in sorted(out_dir.glob("shard-*.tar")):
        keys = _tar_keys(tar)
        if len(keys) != len(set(keys)):
            problems.append(f"{tar.name}: repeated keys")
        sidecar = tar.with_suffix(".parquet")
        if not sidecar.exists():
            continue
        try:
            sidecar_keys = pq.read_table(sidecar, columns=["key"])["key"].to_pylist()
        except (pa.ArrowException, OSError) as exc:
            problems.append(f"{sidecar.name}: unreadable Parquet ({exc})")
            continue
        if sidecar_keys != keys:
            problems.append(f"{sidecar.name}: keys differ from {tar.name}")
    return problems


def validate_path(path: Path) -> list[str]:
    """Problems found in a corpus folder, a manifest file, or a recipe YAML; empty when valid."""
    if path.is_dir():
        return validate_corpus(path)
    if path.name == MANIFEST_NAME:
        return validate_corpus(path.parent)
    try:
        load_recipe(str(path), profile=None)
    except ConfigError as exc:
        return [str(exc)]
    return []
