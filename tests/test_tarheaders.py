"""The fast header parser agrees with tarfile on every archive it accepts, and accepts the common ones.

Archives are built with tarfile in its three formats (ustar, GNU, pax) from hypothesis-drawn members:
regular files, folders, links and devices, names long enough for a ustar prefix, a GNU long name or a pax
path, non-ASCII names, zero padding between concatenated archives; then, sometimes, damaged (a byte
changed, the file cut short, junk appended). Whatever the parser accepts must be exactly what the
tarfile-based scan yields, with no damage reported.
"""

from __future__ import annotations

import io
import tarfile

import pytest
import webdataset as wds
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from augpipe.pipeline import tarheaders
from augpipe.pipeline.tarheaders import BLOCK, plain_members
from augpipe.pipeline.tarscan import Damage, Member, scan_members, tarfile_members

TYPES = {
    "file": tarfile.REGTYPE,
    "directory": tarfile.DIRTYPE,
    "symlink": tarfile.SYMTYPE,
    "hardlink": tarfile.LNKTYPE,
    "character device": tarfile.CHRTYPE,
    "fifo": tarfile.FIFOTYPE,
}
FORMATS = [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT]


def _words(alphabet: str, low: int, high: int) -> st.SearchStrategy[str]:
    return st.integers(low, high).flatmap(lambda n: st.text(alphabet, min_size=n, max_size=n))


_ext = st.sampled_from([".jpg", ".txt", ".json", ".cls"])
names = st.one_of(
    st.builds(str.__add__, _words("abc019", 1, 12), _ext),
    st.builds(lambda a, b: f"{a}/{b}.txt", _words("ab", 60, 90), _words("ab", 50, 95)),  # a ustar prefix
    st.builds(str.__add__, _words("ab", 120, 160), _ext),  # a pax path or a GNU long name
    st.builds(str.__add__, _words("aé", 1, 10), _ext),
)
members = st.tuples(names, st.sampled_from(sorted(TYPES)), st.binary(max_size=700))


def _archive(entries: list[tuple[str, str, bytes]], fmt: int) -> bytes:
    try:
        return _write(entries, fmt)
    except ValueError:  # a name that ustar cannot hold
        assume(False)
        raise


def _write(entries: list[tuple[str, str, bytes]], fmt: int) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=fmt) as archive:
        for name, kind, data in entries:
            info = tarfile.TarInfo(name)
            info.type = TYPES[kind]
            info.mtime = 1_700_000_000
            if kind in {"symlink", "hardlink"}:
                info.linkname = "target/" + name
            if kind == "file":
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
            else:
                archive.addfile(info)
    return buffer.getvalue()


def _both(blob: bytes) -> tuple[list[Member] | None, list[Member | Damage]]:
    fast = plain_members(io.BytesIO(blob), len(blob))
    slow = list(tarfile_members(io.BytesIO(blob), len(blob)))
    return (None if fast is None else [Member(*m) for m in fast]), slow


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    parts=st.lists(st.lists(members, max_size=5), min_size=1, max_size=3),
    fmt=st.sampled_from(FORMATS),
    damage=st.one_of(
        st.none(),
        st.tuples(st.just("flip"), st.floats(0, 1), st.integers(1, 255)),
        st.tuples(st.just("cut"), st.floats(0, 1), st.just(0)),
        st.tuples(st.just("junk"), st.just(0.0), st.integers(1, 255)),
    ),
)
def test_whatever_the_parser_accepts_is_what_tarfile_reads(parts, fmt, damage) -> None:
    blob = b"".join(_archive(entries, fmt) for entries in parts)  # concatenated: zero padding between
    if damage is not None:
        how, where, value = damage
        at = int(where * (len(blob) - 1))
        if how == "flip":
            blob = blob[:at] + bytes([blob[at] ^ value]) + blob[at + 1 :]
        elif how == "cut":
            blob = blob[:at]
        else:
            blob = blob + bytes([value]) * 700
    if not blob:
        return
    fast, slow = _both(blob)
    if fast is not None:
        assert fast == slow


