"""Backend ``whisper`` of stage ``transcribe``.

The openai-whisper package (installed ``--no-deps``, extra ``augpipe[whisper]``); ``model`` is a name
(``tiny.en``, ``base``, ...) whose checkpoint is already in ``cache_dir`` (default: whisper's
``~/.cache/whisper``) or a local ``.pt`` checkpoint; nothing is downloaded. The encoder runs once per
batch; beam search decodes one row at a time, because openai-whisper 20250625's batched beam search
mismatches audio and token batch sizes (openai/whisper#2197, #2389), while greedy and sampled rows
decode as one batch. fp16 on CUDA only.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from augpipe.pipeline.models import ModelNotFoundError, ResolvedModel, resolve_model
from augpipe.stages.transcribe.base import (
    AsrBackend,
    Hypothesis,
    _require,
)

WHISPER_INSTALL = (
    "transcribe backend {name!r} needs openai-whisper, installed without its CUDA-only triton dependency: "
    "pip install --no-deps openai-whisper && pip install 'augpipe[whisper]'"
)


def whisper_cache_dir(configured: str | None) -> Path:
    """openai-whisper's download folder: ``configured``, else $XDG_CACHE_HOME/whisper or ~/.cache/whisper."""
    if configured:
        return Path(configured).expanduser()
    return Path(os.getenv("XDG_CACHE_HOME", str(Path.home() / ".cache"))) / "whisper"


class _RowSampler:
    """A whisper token decoder picking row ``r``'s token greedily (temperature 0) or with its own generator.

    Mirrors ``whisper.decoding.GreedyDecoder`` except that the draw is per row, so a row's transcript does
    not depend on the other rows of its batch.
    """

    def __init__(self, temperatures: list[float], generators: list[Any], eot: int) -> None:
        self.temperatures = temperatures
        self.generators = generators
        self.eot = eot

    def reset(self) -> None:
        pass

    def update(self, tokens: Any, logits: Any, sum_logprobs: Any) -> tuple[Any, Any]:
        import torch
        import torch.nn.functional as F

        logits = logits.float()
        chosen = torch.empty(logits.shape[0], dtype=torch.long, device=logits.device)
        for r, (temperature, generator) in enumerate(zip(self.temperatures, self.generators, strict=True)):
            if temperature == 0:
                chosen[r] = logits[r].argmax()
            else:
                probs = torch.softmax(logits[r] / temperature, dim=-1)
                chosen[r] = torch.multinomial(probs, 1, generator=generator)[0]
        logprobs = F.log_softmax(logits, dim=-1)
        current = logprobs[torch.arange(logprobs.shape[0]), chosen]
        sum_logprobs += current * (tokens[:, -1] != self.eot)
        chosen[tokens[:, -1] == self.eot] = self.eot
        tokens = torch.cat([tokens, chosen[:, None]], dim=-1)
        return tokens, (tokens[:, -1] == self.eot).all()

    def finalize(self, tokens: Any, sum_logprobs: Any) -> tuple[Any, list[float]]:
        import torch.nn.functional as F

        return F.pad(tokens, (0, 1), value=self.eot), sum_logprobs.tolist()


