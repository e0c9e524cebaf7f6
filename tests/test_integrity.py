"""Integrity: resume verifies what it skips, validate catches every mismatch, storage errors stop cleanly.

The runs here use the in-process executor (``--executor local``): what is checked is the corpus logic,
which both executors share, and it keeps these tests fast.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from augpipe.pipeline import layout
from augpipe.pipeline.config import load_recipe
from augpipe.pipeline.run import run_recipe
from augpipe.pipeline.validate import validate_corpus
from tests.cli import invoke
from tests.corpora import text_corpus

LOCAL = ("--executor", "local", "--quiet")


def run(inp: Path, out: Path, *extra: str) -> tuple[int, str]:
    return invoke("run", "passthrough", "--input", str(inp), "--output", str(out), *LOCAL, *extra)


@pytest.fixture()
def corpus(tmp_path: Path) -> tuple[Path, Path]:
    """Six input shards of four sentences, and a finished passthrough corpus made from them."""
    inp = text_corpus(tmp_path / "in", shards=6, per_shard=4)
    out = tmp_path / "out"
    code, output = run(inp, out)
    assert code == 0, output
    return inp, out


def snapshot(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.tar")) + sorted(out.glob("*.parquet"))}


def manifest(out: Path) -> dict:
    return json.loads((out / layout.MANIFEST).read_text())


@pytest.mark.parametrize("damage", ["flip one byte", "truncate to half"])
def test_resume_redoes_a_damaged_shard_and_says_so(corpus, damage):
    inp, out = corpus
    good = snapshot(out)
    tar = out / "shard-00002.tar"
    blob = bytearray(tar.read_bytes())
    if damage == "flip one byte":
        blob[700] ^= 0xFF
    else:
        del blob[len(blob) // 2 :]
    tar.write_bytes(bytes(blob))
    assert validate_corpus(out)
    code, output = run(inp, out)
    assert code == 0, output
    assert "shard-00002: output damaged (shard-00002.tar" in output and "redone" in output
    assert snapshot(out) == good
    assert manifest(out)["runs"][-1]["shards_added"] == ["shard-00002"]
    assert validate_corpus(out) == []


def test_verify_catches_damage_that_kept_size_and_mtime(corpus):
    inp, out = corpus
    tar = out / "shard-00001.tar"
    before = tar.stat()
    blob = bytearray(tar.read_bytes())
    blob[900] ^= 0x01
    tar.write_bytes(bytes(blob))
    os.utime(tar, ns=(before.st_atime_ns, before.st_mtime_ns))
    code, output = run(inp, out)
    assert code == 0 and "redone" not in output  # size and mtime look right: the cheap check trusts it
    code, output = run(inp, out, "--verify")
    assert code == 0 and "shard-00001: output damaged (shard-00001.tar checksum differs), redone" in output
    assert validate_corpus(out) == []


def test_validate_catches_edited_counts_and_a_foreign_shard(corpus):
    inp, out = corpus
    edited = manifest(out)
    edited["outputs"][0]["samples"] = 13
    edited["samples"]["out"] = 99
    (out / layout.MANIFEST).write_text(json.dumps(edited))
    code, output = invoke("validate", str(out))
    assert code == 5
    assert "edited since augpipe wrote it" in output
    assert "shard-00000.tar: holds 4 samples, the manifest says 13" in output
    assert "samples.out is 99, the shards hold 24" in output

    code, _ = run(inp, out)  # the rerun rewrites the manifest from the shards' own records
    assert code == 0 and validate_corpus(out) == []
    shutil.copy(out / "shard-00000.tar", out / "shard-99999.tar")
    (problem,) = validate_corpus(out)
    assert problem.startswith("shard-99999.tar: a data file the manifest does not list")
    code, output = run(inp, out)
    assert code == 0 and "set aside 1 data files no shard owns (shard-99999.tar)" in output
    assert not (out / "shard-99999.tar").exists()
    assert list((out / layout.SET_ASIDE_DIR).rglob("shard-99999.tar"))
    assert validate_corpus(out) == []


def test_an_input_that_vanishes_keeps_the_manifest_and_counts_its_samples(tmp_path, monkeypatch):
    import augpipe.pipeline.local_executor as local

    inp = text_corpus(tmp_path / "in", shards=3, per_shard=4)
    original = local.read_source

    def read_then_lose(unit, *args, **kwargs):
        if unit.shard_id == "shard-00001":  # gone before it is read
            (inp / unit.rel).unlink()
        result = original(unit, *args, **kwargs)
        if unit.shard_id == "shard-00002":  # gone right after it was read
            (inp / unit.rel).unlink()
        return result

    monkeypatch.setattr(local, "read_source", read_then_lose)
    result = run_recipe(load_recipe("passthrough"), inp, tmp_path / "out", progress=False, executor="local")
    written = result.manifest
    assert written["samples"] == {"in": 12, "out": 8, "failed": 4, "failure_rate": 4 / 12}
    broken = written["incomplete_shards"]["shard-00001"]
    assert broken["cause"] == "FileNotFoundError" and broken["samples"] == 4
    assert "\x1b" not in broken["message"] and "shard-00001.tar" in broken["message"]
    assert written["failures"]["by_cause"] == {"shard_not_written:FileNotFoundError": 4}
    assert [i["path"].rsplit("/", 1)[1] for i in written["inputs"]] == ["shard-00000.tar", "shard-00002.tar"]
    assert not result.ok


def test_outputs_of_vanished_inputs_are_set_aside(corpus):
    inp, out = corpus
    (inp / "shard-00005.tar").unlink()
    code, output = run(inp, out)
    assert code == 0, output
    assert "set aside 1 shards whose inputs are gone (shard-00005)" in output
    assert not (out / "shard-00005.tar").exists() and not (out / layout.stats_file("shard-00005")).exists()
    written = manifest(out)
    assert written["runs"][-1]["orphans_set_aside"] == ["shard-00005"]
    assert [o["shard"] for o in written["outputs"]][-1] == "shard-00004"
    assert validate_corpus(out) == []


def test_a_run_log_on_a_full_disk_stops_quietly_and_says_so_once(capsys, caplog):
    """The run log shares the output's disk: when that fills, the log file must not crash the run's
    clean stop (its last flush used to raise on close: exit 1 instead of 6) nor print a traceback per line."""
    from augpipe.pipeline.execution import log
    from augpipe.pipeline.runlog import RunLogHandler

    handler = RunLogHandler("/dev/full")  # every write fails with ENOSPC, as on a full disk
    log.addHandler(handler)
    try:
        for i in range(3):
            log.warning("shard-%05d failed", i)
    finally:
        log.removeHandler(handler)
    handler.close()
    warnings = [r.getMessage() for r in caplog.records if "is no longer written" in r.getMessage()]
    assert warnings == ["the run log /dev/full is no longer written: [Errno 28] No space left on device"]
    assert "Logging error" not in capsys.readouterr().err


@pytest.fixture()
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 256 KiB tmpfs mount (needs root, as CI and the dev machines have)."""
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)]).returncode:
        pytest.skip("cannot mount a tmpfs here (not root)")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.parametrize("shards,per_shard", [(8, 20), (12, 12)])
