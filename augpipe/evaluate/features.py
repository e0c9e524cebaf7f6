"""Feature vectors for the three corpora of an evaluation, from one frozen encoder or from given columns.

Which features (``--features``):

- an embedding column every corpus carries is used as given: ``image_embedding`` / ``text_embedding``, or
  any column named on the command line. The augmented corpus may carry it as ``generated_<column>`` (a
  CMDA text student writes ``generated_text_embedding``), which is preferred there: it is the generated
  sample, while ``<column>`` may be its anchor's.
- otherwise the raw ``image`` or ``text`` of every corpus goes through the ``embed`` stage (default
  backends: the packaged EfficientNet-Lite0 for images, MiniLM for text; ``--set backend=clip`` etc.).
  A column that only some corpora carry is ignored then, so all vectors come from one space.
- ``auto`` tries, in order: image_embedding, text_embedding, image, text.

Where the encoder runs: in this process for small corpora (the stage's own check/setup/process_batch, one
unit at a time, media dropped once embedded), on Ray for large ones (a generated one-stage recipe through
``run_recipe`` into a cache folder, read back from its Parquet output: every core or GPU of the machine or
cluster, and an interrupted evaluation resumes). Large means more than ``RAY_THRESHOLD`` samples to embed,
about two minutes of single-process work on a 2-core box (measured: EfficientNet-Lite0 18 images/s,
MiniLM 830 sentences/s), where Ray's few seconds of start-up no longer matter.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pyarrow.parquet as pq

from augpipe.evaluate.corpus import Corpus, EvaluationError, open_corpus
from augpipe.pipeline.config import Recipe, StageEntry
from augpipe.pipeline.reader import ReadResult
from augpipe.pipeline.registry import build_stage
from augpipe.pipeline.rows import Failure
from augpipe.pipeline.stage import Stage, StageContext

MODALITIES = ("image", "text")
RAY_THRESHOLD: dict[str, int] = {"image": 2_000, "text": 50_000}
Engine = Literal["auto", "in-process", "ray"]


@dataclass(frozen=True)
class FeatureSource:
    """Where every corpus's vectors come from: a column per corpus role, or an encoder over a field."""

    modality: str
    columns: dict[str, str] = field(default_factory=dict)
    field: str | None = None
    notes: tuple[str, ...] = ()

    @property
    def encoder(self) -> bool:
        return self.field is not None


@dataclass
class _Stream:
    """A corpus being read: its size, the units already peeked at, and the rest."""

    role: str
    path: Path
    size: int
    peeked: list[ReadResult]
    rest: Iterator[ReadResult]

    @property
    def fields(self) -> set[str]:
        return {name for result in self.peeked for row in result.rows for name in row}

    def results(self) -> Iterator[ReadResult]:
        return itertools.chain(self.peeked, self.rest)


def _open(role: str, path: Path) -> _Stream:
    size, results = open_corpus(path)
    peeked: list[ReadResult] = []
    for result in results:
        peeked.append(result)
        if result.rows:
            break
    else:
        failed = sum(len(r.failures) for r in peeked)
        reason = f": all {failed} samples unreadable, e.g. {peeked[0].failures[0].message}" if failed else ""
        raise EvaluationError(f"{role} corpus {path} holds no samples{reason}")
    return _Stream(role, path, size, peeked, results)


def _column_of(stream: _Stream, column: str) -> str | None:
    candidates = [f"generated_{column}", column] if stream.role == "augmented" else [column]
    return next((c for c in candidates if c in stream.fields), None)


def _describe(stream: _Stream) -> str:
    kinds = [m for m in MODALITIES if m in stream.fields]
    kinds += sorted(f for f in stream.fields if f.endswith("_embedding"))
    return f"{stream.role} has {', '.join(kinds) or 'neither image nor text'}"


def _choose(choice: str, streams: list[_Stream]) -> FeatureSource:
    """The feature source for ``--features`` (image, text, auto or a column name); see the module doc."""
    named = choice not in {"auto", *MODALITIES}
    columns = (
        [choice] if named else [f"{m}_embedding" for m in (MODALITIES if choice == "auto" else [choice])]
    )
    for column in columns:
        found = {s.role: _column_of(s, column) for s in streams}
        if all(found.values()):
            modality = column.removesuffix("_embedding")
            return FeatureSource(modality=modality, columns={r: c for r, c in found.items() if c})
        if named:
            missing = next(role for role, c in found.items() if c is None)
            raise EvaluationError(
                f"--features {choice}: the {missing} corpus has no column {choice!r}"
                + (" (nor generated_" + choice + ")" if missing == "augmented" else "")
            )
    modalities = MODALITIES if choice == "auto" else (choice,)
    for modality in modalities:
        if all(modality in s.fields for s in streams):
            partial = [
                f"{s.role} carries {modality}_embedding but not every corpus does: all are embedded with "
                "the encoder, so the vectors share one space"
                for s in streams
                if _column_of(s, f"{modality}_embedding")
            ]
            return FeatureSource(modality=modality, field=modality, notes=tuple(partial))
    raise EvaluationError(
        f"the corpora share no {' or '.join(modalities)} features (mismatched modalities: "
        + "; ".join(_describe(s) for s in streams)
        + ")"
    )


# ------------------------------------------------------------------------------------------- reading


