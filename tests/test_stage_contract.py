"""One contract, every stage × backend (img2dataset's one test over every distributor).

Each registered stage, under each of its backends, is built from settings, set up (fitted first when it is
a global stage) and checked for what the engine relies on: unknown settings are refused by name; an empty
batch gives nothing; outputs stay within the row's fields plus the declared outputs; a missing input becomes
a named Failure; the fingerprint is stable, and moves with every context value the stage reads.

Backends that need a model run on miniature random models: the `tiny` backends, and the real backends
loading the same miniature models saved to disk. Only a backend whose optional library is absent is skipped.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError

from augpipe.pipeline.config import ConfigError, StageEntry
from augpipe.pipeline.execution import KEPT_ALWAYS
from augpipe.pipeline.families import FilterStage, GeneratorStage
from augpipe.pipeline.registry import build_stage, stage_class, stage_names
from augpipe.pipeline.rows import RESERVED_FIELDS, Failure, Row
from augpipe.pipeline.stage import Stage, StageContext, StageSettings
from augpipe.pipeline.worker import batches_by_key

CONTEXT = StageContext(run_seed=3, recipe="contract", multiple=2, tag="aug")
FIT_ROWS = 12
BATCH_ROWS = 4

# Options that make a stage cheap, or valid under a backend (image towers embed the image field).
STAGE_OPTIONS: dict[str, dict[str, Any]] = {
    "caption": {"max_new_tokens": 4, "variants": 3},  # a random model's greedy caption may be empty
    "cluster": {"pca_dims": 2, "m_max": 2, "seed": 1},
    "generate_image": {"steps": 2, "height": 32, "width": 32},
    "interpolate": {"pool_size": 4},
    "latent_space": {"epochs": 2, "dim": 4, "hidden": 8, "train_batch_size": 8},
    "perturb_audio": {"variants": 2},
    "score_invariance": {"label_names": ["bird", "cat"]},
    "synthesize_speech": {"variants": 2},
    "transcribe": {"variants": 2, "beam_size": 1, "max_new_tokens": 4},
    "translate": {"hidden": 16, "layers": 2, "steps": 2, "epochs": 1, "train_batch_size": 8, "holdout": 0.2},
}
BACKEND_OPTIONS: dict[tuple[str, str], dict[str, Any]] = {
    ("embed", "efficientnet_lite0"): {"field": "image"},
}


def _save_blip(path: Path) -> None:
    from augpipe.stages.caption import build_tiny_blip

    model, processor = build_tiny_blip(0)
    model.save_pretrained(path)
    processor.save_pretrained(path)


def _save_blip2(path: Path) -> None:
    from tests.test_image_stages import build_tiny_blip2

    build_tiny_blip2(path)


def _save_clip(path: Path) -> None:
    from augpipe.stages.embed import TinyClipBackend

    tokenizer = TinyClipBackend.build_tokenizer()
    TinyClipBackend.build_model(len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    TinyClipBackend.build_image_processor().save_pretrained(path)


def _save_sd(path: Path) -> None:
    from augpipe.stages.generate_image import build_tiny_sd

    build_tiny_sd(0).save_pretrained(path, safe_serialization=True)


def _save_whisper(path: Path) -> None:
    import torch

    from augpipe.stages.transcribe import build_tiny_whisper

    model = build_tiny_whisper(0)
    path.mkdir(parents=True, exist_ok=True)
    torch.save({"dims": model.dims.__dict__, "model_state_dict": model.state_dict()}, path / "tiny.pt")


# Real backends whose default model is not shipped: each loads a miniature model saved by the writer.
SAVED_MODELS = {
    "blip": (_save_blip, ""),
    "hf": (_save_blip, ""),
    "blip2": (_save_blip2, ""),
    "clip": (_save_clip, ""),
    "diffusers": (_save_sd, ""),
    "whisper": (_save_whisper, "tiny.pt"),
}
OPTIONAL_LIBRARIES = {("synthesize_speech", "coqui"): "TTS"}


def cases() -> list[Any]:
    out = []
    for name in stage_names():
        cls = stage_class(name)
        for backend in sorted(cls.backends) or [None]:
            out.append(pytest.param(name, backend, id=f"{name}-{backend}" if backend else name))
    return out


CASES = cases()


@dataclass(frozen=True)
class ReadingContext(StageContext):
    """A StageContext that notes which of its fields were read."""

    reads: set[str] = dataclasses.field(default_factory=set, compare=False, repr=False)

    def __getattribute__(self, name: str) -> Any:
        if name in CONTEXT_FIELDS:
            object.__getattribute__(self, "reads").add(name)
        return object.__getattribute__(self, name)


CONTEXT_FIELDS = frozenset(f.name for f in dataclasses.fields(StageContext))


def field_value(field: str, rng: np.random.Generator, i: int) -> Any:
    """A plausible value for a row field, by the field's name."""
    if "image" in field and not field.endswith("embedding"):
        return Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    if field == "audio":
        return speech()[0].copy()
    if field == "sample_rate":
        return speech()[1]
    if field.endswith(("embedding", "latent")):
        return rng.standard_normal(8).astype(np.float32)
    if field == "cluster":
        return i % 2
    if field == "label":
        return ["bird", "cat"][i % 2]
    return f"a small {['red', 'blue', 'green'][i % 3]} bird number {i} sits on the {field}"


