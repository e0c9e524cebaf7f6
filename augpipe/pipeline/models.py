"""Where model weights come from: a packaged model, a local path, or a hub id already in the local cache.

Nothing here downloads. A model that cannot be found fails before any worker starts, with a message
that says how to provide it, because a missing model found an hour into a GPU job wastes the hour.
"""

from __future__ import annotations

import hashlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path

PACKAGED_PREFIX = "pkg://"


class ModelNotFoundError(RuntimeError):
    """A configured model is neither a packaged model, a local path, nor in the local hub cache."""


@dataclass(frozen=True)
class ResolvedModel:
    """A model reference as configured, and where it was found (``path`` is None for a cached hub id)."""

    ref: str
    path: Path | None
    revision: str

    @property
    def location(self) -> str:
        """What to hand to a library's ``from_pretrained``: a path when we have one, else the hub id."""
        return str(self.path) if self.path is not None else self.ref


def _packaged(ref: str) -> Path:
    package, _, inner = ref[len(PACKAGED_PREFIX) :].partition("/")
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"model {ref!r}: Python package {package!r} is not installed; install it "
            f"(pip install {package.replace('_', '-')}) or point the stage at a local path"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / inner
    if not path.exists():
        raise ModelNotFoundError(f"model {ref!r}: {path} is missing from package {package!r}")
    return path


def _revision_of(path: Path) -> str:
    """A cheap content identity for a local model (file names and sizes), so lineage tells models apart."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    stamp = ";".join(f"{p.relative_to(path.parent)}:{p.stat().st_size}" for p in files)
    return "local:" + hashlib.sha256(stamp.encode()).hexdigest()[:16]


def _hub_cached(ref: str) -> ResolvedModel:
    """A hub id counts only if it is already in the local Hugging Face cache (no machine here can fetch)."""
    try:
        from huggingface_hub import snapshot_download

        path = Path(snapshot_download(ref, local_files_only=True))
    except Exception as exc:
        raise ModelNotFoundError(
            f"model {ref!r} is not a local path and is not in the Hugging Face cache "
            f"({type(exc).__name__}); download it on a machine with network access "
            f"(huggingface-cli download {ref}) or set the stage's model to a local directory"
        ) from exc
    return ResolvedModel(ref=ref, path=path, revision=path.name)


def resolve_model(ref: str) -> ResolvedModel:
    """Find ``ref`` without loading it; raise ModelNotFoundError saying what to do if it is absent."""
    if ref.startswith(PACKAGED_PREFIX):
        path = _packaged(ref)
        return ResolvedModel(ref=ref, path=path, revision=_revision_of(path))
    local = Path(ref).expanduser()
    if local.exists():
        return ResolvedModel(ref=ref, path=local.resolve(), revision=_revision_of(local))
    if ref.startswith(("/", "./", "../", "~")) or ref.count("/") > 1:
        raise ModelNotFoundError(f"model path {ref!r} does not exist")
    return _hub_cached(ref)
