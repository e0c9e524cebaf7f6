"""Pool to k: keep the distinct candidates of each source and draw ``multiple`` of them uniformly.

The Back-Modality paper builds a pool of l*m*n candidates per source, filters it, then samples uniformly
to reach the augmentation multiple k. Candidate texts equal after normalisation are one candidate:
a pool of five copies of one paraphrase is one augmentation, not five. Output keys are numbered
``KEY-tag-0..k-1`` in a deterministic order so re-runs give the same keys.
"""

from __future__ import annotations

import numpy as np
from pydantic import Field

from augpipe.methods.text_distance import normalize_text
from augpipe.pipeline.rows import Failure, Row, candidate_id, derive_seed, record
from augpipe.pipeline.stage import Resources, Stage, StageSettings


class SelectSettings(StageSettings):
    dedupe_field: str | None = Field(
        default="transcript", description="field whose equal values count as one candidate (None: no dedupe)"
    )


class Select(Stage):
    name = "select"
    consumes = frozenset()
    produces = frozenset({"output_key"})
    Settings = SelectSettings
    resources = Resources(cpus=0.25)
    batch_size = 256
    cacheable = False
    reads_context = ("multiple", "tag")
    context_key = "list"
    settings: SelectSettings

    def inputs(self) -> frozenset[str]:
        return frozenset({self.settings.dedupe_field}) if self.settings.dedupe_field else frozenset()

    def _distinct(self, rows: list[Row]) -> list[Row]:
        """One candidate per distinct value; texts that differ only in case or punctuation are one."""
        field = self.settings.dedupe_field
        if field is None:
            return rows
        seen: dict[object, Row] = {}
        for row in rows:
            value = row.get(field)
            seen.setdefault(normalize_text(value) if isinstance(value, str) else value, row)
        return list(seen.values())

    def process_batch(self, rows: list[Row]) -> list[Row | Failure]:
        pools: dict[str, list[Row]] = {}
        for row in rows:
            pools.setdefault(row["key"], []).append(row)
        chosen: list[Row | Failure] = []
        for key, pool in pools.items():
            distinct = self._distinct(pool)
            seed = derive_seed(self.context.run_seed, key, self.name)
            take = min(self.context.multiple, len(distinct))
            picks = sorted(np.random.default_rng(seed).choice(len(distinct), size=take, replace=False))
            if take < self.context.multiple:
                self.stats["short_pools"] += 1
            self.stats["duplicates_removed"] += len(pool) - len(distinct)
            for number, index in enumerate(picks):
                row = dict(distinct[index])
                row["output_key"] = f"{key}-{self.context.tag}-{number}"
                record(
                    row,
                    self.name,
                    pool_size=len(pool),
                    distinct=len(distinct),
                    chosen=take,
                    candidate=candidate_id(row),
                    sampling_seed=seed,
                    k=self.context.multiple,
                )
                chosen.append(row)
        return chosen
