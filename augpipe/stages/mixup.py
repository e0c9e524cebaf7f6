"""mixup (baseline, METHODS §4): x̃ = λx_i + (1−λ)x_j, ỹ = λy_i + (1−λ)y_j, λ ~ Beta(α, α).

CMDA's baseline, with α = 0.25. Pass p = 0 … k−1 (k = ``multiple``) pairs every row of the shard with
a partner from a seeded permutation of the shard and draws λ (``augpipe.methods.mixup.mixup_batch``:
partner first, then λ; one λ per output with ``per_sample_lambda``, the default here because offline
outputs are samples of their own, or one λ per pass as in training loops). As in the reference a row
may draw itself (output = input; counted as ``self_pairs``). The partner is drawn within the shard, for
the reason ``interpolate`` gives (shards are the unit of work and resume, and are shuffled).

``field`` is ``image`` (pixel space: the partner is scaled and centre-cropped to the anchor's size, or
both to ``image_size``², the result rounded to uint8 and written as ``generated_image``), or any
embedding field such as ``text_embedding`` (written as ``generated_<field>``, float32).

Labels: the output keeps the anchor's label (it carries weight λ, which Beta(0.25, 0.25) makes close to 0
or 1 most of the time, but not always the larger); ``soft_label`` is ỹ as a JSON object {label: weight}
(null when the anchor or its partner has no label). Lineage: partner key, λ (also as ``contributors``
and ``weights``, the shape ``augpipe inspect --html`` shows), pass, seed, α.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
from pydantic import Field

from augpipe.methods.mixup import mix_pair, mixup_batch
from augpipe.pipeline.rows import Failure, FieldName, Row, derive_seed, fan_out, record
from augpipe.pipeline.stage import Resources, Stage, StageSettings
from augpipe.stages._fields import as_vector, is_image
from augpipe.stages._pools import (
    fit_image,
    label_matrix,
    row_ident,
    shard_seed,
    soft_label_json,
    sorted_rows,
    to_image,
)


class MixupSettings(StageSettings):
    field: FieldName = Field(default="image", description="image (pixel space) or an embedding field")
    output: FieldName | None = Field(default=None, description="default generated_image / generated_<field>")
    alpha: float = Field(default=0.25, gt=0, description="λ ~ Beta(α, α) (CMDA's baseline: 0.25)")
    per_sample_lambda: bool = Field(default=True, description="one λ per output; false: one per pass")
    image_size: int | None = Field(default=None, ge=8, description="square side; default the anchor's size")

    @property
    def output_field(self) -> str:
        return self.output or f"generated_{self.field}"


class Mixup(Stage):
    name: ClassVar[str] = "mixup"
    consumes: ClassVar[frozenset[str]] = frozenset({"image"})
    produces: ClassVar[frozenset[str]] = frozenset({"generated_image", "soft_label"})
    Settings: ClassVar[type[StageSettings]] = MixupSettings
    resources: ClassVar[Resources] = Resources(cpus=1.0, gpus=0.0, memory_gb=2.0)
    batch_size: ClassVar[int | None] = None  # the whole shard: partners are drawn within it
    reads_context: ClassVar[tuple[str, ...]] = ("multiple",)  # k outputs per pool

    settings: MixupSettings

    def inputs(self) -> frozenset[str]:
        return frozenset({self.settings.field})

    def outputs(self) -> frozenset[str]:
        return frozenset({self.settings.output_field, "soft_label"})

    def _mix_images(self, a: Any, b: Any, lam: float) -> Any:
        side = self.settings.image_size
        size = (side, side) if side is not None else a.size
        xa = np.asarray(fit_image(a, size), dtype=np.float32)
        xb = np.asarray(fit_image(b, size), dtype=np.float32)
        mixed, _ = mix_pair(xa, xb, np.zeros(1), np.zeros(1), lam)
        return to_image(mixed)

    def process_batch(self, rows: list[Row]) -> list[Row | Failure]:
        s = self.settings
        image = s.field == "image"
        failures: list[Row | Failure] = []
        pool: list[Row] = []
        dim: int | None = None
        for row in sorted_rows(rows):
            value = row.get(s.field)
            if image:
                ok = is_image(value)
            else:
                vector = as_vector(value)
                dim = dim if dim is not None or vector is None else vector.size
                ok = vector is not None and vector.size == dim
            if ok:
                pool.append(row)
            else:
                kind = "an image" if image else f"a finite vector of the shard's size ({dim})"
                failures.append(
                    self.fail(row, "missing_field", f"field {s.field!r} is missing or not {kind}")
                )
        if not pool:
            return failures
        classes, onehot, labelled = label_matrix(pool)
        # mixup_batch draws the partners, then λ, whatever x holds; images are mixed pair by pair below (at
        # the anchor's size, so they need no common size), so for them x is only a placeholder.
        x = np.zeros((len(pool), 1)) if image else np.stack([as_vector(r[s.field]) for r in pool])
        base = shard_seed(self.context.run_seed, pool, self.name)
        out: list[Row] = []
        for p in range(self.context.multiple):
            seed = derive_seed(base, "pass", self.name, (p,))
            draw = mixup_batch(x, onehot, seed, alpha=s.alpha, per_sample=s.per_sample_lambda)
            for i, row in enumerate(pool):
                j, lam = int(draw.partner[i]), float(draw.lam[i])
                child = fan_out(row, p)
                if image:
                    child[s.output_field] = self._mix_images(row[s.field], pool[j][s.field], lam)
                else:
                    child[s.output_field] = draw.x[i].astype(np.float32)
                both = labelled[i] and labelled[j]
                child["soft_label"] = soft_label_json(draw.y[i], classes) if both else None
                self.stats["self_pairs"] += int(i == j)
                record(
                    child,
                    self.name,
                    partner=row_ident(pool[j]),
                    lam=lam,
                    contributors=[row_ident(row), row_ident(pool[j])],
                    weights=[lam, 1.0 - lam],
                    alpha=s.alpha,
                    pass_index=p,
                    seed=seed,
                    field=s.field,
                    **({"image_size": s.image_size} if image and s.image_size else {}),
                )
                out.append(child)
        out.sort(key=lambda r: (r["key"], r["variant"]))
        self.stats["generated"] += len(out)
        return [*out, *failures]
