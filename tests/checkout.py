"""A copy of this repository as a user's working checkout, holding what a checkout also accumulates
(a virtualenv, corpora, model folders, caches) that must never travel to a cluster or into an image."""

from __future__ import annotations

import shutil
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

LOCAL_ONLY = [
    ".venv/lib/python3.11/site-packages/torch/lib/libtorch_cuda.so",
    "out/shard-00000.tar",
    "demo/text/shard-00000.tar",
    "data/in/shard-00000.tar",
    "models/huggingface/hub/models--x/blob",
    "augpipe/__pycache__/cli.cpython-311.pyc",
    ".pytest_cache/v/cache/lastfailed",
]
"""Paths under a checkout that belong to that machine alone."""

SOURCES = [
    "pyproject.toml",
    "Makefile",
    "constraints.txt",
    "augpipe/pipeline/cli.py",
    "augpipe/demo/sentences.csv",
]
"""Paths that an image build or a job's working directory cannot do without."""


def copy_checkout(destination: Path) -> Path:
    """The repository's sources copied to ``destination``, plus one file at each LOCAL_ONLY path."""

    def not_sources(directory: str, names: list[str]) -> set[str]:
        top_level = Path(directory) == REPO
        return {
            name
            for name in names
            if name in (".git", "__pycache__")
            or name.endswith((".egg-info", "_cache"))
            or (top_level and name in (".venv", "out", "demo", "data", "models"))
        }

    shutil.copytree(REPO, destination, ignore=not_sources)
    for path in LOCAL_ONLY:
        (destination / path).parent.mkdir(parents=True, exist_ok=True)
        (destination / path).write_bytes(b"\0" * 1024)
    return destination