def test_a_full_disk_stops_cleanly_with_exit_6(tmpfs, tmp_path, shards, per_shard):
    inp = text_corpus(tmp_path / "in", shards=shards, per_shard=per_shard)
    out = tmpfs / "out"
    code, output = run(inp, out)
    assert code == 6, output
    assert "No space left on device" in output and "Traceback" not in output
    for tar in out.glob("*.tar"):
        assert (out / layout.stats_file(tar.stem)).exists(), f"{tar.name} was left without its stats record"
    assert not [p.name for p in out.iterdir() if p.name.endswith(".partial")]
    if (out / layout.MANIFEST).exists():
        assert validate_corpus(out) == [], "the folder holds only what the manifest lists"
    else:  # the disk filled before the manifest: the run says so
        assert "manifest: not written (OSError: [Errno 28] No space left on device)" in output, output


def test_a_tiny_disk_is_refused_before_any_work(tmpfs, tmp_path):
    inp = tmp_path / "in"
    inp.mkdir()
    (inp / "big.tar").write_bytes(b"\0" * 200_000)
    code, output = run(inp, tmpfs / "out")
    assert code == 6 and "one shard needs about" in output
    assert not list((tmpfs / "out").glob("*.tar"))


def test_a_read_only_output_is_refused_before_any_work(tmpfs, tmp_path):
    inp = text_corpus(tmp_path / "in", shards=1, per_shard=2)
    subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], check=True)
    code, output = run(inp, tmpfs / "out")
    assert code == 6, output
    assert "not writable" in output and "Read-only file system" in output
