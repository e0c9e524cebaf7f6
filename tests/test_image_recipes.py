"""back-captioning and back-imagination end to end on tiny models through the real engine (Ray), and the
label-invariance stage ``score_invariance`` on its own (tiny CLIP and the packaged EfficientNet-Lite0).

The recipes run with ``--profile tiny`` on a few of the demo photos (and sentences), two images per source;
outputs are read back as an outside trainer would: webdataset, Ray Data, pyarrow.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import webdataset as wds
import yaml
from PIL import Image

from augpipe.methods.text_distance import normalize_text
from augpipe.pipeline import layout
from augpipe.pipeline.config import ConfigError, load_recipe
from augpipe.pipeline.manifest import validate_manifest
from augpipe.pipeline.plan import build_plan
from augpipe.pipeline.rows import Failure
from augpipe.pipeline.run import run_recipe
from augpipe.pipeline.stage import StageContext
from augpipe.stages.score_invariance import ScoreInvariance
from tests.corpora import SENTENCES, write_text_shard
from tests.faults import fault_env

BC_SETS = ["multiple=2", "caption.variants=2", "generate_image.variants=2"]
BI_SETS = ["multiple=2", "generate_image.variants=2", "caption.variants=2"]
BC_STAGES = ["caption", "generate_image", "filter_images", "score_invariance", "select"]
BI_STAGES = ["generate_image", "filter_images", "caption", "score_similarity", "select"]
PHOTOS = ["chelsea", "coffee", "rocket", "astronaut", "coins", "colorwheel", "clock", "retina"]
BROKEN = {"broken-jpg": "undecodable_image", "broken-png": "undecodable_image"}
SHARDS = 4


# -- corpora ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def demo_images(tmp_path_factory) -> Path:
    """The demo corpus's image shards (18 captioned, labelled photos), written once per session."""
    from augpipe.pipeline.demo import write_demo_data

    root = tmp_path_factory.mktemp("demo_images")
    write_demo_data(root)
    return root / "images"


def _demo_samples(folder: Path) -> dict[str, dict[str, bytes]]:
    samples = {}
    for shard in sorted(folder.glob("*.tar")):
        for sample in wds.WebDataset(str(shard), shardshuffle=False):
            samples[sample["__key__"]] = {ext: sample[ext] for ext in ("jpg", "txt", "json")}
    return samples


