"""Every input limit at its boundary (at the limit passes, one unit over fails with the named cause), and
every tar member accounted for: links, devices and FIFOs are failures with a cause, counted and
quarantined like any other bad sample."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import soundfile
from PIL import Image

from augpipe.pipeline import layout
from augpipe.pipeline.config import Limits
from augpipe.pipeline.inputs import discover_inputs
from augpipe.pipeline.reader import read_unit
from tests.cli import invoke
from tests.corpora import add_member, text_corpus

LOCAL = ("--executor", "local", "--quiet")


def shard(folder: Path, members: list[tuple[str, bytes]]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    with tarfile.open(folder / "shard-00000.tar", "w") as tar:
        for name, data in members:
            add_member(tar, name, data)
    return folder


def read(folder: Path, limits: Limits, required: tuple[str, ...] = ()):
    (unit,) = discover_inputs(folder, shard_size=100)
    return read_unit(unit, list(required), limits)


def verdict(folder: Path, limits: Limits) -> str | None:
    """None when the one sample is read, else its failure cause."""
    result = read(folder, limits)
    assert len(result.rows) + len(result.failures) == 1
    return result.failures[0].cause if result.failures else None


def png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (120, 30, 200)).save(buffer, format="PNG")
    return buffer.getvalue()


def wav(frames: int, rate: int = 1000) -> bytes:
    buffer = io.BytesIO()
    soundfile.write(buffer, np.zeros(frames, dtype=np.float32), rate, format="WAV")
    return buffer.getvalue()


# -------------------------------------------------------------------------------------------- limits

BIG = 2**30


def test_max_member_bytes_is_checked_from_the_header_at_its_boundary(tmp_path):
    data = b"x" * 1000
    folder = shard(tmp_path / "in", [("s0.txt", data)])
    assert verdict(folder, Limits(max_member_bytes=1000, max_text_bytes=BIG)) is None
    assert verdict(folder, Limits(max_member_bytes=999, max_text_bytes=BIG)) == "member_too_large"
    (failure,) = read(folder, Limits(max_member_bytes=999, max_text_bytes=BIG)).failures
    assert failure.message == "s0.txt has 1,000 bytes; the limit is 999"


def test_max_member_bytes_covers_every_member_of_a_sample(tmp_path):
    folder = shard(tmp_path / "in", [("s0.txt", b"short"), ("s0.json", b'{"label": "a long label"}')])
    assert verdict(folder, Limits(max_member_bytes=25)) is None
    assert verdict(folder, Limits(max_member_bytes=24)) == "member_too_large"


@pytest.mark.parametrize("ext", ["txt", "json", "cls"])
def test_max_text_bytes_at_its_boundary(ext, tmp_path):
    data = b'"' + b"y" * 98 + b'"' if ext == "json" else b"y" * 100
    members = [("s0.txt", b"text"), (f"s0.{ext}", data)] if ext != "txt" else [("s0.txt", data)]
    folder = shard(tmp_path / "in", members)
    assert verdict(folder, Limits(max_text_bytes=100)) is None
    assert verdict(folder, Limits(max_text_bytes=99)) == "text_too_large"
    (failure,) = read(folder, Limits(max_text_bytes=99)).failures
    assert failure.message == f"s0.{ext} has 100 bytes; the limit is 99"


def test_max_text_bytes_applies_to_table_rows(tmp_path):
    table = tmp_path / "t.csv"
    table.write_text("key,text\na," + "z" * 50 + "\n")
    (unit,) = discover_inputs(table, shard_size=100)
    assert not read_unit(unit, ["text"], Limits(max_text_bytes=50)).failures
    (failure,) = read_unit(unit, ["text"], Limits(max_text_bytes=49)).failures
    assert failure.cause == "text_too_large" and failure.key == "a"


def test_max_image_pixels_at_its_boundary(tmp_path):
    folder = shard(tmp_path / "in", [("s0.png", png(20, 5))])
    assert verdict(folder, Limits(max_image_pixels=100)) is None
    assert verdict(folder, Limits(max_image_pixels=99)) == "image_too_large"
    (failure,) = read(folder, Limits(max_image_pixels=99)).failures
    assert failure.message == "s0.png is 20x5 = 100 pixels; the limit is 99"
    (row,) = read(folder, Limits(max_image_pixels=100)).rows
    assert row["image"].size == (20, 5) and row["image"].mode == "RGB"


def test_max_audio_seconds_at_its_boundary(tmp_path):
    at = shard(tmp_path / "at", [("s0.wav", wav(2000))])  # 2.000 s at 1 kHz
    over = shard(tmp_path / "over", [("s0.wav", wav(2001))])  # 2.001 s
    assert verdict(at, Limits(max_audio_seconds=2.0)) is None
    assert verdict(over, Limits(max_audio_seconds=2.0)) == "audio_too_long"
    (row,) = read(at, Limits(max_audio_seconds=2.0)).rows
    assert row["audio"].shape == (2000,) and row["sample_rate"] == 1000
    (failure,) = read(over, Limits(max_audio_seconds=2.0)).failures
    assert failure.message == "s0.wav lasts 2.0 s; the limit is 2 s"


def test_max_failure_rate_at_its_boundary(tmp_path):
    inp = text_corpus(tmp_path / "in", shards=1, per_shard=4)
    (inp / "shard-00001.tar").write_bytes(b"")  # one failed input of five samples: rate 0.2
    code, output = invoke("run", "passthrough", "--input", str(inp), "--output", str(tmp_path / "a"), *LOCAL,
                          "--max-failure-rate", "0.2")  # fmt: skip
    assert code == 0, output
    code, output = invoke("run", "passthrough", "--input", str(inp), "--output", str(tmp_path / "b"), *LOCAL,
                          "--max-failure-rate", "0.19")  # fmt: skip
    assert code == 3
    assert "failure rate 20.0% exceeds --max-failure-rate 19.0%" in output


# ---------------------------------------------------------------------------- non-regular members


def special(name: str, kind: bytes, target: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    return info


SPECIAL = [
    (tarfile.SYMTYPE, "symlink", " to /etc/passwd", "/etc/passwd"),
    (tarfile.LNKTYPE, "hardlink", " to good.txt", "good.txt"),
    (tarfile.CHRTYPE, "character device", "", ""),
    (tarfile.BLKTYPE, "block device", "", ""),
    (tarfile.FIFOTYPE, "fifo", "", ""),
]


def hostile_shard(folder: Path, kind: bytes, target: str, name: str = "bad.txt") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    with tarfile.open(folder / "shard-00000.tar", "w") as tar:
        add_member(tar, "good.txt", b"A regular sentence.")
        tar.addfile(special(name, kind, target))
        add_member(tar, "after.txt", b"Another regular sentence.")
    return folder


@pytest.mark.parametrize(("kind", "word", "target_text", "target"), SPECIAL)
def test_a_non_regular_member_fails_its_sample_with_its_kind(kind, word, target_text, target, tmp_path):
    folder = hostile_shard(tmp_path / "in", kind, target)
    result = read(folder, Limits(), ("text",))
    assert [r["key"] for r in result.rows] == ["good", "after"]
    (failure,) = result.failures
    assert failure.cause == "non_regular_member" and failure.key == "bad"
    assert failure.message == f"member bad.txt is a {word}{target_text}; augpipe reads regular files only"
    assert result.counts["samples_in"] == 3


@pytest.mark.parametrize(("kind", "word", "target"), [(k, w, t) for k, w, _, t in SPECIAL])
def test_a_non_regular_member_without_an_extension_is_still_a_failure(kind, word, target, tmp_path):
    """WebDataset skips extensionless names; a link or device there is still refused, not dropped unseen."""
    folder = hostile_shard(tmp_path / "in", kind, target, name="sneaky")
    result = read(folder, Limits(), ("text",))
    assert [r["key"] for r in result.rows] == ["good", "after"]
    (failure,) = result.failures
    assert failure.cause == "non_regular_member" and word in failure.message


def test_a_link_beside_regular_members_refuses_the_whole_sample(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    with tarfile.open(folder / "shard-00000.tar", "w") as tar:
        add_member(tar, "s0.txt", b"A sentence with a linked image.")
        tar.addfile(special("s0.jpg", tarfile.SYMTYPE, "/dev/zero"))
    (failure,) = read(folder, Limits(), ("text",)).failures
    assert failure.cause == "non_regular_member" and "s0.jpg is a symlink to /dev/zero" in failure.message


def test_non_regular_members_are_counted_and_quarantined_by_a_run(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    with tarfile.open(folder / "shard-00000.tar", "w") as tar:
        add_member(tar, "good.txt", b"A regular sentence.")
        for i, (kind, _, _, target) in enumerate(SPECIAL):
            tar.addfile(special(f"bad{i}.txt", kind, target))
    out = tmp_path / "out"
    code, output = invoke("run", "passthrough", "--input", str(folder), "--output", str(out), *LOCAL,
                          "--max-failure-rate", "1")  # fmt: skip
    assert code == 0, output
    manifest = json.loads((out / layout.MANIFEST).read_text())
    assert manifest["samples"] == {"in": 6, "out": 1, "failed": 5, "failure_rate": 5 / 6}
    assert manifest["failures"]["by_cause"] == {"non_regular_member": 5}
    quarantined = []
    for path in sorted((out / layout.QUARANTINE_DIR).glob("*.tar")):
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                if member.name.endswith("error.json"):
                    record = json.loads(tar.extractfile(member).read())
                    quarantined.append((record["key"], record["cause"]))
    assert sorted(quarantined) == [(f"bad{i}", "non_regular_member") for i in range(5)]


@pytest.mark.parametrize(
    ("name", "cause"), [("s0.png", "undecodable_image"), ("s0.wav", "undecodable_audio")]
)
def test_undecodable_media_fail_with_a_stable_message(name, cause, tmp_path):
    folder = shard(tmp_path / "in", [(name, b"\x89PNG\r\n\x1a\n not really media")])
    (failure,) = read(folder, Limits()).failures
    assert failure.cause == cause and failure.message.startswith(f"{name} could not be decoded: ")
    assert " at 0x" not in failure.message  # no object addresses: the quarantine is the same every run
    assert "Error: " in failure.message  # the decoder's own reason, by exception type
    if cause == "undecodable_image":
        assert failure.message.endswith(
            "UnidentifiedImageError: cannot identify image file <_io.BytesIO object>"
        )


def test_json_class_is_a_label_and_images_are_rgb(tmp_path):
    gray = io.BytesIO()
    Image.new("L", (3, 2), 90).save(gray, format="PNG")
    folder = shard(tmp_path / "in", [("s0.png", gray.getvalue()), ("s0.json", b'{"class": "cat"}')])
    (row,) = read(folder, Limits()).rows
    assert row["label"] == "cat" and row["image"].mode == "RGB"


def test_audio_is_read_as_float32_mono(tmp_path):
    buffer = io.BytesIO()
    soundfile.write(buffer, np.full((800, 2), 0.25, dtype=np.float32), 8000, format="WAV", subtype="PCM_16")
    folder = shard(tmp_path / "in", [("s0.wav", buffer.getvalue())])
    (row,) = read(folder, Limits()).rows
    assert row["audio"].dtype == np.float32 and row["audio"].shape == (800,)
    np.testing.assert_allclose(row["audio"], 0.25, atol=1e-4)


def test_a_latin1_text_names_the_bad_byte(tmp_path):
    folder = shard(tmp_path / "in", [("s0.txt", "caf\u00e9".encode("latin-1"))])
    (failure,) = read(folder, Limits()).failures
    assert failure.message == "s0.txt is not valid UTF-8 (unexpected end of data at byte 3)"


def test_skip_media_leaves_images_and_audio_unread(tmp_path):
    folder = shard(tmp_path / "in", [("s0.png", png(2, 2)), ("s0.wav", wav(10)), ("s0.txt", b"Kept.")])
    (unit,) = discover_inputs(folder, shard_size=100)
    (row,) = read_unit(unit, ["text", "image", "audio"], Limits(), skip_media={"image", "audio"}).rows
    assert row["text"] == "Kept." and "image" not in row and "audio" not in row
    (row,) = read_unit(unit, ["text", "image"], Limits(), skip_media={"audio"}).rows
    assert row["image"].size == (2, 2) and "audio" not in row
