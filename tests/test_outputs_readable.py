"""The output format is the product: trainers read it with webdataset, Ray Data and pyarrow, no augpipe."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from augpipe.pipeline.config import load_recipe
from augpipe.pipeline.manifest import read_manifest, validate_manifest
from augpipe.pipeline.run import run_recipe
from augpipe.pipeline.validate import validate_corpus

CONSUMER = r"""
import json, sys
import pyarrow.parquet as pq
import ray
import webdataset as wds

out = sys.argv[1]
ds = wds.WebDataset(f"{out}/shard-{{00000..00001}}.tar", shardshuffle=False).decode()
samples = [(s["__key__"], s["txt"], s["json"]["label"]) for s in ds]
tables = [pq.read_table(f"{out}/shard-0000{i}.parquet") for i in range(2)]
keys = [k for t in tables for k in t["key"].to_pylist()]
ray.init(address="local", num_cpus=1, include_dashboard=False, logging_level="ERROR")
rows = ray.data.read_webdataset([f"{out}/shard-0000{i}.tar" for i in range(2)]).take_all()
ray_keys = sorted(r["__key__"] for r in rows)
print(json.dumps({"wds": samples, "parquet_keys": keys, "ray_keys": ray_keys,
                  "augpipe_imported": "augpipe" in sys.modules}))
"""


@pytest.fixture(scope="module")
def passthrough_out(demo_text, tmp_path_factory, ray_session) -> Path:
    out = tmp_path_factory.mktemp("passthrough")
    run_recipe(load_recipe("passthrough"), demo_text, out, progress=False)
    return out


def test_outside_consumer_reads_every_sample(passthrough_out):
    proc = subprocess.run(
        [sys.executable, "-c", CONSUMER, str(passthrough_out)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd="/",
        check=True,
    )
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert seen["augpipe_imported"] is False
    assert len(seen["wds"]) == 24
    assert seen["wds"][0] == ["s000", "The film is a warm and funny story about two old friends.", "positive"]
    assert seen["parquet_keys"] == [key for key, _, _ in seen["wds"]]
    assert seen["ray_keys"] == sorted(seen["parquet_keys"])


def test_manifest_is_schema_valid_and_corpus_validates(passthrough_out):
    manifest = read_manifest(passthrough_out)
    validate_manifest(manifest)
    assert manifest["samples"] == {"in": 24, "out": 24, "failed": 0, "failure_rate": 0.0}
    assert [o["path"] for o in manifest["outputs"]] == [
        "shard-00000.tar",
        "shard-00000.parquet",
        "shard-00001.tar",
        "shard-00001.parquet",
    ]
    assert validate_corpus(passthrough_out) == []
    (passthrough_out / "shard-00001.parquet").write_bytes(b"not parquet")
    problems = validate_corpus(passthrough_out)
    assert any(p.startswith("shard-00001.parquet: 11 bytes, the manifest says") for p in problems), problems
