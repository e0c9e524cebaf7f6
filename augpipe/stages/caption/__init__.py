"""Stage ``caption``: image → text with a pretrained captioner, ``variants`` captions per image.

Back-captioning's F and back-imagination's G (METHODS 1.1). Multi-captioning (METHODS 1.2) needs
several different captions per image, each reproducible from a recorded seed. Two ways are offered:

- ``do_sample: true`` (default): variant 0 is the deterministic caption (greedy, or beam search when
  ``num_beams > 1``) unless ``greedy_first: false``; the other variants are sampled
  (``temperature``, ``top_k``, ``top_p``), each from a ``torch.Generator`` seeded with the row's own
  seed (``Stage.seed_for``). The sampling is done by a logits processor that draws each row's token with
  that row's generator, so a caption depends on its seed alone, not on which rows share its batch, and a
  whole batch still goes through one ``generate`` call (each image is encoded once and expanded with
  ``num_return_sequences``). Only a beam-searched variant 0 (``num_beams > 1``) takes a second call.
- ``do_sample: false``: the top-``variants`` beams of one beam search (``num_beams >= variants``).

Each output row is a fan-out child (``variant`` gains the caption's index), with the caption in
``output`` (default ``caption``) and lineage: backend, model, revision, decoding mode and parameters,
seed, prompt. The field read is ``field`` (default ``image``), so back-imagination can caption
``generated_image``.

Backends: ``blip`` (BlipForConditionalGeneration), ``blip2`` (Blip2ForConditionalGeneration), ``hf``
(any AutoModelForImageTextToText + AutoProcessor that captions from ``processor(images=, text=)``), and
``tiny`` (a randomly initialised miniature BLIP built in memory, seeded, for tests and the tiny profile).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, ClassVar

from pydantic import Field, model_validator

from augpipe.pipeline.families import GeneratorStage
from augpipe.pipeline.models import ModelNotFoundError
from augpipe.pipeline.rows import Failure, FieldName, Row, fan_out, record
from augpipe.pipeline.stage import Backend, Resources, StageSettings


class CaptionSettings(StageSettings):
    model: str | None = Field(default=None, description="hub id (in the local cache), local path or pkg://")
    field: FieldName = Field(default="image", description="the image field to caption")
    output: FieldName = Field(default="caption", description="the field the caption is written to")
    variants: int = Field(default=1, ge=1, le=64, description="captions per image (l)")
    do_sample: bool = Field(default=True, description="sample variants (else: top-l beams)")
    greedy_first: bool = Field(default=True, description="variant 0 is the greedy/beam caption")
    num_beams: int = Field(default=1, ge=1, le=64)
    max_new_tokens: int = Field(default=30, ge=1, le=512)
    temperature: float = Field(default=1.0, gt=0)
    top_k: int = Field(default=0, ge=0, description="0 disables top-k")
    top_p: float = Field(default=0.9, gt=0, le=1)
    prompt: str | None = Field(default=None, description="text prefix the captioner continues")
    keep_prompt: bool = Field(default=False, description="keep the prompt prefix in the caption")

    @model_validator(mode="after")
    def _distinct_fields(self) -> CaptionSettings:
        if self.field == self.output:
            raise ValueError(f"output {self.output!r} would overwrite the input field")
        return self


class _SeededSampler:
    """A logits processor that picks each row's next token itself and returns one-hot scores.

    Row ``r`` of the expanded batch is greedy when ``greedy[r]``, else sampled from the warped
    distribution with ``generators[r]``. ``generate`` then takes the only finite token whatever its own
    decoding mode, so one call serves greedy and sampled rows and each row follows its own seed.
    """

    def __init__(self, generators: list[Any], greedy: list[bool], warpers: list[Any]) -> None:
        self.generators = generators
        self.greedy = greedy
        self.warpers = warpers

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        if scores.shape[0] != len(self.generators):
            raise RuntimeError(
                f"sampler got {scores.shape[0]} rows for {len(self.generators)} seeds; the model's "
                "generate() does not expand inputs as expected"
            )
        scores = scores.float()
        warped = scores
        for warper in self.warpers:
            warped = warper(input_ids, warped)
        probs = torch.softmax(warped, dim=-1)
        chosen = torch.empty(scores.shape[0], dtype=torch.long, device=scores.device)
        for r, generator in enumerate(self.generators):
            if self.greedy[r]:
                chosen[r] = torch.argmax(scores[r])
            else:
                chosen[r] = torch.multinomial(probs[r], 1, generator=generator)[0]
        out = torch.full_like(scores, float("-inf"))
        out.scatter_(1, chosen[:, None], 0.0)
        return out


def _strip_prompt(text: str, prompt: str | None, keep: bool) -> str:
    """The caption without (or, with ``keep``, with exactly one copy of) the prompt prefix."""
    text = " ".join(text.split())
    if not prompt:
        return text
    norm_prompt = " ".join(prompt.split())
    pattern = r"\s*".join(re.escape(word) for word in norm_prompt.split())
    match = re.match(pattern, text, flags=re.IGNORECASE)
    rest = text[match.end() :].strip() if match else text
    if keep and rest:
        return f"{norm_prompt} {rest}"
    return rest


class TransformersCaptioner(Backend):
    """Shared code of the transformers backends: processor + ``generate``, one call per decoding mode."""

    name = "hf"
    default_model: ClassVar[str | None] = None
    settings: CaptionSettings

    def __init__(self, settings: CaptionSettings, context: Any) -> None:
        super().__init__(settings, context)
        self.processor: Any = None
        self.net: Any = None
        self.device = "cpu"
        self.dtype: Any = None

    def check(self) -> None:
        if self.model_ref is None:
            raise ModelNotFoundError(
                f"caption backend {self.name!r} needs a model: set caption.model to a hub id in the local "
                "cache or a local directory"
            )
        try:
            super().check()
        except ModelNotFoundError as exc:
            raise ModelNotFoundError(f"caption backend {self.name!r}: {exc}") from exc

    def _classes(self) -> tuple[Any, Any]:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        return AutoProcessor, AutoModelForImageTextToText

    def load(self, device: str) -> None:
        import torch

        if self.model is None:
            self.check()
        assert self.model is not None
        processor_cls, model_cls = self._classes()
        self.device = device
        self.dtype = torch.float16 if device == "cuda" and self.settings.fp16 else torch.float32
        location = self.model.location
        self.processor = processor_cls.from_pretrained(location, trust_remote_code=False)
        self.net = model_cls.from_pretrained(location, dtype=self.dtype, trust_remote_code=False)
        self.net.to(device).eval()

    # -- generation ------------------------------------------------------------------------------------

    def _inputs(self, images: list[Any]) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"images": images, "return_tensors": "pt"}
        if self.settings.prompt:
            kwargs["text"] = [self.settings.prompt] * len(images)
        batch = self.processor(**kwargs)
        inputs = {}
        for key, value in batch.items():
            if hasattr(value, "to"):
                value = value.to(self.device)
                if value.is_floating_point():
                    value = value.to(self.dtype)
            inputs[key] = value
        return inputs

    def _decode(self, sequences: Any) -> list[str]:
        texts = self.processor.batch_decode(sequences, skip_special_tokens=True)
        return [_strip_prompt(t, self.settings.prompt, self.settings.keep_prompt) for t in texts]

    def _generate(self, inputs: dict[str, Any], **kwargs: Any) -> list[str]:
        import torch

        with torch.inference_mode():
            out = self.net.generate(**inputs, max_new_tokens=self.settings.max_new_tokens, **kwargs)
        sequences = out.sequences if hasattr(out, "sequences") else out
        return self._decode(sequences)

    def _warpers(self) -> list[Any]:
        from transformers.generation import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

        s = self.settings
        warpers: list[Any] = []
        if s.temperature != 1.0:
            warpers.append(TemperatureLogitsWarper(s.temperature))
        if s.top_k:
            warpers.append(TopKLogitsWarper(top_k=s.top_k))
        if s.top_p < 1.0:
            warpers.append(TopPLogitsWarper(top_p=s.top_p))
        return warpers

    def caption(self, images: list[Any], seeds: list[list[int]]) -> tuple[list[list[str]], list[str]]:
        """Captions ``[image][variant]`` for ``len(seeds[i])`` variants of image i, and each variant's mode.

        Every image has the same number of variants (``settings.variants``).
        """
        import torch
        from transformers.generation import LogitsProcessorList

        s = self.settings
        n, m = len(images), s.variants
        inputs = self._inputs(images)
        captions: list[list[str]] = [[""] * m for _ in range(n)]
        if not s.do_sample:
            beams = max(s.num_beams, m)
            modes = ["beam" if beams > 1 else "greedy"] * m
            texts = self._generate(inputs, do_sample=False, num_beams=beams, num_return_sequences=m)
            for i in range(n):
                captions[i] = texts[i * m : (i + 1) * m]
            return captions, modes

        beam_first = s.greedy_first and s.num_beams > 1
        modes = ["sample"] * m
        if s.greedy_first:
            modes[0] = "beam" if beam_first else "greedy"
        if beam_first:
            texts = self._generate(inputs, do_sample=False, num_beams=s.num_beams, num_return_sequences=1)
            for i in range(n):
                captions[i][0] = texts[i]
        slots = [j for j in range(m) if not (beam_first and j == 0)]
        if slots:
            generators, greedy = [], []
            for i in range(n):
                for j in slots:
                    generators.append(torch.Generator(device=self.device).manual_seed(seeds[i][j]))
                    greedy.append(modes[j] == "greedy")
            sampler = _SeededSampler(generators, greedy, self._warpers())
            texts = self._generate(
                inputs,
                do_sample=True,
                num_beams=1,
                num_return_sequences=len(slots),
                temperature=1.0,
                top_k=0,
                top_p=1.0,
                logits_processor=LogitsProcessorList([sampler]),
            )
            for i in range(n):
                for t, j in enumerate(slots):
                    captions[i][j] = texts[i * len(slots) + t]
        return captions, modes


class BlipCaptioner(TransformersCaptioner):
    name = "blip"
    default_model = "Salesforce/blip-image-captioning-base"

    def _classes(self) -> tuple[Any, Any]:
        from transformers import BlipForConditionalGeneration, BlipProcessor

        return BlipProcessor, BlipForConditionalGeneration


class Blip2Captioner(TransformersCaptioner):
    name = "blip2"
    default_model = "Salesforce/blip2-opt-2.7b"

    def _classes(self) -> tuple[Any, Any]:
        from transformers import Blip2ForConditionalGeneration, Blip2Processor

        return Blip2Processor, Blip2ForConditionalGeneration


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


CaptionResult = tuple[list[str], list[str]]
"""One image's captions, one per variant, and each variant's decoding mode."""


@dataclass(frozen=True)
class CaptionJob:
    """One image to caption: the RGB image, the children its variants fill and their seeds."""

    image: Any
    children: tuple[Row, ...]
    seeds: list[int]


class Caption(GeneratorStage[CaptionJob, CaptionResult]):
    """Caption an image field ``variants`` times; see the module docstring."""

    name = "caption"
    consumes = frozenset({"image"})
    produces = frozenset({"caption"})
    Settings = CaptionSettings
    resources = Resources(cpus=1.0, gpus=0.25, memory_gb=4.0)
    batch_size = 16
    backends: ClassVar[dict[str, type[Backend]]] = {
        "blip": BlipCaptioner,
        "blip2": Blip2Captioner,
        "hf": TransformersCaptioner,
        "tiny": TinyCaptioner,
    }
    default_backend = "blip"
    settings: CaptionSettings
    backend: TransformersCaptioner

    def inputs(self) -> frozenset[str]:
        return frozenset({self.settings.field})

    def outputs(self) -> frozenset[str]:
        return frozenset({self.settings.output})

    def _decoding(self, mode: str) -> dict[str, Any]:
        s = self.settings
        info: dict[str, Any] = {"mode": mode, "max_new_tokens": s.max_new_tokens}
        if mode == "beam":
            info["num_beams"] = max(s.num_beams, 1 if s.do_sample else s.variants)
        elif mode == "sample":
            info.update(temperature=s.temperature, top_k=s.top_k, top_p=s.top_p)
        return info

    def jobs_for(self, row: Row) -> list[CaptionJob] | Failure:
        field = self.settings.field
        image = row.get(field)
        if image is None or not hasattr(image, "convert"):
            message = f"field {field!r} is missing or not an image ({type(image).__name__})"
            return self.fail(row, "bad_input", message)
        children = tuple(fan_out(row, j) for j in range(self.settings.variants))
        return [CaptionJob(image.convert("RGB"), children, [self.seed_for(c) for c in children])]

    def run_jobs(self, jobs: list[CaptionJob]) -> list[CaptionResult]:
        captions, modes = self.backend.caption([job.image for job in jobs], [job.seeds for job in jobs])
        return [(texts, modes) for texts in captions]

    def rows_for(self, job: CaptionJob, result: CaptionResult) -> list[Row | Failure]:
        s = self.settings
        texts, modes = result
        identity = self.backend.describe()
        dtype = str(self.backend.dtype).removeprefix("torch.")
        out: list[Row | Failure] = []
        for j, (child, text, seed) in enumerate(zip(job.children, texts, job.seeds, strict=True)):
            if not text:
                message = f"captioner returned an empty caption (variant {j}, seed {seed})"
                out.append(self.fail(child, "empty_caption", message))
                continue
            child[s.output] = text
            record(
                child,
                self.name,
                **identity,
                field=s.field,
                variant_index=j,
                seed=seed,
                decoding=self._decoding(modes[j]),
                prompt=s.prompt,
                device=self.device,
                dtype=dtype,
            )
            out.append(child)
        return out
