"""Backend ``coqui`` of stage ``synthesize_speech``.

Coqui TTS (the ``coqui-tts`` package, extra ``augpipe[coqui]``); ``model`` is a Coqui model
name already downloaded to the Coqui model folder (``tts_models/en/ljspeech/vits``), or a local
checkpoint (file, or a folder with ``config.json``) with ``config``. Its API synthesises one text per
call, so this backend loops; torch's RNG is seeded per row, so sampled voices are reproducible.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import numpy as np

from augpipe.pipeline.models import ModelNotFoundError, ResolvedModel, resolve_model
from augpipe.stages.synthesize_speech.base import SpeechBackend, Synthesis, SynthesizeSpeechSettings, Voicing

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
