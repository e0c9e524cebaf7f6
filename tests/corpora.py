"""Test corpora written as outsiders write them: webdataset for good shards, raw tarfile for hostile ones."""

from __future__ import annotations

import io
import json
import pickle
import tarfile
from pathlib import Path

import webdataset as wds

SENTENCES = [
    ("a000", "The weather was lovely and we walked along the river.", "positive"),
    ("a001", "My neighbour fixed the old bicycle in one afternoon.", "positive"),
    ("a002", "The meeting ran late and nobody had time for lunch.", "negative"),
    ("a003", "She planted tomatoes and basil in the small garden.", "positive"),
]


def write_text_shard(path: Path, samples: list[tuple[str, str, str]]) -> Path:
    with wds.TarWriter(str(path)) as sink:
        for key, text, label in samples:
            sink.write({"__key__": key, "txt": text, "json": {"label": label}})
    return path


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


class _Exploit:
    """Would run code if unpickled; the reader must refuse the member without reading it as a pickle."""

    def __reduce__(self) -> tuple:
        return (Path("/tmp/augpipe-pwned").touch, ())


def write_hostile_corpus(folder: Path) -> dict[str, str]:
    """Two shards: one with a bad sample of every kind among good ones, one truncated mid-member.

    Returns key -> the failure cause the reader must report for it.
    """
    folder.mkdir(parents=True, exist_ok=True)
    with tarfile.open(folder / "shard-00000.tar", "w") as tar:
        _add(tar, "good0.txt", b"A perfectly ordinary sentence about the sea.")
        _add(tar, "good0.json", json.dumps({"label": "positive"}).encode())
        _add(tar, "latin1.txt", "Caf\u00e9 cr\u00e8me".encode("latin-1"))
        _add(tar, "empty.txt", b"   \n")
        _add(tar, "huge.txt", b"word " * 400_000)
        _add(tar, "mystery.xyz", b"\x00\x01\x02")
        _add(tar, "pickled.pyd", pickle.dumps(_Exploit()))
        _add(tar, "../../escape.txt", b"I want to be written outside the output directory.")
        _add(tar, "good1.txt", b"Another ordinary sentence about the mountains.")
    good = io.BytesIO()
    with tarfile.open(fileobj=good, mode="w") as tar:
        _add(tar, "intact.txt", b"This sample comes before the damage and survives.")
        _add(tar, "cut.txt", b"This member is cut in half by the truncation. " * 40)
    blob = good.getvalue()
    (folder / "shard-00001.tar").write_bytes(blob[: 512 * 3 + 700])
    return {
        "latin1": "text_not_utf8",
        "empty": "empty_text",
        "huge": "text_too_large",
        "mystery": "unknown_member_type",
        "pickled": "refused_pickle",
        "../../escape": "unsafe_key",
        "cut": "corrupt_shard",
    }


def text_corpus(folder: Path, shards: int, per_shard: int, prefix: str = "shard") -> Path:
    """``shards`` tar shards of ``per_shard`` labelled sentences each, named PREFIX-00000.tar..."""
    folder.mkdir(parents=True, exist_ok=True)
    for shard in range(shards):
        samples = [
            (f"{prefix}{shard}s{i}", f"Sentence {i} of shard {shard} in {prefix}.", ("odd", "even")[i % 2])
            for i in range(per_shard)
        ]
        write_text_shard(folder / f"{prefix}-{shard:05d}.tar", samples)
    return folder


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    _add(tar, name, data)


def precomputed_corpus(folder: Path, shards: int, per_shard: int, classes: int = 3, seed: int = 0) -> Path:
    """clip-retrieval-style shards: an 8 px PNG, caption and label per sample, and a Parquet sidecar per
    shard with 16-d image and 8-d text embeddings near each class's centre (cmda-precomputed's input)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    centres = {
        "image_embedding": rng.normal(size=(classes, 16)),
        "text_embedding": rng.normal(size=(classes, 8)),
    }
    for shard in range(shards):
        labels = rng.integers(0, classes, size=per_shard)
        keys = [f"p{shard}x{i:03d}" for i in range(per_shard)]
        with wds.TarWriter(str(folder / f"shard-{shard:05d}.tar")) as sink:
            for key, label in zip(keys, labels, strict=True):
                png = io.BytesIO()
                Image.fromarray(rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)).save(png, format="PNG")
                caption = f"a photo of class {label}"
                sink.write(
                    {"__key__": key, "png": png.getvalue(), "txt": caption, "json": {"label": f"c{label}"}}
                )
        columns = {
            name: pa.array(
                (centre[labels] + 0.3 * rng.normal(size=(per_shard, centre.shape[1]))).tolist(),
                pa.list_(pa.float32(), centre.shape[1]),
            )
            for name, centre in centres.items()
        }
        pq.write_table(pa.table({"key": keys, **columns}), folder / f"shard-{shard:05d}.parquet")
    return folder
