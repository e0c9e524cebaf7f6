"""Recipes and their overrides, validated into typed objects with errors that name the offending key.

Layers, later wins: the recipe YAML, a profile (``configs/profiles/P.yaml``), an optional ``--config``
file of the same shape as a profile, then ``--set key=value`` pairs. A profile or override names stages
by their recipe name; a stage it names that the recipe lacks is ignored (profiles serve every recipe),
but an unknown option of a stage that is present is an error.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

DEFAULT_PROFILE = "cpu"


class ConfigError(ValueError):
    """A recipe, profile or override that cannot be used; the message names the key and the fix."""


def configs_dir() -> Path:
    """The recipes and profiles shipped with augpipe (``AUGPIPE_CONFIGS`` points elsewhere)."""
    return Path(os.environ.get("AUGPIPE_CONFIGS", Path(__file__).resolve().parents[2] / "configs"))


class StageEntry(BaseModel):
    """One step of a recipe: which stage type, under which name, with which options."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    stage: str
    options: dict[str, Any] = Field(default_factory=dict)


class Limits(BaseModel):
    """Bounds on untrusted input, so one hostile member cannot exhaust a worker."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_text_bytes: int = Field(default=100_000, ge=1)
    max_member_bytes: int = Field(default=64 * 2**20, ge=1)
    max_image_pixels: int = Field(default=64 * 2**20, ge=1)
    max_audio_seconds: float = Field(default=120.0, gt=0)


class Recipe(BaseModel):
    """A resolved recipe: the stages in order, the fan-out, the seed, and how rows map to output members."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    description: str = ""
    tag: str = Field(description="short code in generated keys, e.g. 'bs' gives KEY-bs-0")
    seed: int = 0
    multiple: int = Field(default=5, ge=1, description="augmentations per source sample (k)")
    input: list[str] = Field(description="fields the input corpus must provide, e.g. [text]")
    output: dict[str, str] = Field(description="output member or column -> row field")
    stages: list[StageEntry] = Field(default_factory=list)
    shard_size: int = Field(default=1000, ge=1, description="rows per work unit for Parquet/CSV input")
    limits: Limits = Field(default_factory=Limits)

    @field_validator("tag")
    @classmethod
    def _tag_is_key_safe(cls, tag: str) -> str:
        if not tag.replace("_", "").isalnum():
            raise ValueError("tag must be letters, digits or '_' (it becomes part of sample keys)")
        return tag

    @model_validator(mode="after")
    def _names_unique(self) -> Recipe:
        names = [s.name for s in self.stages]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"stage names must be unique; repeated: {duplicates} (give one a 'name:')")
        return self

    def config_hash(self) -> str:
        """Identity of the resolved configuration, recorded in the manifest."""
        blob = json.dumps(self.model_dump(), sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def plain(text: object) -> str:
    """One line of plain text: no terminal colour codes, no newlines (messages in the manifest and in
    ``augpipe: error:`` lines, which quote libraries whose messages span lines)."""
    return " ".join(ANSI.sub("", str(text)).split())


def _load_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: no such file") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not a text file ({exc.reason} at byte {exc.start})") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {plain(exc)}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data


def available_recipes() -> dict[str, Path]:
    """Recipe name -> file, for ``augpipe recipes`` and name lookup."""
    return {p.stem: p for p in sorted((configs_dir() / "recipes").glob("*.yaml"))}


def describe_recipe(name: str, path: Path) -> dict[str, Any]:
    """What ``augpipe recipes --json`` prints for one recipe, read from its file as shipped."""
    raw = _load_yaml(path)
    stages = _normalise_stages(raw.get("stages", []), str(path))
    return {
        "name": name,
        "file": str(path),
        "description": raw.get("description", ""),
        "tag": raw.get("tag"),
        "input": raw.get("input", []),
        "output": raw.get("output", {}),
        "stages": [{"name": s["name"], "stage": s["stage"]} for s in stages],
    }


