"""interpolate: CMDA generation, offline. Each teacher anchor gets ``multiple`` new student-space samples.

METHODS §2.1–2.2 and its offline driver, through ``augpipe.methods.cmda.iter_offline_batches``: pass
p = 0 … k−1 draws a seeded permutation of the pool's rows and cuts it into pools of ``pool_size`` (128,
the paper's mini-batch), or with ``pool: cluster`` into same-cluster pools; in each pool the weights are

  A_ij = |cos(t_i, ẑ_j)| (teacher latent of anchor i, student latent of member j),
  ``rownorm`` (default, = ``rownorm_cra``): A_ii := 1, A_ij ·= 1[c_i = c_j], W_ij = A_ij / Σ_k A_ik;
  ``reference_cra``: the same with the reference's broadcast bug (rows do not sum to 1);
  ``reference_cma``: what the reference actually runs, no cluster mask, the broadcast bug;

and the new sample is x_new,i = Σ_j W_ij x̂_j over the raw student samples x̂. Pass p gives variant
(p,), so the output keys are ``KEY-<tag>-p``.

Students:

- ``image``: x̂ are pixels. Every image of the shard is first brought to one size (``image_size`` square,
  or by default the size of the shard's first image in key order): scaled to cover it, centre-cropped,
  bicubic. The weighted sum is clipped to 0..255 and written as ``generated_image`` (PIL RGB).
- ``text``: raw sentences cannot be interpolated; as in the reference, whose "raw" text is a
  bert-as-service sentence vector, x̂ is a frozen sentence embedding (``student_field``, default
  ``text_embedding``) and the output is ``generated_text_embedding`` (float32, not re-normalised).

The latents come from ``latent_space`` (``student_latent``/``teacher_latent``); when both embeddings come
from one joint model (CLIP), skip that stage and set ``student_latent: image_embedding`` and
``teacher_latent: text_embedding``. Cluster ids come from ``cluster`` (``cluster_field``); set it to
null to run without the DCA mask (one cluster).

Labels (§2.2-j): the output inherits the anchor's label; ``soft_label: true`` adds ỹ_i = Σ_j W_ij
onehot(y_j), renormalised over the labelled contributors, as a JSON object {label: weight}.

**The pool is drawn within a shard.** Shards are the engine's unit of work, caching and resume: a pool
that spanned shards would tie every output shard to the whole corpus, so a crash or an incremental
run would recompute everything. The paper's pool is a shuffled mini-batch of 128; when the shard is a
random sample of the corpus (WebDataset and img2dataset shards are shuffled) a random subset of a shard
is a random subset of the corpus, so the per-shard pool is the paper's per-mini-batch pool. On a shard
sorted by class the pools are too. The stage therefore takes a whole shard per call (``batch_size``
None, the contract's whole-shard scope; a recipe's ``batch_size`` would cut the shard into smaller
pools). The permutation seed derives from the run seed and the shard's keys, so a resumed shard
reproduces its outputs. The last pool of a pass may be smaller than ``pool_size`` (a lone anchor
reproduces itself; counted as ``singleton_pools``). A
shard of at most ``pool_size`` rows (or, with ``pool: cluster``, a cluster that small) is one pool in
every pass, so an anchor's k outputs are the same image: the paper's pool assumes a corpus much larger
than 128. Such outputs are counted as ``repeated_pool_outputs``; lower ``pool_size`` for small shards.

Lineage per output: anchor key, contributing keys with their weights, weight_sum, the anchor's cluster
and M (from ``cluster``'s lineage), mode, pool, pool size, pass, pool index, permutation seed, image
size; the embedding models' ids are already in the row's lineage from ``embed``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import Field, model_validator

from augpipe.methods.cmda import EPS, CmdaAnchor, CmdaBatch, iter_offline_batches, resolve_mode, soft_labels
from augpipe.pipeline.rows import Failure, FieldName, Row, fan_out, record
from augpipe.pipeline.stage import Resources, Stage, StageSettings
from augpipe.stages._fields import as_vector, is_image
from augpipe.stages._pools import (
    class_index,
    fit_image,
    row_ident,
    shard_seed,
    soft_label_json,
    sorted_rows,
    to_image,
)


class InterpolateSettings(StageSettings):
    student: Literal["image", "text"] = Field(default="image", description="modality whose samples are mixed")
    teacher: Literal["image", "text"] = Field(default="text", description="modality whose latents weigh")
    student_latent: FieldName = Field(
        default="student_latent", description="ẑ: the student's common-space latent"
    )
    teacher_latent: FieldName = Field(
        default="teacher_latent", description="t: the teacher's common-space latent"
    )
    student_field: FieldName | None = Field(
        default=None, description="raw student samples x̂; default image, or text_embedding for text"
    )
    output: FieldName | None = Field(
        default=None, description="default generated_image / generated_<student_field>"
    )
    cluster_field: FieldName | None = Field(
        default="cluster", description="cluster ids for the DCA mask; null: none"
    )
    weight_mode: Literal["rownorm", "rownorm_cra", "reference_cra", "reference_cma"] = "rownorm"
    pool: Literal["batch", "cluster"] = Field(
        default="batch", description="mixed pools or same-cluster pools"
    )
    pool_size: int = Field(default=128, ge=1, description="samples per pool (the paper's mini-batch B)")
    soft_label: bool = Field(default=False, description="also write soft_label, {label: weight} as JSON")
    image_size: int | None = Field(
        default=None, ge=8, description="square side for image students; default the shard's first image"
    )

    @model_validator(mode="after")
    def _consistent(self) -> InterpolateSettings:
        if self.student == self.teacher:
            raise ValueError("student and teacher must be different modalities")
        if self.student == "text" and self.student_field in {"text", "transcript"}:
            raise ValueError(
                "text students are mixed as sentence embeddings (sentences cannot be interpolated); "
                "set student_field to an embedding field such as text_embedding"
            )
        if self.pool == "cluster" and (self.cluster_field is None or self.mode == "reference_cma"):
            raise ValueError(
                "pool: cluster needs cluster_field and a mode with the DCA mask (not reference_cma)"
            )
        return self

    @property
    def mode(self) -> str:
        return resolve_mode(self.weight_mode)

    @property
    def raw_field(self) -> str:
        return self.student_field or ("image" if self.student == "image" else "text_embedding")

    @property
    def output_field(self) -> str:
        return self.output or (
            "generated_image" if self.student == "image" else f"generated_{self.raw_field}"
        )

    @property
    def uses_clusters(self) -> bool:
        return self.cluster_field is not None and self.mode != "reference_cma"


class Interpolate(Stage):
    name: ClassVar[str] = "interpolate"
    consumes: ClassVar[frozenset[str]] = frozenset({"student_latent", "teacher_latent", "image", "cluster"})
    produces: ClassVar[frozenset[str]] = frozenset({"generated_image"})
    Settings: ClassVar[type[StageSettings]] = InterpolateSettings
    resources: ClassVar[Resources] = Resources(cpus=1.0, gpus=0.0, memory_gb=2.0)
    batch_size: ClassVar[int | None] = None  # the whole shard: pools are drawn within it
    reads_context: ClassVar[tuple[str, ...]] = ("multiple",)  # k outputs per pool

    settings: InterpolateSettings

    def inputs(self) -> frozenset[str]:
        s = self.settings
        fields = {s.student_latent, s.teacher_latent, s.raw_field}
        if s.uses_clusters:
            fields.add(s.cluster_field)
        return frozenset(fields)

    def outputs(self) -> frozenset[str]:
        s = self.settings
        return frozenset({s.output_field, *(["soft_label"] if s.soft_label else [])})

    def _check(self, row: Row, dims: dict[str, int]) -> tuple[str, str] | None:
        """(cause, message) why ``row`` cannot join a pool, or None; fixes dims from the first good row.

        A zero teacher latent has no direction: |cos| with it is undefined (0 by the ε guard), and in
        ``reference_cma`` its zero row sum would scale everyone's weight on its student by 1/ε.
        """
        s = self.settings
        for field in (s.student_latent, s.teacher_latent):
            vector = as_vector(row.get(field))
            if vector is None:
                return "missing_field", f"field {field!r} is missing or not a finite vector"
            if dims.setdefault(field, vector.size) != vector.size:
                return "missing_field", (
                    f"field {field!r} has {vector.size} values, the shard's others {dims[field]}"
                )
            if field == s.teacher_latent and not np.linalg.norm(vector) > EPS:
                return "zero_teacher_latent", f"field {field!r} is a zero vector: no cross-modal weights"
        raw = row.get(s.raw_field)
        if s.student == "image":
            if not is_image(raw):
                return "missing_field", f"field {s.raw_field!r} is missing or not an image"
        else:
            vector = as_vector(raw)
            if vector is None:
                return "missing_field", f"field {s.raw_field!r} is missing or not a finite vector"
            if dims.setdefault(s.raw_field, vector.size) != vector.size:
                return "missing_field", (
                    f"field {s.raw_field!r} has {vector.size} values, the shard's others {dims[s.raw_field]}"
                )
        if s.uses_clusters and not isinstance(row.get(s.cluster_field), int | np.integer):
            return "missing_field", f"field {s.cluster_field!r} is missing or not an int cluster id"
        return None

    def _image_size(self, rows: Sequence[Row]) -> tuple[int, int]:
        side = self.settings.image_size
        if side is not None:
            return side, side
        return rows[0][self.settings.raw_field].size

    def _students(self, pool_rows: list[Row]) -> tuple[Any, tuple[int, int] | None]:
        """The raw student samples x̂ (a fetch function for pixels, an array for embeddings) and the size
        images were brought to (None for embeddings)."""
        s = self.settings
        if s.student != "image":
            return np.stack([as_vector(r[s.raw_field]) for r in pool_rows]), None
        size = self._image_size(pool_rows)
        pixels = np.stack([np.asarray(fit_image(r[s.raw_field], size)) for r in pool_rows])

        def x_student(idx: np.ndarray) -> np.ndarray:
            return pixels[idx].astype(np.float32)

        return x_student, size

    def _info(self, seed: int, size: tuple[int, int] | None) -> dict[str, Any]:
        """Lineage every output of the shard shares."""
        s = self.settings
        return {
            "mode": s.mode,
            "pool": s.pool,
            "pool_size": s.pool_size,
            "permutation_seed": seed,
            "student": s.student,
            "teacher": s.teacher,
            "latents": [s.student_latent, s.teacher_latent],
            "label_policy": "anchor" + ("+soft" if s.soft_label else ""),
            **({"image_size": list(size)} if size is not None else {}),
        }

    def _soft(self, batch: CmdaBatch, class_idx: np.ndarray, n_classes: int) -> np.ndarray | None:
        """Each anchor's soft label over the pool's labelled contributors (None unless ``soft_label``)."""
        if not self.settings.soft_label:
            return None
        members = class_idx[batch.indices]
        labelled = members >= 0
        soft = np.zeros((len(batch.indices), n_classes), dtype=batch.weights.dtype)
        if labelled.any():
            soft = soft_labels(batch.weights[:, labelled], members[labelled], n_classes)
        return soft

    def _count_pool(self, batch: CmdaBatch, seen_pools: set[frozenset[int]]) -> None:
        self.stats["pools"] += 1
        self.stats["singleton_pools"] += int(len(batch.indices) == 1)
        pool_ids = frozenset(batch.indices.tolist())
        if pool_ids in seen_pools:  # an earlier pass drew this very pool: its outputs repeat
            self.stats["repeated_pool_outputs"] += len(pool_ids)
        seen_pools.add(pool_ids)

    def _split(self, rows: list[Row]) -> tuple[list[Row], list[Row | Failure]]:
        """The rows that can join a pool, in canonical order, and a Failure for each of the others."""
        pool_rows: list[Row] = []
        failures: list[Row | Failure] = []
        dims: dict[str, int] = {}
        for row in sorted_rows(rows):
            problem = self._check(row, dims)
            if problem:
                failures.append(self.fail(row, *problem))
            else:
                pool_rows.append(row)
        return pool_rows, failures

    def process_batch(self, rows: list[Row]) -> list[Row | Failure]:
        s = self.settings
        pool_rows, failures = self._split(rows)
        if not pool_rows:
            return failures
        raw, size = self._students(pool_rows)
        clusters = np.array([int(r[s.cluster_field]) for r in pool_rows]) if s.uses_clusters else None
        classes, class_idx = class_index(pool_rows) if s.soft_label else ([], np.zeros(0, np.int64))
        seed = shard_seed(self.context.run_seed, pool_rows, self.name)
        shard = _Shard(
            pool_rows, [row_ident(r) for r in pool_rows], clusters, classes, self._info(seed, size)
        )
        outputs: dict[tuple[int, int], Row] = {}
        seen_pools: set[frozenset[int]] = set()
        batches = iter_offline_batches(
            len(pool_rows),
            teacher=np.stack([as_vector(r[s.teacher_latent]) for r in pool_rows]),
            student=np.stack([as_vector(r[s.student_latent]) for r in pool_rows]),
            x_student=raw,
            cluster_labels=clusters,
            passes=self.context.multiple,
            batch_size=s.pool_size,
            seed=seed,
            mode=s.mode,
            pool=s.pool,
        )
        for batch in batches:
            self._count_pool(batch, seen_pools)
            soft = self._soft(batch, class_idx, len(classes))
            for r, anchor in enumerate(batch.anchors()):
                child = self._child(shard, batch, anchor, None if soft is None else soft[r])
                outputs[(anchor.anchor, anchor.pass_index)] = child
        self.stats["generated"] += len(outputs)
        return [*(outputs[k] for k in sorted(outputs)), *failures]

    def _child(self, shard: _Shard, batch: CmdaBatch, anchor: CmdaAnchor, soft: np.ndarray | None) -> Row:
        """The new sample of one anchor in one pass, with its lineage."""
        s = self.settings
        source = shard.rows[anchor.anchor]
        child = fan_out(source, anchor.pass_index)
        if s.student == "image":
            child[s.output_field] = to_image(anchor.x_new)
        else:
            child[s.output_field] = np.asarray(anchor.x_new, dtype=np.float32)
        if soft is not None:
            child["soft_label"] = soft_label_json(soft, shard.classes)
        # M only where the DCA mask was applied: reference_cma or no cluster_field ignore clusters.
        clusters = shard.clusters
        cluster_info = source.get("lineage", {}).get("cluster", {}) if clusters is not None else {}
        record(
            child,
            self.name,
            anchor=shard.idents[anchor.anchor],
            contributors=[shard.idents[j] for j in anchor.contributors],
            weights=[float(w) for w in anchor.weights],
            weight_sum=anchor.weight_sum,
            cluster=None if clusters is None else int(clusters[anchor.anchor]),
            m=cluster_info.get("m"),
            pass_index=anchor.pass_index,
            pool_index=anchor.batch_index,
            pool_members=len(batch.indices),
            **shard.info,
        )
        return child


@dataclass(frozen=True)
class _Shard:
    """What every output of one call shares: the pool rows, their lineage names, clusters, classes, info."""

    rows: list[Row]
    idents: list[str]
    clusters: np.ndarray | None
    classes: list[str]
    info: dict[str, Any]
