"""translate (global): latent modality translation, image embedding → text embedding or the reverse.

METHODS §3 (seed method 002), maths in ``augpipe.methods.translation`` and ``augpipe.methods.cdim``:
ẑ = cM + γ·Normalize(CDIM(c)), M one linear layer with bias, CDIM a conditional latent DDIM whose
ε-network is the reference's 10-layer MLP with skips, LayerNorm and dropout, sampled with ``steps``
deterministic DDIM steps and classifier-free guidance ω at every step; trained with
λ1·L1(z, ẑ) + λ2·MSE(ε, ε_θ), λ1 = 1, λ2 = 2.

``fit`` reads the paired embeddings of every row that has both (``image_field``, ``text_field``),
L2-normalises them (``normalize_inputs``), holds out a seeded ``holdout`` share, trains on the rest,
and evaluates on the held-out pairs: the mean cosine between translated and true target embeddings
(the paper's Sim_txt for image → text, Sim_img for text → image), and the same for the paper's two
ablations, each trained from scratch on the same split with the same seed: without M
(ẑ = γ·Normalize(CDIM(c))) and without the DDIM term (ẑ = cM). The fit summary (manifest
``artifacts[<step>]``) carries these figures, the training curves and the train seconds.

``process_batch`` translates each row's condition embedding into ``output`` (default
``translated_text_embedding`` or ``translated_image_embedding``: a ``*_embedding`` column, so the
writer stores it as ``fixed_size_list<float32>``). Each row's starting noise z_T comes from its own
seed (run seed, key, stage, variant), so a row's output does not depend on its batch (up to float
rounding of batched matrix products). Lineage:
direction, encoder ids (from the embed stage's lineage, or ``image_encoder``/``text_encoder`` for
embeddings read from the input), γ, ω, steps, noise seed and the checkpoint's hash.

Runs on CUDA when the stage has a GPU share (``gpus``), with the ε-network in bfloat16 autocast when
``fp16`` is on and the card supports it (the DDIM arithmetic, M and the losses stay float32); the same
code runs on the CPU. Defaults are the paper's (GPU-sized: 2048 hidden units, 50 DDIM steps, batch 256);
the ``tiny`` and ``cpu`` profiles shrink them.

Artifacts (no pickle): ``translator.safetensors`` (M, the ε-network, the schedule and the z-score
statistics) and ``translate.json`` (format version, shape, settings, summary with the curves).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import Field, model_validator

from augpipe.methods.cdim import Autocast
from augpipe.methods.translation import (
    TrainConfig,
    Translator,
    TranslatorShape,
    fit_and_evaluate,
    row_noise,
    translate,
)
from augpipe.pipeline.rows import Failure, FieldName, Row, derive_seed, record
from augpipe.pipeline.stage import Resources, Stage, StageSettings
from augpipe.stages._fields import as_vector
from augpipe.stages.embed import l2_normalize

FORMAT_VERSION = 1
WEIGHTS_FILE = "translator.safetensors"
STATE_FILE = "translate.json"


class TranslateSettings(StageSettings):
    direction: Literal["image_to_text", "text_to_image"] = "image_to_text"
    image_field: FieldName = Field(default="image_embedding", description="the image embedding field")
    text_field: FieldName = Field(default="text_embedding", description="the text embedding field")
    output: FieldName | None = Field(default=None, description="default translated_<target>_embedding")
    image_encoder: str | None = Field(
        default=None, description="image encoder id for lineage (input embeddings)"
    )
    text_encoder: str | None = Field(
        default=None, description="text encoder id for lineage (input embeddings)"
    )
    normalize_inputs: bool = Field(default=True, description="L2-normalise both embeddings first")
    gamma: float = Field(default=1.0, ge=0, description="γ, weight of the CDIM term (P: 1)")
    guidance: float = Field(default=5.0, ge=0, description="classifier-free guidance ω (P: 5)")
    steps: int = Field(default=50, ge=1, description="DDIM steps, in training and translation (R: 50)")
    timesteps: int = Field(default=1000, ge=2, description="diffusion length T (R: 1000)")
    beta: float = Field(default=0.008, gt=0, description="constant β (R: const0.008)")
    hidden: int = Field(default=2048, ge=1, description="ε-network width (R: 2048)")
    layers: int = Field(default=10, ge=2, description="ε-network layers (P: 10)")
    dropout: float = Field(default=0.1, ge=0, lt=1)
    p_uncond: float = Field(default=0.05, ge=0, le=1, description="condition dropout for CFG (P: 0.05)")
    lr: float = Field(default=1e-4, gt=0, description="AdamW learning rate (P: 1e-4)")
    weight_decay: float = Field(default=1e-2, ge=0, description="AdamW weight decay (P: 1e-2)")
    train_batch_size: int = Field(default=256, ge=1, description="pairs per step (P: 256)")
    epochs: int = Field(default=50, ge=1)
    lambda_l1: float = Field(default=1.0, ge=0, description="λ1 on L1(z, ẑ) (P: 1)")
    lambda_ddim: float = Field(default=2.0, ge=0, description="λ2 on MSE(ε, ε_θ) (P: 2)")
    holdout: float = Field(default=0.1, ge=0, lt=1, description="held-out share for the evaluation")
    ablations: bool = Field(default=True, description="also train without M and without DDIM")
    seed: int | None = Field(
        default=None, ge=0, lt=2**63, description="training seed; default from the run seed"
    )

    @model_validator(mode="after")
    def _consistent(self) -> TranslateSettings:
        if self.image_field == self.text_field:
            raise ValueError("image_field and text_field must be different fields")
        if self.steps > self.timesteps:
            raise ValueError(f"steps ({self.steps}) cannot exceed timesteps ({self.timesteps})")
        if self.beta * 1000 / self.timesteps >= 1:
            raise ValueError(f"beta·1000/timesteps must be below 1 (β={self.beta}, T={self.timesteps})")
        return self

    @property
    def condition(self) -> str:
        return self.image_field if self.direction == "image_to_text" else self.text_field

    @property
    def target(self) -> str:
        return self.text_field if self.direction == "image_to_text" else self.image_field

    @property
    def output_field(self) -> str:
        return self.output or (
            "translated_text_embedding" if self.direction == "image_to_text" else "translated_image_embedding"
        )

    def shape(self, cond_dim: int, target_dim: int) -> TranslatorShape:
        return TranslatorShape(
            cond_dim,
            target_dim,
            hidden=self.hidden,
            layers=self.layers,
            dropout=self.dropout,
            timesteps=self.timesteps,
            beta=self.beta,
        )

    def train_config(self, seed: int) -> TrainConfig:
        return TrainConfig(
            epochs=self.epochs,
            batch_size=self.train_batch_size,
            lr=self.lr,
            weight_decay=self.weight_decay,
            p_uncond=self.p_uncond,
            steps=self.steps,
            omega=self.guidance,
            gamma=self.gamma,
            lambda_l1=self.lambda_l1,
            lambda_ddim=self.lambda_ddim,
            seed=seed,
        )


def paired(conditions: list[Any], targets: list[Any], normalize: bool) -> tuple[np.ndarray, np.ndarray, int]:
    """(c, z, skipped): the rows with both embeddings finite and of the first such row's sizes."""
    keep_c, keep_z = [], []
    for a, b in zip(conditions, targets, strict=True):
        c, z = as_vector(a), as_vector(b)
        if c is None or z is None or (keep_c and (c.size, z.size) != (keep_c[0].size, keep_z[0].size)):
            continue
        keep_c.append(c)
        keep_z.append(z)
    if not keep_c:
        return np.zeros((0, 0), np.float32), np.zeros((0, 0), np.float32), len(conditions)
    c, z = np.stack(keep_c), np.stack(keep_z)
    if normalize:
        c, z = l2_normalize(c), l2_normalize(z)
    return c, z, len(conditions) - len(keep_c)


