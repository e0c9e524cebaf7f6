"""Which samples the HTML report shows, and their media: informative, seeded, never twins.

The first rows of the first shard are the least informative choice there is (for CMDA: the copies of one
anchor). The report instead draws a seeded sample of rows from up to ``MAX_SHARDS`` shards (reading only
the small columns), then picks examples round-robin over labels, preferring shards not yet shown and, where
the recipe has a score, the ends and middle of its range. Candidates whose text or media equals an earlier
pick's are skipped. Media come from the output tars of the picked shards alone, sources and contributors
from the input shard each output shard was made from (its stats record names it), so a report over a
million samples reads a handful of shards.
"""

from __future__ import annotations

import base64
import difflib
import html
import io
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import webdataset as wds
from PIL import Image

from augpipe.pipeline import layout

MAX_SHARDS, PER_SHARD = 64, 200
SCORE_PREFERENCE = ("score_similarity", "score_clip_source", "score_topk_agreement", "score_edit_ratio")
IMAGE_MEMBERS = ("png", "jpg", "jpeg", "webp")


@dataclass
class Candidate:
    """A row the report may show: the small columns only."""

    row: dict[str, Any]
    shard: str
    score: float | None


@dataclass
class Example:
    """A picked row with what the page shows beside it."""

    row: dict[str, Any]
    shard: str
    media: str | None = None
    text: str | None = None
    source_media: str | None = None
    source_text: str | None = None
    diff: str | None = None
    contributors: list[dict[str, Any]] = field(default_factory=list)
    scores: list[tuple[str, float]] = field(default_factory=list)


def primary_score(columns: list[str]) -> str | None:
    """The score a person would sort examples by, if the recipe writes one."""
    present = [c for c in SCORE_PREFERENCE if c in columns]
    return present[0] if present else next((c for c in sorted(columns) if c.startswith("score_")), None)


SMALL = ("key", "parent_key", "label", "text", "source_text", "caption", "prompt", "cluster", "soft_label")


def candidates(out_dir: Path, manifest: dict[str, Any], seed: int = 0) -> list[Candidate]:
    """A seeded sample of rows (small columns) from up to MAX_SHARDS shards."""
    rng = random.Random(seed)
    sidecars = [o for o in manifest["outputs"] if o["path"].endswith(".parquet")]
    chosen = sorted(rng.sample(range(len(sidecars)), min(MAX_SHARDS, len(sidecars))))
    found: list[Candidate] = []
    for index in chosen:
        entry = sidecars[index]
        path = out_dir / entry["path"]
        if not path.exists():
            continue
        names = pq.read_schema(path).names
        score = primary_score(names)
        wanted = [c for c in (*SMALL, "contributors", "weights") if c in names]
        table = pq.read_table(path, columns=wanted + ([score] if score else []) + _scores(names, score))
        picks = sorted(rng.sample(range(table.num_rows), min(PER_SHARD, table.num_rows)))
        for row in table.take(picks).to_pylist():
            found.append(Candidate(row, entry["shard"], row.get(score) if score else None))
    return found


def _scores(names: list[str], primary: str | None) -> list[str]:
    return [n for n in names if n.startswith("score_") and n != primary]


