"""Throughput and memory of offline CMDA (rownorm_cra weights + generation) on a large synthetic corpus.

    python benchmarks/cmda_weights.py [--n 1000000] [--dim 512] [--batch 128]

The corpus is never materialised: row i of the teacher and student embeddings is a pure function of
(seed, i), generated on demand by a counter-based hash when the driver fetches a batch, so the driver
can shuffle freely and every implementation sees identical rows. Cluster labels are random (hash of i).

Measured, with one BLAS thread:
1. ``augpipe.methods.cmda.iter_offline_batches`` over the whole corpus (one pass); data generation is
   timed separately and reported apart from the CMDA maths.
2. A plain per-anchor implementation (the loops a first draft would write) on the first batches of the
   same permutation, checked against the library on every batch; it is too slow for the whole corpus,
   so its samples/s come from the subset.
3. tracemalloc peaks of the driver at a small and a large corpus, to show memory does not grow with n.
"""

from __future__ import annotations

import argparse
import resource
import time
import tracemalloc
from collections.abc import Callable
from itertools import islice

import numpy as np
from threadpoolctl import threadpool_limits

from augpipe.methods import cmda


def _splitmix64(z: np.ndarray) -> np.ndarray:
    z = z + 0x9E3779B97F4A7C15
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9
    z = (z ^ (z >> 27)) * 0x94D049BB133111EB
    return z ^ (z >> 31)


def _key(seed: int, salt: int) -> np.uint64:
    return np.uint64((seed * 0x100000001B3 + salt * 0x9E3779B1) % 2**64)


class HashedRows:
    """Row i = uniform(-1, 1)^dim from splitmix64(seed, salt, i, column): random access, O(batch) memory.

    Each 64-bit hash yields two 24-bit uniforms (exact in float32). ``seconds`` accumulates the time
    spent generating, so it can be reported apart from the maths that consumes the rows.
    """

    def __init__(self, seed: int, salt: int, dim: int) -> None:
        if dim % 2:
            raise ValueError("dim must be even")
        self.key = _key(seed, salt)
        self.half = dim // 2
        self.seconds = 0.0

    def __call__(self, idx: np.ndarray) -> np.ndarray:
        start = time.perf_counter()
        counters = idx.astype(np.uint64)[:, None] * np.uint64(self.half) + np.arange(
            self.half, dtype=np.uint64
        )
        h = _splitmix64(counters ^ self.key)
        rows = np.concatenate(
            [(h >> 40).astype(np.float32), ((h >> 8) & 0xFFFFFF).astype(np.float32)], axis=1
        )
        rows *= np.float32(2.0 / 2**24)
        rows -= np.float32(1.0)
        self.seconds += time.perf_counter() - start
        return rows


class HashedLabels:
    """Cluster label of row i in [0, k), from the same hash."""

    def __init__(self, seed: int, salt: int, k: int) -> None:
        self.key = _key(seed, salt)
        self.k = k

    def __call__(self, idx: np.ndarray) -> np.ndarray:
        return (_splitmix64(idx.astype(np.uint64) ^ self.key) % np.uint64(self.k)).astype(np.int64)


def naive_rownorm_cra(
    teacher: np.ndarray, student: np.ndarray, x_student: np.ndarray, labels: np.ndarray
) -> np.ndarray:
    """rownorm_cra for one batch written plainly: one anchor at a time, one contributor at a time."""
    b = teacher.shape[0]
    x_new = np.zeros_like(x_student)
    for i in range(b):
        t = teacher[i] / np.linalg.norm(teacher[i])
        row = np.zeros(b, dtype=teacher.dtype)
        for j in range(b):
            if labels[j] != labels[i]:
                continue
            if j == i:
                row[j] = 1.0
            else:
                z = student[j] / np.linalg.norm(student[j])
                row[j] = abs(np.dot(t, z))
        row /= row.sum()
        for j in range(b):
            if row[j] != 0:
                x_new[i] += row[j] * x_student[j]
    return x_new


def run_library(
    n: int, teacher: HashedRows, student: HashedRows, labels: HashedLabels, batch: int, seed: int
) -> tuple[int, float, float]:
    """One pass of the offline driver; returns (samples, wall seconds, data-generation seconds)."""
    teacher.seconds = student.seconds = 0.0
    count = 0
    start = time.perf_counter()
    for out in cmda.iter_offline_batches(
        n,
        teacher=teacher,
        student=student,
        x_student=student,
        cluster_labels=labels,
        batch_size=batch,
        seed=seed,
        mode="rownorm_cra",
    ):
        count += out.x_new.shape[0]
    return count, time.perf_counter() - start, teacher.seconds + student.seconds


