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

import webdataset as wds
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from augpipe.pipeline.tarheaders import plain_members
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
