"""back-speech end to end with the real offline models (piper, faster-whisper tiny.en, MiniLM) on Ray."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import webdataset as wds

from augpipe.methods.text_distance import is_copy, paraphrase_edit_ratio
from augpipe.pipeline import layout
from augpipe.pipeline.config import load_recipe
from augpipe.pipeline.corpus import CorpusConflict
from augpipe.pipeline.manifest import validate_manifest
from augpipe.pipeline.run import run_recipe
from tests.corpora import SENTENCES, write_text_shard
from tests.faults import fault_env

SETS = ["perturb_audio.variants=3", "multiple=2"]
EXTRA = [
    ("a004", "The children laughed at the little brown dog in the park.", "positive"),
    ("a005", "The train was cancelled again because of the storm.", "negative"),
]
STAGES = [
    "synthesize_speech",
    "perturb_audio",
    "transcribe",
    "filter_paraphrase",
    "score_similarity",
    "select",
]


@pytest.fixture(scope="module")
def small_text(tmp_path_factory) -> Path:
    """Three shards of two sentences: enough shards to kill a run between commits."""
    folder = tmp_path_factory.mktemp("small_text")
    pairs = [*SENTENCES, *EXTRA]
    for i in range(3):
        write_text_shard(folder / f"shard-{i:05d}.tar", pairs[2 * i : 2 * i + 2])
    return folder


@pytest.fixture(scope="module")
def first_run(small_text, tmp_path_factory, ray_session) -> Path:
    out = tmp_path_factory.mktemp("bs_first")
    result = run_recipe(
        load_recipe("back-speech", sets=SETS), small_text, out, progress=False, keep_cache=True
    )
    assert result.ok
    return out


def read_corpus(out: Path) -> list[tuple[str, str, str]]:
    """(key, text, label) of every sample, read with webdataset alone."""
    samples = []
    for tar in sorted(out.glob("shard-*.tar")):
        for sample in wds.WebDataset(str(tar), shardshuffle=False):
            samples.append((sample["__key__"], sample["txt"].decode(), json.loads(sample["json"])["label"]))
    return samples


def test_paraphrases_are_filtered_scored_and_carry_lineage(first_run, small_text):
    table = [row for p in sorted(first_run.glob("shard-*.parquet")) for row in pq.read_table(p).to_pylist()]
    labels = {key: label for key, _, label in [*SENTENCES, *EXTRA]}
    assert table, "back-speech produced no paraphrase at all"
    for row in table:
        parent = row["parent_key"]
        assert row["key"].startswith(f"{parent}-bs-")
        assert row["label"] == labels[parent]
        assert not is_copy(row["source_text"], row["text"])
        assert paraphrase_edit_ratio(row["source_text"], row["text"]) <= 0.2
        assert row["score_edit_ratio"] <= 0.2 and -1.0 <= row["score_similarity"] <= 1.0
        lineage = json.loads(row["lineage"])
        assert row["stage_chain"] == STAGES and set(lineage) == set(STAGES)
        perturbation = lineage["perturb_audio"]
        assert {"semitones", "rate", "seed"} <= set(perturbation)
        assert lineage["select"]["k"] == 2 and lineage["select"]["pool_size"] >= 1
    per_source: dict[str, int] = {}
    for row in table:
        per_source[row["parent_key"]] = per_source.get(row["parent_key"], 0) + 1
    assert max(per_source.values()) <= 2
    manifest = json.loads((first_run / layout.MANIFEST).read_text())
    validate_manifest(manifest)
    stages = manifest["stages"]
    assert stages["synthesize_speech"]["samples_out"] == 6
    assert stages["perturb_audio"]["samples_out"] == 18
    assert stages["select"]["samples_out"] == len(table) == manifest["samples"]["out"]
    assert [m["backend"] for m in manifest["models"] if "backend" in m][:2] == ["piper", "faster_whisper"]


def test_changing_the_filter_reuses_speech_and_transcripts(first_run, tmp_path, small_text, ray_session):
    out = tmp_path / "reuse"
    shutil.copytree(first_run, out)
    looser = load_recipe("back-speech", sets=[*SETS, "filter_paraphrase.max_edit_ratio=0.35"])
    with pytest.raises(CorpusConflict, match=r"stages.filter_paraphrase.max_edit_ratio: 0.2 -> 0.35"):
        run_recipe(looser, small_text, out, progress=False)
    result = run_recipe(looser, small_text, out, progress=False, overwrite=True)
    assert result.manifest["runs"][-1]["overwrite"] is True
    reused = result.manifest["reused"]
    assert reused["synthesize_speech"] == reused["perturb_audio"] == reused["transcribe"] == 3
    assert "filter_paraphrase" not in reused
    assert (
        result.manifest["samples"]["out"]
        >= json.loads((first_run / layout.MANIFEST).read_text())["samples"]["out"]
    )


def _augpipe(*args: str) -> list[str]:
    return [sys.executable, "-m", "augpipe.pipeline.cli", *args]


def test_sigkill_then_rerun_equals_an_uninterrupted_run(first_run, small_text, tmp_path):
    """Same seed, same bytes: a run killed after its first commit and resumed writes what an uninterrupted
    run wrote (keys, texts, tar bytes), and prunes the caches of the shards it finished."""
    out = tmp_path / "killed"
    command = _augpipe(
        "run",
        "back-speech",
        "--input",
        str(small_text),
        "--output",
        str(out),
        "--quiet",
        *[arg for pair in SETS for arg in ("--set", pair)],
    )
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    # The commits of shards 1 and 2 never finish, so the kill lands with exactly shard 0 committed.
    hold = ("shard-00001", "shard-00002")
    held = fault_env(tmp_path / "hold", "commit_shard", "none", once=True, hold=hold)
    victim = subprocess.Popen(
        command, start_new_session=True, env=held, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 300
    while not list((out / layout.STATS_DIR).glob("*.json")) and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait()
    committed = sorted(p.name for p in (out / layout.STATS_DIR).glob("*.json"))
    assert committed == ["shard-00000.json"], "the kill should land after the first shard commit"

    subprocess.run(command, env=env, check=True, timeout=600, capture_output=True)
    assert read_corpus(out) == read_corpus(first_run)
    keys = [key for key, _, _ in read_corpus(out)]
    assert len(keys) == len(set(keys))
    assert not list(out.rglob("*.partial"))
    for name in ("shard-00000.tar", "shard-00001.tar", "shard-00002.tar"):
        assert (out / name).read_bytes() == (first_run / name).read_bytes()
    assert not list((out / layout.CACHE_DIR).rglob("*.parquet")), "caches of finished shards are pruned"
