"""Stage ``transcribe``: waveform → text by ASR, ``variants`` transcripts per input (back-speech's G).

Each input row fans out into ``variants`` children (``variant`` gains the transcript's index) with the
ASR output in ``transcript``. Audio is resampled to 16 kHz first. Variant 0 is the deterministic
transcript (beam search with ``beam_size``, greedy when it is 1). The other variants differ by backend:

- ``whisper`` and ``tiny`` sample at ``temperature``, each from a ``torch.Generator`` seeded with the
  child's own seed (``Stage.seed_for`` after fan-out). All sampled rows of a batch go through one
  ``DecodingTask`` whose token decoder draws each row's token with that row's generator, so a transcript
  depends on its seed alone, not on which rows share its batch.
- ``faster_whisper`` takes the next-best hypotheses of one beam search (``num_hypotheses``; the beam is
  widened to ``variants`` when needed). It cannot sample reproducibly: CTranslate2 draws from a
  thread-local generator seeded once per thread (``ctranslate2.set_random_seed`` has no effect after the
  first draw), so a per-sample seed is impossible.
- ``pocketsphinx`` takes the next distinct entries of its N-best list.

Lineage records backend, model, decoding mode (``beam``/``greedy``/``sample``/``nbest``), temperature,
beam size, the seed of sampled variants, N-best rank, average log-probability and, where the model gives
one, the no-speech probability.

Backends (``backend``), one module each in this package: ``faster_whisper`` (default; CTranslate2
Whisper), ``whisper`` (openai-whisper, extra ``augpipe[whisper]``), ``pocketsphinx`` (CMU PocketSphinx)
and ``tiny`` (openai-whisper's decode path on a random miniature model). Each module's docstring says how
it batches; ``base`` holds the settings and the interface they share.

Audio that is missing, empty, not mono, non-finite, or longer than ``max_seconds`` becomes a Failure
(``empty_audio``, ``bad_audio``, ``audio_too_long``); a model error on a row becomes ``asr_error``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from augpipe.pipeline.families import GeneratorStage
from augpipe.pipeline.rows import Failure, Row, fan_out, record
from augpipe.pipeline.stage import Backend, Resources
from augpipe.stages._fields import read_audio
from augpipe.stages.transcribe.base import (
    ASR_RATE,
    WHISPER_WINDOW_S,
    AsrBackend,
    Hypothesis,
    TranscribeSettings,
)
from augpipe.stages.transcribe.faster_whisper import FasterWhisperBackend
from augpipe.stages.transcribe.pocketsphinx import PocketsphinxBackend
from augpipe.stages.transcribe.tiny import TinyWhisperBackend, build_tiny_whisper
from augpipe.stages.transcribe.whisper import WHISPER_INSTALL, WhisperBackend, whisper_cache_dir

__all__ = [
    "ASR_RATE",
    "WHISPER_INSTALL",
    "WHISPER_WINDOW_S",
    "AsrBackend",
    "FasterWhisperBackend",
    "Hypothesis",
    "PocketsphinxBackend",
    "TinyWhisperBackend",
    "Transcribe",
    "TranscribeSettings",
    "WhisperBackend",
    "build_tiny_whisper",
    "whisper_cache_dir",
]


AsrResult = list[Hypothesis] | Exception
"""What the backend returns per input: one hypothesis per variant, or the error that input raised."""


@dataclass(frozen=True)
class AsrJob:
    """One utterance to transcribe: its source row, 16 kHz audio, the children its variants fill (with
    their seeds) and whether Whisper's 30 s window cuts it."""

    row: Row
    audio: np.ndarray
    children: tuple[Row, ...]
    seeds: list[int]
    truncated: bool


class Transcribe(GeneratorStage[AsrJob, AsrResult]):
    """Transcribe each row's ``audio`` ``variants`` times; see the module docstring."""

    name = "transcribe"
    consumes = frozenset({"audio", "sample_rate"})
    produces = frozenset({"transcript"})
    Settings = TranscribeSettings
    resources = Resources(cpus=1.0, gpus=0.0, memory_gb=2.0)
    batch_size = 16
    backends: ClassVar[dict[str, type[Backend]]] = {
        "faster_whisper": FasterWhisperBackend,
        "whisper": WhisperBackend,
        "pocketsphinx": PocketsphinxBackend,
        "tiny": TinyWhisperBackend,
    }
    default_backend = "faster_whisper"
    checks_first = True
    settings: TranscribeSettings
    backend: AsrBackend

    def jobs_for(self, row: Row) -> list[AsrJob] | Failure:
        import librosa

        s = self.settings
        read = read_audio(row, self)
        if isinstance(read, Failure):
            return read
        audio, rate = read
        duration = audio.size / rate
        if duration > s.max_seconds:
            message = f"{duration:.1f} s of audio, more than max_seconds={s.max_seconds}"
            return self.fail(row, "audio_too_long", message)
        if rate != ASR_RATE:
            audio = librosa.resample(audio, orig_sr=rate, target_sr=ASR_RATE, res_type="soxr_hq")
        children = tuple(fan_out(row, j) for j in range(s.variants))
        truncated = duration > WHISPER_WINDOW_S and self.backend.name != "pocketsphinx"
        audio = np.ascontiguousarray(audio, np.float32)
        return [AsrJob(row, audio, children, [self.seed_for(c) for c in children], truncated)]

    def run_jobs(self, jobs: list[AsrJob]) -> list[AsrResult]:
        return self.backend.transcribe([j.audio for j in jobs], [j.seeds for j in jobs])

    def rows_for(self, job: AsrJob, result: AsrResult) -> list[Row | Failure]:
        if isinstance(result, Exception):
            return [self.fail(job.row, "asr_error", f"{type(result).__name__}: {result}")]
        out: list[Row | Failure] = []
        for index, (child, hyp) in enumerate(zip(job.children, result, strict=True)):
            child["transcript"] = hyp.text
            if not hyp.text:
                self.stats["empty_transcript"] += 1
            if job.truncated:
                self.stats["truncated_to_30s"] += 1
            record(
                child,
                self.name,
                backend=self.backend.name,
                model=self.describe().get("model"),
                index=index,
                language=self.settings.language,
                truncated=job.truncated,
                **hyp.info,
            )
            out.append(child)
        return out
