"""Stage ``generate_image``: text → image with a diffusion pipeline, ``variants`` images per prompt.

Back-captioning's G and back-imagination's F (METHODS 1.1): multi-imagination is the same prompt under
different seeds. Each input row fans out into ``variants`` children; child ``j`` gets its own seed
(``Stage.seed_for``) and its own ``torch.Generator`` on the pipeline's device, so an image depends on its
seed, not on its position in the batch. A batch is one pipeline call with lists of prompts and
generators.

The prompt is the text in ``field`` (default ``caption``), or ``prompt_template`` filled from the row:
``"a photo of {caption}"``; ``{label}`` is the row's label name (``label_name``, a string ``label``, or
``label_names[label]``). It is written to ``prompt_output`` (default ``prompt``).

Generated images are resized to the task resolution (METHODS 1.2): ``resize_to: source`` takes the size
of the row's source image (``source_field``, default ``image``) when the row has one and keeps the
generated size otherwise (back-imagination has no source image); ``[w, h]`` is an explicit size.

Backends, one module each in this package (``base`` holds the settings): ``diffusers``
(AutoPipelineForText2Image, or DiffusionPipeline for pipelines it does not map, by
hub id in the local cache or local path; safetensors only, no remote code; fp16 on CUDA, with the
``fp16`` weight variant when the model has one; the safety checker stays as the pipeline ships it and a
blacked-out output is recorded as ``nsfw_blacked_out``), and ``tiny`` (a StableDiffusionPipeline from
randomly initialised miniature parts, built in memory and seeded).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from augpipe.pipeline.families import GeneratorStage
from augpipe.pipeline.rows import Failure, Row, fan_out, record
from augpipe.pipeline.stage import Backend, Resources
from augpipe.stages._fields import label_name, template_fields
from augpipe.stages.generate_image.base import GenerateImageSettings
from augpipe.stages.generate_image.diffusers import DiffusersGenerator
from augpipe.stages.generate_image.tiny import TinyGenerator, build_tiny_sd

__all__ = ["DiffusersGenerator", "GenerateImage", "GenerateImageSettings", "TinyGenerator", "build_tiny_sd"]


ImageResult = tuple[Any, bool | None]
"""One generated image and whether the pipeline's safety checker blacked it out (None: no checker)."""


@dataclass(frozen=True)
class ImageJob:
    """One image to generate: the fan-out child it fills, its prompt and its seed."""

    child: Row
    prompt: str
    seed: int


class GenerateImage(GeneratorStage[ImageJob, ImageResult]):
    """Imagine ``variants`` images per text; see the module docstring."""

    name = "generate_image"
    consumes = frozenset({"caption"})
    produces = frozenset({"generated_image", "prompt"})
    Settings = GenerateImageSettings
    resources = Resources(cpus=1.0, gpus=1.0, memory_gb=8.0)
    batch_size = 4
    backends: ClassVar[dict[str, type[Backend]]] = {"diffusers": DiffusersGenerator, "tiny": TinyGenerator}
    default_backend = "diffusers"
    settings: GenerateImageSettings
    backend: DiffusersGenerator

    def inputs(self) -> frozenset[str]:
        s = self.settings
        names = set(template_fields(s.prompt_template)) if s.prompt_template else set()
        return frozenset({s.field} | names)

    def outputs(self) -> frozenset[str]:
        return frozenset({self.settings.output, self.settings.prompt_output})

    def _prompt(self, row: Row) -> str:
        """The prompt for ``row``; ValueError says what is missing."""
        s = self.settings
        text = row.get(s.field)
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"field {s.field!r} is missing or empty")
        if not s.prompt_template:
            return text.strip()
        values: dict[str, str] = {}
        for name in template_fields(s.prompt_template):
            if name == "label":
                value: Any = label_name(row, s.label_names)
            else:
                value = row.get(name)
                if value is not None and not isinstance(value, str | int | float):
                    value = None
            if value is None or (isinstance(value, str) and not value.strip()):
                what = (
                    "label name (label_name, a string label, or an int label with label_names)"
                    if name == "label"
                    else f"usable {name!r} field"
                )
                raise ValueError(f"prompt_template needs {{{name}}} but the row has no {what}")
            values[name] = str(value).strip()
        return s.prompt_template.format_map(values).strip()

    def _target_size(self, row: Row) -> tuple[int, int] | None:
        s = self.settings
        if s.resize_to == "source":
            source = row.get(s.source_field)
            return tuple(source.size) if hasattr(source, "size") and hasattr(source, "convert") else None
        return s.resize_to

    def jobs_for(self, row: Row) -> list[ImageJob] | Failure:
        try:
            prompt = self._prompt(row)
        except ValueError as exc:
            return self.fail(row, "bad_input", str(exc))
        children = [fan_out(row, j) for j in range(self.settings.variants)]
        return [ImageJob(child, prompt, self.seed_for(child)) for child in children]

    def run_jobs(self, jobs: list[ImageJob]) -> list[ImageResult]:
        images, nsfw = self.backend.generate([job.prompt for job in jobs], [job.seed for job in jobs])
        return list(zip(images, nsfw, strict=True))

    def rows_for(self, job: ImageJob, result: ImageResult) -> list[Row]:
        from PIL import Image

        s = self.settings
        child = job.child
        image, flagged = result
        image = image.convert("RGB")
        generated_size = image.size
        target = self._target_size(child)
        if target is not None and tuple(target) != image.size:
            image = image.resize(tuple(target), Image.Resampling.LANCZOS)
        child[s.output] = image
        child[s.prompt_output] = job.prompt
        record(
            child,
            self.name,
            **self.backend.describe(),
            variant_index=child["variant"][-1],
            seed=job.seed,
            prompt=job.prompt,
            prompt_template=s.prompt_template,
            negative_prompt=s.negative_prompt,
            steps=s.steps,
            guidance_scale=s.guidance_scale,
            scheduler=self.backend.scheduler_name(),
            generated_size=list(generated_size),
            size=list(image.size),
            nsfw_blacked_out=flagged,
            device=self.device,
            dtype=str(self.backend.dtype).removeprefix("torch."),
        )
        return [child]
