"""No silent data loss from damaged or duplicate input, concurrent runs, or a foreign output folder.

Every case builds its hostile input in the test and checks what a user relies on: the counts, the exit
code, the quarantine causes, and what is on disk afterwards.
"""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import webdataset as wds

from augpipe.pipeline import layout
from tests.cli import augpipe, invoke
from tests.corpora import add_member, text_corpus, write_text_shard

LOCAL = ("--executor", "local", "--quiet")


def run(inp: Path, out: Path, *extra: str, recipe: str = "passthrough") -> tuple[int, str]:
    return invoke("run", recipe, "--input", str(inp), "--output", str(out), *LOCAL, *extra)


def manifest(out: Path) -> dict:
    return json.loads((out / layout.MANIFEST).read_text())


def quarantined(out: Path) -> list[tuple[str, str]]:
    found = []
    for tar in sorted((out / layout.QUARANTINE_DIR).glob("*.tar")):
        for sample in wds.WebDataset(str(tar), shardshuffle=False):
            record = json.loads(sample["error.json"])
            found.append((record["key"], record["cause"]))
    return found


def keys(out: Path) -> list[str]:
    return [
        s["__key__"]
        for tar in sorted(out.glob("*.tar"))
        for s in wds.WebDataset(str(tar), shardshuffle=False)
    ]


