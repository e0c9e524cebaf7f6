"""The command line as users drive it: help, listings, ingest, and the documented exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image

from augpipe.pipeline import layout
from tests.cli import invoke


@pytest.mark.parametrize(
    "command", ["run", "recipes", "stages", "inspect", "validate", "ingest", "demo-data", "evaluate"]
)
def test_every_command_has_help(command):
    code, output = invoke(command, "--help")
    assert code == 0 and "Usage:" in output and len(output.splitlines()) > 3


def test_listings_name_recipes_stages_and_backends():
    code, output = invoke("recipes")
    assert code == 0 and "back-speech" in output and "passthrough" in output
    code, output = invoke("stages")
    assert code == 0
    transcribe = next(line for line in output.splitlines() if line.startswith("transcribe"))
    assert "faster_whisper" in transcribe and "pocketsphinx" in transcribe and "tiny" in transcribe


def test_json_listings_describe_every_recipe_and_stage_option():
    from augpipe.pipeline.config import load_recipe

    code, output = invoke("recipes", "--json")
    recipes = {r["name"]: r for r in json.loads(output)}
    assert code == 0 and {"back-speech", "cmda", "passthrough"} <= set(recipes)
    for name, described in recipes.items():
        resolved = load_recipe(described["file"], profile=None)
        assert [s.name for s in resolved.stages] == [s["name"] for s in described["stages"]], name
        assert described["input"] == resolved.input and described["tag"] == resolved.tag
    code, output = invoke("stages", "--json")
    stages = {s["name"]: s for s in json.loads(output)}
    assert code == 0 and "drop_duplicates" in stages
    assert {"faster_whisper", "pocketsphinx", "tiny"} <= set(stages["transcribe"]["backends"])
    assert stages["select"]["options"]["concurrency"]["default"] == 1
    assert stages["cluster"]["needs_fit"] and stages["cluster"]["summary"].startswith("cluster")


@pytest.mark.parametrize(
    ("pair", "hint"),
    [
        ("sed=3", "'seed'"),
        ("limits.max_text_byte=3", "'max_text_bytes'"),
        ("transcrib.variants=2", "'transcribe'"),
        ("transcribe.temprature=0.5", "'temperature'"),
    ],
    ids=["top-level key", "limit", "stage name", "stage option"],
)
def test_a_misspelt_set_key_gets_a_did_you_mean(pair, hint, demo_text, tmp_path):
    out = tmp_path / "o"
    command = ("run", "back-speech", "--input", str(demo_text), "--output", str(out), "--set", pair)
    code, output = invoke(*command)
    assert code == 2 and f"did you mean {hint}" in output and not out.exists()


def test_missing_model_fails_fast_with_exit_4(demo_text, tmp_path):
    code, output = invoke(
        "run",
        "back-speech",
        "--input",
        str(demo_text),
        "--output",
        str(tmp_path / "o"),
        "--set",
        "transcribe.model=/nowhere/whisper-ct2",
    )
    assert code == 4
    assert "/nowhere/whisper-ct2" in output
    assert not (tmp_path / "o").exists()


def test_config_errors_exit_2_and_name_the_key(demo_text, tmp_path):
    code, output = invoke(
        "run",
        "back-speech",
        "--input",
        str(demo_text),
        "--output",
        str(tmp_path / "o"),
        "--set",
        "transcribe.temprature=0.5",
    )
    assert code == 2 and "transcribe" in output and "temprature" in output
    code, output = invoke("run", "back-speach", "--input", str(demo_text), "--output", str(tmp_path / "o"))
    assert code == 2 and "did you mean 'back-speech'" in output
    code, output = invoke(
        "run", "passthrough", "--input", str(tmp_path / "absent"), "--output", str(tmp_path)
    )
    assert code == 2 and "does not exist" in output


def test_failure_rate_above_the_limit_exits_3(tmp_path):
    from tests.corpora import write_hostile_corpus

    write_hostile_corpus(tmp_path / "in")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "augpipe.pipeline.cli",
            "run",
            "passthrough",
            "--input",
            str(tmp_path / "in"),
            "--output",
            str(tmp_path / "out"),
            "--quiet",
            "--max-failure-rate",
            "0.1",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 3, proc.stderr
    assert "refused_pickle" in proc.stderr and "exceeds --max-failure-rate" in proc.stderr
    assert (tmp_path / "out" / layout.MANIFEST).exists()


def test_ingest_csv_parquet_image_folder_and_img2dataset(tmp_path):
    csv = tmp_path / "t.csv"
    csv.write_text("key,text,label\nx.1,Hello there.,1\nx2,Second line.,0\n")
    assert invoke("ingest", str(csv), "--output", str(tmp_path / "csv"))[0] == 0
    samples = list(wds.WebDataset(str(tmp_path / "csv" / "shard-00000.tar"), shardshuffle=False).decode())
    assert [(s["__key__"], s["txt"], s["json"]["label"]) for s in samples] == [
        ("x_1", "Hello there.", 1),
        ("x2", "Second line.", 0),
    ]

    parquet = tmp_path / "t.parquet"
    pq.write_table(pa.table({"text": ["only text"]}), parquet)
    assert invoke("ingest", str(parquet), "--output", str(tmp_path / "pq"))[0] == 0

    photos = tmp_path / "photos"
    photos.mkdir()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(photos / "red.jpg")
    (photos / "red.txt").write_text("a red square")
    assert invoke("ingest", str(photos), "--output", str(tmp_path / "img"))[0] == 0
    sample = next(iter(wds.WebDataset(str(tmp_path / "img" / "shard-00000.tar"), shardshuffle=False)))
    assert (
        sample["__key__"] == "red" and sample["txt"] == b"a red square" and sample["jpg"][:2] == b"\xff\xd8"
    )

    img2dataset = tmp_path / "i2d"
    img2dataset.mkdir()
    with wds.TarWriter(str(img2dataset / "00000.tar")) as sink:
        sink.write(
            {
                "__key__": "000000000",
                "jpg": (photos / "red.jpg").read_bytes(),
                "txt": "red",
                "json": json.dumps({"caption": "red", "status": "success"}),
            }
        )
    pq.write_table(pa.table({"key": ["000000000"], "caption": ["red"]}), img2dataset / "00000.parquet")
    (img2dataset / "00000_stats.json").write_text("{}")
    assert invoke("ingest", str(img2dataset), "--output", str(tmp_path / "i2d-out"))[0] == 0
    assert sorted(p.name for p in (tmp_path / "i2d-out").iterdir()) == [
        "00000.parquet",
        "00000.tar",
        "00000_stats.json",
    ]


def test_demo_data_writes_text_and_images(tmp_path):
    assert invoke("demo-data", str(tmp_path / "demo"))[0] == 0
    texts = list(wds.WebDataset(str(tmp_path / "demo" / "text" / "shard-00000.tar"), shardshuffle=False))
    assert len(texts) == 12
    images = list(wds.WebDataset(str(tmp_path / "demo" / "images" / "shard-00000.tar"), shardshuffle=False))
    assert len(images) == 9 and all({"jpg", "txt", "json"} <= set(s) for s in images)


def test_validate_accepts_a_recipe_and_rejects_a_broken_one(tmp_path):
    recipes = Path(__file__).resolve().parents[1] / "configs" / "recipes"
    assert invoke("validate", str(recipes / "back-speech.yaml"))[0] == 0
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: x\ntag: x\ninput: [text]\noutput: {text: text}\nstages: []\nmultiple: 0\n")
    code, output = invoke("validate", str(broken))
    assert code == 5 and "multiple" in output


def test_user_errors_from_libraries_are_one_line_with_their_exit_code(tmp_path):
    junk = tmp_path / "junk.tar"
    junk.write_bytes(bytes(range(256)) * 40)  # not UTF-8, not a tar, not a corpus
    code, output = invoke("validate", str(junk))
    assert code == 5 and "not a corpus folder" in output and "Traceback" not in output
    assert len(set(output.strip().splitlines())) == 1  # (invoke shows stderr twice)
    broken = tmp_path / "broken.csv"
    broken.write_text('key,text,label\nr1,"unterminated quote,positive\nr2,second,negative,extra,fields\n')
    for command in (("ingest", str(broken), "--output", str(tmp_path / "s")),):
        code, output = invoke(*command)
        assert code == 2 and "not a readable CSV file" in output
        assert len(set(output.strip().splitlines())) == 1, output
