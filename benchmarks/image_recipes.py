"""back-captioning throughput on the tiny models: augpipe vs a plain Python loop, and 1 vs 2 caption actors.

The baseline is what a user would write by hand: build the same tiny BLIP captioner and tiny Stable
Diffusion pipeline the stages build (``build_tiny_blip``, ``build_tiny_sd``), then for each image caption it
(greedy, 12 new tokens, as the tiny profile's variant 0), imagine one image from the caption (4 DDIM steps,
guidance 7.5, a seeded generator, 64 px) and resize it to the source size. augpipe runs back-captioning with
``--profile tiny`` and one caption and one image per source (``caption.variants=1``,
``generate_image.variants=1``, ``multiple=1``), so both do one caption and one diffusion per image; augpipe
also decodes shards, filters black/grayscale images, scores label invariance with tiny CLIP, selects, and
writes PNG shards with Parquet lineage. Then the same augpipe run with ``caption.concurrency=2``.

    python benchmarks/image_recipes.py [--copies 4] [--shard-size 9]

Ray start-up is excluded from augpipe times (a job pays it once); actor start-up (imports, model builds in
every stage worker) is included, so the loop is shown with and without its own model builds, and augpipe's
steady state is shown as images / the busiest stage's busy seconds. The loop runs torch with one thread, as
Ray runs each stage actor (OMP_NUM_THREADS = its CPU share): on a 2-core machine shared with other jobs,
torch's default of one thread per core oversubscribes the cores (it ran up to 10x slower here while other
processes were busy); that default is timed on the first ``--shard-size`` images for comparison.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import ray
import webdataset as wds
from PIL import Image

from augpipe.pipeline.config import load_recipe
from augpipe.pipeline.demo import write_demo_data
from augpipe.pipeline.ingest import write_shards
from augpipe.pipeline.rows import derive_seed
from augpipe.pipeline.run import run_recipe

ONE_EACH = ["caption.variants=1", "generate_image.variants=1", "multiple=1"]


def make_corpus(root: Path, copies: int, shard_size: int) -> list[tuple[str, bytes]]:
    """``copies`` x the 18 demo photos, in shards of ``shard_size``; returns (key, jpeg) in order."""
    write_demo_data(root / "demo")
    photos = [
        (s["__key__"], s["jpg"], s["json"])
        for tar in sorted((root / "demo" / "images").glob("*.tar"))
        for s in wds.WebDataset(str(tar), shardshuffle=False)
    ]
    items = [(f"{key}-c{c}", jpg, meta) for c in range(copies) for key, jpg, meta in photos]
    samples = ({"__key__": key, "jpg": jpg, "json": meta} for key, jpg, meta in items)
    write_shards(samples, root / "in", shard_size)
    return [(key, jpg) for key, jpg, _ in items]


def build_models() -> tuple[Any, Any, Any]:
    from augpipe.stages.caption import build_tiny_blip
    from augpipe.stages.generate_image import build_tiny_sd

    blip, processor = build_tiny_blip(0)
    pipe = build_tiny_sd(0)
    pipe.set_progress_bar_config(disable=True)
    return blip, processor, pipe


def plain_loop(items: list[tuple[str, bytes]], models: tuple[Any, Any, Any]) -> tuple[float, int]:
    """One image at a time: decode, caption, imagine, resize. Returns seconds and images made."""
    import torch

    blip, processor, pipe = models
    started = time.perf_counter()
    made = 0
    for key, jpg in items:
        source = Image.open(io.BytesIO(jpg)).convert("RGB")
        with torch.inference_mode():
            tokens = blip.generate(**processor(images=[source], return_tensors="pt"), max_new_tokens=12)
        caption = processor.batch_decode(tokens, skip_special_tokens=True)[0].strip()
        generator = torch.Generator().manual_seed(derive_seed(0, key, "generate_image", (0, 0)))
        image = pipe(
            prompt=[caption], generator=[generator], num_inference_steps=4, guidance_scale=7.5
        ).images[0]
        image.convert("RGB").resize(source.size, Image.Resampling.LANCZOS)
        made += 1
    return time.perf_counter() - started, made


def augpipe_run(corpus: Path, out: Path, sets: list[str]) -> tuple[float, dict]:
    started = time.perf_counter()
    recipe = load_recipe("back-captioning", profile="tiny", sets=sets)
    result = run_recipe(recipe, corpus, out, progress=False)
    if result.manifest["incomplete_shards"]:
        raise SystemExit(f"augpipe run {sets} did not finish: {result.manifest['incomplete_shards']}")
    return time.perf_counter() - started, result.manifest


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--copies", type=int, default=4, help="copies of the 18 demo photos")
    parser.add_argument("--shard-size", type=int, default=9)
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    root = Path(tempfile.mkdtemp(prefix="augpipe-img-bench-"))
    try:
        items = make_corpus(root, args.copies, args.shard_size)
        n = len(items)
        build_started = time.perf_counter()
        models = build_models()
        build_s = time.perf_counter() - build_started
        import torch

        default_threads = torch.get_num_threads()
        default_s, default_made = plain_loop(items[: args.shard_size], models)
        torch.set_num_threads(1)
        loop_s, loop_made = plain_loop(items, models)
        torch.set_num_threads(default_threads)
        del models

        ray.init(address="local", include_dashboard=False, logging_level="ERROR")
        one_s, one = augpipe_run(root / "in", root / "one", ONE_EACH)
        two_s, two = augpipe_run(root / "in", root / "two", [*ONE_EACH, "caption.concurrency=2"])
        ray.shutdown()

        shards = -(-n // args.shard_size)
        print(
            f"{n} photos (<=128 px) in {shards} shards, {os.cpu_count()} CPUs; "
            "tiny BLIP + tiny SD (64 px, 4 steps)"
        )
        print(
            f"plain loop, 1 image at a time      : {loop_s:6.1f} s  {loop_made / loop_s:6.2f} images/s "
            f"(+{build_s:.1f} s model build: {loop_made / (loop_s + build_s):5.2f} images/s with it)"
        )
        print(
            f"  same loop, torch's default {default_threads} threads: "
            f"{default_made / default_s:6.2f} images/s on the first {default_made} images"
        )
        for label, seconds, manifest in (
            ("augpipe, 1 caption actor", one_s, one),
            ("augpipe, 2 caption actors", two_s, two),
        ):
            made = manifest["samples"]["out"]
            stages = manifest["stages"]
            busy = ", ".join(f"{name} {stages[name]['wall_s']:.1f}" for name in ("caption", "generate_image"))
            print(
                f"{label:<35}: {seconds:6.1f} s  {made / seconds:6.2f} images/s  "
                f"ratio {loop_s / seconds:4.2f}x the loop "
                f"({(loop_s + build_s) / seconds:4.2f}x with its build); "
                f"stage busy s: {busy}"
            )
            slowest = max(stage["wall_s"] for name, stage in stages.items() if name != "read")
            print(f"{'':<35}  steady state {made / slowest:6.2f} images/s (busiest stage {slowest:.1f} s)")
        print(f"caption actors 1 -> 2: {one_s / two_s:4.2f}x throughput")
        print(
            "  (Ray start-up excluded; augpipe times include starting its stage actors and building "
            "their models)"
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
