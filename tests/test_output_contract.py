"""The output contract: every recipe's folder loads as it is in pyarrow, Hugging Face ``datasets``, Ray Data
and webdataset (run in a process that never imports augpipe), with typed columns, the training target in
``KEY.json`` and a dataset card; copies of a source are dropped and counted."""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image

from augpipe.pipeline import layout
from augpipe.pipeline.config import StageEntry, load_recipe
from augpipe.pipeline.demo import write_demo_data
from augpipe.pipeline.registry import build_stage
from augpipe.pipeline.report import html_report
from augpipe.pipeline.run import run_recipe
from augpipe.pipeline.sidecar import hard_label, soft_label_pairs
from augpipe.pipeline.stage import StageContext

# recipe -> (corpus, profile, overrides), run in-process on two shards of three demo samples each: the tiny
# profile, except back-speech, whose tiny models hear noise that the edit filter rightly drops.
RECIPES = {
    "passthrough": ("text", "tiny", []),
    "back-speech": ("text", "cpu", ["perturb_audio.variants=2", "multiple=2"]),
    "mixup": ("images", "tiny", []),
    "geodesic-mixup": ("images", "tiny", []),
    "cmda": ("images", "tiny", ["interpolate.pool_size=2"]),
    "cmda-text": ("images", "tiny", ["interpolate.pool_size=2"]),
    "back-captioning": ("images", "tiny", ["caption.variants=1", "generate_image.variants=1", "multiple=1"]),
}

CONSUMER = r"""
import glob, json, os, sys
import datasets, pyarrow.dataset as pads, ray, webdataset as wds

ray.init(address="local", num_cpus=1, include_dashboard=False, logging_level="ERROR")
seen = {}
for out in sys.argv[1:]:
    table = pads.dataset(out, format="parquet", exclude_invalid_files=True).to_table()
    hf = datasets.load_dataset(out, split="train")
    tar_keys = [s["__key__"] for s in wds.WebDataset(sorted(glob.glob(f"{out}/*.tar")), shardshuffle=False)]
    seen[out] = {
        "pyarrow_rows": table.num_rows,
        "types": {f.name: str(f.type) for f in table.schema},
        "metadata": {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()},
        "parquet_keys": table["key"].to_pylist(),
        "tar_keys": tar_keys,
        "hf_rows": hf.num_rows,
        "hf_label": str(hf.features["label"]),
        "ray_webdataset_rows": ray.data.read_webdataset(out, file_extensions=["tar"]).count(),
        "ray_parquet_rows": ray.data.read_parquet(out).count(),
    }
print(json.dumps({"seen": seen, "augpipe_imported": "augpipe" in sys.modules}))
"""


def _first_samples(source: Path, target: Path, per_shard: int) -> Path:
    """The first ``per_shard`` samples of each demo shard, as a corpus of its own."""
    target.mkdir()
    for shard in sorted(source.glob("*.tar")):
        with wds.TarWriter(str(target / shard.name)) as sink:
            for sample in itertools.islice(wds.WebDataset(str(shard), shardshuffle=False), per_shard):
                sink.write({k: v for k, v in sample.items() if k != "__url__"})
    return target


@pytest.fixture(scope="module")
def outputs(tmp_path_factory) -> dict[str, Path]:
    demo = tmp_path_factory.mktemp("contract_demo")
    write_demo_data(demo)
    corpora = {name: _first_samples(demo / name, demo / f"{name}-small", 3) for name in ("text", "images")}
    root = tmp_path_factory.mktemp("contract")
    folders = {}
    for name, (corpus, profile, sets) in RECIPES.items():
        recipe = load_recipe(name, profile=profile, sets=sets)
        result = run_recipe(recipe, corpora[corpus], root / name, progress=False, executor="local")
        assert result.ok, name
        folders[name] = root / name
    return folders