def ten_sample_tar() -> tuple[bytes, dict[str, int]]:
    """A tar of ten one-member samples, and each member's header offset."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for i in range(10):
            add_member(tar, f"s{i}.txt", f"Sentence number {i}.".encode())
    blob = buffer.getvalue()
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        offsets = {m.name: m.offset for m in tar.getmembers()}
    return blob, offsets


@pytest.mark.parametrize("damage", ["bad header checksum", "cut inside a header"])
def test_a_damaged_tar_header_is_reported_with_its_offset(damage, tmp_path):
    blob, offsets = ten_sample_tar()
    at = offsets["s4.txt"]
    if damage == "bad header checksum":
        broken = bytearray(blob)
        broken[at + 148] ^= 0x11  # the header's checksum field
        blob = bytes(broken)
    else:
        blob = blob[: at + 100]
    inp = tmp_path / "in"
    inp.mkdir()
    (inp / "shard-00000.tar").write_bytes(blob)
    code, output = run(inp, tmp_path / "out", "--max-failure-rate", "0.5")
    assert code == 0, output
    written = manifest(tmp_path / "out")
    causes = quarantined(tmp_path / "out")
    assert ("shard-00000.tar", "corrupt_shard") in causes
    message = written["failures"]["examples"][0]["message"]
    assert f"damaged at byte {at:,}" in message
    if damage == "bad header checksum":  # the reader resynchronises on the next header
        assert keys(tmp_path / "out") == [f"s{i}" for i in range(10) if i != 4]
        assert written["samples"] == {"in": 10, "out": 9, "failed": 1, "failure_rate": 0.1}
    else:
        assert keys(tmp_path / "out") == [f"s{i}" for i in range(4)]
        assert "ends inside a member header" in message
        assert written["samples"] == {"in": 5, "out": 4, "failed": 1, "failure_rate": 0.2}


def test_a_zero_byte_shard_counts_as_failed_input(tmp_path):
    inp = text_corpus(tmp_path / "in", shards=1, per_shard=4)
    (inp / "shard-00001.tar").write_bytes(b"")
    code, output = run(inp, tmp_path / "out")
    assert code == 3 and "exceeds --max-failure-rate" in output
    written = manifest(tmp_path / "out")
    assert written["samples"] == {"in": 5, "out": 4, "failed": 1, "failure_rate": 0.2}
    assert quarantined(tmp_path / "out") == [("shard-00001.tar", "corrupt_shard")]


def test_repeated_keys_keep_the_first_copy_and_quarantine_the_rest(tmp_path):
    inp = tmp_path / "in"
    inp.mkdir()
    write_text_shard(
        inp / "a-00000.tar", [("k1", "First k1.", "x"), ("k2", "Only k2.", "y"), ("k1", "Second k1.", "x")]
    )
    write_text_shard(inp / "b-00000.tar", [("k2", "k2 again, later shard.", "y"), ("k3", "Only k3.", "z")])
    code, output = run(inp, tmp_path / "out", "--max-failure-rate", "0.5")
    assert code == 0, output
    out = tmp_path / "out"
    assert keys(out) == ["k1", "k2", "k3"]
    texts = {
        s["__key__"]: s["txt"].decode() for s in wds.WebDataset(str(out / "a-00000.tar"), shardshuffle=False)
    }
    assert texts["k1"] == "First k1."
    assert sorted(quarantined(out)) == [("k1", "duplicate_key"), ("k2", "duplicate_key")]
    messages = {e["key"]: e["message"] for e in manifest(out)["failures"]["examples"]}
    assert "also in a-00000.tar, which comes first" in messages["k2"]
    assert manifest(out)["samples"] == {"in": 5, "out": 3, "failed": 2, "failure_rate": 0.4}


def test_a_table_with_repeated_keys_is_written_minus_the_repeats(tmp_path):
    table = tmp_path / "t.csv"
    table.write_text("key,text,label\na,One.,x\nb,Two.,y\na,One again.,x\nc,Three.,z\n")
    code, output = run(table, tmp_path / "out", "--max-failure-rate", "0.5")
    assert code == 0, output
    assert keys(tmp_path / "out") == ["a", "b", "c"]
    assert quarantined(tmp_path / "out") == [("a", "duplicate_key")]


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ("a,One.\nb,Two.\na,Three.\n", "rows 0 and 2 share the key 'a'"),
        ("a.b,One.\na_b,Two.\n", "rows 0 ('a.b') and 1 ('a_b') both become the key 'a_b'"),
    ],
)
def test_ingest_refuses_keys_it_would_merge(rows, message, tmp_path):
    table = tmp_path / "t.csv"
    table.write_text("key,text\n" + rows)
    code, output = invoke("ingest", str(table), "--output", str(tmp_path / "shards"))
    assert code == 2 and message in output
    assert not list((tmp_path / "shards").glob("*.tar"))


def test_a_second_run_on_a_locked_output_exits_2_naming_the_holder(tmp_path):
    inp = text_corpus(tmp_path / "in", shards=1, per_shard=2)
    out = tmp_path / "out"
    (out / layout.AUGPIPE_DIR).mkdir(parents=True)
    holder = {"host": socket.gethostname(), "pid": os.getpid(), "run_id": "abc123", "started": "earlier"}
    (out / layout.LOCK).write_text(json.dumps(holder))
    code, output = run(inp, out)
    assert code == 2 and f"in use by run abc123 (pid {os.getpid()} on {holder['host']}" in output
    assert not list(out.glob("*.tar"))

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / layout.LOCK).write_text(json.dumps({**holder, "pid": dead.pid}))
    code, output = invoke(
        "run", "passthrough", "--input", str(inp), "--output", str(out), "--executor", "local"
    )
    assert code == 0 and "taking over a stale lock of run abc123" in output
    assert not (out / layout.LOCK).exists()


def test_a_run_removes_only_its_own_temporary_files(tmp_path):
    inp = text_corpus(tmp_path / "in", shards=1, per_shard=2)
    out = tmp_path / "out"
    (out / "notes").mkdir(parents=True)
    mine = [out / ".notes.partial", out / "notes" / ".draft.augpipe-0123456789ab.partial", out / "x.partial"]
    for path in mine:
        path.write_text("a user's file")
    stale = out / ".shard-00000.tar.augpipe-0123456789ab.partial"
    stale.write_bytes(b"left by a killed run")
    code, output = run(inp, out)
    assert code == 0, output
    assert all(path.exists() for path in mine) and not stale.exists()


def test_another_recipe_never_overwrites_a_corpus(tmp_path):
    inp = text_corpus(tmp_path / "in", shards=2, per_shard=3)
    out = tmp_path / "out"
    assert run(inp, out)[0] == 0
    before = {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file() and "logs" not in p.parts}
    code, output = run(inp, out, "--profile", "tiny", recipe="back-speech")
    assert code == 2
    assert "already holds a corpus and it holds a 'passthrough' corpus; this run is 'back-speech'" in output
    after = {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file() and "logs" not in p.parts}
    assert after == before


def test_changed_inputs_with_the_same_names_are_redone(tmp_path):
    inp = text_corpus(tmp_path / "in", shards=2, per_shard=3)
    out = tmp_path / "out"
    assert run(inp, out)[0] == 0
    write_text_shard(inp / "shard-00001.tar", [("new0", "A different sentence.", "x")])
    code, output = run(inp, out)
    assert code == 0 and "shard-00001: its input shard-00001.tar changed, redone" in output
    assert keys(out) == ["shard0s0", "shard0s1", "shard0s2", "new0"]
    assert manifest(out)["samples"]["in"] == 4


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--set", "multiple=!!python/object/apply:os.system ['true']"), "--set"),
        (("--set", "multiple=[unclosed"), "--set"),
        (("--set", "stages=5"), "stages"),
    ],
)
def test_bad_overrides_exit_2_with_one_line(args, message, tmp_path):
    inp = text_corpus(tmp_path / "in", shards=1, per_shard=1)
    code, output = run(inp, tmp_path / "out", *args)
    assert code == 2 and message in output and "Traceback" not in output


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("bad.csv", b'key,text\n"a,unterminated\n', "not a readable CSV file"),
        ("bad.parquet", b"this is not parquet", "not a readable Parquet file"),
    ],
)
def test_an_unreadable_table_exits_2(name, content, message, tmp_path):
    table = tmp_path / name
    table.write_bytes(content)
    for command in (
        ["run", "passthrough", "--input", str(table), "--output", str(tmp_path / "o")],
        ["ingest", str(table), "--output", str(tmp_path / "i")],
    ):
        code, output = invoke(*command)
        assert code == 2 and message in output and "Traceback" not in output


def test_validate_reports_junk_instead_of_crashing(tmp_path):
    inp = text_corpus(tmp_path / "in", shards=1, per_shard=2)
    out = tmp_path / "out"
    assert run(inp, out)[0] == 0
    (out / "shard-00000.tar").write_bytes(b"junk" * 300)
    code, output = invoke("validate", str(out))
    assert code == 5 and "shard-00000.tar" in output and "Traceback" not in output
    (out / layout.MANIFEST).write_text("{not json")
    code, output = invoke("validate", str(out))
    assert code == 5 and "is not valid JSON" in output
    code, output = invoke("inspect", str(tmp_path / "in"))
    assert code == 2 and "has no augpipe manifest" in output
    (tmp_path / "file").write_text("x")
    code, output = run(inp, tmp_path / "file")
    assert code == 2 and "is a file" in output


def test_sigterm_stops_cleanly_and_the_rerun_finishes(tmp_path):
    from tests.faults import fault_env

    inp = text_corpus(tmp_path / "in", shards=6, per_shard=2)
    out = tmp_path / "out"
    slow_commits = fault_env(tmp_path / "slow", "commit_shard", "none", once=True, delay=1.5)
    args = ["run", "passthrough", "--input", str(inp), "--output", str(out)]
    command = [sys.executable, "-m", "augpipe.pipeline.cli", *args]
    proc = subprocess.Popen(
        command, env=slow_commits, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    stats = out / layout.STATS_DIR
    deadline = time.monotonic() + 300
    while not (stats.exists() and list(stats.glob("*.json"))) and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr[-2000:]
    assert "interrupted by SIGTERM; re-run the same command to resume" in stderr
    assert "Traceback" not in stderr and "SIGTERM received" not in stderr
    interrupted = manifest(out)
    assert interrupted["runs"][-1]["interrupted"] is True
    done = len(interrupted["runs"][-1]["shards_added"])
    assert 1 <= done < 6
    finish = augpipe(*args, "--quiet")
    assert finish.returncode == 0, finish.stderr
    assert len(manifest(out)["runs"][-1]["shards_added"]) == 6 - done
    assert keys(out) == [f"shard{s}s{i}" for s in range(6) for i in range(2)]
