"""Writing one output shard: WebDataset tar, Parquet sidecar, quarantine shard, then the stats record.

Every file is written atomically (``Store.write_atomic``) and the stats record last: it is the marker that
the shard is done, so a killed run never leaves a shard that looks finished but is not. Tars are written with
fixed mtime and owner so the same rows give the same bytes. Each file's checksum is computed from the bytes
as they are written, and recorded with its size and mtime, so resume can tell a damaged file without
re-reading the corpus.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
from typing import IO, Any

import numpy as np
import pyarrow.parquet as pq
import soundfile
import webdataset as wds
from PIL import Image

from augpipe.pipeline import layout
from augpipe.pipeline.rowcodec import json_default
from augpipe.pipeline.rows import Failure, Row
from augpipe.pipeline.sidecar import OutputSpec, sample_json, sidecar_table, target_of
from augpipe.pipeline.storage import Store


def output_key(row: Row, tag: str) -> str:
    """``KEY`` for a source passed through, ``KEY-tag-i`` for a generated sample (DESIGN.md section 1)."""
    if "output_key" in row:
        return row["output_key"]
    variant = row.get("variant", ())
    return row["key"] if not variant else f"{row['key']}-{tag}-{'-'.join(map(str, variant))}"


class _Hashing:
    """A write-only stream that checksums and counts what passes through it to ``sink``."""

    def __init__(self, sink: IO[bytes]) -> None:
        self.sink, self.digest, self.size = sink, hashlib.sha256(), 0

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        self.size += len(data)
        return self.sink.write(data)

    def flush(self) -> None:
        self.sink.flush()


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


@dataclasses.dataclass(frozen=True)
class WrittenFile:
    """An output file as the manifest and resume check record it."""

    path: str
    sha256: str
    bytes: int
    mtime_ns: int
    samples: int


def _write_checked(out: Store, rel: str, samples: int, write: Any) -> WrittenFile:
    """Write ``rel`` atomically through a checksumming stream; record what landed."""
    sums: list[_Hashing] = []

    def through(fh: IO[bytes]) -> None:
        sums.append(_Hashing(fh))
        write(sums[-1])

    out.write_atomic(rel, through)
    stat = out.stat(rel)
    mtime = stat.mtime_ns if stat is not None else 0
    return WrittenFile(rel, sums[-1].digest.hexdigest(), sums[-1].size, mtime, samples)


def output_keys(rows: list[Row], tag: str) -> list[str]:
    keys = [output_key(row, tag) for row in rows]
    if len(set(keys)) != len(keys):
        raise RuntimeError("generated keys collide; every output row needs a distinct key")
    return keys


def write_shard(out: Store, shard_id: str, rows: list[Row], spec: OutputSpec) -> list[WrittenFile]:
    """The tar and Parquet sidecar of one output shard, each atomically; returns them for the manifest.

    A shard with no output rows writes no data files (an empty Parquet file breaks Hugging Face's loader,
    and an empty tar adds nothing): its stats record alone marks it done.
    """
    if not rows:
        return []
    keys = output_keys(rows, spec.tag)
    targets = [target_of(row, spec) for row in rows]
    scores = spec.score_names(rows)

    def write_tar(fh: IO[bytes]) -> None:
        with wds.TarWriter(fh, mtime=0, user="augpipe", group="augpipe", encoder=False) as sink:
            for row, key, target in zip(rows, keys, targets, strict=True):
                sink.write(_members(row, key, spec.output, sample_json(row, key, target, spec, scores)))

    def write_parquet(fh: IO[bytes]) -> None:
        buffer = io.BytesIO()
        pq.write_table(sidecar_table(rows, keys, targets, spec, shard_id), buffer)
        fh.write(buffer.getvalue())

    tar_rel, parquet_rel = layout.data_files(shard_id)
    return [
        _write_checked(out, tar_rel, len(rows), write_tar),
        _write_checked(out, parquet_rel, len(rows), write_parquet),
    ]


def write_quarantine(out: Store, shard_id: str, failures: list[Failure]) -> str | None:
    """A tar of the shard's failures, one JSON member each; None when the shard had none."""
    if not failures:
        return None

    def write_tar(fh: IO[bytes]) -> None:
        with wds.TarWriter(fh, mtime=0, user="augpipe", group="augpipe", encoder=False) as sink:
            for i, failure in enumerate(failures):
                record = dataclasses.asdict(failure) | {"shard": shard_id}
                sink.write({"__key__": f"q{i:06d}", "error.json": json.dumps(record).encode()})

    rel = layout.quarantine_file(shard_id)
    out.write_atomic(rel, write_tar)
    return rel


def write_stats(out: Store, shard_id: str, stats: dict[str, Any]) -> None:
    """The done marker: written last, after the shard's tar, sidecar and quarantine are in place."""
    blob = json.dumps(stats, indent=1, sort_keys=True, default=json_default).encode()
    out.write_bytes(layout.stats_file(shard_id), blob)


def read_stats(out: Store, shard_id: str) -> dict[str, Any] | None:
    try:
        return json.loads(out.read_bytes(layout.stats_file(shard_id)))
    except (FileNotFoundError, json.JSONDecodeError, OSError):
        return None
