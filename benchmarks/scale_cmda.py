"""Scale: cmda-precomputed over a generated clip-retrieval-style corpus, at 10k, 100k or 1M samples.

The corpus is what clip-retrieval or img2dataset hand a user: WebDataset shards of 32 px JPEGs (10 classes,
labels in each sample's json) with a Parquet sidecar per shard holding 512-d image and 384-d text
embeddings (class centre + noise). ``augpipe run cmda-precomputed`` runs on it as a user would (a
subprocess, the embedded local Ray), and this script reports what a nightly job cares about:

- per-phase seconds (index pre-pass, each fit, processing) and ms per input sample, end to end;
- peak RSS of the driver (``augpipe run``) and of the largest Ray worker;
- disk: output shards vs everything else in the output folder.

Ratios compare each N against the smallest N measured in the same invocation (the baseline), e.g.
``--n 10000 100000`` prints ms/sample at 100k relative to 10k.

    python benchmarks/scale_cmda.py --n 10000 100000 [--work /tmp/augpipe-scale] [--keep]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import webdataset as wds
from PIL import Image

CLASSES = 10
SHARD = 1000
IMAGE_DIM, TEXT_DIM = 512, 384


def generate(folder: Path, n: int, seed: int = 0) -> None:
    """``n`` samples in shards of 1,000: JPEG + json label, sidecar with both embeddings (float32)."""
    if (folder / "DONE").exists():
        return
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    image_centres = rng.normal(size=(CLASSES, IMAGE_DIM)).astype(np.float32)
    text_centres = rng.normal(size=(CLASSES, TEXT_DIM)).astype(np.float32)
    colours = rng.integers(0, 256, size=(CLASSES, 3))
    for shard in range(-(-n // SHARD)):
        count = min(SHARD, n - shard * SHARD)
        labels = rng.integers(0, CLASSES, size=count)
        keys = [f"s{shard:05d}x{i:04d}" for i in range(count)]
        image_emb = image_centres[labels] + 0.6 * rng.normal(size=(count, IMAGE_DIM)).astype(np.float32)
        text_emb = text_centres[labels] + 0.6 * rng.normal(size=(count, TEXT_DIM)).astype(np.float32)
        name = f"{shard:05d}"
        with wds.TarWriter(str(folder / f"{name}.tar")) as sink:
            for i, (key, label) in enumerate(zip(keys, labels, strict=True)):
                pixels = np.clip(colours[label] + rng.normal(0, 40, size=(32, 32, 3)), 0, 255).astype(
                    np.uint8
                )
                buffer = io.BytesIO()
                Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
                caption = f"a photo of class {label}, sample {i}"
                sink.write(
                    {"__key__": key, "jpg": buffer.getvalue(), "txt": caption, "json": {"label": f"c{label}"}}
                )
        table = pa.table(
            {
                "key": keys,
                "image_embedding": pa.FixedSizeListArray.from_arrays(pa.array(image_emb.ravel()), IMAGE_DIM),
                "text_embedding": pa.FixedSizeListArray.from_arrays(pa.array(text_emb.ravel()), TEXT_DIM),
            }
        )
        pq.write_table(table, folder / f"{name}.parquet")
    (folder / "DONE").write_text(str(n))


def folder_bytes(folder: Path) -> tuple[int, int]:
    """(bytes of top-level data files, bytes of everything else) under an output folder."""
    data = sum(p.stat().st_size for p in folder.glob("*") if p.suffix in {".tar", ".parquet"})
    total = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    return data, total - data


class PeakWatcher(threading.Thread):
    """Polls the driver process and every Ray worker for their peak resident memory."""

    def __init__(self, driver: int) -> None:
        super().__init__(daemon=True)
        self.driver, self.driver_peak, self.worker_peak, self.stop = driver, 0, 0, threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.5):
            try:
                root = psutil.Process(self.driver)
                self.driver_peak = max(self.driver_peak, root.memory_info().rss)
                for child in root.children(recursive=True):
                    try:
                        if "ray::" in " ".join(child.cmdline()[:1]):
                            self.worker_peak = max(self.worker_peak, child.memory_info().rss)
                    except psutil.Error:
                        continue
            except psutil.Error:
                return


def run_once(n: int, work: Path, extra: list[str]) -> dict:
    corpus = work / f"corpus-{n}"
    started = time.perf_counter()
    generate(corpus, n)
    generated_s = time.perf_counter() - started
    out = work / f"out-{n}"
    shutil.rmtree(out, ignore_errors=True)
    command = [
        sys.executable,
        "-m",
        "augpipe.pipeline.cli",
        "run",
        "cmda-precomputed",
        "--input",
        str(corpus),
    ]
    command += ["--output", str(out), "--quiet", *extra]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    started = time.perf_counter()
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    watcher = PeakWatcher(proc.pid)
    watcher.start()
    stdout, stderr = proc.communicate()
    wall = time.perf_counter() - started
    watcher.stop.set()
    if proc.returncode != 0:
        raise SystemExit(f"augpipe exited {proc.returncode}:\n{stdout}\n{stderr[-4000:]}")
    manifest = json.loads((out / "_augpipe" / "manifest.json").read_text())
    record = manifest["runs"][-1]
    data, other = folder_bytes(out)
    return {
        "n": n,
        "generate_s": generated_s,
        "wall_s": wall,
        "ms_per_sample": 1000 * wall / n,
        "phases": record["phases"],
        "driver_peak_mb": max(record["driver_peak_rss_mb"], watcher.driver_peak / 2**20),
        "worker_peak_mb": watcher.worker_peak / 2**20,
        "shards_mb": data / 2**20,
        "other_mb": other / 2**20,
        "out": manifest["samples"]["out"],
        "m_star": manifest["artifacts"]["cluster"]["summary"]["m_star"],
        "fit_rows": {name: a["rows"] for name, a in manifest["artifacts"].items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, nargs="+", default=[10_000], help="corpus sizes to run")
    parser.add_argument("--work", type=Path, default=Path("/tmp/augpipe-scale"))
    parser.add_argument("--keep", action="store_true", help="keep the outputs (corpora are always kept)")
    parser.add_argument("--set", dest="sets", action="append", default=[], help="passed to augpipe run")
    args = parser.parse_args()
    extra = [arg for s in args.sets for arg in ("--set", s)]
    results = [run_once(n, args.work, extra) for n in sorted(args.n)]
    base = results[0]
    print(
        f"{'N':>9} {'wall s':>8} {'ms/sample':>9} {'x base':>7} {'driver MB':>9} {'worker MB':>9} "
        f"{'shards MB':>9} {'other MB':>8} {'folder/shards':>13}  phases (s)"
    )
    for r in results:
        phases = ", ".join(f"{k} {v:.0f}" for k, v in r["phases"].items())
        ratio = r["ms_per_sample"] / base["ms_per_sample"]
        folder = (r["shards_mb"] + r["other_mb"]) / r["shards_mb"]
        print(
            f"{r['n']:>9,} {r['wall_s']:>8.0f} {r['ms_per_sample']:>9.2f} {ratio:>7.2f} "
            f"{r['driver_peak_mb']:>9.0f} {r['worker_peak_mb']:>9.0f} {r['shards_mb']:>9.0f} "
            f"{r['other_mb']:>8.1f} {folder:>13.3f}  {phases}"
        )
    print(json.dumps(results, indent=1))
    if not args.keep:
        for r in results:
            shutil.rmtree(args.work / f"out-{r['n']}", ignore_errors=True)


if __name__ == "__main__":
    main()
