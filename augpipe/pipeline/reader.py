"""Reading untrusted input shards into rows, one sample at a time, never trusting a member.

Tar members come from webdataset's own tar iterator; grouping and decoding are ours so that every
problem becomes a ``Failure`` naming the sample and the cause instead of an exception that ends the shard:
truncated tars keep the samples before the damage, pickles are refused unread, keys that could escape a
directory or break WebDataset's key rule are refused, and decoded sizes are bounded.
"""

from __future__ import annotations

import io
import json
import re
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import soundfile
from PIL import Image
from webdataset.tariterators import base_plus_ext, tar_file_iterator

from augpipe.pipeline.config import Limits
from augpipe.pipeline.inputs import InputUnit
from augpipe.pipeline.rows import Failure, Row

READ_STAGE = "read"
IMAGE_EXTS = {"jpg", "jpeg", "png", "webp", "bmp"}
AUDIO_EXTS = {"flac", "wav", "ogg"}
TEXT_EXTS = {"txt", "text", "caption"}
META_EXTS = {"json", "cls"}
PICKLE_EXTS = {"pyd", "pickle", "pkl", "pth", "pt", "ckpt", "joblib"}
SAFE_KEY = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_\-]*(/[A-Za-z0-9_][A-Za-z0-9_\-]*)*$")


class SampleError(Exception):
    """A sample that cannot be used, with a short machine-readable cause."""

    def __init__(self, cause: str, message: str) -> None:
        super().__init__(message)
        self.cause = cause


@dataclass
class ReadResult:
    """Rows read from one unit, the samples that failed, and counts for the shard's stats."""

    rows: list[Row] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)
    counts: Counter[str] = field(default_factory=Counter)


def _reason(exc: Exception) -> str:
    """A decoder's message without object addresses, so quarantine records are the same on every run."""
    return re.sub(r" at 0x[0-9a-fA-F]+", "", f"{type(exc).__name__}: {exc}")


