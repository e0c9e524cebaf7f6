"""geodesic_mixup (baseline, METHODS §4 m²-Mix): mixup on the unit hypersphere of an embedding space.

mix_λ(a, b) = [a·sin(λθ) + b·sin((1−λ)θ)] / sin θ, θ = arccos(a·b), with λ weighting a (m²-Mix's
``sph_inter``), through ``augpipe.methods.mixup.geodesic_mix``: the cosine is clipped, a near-zero sin θ
falls back to a normalised lerp (so a = b gives a, never NaN), and antipodal pairs, whose geodesic is
undefined, are flagged. Inputs are L2-normalised first; the outputs are unit vectors.

Two pairings (``between``):

- ``samples`` (default): uni-modal geodesic mixup (m³-Mix's V-/L-Mix) of one embedding ``field``, e.g.
  ``image_embedding``. Pass p = 0 … k−1 pairs each row with a partner from a seeded permutation of the
  shard and draws λ ~ Beta(α, α) (``mixup_batch``'s draw, so partner and λ follow the ``mixup`` stage);
  the anchor's label is kept and ``soft_label`` is λ·y_i + (1−λ)·y_j as JSON. Works in any embedding
  space, joint or not, and is the default because it makes new labelled samples, as mixup does.
- ``modalities``: m²-Mix proper, the geodesic mix of one pair's image and text embeddings
  (``image_field``, ``text_field``), λ ~ Beta(α, α) per output weighting the image. The two must live in
  one space of one dimension: CLIP embeddings, or ``latent_space``'s ``student_latent`` and
  ``teacher_latent``. The output is a new point between the two views of the same sample, so the label
  is the sample's own and there is no soft label.

α defaults to 0.5 (m²-Mix's β2 in ``scripts/m2mix.sh``). ``on_antipodal``: ``keep`` (default) writes the
fallback vector and flags it in the lineage; ``drop`` leaves the output out (counted as
``antipodal_dropped``). Output: ``generated_<field>`` (samples) or ``generated_embedding`` (modalities),
float32. Lineage: partner key (samples), λ, θ, the antipodal flag, pass, seed.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import Field

from augpipe.methods.mixup import geodesic_mix, mixup_batch
from augpipe.pipeline.rows import Failure, FieldName, Row, derive_seed, fan_out, record
from augpipe.pipeline.stage import Resources, Stage, StageSettings
from augpipe.stages._fields import as_vector
from augpipe.stages._pools import label_matrix, row_ident, shard_seed, soft_label_json, sorted_rows

NORM_EPS = 1e-12


class GeodesicMixupSettings(StageSettings):
    between: Literal["samples", "modalities"] = Field(
        default="samples", description="samples: two rows' `field`; modalities: one row's image and text"
    )
    field: FieldName = Field(default="image_embedding", description="embedding mixed between samples")
    image_field: FieldName = Field(default="image_embedding", description="a in mix_λ(a, b) for modalities")
    text_field: FieldName = Field(default="text_embedding", description="b in mix_λ(a, b) for modalities")
    output: FieldName | None = Field(
        default=None, description="default generated_<field> / generated_embedding"
    )
    alpha: float = Field(default=0.5, gt=0, description="λ ~ Beta(α, α) (m²-Mix β2: 0.5)")
    per_sample_lambda: bool = Field(default=True, description="one λ per output; false: one per pass")
    on_antipodal: Literal["keep", "drop"] = "keep"

    @property
    def sources(self) -> tuple[str, ...]:
        return (self.field,) if self.between == "samples" else (self.image_field, self.text_field)

    @property
    def output_field(self) -> str:
        if self.output:
            return self.output
        return f"generated_{self.field}" if self.between == "samples" else "generated_embedding"


def unit(vector: np.ndarray) -> np.ndarray | None:
    norm = float(np.linalg.norm(vector))
    return None if norm < NORM_EPS else (vector / norm).astype(np.float32)


class GeodesicMixup(Stage):
    name: ClassVar[str] = "geodesic_mixup"
    consumes: ClassVar[frozenset[str]] = frozenset({"image_embedding"})
    produces: ClassVar[frozenset[str]] = frozenset({"generated_image_embedding"})
    Settings: ClassVar[type[StageSettings]] = GeodesicMixupSettings
    resources: ClassVar[Resources] = Resources(cpus=0.5, gpus=0.0, memory_gb=1.0)
    batch_size: ClassVar[int | None] = None  # the whole shard: partners are drawn within it
    reads_context: ClassVar[tuple[str, ...]] = ("multiple",)  # k outputs per pool

    settings: GeodesicMixupSettings

    def inputs(self) -> frozenset[str]:
        return frozenset(self.settings.sources)

    def outputs(self) -> frozenset[str]:
        extra = {"soft_label"} if self.settings.between == "samples" else set()
        return frozenset({self.settings.output_field, *extra})

    def _vectors(self, row: Row, dims: dict[str, int]) -> tuple[list[np.ndarray], str | None]:
        vectors = []
        for field in self.settings.sources:
            vector = as_vector(row.get(field))
            if vector is None:
                return [], f"field {field!r} is missing or not a finite vector"
            if dims.setdefault(field, vector.size) != vector.size:
                return [], f"field {field!r} has {vector.size} values, the shard's others {dims[field]}"
            normed = unit(vector)
            if normed is None:
                return [], f"field {field!r} is a zero vector (no direction on the sphere)"
            vectors.append(normed)
        if len(vectors) == 2 and vectors[0].size != vectors[1].size:
            s = self.settings
            return [], (
                f"{s.image_field} ({vectors[0].size}-d) and {s.text_field} ({vectors[1].size}-d) are not in "
                "one space: m²-Mix needs a joint embedding (CLIP, or latent_space's latents)"
            )
        return vectors, None

    def _draw(self, arrays: list[np.ndarray], onehot: np.ndarray, seed: int) -> tuple[Any, Any, Any, Any]:
        """One pass's partners (None between modalities), λ, soft labels (None between modalities) and
        the geodesic mixes."""
        s = self.settings
        if s.between == "samples":
            draw = mixup_batch(arrays[0], onehot, seed, alpha=s.alpha, per_sample=s.per_sample_lambda)
            return draw.partner, draw.lam, draw.y, geodesic_mix(arrays[0], arrays[0][draw.partner], draw.lam)
        n = arrays[0].shape[0]
        rng = np.random.default_rng(seed)
        lam = rng.beta(s.alpha, s.alpha, size=n if s.per_sample_lambda else None)
        lam = np.broadcast_to(np.asarray(lam, dtype=np.float64), (n,))
        return None, lam, None, geodesic_mix(arrays[0], arrays[1], lam)

    def process_batch(self, rows: list[Row]) -> list[Row | Failure]:
        s = self.settings
        failures: list[Row | Failure] = []
        pool: list[Row] = []
        columns: list[list[np.ndarray]] = [[] for _ in s.sources]
        dims: dict[str, int] = {}
        for row in sorted_rows(rows):
            vectors, problem = self._vectors(row, dims)
            if problem:
                failures.append(self.fail(row, "missing_field", problem))
                continue
            pool.append(row)
            for column, vector in zip(columns, vectors, strict=True):
                column.append(vector)
        if not pool:
            return failures
        arrays = [np.stack(c) for c in columns]
        base = shard_seed(self.context.run_seed, pool, self.name)
        classes, onehot, labelled = label_matrix(pool)
        out: list[Row] = []
        for p in range(self.context.multiple):
            seed = derive_seed(base, "pass", self.name, (p,))
            partner, lam, soft, mix = self._draw(arrays, onehot, seed)
            for i, row in enumerate(pool):
                antipodal = bool(mix.antipodal[i])
                self.stats["antipodal"] += int(antipodal)
                if antipodal and s.on_antipodal == "drop":
                    self.stats["antipodal_dropped"] += 1
                    continue
                child = fan_out(row, p)
                child[s.output_field] = np.asarray(mix.mixed[i], dtype=np.float32)
                pairing: dict[str, object] = {"between": s.between, "fields": list(s.sources)}
                if partner is not None:
                    j = int(partner[i])
                    pairing["partner"] = row_ident(pool[j])
                    # The endpoints and λ (a slerp weight, not a linear one) in the report's shape.
                    pairing["contributors"] = [row_ident(row), row_ident(pool[j])]
                    pairing["weights"] = [float(lam[i]), 1.0 - float(lam[i])]
                    both = labelled[i] and labelled[j]
                    child["soft_label"] = soft_label_json(soft[i], classes) if both else None
                    self.stats["self_pairs"] += int(i == j)
                record(
                    child,
                    self.name,
                    **pairing,
                    lam=float(lam[i]),
                    theta=float(mix.theta[i]),
                    antipodal=antipodal,
                    alpha=s.alpha,
                    pass_index=p,
                    seed=seed,
                )
                out.append(child)
        out.sort(key=lambda r: (r["key"], r["variant"]))
        self.stats["generated"] += len(out)
        return [*out, *failures]
