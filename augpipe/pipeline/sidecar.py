"""What a trainer reads about each sample: the typed Parquet columns and the tar's ``KEY.json``.

One schema per recipe, the same in every shard, so readers that join shards (pyarrow datasets, Hugging
Face ``datasets``, Ray Data) never meet two shapes of one column:

- ``key``, ``parent_key``, ``recipe`` (string), ``label`` (string, or int64 when the input's labels are
  integers), ``variant`` (list<int32>), ``stage_chain`` (list<string>);
- the recipe's ``output`` columns: text as string, ``*_embedding`` as fixed_size_list<float32>[d],
  ``cluster`` as int32, ``soft_label`` as list<struct<label: string, weight: float32>>;
- every ``score_*`` field the recipe's stages declare (float64);
- ``contributors`` (list<string>), ``weights`` (list<float32>) and ``seed`` (int64): the lineage facts a
  trainer filters on, from the stage that mixed or generated the sample; ``lineage`` keeps all of it as JSON.

**The training target.** A mixed sample (mixup, CMDA with soft labels) has a soft label; its hard ``label``
is the soft label's argmax (ties go to the anchor's own label, then to the first name in sorted order), so a
trainer that reads ``label`` alone trains on the class that dominates the sample. ``KEY.json`` in the tar
carries the same target (label, soft label, cluster) and the scores, for WebDataset-only trainers.

The Parquet file's key-value metadata names the recipe, its config hash and fingerprint, the augpipe
version and the shard (``augpipe.*`` keys). Not the run id: the same rows must give the same bytes, so a
shard redone by a later run (a repair, a resume) equals the original; the manifest's ``outputs[].run_id``
says which run wrote each file.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from augpipe.pipeline.rowcodec import json_default
from augpipe.pipeline.rows import Row

SOFT_LABEL = pa.list_(pa.struct([("label", pa.string()), ("weight", pa.float32())]))
MEDIA = frozenset({"image", "audio"})
TARGET_FIELDS = ("soft_label", "cluster")


@dataclass(frozen=True)
class OutputSpec:
    """How a recipe's rows become output samples: names, columns and the metadata every file carries."""

    recipe: str
    tag: str
    output: dict[str, str]
    scores: tuple[str, ...] = ()
    metadata: dict[str, str] = field(default_factory=dict)

    def score_names(self, rows: Iterable[Row]) -> list[str]:
        """The declared scores, plus any a stage wrote without declaring (never silently dropped)."""
        extra = {name for row in rows for name in row if name.startswith("score_")}
        return sorted(set(self.scores) | extra)


def soft_label_pairs(value: Any) -> list[dict[str, Any]] | None:
    """A soft label as [{label, weight}] sorted by label, from a {label: weight} dict, its JSON, or pairs."""
    if value is None:
        return None
    if isinstance(value, str):
        value = json.loads(value)
    if isinstance(value, dict):
        pairs = [{"label": str(k), "weight": float(v)} for k, v in value.items()]
    else:
        pairs = [{"label": str(p["label"]), "weight": float(p["weight"])} for p in value]
    return sorted(pairs, key=lambda p: p["label"])


def hard_label(pairs: list[dict[str, Any]] | None, own: Any) -> Any:
    """The soft label's argmax (ties: the row's own label, then the first name); ``own`` without one."""
    if not pairs:
        return own
    top = max(p["weight"] for p in pairs)
    leaders = [p["label"] for p in pairs if p["weight"] == top]
    return own if own is not None and str(own) in leaders else leaders[0]


def lineage_facts(lineage: dict[str, Any]) -> tuple[list[str] | None, list[float] | None, int | None]:
    """(contributors, weights, seed) of the stage that made the sample: the last one that recorded each."""
    contributors = weights = seed = None
    for record in lineage.values():
        if not isinstance(record, dict):
            continue
        if "contributors" in record and "weights" in record:
            contributors = [str(c) for c in record["contributors"]]
            weights = [float(w) for w in record["weights"]]
        if isinstance(record.get("seed"), int | np.integer):
            seed = int(record["seed"])
    return contributors, weights, seed


@dataclass
class Target:
    """One output row's training target, computed once for the tar and the sidecar alike."""

    label: Any
    soft_label: list[dict[str, Any]] | None
    cluster: int | None


def target_of(row: Row, spec: OutputSpec) -> Target:
    soft_field = spec.output.get("soft_label")
    pairs = soft_label_pairs(row.get(soft_field)) if soft_field else None
    cluster_field = spec.output.get("cluster")
    cluster = row.get(cluster_field) if cluster_field else None
    return Target(hard_label(pairs, row.get("label")), pairs, None if cluster is None else int(cluster))


