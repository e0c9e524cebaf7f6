"""Stage ``filter_images``: drop generated images that are all black or grayscale (back-imagination filter).

METHODS 1.1 filters back-imagination's "black-and-white" images; the term is ambiguous, so both an
all-black output (what a safety checker returns for a flagged image) and a grayscale output are rejects.
Kept rows carry their scores in lineage; dropped rows are counted as ``dropped:black`` and
``dropped:grayscale``. The checks are the pure functions of ``augpipe.methods.image_checks``.
"""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from augpipe.methods import image_checks
from augpipe.pipeline.families import FilterStage
from augpipe.pipeline.rows import Failure, FieldName, Row, record
from augpipe.pipeline.stage import Resources, StageSettings


class FilterImagesSettings(StageSettings):
    field: FieldName = Field(default="generated_image", description="the image field to check")
    black_threshold: float = Field(
        default=10.0, ge=0, le=255, description="reject when the mean intensity (0..255) is below this"
    )
    gray_threshold: float = Field(
        default=3.0, ge=0, le=255, description="reject when the mean channel spread (0..255) is below this"
    )
    drop_black: bool = True
    drop_grayscale: bool = True


class FilterImages(FilterStage):
    """Keep a row only if its image is neither (near) all black nor (near) grayscale."""

    name = "filter_images"
    consumes = frozenset({"generated_image"})
    Settings = FilterImagesSettings
    resources = Resources(cpus=1.0, gpus=0.0, memory_gb=1.0)
    batch_size = 64
    cacheable = False
    settings: FilterImagesSettings

    DROP_REASONS: ClassVar[tuple[str, ...]] = ("black", "grayscale")

    def inputs(self) -> frozenset[str]:
        return frozenset({self.settings.field})

    def outputs(self) -> frozenset[str]:
        return frozenset()

    def judge(self, row: Row) -> str | Failure | None:
        s = self.settings
        image = row.get(s.field)
        try:
            if image is None:
                raise ValueError(f"row has no {s.field!r} field")
            arr = image_checks.as_rgb_array(image)
        except (ValueError, TypeError, OSError) as exc:
            return self.fail(row, "bad_input", str(exc))
        scores = {
            "score_mean_intensity": round(image_checks.mean_intensity(arr), 4),
            "score_channel_spread": round(image_checks.channel_spread(arr), 4),
            "score_colorfulness": round(image_checks.colorfulness(arr), 4),
        }
        reason = image_checks.verdict(arr, s.black_threshold, s.gray_threshold)
        if (reason == "black" and s.drop_black) or (reason == "grayscale" and s.drop_grayscale):
            return reason
        record(
            row,
            self.name,
            **scores,
            verdict=reason or "kept",
            black_threshold=s.black_threshold,
            gray_threshold=s.gray_threshold,
        )
        return None
