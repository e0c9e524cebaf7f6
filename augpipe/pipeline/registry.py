"""Stage lookup by name: stage ``x`` lives in module ``augpipe.stages.x``, so a new stage is one new file."""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from typing import Any

from pydantic import ValidationError
from pydantic_core import to_jsonable_python

import augpipe.stages
from augpipe.pipeline.config import ConfigError, StageEntry, describe_validation_error, did_you_mean
from augpipe.pipeline.stage import Stage, StageContext


def stage_class(name: str) -> type[Stage]:
    """The Stage subclass registered under ``name``."""
    try:
        module = importlib.import_module(f"augpipe.stages.{name}")
    except ModuleNotFoundError as exc:
        if exc.name != f"augpipe.stages.{name}":
            raise
        known = stage_names()
        hint = did_you_mean(name, known)
        raise ConfigError(f"unknown stage {name!r}{hint}; known stages: {', '.join(known)}") from exc
    for value in vars(module).values():
        if isinstance(value, type) and issubclass(value, Stage) and getattr(value, "name", None) == name:
            return value
    raise ConfigError(f"module augpipe.stages.{name} defines no Stage named {name!r}")


def stage_names() -> list[str]:
    """Every stage module shipped in ``augpipe.stages``."""
    return sorted(m.name for m in pkgutil.iter_modules(augpipe.stages.__path__) if not m.name.startswith("_"))


def describe_stage(name: str) -> dict[str, Any]:
    """What ``augpipe stages --json`` prints for one stage: enough for a tool to build a recipe from it."""
    cls = stage_class(name)
    doc = cls.__doc__ or importlib.import_module(cls.__module__).__doc__ or ""
    options = {
        field: {"default": to_jsonable_python(info.get_default(call_default_factory=True), fallback=str)}
        | ({"description": info.description} if info.description else {})
        for field, info in cls.Settings.model_fields.items()
    }
    return {
        "name": name,
        "summary": doc.strip().split("\n")[0],
        "backends": sorted(cls.backends),
        "default_backend": cls.default_backend,
        "resources": dataclasses.asdict(cls.resources),
        "batch_size": cls.batch_size,
        "needs_fit": cls.needs_fit,
        "cacheable": cls.cacheable,
        "options": options,
    }


def build_stage(entry: StageEntry, context: StageContext) -> Stage:
    """Instantiate a stage from a recipe entry (cheap: no model is loaded here)."""
    cls = stage_class(entry.stage)
    try:
        settings = cls.settings_from(entry.options)
    except ValidationError as exc:
        known = list(cls.Settings.model_fields)
        raise ConfigError(describe_validation_error(exc, f"stages.{entry.name}", known)) from exc
    try:
        stage = cls(settings, context)
    except ValueError as exc:
        raise ConfigError(f"stages.{entry.name}: {exc}") from exc
    # The recipe's name for this step (e.g. embed_image beside embed_text, both of type embed) keys its
    # lineage, seeds, cache, stats and manifest entries, so two steps of one type never collide.
    stage.name = entry.name
    return stage
