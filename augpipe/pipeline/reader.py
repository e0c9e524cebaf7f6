"""Reading untrusted input shards into rows, one sample at a time, never trusting a member.

Tar members come from ``tarscan``, which accounts for every byte of the archive; decoding is ours, so that
every problem becomes a ``Failure`` naming the sample and the cause instead of an exception that ends the
shard: damaged archives keep the samples around the damage, pickles are refused unread, links and devices
are refused, keys that could escape a folder or break WebDataset's key rule are refused, member sizes are
checked from the header before a byte is read, decoded sizes are bounded, and a key seen twice keeps its
first sample (later copies fail as ``duplicate_key``, also across shards via ``drop``).
"""

from __future__ import annotations

import io
import json
import re
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import IO, Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import soundfile
from PIL import Image

from augpipe.pipeline.config import Limits
from augpipe.pipeline.inputs import InputUnit
from augpipe.pipeline.rows import Failure, Row, key_digest
from augpipe.pipeline.tarscan import Damage, Sample, Skipped, key_of, read_member, scan_samples

READ_STAGE = "read"
IMAGE_EXTS = {"jpg", "jpeg", "png", "webp", "bmp"}
AUDIO_EXTS = {"flac", "wav", "ogg"}
TEXT_EXTS = {"txt", "text", "caption"}
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
                    "image_too_large",
                    f"{name} is {image.width}x{image.height} = {image.width * image.height:,} pixels; "
                    f"the limit is {limits.max_image_pixels:,}",
                )
            return image.convert("RGB")
    except SampleError:
        raise
    except Exception as exc:
        raise SampleError("undecodable_image", f"{name} could not be decoded: {_reason(exc)}") from exc


def _decode_audio(data: bytes, name: str, limits: Limits) -> tuple[np.ndarray, int]:
    try:
        info = soundfile.info(io.BytesIO(data))
        if info.duration > limits.max_audio_seconds:
            raise SampleError(
                "audio_too_long",
                f"{name} lasts {info.duration:.1f} s; the limit is {limits.max_audio_seconds:g} s",
            )
        audio, rate = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except SampleError:
        raise
    except Exception as exc:
        raise SampleError("undecodable_audio", f"{name} could not be decoded: {_reason(exc)}") from exc
    return audio.mean(axis=1), int(rate)


def _label_from(meta: dict[str, Any]) -> Any:
    return meta.get("label", meta.get("class"))


def check_key(key: str) -> None:
    if not SAFE_KEY.match(key):
        raise SampleError("unsafe_key", f"key {key!r} is not a safe sample key (letters, digits, _ - /)")


def media_field(ext: str) -> str | None:
    """The row field a media member decodes into (``image`` or ``audio``), else None."""
    return "image" if ext in IMAGE_EXTS else "audio" if ext in AUDIO_EXTS else None


def decode_members(key: str, members: dict[str, bytes], limits: Limits) -> Row:
    """One WebDataset sample (extension -> bytes) into a row, or SampleError with the cause."""
    row: Row = {"key": key, "variant": (), "lineage": {}}
    for ext, data in members.items():
        name = f"{key}.{ext}"
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
    if set(row) <= {"key", "variant", "lineage", "meta"}:
        raise SampleError(
            "unknown_member_type",
            f"sample {key} has no usable member (found: {', '.join(sorted(members))})",
        )
    return row


def _check_sample(sample: Sample, limits: Limits) -> None:
    """Refusals decided from tar headers alone, before any member is read."""
    check_key(sample.key)
    if sample.others:
        other = sample.others[0]
        target = f" to {other.target}" if other.target else ""
        raise SampleError(
            "non_regular_member",
            f"member {other.name} is a {other.kind}{target}; augpipe reads regular files only",
        )
    refused = sorted(set(sample.members) & PICKLE_EXTS)
    if refused:
        raise SampleError(
            "refused_pickle",
            f"member {sample.key}.{refused[0]} is a pickle; augpipe never unpickles shard members",
        )
    for ext, member in sample.members.items():
        if member.size > limits.max_member_bytes:
            raise SampleError(
                "member_too_large",
                f"{sample.key}.{ext} has {member.size:,} bytes; the limit is {limits.max_member_bytes:,}",
            )


def _check_fields(row: Row, required: list[str]) -> None:
    missing = [f for f in required if f not in row]
    if missing:
        raise SampleError("missing_field", f"sample {row['key']} lacks {', '.join(missing)}")
    if "text" in required and not row["text"]:
        raise SampleError("empty_text", f"sample {row['key']} has an empty text")


class _Admission:
    """Counts samples in, keeps good rows, and records why each bad one was refused (once per key)."""

    def __init__(
        self, unit: InputUnit, required: list[str], drop: dict[bytes, str], skip_media: set[str]
    ) -> None:
        self.result = ReadResult()
        self.unit, self.drop, self.skip_media = unit, drop, skip_media
        self.required = [f for f in required if f not in skip_media]
        self.seen: set[str] = set()

    def fail(self, key: str, cause: str, message: str) -> None:
        self.result.failures.append(Failure(key, READ_STAGE, cause, message))

    def admit(self, key: str, decode: Callable[[], Row]) -> None:
        self.result.counts["samples_in"] += 1
        if key in self.seen:
            self.fail(
                key, "duplicate_key", f"key {key} repeats an earlier sample of {self.unit.label} (kept)"
            )
            return
        self.seen.add(key)
        owner = self.drop.get(key_digest(key)) if self.drop else None
        if owner is not None:
            self.fail(key, "duplicate_key", f"key {key} is also in {owner}, which comes first (kept)")
            return
        try:
            row = decode()
            _check_fields(row, self.required)
        except SampleError as exc:
            self.fail(key, exc.cause, str(exc))
            return
        self.result.rows.append(row)


