"""What every ``embed`` backend shares: the field modalities, L2 normalisation and the backend interface
(one model call per batch of texts or images)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar, Literal

import numpy as np

from augpipe.pipeline.stage import Backend, StageContext, StageSettings

TEXT_FIELDS = frozenset({"text", "transcript"})
IMAGE_FIELDS = frozenset({"image"})
Modality = Literal["text", "image"]


def modality_of(field: str) -> Modality:
    return "image" if field in IMAGE_FIELDS else "text"


def l2_normalize(vectors: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Rows scaled to unit L2 norm; an all-zero row stays zero instead of becoming NaN."""
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return (vectors / np.maximum(norms, eps)).astype(np.float32, copy=False)


def _rgb(image: Any) -> Any:
    return image if getattr(image, "mode", None) == "RGB" else image.convert("RGB")


def _half(settings: StageSettings, device: str) -> bool:
    return device == "cuda" and settings.fp16


class EmbedBackend(Backend):
    """A model that maps a batch of texts and/or images to a (N, dim) float32 array, one call per batch."""

    modalities: ClassVar[frozenset[str]] = frozenset()
    dim: int = 0
    """Output dimension, known after ``load``; not in ``describe``, so fingerprints do not depend on it."""

    def __init__(self, settings: StageSettings, context: StageContext) -> None:
        super().__init__(settings, context)
        self.device = "cpu"

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        raise NotImplementedError(f"backend {self.name!r} does not embed text")

    def embed_images(self, images: Sequence[Any]) -> np.ndarray:
        raise NotImplementedError(f"backend {self.name!r} does not embed images")

    def embed(self, modality: Modality, values: Sequence[Any]) -> np.ndarray:
        """Raw (un-normalised) embeddings of ``values``, shape (len(values), dim), float32."""
        if not values:
            return np.zeros((0, self.dim), dtype=np.float32)
        out = self.embed_texts(values) if modality == "text" else self.embed_images(values)
        return np.asarray(out, dtype=np.float32)
