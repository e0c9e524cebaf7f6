"""What every ``synthesize_speech`` backend shares: the stage's settings, a voicing (the prosody one
variant asks for), a synthesis (what came back) and the backend interface."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
from pydantic import Field, model_validator

from augpipe.pipeline.models import ModelNotFoundError
from augpipe.pipeline.stage import Backend, StageSettings


def _ordered(name: str, bounds: tuple[float, float] | None) -> None:
    if bounds is not None and bounds[0] > bounds[1]:
        raise ValueError(f"{name}: lower bound {bounds[0]} is above upper bound {bounds[1]}")


class SynthesizeSpeechSettings(StageSettings):
    model: str | None = Field(
        default=None,
        description="piper: .onnx voice; coqui: model name or checkpoint path; espeak, tiny: not used",
    )
    config: str | None = Field(default=None, description="piper: voice .onnx.json; coqui: config.json")
    variants: int = Field(default=1, ge=1, le=64, description="voicings per sentence (l)")
    speaker: str | None = Field(
        default=None,
        description="espeak: voice (default en-us); piper/coqui: speaker name or id (multi-speaker models)",
    )
    speakers: tuple[str, ...] = Field(
        default=(), description="speakers/voices that variants > 0 choose from (seeded)"
    )
    length_scale: float = Field(default=1.0, gt=0, description="duration multiplier of the plain variant")
    noise_scale: float | None = Field(
        default=0.0, ge=0, description="VITS generator noise (piper/tiny/coqui); None: the voice's default"
    )
    noise_w_scale: float | None = Field(
        default=0.0, ge=0, description="VITS duration noise (piper/tiny/coqui); None: the voice's default"
    )
    length_scale_range: tuple[float, float] = Field(
        default=(0.85, 1.2), description="length scales that variants > 0 draw from (uniform)"
    )
    noise_scale_range: tuple[float, float] | None = Field(
        default=None, description="noise scales that variants > 0 draw from (None: keep noise_scale)"
    )
    pitch: int | None = Field(default=None, ge=0, le=100, description="espeak pitch of the plain variant")
    pitch_range: tuple[int, int] = Field(default=(35, 65), description="espeak pitches for variants > 0")
    words_per_minute: int = Field(default=175, ge=80, le=450, description="espeak base speaking rate")
    vary_first: bool = Field(default=False, description="variant 0 also draws its prosody")
    max_chars: int = Field(default=2000, ge=1, description="longer texts fail with cause text_too_long")

    @model_validator(mode="after")
    def _ranges(self) -> SynthesizeSpeechSettings:
        _ordered("length_scale_range", self.length_scale_range)
        _ordered("noise_scale_range", self.noise_scale_range)
        _ordered("pitch_range", self.pitch_range)
        if self.length_scale_range[0] <= 0:
            raise ValueError("length_scale_range must be positive")
        if self.noise_scale_range is not None and self.noise_scale_range[0] < 0:
            raise ValueError("noise_scale_range must not be negative")
        if not 0 <= self.pitch_range[0] <= self.pitch_range[1] <= 100:
            raise ValueError("pitch_range must lie in [0, 100]")
        return self


@dataclass(frozen=True)
class Voicing:
    """The prosody one variant asks for, and the seed of any randomness in its synthesis."""

    length_scale: float
    noise_scale: float | None
    noise_w_scale: float | None
    speaker: str | None
    pitch: int | None
    seed: int


@dataclass
class Synthesis:
    """One synthesised utterance and the parameters the backend actually applied (for lineage)."""

    audio: np.ndarray
    sample_rate: int
    applied: dict[str, Any] = field(default_factory=dict)


class SpeechBackend(Backend):
    """A TTS engine: ``synthesize`` returns, per text, a Synthesis or the exception that text raised."""

    settings: SynthesizeSpeechSettings
    variant_speakers: ClassVar[tuple[str, ...]] = ()
    """Speakers that variants > 0 choose from when ``speakers`` is not configured."""

    def synthesize(self, texts: list[str], voicings: list[Voicing]) -> list[Synthesis | Exception]:
        raise NotImplementedError

    def _no_model(self) -> None:
        if getattr(self.settings, "model", None) or self.settings.config:
            raise ValueError(f"synthesize_speech backend {self.name!r} takes no model or config; unset them")


def _require(module: str, hint: str) -> None:
    """Raise ModelNotFoundError with an install hint if ``module`` cannot be found."""
    if importlib.util.find_spec(module) is None:
        raise ModelNotFoundError(hint)