@functools.cache
def speech() -> tuple[np.ndarray, int]:
    """One spoken sentence (eSpeak, deterministic), so every recogniser has words to find."""
    stage = build("synthesize_speech", {"backend": "espeak"})
    stage.setup()
    (row,) = stage.process_batch([{"key": "s", "variant": (), "lineage": {}, "text": "the bird sings"}])
    return row["audio"], row["sample_rate"]


def make_rows(stage: Stage, n: int, seed: int = 0) -> list[dict[str, Any]]:
    rng = np.random.default_rng(seed)
    fields = sorted(stage.inputs() | stage.fit_fields() | {"label"})
    return [
        {
            "key": f"k{i:03d}",
            "variant": (),
            "lineage": {},
            "passenger": i,
            **{f: field_value(f, rng, i) for f in fields},
        }
        for i in range(n)
    ]


def options_for(name: str, backend: str | None, models: Path) -> dict[str, Any]:
    options = {**STAGE_OPTIONS.get(name, {}), **BACKEND_OPTIONS.get((name, backend), {})}
    if backend is None:
        return options
    library = OPTIONAL_LIBRARIES.get((name, backend))
    if library and importlib.util.find_spec(library) is None:
        pytest.skip(f"{name} backend {backend!r} needs the optional library {library!r}, absent here")
    options["backend"] = backend
    if backend in SAVED_MODELS:
        write, inner = SAVED_MODELS[backend]
        folder = models / backend
        if not folder.exists():
            write(folder)
        options["model"] = str(folder / inner) if inner else str(folder)
    return options


def build(name: str, options: dict[str, Any], context: StageContext = CONTEXT) -> Stage:
    cls = stage_class(name)
    stage = cls(cls.settings_from(options), context)
    stage.name = name
    stage.check()  # as the plan does before fingerprinting: check() resolves the model's revision
    return stage


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


_READY: dict[tuple[str, str | None], tuple[Stage, ReadingContext, dict[str, Any], frozenset[str]]] = {}


@pytest.fixture()
def ready(request, models, tmp_path_factory):
    """(stage set up and fitted, its reading context, its options, the context fields read so far), built
    once per stage × backend."""
    name, backend = request.node.callspec.params["name"], request.node.callspec.params["backend"]
    options = options_for(name, backend, models)
    if (name, backend) not in _READY:
        context = ReadingContext(**dataclasses.asdict(CONTEXT))
        stage = build(name, options, context)
        stage.setup()
        if stage.needs_fit:
            rows = make_rows(stage, FIT_ROWS, seed=1)
            columns = {f: [r.get(f) for r in rows] for f in ("key", *sorted(stage.fit_fields()))}
            artifacts = tmp_path_factory.mktemp(f"fit-{name}")
            stage.fit(columns, artifacts)
            stage.load_fitted(artifacts)
        _READY[name, backend] = (stage, context, options, frozenset(context.reads))
    return _READY[name, backend]


