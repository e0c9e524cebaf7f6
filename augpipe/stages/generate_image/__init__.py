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

Backends: ``diffusers`` (AutoPipelineForText2Image, or DiffusionPipeline for pipelines it does not map, by
hub id in the local cache or local path; safetensors only, no remote code; fp16 on CUDA, with the
``fp16`` weight variant when the model has one; the safety checker stays as the pipeline ships it and a
blacked-out output is recorded as ``nsfw_blacked_out``), and ``tiny`` (a StableDiffusionPipeline from
randomly initialised miniature parts, built in memory and seeded).
"""

from __future__ import annotations

import string
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from augpipe.pipeline.families import GeneratorStage
from augpipe.pipeline.models import ModelNotFoundError
from augpipe.pipeline.rows import Failure, FieldName, Row, fan_out, record
from augpipe.pipeline.stage import Backend, Resources, StageSettings
from augpipe.stages._fields import label_name, template_fields


class GenerateImageSettings(StageSettings):
    model: str | None = Field(default=None, description="hub id (in the local cache), local path or pkg://")
    field: FieldName = Field(default="caption", description="the text field to imagine")
    output: FieldName = Field(default="generated_image")
    prompt_output: FieldName = Field(default="prompt", description="the field the final prompt is written to")
    variants: int = Field(default=1, ge=1, le=64, description="images per prompt (n), one seed each")
    steps: int = Field(default=30, ge=1, le=1000)
    guidance_scale: float = Field(default=7.5, ge=0)
    height: int | None = Field(default=None, ge=8, le=4096, description="generation height; None: model's")
    width: int | None = Field(default=None, ge=8, le=4096, description="generation width; None: model's")
    resize_to: Literal["source"] | tuple[int, int] | None = Field(
        default="source", description="'source' (the source image's size), [w, h], or null to keep"
    )
    source_field: FieldName = Field(default="image", description="the source image whose size 'source' means")
    negative_prompt: str | None = None
    prompt_template: str | None = Field(default=None, description='e.g. "a photo of {caption}"')
    label_names: tuple[str, ...] | None = Field(default=None, description="names for integer labels")
    attention_slicing: bool = Field(default=False, description="lower peak GPU memory, a little slower")

    @field_validator("resize_to")
    @classmethod
    def _positive_size(cls, value: Any) -> Any:
        if isinstance(value, tuple) and (value[0] < 1 or value[1] < 1 or max(value) > 16384):
            raise ValueError(f"resize_to must be [width, height] in 1..16384, got {list(value)}")
        return value

    @field_validator("prompt_template")
    @classmethod
    def _valid_template(cls, value: str | None) -> str | None:
        if value is not None:
            template_fields(value)
        return value

    @model_validator(mode="after")
    def _check(self) -> GenerateImageSettings:
        if self.output in (self.field, self.prompt_output) or self.prompt_output == self.field:
            raise ValueError("field, output and prompt_output must be three different fields")
        for side in ("height", "width"):
            value = getattr(self, side)
            if value is not None and value % 8:
                raise ValueError(f"{side} must be a multiple of 8, got {value}")
        return self


def _has_fp16_variant(path: Path | None) -> bool:
    return path is not None and path.is_dir() and any(".fp16." in p.name for p in path.rglob("*"))


class DiffusersGenerator(Backend):
    """Any diffusers text-to-image pipeline by hub id (local cache) or local directory."""

    name = "diffusers"
    default_model: ClassVar[str | None] = "stabilityai/stable-diffusion-2-1-base"
    settings: GenerateImageSettings

    def __init__(self, settings: GenerateImageSettings, context: Any) -> None:
        super().__init__(settings, context)
        self.pipe: Any = None
        self.device = "cpu"
        self.dtype: Any = None
        self.weights_variant: str | None = None

    def check(self) -> None:
        if self.model_ref is None:
            raise ModelNotFoundError(
                f"generate_image backend {self.name!r} needs a model: set generate_image.model to a hub id "
                "in the local cache or a local diffusers directory"
            )
        try:
            super().check()
        except ModelNotFoundError as exc:
            raise ModelNotFoundError(f"generate_image backend {self.name!r}: {exc}") from exc

    def _dtype(self, device: str) -> Any:
        import torch

        return torch.float16 if device == "cuda" and self.settings.fp16 else torch.float32

    def load(self, device: str) -> None:
        from diffusers import AutoPipelineForText2Image, DiffusionPipeline

        if self.model is None:
            self.check()
        assert self.model is not None
        self.device, self.dtype = device, self._dtype(device)
        self.weights_variant = "fp16" if device == "cuda" and self.settings.fp16 else None
        if self.weights_variant and not _has_fp16_variant(self.model.path):
            self.weights_variant = None
        kwargs: dict[str, Any] = {
            "torch_dtype": self.dtype,
            "use_safetensors": True,
            "trust_remote_code": False,
            "variant": self.weights_variant,
        }
        # ``torch_dtype`` works on every diffusers >= 0.30; 0.42 renamed it ``dtype`` with a FutureWarning.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
            try:
                pipe = AutoPipelineForText2Image.from_pretrained(self.model.location, **kwargs)
            except ValueError as exc:
                if "AutoPipeline" not in str(exc):
                    raise
                pipe = DiffusionPipeline.from_pretrained(self.model.location, **kwargs)
        self._finish(pipe)

    def _finish(self, pipe: Any) -> None:
        pipe.to(self.device)
        pipe.set_progress_bar_config(disable=True)
        if self.settings.attention_slicing and hasattr(pipe, "enable_attention_slicing"):
            pipe.enable_attention_slicing()
        self.pipe = pipe

    def generate(self, prompts: list[str], seeds: list[int]) -> tuple[list[Any], list[bool | None]]:
        """One pipeline call: image ``i`` from ``prompts[i]`` with a generator seeded ``seeds[i]``."""
        import torch

        s = self.settings
        generators = [torch.Generator(device=self.device).manual_seed(seed) for seed in seeds]
        kwargs: dict[str, Any] = {
            "prompt": prompts,
            "generator": generators,
            "num_inference_steps": s.steps,
            "guidance_scale": s.guidance_scale,
            "output_type": "pil",
        }
        if s.negative_prompt is not None:
            kwargs["negative_prompt"] = [s.negative_prompt] * len(prompts)
        if s.height is not None:
            kwargs["height"] = s.height
        if s.width is not None:
            kwargs["width"] = s.width
        result = self.pipe(**kwargs)
        images = list(result.images)
        if len(images) != len(prompts):
            raise RuntimeError(f"pipeline returned {len(images)} images for {len(prompts)} prompts")
        flags = getattr(result, "nsfw_content_detected", None)
        nsfw = [bool(f) for f in flags] if flags is not None else [None] * len(images)
        return images, nsfw

    def scheduler_name(self) -> str | None:
        scheduler = getattr(self.pipe, "scheduler", None)
        return type(scheduler).__name__ if scheduler is not None else None


def build_tiny_sd(seed: int = 0, size: int = 64) -> Any:
    """A StableDiffusionPipeline from randomly initialised miniature parts, built offline and seeded.

    UNet2DConditionModel (16/32 channels) + AutoencoderKL (3 blocks: 4x down-scaling) + CLIPTextModel
    (2 layers, 32 wide) + a character-level CLIP BPE tokenizer (vocabulary passed in memory, no merges) +
    DDIMScheduler. No safety checker. Default output ``size`` px square.
    """
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizerFast

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for char in string.ascii_lowercase + string.digits + ".,'-!?":
        vocab.setdefault(char, len(vocab))
        vocab.setdefault(char + "</w>", len(vocab))
    tokenizer = CLIPTokenizerFast(vocab=vocab, merges=[], model_max_length=77)
    vae_channels = (16, 32, 32)
    scale = 2 ** (len(vae_channels) - 1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(vocab),
                hidden_size=32,
                intermediate_size=37,
                num_hidden_layers=2,
                num_attention_heads=4,
                max_position_embeddings=77,
                projection_dim=32,
                bos_token_id=0,
                eos_token_id=1,
                pad_token_id=1,
            )
        )
        unet = UNet2DConditionModel(
            sample_size=size // scale,
            in_channels=4,
            out_channels=4,
            block_out_channels=(16, 32),
            layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=4,
            norm_num_groups=16,
        )
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            block_out_channels=vae_channels,
            down_block_types=("DownEncoderBlock2D",) * len(vae_channels),
            up_block_types=("UpDecoderBlock2D",) * len(vae_channels),
            latent_channels=4,
            norm_num_groups=16,
            sample_size=size,
        )
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    return StableDiffusionPipeline(
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        unet=unet.eval(),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


class TinyGenerator(DiffusersGenerator):
    """A random miniature Stable Diffusion: the real diffusers code path on CPU, 64 px in well under 1 s."""

    name = "tiny"
    default_model = None
    SEED: ClassVar[int] = 0

    def check(self) -> None:
        """Nothing to find: the pipeline is built in memory."""

    def load(self, device: str) -> None:
        self.device, self.dtype = device, self._dtype(device)
        import torch

        pipe = build_tiny_sd(self.SEED)
        if self.dtype != torch.float32:
            pipe.to(dtype=self.dtype)
        self._finish(pipe)

    def describe(self) -> dict[str, Any]:
        info = super().describe()
        info.update(model="tiny:stable-diffusion", revision=f"random-init-seed-{self.SEED}")
        return info


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