def _decode_text(data: bytes, name: str, limits: Limits) -> str:
    if len(data) > limits.max_text_bytes:
        raise SampleError(
            "text_too_large", f"{name} has {len(data):,} bytes; the limit is {limits.max_text_bytes:,}"
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SampleError(
            "text_not_utf8", f"{name} is not valid UTF-8 ({exc.reason} at byte {exc.start})"
        ) from exc
    return text.strip()


def _decode_image(data: bytes, name: str, limits: Limits) -> Image.Image:
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.width * image.height > limits.max_image_pixels:
                raise SampleError(
                    "image_too_large", f"{name} is {image.width}x{image.height}, over the pixel limit"
                )
            return image.convert("RGB")
    except SampleError:
        raise
    except Exception as exc:
        raise SampleError("undecodable_image", f"{name} could not be decoded: {_reason(exc)}") from exc


def _decode_audio(data: bytes, name: str, limits: Limits) -> tuple[np.ndarray, int]:
    try:
        audio, rate = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except Exception as exc:
        raise SampleError("undecodable_audio", f"{name} could not be decoded: {_reason(exc)}") from exc
    if len(audio) / rate > limits.max_audio_seconds:
        raise SampleError("audio_too_long", f"{name} lasts {len(audio) / rate:.0f} s, over the limit")
    return audio.mean(axis=1), int(rate)


def _label_from(meta: dict[str, Any]) -> Any:
    return meta.get("label", meta.get("class"))


def decode_sample(key: str, members: dict[str, bytes], limits: Limits) -> Row:
    """One WebDataset sample (extension -> bytes) into a row, or SampleError with the cause."""
    if not SAFE_KEY.match(key):
        raise SampleError("unsafe_key", f"key {key!r} is not a safe sample key (letters, digits, _ - /)")
    refused = sorted(set(members) & PICKLE_EXTS)
    if refused:
        raise SampleError(
            "refused_pickle", f"member {key}.{refused[0]} is a pickle; augpipe never unpickles shard members"
        )
    row: Row = {"key": key, "variant": (), "lineage": {}}
    for ext, data in members.items():
        name = f"{key}.{ext}"
        if len(data) > limits.max_member_bytes:
            raise SampleError("member_too_large", f"{name} has {len(data):,} bytes, over the member limit")
        if ext in TEXT_EXTS:
            row["text"] = _decode_text(data, name, limits)
        elif ext in IMAGE_EXTS:
            row["image"] = _decode_image(data, name, limits)
        elif ext in AUDIO_EXTS:
            row["audio"], row["sample_rate"] = _decode_audio(data, name, limits)
        elif ext == "json":
            try:
                meta = json.loads(_decode_text(data, name, limits) or "{}")
            except json.JSONDecodeError as exc:
                raise SampleError("bad_json", f"{name} is not valid JSON: {exc}") from exc
            if isinstance(meta, dict):
                row["meta"] = meta
                if _label_from(meta) is not None:
                    row.setdefault("label", _label_from(meta))
        elif ext == "cls":
            row["label"] = _decode_text(data, name, limits)
    if set(row) == {"key", "variant", "lineage"} | ({"meta"} & set(row)):
        raise SampleError(
            "unknown_member_type",
            f"sample {key} has no usable member (found: {', '.join(sorted(members))})",
        )
    return row


def _check_fields(row: Row, required: list[str]) -> None:
    missing = [f for f in required if f not in row]
    if missing:
        raise SampleError("missing_field", f"sample {row['key']} lacks {', '.join(missing)}")
    if "text" in required and not row["text"]:
        raise SampleError("empty_text", f"sample {row['key']} has an empty text")


def _grouped_members(stream: Any, result: ReadResult, label: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Consecutive members sharing a key, as WebDataset groups them; damage ends the shard, not the run."""
    errors: list[Exception] = []

    def keep_error(exc: Exception) -> bool:
        errors.append(exc)
        return False

    key, members = None, {}
    try:
        for item in tar_file_iterator(stream, handler=keep_error):
            prefix, ext = base_plus_ext(item["fname"])
            if prefix is None:
                result.counts["ignored_members"] += 1
                continue
            if key is not None and prefix != key:
                yield key, members
                members = {}
            key = prefix
            members[ext.lower()] = item["data"]
    except Exception as exc:
        errors.append(exc)
    if key is not None:
        yield key, members
    if errors:
        last = f" after sample {key}" if key is not None else ""
        result.failures.append(
            Failure(label, READ_STAGE, "corrupt_shard", f"{label}: unreadable{last}: {errors[0]}")
        )


def _sidecar_columns(unit: InputUnit) -> dict[str, dict[str, Any]]:
    if unit.sidecar is None:
        return {}
    table = pq.read_table(unit.sidecar)
    if "key" not in table.column_names:
        return {}
    columns = [c for c in table.column_names if c != "key"]
    return {
        row["key"]: {c: _as_value(row[c]) for c in columns if row[c] is not None} for row in table.to_pylist()
    }


def _as_value(value: Any) -> Any:
    """Numeric lists (embeddings) as float32 arrays; other lists (augpipe's own stage_chain, typed soft
    labels) stay as they are, so an output folder reads back as an input."""
    numeric = isinstance(value, list) and all(
        isinstance(v, int | float) and not isinstance(v, bool) for v in value
    )
    return np.asarray(value, dtype=np.float32) if numeric else value


def _admit(result: ReadResult, key: str, decode: Callable[[], Row], required: list[str]) -> None:
    """Count a sample in and keep its row, or record why it cannot be used."""
    result.counts["samples_in"] += 1
    try:
        row = decode()
        _check_fields(row, required)
    except SampleError as exc:
        result.failures.append(Failure(key, READ_STAGE, exc.cause, str(exc)))
        return
    result.rows.append(row)


def read_tar(unit: InputUnit, required: list[str], limits: Limits) -> ReadResult:
    result = ReadResult()
    extras = _sidecar_columns(unit)

    def decode(key: str, members: dict[str, bytes]) -> Row:
        row = decode_sample(key, members, limits)
        for column, value in extras.get(key, {}).items():
            row.setdefault(column, value)
        return row

    with unit.path.open("rb") as stream:
        for key, members in _grouped_members(stream, result, unit.label):
            _admit(result, key, lambda k=key, m=members: decode(k, m), required)
    return result


def _read_table(unit: InputUnit) -> pa.Table:
    table = pq.read_table(unit.path) if unit.kind == "parquet" else pacsv.read_csv(unit.path)
    return table.slice(unit.start, (unit.stop or table.num_rows) - unit.start)


def read_tabular(unit: InputUnit, required: list[str], limits: Limits) -> ReadResult:
    result = ReadResult()

    def decode(key: str, record: dict[str, Any]) -> Row:
        if not SAFE_KEY.match(key):
            raise SampleError("unsafe_key", f"key {key!r} is not a safe sample key")
        row: Row = {"key": key, "variant": (), "lineage": {}}
        for column, value in record.items():
            if value is None:
                continue
            if column == "text":
                value = _decode_text(str(value).encode(), f"{unit.label} row {key}", limits)
            row[column] = _as_value(value)
        return row

    for offset, record in enumerate(_read_table(unit).to_pylist()):
        key = str(record.pop("key", None) or f"row{unit.start + offset:09d}")
        _admit(result, key, lambda k=key, r=record: decode(k, r), required)
    return result


def read_unit(unit: InputUnit, required: list[str], limits: Limits) -> ReadResult:
    """Every row of ``unit`` that passes the checks, and a Failure for every one that does not."""
    reader = read_tar if unit.kind == "tar" else read_tabular
    return reader(unit, required, limits)
