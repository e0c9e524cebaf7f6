"""The output shard as a consumer reads it: each member's name and bytes, the tar's fixed owner and mtime,
the checksums the manifest records, the quarantine tar and the stats record. Read back with webdataset,
tarfile, PIL and soundfile, not with augpipe's reader, so a writer fault cannot hide behind a matching
reader fault."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import soundfile
import webdataset as wds
from PIL import Image

from augpipe.pipeline import layout
from augpipe.pipeline.rows import Failure
from augpipe.pipeline.sidecar import OutputSpec
from augpipe.pipeline.storage import Store
from augpipe.pipeline.writer import (
    output_key,
    output_keys,
    read_stats,
    write_quarantine,
    write_shard,
    write_stats,
)

SPEC = OutputSpec("test", "aug", {"text": "text", "image": "image", "audio": "audio"})


def rows() -> list[dict]:
    rng = np.random.default_rng(0)
    pixels = [rng.integers(0, 256, size=(4, 6, 3), dtype=np.uint8) for _ in range(2)]
    audio = [np.clip(rng.normal(scale=0.2, size=n), -1, 1).astype(np.float32) for n in (800, 1200)]
    return [
        {
            "key": "src0",
            "label": "cat",
            "text": "a cat on a mat",
            "image": Image.fromarray(pixels[0]),
            "audio": audio[0],
            "sample_rate": 16_000,
            "score_similarity": np.float32(0.5),
        },
        {
            "key": "src1",
            "variant": (2,),
            "label": "dog",
            "text": "a dog",
            "image": Image.fromarray(pixels[1]),
            "audio": audio[1],
            "sample_rate": 22_050,
            "score_similarity": np.float32(0.25),
        },
    ]


def read_back(tar: Path) -> list[dict]:
    return list(wds.WebDataset(str(tar), shardshuffle=False, empty_check=False))


def test_every_member_holds_its_field_under_the_webdataset_name(tmp_path):
    source = rows()
    written = write_shard(Store(tmp_path), "shard-0", source, SPEC)
    tar_rel, parquet_rel = layout.data_files("shard-0")
    assert [f.path for f in written] == [tar_rel, parquet_rel]
    samples = read_back(tmp_path / tar_rel)
    assert [s["__key__"] for s in samples] == ["src0", "src1-aug-2"]
    for sample, row in zip(samples, source, strict=True):
        assert set(sample) - {"__key__", "__url__", "__local_path__"} == {"json", "txt", "png", "flac"}
        assert sample["txt"].decode() == row["text"]
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(sample["png"]))), np.asarray(row["image"]))
        audio, rate = soundfile.read(io.BytesIO(sample["flac"]), dtype="float32")
        assert rate == row["sample_rate"] and audio.shape == row["audio"].shape
        assert np.allclose(audio, row["audio"], atol=2 / 2**15), "FLAC keeps the waveform to 16 bits"
        meta = json.loads(sample["json"])
        assert meta["parent_key"] == row["key"] and meta["label"] == row["label"] and meta["recipe"] == "test"
        assert meta["score_similarity"] == pytest.approx(float(row["score_similarity"]))
    assert json.loads(samples[1]["json"])["key"] == "src1-aug-2"


def test_member_names_are_the_key_and_a_lower_case_extension(tmp_path):
    """webdataset lower-cases extensions when it reads, but tarfile, Hugging Face's loader and a user's
    own scripts do not: ``KEY.PNG`` would be a different column there. Members of a sample come in the
    order webdataset's writer gives them (sorted by extension)."""
    write_shard(Store(tmp_path), "shard-0", rows(), SPEC)
    with tarfile.open(tmp_path / layout.data_files("shard-0")[0]) as tar:
        names = tar.getnames()
    assert names == [
        f"{key}.{ext}" for key in ("src0", "src1-aug-2") for ext in ("flac", "json", "png", "txt")
    ]


def test_a_text_only_recipe_writes_no_media_members(tmp_path):
    spec = OutputSpec("test", "aug", {"text": "text"})
    write_shard(Store(tmp_path), "shard-0", rows(), spec)
    sample = read_back(tmp_path / layout.data_files("shard-0")[0])[0]
    assert set(sample) - {"__key__", "__url__", "__local_path__"} == {"json", "txt"}