class WhisperBackend(AsrBackend):
    """openai-whisper: batched encoder; per-row beam search; one batched decode for greedy/sampled rows."""

    name = "whisper"
    default_model = "tiny.en"

    def check(self) -> None:
        _require("whisper", WHISPER_INSTALL.format(name=self.name))
        ref = self.model_ref
        assert ref is not None
        import whisper

        if ref in whisper._MODELS:
            url = whisper._MODELS[ref]
            path = whisper_cache_dir(self.settings.cache_dir) / os.path.basename(url)
            if not path.is_file():
                raise ModelNotFoundError(
                    f"whisper model {ref!r} is not downloaded: {path} is missing (nothing is downloaded "
                    f'here). On a machine with network access run `python -c "import whisper; '
                    f"whisper.load_model('{ref}')\"` and copy ~/.cache/whisper/{path.name}, or set "
                    "transcribe.model to a local .pt checkpoint (transcribe.cache_dir to its folder)"
                )
            self.model = ResolvedModel(ref=ref, path=path, revision=url.split("/")[-2][:16])
        else:
            self.model = resolve_model(ref)
            if self.model.path is None or not self.model.path.is_file():
                raise ModelNotFoundError(
                    f"whisper model {ref!r} is neither a known name "
                    f"({', '.join(whisper.available_models())}) nor a checkpoint file (.pt)"
                )

    def load(self, device: str) -> None:
        import whisper

        if self.model is None:
            self.check()
        assert self.model is not None and self.model.path is not None
        self.device = device
        self.net = whisper.load_model(str(self.model.path), device=device)
        if not self.net.is_multilingual and self.settings.language != "en":
            raise ValueError(f"{self.model.ref!r} is English-only; language {self.settings.language!r}")
        if self.model.ref in whisper._ALIGNMENT_HEADS:  # loading by path skips them; keep the model whole
            self.net.set_alignment_heads(whisper._ALIGNMENT_HEADS[self.model.ref])
        self.net.eval()

    # -- decoding --------------------------------------------------------------------------------------

    @property
    def fp16(self) -> bool:
        return self.device == "cuda" and self.settings.fp16

    def _options(self, **kwargs: Any) -> Any:
        import whisper

        options = {
            "task": "transcribe",
            "language": self.settings.language,
            "fp16": self.fp16,
            "without_timestamps": True,
            "sample_len": self.settings.max_new_tokens,
        }
        options.update(kwargs)
        return whisper.DecodingOptions(**options)

    def _suppress(self) -> str | list[int]:
        return "-1"

    def _encode(self, audios: list[np.ndarray]) -> Any:
        import torch
        import whisper

        n_mels = self.net.dims.n_mels
        mels = [
            whisper.log_mel_spectrogram(whisper.pad_or_trim(torch.from_numpy(a)), n_mels, device=self.device)
            for a in audios
        ]
        mel = torch.stack(mels)
        with torch.inference_mode():
            return self.net.embed_audio(mel.half() if self.fp16 else mel)

    def _decode_rows(self, features: Any, temperatures: list[float], seeds: list[int]) -> list[Any]:
        """Greedy (temperature 0) and sampled rows in one batched decode, each row with its own generator."""
        import torch
        from whisper.decoding import DecodingTask

        generators = [torch.Generator(device=features.device).manual_seed(seed) for seed in seeds]
        options = self._options(temperature=max(temperatures), suppress_tokens=self._suppress())
        task = DecodingTask(self.net, options)
        task.decoder = _RowSampler(temperatures, generators, task.tokenizer.eot)
        return task.run(features)

    def _transcribe(self, audios: list[np.ndarray], seeds: list[list[int]]) -> list[list[Hypothesis]]:
        import torch
        import whisper

        s = self.settings
        n = len(audios)
        features = self._encode(audios)
        out: list[list[Hypothesis | None]] = [[None] * s.variants for _ in range(n)]
        rows: list[tuple[int, int]] = []  # (input, variant) decoded by the batched sampler
        if s.beam_size > 1:
            options = self._options(beam_size=s.beam_size, suppress_tokens=self._suppress())
            for i in range(n):
                with warnings.catch_warnings():  # upstream calls np.argsort on a tensor in finalize()
                    warnings.filterwarnings("ignore", "__array_wrap__", DeprecationWarning)
                    result = whisper.decode(self.net, features[i : i + 1], options)[0]
                out[i][0] = self._hypothesis(result, "beam", 0.0, None)
        else:
            rows += [(i, 0) for i in range(n)]
        rows += [(i, j) for i in range(n) for j in range(1, s.variants)]
        if rows:
            temperatures = [0.0 if j == 0 else s.temperature for _, j in rows]
            row_seeds = [seeds[i][j] for i, j in rows]
            index = torch.tensor([i for i, _ in rows], device=features.device)
            results = self._decode_rows(features[index], temperatures, row_seeds)
            for (i, j), result, temperature, seed in zip(rows, results, temperatures, row_seeds, strict=True):
                mode = "greedy" if temperature == 0 else "sample"
                out[i][j] = self._hypothesis(result, mode, temperature, seed if temperature else None)
        return [[h for h in hyps if h is not None] for hyps in out]

    def _hypothesis(self, result: Any, mode: str, temperature: float, seed: int | None) -> Hypothesis:
        info: dict[str, Any] = {
            "decoding": mode,
            "temperature": temperature,
            "beam_size": self.settings.beam_size if mode == "beam" else 1,
            "avg_logprob": round(float(result.avg_logprob), 4),
            "no_speech_prob": round(float(result.no_speech_prob), 4),
        }
        if seed is not None:
            info["seed"] = seed
        return Hypothesis(result.text.strip(), info)
