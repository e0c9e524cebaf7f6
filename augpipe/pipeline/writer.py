"""Writing one output shard: WebDataset tar, Parquet sidecar, quarantine shard, then the stats record.

Every file is written under a hidden ``.partial`` name and renamed into place, and the stats record is
renamed last: it is the marker that the shard is done, so a killed run never leaves a shard that looks
finished but is not. Tars are written with fixed mtime and owner so the same rows give the same bytes.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import soundfile
import webdataset as wds
from PIL import Image

from augpipe.pipeline.inputs import file_sha256
from augpipe.pipeline.rowcodec import json_default
from augpipe.pipeline.rows import Failure, Row

STATS_DIR = "_stats"
QUARANTINE_DIR = "quarantine"
LINEAGE_FIELDS = ("key", "variant", "lineage", "output_key")


def output_key(row: Row, tag: str) -> str:
    """``KEY`` for a source passed through, ``KEY-tag-i`` for a generated sample (DESIGN.md section 1)."""
    if "output_key" in row:
        return row["output_key"]
    variant = row.get("variant", ())
    return row["key"] if not variant else f"{row['key']}-{tag}-{'-'.join(map(str, variant))}"


def atomic_write(path: Path, write: Callable[[io.BufferedWriter], None]) -> None:
    """Write through a hidden temporary file in the same directory, then rename over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    with partial.open("wb") as fh:
        write(fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(partial, path)


def _image_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _audio_bytes(audio: np.ndarray, rate: int) -> bytes:
    buffer = io.BytesIO()
    soundfile.write(buffer, np.asarray(audio, dtype=np.float32), rate, format="FLAC")
    return buffer.getvalue()


def _members(row: Row, key: str, output: dict[str, str], meta: dict[str, Any]) -> dict[str, Any]:
    sample: dict[str, Any] = {"__key__": key, "json": json.dumps(meta, default=json_default).encode()}
    for name, source in output.items():
        value = row.get(source)
        if name == "text":
            sample["txt"] = str(value).encode()
        elif name == "image":
            sample["png"] = _image_bytes(value)
        elif name == "audio":
            sample["flac"] = _audio_bytes(value, int(row["sample_rate"]))
    return sample


def _label_array(labels: list[Any]) -> pa.Array:
    present = [v for v in labels if v is not None]
    if present and all(isinstance(v, int | np.integer) and not isinstance(v, bool) for v in present):
        return pa.array(labels, type=pa.int64())
    return pa.array([None if v is None else str(v) for v in labels], type=pa.string())


def _sidecar(rows: list[Row], keys: list[str], recipe: str, output: dict[str, str]) -> pa.Table:
    columns: dict[str, pa.Array] = {
        "key": pa.array(keys, type=pa.string()),
        "parent_key": pa.array([r["key"] for r in rows], type=pa.string()),
        "label": _label_array([r.get("label") for r in rows]),
        "recipe": pa.array([recipe] * len(rows), type=pa.string()),
        "variant": pa.array([list(r.get("variant", ())) for r in rows], type=pa.list_(pa.int32())),
        "stage_chain": pa.array([list(r.get("lineage", {})) for r in rows], type=pa.list_(pa.string())),
    }
    for name, source in output.items():
        values = [r.get(source) for r in rows]
        if name == "text":
            columns["text"] = pa.array([None if v is None else str(v) for v in values], type=pa.string())
        elif name.endswith("_embedding"):
            width = len(next((v for v in values if v is not None), []))
            flat = [None if v is None else np.asarray(v, dtype=np.float32).tolist() for v in values]
            columns[name] = pa.array(flat, type=pa.list_(pa.float32(), width))
        elif name not in {"image", "audio"}:
            columns[name] = pa.array([None if v is None else str(v) for v in values], type=pa.string())
    score_names = sorted({n for r in rows for n in r if n.startswith("score_")})
    for name in score_names:
        columns[name] = pa.array([r.get(name) for r in rows], type=pa.float64())
    columns["lineage"] = pa.array(
        [json.dumps(r.get("lineage", {}), sort_keys=True, default=json_default) for r in rows],
        type=pa.string(),
    )
    return pa.table(columns)


@dataclasses.dataclass(frozen=True)
class WrittenFile:
    """An output file as the manifest records it."""

    path: str
    sha256: str
    samples: int


def write_shard(
    out_dir: Path, shard_id: str, rows: list[Row], recipe: str, tag: str, output: dict[str, str]
) -> list[WrittenFile]:
    """The tar and Parquet sidecar of one output shard, each atomically; returns them for the manifest."""
    keys = [output_key(row, tag) for row in rows]
    if len(set(keys)) != len(keys):
        raise RuntimeError(f"{shard_id}: generated keys collide; every output row needs a distinct key")

    def write_tar(fh: io.BufferedWriter) -> None:
        with wds.TarWriter(fh, mtime=0, user="augpipe", group="augpipe", encoder=False) as sink:
            for row, key in zip(rows, keys, strict=True):
                meta = {"key": key, "parent_key": row["key"], "label": row.get("label"), "recipe": recipe}
                sink.write(_members(row, key, output, meta))

    tar_path = out_dir / f"{shard_id}.tar"
    parquet_path = out_dir / f"{shard_id}.parquet"
    atomic_write(tar_path, write_tar)
    table = _sidecar(rows, keys, recipe, output)
    atomic_write(parquet_path, lambda fh: pq.write_table(table, fh))
    return [WrittenFile(p.name, file_sha256(p), len(rows)) for p in (tar_path, parquet_path)]


def write_quarantine(out_dir: Path, shard_id: str, failures: list[Failure]) -> str | None:
    """A tar of the shard's failures, one JSON member each; None when the shard had none."""
    if not failures:
        return None
    path = out_dir / QUARANTINE_DIR / f"{shard_id}.tar"

    def write_tar(fh: io.BufferedWriter) -> None:
        with wds.TarWriter(fh, mtime=0, user="augpipe", group="augpipe", encoder=False) as sink:
            for i, failure in enumerate(failures):
                record = dataclasses.asdict(failure) | {"shard": shard_id}
                sink.write({"__key__": f"q{i:06d}", "error.json": json.dumps(record).encode()})

    atomic_write(path, write_tar)
    return f"{QUARANTINE_DIR}/{shard_id}.tar"


def stats_path(out_dir: Path, shard_id: str) -> Path:
    return out_dir / STATS_DIR / f"{shard_id}.json"


def write_stats(out_dir: Path, shard_id: str, stats: dict[str, Any]) -> None:
    """The done marker: written last, after the shard's tar, sidecar and quarantine are in place."""
    blob = json.dumps(stats, indent=1, sort_keys=True, default=json_default).encode()
    atomic_write(stats_path(out_dir, shard_id), lambda fh: fh.write(blob))


def read_stats(out_dir: Path, shard_id: str) -> dict[str, Any] | None:
    path = stats_path(out_dir, shard_id)
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