def run_naive(
    n: int,
    teacher: HashedRows,
    student: HashedRows,
    labels: HashedLabels,
    batch: int,
    seed: int,
    n_batches: int,
) -> tuple[int, float, float]:
    """The naive loop on the first batches of the driver's permutation; returns (samples, s, max diff)."""
    count, seconds, max_diff = 0, 0.0, 0.0
    for idx in islice(cmda.permuted_batches(n, batch, seed=seed, pass_index=0), n_batches):
        t, z, lab = teacher(idx), student(idx), labels(idx)
        start = time.perf_counter()
        x_new = naive_rownorm_cra(t, z, z, lab)
        seconds += time.perf_counter() - start
        count += idx.shape[0]
        expected = cmda.generate(cmda.cmda_weights(t, z, lab, mode="rownorm_cra"), z)
        max_diff = max(max_diff, float(np.abs(x_new - expected).max()))
    return count, seconds, max_diff


def traced_peak(fn: Callable[[], object]) -> float:
    """tracemalloc peak (MiB) of the allocations made while ``fn`` runs."""
    tracemalloc.start()
    tracemalloc.reset_peak()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1] / 2**20
    finally:
        tracemalloc.stop()


def maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=1_000_000, help="corpus size (embedding pairs)")
    parser.add_argument("--dim", type=int, default=512, help="embedding dimension (even)")
    parser.add_argument("--batch", type=int, default=128, help="CMDA batch size B")
    parser.add_argument("--clusters", type=int, default=4, help="number of random cluster labels")
    parser.add_argument("--naive-batches", type=int, default=100, help="batches timed for the naive loop")
    parser.add_argument("--small-n", type=int, default=100_000, help="corpus size for the memory comparison")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    teacher = HashedRows(args.seed, 1, args.dim)
    student = HashedRows(args.seed, 2, args.dim)
    labels = HashedLabels(args.seed, 3, args.clusters)
    print(
        f"CMDA rownorm_cra: n={args.n:,} pairs, dim={args.dim}, B={args.batch}, "
        f"{args.clusters} random clusters, float32, 1 BLAS thread"
    )
    with threadpool_limits(limits=1):
        count, wall, datagen = run_library(args.n, teacher, student, labels, args.batch, args.seed)
        lib_rate = count / (wall - datagen)
        print(
            f"library  : {count:,} samples in {wall:.1f} s ({datagen:.1f} s of it generating data) -> "
            f"{lib_rate:,.0f} samples/s for the CMDA maths ({count / wall:,.0f} samples/s end to end)"
        )

        n_naive, naive_s, max_diff = run_naive(
            args.n, teacher, student, labels, args.batch, args.seed, args.naive_batches
        )
        naive_rate = n_naive / naive_s
        print(
            f"naive    : {n_naive:,} samples (first {args.naive_batches} batches of the same permutation; "
            f"a subset, the full corpus would take ~{args.n / naive_rate / 60:.1f} min) in {naive_s:.1f} s "
            f"-> {naive_rate:,.0f} samples/s; max |naive - library| = {max_diff:.1e}"
        )
        print(f"speed-up : {lib_rate / naive_rate:,.1f}x (library maths vs naive, samples/s)")

        def library(n: int) -> Callable[[], object]:
            return lambda: run_library(n, teacher, student, labels, args.batch, args.seed)

        naive_peak = traced_peak(
            lambda: run_naive(args.n, teacher, student, labels, args.batch, args.seed, args.naive_batches)
        )
        small_peak = traced_peak(library(args.small_n))
        large_peak = traced_peak(library(args.n))
    print(
        f"memory   : tracemalloc peak, library n={args.small_n:,}: {small_peak:.2f} MiB; "
        f"library n={args.n:,}: {large_peak:.2f} MiB; naive ({n_naive:,} samples): {naive_peak:.2f} MiB"
    )
    corpus_mib = 2 * args.n * args.dim * 4 / 2**20
    print(
        f"           (the corpus itself would be {corpus_mib:,.0f} MiB as float32 teacher + student); "
        f"process maxrss {maxrss_mib():.0f} MiB, interpreter and libraries included"
    )


if __name__ == "__main__":
    main()
