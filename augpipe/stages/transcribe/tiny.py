"""Backend ``tiny`` of stage ``transcribe``.

Runs openai-whisper's real decode path on a randomly initialised miniature ``Whisper`` built from
``ModelDimensions`` (fixed seed; ``decoder.positional_embedding``, created uninitialised upstream, is
initialised here). Its transcripts are random words.
"""

from __future__ import annotations

from typing import Any, ClassVar

from augpipe.stages.transcribe.base import (
    _require,
)
from augpipe.stages.transcribe.whisper import WHISPER_INSTALL, WhisperBackend


def build_tiny_whisper(seed: int = 0) -> Any:
    """A randomly initialised miniature English-only openai-whisper model, built offline and seeded.

    The encoder keeps Whisper's real input geometry (80 mels, 1,500 frames); everything else is tiny.
    ``decoder.positional_embedding`` is created uninitialised upstream, so it is initialised here; with
    small token embeddings and unit positional embeddings the random decoder emits varied words instead of
    repeating one token.
    """
    import torch
    from whisper.model import ModelDimensions, Whisper

    dims = ModelDimensions(
        n_mels=80,
        n_audio_ctx=1500,
        n_audio_state=64,
        n_audio_head=2,
        n_audio_layer=1,
        n_vocab=51864,
        n_text_ctx=64,
        n_text_state=64,
        n_text_head=2,
        n_text_layer=1,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Whisper(dims)
        torch.nn.init.normal_(model.decoder.token_embedding.weight, std=0.02)
        torch.nn.init.normal_(model.decoder.positional_embedding, std=1.0)
    return model.eval()


class TinyWhisperBackend(WhisperBackend):
    """openai-whisper's decode path on a random miniature model (CPU, well under a second per batch)."""

    name = "tiny"
    default_model = None
    SEED: ClassVar[int] = 0

    def check(self) -> None:
        _require("whisper", WHISPER_INSTALL.format(name=self.name))
        if self.settings.model:
            raise ValueError(
                "transcribe backend 'tiny' builds its model from a config; unset transcribe.model"
            )

    def load(self, device: str) -> None:
        self.check()
        self.device = device
        self.net = build_tiny_whisper(self.SEED).to(device)

    def _suppress(self) -> str | list[int]:
        from whisper.tokenizer import get_tokenizer

        eot = get_tokenizer(multilingual=False).eot
        return [-1, *range(eot + 1, self.net.dims.n_vocab)]

    def describe(self) -> dict[str, Any]:
        info = super().describe()
        info.update(model="tiny:whisper", revision=f"random-init-seed-{self.SEED}")
        return info