@pytest.mark.parametrize(("name", "backend"), CASES)
def test_settings_refuse_unknown_keys_by_name(name, backend):
    cls = stage_class(name)
    options = {"backend": backend} if backend else {}
    with pytest.raises(ValidationError, match="no_such_option"):
        cls.settings_from({**options, "no_such_option": 1})
    with pytest.raises(ConfigError, match="no_such_option"):
        build_stage(StageEntry(name=name, stage=name, options={**options, "no_such_option": 1}), CONTEXT)


@pytest.mark.parametrize(("name", "backend"), CASES)
def test_empty_batch_gives_nothing(name, backend, ready):
    stage = ready[0]
    assert stage.process_batch([]) == []


@pytest.mark.parametrize(("name", "backend"), CASES)
def test_outputs_stay_within_declared_fields(name, backend, ready):
    stage = ready[0]
    rows = make_rows(stage, BATCH_ROWS)
    allowed = set(rows[0]) | stage.outputs() | RESERVED_FIELDS
    out = stage.process_batch(rows)
    produced = [r for r in out if isinstance(r, dict)]
    assert produced, f"{name}: no row survived: {[r for r in out if isinstance(r, Failure)]}"
    for row in produced:
        assert set(row) <= allowed, f"{name} wrote undeclared fields {sorted(set(row) - allowed)}"
        assert row["passenger"] == int(row["key"][1:]), "fields the stage does not own pass through"


@pytest.mark.parametrize(("name", "backend"), CASES)
def test_a_stage_that_keeps_rows_gives_each_row_back_once_with_only_its_outputs_changed(name, backend, ready):
    """The engine skips a ``keeps_rows`` step when drawing a later fit's sample: this is what makes that
    safe. A stage that fans out or filters must not claim it."""
    stage = ready[0]
    rows = make_rows(stage, BATCH_ROWS)
    before = [dict(row) for row in rows]
    out = stage.process_batch(rows)
    kept = [r for r in out if isinstance(r, dict)]
    owned = stage.outputs() | RESERVED_FIELDS
    keeps = [r["key"] for r in kept] == [r["key"] for r in before] and all(
        all(new.get(f) is value for f, value in old.items() if f not in owned)
        for new, old in zip(kept, before, strict=True)
    )
    assert stage.keeps_rows == (name in KEEP_ROWS)
    if stage.keeps_rows:
        assert keeps, f"{name} declares keeps_rows but changed, dropped or added rows"


class ReadRecorder(dict):
    """A row that notes every field a stage reads from it."""

    def __init__(self, row: Row, reads: set[str]) -> None:
        super().__init__(row)
        self.reads = reads

    def __getitem__(self, name: str) -> Any:
        self.reads.add(name)
        return super().__getitem__(name)

    def get(self, name: str, default: Any = None) -> Any:
        self.reads.add(name)
        return super().get(name, default)

    def __contains__(self, name: object) -> bool:
        self.reads.add(str(name))
        return super().__contains__(name)


@pytest.mark.parametrize(("name", "backend"), CASES)
def test_a_stage_reads_only_the_fields_it_declares(name, backend, ready):
    """The engine drops fields no later stage declares (``execution.dropped_fields``) before rows move
    on: a stage reading an undeclared field would silently see it vanish."""
    stage = ready[0]
    reads: set[str] = set()
    rows = [ReadRecorder(row, reads) for row in make_rows(stage, BATCH_ROWS)]
    stage.process_batch(rows)
    undeclared = reads - stage.inputs() - stage.fit_fields() - stage.outputs() - KEPT_ALWAYS
    assert not undeclared, f"{name} reads {sorted(undeclared)} without declaring them in inputs()"


# The stages that keep their rows; declaring it lets a fit pass skip them.
KEEP_ROWS = {"embed", "latent_space", "cluster", "translate"}