def encoder_of(row: Row, field: str) -> str | None:
    """The model that wrote ``field``, from the embed stage's lineage entry ({field: {model, ...}})."""
    for entry in row.get("lineage", {}).values():
        info = entry.get(field) if isinstance(entry, dict) else None
        if isinstance(info, dict):
            return str(info.get("model") or info.get("backend"))
    return None


class Translate(Stage):
    name: ClassVar[str] = "translate"
    consumes: ClassVar[frozenset[str]] = frozenset({"image_embedding"})
    produces: ClassVar[frozenset[str]] = frozenset({"translated_text_embedding"})
    Settings: ClassVar[type[StageSettings]] = TranslateSettings
    resources: ClassVar[Resources] = Resources(cpus=1.0, gpus=0.0, memory_gb=4.0)
    batch_size: ClassVar[int] = 1024
    cacheable: ClassVar[bool] = False
    keeps_rows: ClassVar[bool] = True
    needs_fit: ClassVar[bool] = True

    settings: TranslateSettings

    def __init__(self, settings: StageSettings, context: Any) -> None:
        super().__init__(settings, context)
        self.model: Translator | None = None
        self.fitted: dict[str, Any] = {}

    def setup(self) -> None:
        """Pick the device; on the CPU, use this stage's share of the cores and no more.

        torch defaults to every core, and its spinning worker threads slow down by 10-25x when the cores
        are shared with other stages (measured: a 10-epoch fit took 2-4 s on one thread, 41-56 s on two,
        on a busy 2-core machine).
        """
        super().setup()
        if self.device == "cpu":
            import torch

            torch.set_num_threads(max(1, int(self.effective_resources().cpus)))

    def inputs(self) -> frozenset[str]:
        return frozenset({self.settings.condition})

    def outputs(self) -> frozenset[str]:
        return frozenset({self.settings.output_field})

    def fit_fields(self) -> frozenset[str]:
        return frozenset({self.settings.condition, self.settings.target})

    @property
    def seed(self) -> int:
        s = self.settings.seed
        return s if s is not None else derive_seed(self.context.run_seed, "corpus", self.name) % 2**32

    def autocast(self) -> Autocast:
        """bfloat16 autocast for the ε-network on a CUDA card that has it (and ``fp16`` on); else float32."""
        if self.device != "cuda" or not self.settings.fp16:
            return None
        import torch

        if not torch.cuda.is_bf16_supported():
            return None
        return lambda: torch.autocast("cuda", dtype=torch.bfloat16)

    def fit(self, columns: dict[str, list[Any]], artifact_dir: Path) -> dict[str, Any]:
        """Train on the paired rows (minus a held-out share), evaluate with the ablations, save."""
        s = self.settings
        c, z, skipped = paired(columns[s.condition], columns[s.target], s.normalize_inputs)
        if len(c) < 2:
            raise ValueError(f"translate needs at least 2 rows with both {s.condition!r} and {s.target!r}")
        shape = s.shape(c.shape[1], z.shape[1])
        model, report = fit_and_evaluate(
            c,
            z,
            shape,
            s.train_config(self.seed),
            holdout=s.holdout,
            ablations=s.ablations,
            device=self.device,
            autocast=self.autocast(),
        )
        variants = report["variants"]
        summary = {
            "direction": s.direction,
            "condition": s.condition,
            "target": s.target,
            "condition_dim": int(c.shape[1]),
            "target_dim": int(z.shape[1]),
            "rows": len(c),
            "skipped_rows": skipped,
            "train_rows": report["train_rows"],
            "holdout_rows": report["holdout_rows"],
            "metric": "Sim_txt" if s.direction == "image_to_text" else "Sim_img",
            "holdout_cosine": {k: v.get("holdout_cosine") for k, v in variants.items()},
            "train_s": {k: v["train_s"] for k, v in variants.items()},
            "final_loss": variants["full"]["curve"][-1],
            "loss_curve": [epoch["total"] for epoch in variants["full"]["curve"]],
            "gamma": s.gamma,
            "guidance": s.guidance,
            "steps": s.steps,
            "seed": self.seed,
            "device": self.device,
            "precision": "fp32" if self.autocast() is None else "bf16-autocast",
        }
        self.model = model
        summary["checkpoint"] = self._save(artifact_dir, summary, report)
        self.fitted = summary
        return summary

    def _save(self, folder: Path, summary: dict[str, Any], report: dict[str, Any]) -> str:
        """Write the weights (safetensors) and the JSON state; returns the weights' sha256 prefix."""
        from safetensors.torch import save_file

        assert self.model is not None
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}
        save_file(tensors, str(folder / WEIGHTS_FILE), metadata={"format": str(FORMAT_VERSION)})
        checkpoint = hashlib.sha256((folder / WEIGHTS_FILE).read_bytes()).hexdigest()[:16]
        state = {
            "format": FORMAT_VERSION,
            "stage": self.name,
            "shape": asdict(self.model.shape),
            "gamma": self.model.gamma,
            "settings": self.settings.model_dump(mode="json", exclude=set(self.settings.EXECUTION_ONLY)),
            "summary": {**summary, "checkpoint": checkpoint},
            "curves": {name: v["curve"] for name, v in report["variants"].items()},
        }
        (folder / STATE_FILE).write_text(json.dumps(state, indent=1))
        return checkpoint

    def load_fitted(self, artifact_dir: Path) -> None:
        """Rebuild the translator from ``translator.safetensors``; refuse another format."""
        from safetensors.torch import load_file

        state = json.loads((artifact_dir / STATE_FILE).read_text())
        if state.get("format") != FORMAT_VERSION:
            raise ValueError(
                f"{artifact_dir / STATE_FILE}: translate artifact format {state.get('format')!r}, "
                f"this augpipe reads format {FORMAT_VERSION}; delete the folder to refit"
            )
        model = Translator(TranslatorShape(**state["shape"]), state["gamma"])
        model.load_state_dict(load_file(str(artifact_dir / WEIGHTS_FILE)))
        self.model = model.to(self.device).eval()
        self.fitted = state["summary"]

    def _encoders(self, row: Row) -> dict[str, str | None]:
        """Encoder ids of the condition and target embeddings: the setting, else the embed lineage."""
        s = self.settings
        given = {s.image_field: s.image_encoder, s.text_field: s.text_encoder}
        return {
            role: given[f] or encoder_of(row, f)
            for role, f in (("condition", s.condition), ("target", s.target))
        }

    def _problem(self, row: Row) -> str | None:
        field, dim = self.settings.condition, self.fitted["condition_dim"]
        vector = as_vector(row.get(field))
        if vector is None:
            return f"field {field!r} is missing or not a finite vector"
        if vector.size != dim:
            return f"field {field!r} has {vector.size} values; the translator takes {dim}"
        return None

    def process_batch(self, rows: list[Row]) -> list[Row | Failure]:
        s = self.settings
        if self.model is None:
            raise RuntimeError("translate has not been fitted: call fit() or load_fitted() first")
        results: list[Row | Failure] = []
        todo: list[Row] = []
        for row in rows:
            problem = self._problem(row)
            results.append(self.fail(row, "missing_field", problem) if problem else row)
            if not problem:
                todo.append(row)
        if not todo:
            return results
        import torch

        c = np.stack([as_vector(r[s.condition]) for r in todo])
        c = l2_normalize(c) if s.normalize_inputs else c
        seeds = [self.seed_for(r) for r in todo]
        noise = row_noise(seeds, self.fitted["target_dim"])
        out = translate(self.model, torch.from_numpy(c), noise, s.steps, s.guidance, self.autocast()).numpy()
        for row, vector, seed in zip(todo, out, seeds, strict=True):
            row[s.output_field] = vector.astype(np.float32)
            record(
                row,
                self.name,
                direction=s.direction,
                condition=s.condition,
                encoders=self._encoders(row),
                gamma=s.gamma,
                guidance=s.guidance,
                steps=s.steps,
                noise_seed=seed,
                checkpoint=self.fitted["checkpoint"],
            )
        self.stats["translated"] += len(todo)
        return results
