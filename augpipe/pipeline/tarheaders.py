"""The fast path of ``tarscan``: the members of a well-formed archive, read straight from its headers.

``tarfile`` spends about 0.15 ms per member (a TarInfo, pax parsing, two checksum variants), which at a
million samples of three members each is more than the whole job's budget, and every input is scanned by
the index pre-pass, by each fit pass and by the processing pass. Shards written by WebDataset, img2dataset
or GNU tar are almost always well formed, so this parser reads their 512-byte headers itself and gives up,
returning None, at the first thing it does not know to be plain: a bad checksum, a non-zero gap, a member
cut short, a type or pax keyword outside the common set, a base-256 number, a non-ASCII name. The caller
then scans the archive with ``tarfile``, whose results on every archive this parser accepts are the same
(``tests/test_tarheaders.py`` compares the two).
"""

from __future__ import annotations

import re
from typing import IO

BLOCK = 512

KINDS = {
    b"0": "file",
    b"\0": "file",
    b"1": "hardlink",
    b"2": "symlink",
    b"3": "character device",
    b"4": "block device",
    b"5": "directory",
    b"6": "fifo",
}
PAX_KEYS = frozenset({"path", "linkpath", "size", "mtime", "atime", "ctime", "uid", "gid", "uname", "gname"})
NUMBERS = ((100, 108), (108, 116), (116, 124), (124, 136), (136, 148), (329, 337), (337, 345))
# The number fields as tarfile and GNU tar write them (zero-padded octal, NUL-terminated), checked at once;
# any other spelling is checked field by field as tarfile's ``nti`` would read it.
CANONICAL = re.compile(rb"(?:[0-7]{7}\0){3}(?:[0-7]{11}\0){2}[0-7]{6}\0 ")
DEVICES = re.compile(rb"(?:[0-7]{7}\0|\0{8}){2}")
Member = tuple[str, int, int, str, str]


class _NotPlain(Exception):
    """The archive needs ``tarfile``'s general (slower) reader."""


def _text(field: bytes) -> str:
    value = field.split(b"\0", 1)[0]
    if not value.isascii():
        raise _NotPlain
    return value.decode("ascii")


def _number(field: bytes) -> int:
    if field[:1] in (b"\x80", b"\xff"):
        raise _NotPlain  # base-256: rare, left to tarfile
    try:
        return int(_text(field).strip() or "0", 8)
    except ValueError:
        raise _NotPlain from None


def _header(stream: IO[bytes], offset: int) -> bytes | None:
    """The valid 512-byte header at ``offset``; None for a block of zeros (or zeros up to the file's end)."""
    stream.seek(offset)
    header = stream.read(BLOCK)
    if header.count(0) == len(header):
        return None
    if len(header) < BLOCK:
        raise _NotPlain
    if not (CANONICAL.fullmatch(header, 100, 156) and DEVICES.fullmatch(header, 329, 345)):
        for start, stop in NUMBERS:  # tarfile rejects a header with any malformed number field
            _number(header[start:stop])
    if _number(header[148:156]) != sum(header) - sum(header[148:156]) + 8 * ord(" "):
        raise _NotPlain
    return header


def _pax_records(data: bytes) -> dict[str, str]:
    """The records of a pax extended header ("LEN KEY=VALUE\\n" each), when all are common keywords."""
    records: dict[str, str] = {}
    position = 0
    while position < len(data) and data[position] != 0:
        space = data.find(b" ", position)
        digits = data[position:space] if space > position else b""
        if not digits.isdigit():
            raise _NotPlain
        length = int(digits)
        record = data[space + 1 : position + length]
        if position + length > len(data) or not record.endswith(b"\n") or not record.isascii():
            raise _NotPlain
        key, equals, value = record[:-1].decode("ascii").partition("=")
        if not equals or key not in PAX_KEYS:
            raise _NotPlain
        records[key] = value
        position += length
    return records


def padded(size: int) -> int:
    """``size`` rounded up to whole 512-byte blocks, as tar stores member data."""
    return -(-size // BLOCK) * BLOCK


def _member(header: bytes, data_at: int, pax: dict[str, str]) -> Member:
    """One member as tarfile names it: ustar prefix, V7 directories, pax path/linkpath/size applied."""
    flag = header[156:157]
    kind = KINDS.get(flag)
    if kind is None:
        raise _NotPlain
    raw = _text(header[0:100])
    if flag == b"\0" and raw.endswith("/"):
        kind = "directory"
    name = raw
    prefix = _text(header[345:500])
    if prefix:
        name = f"{prefix}/{name}"
    if "path" in pax:
        name = pax["path"].rstrip("/")
    if kind == "directory":
        name = name.rstrip("/")
    size = int(pax["size"]) if "size" in pax else _number(header[124:136])
    if size < 0:
        raise _NotPlain
    return name, data_at, size if kind == "file" else 0, kind, pax.get("linkpath", _text(header[157:257]))


def _members(stream: IO[bytes], size: int) -> list[Member]:
    found: list[Member] = []
    offset = 0
    pax: dict[str, str] | None = None
    while offset < size:
        header = _header(stream, offset)
        if header is None:
            if offset == 0 or pax is not None:
                raise _NotPlain  # tarfile treats these zeros as damage
            offset += BLOCK  # zero blocks end an archive, or pad between concatenated ones
            continue
        data_at = offset + BLOCK
        if header[156:157] == b"x":
            length = _number(header[124:136])
            if pax is not None or data_at + length > size:
                raise _NotPlain
            stream.seek(data_at)
            pax = _pax_records(stream.read(padded(length)))  # tarfile reads every record in the blocks
            offset = data_at + padded(length)
            continue
        member = _member(header, data_at, pax or {})
        pax = None
        if data_at + member[2] > size:
            raise _NotPlain
        found.append(member)
        offset = data_at + padded(member[2])
        if offset > size:
            raise _NotPlain  # the last member's padding is cut: tarfile reports "unexpected end of data"
    if pax is not None:
        raise _NotPlain
    return found


def plain_members(stream: IO[bytes], size: int) -> list[Member] | None:
    """Every member as (name, data offset, data size, kind, link target), or None when the archive is not
    plain and ``tarfile`` must read it. Leaves the stream's position anywhere."""
    try:
        return _members(stream, size)
    except (_NotPlain, ValueError):
        return None
