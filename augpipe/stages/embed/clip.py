"""Backend ``clip`` of stage ``embed``.

A transformers CLIPModel by hub id (local cache only) or path; text and images.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np

from augpipe.stages.embed.base import (
    EmbedBackend,
    _half,
    _rgb,
)


def _pooled(output: Any) -> Any:
    """CLIP features as a tensor: transformers < 5 returns one; transformers 5 an output object."""
    import torch

    if isinstance(output, torch.Tensor):
        return output
    pooled = getattr(output, "pooler_output", None)
    if pooled is None:
        raise TypeError(f"unexpected CLIP feature output {type(output).__name__}: no pooler_output")
    return pooled


class ClipBackend(EmbedBackend):
    """A transformers CLIPModel (hub id in the local cache, or a local path): text and images."""

    name: ClassVar[str] = "clip"
    default_model: ClassVar[str | None] = "openai/clip-vit-base-patch32"
    modalities: ClassVar[frozenset[str]] = frozenset({"text", "image"})

    def _build(self) -> tuple[Any, Any, Any]:
        """(CLIPModel, tokenizer, image processor), on CPU in float32."""
        from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

        if self.model is None:
            self.check()
        assert self.model is not None
        location = self.model.location
        model = CLIPModel.from_pretrained(location, local_files_only=True, trust_remote_code=False)
        tokenizer = AutoTokenizer.from_pretrained(location, local_files_only=True, trust_remote_code=False)
        image_processor = AutoImageProcessor.from_pretrained(
            location, local_files_only=True, trust_remote_code=False
        )
        return model, tokenizer, image_processor

    def load(self, device: str) -> None:
        import torch

        model, self.tokenizer, self.image_processor = self._build()
        self.device = device
        self.dtype = torch.float16 if _half(self.settings, device) else torch.float32
        self.clip = model.to(device=device, dtype=self.dtype).eval()
        self.max_length = int(model.config.text_config.max_position_embeddings)
        self.dim = int(model.config.projection_dim)

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        import torch

        enc = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        with torch.inference_mode():
            out = self.clip.get_text_features(
                input_ids=enc["input_ids"].to(self.device),
                attention_mask=enc["attention_mask"].to(self.device),
            )
        return _pooled(out).float().cpu().numpy()

    def embed_images(self, images: Sequence[Any]) -> np.ndarray:
        import torch

        pixels = self.image_processor(images=[_rgb(im) for im in images], return_tensors="pt")["pixel_values"]
        with torch.inference_mode():
            out = self.clip.get_image_features(pixel_values=pixels.to(self.device, self.dtype))
        return _pooled(out).float().cpu().numpy()
