"""Helpers of the whole-shard pool stages (interpolate, mixup, geodesic_mixup): canonical row order, shard
seeds, how lineage names a row, images at one size, labels as class indices and soft labels.

Private (the registry lists no module whose name starts with ``_``), so the mixup baselines share these with
CMDA's ``interpolate`` without importing a stage module.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence

import numpy as np
from PIL import Image

from augpipe.pipeline.rows import Row, derive_seed


def row_ident(row: Row) -> str:
    """How lineage names a row: its key, plus its variant when an earlier stage fanned out."""
    variant = row.get("variant", ())
    return row["key"] if not variant else f"{row['key']}:{'-'.join(map(str, variant))}"


def shard_seed(run_seed: int, rows: Sequence[Row], stage: str) -> int:
    """A seed for work on a whole shard, from the run seed and the shard's row identities (order-free)."""
    digest = hashlib.sha256("\n".join(sorted(row_ident(r) for r in rows)).encode()).hexdigest()[:16]
    return derive_seed(run_seed, f"shard:{digest}", stage)


def sorted_rows(rows: Sequence[Row]) -> list[Row]:
    """Rows in a canonical order (key, variant), so outputs do not depend on the order rows arrive in."""
    return sorted(rows, key=lambda r: (r["key"], tuple(r.get("variant", ()))))


def fit_image(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """``image`` scaled (bicubic) to cover ``size`` = (width, height), then centre-cropped to it."""
    image = image if image.mode == "RGB" else image.convert("RGB")
    if image.size == size:
        return image
    w, h = size
    scale = max(w / image.width, h / image.height)
    nw, nh = max(w, round(image.width * scale)), max(h, round(image.height * scale))
    resized = image.resize((nw, nh), Image.Resampling.BICUBIC)
    left, top = (nw - w) // 2, (nh - h) // 2
    return resized.crop((left, top, left + w, top + h))


def to_image(pixels: np.ndarray) -> Image.Image:
    """A float H×W×3 array as a PIL RGB image, rounded and clipped to 0..255."""
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), mode="RGB")


def class_index(rows: Sequence[Row]) -> tuple[list[str], np.ndarray]:
    """Sorted class names (labels as strings) and each row's class index, −1 for an unlabelled row."""
    classes = sorted({str(r["label"]) for r in rows if r.get("label") is not None})
    lookup = {c: i for i, c in enumerate(classes)}
    idx = np.array([lookup[str(r["label"])] if r.get("label") is not None else -1 for r in rows], np.int64)
    return classes, idx


def soft_label_json(weights: np.ndarray, classes: Sequence[str]) -> str | None:
    """{label: weight} of the non-zero classes as a JSON string (sorted keys); None when all are zero."""
    if not np.any(weights > 0):
        return None
    return json.dumps({classes[c]: float(weights[c]) for c in np.flatnonzero(weights > 0)}, sort_keys=True)


def label_matrix(rows: list[Row]) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Classes, one-hot labels (n×C, zero rows for unlabelled rows) and which rows are labelled."""
    classes, idx = class_index(rows)
    onehot = np.zeros((len(rows), len(classes)), dtype=np.float64)
    labelled = idx >= 0
    onehot[np.flatnonzero(labelled), idx[labelled]] = 1.0
    return classes, onehot, labelled
