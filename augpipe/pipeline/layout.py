"""Where everything sits in an output folder, so the folder itself loads as a dataset.

Data files (``NAME.tar`` + ``NAME.parquet``) and the dataset card (``README.md``) sit at the top;
augpipe's own files sit under ``_augpipe/``, a folder that pyarrow, Ray Data and Hugging Face ``datasets``
skip (a leading ``_``). Corpora written by augpipe 0.1 kept these at the top (``manifest.json``,
``_stats/``, ``artifacts/``, ``quarantine/``, ``.cache/``); ``migrate_legacy`` moves them into place, and
readers fall back to them.
"""

from __future__ import annotations

from augpipe.pipeline.storage import Store

AUGPIPE_DIR = "_augpipe"
MANIFEST = f"{AUGPIPE_DIR}/manifest.json"
STATS_DIR = f"{AUGPIPE_DIR}/stats"
QUARANTINE_DIR = f"{AUGPIPE_DIR}/quarantine"
ARTIFACTS_DIR = f"{AUGPIPE_DIR}/artifacts"
CACHE_DIR = f"{AUGPIPE_DIR}/cache"
INDEX_DIR = f"{AUGPIPE_DIR}/index"
LOGS_DIR = f"{AUGPIPE_DIR}/logs"
SET_ASIDE_DIR = f"{AUGPIPE_DIR}/set-aside"
LOCK = f"{AUGPIPE_DIR}/lock"
CARD = "README.md"
DATA_SUFFIXES = (".tar", ".parquet")

LEGACY_MANIFEST = "manifest.json"
_LEGACY = {
    LEGACY_MANIFEST: MANIFEST,
    "_stats": STATS_DIR,
    "quarantine": QUARANTINE_DIR,
    "artifacts": ARTIFACTS_DIR,
    ".cache": CACHE_DIR,
}


def stats_file(shard_id: str) -> str:
    return f"{STATS_DIR}/{shard_id}.json"


def quarantine_file(shard_id: str) -> str:
    return f"{QUARANTINE_DIR}/{shard_id}.tar"


def data_files(shard_id: str) -> tuple[str, str]:
    """The tar and Parquet sidecar of an output shard."""
    return f"{shard_id}.tar", f"{shard_id}.parquet"


def cache_files(step: str, chain_fp: str, shard_id: str) -> tuple[str, str]:
    folder = f"{CACHE_DIR}/{step}-{chain_fp}"
    return f"{folder}/{shard_id}.parquet", f"{folder}/{shard_id}.history.json"


def artifact_dir(step: str, chain_fp: str) -> str:
    """Where a global stage's fitted state lives: versioned by the step's chain fingerprint."""
    return f"{ARTIFACTS_DIR}/{step}-{chain_fp}"


def manifest_path(store: Store) -> str | None:
    """The manifest's path in ``store`` (the legacy place for 0.1 corpora), or None when there is none."""
    for rel in (MANIFEST, LEGACY_MANIFEST):
        if store.exists(rel):
            return rel
    return None


def is_legacy(store: Store) -> bool:
    return store.exists(LEGACY_MANIFEST) and not store.exists(MANIFEST)


def migrate_legacy(store: Store) -> list[str]:
    """Move a 0.1 corpus's own files under ``_augpipe/``; returns what moved (old names)."""
    moved = []
    for old, new in _LEGACY.items():
        if old == LEGACY_MANIFEST:
            if store.exists(old):
                store.move(old, new)
                moved.append(old)
            continue
        for entry in store.list_files(old, recursive=True):
            store.move(entry.rel, new + entry.rel[len(old) :])
            moved.append(entry.rel)
        if moved and store.is_dir(old):
            store.delete_tree(old)
    return moved


def top_level_data(store: Store) -> list[str]:
    """Data files directly in the folder (what a trainer globbing ``*.tar``/``*.parquet`` would read)."""
    return [f.rel for f in store.list_files() if f.rel.endswith(DATA_SUFFIXES)]
