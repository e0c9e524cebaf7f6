"""Backend ``diffusers``: any diffusers text-to-image pipeline by hub id (local cache) or local directory,
one pipeline call per batch with a generator per image."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, ClassVar

from augpipe.pipeline.stage import Backend
from augpipe.stages.generate_image.base import GenerateImageSettings


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
        hint = "set generate_image.model to a hub id in the local cache or a local diffusers directory"
        self.require_model("generate_image", hint)

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
