"""The resume check and the shard writer as units: a committed shard is skipped only when its stats record
matches the run, its input and its drop set, and every file it owns is intact; the writer records what
landed (size, checksum) and names outputs ``KEY`` or ``KEY-tag-i``. No Ray, no subprocess."""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
from pathlib import Path

import pytest

from augpipe.pipeline import corpus, layout
from augpipe.pipeline.index import IndexSummary
from augpipe.pipeline.inputs import discover_inputs
from augpipe.pipeline.rows import Failure
from augpipe.pipeline.storage import Store
from augpipe.pipeline.writer import output_key, output_keys, read_stats, write_quarantine, write_stats

SHA = "ab" * 32


def committed(tmp_path: Path) -> tuple[Store, list, dict]:
    """An output store with one committed shard (a data file and a quarantine) for input shard-00000."""
    (tmp_path / "in").mkdir()
    with tarfile.open(tmp_path / "in" / "shard-00000.tar", "w"):
        pass
    units = discover_inputs(tmp_path / "in", shard_size=10)
    store = Store(str(tmp_path / "out"))
    store.write_bytes("shard-00000.tar", b"x" * 100)
    quarantine = write_quarantine(store, "shard-00000", [Failure("k", "read", "empty_text", "empty")])
    found = store.stat("shard-00000.tar")
    stats = {
        "shard": "shard-00000",
        "fingerprint": "fp",
        "input_identity": {"sha256": SHA},
        "drop_digest": "d1",
        "outputs": [
            {
                "path": "shard-00000.tar",
                "bytes": 100,
                "mtime_ns": found.mtime_ns,
                "sha256": hashlib.sha256(b"x" * 100).hexdigest(),
            }
        ],
        "quarantine": quarantine,
    }
    write_stats(store, "shard-00000", stats)
    return store, units, stats


def verify(store, units, *, fingerprint="fp", sha=SHA, drop="d1", full_hash=False):
    index = {"shard-00000": IndexSummary("shard-00000", 0, sha, {})}
    return corpus.verify_done(store, units, fingerprint, index, {"shard-00000": drop}, full_hash)


def test_an_intact_shard_of_the_same_run_is_done(tmp_path):
    store, units, stats = committed(tmp_path)
    found = verify(store, units)
    assert found.done == {"shard-00000": stats} and found.redo == {}
    assert read_stats(store, "shard-00000") == stats


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"fingerprint": "other"}, "made with another configuration"),
        ({"sha": "cd" * 32}, "its input shard-00000.tar changed"),
        ({"drop": "d2"}, "the keys it shares with earlier shards changed"),
    ],
)
def test_a_shard_of_another_run_input_or_drop_set_is_redone(change, reason, tmp_path):
    store, units, _ = committed(tmp_path)
    found = verify(store, units, **change)
    assert found.done == {} and found.redo == {"shard-00000": reason}


def test_a_shard_without_a_stats_record_is_neither_done_nor_redone(tmp_path):
    store, units, _ = committed(tmp_path)
    store.delete(layout.stats_file("shard-00000"))
    found = verify(store, units)
    assert found.done == {} and found.redo == {}


def test_damage_names_the_file_and_what_is_wrong(tmp_path):
    store, units, stats = committed(tmp_path)
    path = tmp_path / "out" / "shard-00000.tar"
    assert corpus.damage(store, stats, full_hash=True) is None
    mtime = path.stat().st_mtime_ns
    path.write_bytes(b"y" * 100)  # same size; same mtime restored: only a full hash can tell
    os.utime(path, ns=(mtime, mtime))
    assert corpus.damage(store, stats, full_hash=False) is None
    assert corpus.damage(store, stats, full_hash=True) == "shard-00000.tar checksum differs"
    assert verify(store, units, full_hash=True).redo == {
        "shard-00000": "output damaged (shard-00000.tar checksum differs)"
    }
    path.write_bytes(b"y" * 100)  # a new mtime: checked by hash without asking
    assert corpus.damage(store, stats, full_hash=False) == "shard-00000.tar checksum differs"
    path.write_bytes(b"x" * 99)
    assert corpus.damage(store, stats, full_hash=False) == "shard-00000.tar has 99 bytes, not 100"
    path.unlink()
    assert corpus.damage(store, stats, full_hash=False) == "shard-00000.tar is missing"
    path.write_bytes(b"x" * 100)
    stats["outputs"][0]["mtime_ns"] = path.stat().st_mtime_ns
    store.delete(stats["quarantine"])
    assert corpus.damage(store, stats, full_hash=False) == f"{stats['quarantine']} is missing"


def test_shard_files_lists_everything_a_shard_owns(tmp_path):
    _, _, stats = committed(tmp_path)
    assert corpus.shard_files(stats) == [
        "shard-00000.tar",
        stats["quarantine"],
        layout.stats_file("shard-00000"),
    ]


def test_output_keys_name_sources_and_variants_and_refuse_collisions():
    assert output_key({"key": "a", "variant": ()}, "bs") == "a"
    assert output_key({"key": "a", "variant": (2,)}, "bs") == "a-bs-2"
    assert output_key({"key": "a", "variant": (1, 3)}, "bc") == "a-bc-1-3"
    assert output_key({"key": "a", "variant": (1,), "output_key": "a-bs-0"}, "bs") == "a-bs-0"
    with pytest.raises(RuntimeError, match="generated keys collide"):
        output_keys([{"key": "a"}, {"key": "a", "variant": ()}], "bs")


def test_the_quarantine_holds_every_failure_with_its_shard(tmp_path):
    store = Store(str(tmp_path))
    assert write_quarantine(store, "s", []) is None
    failures = [Failure("k1", "read", "empty_text", "m1"), Failure("k2", "embed", "model_error", "m2")]
    rel = write_quarantine(store, "s", failures)
    with tarfile.open(tmp_path / rel) as tar:
        records = [json.loads(tar.extractfile(m).read()) for m in tar.getmembers()]
        assert [m.name for m in tar.getmembers()] == ["q000000.error.json", "q000001.error.json"]
    assert [(r["key"], r["stage"], r["cause"], r["message"], r["shard"]) for r in records] == [
        ("k1", "read", "empty_text", "m1", "s"),
        ("k2", "embed", "model_error", "m2", "s"),
    ]