def _from_columns(stream: _Stream, column: str) -> Corpus:
    corpus = Corpus(stream.role, stream.path)
    for result in stream.results():
        corpus.unreadable.extend(result.failures)
        for row in result.rows:
            if row.get(column) is None:
                raise EvaluationError(f"{stream.role} sample {row['key']} has no {column!r} column value")
            corpus.add(row, row[column])
    return corpus


def _embed_stage(field_name: str, options: dict[str, Any]) -> Stage:
    entry = StageEntry(name="embed", stage="embed", options={**options, "field": field_name})
    return build_stage(entry, StageContext())


def _embedded_in_process(stream: _Stream, stage: Stage, output: str) -> Corpus:
    corpus = Corpus(stream.role, stream.path)
    for result in stream.results():
        corpus.unreadable.extend(result.failures)
        size = stage.effective_batch_size() or max(len(result.rows), 1)
        for start in range(0, len(result.rows), size):
            for row in stage.process_batch(result.rows[start : start + size]):
                if isinstance(row, Failure):
                    raise EvaluationError(f"{stream.role} sample {row.key}: {row.message}")
                corpus.add(row, row[output])
        result.rows.clear()
    return corpus


def _cache_folder(root: Path, stream: _Stream, options: dict[str, Any]) -> Path:
    """A cache folder per corpus content and encoder settings, so a changed corpus is embedded afresh."""
    files = (
        [stream.path] if stream.path.is_file() else sorted(p for p in stream.path.iterdir() if p.is_file())
    )
    identity = [str(stream.path.resolve()), options] + [
        [p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files
    ]
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return root / f"{stream.role}-{digest}"


def _embedded_on_ray(
    stream: _Stream, field_name: str, options: dict[str, Any], output: str, cache: Path, address: str | None
) -> Corpus:
    from augpipe.pipeline.manifest import read_manifest
    from augpipe.pipeline.run import run_recipe

    recipe = Recipe(
        name="evaluate-embed",
        description="augpipe evaluate: the embed stage alone, its vectors read back by key",
        tag="ev",
        multiple=1,
        input=[field_name],
        output={output: output},
        stages=[StageEntry(name="embed", stage="embed", options={**options, "field": field_name})],
    )
    result = run_recipe(recipe, stream.path, cache, address=address, progress=False)
    failures = result.manifest["failures"]
    if failures["total"]:
        first = failures["examples"][0]
        raise EvaluationError(
            f"{stream.role} corpus {stream.path}: {failures['total']} samples could not be embedded, "
            f"e.g. {first['key']}: {first['message']}"
        )
    vectors: dict[str, Any] = {}
    for entry in read_manifest(cache)["outputs"]:
        if entry["path"].endswith(".parquet"):
            table = pq.read_table(cache / entry["path"], columns=["key", output])
            vectors.update(zip(table["key"].to_pylist(), table[output].to_pylist(), strict=True))
    corpus = Corpus(stream.role, stream.path)
    for read in stream.results():
        corpus.unreadable.extend(read.failures)
        for row in read.rows:
            if row["key"] not in vectors:
                raise EvaluationError(
                    f"{stream.role} sample {row['key']} is missing from the embeddings in {cache}"
                )
            corpus.add(row, vectors[row["key"]])
        read.rows.clear()
    return corpus


def _engine_for(engine: Engine, modality: str, samples: int) -> str:
    if engine != "auto":
        return engine
    return "ray" if samples > RAY_THRESHOLD[modality] else "in-process"


def load_corpora(
    paths: dict[str, Path],
    features: str = "auto",
    embed_options: dict[str, Any] | None = None,
    engine: Engine = "auto",
    cache_root: Path | None = None,
    address: str | None = None,
) -> tuple[dict[str, Corpus], dict[str, Any]]:
    """The corpora named in ``paths`` (role -> path) with their features, and what made the features."""
    options = dict(embed_options or {})
    streams = [_open(role, path) for role, path in paths.items()]
    source = _choose(features, streams)
    info: dict[str, Any] = {"modality": source.modality, "notes": list(source.notes)}
    if not source.encoder:
        info.update(source="column", columns=source.columns)
        corpora = {s.role: _from_columns(s, source.columns[s.role]) for s in streams}
    else:
        assert source.field is not None
        stage = _embed_stage(source.field, options)
        stage.check()
        output = f"{source.field}_embedding"
        samples = sum(s.size for s in streams)
        chosen = _engine_for(engine, source.modality, samples)
        info.update(source="encoder", field=source.field, engine=chosen, **stage.describe())
        info.pop("stage", None)
        info.pop("type", None)
        if chosen == "ray":
            if cache_root is None:
                raise EvaluationError("embedding on Ray needs a cache folder (the augmented corpus folder)")
            corpora = {
                s.role: _embedded_on_ray(
                    s, source.field, options, output, _cache_folder(cache_root, s, options), address
                )
                for s in streams
            }
        else:
            # As on Ray workers (the executor's WORKER_ENV): no model-loading progress bars in the report.
            os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
            stage.setup()
            corpora = {s.role: _embedded_in_process(s, stage, output) for s in streams}
    info["dim"] = int(next(iter(corpora.values())).features.shape[1])
    widths = {role: c.features.shape[1] for role, c in corpora.items()}
    if len(set(widths.values())) > 1:
        raise EvaluationError(
            "feature widths differ between corpora ("
            + ", ".join(f"{role} {w}" for role, w in widths.items())
            + "): the features must come from one encoder"
        )
    return corpora, info
