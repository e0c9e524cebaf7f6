"""Backend ``tiny`` of stage ``embed``.

A seeded random miniature CLIPModel with an in-memory byte-level tokenizer (the clip code path on CPU in
seconds: tests, the ``tiny`` profile).
"""

from __future__ import annotations

from typing import Any, ClassVar

from augpipe.pipeline.stage import StageContext, StageSettings
from augpipe.stages.embed.clip import ClipBackend


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
