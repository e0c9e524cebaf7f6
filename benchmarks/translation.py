"""Latent modality translation on generated pairs with a known answer: held-out cosines and run times.

    python benchmarks/translation.py [--n 5000] [--cond-dim 64] [--target-dim 48] [--profile cpu]

The pairs (``augpipe.methods.synthetic.linear_pairs``) have targets z = Normalize(cA + noise), so cA
is the best possible prediction of z's direction and E[cos(cA, z)] on the held-out split is the
ceiling. The script fits the ``translate`` stage with a profile's sizes (``cpu``: 256 units, 4 layers,
10 DDIM steps, 30 epochs) and prints the held-out mean cosine of the model and of the paper's two
ablations (retrained without M, without the DDIM term) against that ceiling, each variant's training
seconds, and the translation throughput of ``process_batch`` (rows/s) beside the throughput of M
alone (the DDIM sampler's cost as a ratio).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

from augpipe.methods.synthetic import linear_pairs
from augpipe.methods.translation import holdout_split, mean_cosine
from augpipe.pipeline.config import configs_dir
from augpipe.pipeline.stage import StageContext
from augpipe.stages.translate import Translate


def profile_options(profile: str) -> dict:
    stages = yaml.safe_load((configs_dir() / "profiles" / f"{profile}.yaml").read_text())["stages"]
    return dict(stages.get("image_to_text", {}))


def throughput(stage: Translate, c: np.ndarray) -> float:
    rows = [{"key": f"b{i}", "variant": (), "lineage": {}, "image_embedding": v} for i, v in enumerate(c)]
    started = time.perf_counter()
    for start in range(0, len(rows), 1024):
        stage.process_batch(rows[start : start + 1024])
    return len(rows) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=5000)
    parser.add_argument("--cond-dim", type=int, default=64)
    parser.add_argument("--target-dim", type=int, default=48)
    parser.add_argument("--noise", type=float, default=0.5)
    parser.add_argument("--profile", default="cpu")
    parser.add_argument("--set", nargs="*", default=[], help="stage options, e.g. epochs=10 gpus=1")
    args = parser.parse_args()
    options = {**profile_options(args.profile), "seed": 0}
    for item in args.set:
        key, value = item.split("=", 1)
        options[key] = yaml.safe_load(value)
    c, z, a = linear_pairs(args.n, args.cond_dim, args.target_dim, seed=0, noise=args.noise)
    stage = Translate(Translate.settings_from(options), StageContext(run_seed=0))
    stage.setup()
    with tempfile.TemporaryDirectory() as folder:
        started = time.perf_counter()
        columns = {"key": [None] * args.n, "image_embedding": list(c), "text_embedding": list(z)}
        summary = stage.fit(columns, Path(folder))
        fit_s = time.perf_counter() - started
    _, held = holdout_split(args.n, stage.settings.holdout, stage.seed)
    ceiling = mean_cosine(c[held] @ a, z[held])
    print(
        f"pairs {args.n} ({summary['train_rows']} train, {summary['holdout_rows']} held out), "
        f"{args.cond_dim} -> {args.target_dim} dims, profile {args.profile}, device {stage.device}, "
        f"fit {fit_s:.1f} s"
    )
    print(f"ceiling E[cos(cA, z)] on the held-out split: {ceiling:.4f}")
    for name, cosine in summary["holdout_cosine"].items():
        seconds = summary["train_s"][name]
        print(
            f"  {name:<20} cos {cosine:.4f}  ({cosine / ceiling:.3f} of the ceiling)  train {seconds:.1f} s"
        )
    full = throughput(stage, c[:4096])
    stage.model.eps_net, steps = None, stage.settings.steps  # M alone: what the sampler costs
    alone = throughput(stage, c[:4096])
    print(
        f"translation: {full:.0f} rows/s with {steps} guided DDIM steps; M alone {alone:.0f} rows/s "
        f"(sampler cost x{alone / full:.1f})"
    )


if __name__ == "__main__":
    main()