def test_tars_have_a_fixed_owner_and_mtime_so_the_same_rows_give_the_same_bytes(tmp_path):
    first, second = Store(tmp_path / "a"), Store(tmp_path / "b")
    write_shard(first, "shard-0", rows(), SPEC)
    write_shard(second, "shard-0", rows(), SPEC)
    tar_rel = layout.data_files("shard-0")[0]
    assert (tmp_path / "a" / tar_rel).read_bytes() == (tmp_path / "b" / tar_rel).read_bytes()
    with tarfile.open(tmp_path / "a" / tar_rel) as tar:
        members = tar.getmembers()
    assert {(m.uname, m.gname, m.mtime) for m in members} == {("augpipe", "augpipe", 0)}


def test_each_written_file_is_recorded_with_the_checksum_size_and_mtime_of_what_landed(tmp_path):
    for record in write_shard(Store(tmp_path), "shard-0", rows(), SPEC):
        path = tmp_path / record.path
        assert record.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
        assert record.bytes == path.stat().st_size and record.mtime_ns == path.stat().st_mtime_ns
        assert record.samples == 2


def test_a_shard_without_rows_writes_no_data_files(tmp_path):
    assert write_shard(Store(tmp_path), "shard-0", [], SPEC) == []
    assert not any(tmp_path.iterdir())


def test_output_keys_name_sources_and_generated_samples_and_refuse_collisions():
    assert output_key({"key": "k"}, "bs") == "k"
    assert output_key({"key": "k", "variant": (0,)}, "bs") == "k-bs-0"
    assert output_key({"key": "k", "variant": (1, 2)}, "bs") == "k-bs-1-2"
    assert output_key({"key": "k", "variant": (3,), "output_key": "chosen"}, "bs") == "chosen"
    assert output_keys([{"key": "k", "variant": (0,)}, {"key": "k"}], "bs") == ["k-bs-0", "k"]
    with pytest.raises(
        RuntimeError, match=r"^generated keys collide; every output row needs a distinct key$"
    ):
        output_keys([{"key": "k", "variant": (0,)}, {"key": "k", "output_key": "k-bs-0"}], "bs")


def test_the_quarantine_tar_holds_one_json_record_per_failure_naming_its_shard(tmp_path):
    failures = [
        Failure("a", "read", "bad_image", "cannot identify image"),
        Failure("b", "embed", "x", "y", (1,)),
    ]
    rel = write_quarantine(Store(tmp_path), "shard-3", failures)
    assert rel == layout.quarantine_file("shard-3")
    samples = read_back(tmp_path / rel)
    assert [s["__key__"] for s in samples] == ["q000000", "q000001"]
    records = [json.loads(s["error.json"]) for s in samples]
    assert records[0] == {
        "key": "a",
        "stage": "read",
        "cause": "bad_image",
        "message": "cannot identify image",
        "variant": [],
        "shard": "shard-3",
    }
    assert records[1]["variant"] == [1]
    with tarfile.open(tmp_path / rel) as tar:
        assert {(m.uname, m.gname, m.mtime) for m in tar.getmembers()} == {("augpipe", "augpipe", 0)}


def test_a_shard_without_failures_writes_no_quarantine(tmp_path):
    assert write_quarantine(Store(tmp_path), "shard-3", []) is None
    assert not any(tmp_path.iterdir())


def test_the_stats_record_is_sorted_indented_json_that_reads_back(tmp_path):
    """One key per line, sorted: a record diffs cleanly between runs and numpy values are plain numbers."""
    store = Store(tmp_path)
    write_stats(store, "shard-0", {"b": np.float32(2.5), "a": np.int64(1)})
    assert (tmp_path / layout.stats_file("shard-0")).read_bytes() == b'{\n "a": 1,\n "b": 2.5\n}'
    assert read_stats(store, "shard-0") == {"a": 1, "b": 2.5}
    assert read_stats(store, "shard-1") is None
    (tmp_path / layout.stats_file("shard-1")).write_text("{not json")
    assert read_stats(store, "shard-1") is None