def _spread(group: list[Candidate]) -> list[Candidate]:
    """Lowest, highest, middle, then the quartiles and the rest, when the rows have a score."""
    scored = sorted((c for c in group if c.score is not None), key=lambda c: c.score)
    if len(scored) < 3:
        return group
    n = len(scored)
    ranked = [scored[i] for i in dict.fromkeys([0, n - 1, n // 2, n // 4, (3 * n) // 4])]
    return ranked + [c for c in group if c not in ranked]


def choose(pool: list[Candidate], limit: int, seed: int = 0) -> list[Candidate]:
    """Up to ``limit`` candidates, round-robin over labels, new shards first, no text twins."""
    rng = random.Random(seed)
    groups: dict[str, list[Candidate]] = {}
    for candidate in pool:
        groups.setdefault(str(candidate.row.get("label")), []).append(candidate)
    queues = []
    for label in sorted(groups):
        group = groups[label]
        rng.shuffle(group)
        queues.append(_spread(group))
    picked: list[Candidate] = []
    texts: set[str] = set()
    shards: set[str] = set()
    while queues and len(picked) < limit:
        for queue in list(queues):
            fresh = next((c for c in queue if c.shard not in shards), None)
            candidate = fresh or queue[0]
            queue.remove(candidate)
            if not queue:
                queues.remove(queue)
            text = candidate.row.get("text")
            if text is not None and text in texts:
                continue
            picked.append(candidate)
            shards.add(candidate.shard)
            if text is not None:
                texts.add(text)
            if len(picked) == limit:
                break
    return picked


def thumbnail(data: bytes, side: int = 160) -> str:
    with Image.open(io.BytesIO(data)) as image:
        image = image.convert("RGB")
        image.thumbnail((side, side))
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def members(paths: list[Path], wanted: set[str]) -> dict[str, dict[str, Any]]:
    """Raw members of the wanted keys from WebDataset shards (only what is shown is decoded)."""
    found: dict[str, dict[str, Any]] = {}
    for path in paths:
        if wanted <= set(found):
            break
        if not path.exists():
            continue
        for sample in wds.WebDataset(str(path), shardshuffle=False, empty_check=False):
            if sample["__key__"] in wanted:
                found[sample["__key__"]] = sample
    return found


def media_of(sample: dict[str, Any]) -> tuple[str | None, str | None]:
    """(image data URI, text) of a sample's members."""
    image = next((thumbnail(sample[e]) for e in IMAGE_MEMBERS if e in sample), None)
    text = sample.get("txt")
    return image, text.decode("utf-8", "replace") if isinstance(text, bytes) else text


def word_diff(source: str, new: str) -> str:
    """``new`` as HTML with the words it adds in <ins> and the words of ``source`` it drops in <del>."""
    a, b = source.split(), new.split()
    parts = []
    for op, i1, i2, j1, j2 in difflib.SequenceMatcher(a=a, b=b, autojunk=False).get_opcodes():
        if op in {"delete", "replace"}:
            parts.append(f"<del>{html.escape(' '.join(a[i1:i2]))}</del>")
        if op in {"insert", "replace"}:
            parts.append(f"<ins>{html.escape(' '.join(b[j1:j2]))}</ins>")
        if op == "equal":
            parts.append(html.escape(" ".join(a[i1:i2])))
    return " ".join(parts)


def _input_paths(out_dir: Path, shard: str) -> list[Path]:
    """The input tar an output shard was made from (its stats record), resolved next to the output when
    an old manifest stored it relative to the run's working directory."""
    try:
        stats = json.loads((out_dir / layout.stats_file(shard)).read_text())
    except (OSError, json.JSONDecodeError):
        return []
    path = Path(stats.get("input_identity", {}).get("path", ""))
    if not path.name.endswith(".tar"):
        return []
    return [path] if path.is_absolute() else [out_dir / path, Path.cwd() / path]


def _contributors(row: dict[str, Any], top: int) -> list[tuple[str, float]]:
    pairs = list(zip(row.get("contributors") or [], row.get("weights") or [], strict=False))
    return sorted(pairs, key=lambda p: -abs(p[1]))[:top]


def examples(
    out_dir: Path, manifest: dict[str, Any], limit: int, top: int = 3
) -> tuple[list[Example], list[str]]:
    """The examples to show with their media, and warnings about sources that could not be reached."""
    picked = choose(candidates(out_dir, manifest), 2 * limit)
    by_shard: dict[str, list[Candidate]] = {}
    for c in picked:
        by_shard.setdefault(c.shard, []).append(c)
    tars = {o["shard"]: out_dir / o["path"] for o in manifest["outputs"] if o["path"].endswith(".tar")}
    shown: list[Example] = []
    warnings: list[str] = []
    digests: set[str] = set()
    for shard, group in by_shard.items():
        generated = members([tars[shard]], {c.row["key"] for c in group}) if shard in tars else {}
        wanted = {c.row["parent_key"] for c in group} | {
            k for c in group for k, _ in _contributors(c.row, top)
        }
        paths = _input_paths(out_dir, shard)
        sources = members(paths, wanted) if paths else {}
        if wanted and not sources:
            where = ", ".join(map(str, paths)) or "unknown"
            warnings.append(f"{shard}: its input ({where}) is not reachable; sources are not shown")
        for candidate in group:
            example = _example(candidate, generated, sources, top)
            identity = example.media or example.text or candidate.row["key"]
            if identity in digests:
                continue
            digests.add(identity)
            shown.append(example)
    order = {id(c.row): i for i, c in enumerate(picked)}
    shown.sort(key=lambda e: order[id(e.row)])
    return shown[:limit], warnings


def _example(candidate: Candidate, generated: dict, sources: dict, top: int) -> Example:
    row = candidate.row
    media, text = media_of(generated.get(row["key"], {}))
    source_media, source_text = media_of(sources.get(row["parent_key"], {}))
    source_text = row.get("source_text") or source_text
    example = Example(row, candidate.shard, media, text, source_media, source_text)
    if text and source_text and text != source_text:
        example.diff = word_diff(source_text, text)
    for key, weight in _contributors(row, top):
        contributor_media, contributor_text = media_of(sources.get(key, {}))
        example.contributors.append(
            {"key": key, "weight": weight, "media": contributor_media, "text": contributor_text}
        )
    example.scores = [(k, v) for k, v in sorted(row.items()) if k.startswith("score_") and v is not None]
    return example