def _broken(photo: dict[str, bytes]) -> dict[str, dict[str, bytes]]:
    """A JPEG cut in half, and a PNG whose signature and header are followed by garbage."""
    png = io.BytesIO()
    Image.open(io.BytesIO(photo["jpg"])).save(png, format="PNG")
    garbage = png.getvalue()[:33] + bytes(range(256)) * 16
    return {
        "broken-jpg": {"jpg": photo["jpg"][: len(photo["jpg"]) // 2], "json": b'{"label": "animal"}'},
        "broken-png": {"png": garbage, "json": b'{"label": "object"}'},
    }


@pytest.fixture(scope="module")
def photos(demo_images, tmp_path_factory) -> Path:
    """Four shards of two demo photos; shard 1 also holds the two undecodable images between them."""
    folder = tmp_path_factory.mktemp("photos")
    samples = _demo_samples(demo_images)
    broken = _broken(samples["chelsea"])
    for i in range(SHARDS):
        keys = PHOTOS[2 * i : 2 * i + 2]
        members = [(key, samples[key]) for key in keys]
        if i == 1:
            members = [members[0], *broken.items(), members[1]]
        with tarfile.open(folder / f"shard-{i:05d}.tar", "w") as tar:
            for key, sample in members:
                for ext, data in sample.items():
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return folder


@pytest.fixture(scope="module")
def sentences(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("sentences")
    write_text_shard(folder / "shard-00000.tar", SENTENCES[:2])
    write_text_shard(folder / "shard-00001.tar", SENTENCES[2:4])
    return folder


# -- runs ------------------------------------------------------------------------------------------------


def bc_recipe():
    return load_recipe("back-captioning", profile="tiny", sets=BC_SETS)


@pytest.fixture(scope="module")
def bc_first(photos, tmp_path_factory, ray_session) -> Path:
    out = tmp_path_factory.mktemp("bc_first")
    result = run_recipe(bc_recipe(), photos, out, progress=False)
    assert not result.manifest["incomplete_shards"]
    return out


@pytest.fixture(scope="module")
def bi_out(sentences, tmp_path_factory, ray_session) -> Path:
    out = tmp_path_factory.mktemp("bi")
    result = run_recipe(
        load_recipe("back-imagination", profile="tiny", sets=BI_SETS), sentences, out, progress=False
    )
    assert result.ok
    return out


def parquet_rows(out: Path) -> list[dict]:
    return [row for p in sorted(out.glob("shard-*.parquet")) for row in pq.read_table(p).to_pylist()]


def wds_samples(out: Path) -> list[dict]:
    return [
        sample
        for tar in sorted(out.glob("shard-*.tar"))
        for sample in wds.WebDataset(str(tar), shardshuffle=False).decode("pil")
    ]


def source_sizes(photos: Path) -> dict[str, tuple[int, int]]:
    sizes = {}
    for shard in sorted(photos.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                if ext == "jpg" and key not in BROKEN:
                    sizes[key] = Image.open(io.BytesIO(tar.extractfile(member).read())).size
    return sizes


# -- back-captioning -------------------------------------------------------------------------------------


def test_back_captioning_writes_source_sized_pngs_with_lineage(bc_first, photos, ray_session):
    sizes = source_sizes(photos)
    samples = wds_samples(bc_first)
    keys = [s["__key__"] for s in samples]
    assert sorted(keys) == sorted(f"{key}-bc-{i}" for key in PHOTOS for i in range(2))
    for sample in samples:
        parent = sample["json"]["parent_key"]
        assert sample["png"].size == sizes[parent] and sample["png"].mode == "RGB"
        assert sample["json"]["label"] == json.loads(_label_of(photos, parent))["label"]

    table = parquet_rows(bc_first)
    assert [r["key"] for r in table] == keys
    for row in table:
        assert row["caption"] and row["prompt"] == row["caption"]
        assert row["stage_chain"] == BC_STAGES
        assert -1.0 <= row["score_clip_source"] <= 1.0 and -1.0 <= row["score_clip_label"] <= 1.0
        lineage = json.loads(row["lineage"])
        caption, image = lineage["caption"], lineage["generate_image"]
        assert caption["model"] == "tiny:blip" and caption["decoding"]["mode"] in {"greedy", "sample"}
        assert isinstance(caption["seed"], int)
        assert image["model"] == "tiny:stable-diffusion" and image["revision"].startswith("random-init")
        assert (
            image["steps"] == 4 and image["guidance_scale"] == 7.5 and image["scheduler"] == "DDIMScheduler"
        )
        assert image["prompt"] == row["prompt"] and image["size"] == list(sizes[row["parent_key"]])
        assert lineage["score_invariance"]["label_prompt"] == f"a photo of a {row['label']}"
        assert lineage["select"]["k"] == 2 and lineage["select"]["pool_size"] == 4
    seeds = [json.loads(r["lineage"])["generate_image"]["seed"] for r in table]
    assert len(set(seeds)) == len(seeds), "every generated image has its own seed"

    # Ray Data reads the same shards (images decoded) as a trainer's input pipeline would.
    import ray.data

    ray_rows = ray.data.read_webdataset([str(p) for p in sorted(bc_first.glob("shard-*.tar"))])
    ray_rows = ray_rows.take_all()
    assert sorted(r["__key__"] for r in ray_rows) == sorted(keys)
    assert all(np.asarray(r["png"]).ndim == 3 for r in ray_rows)


def _label_of(photos: Path, key: str) -> bytes:
    for shard in sorted(photos.glob("*.tar")):
        with tarfile.open(shard) as tar:
            if f"{key}.json" in tar.getnames():
                return tar.extractfile(f"{key}.json").read()
    raise KeyError(key)


def test_undecodable_images_are_quarantined_and_the_run_goes_on(bc_first):
    manifest = json.loads((bc_first / layout.MANIFEST).read_text())
    validate_manifest(manifest)
    assert manifest["samples"]["in"] == len(PHOTOS) + len(BROKEN)
    assert manifest["samples"]["failed"] == len(BROKEN)
    with tarfile.open(bc_first / layout.QUARANTINE_DIR / "shard-00001.tar") as tar:
        errors = [json.loads(tar.extractfile(m).read()) for m in tar.getmembers()]
    assert {e["key"]: e["cause"] for e in errors} == BROKEN
    assert all(e["stage"] == "read" for e in errors)
    # the photos on either side of the broken ones in that shard were augmented
    names = [s["__key__"] for s in wds.WebDataset(str(bc_first / "shard-00001.tar"), shardshuffle=False)]
    assert sorted(names) == sorted(f"{key}-bc-{i}" for key in PHOTOS[2:4] for i in range(2))
    assert not list((bc_first / layout.QUARANTINE_DIR).glob("shard-0000[023].tar"))


def _augpipe(*args: str) -> list[str]:
    return [sys.executable, "-m", "augpipe.pipeline.cli", *args]


@pytest.fixture(scope="module")
def bc_killed(photos, tmp_path_factory) -> tuple[Path, int]:
    """The CLI run in its own session, SIGKILLed with its Ray processes once a shard is committed, then
    re-run with the same command: (output folder, shards committed before the kill)."""
    out = tmp_path_factory.mktemp("bc_killed") / "out"
    command = _augpipe(
        "run", "back-captioning", "--input", str(photos), "--output", str(out), "--profile", "tiny",
        "--quiet", "--max-failure-rate", "0.5", *[arg for pair in BC_SETS for arg in ("--set", pair)],
    )  # fmt: skip
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    # Every commit but shard 0's never finishes, so the kill lands with exactly one shard committed.
    hold = tuple(f"shard-{i:05d}" for i in range(1, SHARDS))
    held = fault_env(tmp_path_factory.mktemp("hold"), "commit_shard", "none", once=True, hold=hold)
    victim = subprocess.Popen(
        command, start_new_session=True, env=held, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 240
    while not list((out / layout.STATS_DIR).glob("*.json")) and time.monotonic() < deadline:
        if victim.poll() is not None:
            break
        time.sleep(0.02)
    with contextlib.suppress(ProcessLookupError):  # ended before the kill: the test's assertion says so
        os.killpg(victim.pid, signal.SIGKILL)
    victim.wait()
    committed = len(list((out / layout.STATS_DIR).glob("*.json")))
    subprocess.run(command, env=env, check=True, timeout=300, capture_output=True)
    return out, committed


def test_sigkill_then_rerun_writes_every_key_once(bc_killed, bc_first):
    out, committed = bc_killed
    assert committed == 1, f"the kill should land after the first shard commit ({committed} committed)"
    expected = sorted(s["__key__"] for s in wds_samples(bc_first))
    keys = [s["__key__"] for s in wds_samples(out)]
    assert sorted(keys) == expected and len(keys) == len(set(keys))
    assert [r["key"] for r in parquet_rows(out)] == keys
    assert not list(out.rglob("*.partial"))
    manifest = json.loads((out / layout.MANIFEST).read_text())
    assert manifest["samples"]["out"] == len(expected) and not manifest["incomplete_shards"]


def test_runs_in_different_folders_give_byte_identical_shards(bc_killed, bc_first):
    """Determinism: the in-process run and the CLI run (own Ray, killed and resumed) agree byte for byte."""
    out, _ = bc_killed
    for i in range(SHARDS):
        name = f"shard-{i:05d}"
        assert (out / f"{name}.tar").read_bytes() == (bc_first / f"{name}.tar").read_bytes()
        assert pq.read_table(out / f"{name}.parquet").equals(pq.read_table(bc_first / f"{name}.parquet"))


# -- back-imagination ------------------------------------------------------------------------------------


def test_back_imagination_writes_captions_of_imagined_images(bi_out):
    sources = {key: (text, label) for key, text, label in SENTENCES[:4]}
    samples = [
        s for tar in sorted(bi_out.glob("shard-*.tar")) for s in wds.WebDataset(str(tar), shardshuffle=False)
    ]
    table = parquet_rows(bi_out)
    assert [s["__key__"] for s in samples] == [r["key"] for r in table]
    assert {r["parent_key"] for r in table} == set(sources)
    per_source: dict[str, list[str]] = {}
    for sample, row in zip(samples, table, strict=True):
        parent = row["parent_key"]
        assert sample["txt"].decode() == row["text"] and row["text"].strip()
        assert row["key"].startswith(f"{parent}-bi-")
        assert row["source_text"] == row["prompt"] == sources[parent][0]
        assert row["label"] == json.loads(sample["json"])["label"] == sources[parent][1]
        assert row["stage_chain"] == BI_STAGES
        assert -1.0 <= row["score_similarity"] <= 1.0
        lineage = json.loads(row["lineage"])
        assert lineage["generate_image"]["model"] == "tiny:stable-diffusion"
        assert {"seed", "steps", "guidance_scale", "scheduler"} <= set(lineage["generate_image"])
        assert lineage["filter_images"]["verdict"] == "kept"
        assert lineage["caption"]["field"] == "generated_image" and "seed" in lineage["caption"]
        assert lineage["score_similarity"]["candidate_field"] == "caption"
        per_source.setdefault(parent, []).append(normalize_text(row["text"]))
    for captions in per_source.values():
        assert 1 <= len(captions) <= 2 and len(set(captions)) == len(captions)


# -- recipes and profiles --------------------------------------------------------------------------------


@pytest.mark.parametrize("recipe", ["back-captioning", "back-imagination"])
@pytest.mark.parametrize("profile", ["tiny", "cpu", "gpu"])
def test_recipes_resolve_under_every_profile(recipe, profile):
    plan = build_plan(load_recipe(recipe, profile=profile), check_models=False)
    backends = {s.name: s.settings.backend for s in plan.stages}
    assert backends["caption"] == {"gpu": "blip"}.get(profile, "tiny")
    assert backends["generate_image"] == {"gpu": "diffusers"}.get(profile, "tiny")
    if recipe == "back-captioning":
        scorer = {"gpu": "clip", "cpu": "efficientnet_lite0"}.get(profile, "tiny")
        assert backends["score_invariance"] == scorer
    if profile == "gpu":
        shares = sum(s.effective_resources().gpus for s in plan.stages)
        assert 0 < shares <= 1.0, "the image stages share one card"


def test_back_speech_composes_as_the_paraphrase_step(tmp_path):
    """The recipe's documented H: back-speech's stages between caption and generate_image build a plan."""
    path = Path(__file__).resolve().parents[1] / "configs" / "recipes" / "back-captioning.yaml"
    raw = yaml.safe_load(path.read_text())
    stages = raw["stages"]
    stages[0]["output"] = "text"
    stages[1]["field"] = "transcript"
    speech = [
        {"stage": "synthesize_speech"},
        {"stage": "perturb_audio", "variants": 2},
        {"stage": "transcribe"},
        {"stage": "filter_paraphrase"},
    ]
    raw["stages"] = [stages[0], *speech, *stages[1:]]
    raw["output"] = {"image": "generated_image", "caption": "text", "paraphrase": "transcript"}
    composed = tmp_path / "back-captioning-speech.yaml"
    composed.write_text(yaml.safe_dump(raw))
    plan = build_plan(load_recipe(str(composed), profile="tiny"), check_models=False)
    assert [s.name for s in plan.stages][:6] == [
        "caption", "synthesize_speech", "perturb_audio", "transcribe", "filter_paraphrase", "generate_image"
    ]  # fmt: skip
    with pytest.raises(ConfigError, match="transcript"):
        build_plan(load_recipe("back-captioning", profile="tiny", sets=["generate_image.field=transcript"]))


# -- score_invariance ------------------------------------------------------------------------------------


def make_scorer(**options) -> ScoreInvariance:
    stage = ScoreInvariance(ScoreInvariance.settings_from(options), StageContext(run_seed=3))
    stage.check()
    stage.setup()
    return stage


@pytest.fixture(scope="module")
def photo_rows(demo_images) -> list[dict]:
    """Chelsea (2 candidates: a slight rotation and noise) and coffee (a mirror image, no label)."""
    samples = _demo_samples(demo_images)
    cat = Image.open(io.BytesIO(samples["chelsea"]["jpg"])).convert("RGB")
    coffee = Image.open(io.BytesIO(samples["coffee"]["jpg"])).convert("RGB")
    mirrored = coffee.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (96, 128, 3), dtype=np.uint8))
    return [
        {"key": "chelsea", "variant": (0,), "image": cat, "generated_image": cat.rotate(8), "label": "cat"},
        {"key": "chelsea", "variant": (1,), "image": cat, "generated_image": noise, "label": "cat"},
        {"key": "coffee", "variant": (0,), "image": coffee, "generated_image": mirrored},
    ]


def _count_calls(obj, method: str) -> list[int]:
    calls: list[int] = []
    original = getattr(obj, method)

    def counted(*args, **kwargs):
        calls.append(len(args[-1]) if method == "embed" else len(args[0]))
        return original(*args, **kwargs)

    setattr(obj, method, counted)
    return calls


def test_efficientnet_topk_agreement_tells_a_faithful_image_from_noise(photo_rows):
    stage = make_scorer()
    assert stage.backend.name == "efficientnet_lite0"
    assert stage.outputs() == {"score_topk_agreement", "score_top1_in_topk", "score_feature_source"}
    calls = _count_calls(stage.backend, "features_and_topk")
    faithful, noise, mirrored = stage.process_batch([dict(r) for r in photo_rows])
    assert calls == [2 + 3], "one forward pass: 2 distinct sources + 3 generated images"
    assert faithful["score_topk_agreement"] >= 0.6 and faithful["score_top1_in_topk"] == 1.0
    assert mirrored["score_topk_agreement"] >= 0.6 and mirrored["score_top1_in_topk"] == 1.0
    assert noise["score_topk_agreement"] <= 0.2 and noise["score_top1_in_topk"] == 0.0
    assert faithful["score_feature_source"] > noise["score_feature_source"] + 0.3
    info = faithful["lineage"]["score_invariance"]
    assert len(info["source_topk"]) == len(info["generated_topk"]) == 5
    agreement = len(set(info["source_topk"]) & set(info["generated_topk"])) / 5
    assert faithful["score_topk_agreement"] == pytest.approx(agreement)

    strict = make_scorer(min_topk_agreement=0.5, require_top1=True)
    kept = strict.process_batch([dict(r) for r in photo_rows])
    assert [(r["key"], r["variant"]) for r in kept] == [("chelsea", (0,)), ("coffee", (0,))]
    assert strict.stats["dropped:score_topk_agreement"] == 1 and strict.stats["scored"] == 2


def test_tiny_clip_scores_sources_once_and_labels_when_known(photo_rows):
    stage = make_scorer(backend="tiny")
    assert stage.outputs() == {"score_clip_source", "score_clip_label"}
    calls = _count_calls(stage.backend, "embed")
    out = stage.process_batch([dict(r) for r in photo_rows])
    assert calls == [5, 1], "one image call (2 sources + 3 generated) and one call for the class prompt"
    assert all(-1.0 <= r["score_clip_source"] <= 1.0 for r in out)
    assert [("score_clip_label" in r) for r in out] == [True, True, False]
    assert out[0]["lineage"]["score_invariance"]["label_prompt"] == "a photo of a cat"
    assert stage.stats["unlabelled"] == 1

    threshold = sorted(r["score_clip_source"] for r in out)[1]
    strict = make_scorer(backend="tiny", min_clip_source=threshold, min_clip_label=-1.0)
    kept = strict.process_batch([dict(r) for r in photo_rows])
    assert len(kept) == 2 and strict.stats["dropped:score_clip_source"] == 1


def test_missing_images_fail_and_bad_settings_name_the_key(photo_rows):
    stage = make_scorer(backend="tiny")
    rows = [dict(photo_rows[0]), {**photo_rows[1], "generated_image": None}]
    ok, failed = stage.process_batch(rows)
    assert "score_clip_source" in ok
    assert isinstance(failed, Failure) and failed.cause == "missing_field"
    assert "generated_image" in failed.message
    with pytest.raises(ValueError, match="min_clip_source does not apply"):
        ScoreInvariance(ScoreInvariance.settings_from({"min_clip_source": 0.2}), StageContext())
    with pytest.raises(ValueError, match="require_top1 does not apply"):
        settings = ScoreInvariance.settings_from({"backend": "tiny", "require_top1": True})
        ScoreInvariance(settings, StageContext())
    with pytest.raises(ValueError, match="label"):
        ScoreInvariance.settings_from({"label_template": "a photo of a {class}"})
    with pytest.raises(ConfigError, match="score_invariance: min_clip_source"):
        recipe = load_recipe("back-captioning", profile="tiny", sets=["score_invariance.min_clip_source=2"])
        build_plan(recipe, check_models=False)