@settings(max_examples=60, deadline=None)
@given(entries=st.lists(members, min_size=1, max_size=6), fmt=st.sampled_from(FORMATS))
def test_ascii_archives_of_every_format_take_the_fast_path(entries, fmt) -> None:
    """Only GNU long names and non-ASCII names need tarfile; everything else is read by the fast parser."""
    blob = _archive(entries, fmt)
    fast, slow = _both(blob)
    gnu_long = fmt == tarfile.GNU_FORMAT and any(len(n) > 100 for n, _, _ in entries)
    if not gnu_long and all(n.isascii() for n, _, _ in entries):
        assert fast == slow


def test_webdataset_shards_take_the_fast_path() -> None:
    buffer = io.BytesIO()
    with wds.TarWriter(buffer) as sink:
        for i in range(5):
            sink.write({"__key__": f"s{i:03d}", "txt": f"caption {i}".encode(), "json": b"{}"})
    blob = buffer.getvalue()
    fast, slow = _both(blob)
    assert fast is not None and len(fast) == 10
    assert fast == slow == list(scan_members(io.BytesIO(blob), len(blob)))


def test_damage_falls_back_to_tarfile_and_is_reported() -> None:
    blob = bytearray(_archive([("a.txt", "file", b"x" * 600), ("b.txt", "file", b"y")], tarfile.USTAR_FORMAT))
    blob[1536 + 10] ^= 0xFF  # inside b.txt's header: its checksum no longer holds
    assert plain_members(io.BytesIO(bytes(blob)), len(blob)) is None
    scanned = list(scan_members(io.BytesIO(bytes(blob)), len(blob)))
    assert [m.name for m in scanned if isinstance(m, Member)] == ["a.txt"]
    assert any(isinstance(m, Damage) for m in scanned)


# Hand-built headers: the shapes tarfile's writer never produces (old-style directories, fields filled to
# the last byte, checksum and number spellings, pax records of every kind). On each the parser must give
# tarfile's members or None; FAST shapes are common enough in real shards to need the fast path, and
# TARFILE shapes are malformed, so only tarfile's reading (damage included) is the reference.
FIELDS = {
    "name": (0, 100),
    "mode": (100, 108),
    "uid": (108, 116),
    "gid": (116, 124),
    "size": (124, 136),
    "mtime": (136, 148),
    "type": (156, 157),
    "linkname": (157, 257),
    "magic": (257, 265),
    "devmajor": (329, 337),
    "devminor": (337, 345),
    "prefix": (345, 500),
    "pad": (500, 512),
}


def _header(chksum: bytes = b"%06o\0 ", size: int = 0, **fields: bytes) -> bytes:
    """A 512-byte ustar header; ``chksum`` is the checksum field's spelling (%-formatted with the sum)."""
    values = {"mode": b"0000644\0", "uid": b"0000000\0", "gid": b"0000000\0", "size": b"%011o\0" % size}
    values |= {"mtime": b"14000000000\0", "type": b"0", "magic": b"ustar\x0000", **fields}
    block = bytearray(BLOCK)
    for key, value in values.items():
        start, stop = FIELDS[key]
        assert len(value) <= stop - start, key
        block[start : start + len(value)] = value
    block[148:156] = b" " * 8
    block[148:156] = chksum % sum(block)
    return bytes(block)


def _pax(records: bytes, length: int | None = None) -> bytes:
    return (
        _header(name=b"././@PaxHeader", type=b"x", size=len(records) if length is None else length) + records
    )


def _patched(header: bytes, start: int, value: bytes) -> bytes:
    """``header`` with ``value`` written at ``start`` and its checksum made right again."""
    block = bytearray(header)
    block[start : start + len(value)] = value
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block)
    return bytes(block)


def _record_past_its_block() -> bytes:
    """A pax record that fills its block, ending in a newline, but claims 600 bytes."""
    record = b"600 path=" + b"p" * (BLOCK - 10) + b"\n"
    return _tar(_pax(record), _header(name=b"a"))


def _rec(key: str, value: str) -> bytes:
    """One pax record, its length counting its own digits."""
    body = f" {key}={value}\n".encode()
    length = len(body) + 1
    while len(body) + len(str(length)) != length:
        length += 1
    return b"%d%s" % (length, body)


def _tar(*parts: bytes) -> bytes:
    """The parts (headers, data) each padded to whole blocks, then the end-of-archive zeros."""
    return b"".join(part + b"\0" * (-len(part) % BLOCK) for part in parts) + b"\0" * 1024


