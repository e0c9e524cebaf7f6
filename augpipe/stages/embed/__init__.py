"""embed: one vector per row for a text or image field (CMDA's common space, similarity scores, clustering).

Settings: ``field`` (``text``, ``transcript`` or ``image``), ``output`` (default ``<field>_embedding``),
``normalize`` (L2, default on), ``backend`` and ``model``. Embeddings are ``np.float32`` 1-D arrays.

Backends (each makes one model call per batch):

- ``sentence_transformers`` (default for text): the packaged all-MiniLM-L6-v2, 384-d.
- ``clip``: a transformers CLIPModel by hub id (local cache only) or path; text and images.
- ``efficientnet_lite0`` (default for images): the packaged ImageNet EfficientNet-Lite0, 1280-d
  pooled features; ``features_and_topk`` also returns its top-k ImageNet class ids.
- ``tiny``: a seeded, randomly initialised miniature CLIPModel with a byte-level tokenizer built in
  memory, so the clip code path runs on CPU in seconds (tests, the ``tiny`` profile).

One module per backend in this package; ``base`` holds what they share. The backend classes are reused by
other stages (``score_similarity``, ``score_invariance``); import them from here.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import Field, model_validator

from augpipe.pipeline.rows import Failure, FieldName, Row, record
from augpipe.pipeline.stage import Backend, Resources, Stage, StageContext, StageSettings
from augpipe.stages.embed.base import (
    IMAGE_FIELDS,
    TEXT_FIELDS,
    EmbedBackend,
    Modality,
    l2_normalize,
    modality_of,
)
from augpipe.stages.embed.clip import ClipBackend
from augpipe.stages.embed.efficientnet_lite0 import EfficientNetLite0Backend
from augpipe.stages.embed.sentence_transformers import SentenceTransformersBackend
from augpipe.stages.embed.tiny import TinyClipBackend

__all__ = [
    "BACKENDS",
    "IMAGE_FIELDS",
    "TEXT_BACKENDS",
    "TEXT_FIELDS",
    "ClipBackend",
    "EfficientNetLite0Backend",
    "Embed",
    "EmbedBackend",
    "EmbedSettings",
    "Modality",
    "SentenceTransformersBackend",
    "TinyClipBackend",
    "l2_normalize",
    "modality_of",
]


BACKENDS: dict[str, type[EmbedBackend]] = {
    b.name: b for b in (SentenceTransformersBackend, ClipBackend, EfficientNetLite0Backend, TinyClipBackend)
}
TEXT_BACKENDS: dict[str, type[EmbedBackend]] = {n: b for n, b in BACKENDS.items() if "text" in b.modalities}


# ------------------------------------------------------------------------------------------------ stage


class EmbedSettings(StageSettings):
    field: Literal["text", "transcript", "image"] = Field(default="text", description="the field to embed")
    output: FieldName | None = Field(default=None, description="output field; default <field>_embedding")
    normalize: bool = Field(default=True, description="scale each embedding to unit L2 norm")
    model: str | None = Field(
        default=None, description="model reference (pkg://, local path or cached hub id); backend default"
    )

    @model_validator(mode="before")
    @classmethod
    def _default_backend(cls, data: Any) -> Any:
        """No backend named: sentence_transformers for text fields, efficientnet_lite0 for images."""
        if isinstance(data, dict) and data.get("backend") is None:
            image = data.get("field") in IMAGE_FIELDS
            data = {**data, "backend": "efficientnet_lite0" if image else "sentence_transformers"}
        return data

    @property
    def output_field(self) -> str:
        return self.output or f"{self.field}_embedding"


class Embed(Stage):
    name: ClassVar[str] = "embed"
    consumes: ClassVar[frozenset[str]] = frozenset({"text"})
    produces: ClassVar[frozenset[str]] = frozenset({"text_embedding"})
    Settings: ClassVar[type[StageSettings]] = EmbedSettings
    resources: ClassVar[Resources] = Resources(cpus=1.0, gpus=0.0, memory_gb=2.0)
    batch_size: ClassVar[int] = 64
    backends: ClassVar[dict[str, type[Backend]]] = dict(BACKENDS)
    default_backend: ClassVar[str | None] = "sentence_transformers"
    keeps_rows: ClassVar[bool] = True

    settings: EmbedSettings
    backend: EmbedBackend

    def __init__(self, settings: StageSettings, context: StageContext) -> None:
        super().__init__(settings, context)
        modality = modality_of(self.settings.field)
        if modality not in self.backend.modalities:
            raise ValueError(
                f"backend {self.backend.name!r} embeds {'/'.join(sorted(self.backend.modalities))}, "
                f"but field {self.settings.field!r} is {modality}"
            )
        self.modality: Modality = modality

    def inputs(self) -> frozenset[str]:
        return frozenset({self.settings.field})

    def outputs(self) -> frozenset[str]:
        return frozenset({self.settings.output_field})

    def _valid(self, value: Any) -> bool:
        if self.modality == "text":
            return isinstance(value, str)
        return hasattr(value, "convert") and hasattr(value, "size")

    def process_batch(self, rows: list[Row]) -> list[Row | Failure]:
        s = self.settings
        field, output = s.field, s.output_field
        kind = "a str" if self.modality == "text" else "an image"
        results: list[Row | Failure] = []
        todo: list[Row] = []
        for row in rows:
            value = row.get(field)
            if self._valid(value):
                todo.append(row)
                results.append(row)
            else:
                results.append(
                    self.fail(
                        row,
                        "missing_field",
                        f"field {field!r} is missing or not {kind} (got {type(value).__name__})",
                    )
                )
        if todo:
            vectors = self.backend.embed(self.modality, [row[field] for row in todo])
            if s.normalize:
                vectors = l2_normalize(vectors)
            info = {
                **self.backend.describe(),
                "field": field,
                "dim": int(vectors.shape[1]),
                "normalize": s.normalize,
            }
            for row, vector in zip(todo, vectors, strict=True):
                row[output] = np.array(vector, dtype=np.float32)
                record(row, self.name, **{output: dict(info)})
            self.stats["embedded"] += len(todo)
        return results
