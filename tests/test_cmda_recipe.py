"""`augpipe run cmda` end to end through Ray on the 18 demo photos: the embed stages, the two global fits
(latent space, GMM with M by BIC), interpolation, the written corpus and its manifest."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image

from augpipe.pipeline import layout
from augpipe.pipeline.config import load_recipe
from augpipe.pipeline.corpus import CorpusConflict
from augpipe.pipeline.run import run_recipe
from augpipe.pipeline.validate import validate_corpus

K = 3
SETS = ["latent_space.epochs=20", "cluster.pca_dims=4", "cluster.m_max=4"]  # small and quick on 18 rows


@pytest.fixture(scope="module")
def cmda_run(demo_text, ray_session, tmp_path_factory):
    out = tmp_path_factory.mktemp("cmda")
    result = run_recipe(load_recipe("cmda", sets=SETS), demo_text.parent / "images", out, progress=False)
    return out, result


def fits(out: Path) -> dict[str, tuple[int, bytes]]:
    found = (out / layout.ARTIFACTS_DIR).glob("*/fit.json")
    return {p.parent.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in found}


def test_cmda_writes_k_generated_images_per_source_with_lineage(cmda_run):
    out, result = cmda_run
    assert result.ok, result.manifest["failures"]
    manifest = result.manifest
    stages = manifest["stages"]
    dropped = stages["drop_duplicates"]["counts"]
    copies = dropped.get("duplicate_of_source", 0) + dropped.get("duplicate_of_sibling", 0)
    assert stages["interpolate"]["samples_out"] == 18 * K, "K mixes per source before copies are dropped"
    assert manifest["samples"]["in"] == 18 and manifest["samples"]["out"] == 18 * K - copies
    assert stages["embed_image"]["samples_out"] == stages["embed_text"]["samples_out"] == 18
    assert manifest["reused"] == {}, "a first run reuses nothing, even what its fit phase cached"
    assert validate_corpus(out) == []

    cluster = manifest["artifacts"]["cluster"]["summary"]
    assert len(cluster["bic"]) == 4 and cluster["m_star"] == int(np.argmin(cluster["bic"])) + 1
    latent = manifest["artifacts"]["latent_space"]["summary"]
    assert latent["final_loss"] < latent["initial_loss"] and latent["rows"] == 18
    folders = {p.name.split("-")[0]: p for p in (out / layout.ARTIFACTS_DIR).iterdir()}
    assert {"gmm.npz", "cluster.json", "fit.json"} <= {p.name for p in folders["cluster"].iterdir()}
    assert {"heads.safetensors", "latent_space.json"} <= {p.name for p in folders["latent_space"].iterdir()}

    per_source: dict[str, int] = {}
    for shard in ("shard-00000", "shard-00001"):
        samples = list(wds.WebDataset(str(out / f"{shard}.tar"), shardshuffle=False))
        table = pq.read_table(out / f"{shard}.parquet").to_pylist()
        assert [s["__key__"] for s in samples] == [r["key"] for r in table]
        for sample, row in zip(samples, table, strict=True):
            assert set(sample) >= {"png", "json"} and "txt" not in sample
            image = Image.open(io.BytesIO(sample["png"]))
            assert image.mode == "RGB" and min(image.size) >= 8
            meta = json.loads(sample["json"])
            parent = row["parent_key"]
            assert meta["parent_key"] == parent and row["key"] == f"{parent}-cmda-{row['variant'][0]}"
            per_source[parent] = per_source.get(parent, 0) + 1
            lineage = json.loads(row["lineage"])
            assert {"embed_image", "embed_text", "latent_space", "cluster", "interpolate"} <= set(lineage)
            info = lineage["interpolate"]
            assert info["anchor"] == parent and parent in info["contributors"]
            assert len(info["weights"]) == len(info["contributors"])
            assert sum(info["weights"]) == pytest.approx(1.0, abs=1e-5)
            assert info["m"] == cluster["m_star"] and info["mode"] == "rownorm_cra"
            assert info["cluster"] == row["cluster"] and row["source_text"]
            assert sum(p["weight"] for p in row["soft_label"]) == pytest.approx(1.0, abs=1e-5)
            assert info["contributors"] != [parent], "a copy of its source is dropped, not written"
    assert sum(per_source.values()) == 18 * K - copies and set(per_source.values()) <= set(range(1, K + 1))


def test_cmda_rerun_reuses_everything_and_a_downstream_change_reuses_the_fits(cmda_run, demo_text):
    out, first = cmda_run
    before = fits(out)
    assert len(before) == 2
    tars = {p.name: p.read_bytes() for p in out.glob("shard-*.tar")}
    again = run_recipe(load_recipe("cmda", sets=SETS), demo_text.parent / "images", out, progress=False)
    assert again.manifest["samples"] == first.manifest["samples"]
    assert {p.name: p.read_bytes() for p in out.glob("shard-*.tar")} == tars

    smaller_pools = load_recipe("cmda", sets=[*SETS, "interpolate.pool_size=4"])
    with pytest.raises(CorpusConflict, match=r"interpolate\.pool_size"):
        run_recipe(smaller_pools, demo_text.parent / "images", out, progress=False)
    changed = run_recipe(smaller_pools, demo_text.parent / "images", out, progress=False, overwrite=True)
    assert changed.ok and fits(out) == before  # the GMM and the heads were not refitted
    assert (
        changed.manifest["artifacts"]["cluster"]["summary"]
        == first.manifest["artifacts"]["cluster"]["summary"]
    )
    lineage = [json.loads(v) for v in pq.read_table(out / "shard-00000.parquet")["lineage"].to_pylist()]
    assert {entry["interpolate"]["pool_size"] for entry in lineage} == {4}
