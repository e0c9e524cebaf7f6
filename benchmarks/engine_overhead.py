"""Engine overhead: the pass-through recipe through augpipe vs a bare webdataset read/write loop.

Both read the same WebDataset text shards and write WebDataset shards. augpipe also decodes and checks
every sample, writes a Parquet sidecar with lineage, a stats record per shard and a manifest with
checksums, and runs on Ray; the ratio says what that costs. Ray start-up is timed separately because a
nightly job pays it once, not per shard.

    python benchmarks/engine_overhead.py [--shards 8] [--per-shard 5000]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import ray
import webdataset as wds

from augpipe.pipeline.config import load_recipe
from augpipe.pipeline.ingest import write_shards
from augpipe.pipeline.run import run_recipe

WORDS = [
    "the",
    "a",
    "quiet",
    "river",
    "town",
    "film",
    "story",
    "old",
    "new",
    "bright",
    "slow",
    "music",
    "friend",
    "walks",
    "under",
    "over",
]


def make_corpus(folder: Path, shards: int, per_shard: int) -> None:
    def samples():
        for i in range(shards * per_shard):
            words = [WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(12)]
            yield {"__key__": f"k{i:08d}", "txt": " ".join(words).encode(), "json": b'{"label": 1}'}

    write_shards(samples(), folder, per_shard)


def bare_loop(source: Path, target: Path) -> int:
    """What a user would write by hand: read each shard with webdataset, write each sample back."""
    target.mkdir(parents=True, exist_ok=True)
    count = 0
    for shard in sorted(source.glob("*.tar")):
        with wds.TarWriter(str(target / shard.name)) as sink:
            for sample in wds.WebDataset(str(shard), shardshuffle=False):
                sink.write({"__key__": sample["__key__"], "txt": sample["txt"], "json": sample["json"]})
                count += 1
    return count


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--per-shard", type=int, default=5000)
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    root = Path(tempfile.mkdtemp(prefix="augpipe-bench-"))
    try:
        make_corpus(root / "in", args.shards, args.per_shard)
        total = args.shards * args.per_shard

        started = time.perf_counter()
        bare_loop(root / "in", root / "bare")
        bare_s = time.perf_counter() - started

        started = time.perf_counter()
        ray.init(address="local", include_dashboard=False, logging_level="ERROR")
        ray_start_s = time.perf_counter() - started
        started = time.perf_counter()
        result = run_recipe(load_recipe("passthrough"), root / "in", root / "aug", progress=False)
        augpipe_s = time.perf_counter() - started
        assert result.manifest["samples"]["out"] == total
        ray.shutdown()

        print(
            f"corpus: {args.shards} shards x {args.per_shard} texts = {total} samples, {os.cpu_count()} CPUs"
        )
        print(f"bare webdataset loop      : {bare_s:7.2f} s  {total / bare_s:9.0f} samples/s")
        print(
            f"augpipe passthrough       : {augpipe_s:7.2f} s  {total / augpipe_s:9.0f} samples/s"
            f"  (+ Ray start {ray_start_s:.1f} s, paid once per job)"
        )
        print(
            f"ratio augpipe / bare      : {augpipe_s / bare_s:7.2f}x the time "
            f"({total / augpipe_s / (total / bare_s):.2f}x the throughput)"
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
