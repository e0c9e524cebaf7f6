"""The tar scanner on damaged archives: each damaged region is reported once, at its byte offset, with a
message that says what is wrong, and every member around it is still found. The quarantine shows these
messages to the user, so they are asserted word for word."""

from __future__ import annotations

import io
import tarfile

import pytest

from augpipe.pipeline.tarscan import (
    BLOCK,
    Damage,
    Member,
    Sample,
    Skipped,
    read_member,
    scan_members,
    scan_samples,
    tarfile_members,
)


def archive(*members: tuple[str, bytes | str], end: bool = True) -> bytes:
    """A ustar archive; a member given a str instead of bytes is a non-regular member of that tar type."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, content in members:
            info = tarfile.TarInfo(name)
            if isinstance(content, str):
                info.type = content.encode()
                info.linkname = (
                    "target" if content in (tarfile.SYMTYPE.decode(), tarfile.LNKTYPE.decode()) else ""
                )
                tar.addfile(info)
            else:
                info.size = len(content)
                tar.addfile(info, io.BytesIO(content))
    blob = buffer.getvalue()
    return blob if end else blob[: _end_of_members(blob)]


def _end_of_members(blob: bytes) -> int:
    """Where the last member's padded data ends (before the end-of-archive zero blocks)."""
    members = list(tarfile_members(io.BytesIO(blob), len(blob)))
    last = members[-1]
    assert isinstance(last, Member)
    return last.offset_data + -(-last.size // BLOCK) * BLOCK


def scan(blob: bytes) -> list[Member | Damage]:
    return list(tarfile_members(io.BytesIO(blob), len(blob)))


def test_a_file_that_is_not_a_tar_is_one_damage_at_offset_zero() -> None:
    blob = bytes(range(1, 251)) * 8
    assert scan(blob) == [Damage(0, "not a tar archive: no valid member header in 2,000 bytes")]


def test_garbage_after_the_last_member_is_reported_with_its_size() -> None:
    good = archive(("a.txt", b"hello"), end=False)
    for garbage, message in (
        (b"\x07" * 700, "700 bytes after the last member are not tar members (damaged header)"),
        (b"\x07" * BLOCK, "512 bytes after the last member are not tar members (damaged header)"),
        (b"\x07" * 100, "the file ends inside a member header (truncated)"),
        (b"\x07", "the file ends inside a member header (truncated)"),  # one stray byte is checked too
    ):
        found = scan(good + garbage)
        assert found == [Member("a.txt", BLOCK, 5, "file"), Damage(len(good), message)], len(garbage)


def test_a_file_shorter_than_one_header_is_not_a_tar_archive() -> None:
    assert scan(b"\x07" * 100) == [Damage(0, "not a tar archive (truncated header)")]


def test_an_archive_cut_right_after_its_last_member_loses_nothing() -> None:
    """A writer killed before the end-of-archive blocks leaves whole members: none of them is damage."""
    blob = archive(("a.bin", b"x" * BLOCK), end=False)
    assert len(blob) == 2 * BLOCK
    assert scan(blob) == [Member("a.bin", BLOCK, BLOCK, "file")]


def test_a_damaged_header_after_a_pax_header_is_named_at_the_pax_header() -> None:
    """tarfile cannot resynchronise inside an extended-header pair: the damage starts where the pair does
    and the scan stops there, saying why."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in (("a.txt", b"1"), ("x" * 150 + ".txt", b"2"), ("c.txt", b"3")):
            info = tarfile.TarInfo(name)
            info.size = 1
            tar.addfile(info, io.BytesIO(data))
    blob = bytearray(buffer.getvalue())
    blob[4 * BLOCK + 10] ^= 0xFF  # the long name's own header, after its pax header and pax data
    assert scan(bytes(blob)) == [
        Member("a.txt", BLOCK, 1, "file"),
        Damage(2 * BLOCK, "unreadable tar header (bad checksum)"),
    ]


def damaged_in_the_middle() -> bytes:
    """a.txt, b.txt, c.txt with b.txt's header damaged (after a.txt's header and two data blocks)."""
    blob = bytearray(archive(("a.txt", b"x" * 600), ("b.txt", b"y" * 10), ("c.txt", b"z")))
    blob[3 * BLOCK + 10] ^= 0xFF
    return bytes(blob)


def test_a_damaged_header_between_members_is_skipped_and_the_next_member_found() -> None:
    found = scan(damaged_in_the_middle())
    assert found == [
        Member("a.txt", BLOCK, 600, "file"),
        Damage(3 * BLOCK, "1,024 bytes of damaged tar data skipped"),
        Member("c.txt", 6 * BLOCK, 1, "file"),
    ]


def test_a_block_that_is_zero_but_for_its_last_byte_is_damage_not_padding() -> None:
    block = bytes(BLOCK - 1) + b"\x01"
    blob = archive(("a.txt", b"x"), end=False) + block + archive(("b.txt", b"y"))
    assert scan(blob) == [
        Member("a.txt", BLOCK, 1, "file"),
        Damage(2 * BLOCK, "512 bytes of damaged tar data skipped"),
        Member("b.txt", 4 * BLOCK, 1, "file"),
    ]


def test_zero_padding_between_members_is_not_damage() -> None:
    a, b = archive(("a.txt", b"x"), end=False), archive(("b.txt", b"y"))
    blob = a + bytes(4 * BLOCK) + b
    assert [type(m) for m in scan(blob)] == [Member, Member]


def test_a_member_cut_short_by_a_truncated_file_names_the_member_and_what_is_missing() -> None:
    blob = archive(("a.txt", b"x"), ("b.bin", b"y" * 2000))[: 3 * BLOCK + 488]
    assert scan(blob) == [
        Member("a.txt", BLOCK, 1, "file"),
        Damage(2 * BLOCK, "member b.bin needs 2,000 bytes but the file ends after 488 (truncated)", "b.bin"),
    ]


@pytest.mark.parametrize(
    ("tar_type", "kind"),
    [
        (tarfile.SYMTYPE, "symlink"),
        (tarfile.LNKTYPE, "hardlink"),
        (tarfile.CHRTYPE, "character device"),
        (tarfile.BLKTYPE, "block device"),
        (tarfile.FIFOTYPE, "fifo"),
        (b"Q", "special member"),
    ],
)
def test_non_regular_members_are_named_by_kind_and_take_no_data(tar_type: bytes, kind: str) -> None:
    blob = archive(("x.lnk", tar_type.decode()), ("b.txt", b"y"))
    found = scan(blob)
    assert [(m.name, m.kind, m.size) for m in found if isinstance(m, Member)] == [
        ("x.lnk", kind, 0),
        ("b.txt", "file", 1),
    ]
    assert found == list(scan_members(io.BytesIO(blob), len(blob))), "the fast path agrees"


def test_a_link_whose_header_claims_a_size_takes_no_data_and_the_next_member_follows() -> None:
    """tarfile reads no data for a link whatever its size field says; neither may the scanner."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        link = tarfile.TarInfo("x.lnk")
        link.type, link.linkname, link.size = tarfile.SYMTYPE, "target", 1024
        tar.addfile(link)
        data = tarfile.TarInfo("b.txt")
        data.size = 1
        tar.addfile(data, io.BytesIO(b"y"))
    blob = buffer.getvalue()
    assert scan(blob) == [
        Member("x.lnk", BLOCK, 0, "symlink", "target"),
        Member("b.txt", 2 * BLOCK, 1, "file"),
    ]


