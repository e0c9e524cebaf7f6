"""Backends on transformers' ``generate``: ``hf`` (any AutoModelForImageTextToText + AutoProcessor),
``blip`` and ``blip2``; one batched call per decoding mode, each sampled row drawing with its own seed."""

from __future__ import annotations

import re
from typing import Any, ClassVar

from augpipe.pipeline.stage import Backend
from augpipe.stages.caption.base import CaptionSettings


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
        self.require_model("caption", "set caption.model to a hub id in the local cache or a local directory")

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
