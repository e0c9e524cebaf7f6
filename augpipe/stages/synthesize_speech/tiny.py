"""Backend ``tiny`` of stage ``synthesize_speech``.

A randomly initialised miniature ``transformers.VitsModel`` (fixed seed) with a character
``VitsTokenizer``: the real VITS code path on CPU in well under a second. Noise-like audio. Rows that
share a length scale and need no noise go through one batched forward; a row with noise runs alone,
seeded with its own seed, so its audio does not depend on which rows share its batch.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path
from typing import Any, ClassVar

from augpipe.stages.synthesize_speech.base import SpeechBackend, Synthesis, SynthesizeSpeechSettings, Voicing

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
