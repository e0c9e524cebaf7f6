"""latent_space (global): CMDA's common latent space, learned offline from frozen per-modality features.

METHODS §2.2-a. Two projection heads, g_s for the student modality's features (e.g. ``image_embedding``,
EfficientNet-Lite0 1280-d) and g_t for the teacher's (e.g. ``text_embedding``, MiniLM 384-d), map into
one ``dim``-d space. They are trained once over the whole corpus ("100 epochs ahead of time", P) and
then frozen; ``process_batch`` only projects.

The loss is the reference code's well-posed form, not the paper's Eq. 7 (whose denominator leaves out
the positive, so it can go negative): SupCon/SimCLR (``losses.py``, ``contrast_mode="all"``) applied to
the stacked pair ``[g_s(x̂_i), g_t(x_i^t)]`` of L2-normalised projections, with τ = 0.5 and base
temperature 0.07, so the loss is scaled by τ/0.07. Every one of the 2B embeddings of a batch is in the
denominator (the positive and same-modality negatives included). Unsupervised, the only positive of
an embedding is its pair's other modality (Eq. 7's intent); supervised, every same-class embedding of
either modality is a positive, averaged (Eq. 8's intent). ``supervised: auto`` trains supervised when
every row has a label.

Each input feature is first standardised with the corpus mean and std (``standardize``, on by default,
as SSD standardises features; saved with the heads): L2-normalised 1280-d features have coordinates of
about 0.03, so without it a freshly initialised head's output is dominated by its biases, every sample
maps to nearly the same latent, and the |cos| weights of ``interpolate`` come out uniform.

Optimiser as P and R: SGD, lr 0.01, momentum 0.9, weight decay 1e-4, cosine-annealed to lr/100, batch
128 (``optimizer: adam`` is the alternative). Training stops after ``max_steps`` optimiser steps (2,000,
about 5 epochs of the 50,000-row fit sample, 25 of 10,000 rows) when that comes before ``epochs``: on
a large corpus 100 epochs of the sample would take hours on CPU, while the heads' loss has levelled off
long before; small corpora train every epoch, as the paper does. The manifest records both. The heads
are small MLPs (Linear → ReLU → Linear; ``hidden: 0`` makes them linear), initialised and shuffled from
``seed`` (default: derived from the run seed), so a fit is reproducible on CPU.

Artifacts (no pickle): ``heads.safetensors`` (tensors ``student.*``, ``teacher.*`` and the input
standardisation ``scaler.<side>.mean|std``) and ``latent_space.json`` (format version, the settings
that shape the heads, input dims, per-epoch loss).
When the embeddings already share a space (both from one CLIP model), leave this stage out and point
``interpolate``'s ``student_latent``/``teacher_latent`` at the embedding fields instead.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import Field, model_validator

from augpipe.methods.latent import HeadsConfig, projection_head, scaler, train_heads
from augpipe.pipeline.rows import Failure, FieldName, Row, derive_seed, record
from augpipe.pipeline.stage import GlobalStageSettings, Resources, Stage, StageSettings

FORMAT_VERSION = 1
WEIGHTS_FILE = "heads.safetensors"
STATE_FILE = "latent_space.json"
SHAPE_SETTINGS = ("student", "teacher", "dim", "hidden", "standardize")


class LatentSpaceSettings(GlobalStageSettings):
    student: FieldName = Field(
        default="image_embedding", description="student modality's frozen feature field"
    )
    teacher: FieldName = Field(
        default="text_embedding", description="teacher modality's frozen feature field"
    )
    student_output: FieldName = Field(default="student_latent", description="field for g_s(student)")
    teacher_output: FieldName = Field(default="teacher_latent", description="field for g_t(teacher)")
    dim: int = Field(default=128, ge=2, description="common latent dimension (P: 128)")
    hidden: int = Field(default=512, ge=0, description="hidden width of each head; 0 = linear head")
    temperature: float = Field(default=0.5, gt=0, description="SupCon τ (R: 0.5)")
    base_temperature: float = Field(default=0.07, gt=0, description="SupCon base τ; loss × τ/base")
    epochs: int = Field(default=100, ge=1, description="training epochs over the corpus (P: 100)")
    max_steps: int | None = Field(
        default=2000,
        ge=1,
        description="stop after this many optimiser steps (null: every epoch); bounds large corpora's fit",
    )
    lr: float = Field(default=0.01, gt=0, description="learning rate (P: SGD 0.01)")
    optimizer: Literal["sgd", "adam"] = "sgd"
    momentum: float = Field(default=0.9, ge=0, lt=1)
    weight_decay: float = Field(default=1e-4, ge=0)
    train_batch_size: int = Field(default=128, ge=2, description="pairs per training step (P: 128)")
    seed: int | None = Field(default=None, description="init and shuffling seed; default from the run seed")
    supervised: bool | Literal["auto"] = Field(
        default="auto", description="Eq. 8 (same-label positives); auto: when every row has a label"
    )
    label_field: FieldName = "label"
    standardize: bool = Field(
        default=True, description="z-score each input feature with the corpus mean and std before the head"
    )

    @model_validator(mode="after")
    def _distinct(self) -> LatentSpaceSettings:
        if self.student == self.teacher:
            raise ValueError("student and teacher must be different fields")
        if self.student_output == self.teacher_output:
            raise ValueError("student_output and teacher_output must differ")
        return self


def _stack(values: list[Any]) -> np.ndarray:
    return np.stack([np.asarray(v, dtype=np.float32).reshape(-1) for v in values]).astype(np.float32)


class LatentSpace(Stage):
    name: ClassVar[str] = "latent_space"
    consumes: ClassVar[frozenset[str]] = frozenset({"image_embedding", "text_embedding"})
    produces: ClassVar[frozenset[str]] = frozenset({"student_latent", "teacher_latent"})
    Settings: ClassVar[type[StageSettings]] = LatentSpaceSettings
    resources: ClassVar[Resources] = Resources(cpus=1.0, gpus=0.0, memory_gb=2.0)
    batch_size: ClassVar[int] = 4096
    cacheable: ClassVar[bool] = False
    keeps_rows: ClassVar[bool] = True
    needs_fit: ClassVar[bool] = True

    settings: LatentSpaceSettings

    def __init__(self, settings: StageSettings, context: Any) -> None:
        super().__init__(settings, context)
        self.heads: dict[str, Any] | None = None
        self.scalers: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self.fitted: dict[str, Any] = {}

    def inputs(self) -> frozenset[str]:
        return frozenset({self.settings.student, self.settings.teacher})

    def outputs(self) -> frozenset[str]:
        return frozenset({self.settings.student_output, self.settings.teacher_output})

    def fit_fields(self) -> frozenset[str]:
        extra = {self.settings.label_field} if self.settings.supervised is not False else set()
        return self.inputs() | extra

    @property
    def seed(self) -> int:
        s = self.settings.seed
        return s if s is not None else derive_seed(self.context.run_seed, "corpus", self.name)

    # ------------------------------------------------------------------------------------------ fit

    def _labels(self, values: list[Any]) -> np.ndarray | None:
        present = all(v is not None for v in values)
        if self.settings.supervised is True and not present:
            raise ValueError(f"supervised: true, but some rows have no {self.settings.label_field!r}")
        if self.settings.supervised is False or not present:
            return None
        classes = {c: i for i, c in enumerate(sorted({str(v) for v in values}))}
        return np.array([classes[str(v)] for v in values], dtype=np.int64)

    def _config(self) -> HeadsConfig:
        s = self.settings
        return HeadsConfig(
            dim=s.dim,
            hidden=s.hidden,
            temperature=s.temperature,
            base_temperature=s.base_temperature,
            epochs=s.epochs,
            max_steps=s.max_steps,
            lr=s.lr,
            optimizer=s.optimizer,
            momentum=s.momentum,
            weight_decay=s.weight_decay,
            batch_size=s.train_batch_size,
        )

    def fit(self, columns: dict[str, list[Any]], artifact_dir: Path) -> dict[str, Any]:
        """Train both heads on every row that has both features; save them; return the loss summary."""
        s = self.settings
        keep = [
            i
            for i, (a, b) in enumerate(zip(columns[s.student], columns[s.teacher], strict=True))
            if a is not None and b is not None
        ]
        if len(keep) < 2:
            raise ValueError(f"latent_space needs at least 2 rows with {s.student} and {s.teacher}")
        raw = {
            "student": _stack([columns[s.student][i] for i in keep]),
            "teacher": _stack([columns[s.teacher][i] for i in keep]),
        }
        self.scalers = {side: scaler(x, s.standardize) for side, x in raw.items()}
        xs, xt = (self._scaled(side, raw[side]) for side in ("student", "teacher"))
        label_values = columns.get(s.label_field, [None] * len(columns[s.student]))
        labels = self._labels([label_values[i] for i in keep])
        trained = train_heads(xs, xt, labels, self._config(), self.seed, self.device)
        self.heads = trained.heads
        summary = {
            "rows": len(keep),
            "skipped_rows": len(columns[s.student]) - len(keep),
            "student": s.student,
            "teacher": s.teacher,
            "student_dim": int(xs.shape[1]),
            "teacher_dim": int(xt.shape[1]),
            "dim": s.dim,
            "epochs": s.epochs,
            "steps": trained.steps,
            "max_steps": s.max_steps,
            "supervised": labels is not None,
            "classes": None if labels is None else int(labels.max() + 1),
            "seed": self.seed,
            "initial_loss": trained.initial_loss,
            "final_loss": trained.final_loss,
        }
        self._save(artifact_dir, summary, trained.epoch_losses)
        self.fitted = summary
        return summary

    def _scaled(self, side: str, x: np.ndarray) -> np.ndarray:
        mean, std = self.scalers[side]
        return ((x - mean) / std).astype(np.float32)

    def _shape(self) -> dict[str, Any]:
        return {name: getattr(self.settings, name) for name in SHAPE_SETTINGS}

    def _save(self, folder: Path, summary: dict[str, Any], epoch_losses: list[float]) -> None:
        import torch
        from safetensors.torch import save_file

        assert self.heads is not None
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {
            f"{side}.{name}": tensor.detach().cpu().contiguous()
            for side, head in self.heads.items()
            for name, tensor in head.state_dict().items()
        }
        for side, (mean, std) in self.scalers.items():
            tensors[f"scaler.{side}.mean"] = torch.from_numpy(np.ascontiguousarray(mean))
            tensors[f"scaler.{side}.std"] = torch.from_numpy(np.ascontiguousarray(std))
        save_file(tensors, str(folder / WEIGHTS_FILE), metadata={"format": str(FORMAT_VERSION)})
        state = {
            "format": FORMAT_VERSION,
            "stage": self.name,
            "shape": self._shape(),
            "settings": self.settings.model_dump(mode="json", exclude=set(self.settings.EXECUTION_ONLY)),
            "summary": summary,
            "epoch_losses": epoch_losses,
        }
        (folder / STATE_FILE).write_text(json.dumps(state, indent=1))

    def load_fitted(self, artifact_dir: Path) -> None:
        """Rebuild the heads from ``heads.safetensors``; refuse another format or another head shape."""
        from safetensors.torch import load_file

        state = json.loads((artifact_dir / STATE_FILE).read_text())
        if state.get("format") != FORMAT_VERSION:
            raise ValueError(
                f"{artifact_dir / STATE_FILE}: latent_space artifact format {state.get('format')!r}, "
                f"this augpipe reads format {FORMAT_VERSION}; delete the folder to refit"
            )
        if state["shape"] != self._shape():
            raise ValueError(f"{artifact_dir}: heads were fitted with {state['shape']}, not {self._shape()}")
        summary = state["summary"]
        tensors = load_file(str(artifact_dir / WEIGHTS_FILE))
        s = self.settings
        self.heads = {
            "student": projection_head(summary["student_dim"], s.hidden, s.dim),
            "teacher": projection_head(summary["teacher_dim"], s.hidden, s.dim),
        }
        for side, head in self.heads.items():
            prefix = f"{side}."
            head.load_state_dict({k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)})
            head.to(self.device).eval()
            self.scalers[side] = (
                tensors[f"scaler.{side}.mean"].numpy(),
                tensors[f"scaler.{side}.std"].numpy(),
            )
        self.fitted = summary

    # ------------------------------------------------------------------------------------- process

    def project(self, side: Literal["student", "teacher"], vectors: np.ndarray) -> np.ndarray:
        """L2-normalised float32 latents g(vectors) of one side."""
        import torch
        import torch.nn.functional as F

        if self.heads is None:
            raise RuntimeError("latent_space has not been fitted: call fit() or load_fitted() first")
        x = torch.from_numpy(self._scaled(side, np.asarray(vectors, dtype=np.float32))).to(self.device)
        with torch.no_grad():
            z = F.normalize(self.heads[side](x), dim=1)
        return z.cpu().numpy().astype(np.float32)

    def process_batch(self, rows: list[Row]) -> list[Row | Failure]:
        s = self.settings
        if self.heads is None:
            raise RuntimeError("latent_space has not been fitted: call fit() or load_fitted() first")
        dims = {"student": self.fitted["student_dim"], "teacher": self.fitted["teacher_dim"]}
        results: list[Row | Failure] = []
        todo: list[Row] = []
        for row in rows:
            problem = None
            for side, field in (("student", s.student), ("teacher", s.teacher)):
                value = row.get(field)
                if value is None:
                    problem = f"field {field!r} is missing"
                elif np.asarray(value).size != dims[side]:
                    problem = (
                        f"field {field!r} has {np.asarray(value).size} values; the heads take {dims[side]}"
                    )
                if problem:
                    break
            if problem:
                results.append(self.fail(row, "missing_field", problem))
            else:
                todo.append(row)
                results.append(row)
        if not todo:
            return results
        zs = self.project("student", _stack([r[s.student] for r in todo]))
        zt = self.project("teacher", _stack([r[s.teacher] for r in todo]))
        info = {"dim": s.dim, "supervised": self.fitted.get("supervised"), "seed": self.fitted.get("seed")}
        for row, a, b in zip(todo, zs, zt, strict=True):
            row[s.student_output] = a
            row[s.teacher_output] = b
            record(row, self.name, **info)
        self.stats["projected"] += len(todo)
        return results
