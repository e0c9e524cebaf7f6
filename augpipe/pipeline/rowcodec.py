"""Rows to Arrow and back, without pickle, for the per-stage cache.

Each column carries a kind tag in the schema metadata (text, number, JSON, ndarray as .npy bytes loaded
with ``allow_pickle=False``, image as PNG) so a cache file read back gives the rows a stage produced.
"""

from __future__ import annotations

import io
import json
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image

from augpipe.pipeline.rows import Row

KIND_KEY = b"augpipe.kinds"


def json_default(value: Any) -> Any:
    """JSON for the numpy scalars and tuples that lineage records tend to hold."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, tuple | set):
        return list(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _kind(value: Any) -> str:
    if isinstance(value, np.ndarray):
        return "ndarray"
    if isinstance(value, Image.Image):
        return "image"
    return "str" if isinstance(value, str) else "json"


def _encode(value: Any, kind: str) -> Any:
    if value is None:
        return None
    if kind == "ndarray":
        buffer = io.BytesIO()
        np.save(buffer, np.asarray(value), allow_pickle=False)
        return buffer.getvalue()
    if kind == "image":
        buffer = io.BytesIO()
        value.save(buffer, format="PNG")
        return buffer.getvalue()
    if kind == "str":
        return value
    return json.dumps(value, default=json_default)


def _decode(value: Any, kind: str) -> Any:
    if value is None:
        return None
    if kind == "ndarray":
        return np.load(io.BytesIO(value), allow_pickle=False)
    if kind == "image":
        with Image.open(io.BytesIO(value)) as image:
            return image.convert("RGB")
    if kind == "str":
        return value
    return json.loads(value)


def rows_to_table(rows: list[Row]) -> pa.Table:
    """Encode rows column by column; ``variant`` tuples survive as JSON lists and come back as tuples."""
    names: list[str] = []
    for row in rows:
        names.extend(name for name in row if name not in names)
    kinds: dict[str, str] = {}
    columns = {}
    for name in names:
        values = [row.get(name) for row in rows]
        present = {_kind(v) for v in values if v is not None}
        kind = present.pop() if len(present) == 1 else "json"
        kinds[name] = kind
        arrow_type = pa.binary() if kind in {"ndarray", "image"} else pa.string()
        columns[name] = pa.array([_encode(v, kind) for v in values], type=arrow_type)
    table = pa.table(columns) if columns else pa.table({})
    return table.replace_schema_metadata({KIND_KEY: json.dumps(kinds).encode()})


def table_to_rows(table: pa.Table) -> list[Row]:
    kinds = json.loads((table.schema.metadata or {}).get(KIND_KEY, b"{}"))
    rows = []
    for record in table.to_pylist():
        row = {
            name: _decode(value, kinds.get(name, "str"))
            for name, value in record.items()
            if value is not None
        }
        row["variant"] = tuple(row.get("variant", ()))
        rows.append(row)
    return rows