def _by_tarfile(name: str, kind: str, fmt: int, data: bytes = b"", link: str = "") -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=fmt) as archive:
        info = tarfile.TarInfo(name)
        info.type, info.size, info.linkname, info.mtime = TYPES[kind], len(data), link, 1_700_000_000
        archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _checksum_read_with_the_type_flag() -> bytes:
    """A checksum field of eight octal digits (no terminator) that is the sum only if the type flag, the
    next byte, were read as a ninth digit: tarfile (and the parser) must reject it."""
    for i in range(64):
        block = bytearray(_header(name=b"c%d.txt" % i))
        block[148:156] = b" " * 8
        total = sum(block)
        if total % 8 == 0:  # the type flag is "0"
            block[148:156] = b"%08o" % (total // 8)
            return _tar(bytes(block))
    raise AssertionError("no name gives a sum divisible by 8")


def _pax_length_read_into_mtime() -> bytes:
    """A pax header whose size field is 12 digits (no NUL), followed by a member whose data is a header."""
    record = b"70 path=" + b"p" * 61 + b"\n"
    pax = bytearray(_pax(record))
    pax[124:136], pax[136] = b"%012o" % 70, ord("1")
    pax[148:156] = b" " * 8
    pax[148:156] = b"%06o\0 " % sum(pax[:BLOCK])
    inner = _header(name=b"inner.txt")
    return _tar(bytes(pax), _header(name=b"outer.bin", size=BLOCK), inner, _header(name=b"after.txt"))


FAST, EITHER, TARFILE = "the fast path", "either reader", "tarfile alone"
SHAPES = {
    # (archive, which reader must read it)
    "old-style regular file": (_tar(_header(name=b"a.txt", type=b"\0", size=2), b"hi"), FAST),
    "old-style directory": (_tar(_header(name=b"d/", type=b"\0"), _header(name=b"d/a.txt")), FAST),
    "old-style directory under a prefix": (_tar(_header(name=b"d/", prefix=b"p", type=b"\0")), EITHER),
    "regular file named with a slash": (_tar(_header(name=b"x/", size=2), b"hi"), EITHER),
    "directory with a leading slash": (_tar(_header(name=b"/abs/", type=b"5")), EITHER),
    "directory ending in X": (_tar(_header(name=b"BOX/", type=b"5")), EITHER),
    "directory ending in a space": (_tar(_header(name=b"d ", type=b"5")), EITHER),
    "directory in the prefix only": (_tar(_header(prefix=b"/BOX ", type=b"5")), EITHER),
    "prefix filling its field": (_tar(_header(name=b"a.txt", prefix=b"p" * 155, pad=b"z")), EITHER),
    "symlink claiming a size": (_tar(_header(name=b"l", type=b"2", linkname=b"t", size=5)), EITHER),
    "size field of 12 digits": (_tar(_patched(_header(name=b"a"), 124, b"%012o" % 2), b"hi"), EITHER),
    "size beyond the file in its first digit": (_tar(_header(name=b"a", size=8**10 + 2), b"hi"), EITHER),
    "checksum with a wrong first digit": (_tar(_header(name=b"a", chksum=b"7%06o\0")), EITHER),
    "checksum read with the type flag": (_checksum_read_with_the_type_flag(), EITHER),
    "malformed mode, valid checksum": (_tar(_header(name=b"a", mode=b"0000x44\0")), EITHER),
    "malformed device, valid checksum": (_tar(_header(name=b"a", devmajor=b"0000x00\0")), EITHER),
    "pax path ending in a space": (_tar(_pax(_rec("path", "a ")), _header(name=b"a")), EITHER),
    "pax path with a leading slash": (_tar(_pax(_rec("path", "/abs")), _header(name=b"a")), EITHER),
    "pax path ending in X": (_tar(_pax(_rec("path", "a/BOX")), _header(name=b"a")), EITHER),
    "pax path with '=' (hive-style)": (_tar(_pax(_rec("path", "split=train.txt")), _header(name=b"a")), FAST),
    "pax size over the header's": (_tar(_pax(_rec("size", "2000")), _header(name=b"a"), b"z" * 2000), FAST),
    "pax linkpath over the header's": (
        _tar(_pax(_rec("linkpath", "long")), _header(type=b"2", linkname=b"s")),
        FAST,
    ),
    "pax records past the header's size": (
        _tar(_pax(b"11 path=ab\n11 path=cd\n", length=11), _header()),
        EITHER,
    ),
    "pax record longer than its data": (_tar(_pax(b"20 path=abc\n"), _header(name=b"a")), EITHER),
    "pax record past its block": (_record_past_its_block(), EITHER),
    "pax record without '='": (_tar(_pax(b"7 path\n"), _header(name=b"a")), EITHER),
    "pax record of an unknown key": (_tar(_pax(_rec("GNU.sparse.name", "xyz")), _header(name=b"a")), EITHER),
    "two pax headers": (_tar(_pax(b"11 path=ab\n"), _pax(b"11 path=cd\n"), _header(name=b"a")), EITHER),
    "pax header then zeros": (_tar(_pax(b"11 path=ab\n"), b"\0" * BLOCK, _header(name=b"a")), EITHER),
    "pax size read into mtime": (_pax_length_read_into_mtime(), EITHER),
    "pax size beyond the file in its first digit": (
        _tar(_pax(b"11 path=ab\n", length=8**10 + 11)[:BLOCK] + b"11 path=ab\n", _header(name=b"a")),
        EITHER,
    ),
    "empty uid and gid fields": (_tar(_header(name=b"a", uid=b"\0" * 8, gid=b"\0" * 8, size=2), b"hi"), FAST),
    "pax records filling their block": (_tar(_pax(_rec("path", "p" * 502)), _header(name=b"a")), FAST),
    "archive ending with its last member's data": (_header(name=b"a", size=BLOCK) + b"z" * BLOCK, FAST),
    "pax record without its newline": (_tar(_pax(b"10 path=ab"), _header(name=b"a")), TARFILE),
    "zeros before the first member": (_tar(b"\0" * BLOCK, _header(name=b"a")), TARFILE),
}
for _fmt in FORMATS:
    SHAPES[f"name of 100 characters ({_fmt})"] = (_by_tarfile("n" * 96 + ".txt", "file", _fmt, b"x"), FAST)
    SHAPES[f"link of 100 characters ({_fmt})"] = (_by_tarfile("l", "symlink", _fmt, link="t" * 100), FAST)
    SHAPES[f"folder name in the prefix ({_fmt})"] = (
        _by_tarfile("d" * 130, "directory", _fmt),
        FAST if _fmt != tarfile.GNU_FORMAT else EITHER,
    )
SHAPES["long link target (pax)"] = (_by_tarfile("l", "symlink", tarfile.PAX_FORMAT, link="t" * 150), FAST)


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_hand_built_headers_read_as_tarfile_reads_them(shape) -> None:
    """Whatever the fast parser accepts reads as tarfile reads it; common shapes must take the fast path,
    and malformed ones must be left to tarfile (whose reading, damage included, is the reference)."""
    blob, reader = SHAPES[shape]
    fast, slow = _both(blob)
    assert fast is None or fast == slow
    if reader == FAST:
        assert fast == slow
    if reader == TARFILE:
        assert fast is None


def test_webdataset_shards_with_long_keys_take_the_fast_path() -> None:
    """Float mtimes and long keys give pax headers of several records, read by the fast parser too."""
    buffer = io.BytesIO()
    with wds.TarWriter(buffer) as sink:
        for i in range(3):
            sink.write({"__key__": f"{'k' * 120}{i}", "txt": b"a caption", "json": b"{}"})
    blob = buffer.getvalue()
    assert b" path=" in blob and b" mtime=" in blob
    fast, slow = _both(blob)
    assert fast is not None and len(fast) == 6
    assert fast == slow


def test_common_headers_pass_the_quick_pattern_without_a_field_by_field_check(monkeypatch) -> None:
    """The quick pattern is why the parser beats tarfile: a WebDataset shard's headers never have their
    number fields read one by one; per member only the checksum and the size are read."""
    read: list[bytes] = []
    number = tarheaders._number
    monkeypatch.setattr(tarheaders, "_number", lambda field: read.append(field) or number(field))
    buffer = io.BytesIO()
    with wds.TarWriter(buffer, mtime=0) as sink:
        for i in range(3):
            sink.write({"__key__": f"k{i}", "txt": b"a caption", "json": b"{}"})
    blob = buffer.getvalue()
    fast, slow = _both(blob)
    assert fast is not None and len(fast) == 6 and fast == slow
    assert len(read) == 2 * 6
