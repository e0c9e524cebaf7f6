"""Driver memory of a fit over many small sample parts: all parts into the fit task vs merged in chunks.

At 1M samples in 1,000-row shards a fit samples ~5% of each shard, so each shard's part of the sample is
~55 rows of a 384-d embedding (~85 KB). Ray keeps objects under its inline limit (100 KB) in the owner's
own memory and copies them into the spec of the task that reads them, so handing every part to one fit
task costs the driver memory in proportion to the number of shards. The executor merges parts
``MERGE_CHUNK`` at a time as shards finish (``ray_dispatch``); this script measures both ways in one Ray
instance (chunked first) and prints the driver's RSS growth for each and their ratio.

    python benchmarks/fit_parts_memory.py [--shards 1000] [--rows 55] [--dim 384]
"""

from __future__ import annotations

import argparse
import gc
import threading
import time
from collections.abc import Iterator

import numpy as np
import psutil
import ray

from augpipe.pipeline.fitting import merge_parts
from augpipe.pipeline.ray_dispatch import MERGE_CHUNK


class PeakRss:
    """This process's peak RSS while the block runs, sampled every 10 ms."""

    def __init__(self) -> None:
        self.process = psutil.Process()
        self.peak = 0
        self.done = threading.Event()

    def __enter__(self) -> PeakRss:
        self.start = self.process.memory_info().rss
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()
        return self

    def _watch(self) -> None:
        while not self.done.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.01)

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        self.thread.join()

    @property
    def growth_mb(self) -> float:
        return (self.peak - self.start) / 2**20


@ray.remote(num_cpus=0.25)
def shard_part(shard: int, rows: int, dim: int) -> dict[str, list]:
    """One shard's part of a fit sample, shaped as ``fitting.fit_sample`` returns it."""
    rng = np.random.default_rng(shard)
    return {
        "key": [f"s{shard:05d}x{i:04d}" for i in range(rows)],
        "_rank": rng.integers(0, 2**63, size=rows, dtype=np.int64).tolist(),
        "text_embedding": list(rng.normal(size=(rows, dim)).astype(np.float32)),
    }


@ray.remote(num_cpus=0.25)
def merge(cap: int | None, *parts: dict[str, list]) -> dict[str, list]:
    return merge_parts(list(parts), cap)


@ray.remote(num_cpus=0.25)
def fit(*parts: dict[str, list]) -> int:
    """Stands in for the fit task: reads every part, returns the sample size."""
    return len(merge_parts(list(parts), None)["key"])


IN_FLIGHT = 4  # shards the executor has in flight at once on this box (its limit is actors + 1)


def finished_parts(shards: int, rows: int, dim: int) -> Iterator[ray.ObjectRef]:
    """Shard parts as they finish, a few at a time, as shards finish their pass in a run."""
    pending, next_shard = [], 0
    while pending or next_shard < shards:
        while next_shard < shards and len(pending) < IN_FLIGHT:
            pending.append(shard_part.remote(next_shard, rows, dim))
            next_shard += 1
        done, pending = ray.wait(pending, num_returns=1, fetch_local=False)
        yield from done


def all_at_once(shards: int, rows: int, dim: int) -> tuple[float, int]:
    with PeakRss() as rss:
        parts = list(finished_parts(shards, rows, dim))
        size = ray.get(fit.remote(*parts))
        del parts
    return rss.growth_mb, size


def merged_in_chunks(shards: int, rows: int, dim: int) -> tuple[float, int]:
    with PeakRss() as rss:
        merged, unmerged = [], []
        for part in finished_parts(shards, rows, dim):
            unmerged.append(part)
            if len(unmerged) >= MERGE_CHUNK:
                merged.append(merge.remote(None, *unmerged))
                unmerged = []
        size = ray.get(fit.remote(*merged, *unmerged))
        del merged, unmerged
    return rss.growth_mb, size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=1000)
    parser.add_argument("--rows", type=int, default=55, help="rows per shard's part")
    parser.add_argument("--dim", type=int, default=384)
    args = parser.parse_args()
    ray.init(include_dashboard=False, logging_level="ERROR")
    part_kb = args.rows * (args.dim * 4 + 40) / 1024
    print(f"{args.shards} parts of ~{part_kb:.0f} KB each (Ray inlines objects under 100 KB)")
    results = {}
    # Chunked first: memory the first way frees stays in the process and serves the second, so this order
    # can only flatter the baseline.
    for name, way in (("merged in chunks", merged_in_chunks), ("all parts into the fit task", all_at_once)):
        gc.collect()
        growth, size = way(args.shards, args.rows, args.dim)
        results[name] = growth
        print(f"{name:30s} driver RSS +{growth:7.1f} MB   sample {size} rows")
    chunked, baseline = results.values()
    print(f"ratio chunked / all at once: {chunked / max(baseline, 1e-9):.2f}")
    ray.shutdown()


if __name__ == "__main__":
    main()
