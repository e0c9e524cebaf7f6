"""The caption stage's settings, shared by every backend."""

from __future__ import annotations

from pydantic import Field, model_validator

from augpipe.pipeline.rows import FieldName
from augpipe.pipeline.stage import StageSettings


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
