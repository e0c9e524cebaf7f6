"""Stage ``synthesize_speech``: text → waveform, ``variants`` voicings per sentence (back-speech's F).

Each input row fans out into ``variants`` children (``variant`` gains the voicing's index) carrying
``audio`` (float32 mono in [-1, 1]) and ``sample_rate``. Variant 0 is the plain voice (``length_scale``,
``noise_scale``, ``speaker`` as configured) unless ``vary_first``; every other variant draws its prosody
from its own seed (``Stage.seed_for`` after fan-out): a length scale in ``length_scale_range``, a noise
scale in ``noise_scale_range`` when that is set, a speaker from ``speakers`` (espeak: a voice variant
from a built-in list when ``speakers`` is empty) and, for espeak, a pitch in ``pitch_range``. What was
used is recorded in the row's lineage.

Backends (``backend``), one module each in this package: ``piper`` (default; Piper VITS voices run by
onnxruntime), ``espeak`` (eSpeak NG through ctypes), ``coqui`` (Coqui TTS, extra ``augpipe[coqui]``) and
``tiny`` (a random miniature VITS). Each module's docstring says how it seeds and batches; ``base``
holds the settings and the interface they share.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from augpipe.pipeline.families import GeneratorStage
from augpipe.pipeline.rows import Failure, Row, fan_out, record
from augpipe.pipeline.stage import Backend, Resources
from augpipe.stages.synthesize_speech.base import SpeechBackend, Synthesis, SynthesizeSpeechSettings, Voicing
from augpipe.stages.synthesize_speech.coqui import COQUI_INSTALL, CoquiBackend, coqui_models_dir
from augpipe.stages.synthesize_speech.espeak import EspeakBackend
from augpipe.stages.synthesize_speech.piper import PiperBackend
from augpipe.stages.synthesize_speech.tiny import TINY_CHARACTERS, TinyBackend, build_tiny_vits

__all__ = [
    "COQUI_INSTALL",
    "TINY_CHARACTERS",
    "CoquiBackend",
    "EspeakBackend",
    "PiperBackend",
    "SpeechBackend",
    "Synthesis",
    "SynthesizeSpeech",
    "SynthesizeSpeechSettings",
    "TinyBackend",
    "Voicing",
    "build_tiny_vits",
    "coqui_models_dir",
]


SpeechResult = Synthesis | Exception
"""What the backend returns per utterance: the audio, or the error that one utterance raised."""


@dataclass(frozen=True)
class SpeechJob:
    """One utterance to synthesise: the fan-out child it fills, its voicing index, text and prosody."""

    child: Row
    index: int
    text: str
    voicing: Voicing


class SynthesizeSpeech(GeneratorStage[SpeechJob, SpeechResult]):
    """Speak each row's ``text`` ``variants`` times; see the module docstring."""

    name = "synthesize_speech"
    consumes = frozenset({"text"})
    produces = frozenset({"audio", "sample_rate"})
    Settings = SynthesizeSpeechSettings
    resources = Resources(cpus=1.0, gpus=0.0, memory_gb=1.5)
    batch_size = 16
    backends: ClassVar[dict[str, type[Backend]]] = {
        "piper": PiperBackend,
        "espeak": EspeakBackend,
        "coqui": CoquiBackend,
        "tiny": TinyBackend,
    }
    default_backend = "piper"
    checks_first = True
    settings: SynthesizeSpeechSettings
    backend: SpeechBackend

    def _voicing(self, child: Row, index: int) -> Voicing:
        s = self.settings
        seed = self.seed_for(child)
        if index == 0 and not s.vary_first:
            return Voicing(s.length_scale, s.noise_scale, s.noise_w_scale, s.speaker, s.pitch, seed)
        rng = np.random.default_rng(seed)
        length_scale = round(float(rng.uniform(*s.length_scale_range)), 4)
        noise = s.noise_scale
        if s.noise_scale_range is not None:
            noise = round(float(rng.uniform(*s.noise_scale_range)), 4)
        speakers = s.speakers or self.backend.variant_speakers
        speaker = speakers[int(rng.integers(len(speakers)))] if speakers else s.speaker
        pitch = int(rng.integers(s.pitch_range[0], s.pitch_range[1] + 1))
        return Voicing(length_scale, noise, s.noise_w_scale, speaker, pitch, seed)

    def jobs_for(self, row: Row) -> list[SpeechJob] | Failure:
        s = self.settings
        text = row.get("text")
        if not isinstance(text, str) or not text.strip():
            return self.fail(row, "empty_text", "no text to speak")
        text = " ".join(text.split())
        if len(text) > s.max_chars:
            return self.fail(
                row, "text_too_long", f"{len(text)} characters, more than max_chars={s.max_chars}"
            )
        children = [fan_out(row, i) for i in range(s.variants)]
        return [SpeechJob(child, i, text, self._voicing(child, i)) for i, child in enumerate(children)]

    def run_jobs(self, jobs: list[SpeechJob]) -> list[SpeechResult]:
        return self.backend.synthesize([j.text for j in jobs], [j.voicing for j in jobs])

    def rows_for(self, job: SpeechJob, result: SpeechResult) -> list[Row | Failure]:
        child = job.child
        if isinstance(result, Exception):
            return [self.fail(child, "tts_error", f"{type(result).__name__}: {result}")]
        audio = np.asarray(result.audio, dtype=np.float32).reshape(-1)
        if audio.size == 0 or not np.all(np.isfinite(audio)) or not np.any(audio):
            message = f"the {self.backend.name} backend returned {audio.size} samples, none usable"
            return [self.fail(child, "silent_output", message)]
        child["audio"] = np.clip(audio, -1.0, 1.0)
        child["sample_rate"] = int(result.sample_rate)
        record(
            child,
            self.name,
            backend=self.backend.name,
            model=self.describe().get("model"),
            index=job.index,
            seed=job.voicing.seed,
            sample_rate=int(result.sample_rate),
            duration_s=round(audio.size / result.sample_rate, 4),
            **result.applied,
        )
        self.stats["utterances"] += 1
        return [child]