# Inputs a stage may do without, by design: the row is then kept or dropped (and counted), not failed.
OPTIONAL_INPUTS = {
    ("drop_duplicates", "image"): "without its source a candidate can only copy a sibling",
    ("filter_paraphrase", "transcript"): "no transcript is an empty one: dropped, counted as dropped:empty",
    ("select", "transcript"): "a candidate without the field is distinct from every other",
}


@pytest.mark.parametrize(("name", "backend"), CASES)
def test_a_missing_input_is_a_named_failure(name, backend, ready):
    stage = ready[0]
    for field in sorted(stage.inputs()):
        rows = make_rows(stage, BATCH_ROWS)
        del rows[1][field]
        out = stage.process_batch(rows)
        if (name, field) in OPTIONAL_INPUTS:
            assert not [r for r in out if isinstance(r, Failure)], OPTIONAL_INPUTS[name, field]
            continue
        failures = [r for r in out if isinstance(r, Failure) and r.key == "k001"]
        assert failures, f"{name}: a row without {field!r} gave no Failure"
        assert all(f.stage == name and f.cause and f.message for f in failures)
        assert not [r for r in out if isinstance(r, dict) and r["key"] == "k001"]


@pytest.mark.parametrize(("name", "backend"), CASES)
def test_fingerprint_is_stable_and_follows_the_context_it_reads(name, backend, ready):
    stage, context, options, setup_reads = ready
    assert build(name, options).fingerprint() == build(name, options).fingerprint()
    # The run seed always enters the key; every other context value the stage read must too.
    context.reads.clear()
    stage.process_batch(make_rows(stage, BATCH_ROWS))
    reads = setup_reads | context.reads
    undeclared = reads - {"run_seed"} - set(stage.reads_context)
    assert not undeclared, f"{name} reads context {sorted(undeclared)} without declaring it in reads_context"
    changed = {"run_seed": 4, "recipe": "other", "multiple": 3, "tag": "alt"}
    for field in sorted(reads | {"run_seed"}):
        other = dataclasses.replace(CONTEXT, **{field: changed[field]})
        assert build(name, options, other).fingerprint() != stage.fingerprint(), (
            f"{name} reads context.{field} but its fingerprint ignores it"
        )
    unread = {f: changed[f] for f in CONTEXT_FIELDS - reads - {"run_seed"}}
    assert build(name, options, dataclasses.replace(CONTEXT, **unread)).fingerprint() == stage.fingerprint()


@pytest.mark.parametrize(
    ("name", "legacy"),
    [
        ("mixup", lambda base, c: f"{base}|multiple={c.multiple}"),
        ("geodesic_mixup", lambda base, c: f"{base}|multiple={c.multiple}"),
        ("interpolate", lambda base, c: f"{base}|multiple={c.multiple}"),
        ("select", lambda base, c: base + json.dumps([c.multiple, c.tag])),
    ],
)
def test_declared_context_gives_the_keys_stages_once_wrote_by_hand(name, legacy, monkeypatch):
    """Existing caches and outputs stay valid: the declaration hashes what the old overrides hashed."""
    declared = build(name, {}).fingerprint()
    monkeypatch.setattr(stage_class(name), "reads_context", ())
    base = build(name, {}).fingerprint()
    assert declared == hashlib.sha256(legacy(base, CONTEXT).encode()).hexdigest()[:16]


def test_reads_context_names_only_context_fields():
    for bad in (("multiplee",), ("run_seed",)):
        with pytest.raises(TypeError, match="not StageContext fields"):
            type("Bad", (Stage,), {"name": "bad", "reads_context": bad})


# ------------------------------------------------------------------------------------ family bases


GENERATORS = ("synthesize_speech", "transcribe", "caption", "generate_image")
FILTERS = ("filter_paraphrase", "filter_images")
WHOLE_SHARD = ("interpolate", "mixup", "geodesic_mixup")


def test_stages_of_a_family_inherit_its_loop():
    for name in GENERATORS:
        cls = stage_class(name)
        assert issubclass(cls, GeneratorStage) and "process_batch" not in vars(cls), name
    for name in FILTERS:
        cls = stage_class(name)
        assert issubclass(cls, FilterStage) and "process_batch" not in vars(cls), name


@dataclass(frozen=True)
class _ToyJob:
    child: dict[str, Any]


