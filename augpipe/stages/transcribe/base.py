"""What every ``transcribe`` backend shares: the stage's settings, a hypothesis (one transcript and how it
was decoded) and the backend interface, which retries a failed batch row by row."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pydantic import Field

from augpipe.pipeline.models import ModelNotFoundError
from augpipe.pipeline.stage import Backend, StageSettings

ASR_RATE = 16_000
WHISPER_WINDOW_S = 30.0


class TranscribeSettings(StageSettings):
    model: str | None = Field(default=None, description="model name, local path or pkg:// reference")
    variants: int = Field(default=1, ge=1, le=32, description="transcripts per input (n)")
    temperature: float = Field(default=0.7, gt=0, le=2, description="sampling temperature of variants >= 1")
    beam_size: int = Field(default=5, ge=1, le=32, description="beam of variant 0 (1: greedy)")
    language: str = Field(default="en", min_length=2, max_length=8)
    max_new_tokens: int | None = Field(default=None, ge=1, le=220, description="None: the model's limit")
    cache_dir: str | None = Field(default=None, description="whisper: folder of downloaded checkpoints")
    max_seconds: float = Field(default=WHISPER_WINDOW_S, gt=0, le=600, description="longer audio fails")


@dataclass
class Hypothesis:
    """One transcript and how it was decoded (for lineage)."""

    text: str
    info: dict[str, Any] = field(default_factory=dict)


class AsrBackend(Backend):
    """An ASR engine: ``transcribe`` returns, per input, ``variants`` Hypotheses or the row's exception."""

    settings: TranscribeSettings

    def __init__(self, settings: TranscribeSettings, context: Any) -> None:
        super().__init__(settings, context)
        self.device = "cpu"

    def _transcribe(self, audios: list[np.ndarray], seeds: list[list[int]]) -> list[list[Hypothesis]]:
        raise NotImplementedError

    def transcribe(
        self, audios: list[np.ndarray], seeds: list[list[int]]
    ) -> list[list[Hypothesis] | Exception]:
        """Run the batch; if the batched call fails, run row by row so only the culprit fails."""
        try:
            return list(self._transcribe(audios, seeds))
        except Exception as exc:
            if len(audios) == 1:
                return [exc]
        results: list[list[Hypothesis] | Exception] = []
        for audio, row_seeds in zip(audios, seeds, strict=True):
            try:
                results.append(self._transcribe([audio], [row_seeds])[0])
            except Exception as exc:
                results.append(exc)
        return results


def _require(module: str, hint: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise ModelNotFoundError(hint)