def sample_json(row: Row, key: str, target: Target, spec: OutputSpec, scores: list[str]) -> dict[str, Any]:
    """``KEY.json``: identity, the training target and the scores; the same keys for every sample."""
    meta: dict[str, Any] = {
        "key": key,
        "parent_key": row["key"],
        "label": target.label,
        "recipe": spec.recipe,
    }
    if "soft_label" in spec.output:
        meta["soft_label"] = target.soft_label
    if "cluster" in spec.output:
        meta["cluster"] = target.cluster
    for name in scores:
        meta[name] = row.get(name)
    return meta


def label_counts(rows: list[Row], spec: OutputSpec) -> dict[str, int]:
    """Samples per hard label, and every class a soft label names (count 0 if never the argmax), so the
    manifest can keep the corpus's label vocabulary without reading the shards back."""
    counts: dict[str, int] = {}
    for row in rows:
        target = target_of(row, spec)
        for pair in target.soft_label or ():
            counts.setdefault(pair["label"], 0)
        if target.label is not None:
            counts[str(target.label)] = counts.get(str(target.label), 0) + 1
    return dict(sorted(counts.items()))


def _label_array(labels: list[Any]) -> pa.Array:
    present = [v for v in labels if v is not None]
    if present and all(isinstance(v, int | np.integer) and not isinstance(v, bool) for v in present):
        return pa.array(labels, type=pa.int64())
    return pa.array([None if v is None else str(v) for v in labels], type=pa.string())


def _embedding_array(values: list[Any]) -> pa.Array:
    width = len(next((v for v in values if v is not None), []))
    flat = [None if v is None else np.asarray(v, dtype=np.float32).tolist() for v in values]
    return pa.array(flat, type=pa.list_(pa.float32(), width))


def _plain_array(values: list[Any]) -> pa.Array:
    """An output column of no declared kind: its values' own type, or JSON text for anything nested."""
    present = [v for v in values if v is not None]
    if present and all(isinstance(v, bool) for v in present):
        return pa.array(values, type=pa.bool_())
    if present and all(isinstance(v, int | np.integer) and not isinstance(v, bool) for v in present):
        return pa.array(values, type=pa.int64())
    if present and all(isinstance(v, float | int | np.floating | np.integer) for v in present):
        return pa.array([None if v is None else float(v) for v in values], type=pa.float64())
    if all(isinstance(v, str) for v in present):
        return pa.array(values, type=pa.string())
    return pa.array(
        [None if v is None else json.dumps(v, sort_keys=True, default=json_default) for v in values],
        type=pa.string(),
    )


def sidecar_table(
    rows: list[Row], keys: list[str], targets: list[Target], spec: OutputSpec, shard_id: str
) -> pa.Table:
    """The typed Parquet sidecar of one output shard, with the run's metadata."""
    columns: dict[str, pa.Array] = {
        "key": pa.array(keys, type=pa.string()),
        "parent_key": pa.array([r["key"] for r in rows], type=pa.string()),
        "label": _label_array([t.label for t in targets]),
        "recipe": pa.array([spec.recipe] * len(rows), type=pa.string()),
        "variant": pa.array([list(r.get("variant", ())) for r in rows], type=pa.list_(pa.int32())),
        "stage_chain": pa.array([list(r.get("lineage", {})) for r in rows], type=pa.list_(pa.string())),
    }
    for name, source in spec.output.items():
        if name in MEDIA:
            continue
        if name == "soft_label":
            columns[name] = pa.array([t.soft_label for t in targets], type=SOFT_LABEL)
        elif name == "cluster":
            columns[name] = pa.array([t.cluster for t in targets], type=pa.int32())
        elif name.endswith("_embedding"):
            columns[name] = _embedding_array([r.get(source) for r in rows])
        else:
            columns[name] = _plain_array([r.get(source) for r in rows])
    for name in spec.score_names(rows):
        columns[name] = pa.array([r.get(name) for r in rows], type=pa.float64())
    facts = [lineage_facts(r.get("lineage", {})) for r in rows]
    columns["contributors"] = pa.array([f[0] for f in facts], type=pa.list_(pa.string()))
    columns["weights"] = pa.array([f[1] for f in facts], type=pa.list_(pa.float32()))
    columns["seed"] = pa.array([f[2] for f in facts], type=pa.int64())
    columns["lineage"] = pa.array(
        [json.dumps(r.get("lineage", {}), sort_keys=True, default=json_default) for r in rows],
        type=pa.string(),
    )
    metadata = {f"augpipe.{k}": v for k, v in {**spec.metadata, "shard": shard_id}.items()}
    return pa.table(columns).replace_schema_metadata(metadata)