class _ToyGenerator(GeneratorStage[_ToyJob, str]):
    """Two children per row with text; the backend upper-cases, and an empty result is a Failure."""

    name = "toy"

    def jobs_for(self, row):
        if not row.get("text"):
            return self.fail(row, "empty", "no text")
        return [_ToyJob({**row, "variant": (j,)}) for j in range(2)]

    def run_jobs(self, jobs):
        return [job.child["text"].upper() if job.child["text"] != "mute" else "" for job in jobs]

    def rows_for(self, job, result):
        if not result:
            return [self.fail(job.child, "silent", "empty result")]
        return [{**job.child, "out": result}]


def _toy_rows():
    return [{"key": "a", "text": "x"}, {"key": "b", "text": ""}, {"key": "c", "text": "mute"}]


def _order(out):
    return [(type(r).__name__, r.key if isinstance(r, Failure) else r["key"]) for r in out]


@pytest.mark.parametrize("checks_first", [True, False])
def test_generator_base_keeps_its_stages_return_order(checks_first):
    toy = type("Toy", (_ToyGenerator,), {"checks_first": checks_first})(StageSettings(), CONTEXT)
    out = toy.process_batch(_toy_rows())
    jobs = [("dict", "a"), ("dict", "a"), ("Failure", "c"), ("Failure", "c")]
    if checks_first:  # synthesize_speech, transcribe: failed checks, then every job's rows in job order
        assert _order(out) == [("Failure", "b"), *jobs]
    else:  # caption, generate_image: grouped by input row
        assert _order(out) == [*jobs[:2], ("Failure", "b"), *jobs[2:]]
    assert [r["out"] for r in out if isinstance(r, dict)] == ["X", "X"]
    assert _ToyGenerator(StageSettings(), CONTEXT).process_batch([{"key": "b"}])[0].cause == "empty"


def test_generator_base_fails_a_batch_whose_backend_returns_too_few_results():
    toy = _ToyGenerator(StageSettings(), CONTEXT)
    toy.run_jobs = lambda jobs: ["X"] * (len(jobs) - 1)
    with pytest.raises(ValueError):
        toy.process_batch(_toy_rows())


def test_generator_base_never_calls_its_backend_for_a_batch_without_jobs():
    """Real backends (a TTS voice, a diffusion pipeline) are not asked to run on an empty list."""
    toy = _ToyGenerator(StageSettings(), CONTEXT)
    calls: list[list] = []
    toy.run_jobs = lambda jobs: calls.append(jobs) or []
    out = toy.process_batch([{"key": "b", "text": ""}])
    assert [f.cause for f in out] == ["empty"] and calls == []


def test_filter_base_counts_each_drop_by_reason():
    class Toy(FilterStage):
        name = "toy_filter"

        def judge(self, row):
            if row.get("bad"):
                return self.fail(row, "bad_input", "bad")
            return None if row["n"] > 0 else ("zero" if row["n"] == 0 else "negative")

    toy = Toy(StageSettings(), CONTEXT)
    rows = [
        {"key": "a", "n": 1},
        {"key": "b", "n": 0},
        {"key": "c", "n": -1, "bad": True},
        {"key": "d", "n": -2},
    ]
    out = toy.process_batch(rows)
    assert _order(out) == [("dict", "a"), ("Failure", "c")]
    assert dict(toy.stats) == {"dropped:zero": 1, "dropped:negative": 1}


def test_whole_shard_scope_is_declared_and_gives_one_batch_grouped_by_source():
    for name in WHOLE_SHARD:
        assert stage_class(name).batch_size is None, name
    for name in stage_names():
        assert stage_class(name).batch_size is None or stage_class(name).batch_size < 100_000, name
    rows = [{"key": k, "variant": (i,)} for i, k in enumerate("abacb")]
    batches = list(batches_by_key(rows, None))
    assert [[(r["key"], r["variant"][0]) for r in b] for b in batches] == [
        [("a", 0), ("a", 2), ("b", 1), ("b", 4), ("c", 3)]
    ]
    assert list(batches_by_key([], None)) == []
