"""The stage contract: what a stage declares, and the two calls the engine makes on it.

A stage is one class in one module of ``augpipe.stages``. It declares as data:

- ``consumes`` / ``produces``: the row fields it reads and writes, checked when a recipe is built;
- ``reads_context``: the run-wide values (``StageContext``) besides the seed that shape its output, which
  the base ``fingerprint`` hashes, so a stage never writes its own cache key;
- ``Settings``: a pydantic model of its options (unknown keys are errors, named by the recipe loader);
- ``resources`` and ``batch_size``: defaults the executor sizes actors with, overridable per recipe
  (``batch_size`` None: the whole shard in one call, for stages that draw pools within a shard);
- ``backends``: interchangeable implementations chosen by ``settings.backend``.

The engine calls ``check()`` on the driver before any worker starts (is the model there?), then
``setup()`` once per worker (load the model) and ``process_batch(rows)`` for each batch. A stage never
imports Ray: the executor alone knows how it is run.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from augpipe.pipeline.models import ModelNotFoundError, ResolvedModel, resolve_model
from augpipe.pipeline.rows import Failure, Row, derive_seed


@dataclass(frozen=True)
class Resources:
    """What one worker of a stage asks the scheduler for; ``gpus`` may be fractional to share a card."""

    cpus: float = 1.0
    gpus: float = 0.0
    memory_gb: float = 1.0


class StageSettings(BaseModel):
    """Options every stage accepts. Execution-only options do not enter the stage's fingerprint."""

    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())

    backend: str | None = None
    batch_size: int | None = Field(default=None, ge=1)
    concurrency: int = Field(default=1, ge=1, description="workers (actors) for this stage")
    cpus: float | None = Field(default=None, gt=0)
    gpus: float | None = Field(default=None, ge=0)
    memory_gb: float | None = Field(default=None, gt=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    fp16: bool = Field(default=True, description="half precision on CUDA where the model allows")

    EXECUTION_ONLY: ClassVar[frozenset[str]] = frozenset(
        {"batch_size", "concurrency", "cpus", "gpus", "memory_gb", "device"}
    )


class GlobalStageSettings(StageSettings):
    """Options of a global stage (one that fits on the corpus before processing it)."""

    fit_max_rows: int | None = Field(
        default=50_000,
        ge=2,
        description="fit on a seeded sample of at most this many rows (null: every row); in the manifest",
    )


@dataclass(frozen=True)
class StageContext:
    """Run-wide facts a stage may need: the seed, the recipe's name, its fan-out k and its key tag."""

    run_seed: int = 0
    recipe: str = ""
    multiple: int = 1
    tag: str = "aug"


class Backend:
    """One implementation of a stage's model. Subclasses load in ``load`` and expose a batch method."""

    name: ClassVar[str]
    default_model: ClassVar[str | None] = None

    def __init__(self, settings: StageSettings, context: StageContext) -> None:
        self.settings = settings
        self.context = context
        self.model: ResolvedModel | None = None
        self.threads = 1
        """CPU threads the model may use, from the stage's ``cpus``; set before ``load``."""

    @property
    def model_ref(self) -> str | None:
        """The configured model reference, or the backend's default."""
        return getattr(self.settings, "model", None) or self.default_model

    def check(self) -> None:
        """Fail fast if the model is missing; cheap, runs on the driver."""
        if self.model_ref is not None:
            self.model = resolve_model(self.model_ref)

    def require_model(self, stage: str, hint: str) -> None:
        """``check`` for a backend that cannot run without a configured model: the error names the stage
        and backend, and ``hint`` says how to set one."""
        if self.model_ref is None:
            raise ModelNotFoundError(f"{stage} backend {self.name!r} needs a model: {hint}")
        try:
            Backend.check(self)
        except ModelNotFoundError as exc:
            raise ModelNotFoundError(f"{stage} backend {self.name!r}: {exc}") from exc

    def load(self, device: str) -> None:
        """Load weights onto ``device``; called once per worker."""

    def describe(self) -> dict[str, Any]:
        """Model identity for lineage and the manifest."""
        info: dict[str, Any] = {"backend": self.name}
        if self.model is not None:
            info.update(model=self.model.ref, revision=self.model.revision)
        return info


def pick_device(settings: StageSettings, gpus: float) -> str:
    """CUDA only when the stage was given a GPU share (or asked for CUDA) and one is visible."""
    if settings.device == "cpu" or (settings.device == "auto" and gpus == 0):
        return "cpu"
    import torch  # only stages that may use a GPU pay for importing torch

    if settings.device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("device: cuda was configured but no CUDA device is visible to this worker")
        return "cuda"
    return "cuda" if gpus > 0 and torch.cuda.is_available() else "cpu"


class Stage:
    """Base class of every stage; see the module docstring for the contract."""

    name: ClassVar[str]
    consumes: ClassVar[frozenset[str]] = frozenset()
    produces: ClassVar[frozenset[str]] = frozenset()
    Settings: ClassVar[type[StageSettings]] = StageSettings
    resources: ClassVar[Resources] = Resources()
    batch_size: ClassVar[int | None] = 16
    """Rows per ``process_batch`` call; None is whole-shard scope: every row of a shard in one call."""
    backends: ClassVar[dict[str, type[Backend]]] = {}
    default_backend: ClassVar[str | None] = None
    cacheable: ClassVar[bool] = True
    """Whether outputs are worth caching per shard (model stages); cheap filters set this False."""
    keeps_rows: ClassVar[bool] = False
    """Every row comes out once, unchanged but for the fields ``outputs()`` names (or fails): the engine
    need not run this step where nothing after it reads those fields (a later stage's fit sample)."""
    needs_fit: ClassVar[bool] = False
    """Global stages (a GMM, a learned latent space) fit once over the whole corpus before processing."""
    reads_context: ClassVar[tuple[str, ...]] = ()
    """``StageContext`` fields other than ``run_seed`` (in every fingerprint) that change the output, e.g.
    ``("multiple",)`` for a stage that writes k rows per pool; ``fingerprint`` hashes them in this order."""
    context_key: ClassVar[Literal["pairs", "list"]] = "pairs"
    """How ``reads_context`` joins the fingerprint: ``|multiple=2`` pairs, or a JSON list ``[2, "aug"]``
    (select's form from before the declaration). Only the form of existing keys depends on it."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        unknown = set(cls.reads_context) - set(StageContext.__dataclass_fields__) | (
            {"run_seed"} & set(cls.reads_context)
        )
        if unknown:
            raise TypeError(f"{cls.__name__}.reads_context names {sorted(unknown)}: not StageContext fields")

    def __init__(self, settings: StageSettings, context: StageContext) -> None:
        self.settings = settings
        self.context = context
        self.stats: Counter[str] = Counter()
        self.backend: Backend | None = None
        chosen = settings.backend or self.default_backend
        if self.backends:
            if chosen not in self.backends:
                raise ValueError(
                    f"stage {self.name!r}: unknown backend {chosen!r}; choose one of {sorted(self.backends)}"
                )
            self.backend = self.backends[chosen](settings, context)
        self.device = "cpu"

    @classmethod
    def settings_from(cls, options: dict[str, Any]) -> StageSettings:
        """Validate a recipe's options for this stage into its typed settings."""
        return cls.Settings.model_validate(options)

    def effective_resources(self) -> Resources:
        """Declared resources with the recipe's overrides applied."""
        s, r = self.settings, self.resources
        return Resources(
            cpus=s.cpus if s.cpus is not None else r.cpus,
            gpus=s.gpus if s.gpus is not None else r.gpus,
            memory_gb=s.memory_gb if s.memory_gb is not None else r.memory_gb,
        )

    def inputs(self) -> frozenset[str]:
        """Fields this instance reads; override when they depend on settings (e.g. which field to embed)."""
        return self.consumes

    def outputs(self) -> frozenset[str]:
        """Fields this instance writes; checked against later stages' inputs when a recipe is built."""
        return self.produces

    def effective_batch_size(self) -> int | None:
        """The recipe's ``batch_size``, else the declared one (None: the whole shard)."""
        return self.settings.batch_size or self.batch_size

    def check(self) -> None:
        """Fail fast, on the driver, for anything that would fail every sample (a missing model)."""
        if self.backend is not None:
            self.backend.check()

    def setup(self) -> None:
        """Load models once per worker."""
        resources = self.effective_resources()
        self.device = pick_device(self.settings, resources.gpus)
        if self.backend is not None:
            # Libraries default to every core; several stages share a machine, so each takes its share.
            self.backend.threads = max(1, int(resources.cpus))
            self.backend.load(self.device)

    def process_batch(self, rows: list[Row]) -> list[Row | Failure]:
        """Turn a batch into output rows (fewer when filtering, more when fanning out) or Failures.

        Raising fails the whole batch; the engine then retries rows one at a time to isolate the culprit.
        """
        raise NotImplementedError

    def fit_fields(self) -> frozenset[str]:
        """Fields a global stage's ``fit`` reads from every row of the corpus (by default, its inputs)."""
        return self.inputs()

    def fit(self, columns: dict[str, list[Any]], artifact_dir: Path) -> dict[str, Any]:
        """Fit once over the corpus (``columns``: field -> values of every row, plus ``key``).

        Save the fitted state under ``artifact_dir`` (a versioned folder next to the output, reused on
        resume) and return a small JSON-able summary for the manifest (e.g. the chosen M and BIC curve).
        """
        raise NotImplementedError(f"stage {self.name} declares needs_fit but has no fit()")

    def load_fitted(self, artifact_dir: Path) -> None:
        """Load what ``fit`` saved; called in every worker after ``setup`` and before any batch."""
        raise NotImplementedError(f"stage {self.name} declares needs_fit but has no load_fitted()")

    def fail(self, row: Row, cause: str, message: str) -> Failure:
        """A Failure of this stage for ``row`` (its key and variant), for ``process_batch`` to return."""
        return Failure(row["key"], self.name, cause, message, tuple(row.get("variant", ())))

    def describe(self) -> dict[str, Any]:
        """Stage identity for lineage and the manifest: name, backend, model id and revision."""
        info: dict[str, Any] = {"stage": self.name, "type": type(self).name}
        if self.backend is not None:
            info.update(self.backend.describe())
        return info

    def fingerprint(self) -> str:
        """A hash of what changes this stage's output: settings (minus execution-only), model, run seed
        and the declared ``reads_context`` values."""
        options = self.settings.model_dump(exclude=set(self.settings.EXECUTION_ONLY))
        identity = {"describe": self.describe(), "options": options, "seed": self.context.run_seed}
        blob = json.dumps(identity, sort_keys=True, default=str)
        digest = hashlib.sha256(blob.encode()).hexdigest()[:16]
        if not self.reads_context:
            return digest
        values = {name: getattr(self.context, name) for name in self.reads_context}
        if self.context_key == "list":
            extra = json.dumps(list(values.values()))
        else:
            extra = "".join(f"|{name}={value}" for name, value in values.items())
        return hashlib.sha256(f"{digest}{extra}".encode()).hexdigest()[:16]

    def seed_for(self, row: Row) -> int:
        """The deterministic seed of this stage's work on ``row``."""
        return derive_seed(self.context.run_seed, row["key"], self.name, tuple(row.get("variant", ())))
