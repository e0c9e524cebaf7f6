"""Backend ``tiny``: a randomly initialised miniature BLIP built in memory, seeded, for tests and the tiny
profile (the real BLIP code path; its captions are random words)."""

from __future__ import annotations

from typing import Any, ClassVar

from augpipe.stages.caption.hf import TransformersCaptioner

TINY_WORDS = tuple(
    " ".join(
        (
            "a an the of on in with and near under two three photo picture cat dog bird horse man woman",
            "child car boat tree house field road beach sky water grass snow red blue green white black",
            "small large old young sitting standing running flying next to",
        )
    ).split()
)
TINY_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]")


def build_tiny_blip(seed: int = 0, image_size: int = 32) -> tuple[Any, Any]:
    """A randomly initialised miniature BLIP captioner and its processor, built offline and seeded.

    The tokenizer is a BertTokenizerFast over a small word vocabulary (passed with ``vocab=``; transformers
    5 silently ignores ``vocab_file=``). The LM head bias keeps the model from emitting special tokens and
    makes ``[SEP]`` (end of caption) unlikely, so random weights still give non-empty word captions.
    """
    import torch
    from transformers import (
        BertTokenizerFast,
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessorPil,
        BlipProcessor,
    )

    vocab = {token: i for i, token in enumerate((*TINY_SPECIALS, *dict.fromkeys(TINY_WORDS)))}
    tokenizer = BertTokenizerFast(vocab=vocab, do_lower_case=True, bos_token="[DEC]")
    image_processor = BlipImageProcessorPil(size={"height": image_size, "width": image_size})
    processor = BlipProcessor(image_processor=image_processor, tokenizer=tokenizer)
    config = BlipConfig(
        text_config={
            "vocab_size": len(vocab),
            "hidden_size": 32,
            "encoder_hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "max_position_embeddings": 64,
            "bos_token_id": vocab["[DEC]"],
            "eos_token_id": vocab["[SEP]"],
            "sep_token_id": vocab["[SEP]"],
            "pad_token_id": vocab["[PAD]"],
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": image_size,
            "patch_size": 8,
        },
        projection_dim=32,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BlipForConditionalGeneration(config)
    with torch.no_grad():
        bias = model.text_decoder.cls.predictions.decoder.bias
        for token in TINY_SPECIALS:
            bias[vocab[token]] = -2.0 if token == "[SEP]" else -1e4
    return model.eval(), processor


class TinyCaptioner(TransformersCaptioner):
    """A random miniature BLIP: the real BLIP code path, on CPU, in well under a second per batch."""

    name = "tiny"
    SEED: ClassVar[int] = 0

    def check(self) -> None:
        """Nothing to find: the model is built in memory."""

    def load(self, device: str) -> None:
        import torch

        self.device = device
        self.dtype = torch.float16 if device == "cuda" and self.settings.fp16 else torch.float32
        self.net, self.processor = build_tiny_blip(self.SEED)
        self.net.to(device=device, dtype=self.dtype)

    def describe(self) -> dict[str, Any]:
        info = super().describe()
        info.update(model="tiny:blip", revision=f"random-init-seed-{self.SEED}")
        return info