def _sidecar_columns(unit: InputUnit) -> dict[str, dict[str, Any]]:
    """key -> {column: value} from the tar's Parquet sidecar; vector columns become float32 arrays."""
    if unit.sidecar is None:
        return {}
    with unit.source.open_read(unit.sidecar) as fh:
        table = pq.read_table(fh)
    if "key" not in table.column_names:
        return {}
    keys = table["key"].to_pylist()
    values: dict[str, list[Any]] = {}
    for name in table.column_names:
        if name != "key":
            values[name] = _column_values(table[name])
    return {
        key: {name: column[i] for name, column in values.items() if column[i] is not None}
        for i, key in enumerate(keys)
    }


def _column_values(column: pa.ChunkedArray) -> list[Any]:
    """Python values of a column; numeric list columns as float32 arrays (fast path for embeddings).

    Other lists (augpipe's own stage_chain, typed soft labels) stay as they are, so an output folder
    reads back as an input."""
    kind = column.type
    if pa.types.is_fixed_size_list(kind) and pa.types.is_floating(kind.value_type) and column.null_count == 0:
        flat = column.combine_chunks().flatten().to_numpy(zero_copy_only=False).astype(np.float32)
        return list(flat.reshape(len(column), kind.list_size))
    return [_as_value(v) for v in column.to_pylist()]


def _as_value(value: Any) -> Any:
    """A numeric list as a float32 array; anything else unchanged."""
    numeric = isinstance(value, list) and all(
        isinstance(v, int | float) and not isinstance(v, bool) for v in value
    )
    return np.asarray(value, dtype=np.float32) if numeric else value


def _tar_samples(stream: IO[bytes], size: int, admission: _Admission, limits: Limits) -> None:
    extras = _sidecar_columns(admission.unit)
    label = admission.unit.label
    counts = admission.result.counts
    for item in scan_samples(stream, size):
        if isinstance(item, Skipped):
            counts["skipped_members"] += 1
            continue
        if isinstance(item, Damage):
            counts["samples_in"] += 1
            counts["damaged_regions"] += 1
            key = key_of(item.member)[0] if item.member else None
            where = f"sample {key}" if key else "an unknown number of samples"
            admission.fail(
                key or label,
                "corrupt_shard",
                f"{label}: damaged at byte {item.offset:,}: {item.message}; {where} lost there",
            )
            continue

        def decode(sample: Sample = item) -> Row:
            _check_sample(sample, limits)
            data = {
                ext: read_member(stream, member)
                for ext, member in sample.members.items()
                if media_field(ext) not in admission.skip_media
            }
            if data:
                row = decode_members(sample.key, data, limits)
            else:  # every member is media this pass skips: the sidecar alone fills the row
                row = {"key": sample.key, "variant": (), "lineage": {}}
            for column, value in extras.get(sample.key, {}).items():
                row.setdefault(column, value)
            return row

        admission.admit(item.key, decode)


def read_tar(
    unit: InputUnit, required: list[str], limits: Limits, drop: dict[bytes, str], skip_media: set[str]
) -> ReadResult:
    admission = _Admission(unit, required, drop, skip_media)
    with unit.source.local_copy(unit.rel) as path, path.open("rb") as stream:
        _tar_samples(stream, path.stat().st_size, admission, limits)
    return admission.result


def table_records(unit: InputUnit) -> Iterator[dict[str, Any]]:
    """The unit's rows of a Parquet (only the row groups it spans) or CSV table, as dicts."""
    stop = unit.stop if unit.stop is not None else float("inf")
    with unit.source.open_read(unit.rel) as fh:
        batches = pq.ParquetFile(fh).iter_batches(1024) if unit.kind == "parquet" else pacsv.open_csv(fh)
        position = 0
        for batch in batches:
            end = position + batch.num_rows
            if end > unit.start and position < stop:
                lo, hi = max(unit.start - position, 0), min(stop - position, batch.num_rows)
                yield from batch.slice(lo, hi - lo).to_pylist()
            position = end
            if position >= stop:
                return


def table_key(record: dict[str, Any], row_number: int) -> str:
    return str(record.get("key") or f"row{row_number:09d}")


def read_tabular(
    unit: InputUnit, required: list[str], limits: Limits, drop: dict[bytes, str], skip_media: set[str]
) -> ReadResult:
    admission = _Admission(unit, required, drop, skip_media)

    def decode(key: str, record: dict[str, Any]) -> Row:
        check_key(key)
        row: Row = {"key": key, "variant": (), "lineage": {}}
        for column, value in record.items():
            if value is None or column == "key":
                continue
            if column == "text":
                value = _decode_text(str(value).encode(), f"{unit.label} row {key}", limits)
            row[column] = _as_value(value)
        return row

    for offset, record in enumerate(table_records(unit)):
        key = table_key(record, unit.start + offset)
        admission.admit(key, lambda k=key, r=record: decode(k, r))
    return admission.result


def read_unit(
    unit: InputUnit,
    required: list[str],
    limits: Limits,
    drop: dict[bytes, str] | None = None,
    skip_media: set[str] | None = None,
) -> ReadResult:
    """Every row of ``unit`` that passes the checks, and a Failure for every one that does not.

    ``drop`` maps key digests (``rows.key_digest``) to the earlier shard that holds the key; those samples
    fail as ``duplicate_key``. ``skip_media`` (``image``, ``audio``) leaves those members undecoded, for a
    pass that needs only a sidecar's embeddings and labels.
    """
    reader = read_tar if unit.kind == "tar" else read_tabular
    return reader(unit, required, limits, drop or {}, skip_media or set())
