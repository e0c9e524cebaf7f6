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

Backends, in this package: ``blip`` (BlipForConditionalGeneration), ``blip2``
(Blip2ForConditionalGeneration) and ``hf`` (any AutoModelForImageTextToText + AutoProcessor that captions
from ``processor(images=, text=)``) in ``hf.py``, and ``tiny`` (a randomly initialised miniature BLIP
built in memory, seeded, for tests and the tiny profile) in ``tiny.py``; ``base`` holds the settings.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from augpipe.pipeline.families import GeneratorStage
from augpipe.pipeline.rows import Failure, Row, fan_out, record
from augpipe.pipeline.stage import Backend, Resources
from augpipe.stages.caption.base import CaptionSettings
from augpipe.stages.caption.hf import Blip2Captioner, BlipCaptioner, TransformersCaptioner
from augpipe.stages.caption.tiny import TinyCaptioner, build_tiny_blip

__all__ = [
    "Blip2Captioner",
    "BlipCaptioner",
    "Caption",
    "CaptionSettings",
    "TinyCaptioner",
    "TransformersCaptioner",
    "build_tiny_blip",
]


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
