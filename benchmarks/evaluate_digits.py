"""Does CMDA or mixup help a few-shot linear probe? ``augpipe evaluate`` on a corpus larger than the demo.

    python benchmarks/evaluate_digits.py [--shots 5 10] [--draws 3] [--templates 4] [--recipes cmda mixup]
        [--work DIR]

The corpus is scikit-learn's bundled handwritten digits (1,797 real 8x8 scans, 10 classes; no download),
drawn as 64x64 dark-on-white PNGs, each with a caption naming its digit from one of ``--templates``
seeded templates: the text modality CMDA weighs with. With several templates the wording, not the digit,
dominates a caption's embedding; with one, the caption is a function of the label.

A seeded 50 per class is the test set; from the rest, each draw takes ``shots`` per class as a training
corpus, which is augmented by ``augpipe run cmda`` and ``augpipe run mixup`` (k = 3 each) and then
evaluated: EfficientNet-Lite0 features, logistic-regression probe on the shots vs the shots + their
augmentations. Augmenting each draw's training corpus alone keeps the A/B strict (no augmented sample
mixes in an image outside the few-shot set). ``--recipes real`` is a control, not a recipe: 3 more real
images per training image, of its class, from outside the test set (parent_key = that training image),
the augmentation one would wish for. Prints one line per run and writes every result to
WORK/results.json (default WORK: /tmp/augpipe-digits).
"""

from __future__ import annotations

import argparse
import io
import json
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from sklearn.datasets import load_digits

from augpipe.evaluate.command import evaluate
from augpipe.evaluate.protocol import Protocol
from augpipe.pipeline.config import load_recipe
from augpipe.pipeline.ingest import write_shards
from augpipe.pipeline.run import run_recipe

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
TEMPLATES = [
    "a handwritten digit {word}",
    "the number {word} written by hand",
    "a scanned handwritten {word} in dark ink",
    "a small blurry picture of the numeral {digit}",
]
TEST_PER_CLASS = 50
K = 3
CONTROL = "real"
RECIPES = {
    # Pools of 32 within a shard, so the k passes differ on a 50- or 100-image corpus (README: CMDA).
    "cmda": ["interpolate.pool_size=32", "cluster.pca_dims=8"],
    "mixup": [],
}


def _sample(
    index: int, pixels: np.ndarray, label: int, templates: int, rng: np.random.Generator
) -> dict[str, bytes]:
    ink = (255 - pixels.reshape(8, 8) * (255 / 16)).astype(np.uint8)
    image = Image.fromarray(ink).convert("RGB").resize((64, 64), Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    # One draw over all templates whatever --templates is, so the splits are the same for every setting.
    template = TEMPLATES[rng.integers(len(TEMPLATES)) % templates]
    caption = template.format(word=WORDS[label], digit=label)
    return {
        "__key__": f"d{index:04d}",
        "png": buffer.getvalue(),
        "txt": caption.encode(),
        "json": json.dumps({"label": WORDS[label]}).encode(),
    }


def _write_control(folder: Path, samples: list[dict[str, bytes]], parents: list[str]) -> None:
    write_shards(iter(samples), folder, 1000)
    keys = [s["__key__"] for s in samples]
    pq.write_table(pa.table({"key": keys, "parent_key": parents}), folder / "shard-00000.parquet")


def write_corpora(work: Path, shots: list[int], draws: int, templates: int) -> dict[str, Path]:
    """The test corpus, one training corpus per (shots, draw) and its control, as WebDataset shards."""
    digits = load_digits()
    rng = np.random.default_rng(0)
    pairs = enumerate(zip(digits.data, digits.target, strict=True))
    samples = [_sample(i, x, int(y), templates, rng) for i, (x, y) in pairs]
    test, pool = [], []
    for label in range(10):
        members = rng.permutation(np.flatnonzero(digits.target == label))
        test += members[:TEST_PER_CLASS].tolist()
        pool.append(members[TEST_PER_CLASS:])
    corpora = {"test": work / "test"}
    write_shards(iter([samples[i] for i in sorted(test)]), corpora["test"], 1000)
    for n in shots:
        for draw in range(draws):
            picker = np.random.default_rng([n, draw])
            picked = [picker.choice(members, n, replace=False) for members in pool]
            chosen = sorted(int(i) for members in picked for i in members)
            corpora[f"{n}shot-{draw}"] = work / f"train-{n}shot-{draw}"
            write_shards(iter([samples[i] for i in chosen]), corpora[f"{n}shot-{draw}"], 1000)
            extra, parents = [], []
            for members, train in zip(pool, picked, strict=True):
                more = picker.choice(np.setdiff1d(members, train), K * n, replace=False)
                extra += [samples[int(i)] for i in more]
                parents += [samples[int(train[j % n])]["__key__"] for j in range(K * n)]
            _write_control(work / f"{CONTROL}-{n}shot-{draw}", extra, parents)
    return corpora


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shots", type=int, nargs="+", default=[5, 10])
    parser.add_argument("--draws", type=int, default=3)
    parser.add_argument("--templates", type=int, default=len(TEMPLATES), choices=range(1, len(TEMPLATES) + 1))
    parser.add_argument("--recipes", nargs="+", choices=[*RECIPES, CONTROL], default=list(RECIPES))
    parser.add_argument("--work", type=Path, default=Path("/tmp/augpipe-digits"))
    args = parser.parse_args()
    corpora = write_corpora(args.work, args.shots, args.draws, args.templates)
    results = []
    for name, train in corpora.items():
        if name == "test":
            continue
        for recipe in args.recipes:
            out = args.work / f"{recipe}-{name}"
            started = time.perf_counter()
            if recipe != CONTROL:
                run_recipe(load_recipe(recipe, sets=RECIPES[recipe]), train, out, progress=False)
            augmented_s = time.perf_counter() - started
            started = time.perf_counter()
            result = evaluate(train, out, corpora["test"], Protocol(seeds=1), features="image")
            evaluate_s = time.perf_counter() - started
            metrics = result["metrics"]
            line = {
                "train": name,
                "recipe": recipe,
                "augmented_samples": result["corpora"]["augmented"]["samples"],
                "augment_s": round(augmented_s, 1),
                "evaluate_s": round(evaluate_s, 1),
            } | {
                f"{metric}_{arm}": metrics[metric][arm]["mean"]
                for metric in metrics
                for arm in ("original", "augmented")
            }
            line |= {f"{metric}_difference_ci": metrics[metric]["difference"]["ci"] for metric in metrics}
            results.append(line | {"result": result})
            acc, f1 = metrics["accuracy"], metrics["macro_f1"]
            print(
                f"{name:10s} {recipe:6s} accuracy {acc['original']['mean']:.3f} -> "
                f"{acc['augmented']['mean']:.3f} ({acc['difference']['mean']:+.3f} "
                f"[{acc['difference']['ci'][0]:+.3f}, {acc['difference']['ci'][1]:+.3f}]), macro-F1 "
                f"{f1['original']['mean']:.3f} -> {f1['augmented']['mean']:.3f} "
                f"({f1['difference']['mean']:+.3f}); augment {augmented_s:.0f} s, "
                f"evaluate {evaluate_s:.0f} s",
                flush=True,
            )
    (args.work / "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
