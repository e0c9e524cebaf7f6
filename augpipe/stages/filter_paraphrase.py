"""filter_paraphrase: keep a candidate paraphrase only if it is new, non-empty and close to its source.

Back-speech (METHODS §1.1) produces transcripts of synthesised speech. A transcript is kept as an
augmentation of ``text`` only when:

1. it is not empty (checked on the compared form, so "..." counts as empty when normalising);
2. it is not a copy of the source (``drop_copies``): a verbatim transcript is no augmentation;
3. its character edit ratio, Levenshtein distance / len(source), does not exceed ``max_edit_ratio``
   (the paper's 20 %): farther than that, the meaning may have drifted.

Comparisons use normalised text by default (see ``augpipe.methods.text_distance``). Kept rows get
``score_edit_ratio`` and the verdict's parameters in their lineage; each drop is counted by reason in
``stats`` (``dropped:empty``, ``dropped:copy``, ``dropped:edit_ratio``). A row whose source text is
empty cannot be judged and becomes a Failure (``empty_text``).
"""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from augpipe.methods.text_distance import edit_ratio, prepare
from augpipe.pipeline.families import FilterStage
from augpipe.pipeline.rows import Failure, Row, record
from augpipe.pipeline.stage import Resources, StageSettings


class FilterParaphraseSettings(StageSettings):
    max_edit_ratio: float = Field(
        default=0.2, ge=0, description="drop candidates whose edit distance / len(source) exceeds this"
    )
    drop_copies: bool = Field(default=True, description="drop candidates equal to the source")
    normalize: bool = Field(
        default=True, description="compare casefolded text without punctuation and extra whitespace"
    )


class FilterParaphrase(FilterStage):
    name: ClassVar[str] = "filter_paraphrase"
    consumes: ClassVar[frozenset[str]] = frozenset({"text", "transcript"})
    produces: ClassVar[frozenset[str]] = frozenset({"score_edit_ratio"})
    Settings: ClassVar[type[StageSettings]] = FilterParaphraseSettings
    resources: ClassVar[Resources] = Resources(cpus=0.25, gpus=0.0, memory_gb=0.25)
    batch_size: ClassVar[int] = 256
    cacheable: ClassVar[bool] = False

    settings: FilterParaphraseSettings

    def judge(self, row: Row) -> str | Failure | None:
        s = self.settings
        source, candidate = prepare(row.get("text") or "", row.get("transcript") or "", s.normalize)
        if not source.strip():
            return self.fail(
                row, "empty_text", "source text is empty: no edit budget to judge a paraphrase by"
            )
        if not candidate.strip():
            return "empty"
        if s.drop_copies and candidate == source:
            return "copy"
        ratio = edit_ratio(source, candidate)
        if ratio > s.max_edit_ratio:
            return "edit_ratio"
        row["score_edit_ratio"] = float(ratio)
        record(
            row,
            self.name,
            score_edit_ratio=float(ratio),
            max_edit_ratio=s.max_edit_ratio,
            drop_copies=s.drop_copies,
            normalize=s.normalize,
            unit="character Levenshtein / len(source)",
        )
        self.stats["kept"] += 1
        return None
