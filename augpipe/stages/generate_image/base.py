"""The generate_image stage's settings, shared by every backend."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from augpipe.pipeline.rows import FieldName
from augpipe.pipeline.stage import StageSettings
from augpipe.stages._fields import template_fields


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
