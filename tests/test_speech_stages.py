"""The back-speech model stages run directly (no Ray, no engine): synthesize_speech, perturb_audio and
transcribe, on the real packaged models (piper, faster-whisper, espeak-ng, pocketsphinx) and on tiny
random models (VITS, Whisper). Each real model loads once per module. CPU, well under a minute."""

from __future__ import annotations

import importlib.util
import os
import re
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
from pydantic import ValidationError
from rapidfuzz import fuzz

from augpipe.pipeline.models import ModelNotFoundError
from augpipe.pipeline.rows import Failure
from augpipe.pipeline.stage import StageContext
from augpipe.stages.perturb_audio import PerturbAudio
from augpipe.stages.synthesize_speech import SynthesizeSpeech
from augpipe.stages.transcribe import Transcribe

CTX = StageContext(run_seed=7, recipe="test")
SENTENCES = {
    "s0": "The weather was lovely and we walked along the river.",
    "s1": "My neighbour fixed the old bicycle in one afternoon.",
}


def make(cls, **options):
    return cls(cls.settings_from(options), CTX)


def ready(cls, **options):
    stage = make(cls, **options)
    stage.check()
    stage.setup()
    return stage


def normalized(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s']", " ", text.lower()).split())


def similarity(a: str, b: str) -> float:
    return fuzz.ratio(normalized(a), normalized(b)) / 100


def text_rows() -> list[dict]:
    return [{"key": key, "text": text, "label": "pos"} for key, text in SENTENCES.items()]


def only_rows(out: list) -> list[dict]:
    assert not [o for o in out if isinstance(o, Failure)], out
    return out


def tone(seconds: float = 1.0, rate: int = 16_000, hz: float = 440.0, key: str = "t0") -> dict:
    t = np.arange(int(seconds * rate)) / rate
    audio = (0.5 * np.sin(2 * np.pi * hz * t)).astype(np.float32)
    return {"key": key, "audio": audio, "sample_rate": rate}


def peak_hz(audio: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(audio * np.hanning(audio.size)))
    return float(np.fft.rfftfreq(audio.size, 1 / rate)[np.argmax(spectrum)])


# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def piper():
    return ready(SynthesizeSpeech, backend="piper", variants=1)


@pytest.fixture(scope="module")
def piper_rows(piper):
    return only_rows(piper.process_batch(text_rows()))


@pytest.fixture(scope="module")
def faster_whisper():
    return ready(Transcribe, backend="faster_whisper", variants=2)


@pytest.fixture(scope="module")
def tiny_tts():
    return ready(SynthesizeSpeech, backend="tiny", variants=2)


@pytest.fixture(scope="module")
def tiny_asr():
    return ready(Transcribe, backend="tiny", variants=3, beam_size=2)


# ---------------------------------------------------------------------------- piper + faster-whisper


def test_piper_speaks_and_faster_whisper_hears_it_back(piper_rows, faster_whisper):
    for row in piper_rows:
        audio = row["audio"]
        assert row["sample_rate"] == 22_050
        assert audio.dtype == np.float32 and audio.ndim == 1
        assert float(np.sqrt(np.mean(audio**2))) > 0.02  # speech, not silence
        assert 1.0 < audio.size / 22_050 < 8.0
        assert np.abs(audio).max() <= 1.0
        assert row["variant"] == (0,)
        info = row["lineage"]["synthesize_speech"]
        assert info["backend"] == "piper" and info["deterministic"] is True
        assert info["length_scale"] == 1.0 and info["noise_scale"] == 0.0
    out = only_rows(faster_whisper.process_batch(piper_rows))
    assert [(r["key"], r["variant"]) for r in out] == [
        ("s0", (0, 0)),
        ("s0", (0, 1)),
        ("s1", (0, 0)),
        ("s1", (0, 1)),
    ]
    for row in out:
        assert similarity(row["transcript"], row["text"]) > 0.8, row["transcript"]
        assert row["label"] == "pos"  # inherited unchanged
    first, second = out[0]["lineage"]["transcribe"], out[1]["lineage"]["transcribe"]
    assert first["decoding"] == "beam" and first["rank"] == 0
    assert second["decoding"] == "nbest" and second["rank"] == 1
    assert second["avg_logprob"] <= first["avg_logprob"]


def test_piper_default_voice_is_reproducible_and_variants_draw_recorded_prosody(piper, piper_rows):
    again = only_rows(piper.process_batch(text_rows()[:1]))
    assert np.array_equal(again[0]["audio"], piper_rows[0]["audio"])
    varied = ready(SynthesizeSpeech, backend="piper", variants=3, length_scale_range=(0.7, 0.9))
    out = only_rows(varied.process_batch(text_rows()[:1]))
    assert [r["variant"] for r in out] == [(0,), (1,), (2,)]
    scales = [r["lineage"]["synthesize_speech"]["length_scale"] for r in out]
    assert scales[0] == 1.0 and all(0.7 <= s <= 0.9 for s in scales[1:]) and scales[1] != scales[2]
    assert out[1]["audio"].size < out[0]["audio"].size  # shorter length scale, shorter speech
    assert np.array_equal(out[0]["audio"], piper_rows[0]["audio"])


def test_empty_text_becomes_a_failure_not_a_model_call(piper):
    out = piper.process_batch([{"key": "e1", "text": "   "}, {"key": "e2"}, {"key": "e3", "text": None}])
    assert [(f.key, f.cause, f.stage) for f in out] == [
        ("e1", "empty_text", "synthesize_speech"),
        ("e2", "empty_text", "synthesize_speech"),
        ("e3", "empty_text", "synthesize_speech"),
    ]


def test_missing_model_paths_fail_check_naming_them(tmp_path):
    missing = str(tmp_path / "nowhere" / "voice.onnx")
    with pytest.raises(ModelNotFoundError, match=re.escape(missing)):
        make(SynthesizeSpeech, backend="piper", model=missing).check()
    with pytest.raises(ModelNotFoundError, match="nowhere/asr"):
        make(Transcribe, backend="faster_whisper", model=str(tmp_path / "nowhere" / "asr")).check()
    with pytest.raises(ModelNotFoundError, match=r"'base\.en' is not downloaded"):
        make(Transcribe, backend="whisper", model="base.en", cache_dir=str(tmp_path)).check()
    with pytest.raises(ModelNotFoundError, match="pip install"):
        make(Transcribe, backend="faster_whisper", model="pkg://no_such_model_pkg/model").check()


@pytest.mark.skipif(importlib.util.find_spec("TTS") is not None, reason="coqui-tts is installed here")
def test_coqui_check_says_how_to_install_it():
    stage = make(SynthesizeSpeech, backend="coqui")
    with pytest.raises(ModelNotFoundError) as error:
        stage.check()
    assert "pip install 'augpipe[coqui]'" in str(error.value)
    assert "torchaudio" in str(error.value)


def test_settings_are_validated():
    with pytest.raises(ValidationError, match="voicez"):
        SynthesizeSpeech.settings_from({"voicez": 2})
    with pytest.raises(ValidationError, match="lower bound"):
        PerturbAudio.settings_from({"rate": (1.2, 0.8)})
    with pytest.raises(ValidationError):
        Transcribe.settings_from({"variants": 0})
    with pytest.raises(ValueError, match="unknown backend"):
        make(Transcribe, backend="kaldi")


# ------------------------------------------------------------------------------------------- perturb


def test_perturb_audio_is_deterministic_fans_out_and_records_parameters():
    stage = ready(PerturbAudio, variants=4)
    rows = [tone(key="t0"), tone(key="t1")]
    out = only_rows(stage.process_batch(rows))
    again = only_rows(stage.process_batch([tone(key="t0"), tone(key="t1")]))
    assert [(r["key"], r["variant"]) for r in out] == [(k, (i,)) for k in ("t0", "t1") for i in range(4)]
    for a, b in zip(out, again, strict=True):
        assert np.array_equal(a["audio"], b["audio"])
        assert a["lineage"] == b["lineage"]
    identity = out[0]
    assert identity["lineage"]["perturb_audio"]["identity"] is True
    assert np.array_equal(identity["audio"], rows[0]["audio"])
    params = [r["lineage"]["perturb_audio"] for r in out if r["variant"] != (0,)]
    for p in params:
        assert -2 <= p["semitones"] <= 2 and 0.85 <= p["rate"] <= 1.15 and p["snr_db"] is None
        assert p["seed"] and p["duration_out_s"] == pytest.approx(p["duration_in_s"] / p["rate"], rel=0.02)
    assert len({(p["semitones"], p["rate"]) for p in params}) == len(params)  # keys and variants differ


@pytest.mark.parametrize("rate", [0.8, 1.25])
def test_time_stretch_changes_duration_in_the_direction_of_the_rate(rate):
    stage = ready(PerturbAudio, variants=1, include_identity=False, rate=(rate, rate), semitones=(0, 0))
    [row] = only_rows(stage.process_batch([tone(seconds=2.0)]))
    ratio = row["audio"].size / 32_000
    assert ratio == pytest.approx(1 / rate, rel=0.01)
    assert row["lineage"]["perturb_audio"]["rate"] == rate


def test_pitch_shift_and_noise_do_what_they_say():
    stage = ready(
        PerturbAudio, variants=1, include_identity=False, rate=(1, 1), semitones=(12, 12), snr_db=(10, 10)
    )
    source = tone(seconds=1.0, hz=440.0)
    [row] = only_rows(stage.process_batch([source]))
    assert peak_hz(row["audio"], 16_000) == pytest.approx(880, abs=10)  # one octave up
    assert row["audio"].size == source["audio"].size
    clean = ready(PerturbAudio, variants=1, include_identity=False, rate=(1, 1), semitones=(12, 12))
    [quiet] = only_rows(clean.process_batch([tone(seconds=1.0, hz=440.0)]))
    noise = row["audio"] - quiet["audio"]
    snr = 10 * np.log10(np.mean(quiet["audio"] ** 2) / np.mean(noise**2))
    assert snr == pytest.approx(10, abs=0.5)
    assert row["lineage"]["perturb_audio"]["snr_db"] == 10


def test_bad_audio_becomes_failures_with_causes(tiny_asr):
    rows = [
        {"key": "empty", "audio": np.zeros(0, np.float32), "sample_rate": 16_000},
        {"key": "nan", "audio": np.full(1600, np.nan, np.float32), "sample_rate": 16_000},
        {"key": "stereo", "audio": np.zeros((2, 1600), np.float32), "sample_rate": 16_000},
        {"key": "norate", "audio": np.zeros(1600, np.float32)},
        {"key": "long", "audio": np.zeros(16_000 * 31, np.float32), "sample_rate": 16_000},
        {"key": "none"},
    ]
    causes = {f.key: f.cause for f in tiny_asr.process_batch(rows)}
    assert causes == {
        "empty": "empty_audio",
        "nan": "bad_audio",
        "stereo": "bad_audio",
        "norate": "bad_audio",
        "long": "audio_too_long",
        "none": "empty_audio",
    }
    perturb = make(PerturbAudio)
    assert {f.cause for f in perturb.process_batch(rows[:4])} == {"empty_audio", "bad_audio"}


# -------------------------------------------------------------------------------------- tiny models


def test_tiny_tts_and_tiny_whisper_run_end_to_end_deterministically(tiny_tts, tiny_asr):
    speech = only_rows(tiny_tts.process_batch(text_rows()))
    assert [r["variant"] for r in speech] == [(0,), (1,), (0,), (1,)]
    for row in speech:
        assert row["sample_rate"] == 16_000 and row["audio"].size > 0 and np.any(row["audio"])
    fresh = ready(SynthesizeSpeech, backend="tiny", variants=2)
    for a, b in zip(speech, only_rows(fresh.process_batch(text_rows())), strict=True):
        assert np.array_equal(a["audio"], b["audio"])
    heard = only_rows(tiny_asr.process_batch(speech))
    assert len(heard) == 12 and all(isinstance(r["transcript"], str) for r in heard)
    modes = [r["lineage"]["transcribe"]["decoding"] for r in heard[:3]]
    assert modes == ["beam", "sample", "sample"]
    assert "seed" not in heard[0]["lineage"]["transcribe"] and heard[1]["lineage"]["transcribe"]["seed"]
    assert heard[1]["transcript"] != heard[2]["transcript"]  # different seeds, different samples
    again = only_rows(ready(Transcribe, backend="tiny", variants=3, beam_size=2).process_batch(speech))
    assert [r["transcript"] for r in heard] == [r["transcript"] for r in again]
    alone = only_rows(tiny_asr.process_batch(speech[3:4]))  # a sample does not depend on its batch
    assert [r["transcript"] for r in alone] == [r["transcript"] for r in heard[9:12]]


def test_whisper_backend_loads_a_local_checkpoint(tmp_path):
    import torch

    from augpipe.stages.transcribe import build_tiny_whisper

    model = build_tiny_whisper(0)
    checkpoint = tmp_path / "tiny-random.pt"
    torch.save({"dims": model.dims.__dict__, "model_state_dict": model.state_dict()}, checkpoint)
    stage = ready(Transcribe, backend="whisper", model=str(checkpoint), variants=1, beam_size=1)
    out = only_rows(stage.process_batch([tone()]))
    assert out[0]["lineage"]["transcribe"]["decoding"] == "greedy"
    assert stage.describe()["model"] == str(checkpoint)
    loaded = stage.backend.net.state_dict()
    assert all(torch.equal(value, loaded[name]) for name, value in model.state_dict().items())
    assert isinstance(out[0]["transcript"], str)


# ------------------------------------------------------------------------------ espeak, pocketsphinx


def test_espeak_speaks_reproducibly_with_varied_voices():
    stage = ready(SynthesizeSpeech, backend="espeak", variants=3, speakers=("en-us+f3",))
    out = only_rows(stage.process_batch(text_rows()))
    time.sleep(1.1)  # unseeded, the breath noise of voices such as f3 follows the clock (seconds)
    again = only_rows(stage.process_batch(text_rows()))
    for row, repeat in zip(out, again, strict=True):
        assert np.array_equal(row["audio"], repeat["audio"])  # same bytes whatever ran before
    for row in out:
        assert row["sample_rate"] == 22_050
        assert float(np.sqrt(np.mean(row["audio"] ** 2))) > 0.01
        assert row["lineage"]["synthesize_speech"]["deterministic"] is True
    voices = [r["lineage"]["synthesize_speech"]["speaker"] for r in out]
    assert voices == ["en-us", "en-us+f3", "en-us+f3"] * 2  # the plain voice, then the drawn ones
    pitches = [r["lineage"]["synthesize_speech"]["pitch"] for r in out]
    assert pitches[0] is None and all(35 <= p <= 65 for p in pitches[1:3] + pitches[4:])


def test_pocketsphinx_transcribes_clear_speech(piper_rows):
    stage = ready(Transcribe, backend="pocketsphinx", variants=2)
    out = only_rows(stage.process_batch(piper_rows[:1]))
    assert [r["variant"] for r in out] == [(0, 0), (0, 1)]
    # Clean neural speech is within pocketsphinx's reach; synthetic speech in general is not (WER 0.7-1).
    assert similarity(out[0]["transcript"], SENTENCES["s0"]) > 0.6, out[0]["transcript"]
    assert out[1]["lineage"]["transcribe"]["decoding"] == "nbest"
