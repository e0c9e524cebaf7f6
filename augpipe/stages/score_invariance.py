"""Stage ``score_invariance``: does a generated image still show what its source showed? (label invariance)

Back-captioning keeps the source's label on every generated image (METHODS 1.1); the paper checked that
by hand (99.2 % label invariance). This stage scores it automatically for every candidate, comparing the
generated image (``field``, default ``generated_image``) with its source image (``source_field``, default
``image``), with one of the image backends of ``embed`` (imported from there, not copied):

- ``clip`` (a CLIPModel by hub id in the local cache, or a path) and ``tiny`` (a seeded random miniature
  CLIP, for tests): ``score_clip_source`` = cosine of the two CLIP image embeddings, and, when the row has
  a label name, ``score_clip_label`` = cosine of the generated image and the class prompt
  ``label_template`` (default ``"a photo of a {label}"``). The source's own similarity to that prompt is
  recorded in lineage (``source_clip_label``) as the reference the generated image's score compares with.
- ``efficientnet_lite0`` (default; the packaged ImageNet model, offline on CPU): with T(x) the top-``top_k``
  ImageNet classes of x, ``score_topk_agreement`` = |T(source) ∩ T(generated)| / k,
  ``score_top1_in_topk`` = 1.0 if the source's top-1 class is in T(generated) else 0.0, and
  ``score_feature_source`` = cosine of the 1280-d pooled features (free: same forward pass). The class
  ids are recorded in lineage.

A label name is ``label_name``, a string ``label``, or ``label_names[label]`` for integer labels (as in
``generate_image``). Scores are rounded to 6 decimals and written as ``score_*`` row fields (float sidecar
columns) and in lineage. By default the stage only records; a threshold (``min_clip_source``,
``min_clip_label``, ``min_topk_agreement``, ``require_top1``) drops candidates below it, counted as
``dropped:<score name>``. A row without a label is never dropped by ``min_clip_label`` (nothing to judge);
it is counted as ``unlabelled``. A row whose source or generated image is missing is a Failure
(``missing_field``).

Per batch, the model runs once over the distinct source images (one per source key: a source's candidates
share it) and every generated image together, and, for CLIP, once over the distinct class prompts.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
from pydantic import Field, field_validator, model_validator

from augpipe.pipeline.rows import Failure, FieldName, Row, record
from augpipe.pipeline.stage import Backend, Resources, Stage, StageContext, StageSettings
from augpipe.stages._fields import label_name, template_fields
from augpipe.stages.embed import (
    ClipBackend,
    EfficientNetLite0Backend,
    EmbedBackend,
    TinyClipBackend,
    l2_normalize,
)

CLIP_SCORES = ("score_clip_source", "score_clip_label")
TOPK_SCORES = ("score_topk_agreement", "score_top1_in_topk", "score_feature_source")
DIGITS = 6


class ScoreInvarianceSettings(StageSettings):
    model: str | None = Field(
        default=None, description="model reference (pkg://, local path or cached hub id); backend default"
    )
    field: FieldName = Field(default="generated_image", description="the generated image to judge")
    source_field: FieldName = Field(default="image", description="the source image it must stay faithful to")
    label_template: str = Field(default="a photo of a {label}", description="CLIP class prompt")
    label_names: tuple[str, ...] | None = Field(default=None, description="names for integer labels")
    top_k: int = Field(default=5, ge=1, le=1000, description="k of the ImageNet top-k agreement")
    min_clip_source: float | None = Field(
        default=None, ge=-1.0, le=1.0, description="drop below this CLIP source cosine; none = record only"
    )
    min_clip_label: float | None = Field(
        default=None, ge=-1.0, le=1.0, description="drop below this CLIP class-prompt cosine"
    )
    min_topk_agreement: float | None = Field(
        default=None, ge=0.0, le=1.0, description="drop below this top-k agreement (0..1)"
    )
    require_top1: bool = Field(
        default=False, description="drop when the source's top-1 class is not in the generated top-k"
    )

    @field_validator("label_template")
    @classmethod
    def _template(cls, value: str) -> str:
        if template_fields(value) != ["label"]:
            raise ValueError(f"label_template must contain {{label}} exactly once, got {value!r}")
        return value

    @model_validator(mode="after")
    def _distinct(self) -> ScoreInvarianceSettings:
        if self.field == self.source_field:
            raise ValueError("field and source_field must be two different image fields")
        return self


def _is_image(value: Any) -> bool:
    return hasattr(value, "convert") and hasattr(value, "size")


class ScoreInvariance(Stage):
    """Label-invariance scores of generated images against their sources; see the module docstring."""

    name: ClassVar[str] = "score_invariance"
    consumes: ClassVar[frozenset[str]] = frozenset({"generated_image", "image"})
    produces: ClassVar[frozenset[str]] = frozenset(TOPK_SCORES)
    Settings: ClassVar[type[StageSettings]] = ScoreInvarianceSettings
    resources: ClassVar[Resources] = Resources(cpus=1.0, gpus=0.0, memory_gb=2.0)
    batch_size: ClassVar[int] = 32
    backends: ClassVar[dict[str, type[Backend]]] = {
        "clip": ClipBackend,
        "tiny": TinyClipBackend,
        "efficientnet_lite0": EfficientNetLite0Backend,
    }
    default_backend: ClassVar[str | None] = "efficientnet_lite0"

    settings: ScoreInvarianceSettings
    backend: EmbedBackend

    def __init__(self, settings: StageSettings, context: StageContext) -> None:
        super().__init__(settings, context)
        s = self.settings
        self.uses_clip = isinstance(self.backend, ClipBackend)
        if self.uses_clip:
            wrong = ["min_topk_agreement"] if s.min_topk_agreement is not None else []
            wrong += ["require_top1"] if s.require_top1 else []
        else:
            wrong = [n for n in ("min_clip_source", "min_clip_label") if getattr(s, n) is not None]
        if wrong:
            raise ValueError(
                f"{wrong[0]} does not apply to backend {self.backend.name!r} "
                f"(CLIP backends score {', '.join(CLIP_SCORES)}; efficientnet_lite0 scores "
                f"{', '.join(TOPK_SCORES)})"
            )

    def inputs(self) -> frozenset[str]:
        return frozenset({self.settings.field, self.settings.source_field})

    def outputs(self) -> frozenset[str]:
        return frozenset(CLIP_SCORES if self.uses_clip else TOPK_SCORES)

    def process_batch(self, rows: list[Row]) -> list[Row | Failure]:
        s = self.settings
        results: list[Row | Failure] = []
        todo: list[Row] = []
        source_index: dict[str, int] = {}
        sources: list[Any] = []
        for row in rows:
            bad = next((f for f in (s.field, s.source_field) if not _is_image(row.get(f))), None)
            if bad is not None:
                got = type(row.get(bad)).__name__
                results.append(
                    self.fail(row, "missing_field", f"field {bad!r} is missing or not an image ({got})")
                )
                continue
            if row["key"] not in source_index:
                source_index[row["key"]] = len(sources)
                sources.append(row[s.source_field])
            todo.append(row)
            results.append(row)
        if not todo:
            return results
        images = [*sources, *(row[s.field] for row in todo)]
        first = len(sources)
        if self.uses_clip:
            verdicts = self._clip_scores(todo, images, source_index, first)
        else:
            verdicts = self._topk_scores(todo, images, source_index, first)
        identity = self.backend.describe()
        dropped: set[int] = set()
        for row, (scores, info) in zip(todo, verdicts, strict=True):
            reason = self._drop_reason(scores)
            if reason is not None:
                self.stats[f"dropped:{reason}"] += 1
                dropped.add(id(row))
                continue
            row.update(scores)
            record(row, self.name, **identity, **scores, **info, **self._thresholds())
            self.stats["scored"] += 1
        return [r for r in results if id(r) not in dropped]

    # -- scores ----------------------------------------------------------------------------------------

    def _clip_scores(
        self, rows: list[Row], images: list[Any], source_index: dict[str, int], first: int
    ) -> list[tuple[dict[str, float], dict[str, Any]]]:
        s = self.settings
        vectors = l2_normalize(self.backend.embed("image", images))
        names = [label_name(row, s.label_names) for row in rows]
        prompts = list(dict.fromkeys(s.label_template.format(label=n) for n in names if n is not None))
        text = l2_normalize(self.backend.embed("text", prompts)) if prompts else None
        prompt_index = {p: i for i, p in enumerate(prompts)}
        out = []
        for i, (row, name) in enumerate(zip(rows, names, strict=True)):
            source, generated = vectors[source_index[row["key"]]], vectors[first + i]
            scores = {"score_clip_source": round(float(np.dot(source, generated)), DIGITS)}
            info: dict[str, Any] = {"source_field": s.source_field, "field": s.field}
            if name is None or text is None:
                self.stats["unlabelled"] += 1
            else:
                prompt = s.label_template.format(label=name)
                class_vector = text[prompt_index[prompt]]
                scores["score_clip_label"] = round(float(np.dot(class_vector, generated)), DIGITS)
                info["label_prompt"] = prompt
                info["source_clip_label"] = round(float(np.dot(class_vector, source)), DIGITS)
            out.append((scores, info))
        return out

    def _topk_scores(
        self, rows: list[Row], images: list[Any], source_index: dict[str, int], first: int
    ) -> list[tuple[dict[str, float], dict[str, Any]]]:
        s = self.settings
        assert isinstance(self.backend, EfficientNetLite0Backend)
        features, topk = self.backend.features_and_topk(images, s.top_k)
        features = l2_normalize(features)
        out = []
        for i, row in enumerate(rows):
            j = source_index[row["key"]]
            source_top, generated_top = topk[j].tolist(), topk[first + i].tolist()
            scores = {
                "score_topk_agreement": round(len(set(source_top) & set(generated_top)) / s.top_k, DIGITS),
                "score_top1_in_topk": 1.0 if source_top[0] in generated_top else 0.0,
                "score_feature_source": round(float(np.dot(features[j], features[first + i])), DIGITS),
            }
            info = {
                "source_field": s.source_field,
                "field": s.field,
                "top_k": s.top_k,
                "source_topk": source_top,
                "generated_topk": generated_top,
                "classes": "ImageNet-1k ids",
            }
            out.append((scores, info))
        return out

    def _drop_reason(self, scores: dict[str, float]) -> str | None:
        s = self.settings
        checks = (
            ("score_clip_source", s.min_clip_source),
            ("score_clip_label", s.min_clip_label),
            ("score_topk_agreement", s.min_topk_agreement),
            ("score_top1_in_topk", 1.0 if s.require_top1 else None),
        )
        for name, minimum in checks:
            if minimum is not None and name in scores and scores[name] < minimum:
                return name
        return None

    def _thresholds(self) -> dict[str, Any]:
        s = self.settings
        if self.uses_clip:
            return {"min_clip_source": s.min_clip_source, "min_clip_label": s.min_clip_label}
        return {"min_topk_agreement": s.min_topk_agreement, "require_top1": s.require_top1}