def test_samples_group_members_and_account_for_folders_bare_names_and_links() -> None:
    blob = archive(
        ("d/", tarfile.DIRTYPE.decode()),
        ("a.txt", b"1"),
        ("a.json", b"{}"),
        ("README", b"notes"),
        ("bare", tarfile.SYMTYPE.decode()),
        ("b.txt", b"2"),
        ("b.lnk", tarfile.SYMTYPE.decode()),
    )
    found = list(scan_samples(io.BytesIO(blob), len(blob)))
    skipped = [(item.member.name, item.reason) for item in found if isinstance(item, Skipped)]
    assert skipped == [
        ("d", "a folder entry"),
        ("README", "a file name without an extension (WebDataset ignores it)"),
    ]
    samples = {item.key: item for item in found if isinstance(item, Sample)}
    assert sorted(samples) == ["a", "b", "bare"] and len(found) == 5
    assert sorted(samples["a"].members) == ["json", "txt"] and samples["a"].others == []
    assert samples["bare"].members == {} and [m.kind for m in samples["bare"].others] == ["symlink"]
    assert list(samples["b"].members) == ["txt"] and [m.name for m in samples["b"].others] == ["b.lnk"]


def test_samples_after_a_damaged_region_are_still_found() -> None:
    blob = damaged_in_the_middle()
    found = list(scan_samples(io.BytesIO(blob), len(blob)))
    assert [type(item).__name__ for item in found] == ["Sample", "Damage", "Sample"]
    assert [found[0].key, found[2].key] == ["a", "c"]


def test_a_member_cut_by_truncation_takes_its_open_sample_with_it() -> None:
    blob = archive(("a.txt", b"1"), ("b.txt", b"2"), ("b.bin", b"y" * 2000))[: 5 * BLOCK + 100]
    found = list(scan_samples(io.BytesIO(blob), len(blob)))
    assert [type(item).__name__ for item in found] == ["Sample", "Damage"]
    assert found[0].key == "a" and found[1].member == "b.bin"


def test_an_empty_file_is_damage_and_a_short_read_names_the_member() -> None:
    assert list(scan_members(io.BytesIO(b""), 0)) == [Damage(0, "the file is empty (0 bytes)")]
    with pytest.raises(EOFError, match=r"^member a.txt ends early \(1 of 5 bytes\)$"):
        read_member(io.BytesIO(b"x" * 513), Member("a.txt", 512, 5, "file"))
