"""Backend ``pocketsphinx`` of stage ``transcribe``.

CMU PocketSphinx with its bundled en-us model (``pkg://pocketsphinx/model/en-us``):
one utterance at a time (its decoder has no batch API). Poor on synthetic speech.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from augpipe.pipeline.models import ModelNotFoundError
from augpipe.stages.transcribe.base import (
    ASR_RATE,
    AsrBackend,
    Hypothesis,
    _require,
)


class PocketsphinxBackend(AsrBackend):
    """CMU PocketSphinx; one utterance per decoder pass; variants are distinct N-best entries."""

    name = "pocketsphinx"
    default_model = "pkg://pocketsphinx/model/en-us"
    NBEST_LIMIT: ClassVar[int] = 64

    def check(self) -> None:
        _require(
            "pocketsphinx",
            "transcribe backend 'pocketsphinx' needs: pip install 'augpipe[speech-extra]' (pocketsphinx)",
        )
        super().check()
        assert self.model is not None and self.model.path is not None
        if self.model.ref == self.default_model and self.settings.language != "en":
            raise ValueError(f"pocketsphinx's bundled model is English; language {self.settings.language!r}")
        folder = self.model.path
        hmms = [p for p in sorted(folder.iterdir()) if p.is_dir()] if folder.is_dir() else []
        lms = [p for p in sorted(folder.glob("*.lm.bin")) if "phone" not in p.name]
        dicts = sorted(folder.glob("*.dict"))
        if not (hmms and lms and dicts):
            raise ModelNotFoundError(
                f"pocketsphinx model {self.model.ref!r}: {folder} must hold an acoustic model folder, a "
                "*.lm.bin language model and a *.dict pronunciation dictionary (like pocketsphinx's en-us)"
            )
        self.files = {"hmm": str(hmms[0]), "lm": str(lms[0]), "dict": str(dicts[0])}

    def load(self, device: str) -> None:
        from pocketsphinx import Decoder

        if self.model is None:
            self.check()
        self.decoder = Decoder(samprate=ASR_RATE, loglevel="FATAL", **self.files)

    def _transcribe(self, audios: list[np.ndarray], seeds: list[list[int]]) -> list[list[Hypothesis]]:
        n = self.settings.variants
        out = []
        for audio in audios:
            pcm = (np.clip(audio, -1.0, 1.0) * 32767).astype("<i2").tobytes()
            self.decoder.start_utt()
            self.decoder.process_raw(pcm, full_utt=True)
            self.decoder.end_utt()
            best = self.decoder.hyp()
            texts = [best.hypstr if best is not None else ""]
            if n > 1:
                for k, hyp in enumerate(self.decoder.nbest()):
                    if k >= self.NBEST_LIMIT or len(texts) >= n:
                        break
                    if hyp.hypstr not in texts:
                        texts.append(hyp.hypstr)
            hyps = [Hypothesis(texts[0], {"decoding": "viterbi"})]
            for j in range(1, n):
                exhausted = j >= len(texts)
                text = texts[0] if exhausted else texts[j]
                hyps.append(Hypothesis(text, {"decoding": "nbest", "rank": j, "nbest_exhausted": exhausted}))
            out.append(hyps)
        return out
