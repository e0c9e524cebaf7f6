"""A nightly corpus as its users run it: inputs named by date, ``--incremental`` runs that add to one corpus,
a run history a trainer selects tonight's shards from, and shared storage behind an S3 API (moto's server
on loopback, a real HTTP S3 endpoint that pyarrow's S3 client talks to)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import webdataset as wds

from augpipe.pipeline.manifest import read_manifest
from tests.cli import augpipe, invoke
from tests.corpora import text_corpus

LOCAL = ("--executor", "local", "--quiet")


def nightly(inp: str, out: str, *extra: str) -> tuple[int, str]:
    return invoke("run", "passthrough", "--input", inp, "--output", out, "--incremental", *LOCAL, *extra)


def test_inputs_named_by_date_add_shards_and_a_run_to_the_history(tmp_path):
    inp = text_corpus(tmp_path / "in", shards=2, per_shard=3, prefix="day1")
    out = tmp_path / "out"
    assert nightly(str(inp), str(out))[0] == 0
    text_corpus(inp, shards=2, per_shard=3, prefix="day2")  # numbering restarts: day2-00000.tar
    code, output = nightly(str(inp), str(out))
    assert code == 0, output

    manifest = read_manifest(out)
    assert sorted(p.name for p in out.glob("*.tar")) == [
        "day1-00000.tar",
        "day1-00001.tar",
        "day2-00000.tar",
        "day2-00001.tar",
    ]
    first, second = manifest["runs"]
    assert first["shards_added"] == ["day1-00000", "day1-00001"]
    assert second["shards_added"] == ["day2-00000", "day2-00001"] and second["incremental"]
    assert second["samples"] == {"in": 6, "out": 6, "failed": 0}
    tonight = [o["path"] for o in manifest["outputs"] if o["run_id"] == second["run_id"]]
    assert sorted(tonight) == [
        "day2-00000.parquet",
        "day2-00000.tar",
        "day2-00001.parquet",
        "day2-00001.tar",
    ]
    code, listing = invoke("runs", str(out), "--json")
    assert code == 0 and [r["run_id"] for r in json.loads(listing)] == [first["run_id"], second["run_id"]]
    assert invoke("validate", str(out))[0] == 0


def test_an_incremental_run_with_a_changed_config_is_refused_naming_the_difference(tmp_path):
    inp = text_corpus(tmp_path / "in", shards=1, per_shard=3, prefix="day1")
    out = tmp_path / "out"
    assert nightly(str(inp), str(out))[0] == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    code, output = nightly(str(inp), str(out), "--set", "limits.max_text_bytes=50000")
    assert code == 2 and "max_text_bytes" in output, output
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def s3() -> Iterator[tuple[pafs.S3FileSystem, str, dict[str, str]]]:
    """A moto S3 server on loopback with an empty bucket; the filesystem, the URL query and the env."""
    server = str(Path(sys.executable).parent / "moto_server")  # ours (dev extra), not one on PATH
    port = _free_port()
    env = {
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    proc = subprocess.Popen(
        [server, "-H", "127.0.0.1", "-p", str(port)],
        env={**os.environ, **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    pytest.fail(f"moto_server did not start on port {port}")
                time.sleep(0.2)
        fs = pafs.S3FileSystem(
            access_key="test",
            secret_key="test",
            region="us-east-1",
            endpoint_override=f"127.0.0.1:{port}",
            scheme="http",
            allow_bucket_creation=True,
        )
        fs.create_dir("corpora")
        yield fs, f"?endpoint_override=127.0.0.1:{port}&scheme=http", env
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _upload(fs: pafs.S3FileSystem, folder: Path, prefix: str) -> None:
    for path in sorted(folder.iterdir()):
        with fs.open_output_stream(f"{prefix}/{path.name}") as sink:
            sink.write(path.read_bytes())


def test_a_nightly_corpus_on_s3_through_ray(s3, tmp_path):
    """Input and output on S3: day 1 on Ray, day 2 added incrementally (in-process), read back from S3."""
    fs, query, env = s3
    local = text_corpus(tmp_path / "day1", shards=2, per_shard=3, prefix="day1")
    _upload(fs, local, "corpora/in")
    inp, out = f"s3://corpora/in{query}", f"s3://corpora/out{query}"
    first = augpipe("run", "passthrough", "--input", inp, "--output", out, "--quiet", env=env)
    assert first.returncode == 0, first.stderr
    _upload(fs, text_corpus(tmp_path / "day2", shards=1, per_shard=3, prefix="day2"), "corpora/in")
    second = augpipe(
        "run", "passthrough", "--input", inp, "--output", out, "--incremental", "--quiet", env=env
    )
    assert second.returncode == 0, second.stderr

    names = {info.base_name for info in fs.get_file_info(pafs.FileSelector("corpora/out"))}
    data = sorted(n for n in names if n.endswith((".tar", ".parquet")))
    assert data == [
        f"{s}.{ext}" for s in ("day1-00000", "day1-00001", "day2-00000") for ext in ("parquet", "tar")
    ]
    assert names - set(data) <= {"_augpipe", "README.md"}
    everything = fs.get_file_info(pafs.FileSelector("corpora/out", recursive=True))
    assert not [i.path for i in everything if ".augpipe-" in i.base_name], "no temporary file is left"

    manifest = read_manifest(out)
    assert [r["shards_added"] for r in manifest["runs"]] == [["day1-00000", "day1-00001"], ["day2-00000"]]
    assert (manifest["samples"]["in"], manifest["samples"]["out"]) == (9, 9)
    check = augpipe("validate", out, env=env)
    assert check.returncode == 0, check.stdout + check.stderr

    with fs.open_input_file("corpora/out/day2-00000.tar") as fh:
        (tmp_path / "read").mkdir()
        (tmp_path / "read" / "day2-00000.tar").write_bytes(fh.read())
    samples = list(wds.WebDataset(str(tmp_path / "read" / "day2-00000.tar"), shardshuffle=False))
    table = pq.read_table("corpora/out/day2-00000.parquet", filesystem=fs)
    assert [s["__key__"] for s in samples] == table["key"].to_pylist() == [f"day20s{i}" for i in range(3)]