def _recipe_file(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.suffix in {".yaml", ".yml"} or path.is_file():
        return path
    recipes = available_recipes()
    if name_or_path not in recipes:
        raise ConfigError(
            f"unknown recipe {name_or_path!r}{did_you_mean(name_or_path, list(recipes))}. "
            f"Known recipes: {', '.join(recipes)} (or pass a path to a recipe YAML)"
        )
    return recipes[name_or_path]


def _profile_file(profile: str) -> Path:
    path = Path(profile)
    if path.suffix in {".yaml", ".yml"}:
        return path
    candidate = configs_dir() / "profiles" / f"{profile}.yaml"
    if not candidate.exists():
        known = sorted(p.stem for p in (configs_dir() / "profiles").glob("*.yaml"))
        raise ConfigError(f"unknown profile {profile!r}; known profiles: {', '.join(known)}")
    return candidate


def _normalise_stages(raw: Any, source: str) -> list[dict[str, Any]]:
    """Recipe stage lists are written flat (``- stage: x`` plus options); split options from identity."""
    if not isinstance(raw, list):
        raise ConfigError(f"{source}: 'stages' must be a list")
    entries = []
    for i, item in enumerate(raw):
        if not isinstance(item, dict) or "stage" not in item:
            raise ConfigError(f"{source}: stages[{i}] needs a 'stage:' key naming the stage type")
        options = {k: v for k, v in item.items() if k not in {"stage", "name"}}
        entries.append({"stage": item["stage"], "name": item.get("name", item["stage"]), "options": options})
    return entries


def _apply_overlay(recipe: dict[str, Any], overlay: dict[str, Any], source: str) -> None:
    """Merge a profile/config overlay: top-level recipe keys, plus ``stages: {name: {option: value}}``."""
    stage_overrides = overlay.get("stages", {})
    if not isinstance(stage_overrides, dict):
        raise ConfigError(f"{source}: 'stages' in an overlay maps stage names to options")
    by_name = {entry["name"]: entry for entry in recipe["stages"]}
    for name, options in stage_overrides.items():
        if name in by_name:
            if not isinstance(options, dict):
                raise ConfigError(f"{source}: stages.{name} must be a mapping of options")
            by_name[name]["options"].update(options)
    for key, value in overlay.items():
        if key == "stages":
            continue
        if isinstance(value, dict) and isinstance(recipe.get(key), dict):
            recipe[key].update(value)
        else:
            recipe[key] = value


def parse_set(pairs: list[str]) -> dict[str, Any]:
    """``--set stage.key=value`` / ``--set key=value`` into an overlay; values are parsed as YAML scalars."""
    overlay: dict[str, Any] = {"stages": {}}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {pair!r}: expected KEY=VALUE, e.g. --set transcribe.variants=2")
        try:
            value = yaml.safe_load(text) if text else ""
        except yaml.YAMLError as exc:
            reason = " ".join(str(exc).split())
            raise ConfigError(f"--set {pair!r}: the value is not plain YAML ({reason})") from exc
        head, dot, rest = key.partition(".")
        if head == "stages" and not dot:
            raise ConfigError(f"--set {pair!r}: set a stage's option as --set STAGE.OPTION=VALUE")
        if not dot:
            overlay[head] = value
        elif head == "limits":
            overlay.setdefault("limits", {})[rest] = value
        else:
            overlay["stages"].setdefault(head, {})[rest] = value
    return overlay


def _unknown_stage_overrides(recipe: dict[str, Any], overlay: dict[str, Any]) -> list[str]:
    names = {entry["name"] for entry in recipe["stages"]}
    return [name for name in overlay.get("stages", {}) if name not in names]


def load_recipe(
    name_or_path: str,
    profile: str | None = DEFAULT_PROFILE,
    config_file: str | None = None,
    sets: list[str] | tuple[str, ...] = (),
    seed: int | None = None,
) -> Recipe:
    """Resolve a recipe with its profile and overrides into a validated ``Recipe``."""
    path = _recipe_file(name_or_path)
    raw = copy.deepcopy(_load_yaml(path))
    raw["stages"] = _normalise_stages(raw.get("stages", []), str(path))
    if profile:
        _apply_overlay(raw, _load_yaml(_profile_file(profile)), f"profile {profile}")
    if config_file:
        _apply_overlay(raw, _load_yaml(Path(config_file)), config_file)
    if sets:
        overlay = parse_set(list(sets))
        unknown = _unknown_stage_overrides(raw, overlay)
        if unknown:
            names = [entry["name"] for entry in raw["stages"]]
            raise ConfigError(
                f"--set names stage {unknown[0]!r}, which recipe {raw.get('name')!r} does not have"
                f"{did_you_mean(unknown[0], [*names, *Recipe.model_fields])}; its stages are {names}"
            )
        _apply_overlay(raw, overlay, "--set")
    if seed is not None:
        raw["seed"] = seed
    try:
        return Recipe.model_validate(raw)
    except ValidationError as exc:
        known = [*Recipe.model_fields, *Limits.model_fields]
        raise ConfigError(describe_validation_error(exc, f"recipe {path.name}", known)) from exc


def did_you_mean(name: str, known: list[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest known name, or nothing when none is close."""
    hint = difflib.get_close_matches(name, known, n=1)
    return f" (did you mean {hint[0]!r}?)" if hint else ""


def describe_validation_error(exc: ValidationError, where: str, known: list[str] | None = None) -> str:
    """One line per problem, each naming the dotted key, with a close match for a misspelt key."""
    lines = []
    for err in exc.errors():
        key = ".".join(str(part) for part in err["loc"])
        line = f"{where}: {key}: {err['msg']}"
        if err["type"] == "extra_forbidden" and known:
            line += did_you_mean(str(err["loc"][-1]), known)
        lines.append(line)
    return "\n".join(lines)
