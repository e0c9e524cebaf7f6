"""Stage ``perturb_audio``: back-speech's H operator on waveforms, ``variants`` perturbations per input.

Each input row fans out into ``variants`` children (``variant`` gains the perturbation's index). A child
draws, from its own seed (``Stage.seed_for`` after fan-out), a pitch shift in semitones (uniform in
``semitones``), a time-stretch rate (uniform in ``rate``; above 1 is faster, i.e. shorter) and, when
``snr_db`` is set, white noise at a signal-to-noise ratio uniform in that range. Variant 0 is the input
unchanged when ``include_identity`` (the paper's H may be the identity). Pitch shifting and stretching
use librosa's phase vocoder (``librosa.effects.pitch_shift`` / ``time_stretch``); a result whose peak
exceeds 1 is scaled down, never clipped. Semitones, rate, SNR, gain and durations go to lineage.

``read_audio`` (validate a row's waveform into a Failure with a cause) is shared with ``transcribe``.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
from pydantic import Field, model_validator

from augpipe.pipeline.rows import Failure, Row, fan_out, record
from augpipe.pipeline.stage import Resources, Stage, StageSettings
from augpipe.stages._fields import read_audio

MIN_SAMPLES = 64


class PerturbAudioSettings(StageSettings):
    variants: int = Field(default=4, ge=1, le=64, description="perturbations per input (m)")
    semitones: tuple[float, float] = Field(default=(-2.0, 2.0), description="pitch shift range")
    rate: tuple[float, float] = Field(default=(0.85, 1.15), description="time-stretch rate range (>1 faster)")
    snr_db: tuple[float, float] | None = Field(default=None, description="additive white noise SNR range")
    include_identity: bool = Field(default=True, description="variant 0 is the input unchanged")

    @model_validator(mode="after")
    def _ranges(self) -> PerturbAudioSettings:
        for name in ("semitones", "rate", "snr_db"):
            bounds = getattr(self, name)
            if bounds is not None and bounds[0] > bounds[1]:
                raise ValueError(f"{name}: lower bound {bounds[0]} is above upper bound {bounds[1]}")
        if self.rate[0] <= 0:
            raise ValueError("rate must be positive")
        if max(abs(self.semitones[0]), abs(self.semitones[1])) > 24:
            raise ValueError("semitones beyond ±24 (two octaves) are not speech any more")
        return self


def perturb(
    audio: np.ndarray, sample_rate: int, semitones: float, rate: float, snr_db: float | None, seed: int
) -> tuple[np.ndarray, float]:
    """Pitch-shift, then time-stretch, then add noise; returns the result and the gain applied (≤ 1)."""
    import librosa

    n_fft = int(min(2048, 2 ** np.floor(np.log2(audio.size))))
    out = audio
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        if semitones != 0:
            out = librosa.effects.pitch_shift(out, sr=sample_rate, n_steps=semitones, n_fft=n_fft)
        if rate != 1:
            out = librosa.effects.time_stretch(out, rate=rate, n_fft=n_fft)
    out = np.asarray(out, dtype=np.float32)
    if snr_db is not None:
        power = float(np.mean(out.astype(np.float64) ** 2))
        noise = np.random.default_rng(seed).standard_normal(out.size)
        out = (out + noise * np.sqrt(power / 10 ** (snr_db / 10))).astype(np.float32)
    peak = float(np.max(np.abs(out))) if out.size else 0.0
    gain = 1.0 if peak <= 1.0 else 1.0 / peak
    if gain != 1.0:
        out = (out * gain).astype(np.float32)
    return out, gain


class PerturbAudio(Stage):
    """Fan each waveform out into ``variants`` pitch-shifted / stretched / noisy copies."""

    name = "perturb_audio"
    consumes = frozenset({"audio", "sample_rate"})
    produces = frozenset({"audio"})
    Settings = PerturbAudioSettings
    resources = Resources(cpus=1.0, gpus=0.0, memory_gb=1.0)
    batch_size = 16
    settings: PerturbAudioSettings

    def _parameters(self, seed: int, index: int) -> dict[str, Any]:
        s = self.settings
        if index == 0 and s.include_identity:
            return {"identity": True, "semitones": 0.0, "rate": 1.0, "snr_db": None}
        rng = np.random.default_rng(seed)
        semitones = round(float(rng.uniform(*s.semitones)), 4)
        rate = round(float(rng.uniform(*s.rate)), 4)
        snr = round(float(rng.uniform(*s.snr_db)), 2) if s.snr_db is not None else None
        return {"identity": False, "semitones": semitones, "rate": rate, "snr_db": snr}

    def process_batch(self, rows: list[Row]) -> list[Row | Failure]:
        out: list[Row | Failure] = []
        for row in rows:
            read = read_audio(row, self)
            if isinstance(read, Failure):
                out.append(read)
                continue
            audio, sample_rate = read
            if audio.size < MIN_SAMPLES:
                message = f"{audio.size} samples, fewer than the {MIN_SAMPLES} a phase vocoder needs"
                out.append(self.fail(row, "audio_too_short", message))
                continue
            for index in range(self.settings.variants):
                child = fan_out(row, index)
                seed = self.seed_for(child)
                params = self._parameters(seed, index)
                if params["identity"]:
                    result, gain = audio, 1.0
                    self.stats["identity"] += 1
                else:
                    try:
                        result, gain = perturb(
                            audio, sample_rate, params["semitones"], params["rate"], params["snr_db"], seed
                        )
                    except Exception as exc:
                        message = f"{type(exc).__name__}: {exc}"
                        out.append(self.fail(child, "perturb_error", message))
                        continue
                    self.stats["perturbed"] += 1
                    if gain != 1.0:
                        self.stats["rescaled"] += 1
                child["audio"] = result
                record(
                    child,
                    self.name,
                    index=index,
                    seed=seed,
                    **params,
                    gain=round(gain, 6),
                    duration_in_s=round(audio.size / sample_rate, 4),
                    duration_out_s=round(result.size / sample_rate, 4),
                )
                out.append(child)
        return out
