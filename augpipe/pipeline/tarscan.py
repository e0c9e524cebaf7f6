"""Every member of an untrusted tar accounted for: samples, non-regular members, and damage with its offset.

A streaming tar reader stops at the first bad header as if the archive had ended, so samples after the
damage vanish without a trace. This scanner reads the archive with random access instead: it checks that
each member starts where the previous one ended (a gap that is not zero padding is damage), resynchronises
on the next valid header after a damaged one (tarfile's ``ignore_zeros`` mode), notices members cut short
by a truncated file, and reports everything it skips as ``Damage`` with the byte offset. Member sizes come
from headers, so callers can refuse an oversized member before reading a byte of it.

Well-formed archives (nearly all) are read by ``tarheaders``, ten times faster than ``tarfile``; anything
else falls back to ``tarfile``.

Samples are grouped as WebDataset groups them (consecutive members sharing a key); a member whose
extension the current group already has starts a new sample with the same key, which the reader then
reports as a duplicate instead of silently overwriting the first. Folder entries and regular files without
an extension are ``Skipped`` (WebDataset ignores them too); a link or device without an extension is a
sample of its own, so the reader refuses it with a cause like any other non-regular member.
"""

from __future__ import annotations

import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import IO

from webdataset.tariterators import base_plus_ext

from augpipe.pipeline.tarheaders import padded, plain_members

BLOCK = 512


@dataclass(frozen=True)
class Member:
    """A tar member as its header describes it; ``kind`` is ``file`` for a regular file."""

    name: str
    offset_data: int
    size: int
    kind: str
    target: str = ""


@dataclass(frozen=True)
class Damage:
    """Bytes of the archive that could not be read as members."""

    offset: int
    message: str
    member: str | None = None
    """The member the damage cut short, when known (its sample is lost)."""


@dataclass
class Sample:
    """Consecutive members sharing a key; ``others`` holds its non-regular members (links, devices)."""

    key: str
    members: dict[str, Member] = field(default_factory=dict)
    others: list[Member] = field(default_factory=list)


@dataclass(frozen=True)
class Skipped:
    """A member that belongs to no sample: a folder entry, or a file name without an extension."""

    member: Member
    reason: str


def _kind(info: tarfile.TarInfo) -> str:
    for kind, test in (
        ("file", info.isreg),
        ("directory", info.isdir),
        ("symlink", info.issym),
        ("hardlink", info.islnk),
        ("character device", info.ischr),
        ("block device", info.isblk),
        ("fifo", info.isfifo),
    ):
        if test():
            return kind
    return "special member"


def _all_zero(stream: IO[bytes], start: int, stop: int) -> bool:
    stream.seek(start)
    remaining = stop - start
    while remaining > 0:
        chunk = stream.read(min(remaining, 1 << 20))
        if not chunk:
            return True
        if chunk.count(0) != len(chunk):
            return False
        remaining -= len(chunk)
    return True


def scan_members(stream: IO[bytes], size: int) -> Iterator[Member | Damage]:
    """Members in archive order, with a ``Damage`` for every region that is not a member or padding."""
    if size == 0:
        yield Damage(0, "the file is empty (0 bytes)")
        return
    plain = plain_members(stream, size)
    if plain is not None:
        yield from (Member(*member) for member in plain)
    else:
        yield from tarfile_members(stream, size)


def tarfile_members(stream: IO[bytes], size: int) -> Iterator[Member | Damage]:
    """``scan_members`` through ``tarfile``: any archive, damaged ones included (about 0.15 ms a member)."""
    stream.seek(0)
    try:
        archive = tarfile.TarFile(fileobj=stream, mode="r", ignore_zeros=True)
    except tarfile.TarError as exc:
        yield Damage(0, f"not a tar archive ({exc})")
        return
    expected = 0
    infos = iter(archive)
    while True:
        try:
            info = next(infos)
        except StopIteration:
            break
        except (tarfile.TarError, EOFError, OSError) as exc:
            yield Damage(expected, f"unreadable tar header ({exc})")
            return
        if info.offset > expected and not _all_zero(stream, expected, info.offset):
            yield Damage(expected, f"{info.offset - expected:,} bytes of damaged tar data skipped")
        data_size = info.size if info.isreg() else 0
        if info.offset_data + data_size > size:
            yield Damage(
                info.offset,
                f"member {info.name} needs {data_size:,} bytes but the file ends after "
                f"{size - info.offset_data:,} (truncated)",
                member=info.name,
            )
            return
        yield Member(info.name, info.offset_data, data_size, _kind(info), info.linkname)
        expected = info.offset_data + padded(data_size)
    if expected < size and not _all_zero(stream, expected, size):
        if expected == 0:
            message = f"not a tar archive: no valid member header in {size:,} bytes"
        elif size - expected < BLOCK:
            message = "the file ends inside a member header (truncated)"
        else:
            message = f"{size - expected:,} bytes after the last member are not tar members (damaged header)"
        yield Damage(expected, message)


def key_of(name: str) -> tuple[str | None, str | None]:
    """(key, extension) as WebDataset splits a member name: at the first dot of the last component."""
    return base_plus_ext(name)


def scan_samples(stream: IO[bytes], size: int) -> Iterator[Sample | Skipped | Damage]:
    """Samples (consecutive members sharing a key), skipped members and damage, in archive order."""
    current: Sample | None = None
    for item in scan_members(stream, size):
        if isinstance(item, Damage):
            if current is not None and item.member is not None and key_of(item.member)[0] == current.key:
                current = None  # the cut member belongs to the open sample: the Damage accounts for it
            if current is not None:
                yield current
                current = None
            yield item
            continue
        if item.kind == "directory":
            yield Skipped(item, "a folder entry")
            continue
        key, ext = key_of(item.name)
        if (key is None or ext is None) and item.kind != "file":
            yield Sample(item.name, others=[item])  # a link or device is refused, never skipped unseen
            continue
        if key is None or ext is None:
            yield Skipped(item, "a file name without an extension (WebDataset ignores it)")
            continue
        ext = ext.lower()
        if current is None or key != current.key or ext in current.members:
            if current is not None:
                yield current
            current = Sample(key)
        if item.kind == "file":
            current.members[ext] = item
        else:
            current.others.append(item)
    if current is not None:
        yield current


def read_member(stream: IO[bytes], member: Member) -> bytes:
    stream.seek(member.offset_data)
    data = stream.read(member.size)
    if len(data) != member.size:
        raise EOFError(f"member {member.name} ends early ({len(data)} of {member.size} bytes)")
    return data
