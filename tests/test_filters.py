"""The two filters at the level a user audits them: which rows survive, the counts by drop reason over a
batch, the scores and thresholds their lineage records, and the failure a bad row becomes. Pure numpy and
PIL, no models (milliseconds)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from augpipe.methods import image_checks
from augpipe.methods.text_distance import prepare
from augpipe.pipeline.rows import Failure
from augpipe.pipeline.stage import StageContext
from augpipe.stages.filter_images import FilterImages
from augpipe.stages.filter_paraphrase import FilterParaphrase

CTX = StageContext(run_seed=0, recipe="test")


def make(cls, **options):
    return cls(cls.settings_from(options), CTX)


# --------------------------------------------------------------------------------- filter_paraphrase

SOURCE = "abcdefghij"  # 10 characters: each edit costs 0.1


def paraphrase_rows(*transcripts: str, text: str = SOURCE) -> list[dict]:
    return [{"key": f"k{i}", "lineage": {}, "text": text, "transcript": t} for i, t in enumerate(transcripts)]


def test_filter_paraphrase_counts_every_drop_by_reason_over_a_batch():
    stage = make(FilterParaphrase)
    rows = paraphrase_rows(
        SOURCE, "ABCDEFGHIJ!", "", "...", "abcdefgxyz", "zzzzzzzzzz", "abcdefghiX", "abXdefghij"
    )
    out = stage.process_batch(rows)
    assert [r["key"] for r in out] == ["k6", "k7"]
    assert dict(stage.stats) == {"dropped:copy": 2, "dropped:empty": 2, "dropped:edit_ratio": 2, "kept": 2}


def test_filter_paraphrase_keeps_the_boundary_ratio_and_records_its_verdict():
    stage = make(FilterParaphrase, max_edit_ratio=0.2)
    (kept,) = stage.process_batch(paraphrase_rows("abcdefghXY"))  # 2 edits of 10: exactly the limit
    assert kept["score_edit_ratio"] == pytest.approx(0.2)
    assert kept["lineage"]["filter_paraphrase"] == {
        "score_edit_ratio": pytest.approx(0.2),
        "max_edit_ratio": 0.2,
        "drop_copies": True,
        "normalize": True,
        "unit": "character Levenshtein / len(source)",
    }
    assert make(FilterParaphrase, max_edit_ratio=0.19).process_batch(paraphrase_rows("abcdefghXY")) == []


def test_filter_paraphrase_settings_change_the_verdicts():
    copies = make(FilterParaphrase, drop_copies=False, normalize=False)
    out = copies.process_batch(paraphrase_rows(SOURCE, "ABCDEFGHIJ"))
    assert [r["key"] for r in out] == ["k0"]  # raw comparison: the upper-case copy is 10 edits away
    assert out[0]["lineage"]["filter_paraphrase"]["drop_copies"] is False
    assert out[0]["lineage"]["filter_paraphrase"]["normalize"] is False
    assert out[0]["score_edit_ratio"] == 0.0


def test_filter_paraphrase_fails_a_row_without_a_source_text():
    stage = make(FilterParaphrase)
    (failure,) = stage.process_batch(paraphrase_rows("anything", text=" ... "))
    assert isinstance(failure, Failure) and failure.cause == "empty_text" and failure.key == "k0"
    assert failure.message == "source text is empty: no edit budget to judge a paraphrase by"


# ------------------------------------------------------------------------------------- filter_images


def image_row(key: str, rgb: tuple[int, int, int] | np.ndarray) -> dict:
    pixels = np.asarray(rgb, dtype=np.uint8)
    if pixels.ndim == 1:
        pixels = np.broadcast_to(pixels, (4, 4, 3))
    return {"key": key, "lineage": {}, "generated_image": Image.fromarray(np.ascontiguousarray(pixels))}


def test_filter_images_drops_black_and_gray_counting_each_and_keeps_colour():
    stage = make(FilterImages)
    rows = [
        image_row("black", (2, 2, 2)),
        image_row("dark", (9, 0, 0)),  # mean 3 < 10: black wins over grayscale-ish
        image_row("gray", (128, 128, 128)),
        image_row("grayish", (120, 122, 121)),  # spread 2 < 3
        image_row("red", (200, 10, 10)),
        image_row("teal", (20, 180, 160)),
    ]
    out = stage.process_batch(rows)
    assert [r["key"] for r in out] == ["red", "teal"]
    assert dict(stage.stats) == {"dropped:black": 2, "dropped:grayscale": 2}


def test_filter_images_records_scores_and_thresholds_in_lineage():
    stage = make(FilterImages, black_threshold=12.5, gray_threshold=4.0)
    (row,) = stage.process_batch([image_row("red", (200, 10, 10))])
    arr = np.broadcast_to(np.array([200.0, 10.0, 10.0]), (4, 4, 3))
    assert row["lineage"]["filter_images"] == {
        "score_mean_intensity": round(220 / 3, 4),
        "score_channel_spread": 190.0,
        "score_colorfulness": round(image_checks.colorfulness(arr), 4),
        "verdict": "kept",
        "black_threshold": 12.5,
        "gray_threshold": 4.0,
    }
    assert row["lineage"]["filter_images"]["score_colorfulness"] == round(0.3 * np.hypot(190, 95), 4)


def test_filter_images_keeps_what_its_switches_allow_and_names_the_verdict():
    stage = make(FilterImages, drop_black=False, drop_grayscale=False)
    out = stage.process_batch([image_row("black", (0, 0, 0)), image_row("gray", (90, 90, 90))])
    assert [r["lineage"]["filter_images"]["verdict"] for r in out] == ["black", "grayscale"]
    assert not stage.stats


def test_filter_images_reads_the_configured_field_and_fails_bad_rows():
    stage = make(FilterImages, field="image")
    row = image_row("red", (200, 10, 10))
    row["image"] = row.pop("generated_image")
    failures = stage.process_batch(
        [row, {"key": "none", "lineage": {}}, {"key": "flat", "image": np.zeros(3)}]
    )
    assert failures[0]["key"] == "red"
    assert [(f.key, f.cause) for f in failures[1:]] == [("none", "bad_input"), ("flat", "bad_input")]
    assert failures[1].message == "row has no 'image' field"
    assert failures[2].message == "expected a non-empty (H, W, 3) RGB image, got shape (3,)"
    assert stage.inputs() == frozenset({"image"})


@pytest.mark.parametrize(
    ("image", "shape"),
    [
        (Image.new("L", (3, 2), 77), (2, 3, 3)),  # grayscale PIL image becomes three equal channels
        (Image.new("RGBA", (2, 2), (1, 2, 3, 4)), (2, 2, 3)),
        (np.zeros((2, 5, 3), dtype=np.uint8), (2, 5, 3)),
    ],
)
def test_as_rgb_array_gives_float_rgb(image, shape):
    arr = image_checks.as_rgb_array(image)
    assert arr.shape == shape and arr.dtype == np.float64


@pytest.mark.parametrize("shape", [(0, 4, 3), (4, 0, 3), (4, 4), (4, 4, 4), (4, 4, 1)])
def test_as_rgb_array_refuses_other_shapes(shape):
    with pytest.raises(ValueError, match=rf"got shape \({shape[0]}, "):
        image_checks.as_rgb_array(np.zeros(shape))


def test_image_scores_known_values():
    arr = np.zeros((2, 2, 3))
    arr[0, 0] = (255, 0, 0)
    arr[1, 1] = (0, 0, 255)
    assert image_checks.mean_intensity(arr) == pytest.approx(510 / 12)
    assert image_checks.channel_spread(arr) == pytest.approx(255 / 2)
    rg = np.array([255, 0, 0, 0])
    yb = np.array([127.5, 0, 0, -255])
    expected = np.hypot(rg.std(), yb.std()) + 0.3 * np.hypot(rg.mean(), yb.mean())
    assert image_checks.colorfulness(arr) == pytest.approx(expected)
    assert image_checks.verdict(arr, 42.6, 1.0) == "black"  # mean 42.5
    assert image_checks.verdict(arr, 42.5, 1.0) is None  # at the threshold is not black
    assert (
        image_checks.verdict(arr, 10.0, 127.5) is None
        and image_checks.verdict(arr, 10.0, 127.6) == "grayscale"
    )


def test_filter_paraphrase_goes_on_after_a_failed_row():
    stage = make(FilterParaphrase)
    rows = paraphrase_rows("anything", text="") + paraphrase_rows("abcdefghiX")
    out = stage.process_batch(rows)
    assert isinstance(out[0], Failure) and out[1]["transcript"] == "abcdefghiX"


def test_prepare_normalises_unless_told_not_to():
    assert prepare("The Cat.", "the cat") == ("the cat", "the cat")
    assert prepare("The Cat.", "the cat", normalize=False) == ("The Cat.", "the cat")


def test_filter_images_scores_are_rounded_to_four_places():
    pixels = np.array([[[200, 10, 10], [10, 10, 10], [10, 10, 10]]], dtype=np.uint8)
    (row,) = make(FilterImages, gray_threshold=1.0).process_batch([image_row("mixed", pixels)])
    info = row["lineage"]["filter_images"]
    assert info["score_channel_spread"] == 63.3333  # 190 / 3
    assert info["score_mean_intensity"] == 31.1111  # 280 / 9