@pytest.fixture(scope="module")
def consumed(outputs, tmp_path_factory) -> dict[str, dict]:
    home = tmp_path_factory.mktemp("hf_home")
    env = {"PATH": "/usr/bin:/bin", "HOME": str(home), "HF_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    env["RAY_AUTH_MODE"] = "disabled"
    command = [sys.executable, "-c", CONSUMER, *map(str, outputs.values())]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd="/", env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["augpipe_imported"] is False
    return {name: report["seen"][str(folder)] for name, folder in outputs.items()}


@pytest.mark.parametrize("name", RECIPES)
def test_every_library_loads_the_folder_with_the_manifest_counts(name, outputs, consumed):
    manifest = json.loads((outputs[name] / layout.MANIFEST).read_text())
    seen = consumed[name]
    count = manifest["samples"]["out"]
    assert count > 0
    assert seen["pyarrow_rows"] == seen["hf_rows"] == seen["ray_parquet_rows"] == count
    assert seen["ray_webdataset_rows"] == len(seen["tar_keys"]) == count
    assert seen["tar_keys"] == seen["parquet_keys"], "tar and sidecar hold the same samples in one order"
    assert seen["metadata"]["augpipe.recipe"] == name
    assert seen["metadata"]["augpipe.config_hash"] == manifest["config_hash"]
    assert seen["metadata"]["augpipe.fingerprint"] == manifest["fingerprint"]
    names = manifest["labels"]["names"]
    assert names and f"ClassLabel(names={names})" == seen["hf_label"]


def test_columns_are_typed(consumed):
    soft = "list<element: struct<label: string, weight: float>>"
    for name in ("mixup", "cmda", "cmda-text", "geodesic-mixup"):
        types = consumed[name]["types"]
        assert types["soft_label"] == soft, name
        assert types["contributors"] == "list<element: string>"
        assert types["weights"] == "list<element: float>"
        assert types["seed"] == "int64"
    for name in ("cmda", "cmda-text"):
        assert consumed[name]["types"]["cluster"] == "int32"
    assert consumed["cmda-text"]["types"]["generated_text_embedding"].startswith(
        "fixed_size_list<element: float>["
    )
    assert consumed["geodesic-mixup"]["types"]["image_embedding"].startswith(
        "fixed_size_list<element: float>["
    )
    assert consumed["back-speech"]["types"]["score_edit_ratio"] == "double"
    assert consumed["back-speech"]["types"]["score_similarity"] == "double"


def test_schemas_are_equal_in_every_shard(outputs):
    for name, folder in outputs.items():
        schemas = {str(pq.read_schema(p).remove_metadata()) for p in sorted(folder.glob("*.parquet"))}
        assert len(schemas) == 1, name


def test_a_mixed_sample_trains_on_its_soft_labels_argmax(outputs):
    """WebDataset-only trainers read KEY.json: its label is the dominant class of the soft label."""
    mixed = 0
    for tar in sorted(outputs["mixup"].glob("*.tar")):
        for sample in wds.WebDataset(str(tar), shardshuffle=False):
            meta = json.loads(sample["json"])
            assert set(meta) == {"key", "parent_key", "label", "recipe", "soft_label"}
            if meta["soft_label"]:
                mixed += 1
                weights = {p["label"]: p["weight"] for p in meta["soft_label"]}
                assert abs(sum(weights.values()) - 1) < 1e-6
                assert weights[meta["label"]] == max(weights.values())
    assert mixed
    rows = [r for p in sorted(outputs["mixup"].glob("*.parquet")) for r in pq.read_table(p).to_pylist()]
    for row in rows:
        if row["soft_label"]:
            best = max(row["soft_label"], key=lambda p: p["weight"])["weight"]
            assert {p["label"]: p["weight"] for p in row["soft_label"]}[row["label"]] == best
            assert row["contributors"] and len(row["weights"]) == len(row["contributors"])


def test_cmda_json_carries_cluster_and_soft_label(outputs):
    sample = next(iter(wds.WebDataset(str(sorted(outputs["cmda"].glob("*.tar"))[0]), shardshuffle=False)))
    meta = json.loads(sample["json"])
    assert isinstance(meta["cluster"], int) and isinstance(meta["soft_label"], list)


def test_back_speech_json_carries_the_filter_scores(outputs):
    sample = next(
        iter(wds.WebDataset(str(sorted(outputs["back-speech"].glob("*.tar"))[0]), shardshuffle=False))
    )
    meta = json.loads(sample["json"])
    assert 0 <= meta["score_edit_ratio"] <= 0.2 and -1 <= meta["score_similarity"] <= 1


def test_dataset_card_names_the_recipe_labels_and_manifest(outputs):
    import yaml

    for name, folder in outputs.items():
        text = (folder / layout.CARD).read_text()
        header = yaml.safe_load(text.split("---\n")[1])
        manifest = json.loads((folder / layout.MANIFEST).read_text())
        assert header["configs"][0]["data_files"][0]["path"] == "*.parquet"
        info = header["dataset_info"]
        assert info["splits"][0]["num_examples"] == manifest["samples"]["out"]
        on_disk = sum(p.stat().st_size for p in folder.glob("*.parquet"))
        assert info["splits"][0]["num_bytes"] == on_disk, "datasets ignores a split without its size"
        label = next(f for f in info["features"] if f["name"] == "label")
        assert list(label["dtype"]["class_label"]["names"].values()) == manifest["labels"]["names"]
        assert f"# {name} corpus" in text and "_augpipe/manifest.json" in text


def test_copies_of_a_source_are_dropped_and_counted(outputs):
    manifest = json.loads((outputs["cmda"] / layout.MANIFEST).read_text())
    counts = manifest["stages"]["drop_duplicates"]["counts"]
    dropped = sum(counts.values())
    assert dropped > 0, "the 18-photo demo with pools of 4 has lone anchors"
    assert manifest["stages"]["interpolate"]["samples_out"] - dropped == manifest["samples"]["out"]
    rows = [r for p in sorted(outputs["cmda"].glob("*.parquet")) for r in pq.read_table(p).to_pylist()]
    assert all(r["contributors"] != [r["parent_key"]] for r in rows)
    digests: dict[str, set[bytes]] = {}
    for tar in sorted(outputs["cmda"].glob("*.tar")):
        for sample in wds.WebDataset(str(tar), shardshuffle=False):
            parent = json.loads(sample["json"])["parent_key"]
            assert sample["png"] not in digests.setdefault(parent, set()), "no two siblings are equal"
            digests[parent].add(sample["png"])


def _image(value: int) -> Image.Image:
    return Image.fromarray(np.full((4, 4, 3), value, dtype=np.uint8))


def test_drop_duplicates_tells_source_and_sibling_copies_and_can_keep_them():
    rows = [
        {"key": "a", "variant": (0,), "image": _image(1), "generated_image": _image(1), "lineage": {}},
        {"key": "a", "variant": (1,), "image": _image(1), "generated_image": _image(2), "lineage": {}},
        {"key": "a", "variant": (2,), "image": _image(1), "generated_image": _image(2), "lineage": {}},
        {"key": "b", "variant": (0,), "image": _image(3), "generated_image": _image(2), "lineage": {}},
        {"key": "c", "variant": (0,), "image": _image(4), "generated_image": _image(5),
         "lineage": {"interpolate": {"contributors": ["c"], "weights": [1.0]}}},
    ]  # fmt: skip
    stage = build_stage(StageEntry(name="drop_duplicates", stage="drop_duplicates"), StageContext())
    kept = stage.process_batch(rows)
    assert [(r["key"], r["variant"]) for r in kept] == [("a", (1,)), ("b", (0,))]
    assert dict(stage.stats) == {"duplicate_of_source": 2, "duplicate_of_sibling": 1}
    keep = StageEntry(name="drop_duplicates", stage="drop_duplicates", options={"drop": False})
    marking = build_stage(keep, StageContext())
    marked = marking.process_batch([dict(r, lineage=dict(r["lineage"])) for r in rows])
    assert len(marked) == 5
    assert [r["lineage"].get("drop_duplicates", {}).get("duplicate_of") for r in marked] == [
        "source",
        None,
        "variant 1",
        None,
        "source",
    ]
    missing = stage.process_batch([{"key": "d", "variant": (0,), "image": _image(1), "lineage": {}}])
    assert missing[0].cause == "bad_input" and "generated_image" in missing[0].message


def test_soft_labels_and_their_argmax():
    assert soft_label_pairs('{"b": 0.25, "a": 0.75}') == [
        {"label": "a", "weight": 0.75},
        {"label": "b", "weight": 0.25},
    ]
    assert soft_label_pairs({"x": 1}) == [{"label": "x", "weight": 1.0}]
    assert soft_label_pairs([{"label": "y", "weight": 0.5}]) == [{"label": "y", "weight": 0.5}]
    assert soft_label_pairs(None) is None
    even = soft_label_pairs({"a": 0.5, "b": 0.5})
    assert hard_label(even, "b") == "b", "a tie goes to the anchor's own label"
    assert hard_label(even, "z") == "a", "then to the first name"
    assert hard_label(soft_label_pairs({"a": 0.3, "b": 0.7}), "a") == "b"
    assert hard_label(None, "own") == "own"


# -- the HTML report, in a real browser ------------------------------------------------------------------

ARTIFACTS = Path(os.environ.get("AUGPIPE_TEST_ARTIFACTS", Path(__file__).resolve().parents[1] / "build"))


def _chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is missing: .ci/run installs Debian's chromium package")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    return found


def _browse(page: Path, screenshot: Path) -> dict[str, str]:
    """Open ``page`` headless: the attributes its load handler set on <body>, and a screenshot."""
    browser = _chromium()
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=10000"]
    url = page.resolve().as_uri()
    dom = subprocess.run(
        [browser, *flags, "--dump-dom", url], capture_output=True, text=True, timeout=120, check=True
    ).stdout
    screenshot.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [browser, *flags, "--window-size=1300,2600", f"--screenshot={screenshot}", url],
        capture_output=True,
        timeout=120,
        check=True,
    )
    body = re.search(r"<body([^>]*)>", dom)
    assert body, dom[:500]
    return dict(re.findall(r'data-([a-z-]+)="([^"]*)"', body.group(1)))


