"""Typed values read out of row fields, for any stage: vectors, images, label names, templates, audio.

Private (the registry lists no module whose name starts with ``_``): shared helpers live here rather than in a
stage module, so no stage imports another stage as a library.
"""

from __future__ import annotations

import string
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from augpipe.pipeline.rows import Failure, Row

if TYPE_CHECKING:
    from augpipe.pipeline.stage import Stage


def template_fields(template: str) -> list[str]:
    """The placeholder names of a ``str.format`` template; only plain identifiers are allowed."""
    names = []
    for _, name, spec, conversion in string.Formatter().parse(template):
        if name is None:
            continue
        if not name.isidentifier() or spec or conversion:
            raise ValueError(
                f"prompt_template placeholder {{{name}}} must be a plain field name like {{caption}}"
            )
        names.append(name)
    return names


def label_name(row: Row, label_names: tuple[str, ...] | None) -> str | None:
    if isinstance(row.get("label_name"), str):
        return row["label_name"]
    label = row.get("label")
    if isinstance(label, str):
        return label
    if label_names is not None and label is not None and not isinstance(label, bool):
        try:
            index = int(label)
        except (TypeError, ValueError):
            return None
        if 0 <= index < len(label_names):
            return label_names[index]
    return None


def is_image(value: Any) -> bool:
    return isinstance(value, Image.Image)


def as_vector(value: Any) -> np.ndarray | None:
    """A finite 1-D float32 vector, or None when the value is missing, empty or not finite."""
    if value is None or isinstance(value, str | bytes | dict) or is_image(value):
        return None
    try:
        vector = np.asarray(value, dtype=np.float32).reshape(-1)
    except (TypeError, ValueError):
        return None
    return vector if vector.size and np.isfinite(vector).all() else None


def read_audio(row: Row, stage: Stage) -> tuple[np.ndarray, int] | Failure:
    """The row's audio as float32 mono and its sample rate, or a Failure of ``stage`` naming what is wrong."""
    audio, rate = row.get("audio"), row.get("sample_rate")

    def fail(cause: str, message: str) -> Failure:
        return stage.fail(row, cause, message)

    if audio is None:
        return fail("empty_audio", "the row has no audio")
    try:
        samples = np.asarray(audio, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        return fail("bad_audio", f"audio is not numeric: {exc}")
    if samples.ndim == 2 and 1 in samples.shape:
        samples = samples.reshape(-1)
    if samples.ndim != 1:
        return fail("bad_audio", f"audio must be mono (1-D), got shape {samples.shape}")
    if samples.size == 0:
        return fail("empty_audio", "audio has no samples")
    if not np.all(np.isfinite(samples)):
        return fail("bad_audio", "audio holds NaN or infinite samples")
    if isinstance(rate, bool) or not isinstance(rate, int | np.integer) or not 1000 <= int(rate) <= 384_000:
        return fail("bad_audio", f"sample_rate {rate!r} is not a plausible rate in Hz")
    return samples, int(rate)
