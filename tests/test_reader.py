"""The tar reader, sample by sample: what each member becomes in a row, the cause and message of every
refused sample, and the counts a shard's read stage reports (samples in, skipped members, damage)."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from augpipe.pipeline.config import Limits
from augpipe.pipeline.inputs import discover_inputs
from augpipe.pipeline.reader import ReadResult, read_unit
from augpipe.pipeline.rows import key_digest
from tests.corpora import add_member

SHARD = "shard-00000.tar"


def shard(folder: Path, members: list[tuple[str, bytes]]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    with tarfile.open(folder / SHARD, "w") as tar:
        for name, data in members:
            add_member(tar, name, data)
    return folder


def read(folder: Path, required: tuple[str, ...] = (), **kwargs) -> ReadResult:
    (unit,) = discover_inputs(folder, shard_size=100)
    return read_unit(unit, list(required), Limits(), **kwargs)


def member_blocks(name: str, data: bytes) -> bytes:
    """One member's header and data blocks, without the end-of-archive marker."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        add_member(tar, name, data)
    return buffer.getvalue()[: 512 + -(-len(data) // 512) * 512]


def png() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (2, 2)).save(buffer, format="PNG")
    return buffer.getvalue()


# ------------------------------------------------------------------------------------ members to rows


def test_a_sample_whose_json_has_no_label_keeps_its_meta_and_gets_no_label(tmp_path):
    folder = shard(tmp_path / "in", [("s0.txt", b"Hello."), ("s0.json", b'{"source": "web", "n": 3}')])
    (row,) = read(folder, ("text",)).rows
    assert row["meta"] == {"source": "web", "n": 3}
    assert "label" not in row


def test_an_empty_json_member_is_empty_meta_not_a_failure(tmp_path):
    folder = shard(tmp_path / "in", [("s0.txt", b"Hello."), ("s0.json", b"  \n")])
    result = read(folder, ("text",))
    assert not result.failures
    (row,) = result.rows
    assert row["meta"] == {}


def test_a_cls_member_is_the_label_stripped(tmp_path):
    folder = shard(tmp_path / "in", [("s0.txt", b"Hello."), ("s0.cls", b" 7\n")])
    (row,) = read(folder, ("text",)).rows
    assert row["label"] == "7"


def test_a_sample_whose_every_member_is_skipped_media_is_a_bare_row(tmp_path):
    """A pass with skip_media still gets one row per sample, with the fields every row carries."""
    folder = shard(tmp_path / "in", [("s0.png", png())])
    result = read(folder, ("image",), skip_media={"image"})
    assert not result.failures
    assert result.rows == [{"key": "s0", "variant": (), "lineage": {}}]


def test_a_sample_of_skipped_media_alone_still_gets_its_sidecar_columns(tmp_path):
    """A fit pass reads image-only shards with images skipped, for the embeddings their sidecar holds."""
    folder = shard(tmp_path / "in", [("s0.png", png()), ("s1.png", png())])
    table = pa.table({"key": ["s0", "s1"], "image_embedding": [[1.0, 0.0], [0.0, 1.0]], "label": ["a", "b"]})
    pq.write_table(table, folder / SHARD.replace(".tar", ".parquet"))
    result = read(folder, ("image", "image_embedding"), skip_media={"image"})
    assert not result.failures
    assert [(r["key"], r["image_embedding"].tolist(), r["label"]) for r in result.rows] == [
        ("s0", [1.0, 0.0], "a"),
        ("s1", [0.0, 1.0], "b"),
    ]
    assert all("image" not in r for r in result.rows)


# ------------------------------------------------------------------------------ refused samples


def test_an_unsafe_key_is_refused_with_a_message_quoting_it(tmp_path):
    folder = shard(tmp_path / "in", [("../../up.txt", b"Escape.")])
    (failure,) = read(folder).failures
    assert failure.key == "../../up" and failure.cause == "unsafe_key"
    assert failure.message == "key '../../up' is not a safe sample key (letters, digits, _ - /)"


def test_invalid_json_fails_the_sample_as_bad_json_naming_the_member(tmp_path):
    folder = shard(tmp_path / "in", [("s0.txt", b"Hello."), ("s0.json", b"{not json")])
    result = read(folder, ("text",))
    assert not result.rows
    (failure,) = result.failures
    assert failure.key == "s0" and failure.cause == "bad_json"
    assert failure.message == (
        "s0.json is not valid JSON: "
        "Expecting property name enclosed in double quotes: line 1 column 2 (char 1)"
    )


def test_a_sample_with_only_unlabelled_meta_and_unknown_members_has_no_usable_member(tmp_path):
    """Metadata alone is not a sample: it fails even when no field is required, listing what it had."""
    folder = shard(tmp_path / "in", [("s0.json", b'{"source": "web"}'), ("s0.xyz", b"\x00")])
    result = read(folder)
    assert not result.rows
    (failure,) = result.failures
    assert failure.key == "s0" and failure.cause == "unknown_member_type"
    assert failure.message == "sample s0 has no usable member (found: json, xyz)"


def test_a_sample_lacking_required_fields_names_every_missing_one(tmp_path):
    folder = shard(tmp_path / "in", [("s0.cls", b"cat")])
    (failure,) = read(folder, ("text", "image")).failures
    assert failure.key == "s0" and failure.cause == "missing_field"
    assert failure.message == "sample s0 lacks text, image"


def test_a_blank_text_fails_as_empty_text_naming_the_sample(tmp_path):
    folder = shard(tmp_path / "in", [("s0.txt", b"  \n")])
    (failure,) = read(folder, ("text",)).failures
    assert failure.key == "s0" and failure.cause == "empty_text"
    assert failure.message == "sample s0 has an empty text"


def test_tar_duplicates_in_the_shard_and_in_the_drop_set_fail_as_duplicate_key(tmp_path):
    folder = shard(tmp_path / "in", [("a.txt", b"One."), ("b.txt", b"Two."), ("a.txt", b"Again.")])
    result = read(folder, ("text",), drop={key_digest("b"): "earlier.tar"})
    assert [(r["key"], r["text"]) for r in result.rows] == [("a", "One.")]
    assert [(f.key, f.cause, f.message) for f in result.failures] == [
        ("b", "duplicate_key", "key b is also in earlier.tar, which comes first (kept)"),
        ("a", "duplicate_key", f"key a repeats an earlier sample of {SHARD} (kept)"),
    ]
    assert result.counts["samples_in"] == 3


# ------------------------------------------------------------------------------ counts and damage


def test_folder_entries_and_extensionless_files_are_counted_as_skipped_and_reading_goes_on(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    with tarfile.open(folder / SHARD, "w") as tar:
        add_member(tar, "a.txt", b"First.")
        docs = tarfile.TarInfo("docs")
        docs.type = tarfile.DIRTYPE
        tar.addfile(docs)
        add_member(tar, "NOTES", b"Not a sample.")
        add_member(tar, "b.txt", b"Second.")
    result = read(folder, ("text",))
    assert [r["key"] for r in result.rows] == ["a", "b"] and not result.failures
    assert result.counts == {"samples_in": 2, "skipped_members": 2}


def test_damage_between_samples_is_counted_and_the_samples_around_it_are_read(tmp_path):
    garbage = b"\xff" * 512
    blob = b"".join(
        [
            member_blocks("a.txt", b"First."),
            garbage,
            member_blocks("b.txt", b"Second."),
            garbage,
            member_blocks("c.txt", b"Third."),
            b"\0" * 1024,
        ]
    )
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / SHARD).write_bytes(blob)
    result = read(tmp_path / "in", ("text",))
    assert [r["key"] for r in result.rows] == ["a", "b", "c"]
    lost = "512 bytes of damaged tar data skipped; an unknown number of samples lost there"
    assert [(f.key, f.cause, f.message) for f in result.failures] == [
        (SHARD, "corrupt_shard", f"{SHARD}: damaged at byte 1,024: {lost}"),
        (SHARD, "corrupt_shard", f"{SHARD}: damaged at byte 2,560: {lost}"),
    ]
    assert result.counts == {"samples_in": 5, "damaged_regions": 2}


def test_a_member_cut_short_by_truncation_names_its_lost_sample(tmp_path):
    blob = member_blocks("intact.txt", b"Before the damage.") + member_blocks("cut.txt", b"x" * 2000)
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / SHARD).write_bytes(blob[: 512 * 3 + 700])
    result = read(tmp_path / "in", ("text",))
    assert [r["key"] for r in result.rows] == ["intact"]
    (failure,) = result.failures
    assert failure.key == "cut" and failure.cause == "corrupt_shard"
    assert failure.message.endswith("(truncated); sample cut lost there")
    assert result.counts == {"samples_in": 2, "damaged_regions": 1}