@pytest.mark.parametrize("name", RECIPES)
def test_the_report_shows_examples_with_no_broken_image(name, outputs, tmp_path):
    folder = outputs[name]
    manifest = json.loads((folder / layout.MANIFEST).read_text())
    page = tmp_path / f"{name}.html"
    page.write_text(html_report(folder, manifest, examples=6))
    seen = _browse(page, ARTIFACTS / "test-artifacts" / f"report-{name}.png")
    assert (ARTIFACTS / "test-artifacts" / f"report-{name}.png").stat().st_size > 10_000
    assert seen["broken-images"] == "0"
    assert int(seen["examples"]) == min(6, manifest["samples"]["out"])
    if name not in {"passthrough", "back-speech", "cmda-text"}:
        assert int(seen["images"]) >= int(seen["examples"]), "image recipes show their images"
    text = page.read_text()
    assert "not reachable" not in text
    for stage in manifest["stages"]:
        assert f"<td>{stage}</td>" in text


def test_the_report_of_a_moved_corpus_warns_and_the_cmda_report_shows_its_fit(outputs, tmp_path):
    moved = tmp_path / "moved"
    shutil.copytree(outputs["mixup"], moved)
    stats = sorted((moved / layout.STATS_DIR).glob("*.json"))
    for path in stats:
        record = json.loads(path.read_text())
        record["input_identity"]["path"] = str(
            tmp_path / "gone" / Path(record["input_identity"]["path"]).name
        )
        path.write_text(json.dumps(record))
    text = html_report(moved, json.loads((moved / layout.MANIFEST).read_text()))
    assert "is not reachable; sources are not shown" in text
    cmda = html_report(outputs["cmda"], json.loads((outputs["cmda"] / layout.MANIFEST).read_text()))
    assert "BIC by number of clusters M" in cmda and "cluster sizes" in cmda and "soft label:" in cmda
    speech = html_report(
        outputs["back-speech"], json.loads((outputs["back-speech"] / layout.MANIFEST).read_text())
    )
    assert "<ins>" in speech or "<del>" in speech, "a paraphrase is shown as a diff of its source"
    assert "score_edit_ratio (sampled rows)" in speech
