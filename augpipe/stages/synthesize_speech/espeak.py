"""Backend ``espeak`` of stage ``synthesize_speech``.

eSpeak NG formant synthesis from the ``espeakng-loader`` wheel (library and voice data in
the wheel, called through ctypes). Robotic speech that ASR mishears more often, i.e. more paraphrase
diversity. ``speaker`` is the voice (default ``en-us``; variants such as ``en-us+m3``, ``en-us+klatt4``).
libespeak-ng keeps synthesis state in globals that survive ``espeak_Terminate`` (the same sentence
twice in one process gives different samples), so each utterance runs in a freshly loaded library
(dlopen/dlclose, about 20 ms), and the noise of breathy voices (``+f3``, Klatt) is seeded with the
row's seed (``espeak_ng_SetRandSeed``; unseeded it follows the clock): output is then the same bytes
whatever ran before. One utterance per call.
"""

from __future__ import annotations

import ctypes
import threading
from typing import Any, ClassVar

import numpy as np

from augpipe.stages.synthesize_speech.base import (
    SpeechBackend,
    Synthesis,
    SynthesizeSpeechSettings,
    Voicing,
    _require,
)

_AUDIO_OUTPUT_SYNCHRONOUS = 2
_INITIALIZE_DONT_EXIT = 0x8000
_POS_CHARACTER = 1
_CHARS_UTF8 = 1
_RATE, _PITCH = 1, 3
_SYNTH_CALLBACK = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p
)
_ESPEAK_LOCK = threading.Lock()


class _EspeakSession:
    """libespeak-ng loaded fresh (dlopen) for one utterance and unloaded (dlclose) after it.

    The library keeps synthesis state in globals that ``espeak_Terminate`` does not reset (repeating a
    sentence in one process gives different samples), so a fresh load is what makes output reproducible.
    """

    def __init__(self, library: str, data: str) -> None:
        self.library, self.data = library, data
        self.chunks: list[np.ndarray] = []
        self.callback = _SYNTH_CALLBACK(self._collect)
        self.lib: Any = None

    def _collect(self, wav: Any, count: int, events: Any) -> int:
        if count > 0 and wav:
            self.chunks.append(np.ctypeslib.as_array(wav, shape=(count,)).copy())
        return 0

    def __enter__(self) -> _EspeakSession:
        _ESPEAK_LOCK.acquire()
        try:
            lib = ctypes.CDLL(self.library)
            lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
            lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
            lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
            lib.espeak_Synth.argtypes = [
                ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int,
                ctypes.c_uint, ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p,
            ]  # fmt: skip
            self.lib = lib
            self.seedable = hasattr(lib, "espeak_ng_SetRandSeed")
            self.sample_rate = lib.espeak_Initialize(
                _AUDIO_OUTPUT_SYNCHRONOUS, 0, self.data.encode(), _INITIALIZE_DONT_EXIT
            )
            if self.sample_rate <= 0:
                raise RuntimeError(f"espeak_Initialize failed ({self.sample_rate}) with data {self.data}")
            lib.espeak_SetSynthCallback(self.callback)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            if self.lib is not None:
                import _ctypes

                self.lib.espeak_Terminate()
                _ctypes.dlclose(self.lib._handle)
                self.lib = None
        finally:
            _ESPEAK_LOCK.release()

    def set_voice(self, voice: str) -> None:
        status = self.lib.espeak_SetVoiceByName(voice.encode())
        if status != 0:
            raise ValueError(f"espeak has no voice {voice!r} (status {status})")

    def speak(self, text: str, voice: str, rate: int, pitch: int | None, seed: int) -> np.ndarray:
        self.set_voice(voice)
        if self.seedable:  # breath/Klatt noise generator; unseeded it follows the clock
            self.lib.espeak_ng_SetRandSeed(ctypes.c_long(seed & 0x7FFFFFFF))
        self.lib.espeak_SetParameter(_RATE, rate, 0)
        if pitch is not None:
            self.lib.espeak_SetParameter(_PITCH, pitch, 0)
        self.chunks = []
        data = text.encode("utf-8")
        status = self.lib.espeak_Synth(data, len(data) + 1, 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None)
        if status != 0:
            raise RuntimeError(f"espeak_Synth failed with status {status}")
        pcm = np.concatenate(self.chunks) if self.chunks else np.zeros(0, np.int16)
        return pcm.astype(np.float32) / 32768.0


class EspeakBackend(SpeechBackend):
    """eSpeak NG through the ``espeakng-loader`` wheel; one utterance per (freshly loaded) library call."""

    name = "espeak"
    variant_speakers = ("en-us", "en-us+m3", "en-us+f3", "en-us+klatt4")
    DEFAULT_VOICE: ClassVar[str] = "en-us"

    def __init__(self, settings: SynthesizeSpeechSettings, context: Any) -> None:
        super().__init__(settings, context)
        self.library = ""
        self.data = ""

    def _session(self) -> _EspeakSession:
        return _EspeakSession(self.library, self.data)

    def check(self) -> None:
        self._no_model()
        _require(
            "espeakng_loader",
            "synthesize_speech backend 'espeak' needs the espeakng-loader wheel: "
            "pip install 'augpipe[speech-extra]'",
        )
        import espeakng_loader

        self.library = espeakng_loader.get_library_path()
        self.data = espeakng_loader.get_data_path()
        voices = {
            self.settings.speaker or self.DEFAULT_VOICE,
            *(self.settings.speakers or self.variant_speakers),
        }
        with self._session() as session:
            for voice in sorted(voices):
                session.set_voice(voice)

    def load(self, device: str) -> None:
        if not self.library:
            self.check()

    def synthesize(self, texts: list[str], voicings: list[Voicing]) -> list[Synthesis | Exception]:
        results: list[Synthesis | Exception] = []
        for text, v in zip(texts, voicings, strict=True):
            voice = v.speaker or self.DEFAULT_VOICE
            rate = round(min(450, max(80, self.settings.words_per_minute / v.length_scale)))
            try:
                with self._session() as session:
                    audio = session.speak(text, voice, rate, v.pitch, v.seed)
                    sample_rate, seedable = session.sample_rate, session.seedable
            except Exception as exc:
                results.append(exc)
                continue
            applied = {
                "length_scale": v.length_scale,
                "speaker": voice,
                "words_per_minute": rate,
                "pitch": v.pitch,
                "deterministic": seedable,
            }
            results.append(Synthesis(audio, int(sample_rate), applied))
        return results

    def describe(self) -> dict[str, Any]:
        info = super().describe()
        version = "unknown"
        try:
            from importlib.metadata import version as package_version

            version = package_version("espeakng-loader")
        except Exception:
            pass
        info.update(model="espeak-ng", revision=f"espeakng-loader-{version}")
        return info
