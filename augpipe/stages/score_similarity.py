"""score_similarity: cosine similarity of a candidate text to its source, as a semantic-consistency score.

Writes ``score_similarity`` = cos(embed(source_field), embed(candidate_field)) with a text backend of
``embed`` (default: the packaged all-MiniLM-L6-v2). By default it only records; with ``min_similarity``
set, candidates below it are dropped and counted as ``dropped:low_similarity``.

All texts of a batch (sources deduplicated, since several candidates share one source) are embedded in
one model call.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
from pydantic import Field

from augpipe.pipeline.rows import Failure, FieldName, Row, record
from augpipe.pipeline.stage import Backend, Resources, Stage, StageSettings
from augpipe.stages.embed import TEXT_BACKENDS, EmbedBackend, l2_normalize


class ScoreSimilaritySettings(StageSettings):
    source_field: FieldName = Field(default="text", description="the reference text field")
    candidate_field: FieldName = Field(default="transcript", description="the candidate text field")
    model: str | None = Field(
        default=None, description="model reference (pkg://, local path or cached hub id); backend default"
    )
    min_similarity: float | None = Field(
        default=None, ge=-1.0, le=1.0, description="drop candidates below this cosine; none = record only"
    )


class ScoreSimilarity(Stage):
    name: ClassVar[str] = "score_similarity"
    consumes: ClassVar[frozenset[str]] = frozenset({"text", "transcript"})
    produces: ClassVar[frozenset[str]] = frozenset({"score_similarity"})
    Settings: ClassVar[type[StageSettings]] = ScoreSimilaritySettings
    resources: ClassVar[Resources] = Resources(cpus=1.0, gpus=0.0, memory_gb=2.0)
    batch_size: ClassVar[int] = 64
    backends: ClassVar[dict[str, type[Backend]]] = dict(TEXT_BACKENDS)
    default_backend: ClassVar[str | None] = "sentence_transformers"

    settings: ScoreSimilaritySettings
    backend: EmbedBackend

    def inputs(self) -> frozenset[str]:
        return frozenset({self.settings.source_field, self.settings.candidate_field})

    def _failure(self, row: Row, field: str, value: Any) -> Failure:
        return self.fail(
            row, "missing_field", f"field {field!r} is missing or not a str (got {type(value).__name__})"
        )

    def process_batch(self, rows: list[Row]) -> list[Row | Failure]:
        s = self.settings
        src, cand = s.source_field, s.candidate_field
        results: list[Row | Failure] = []
        todo: list[Row] = []
        for row in rows:
            bad = next((f for f in (src, cand) if not isinstance(row.get(f), str)), None)
            if bad is None:
                todo.append(row)
                results.append(row)
            else:
                results.append(self._failure(row, bad, row.get(bad)))
        if not todo:
            return results

        index: dict[str, int] = {}
        for row in todo:
            for f in (src, cand):
                index.setdefault(row[f], len(index))
        vectors = l2_normalize(self.backend.embed("text", list(index)))
        dropped: set[int] = set()
        model = self.backend.describe()
        for row in todo:
            score = float(np.dot(vectors[index[row[src]]], vectors[index[row[cand]]]))
            if s.min_similarity is not None and score < s.min_similarity:
                self.stats["dropped:low_similarity"] += 1
                dropped.add(id(row))
                continue
            row["score_similarity"] = score
            record(
                row,
                self.name,
                score_similarity=score,
                min_similarity=s.min_similarity,
                source_field=src,
                candidate_field=cand,
                **model,
            )
            self.stats["scored"] += 1
        return [r for r in results if id(r) not in dropped]
