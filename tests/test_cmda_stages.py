"""CMDA's global stages (latent_space, cluster), interpolate and the mixup baselines, called directly (no
Ray) on the 18 demo photos with real offline features: EfficientNet-Lite0 (1280-d) and MiniLM (384-d)
through the embed stage. Every expectation is re-derived from ``augpipe.methods`` on the same arrays."""

from __future__ import annotations

import json
import os
import shutil

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from sklearn.decomposition import PCA

from augpipe.methods.cmda import (
    EPS,
    cluster_batches,
    cmda_weights,
    generate,
    permuted_batches,
    select_gmm_bic,
)
from augpipe.methods.latent import supcon_loss
from augpipe.methods.mixup import geodesic_mix, mixup_batch
from augpipe.pipeline.config import load_recipe
from augpipe.pipeline.inputs import discover_inputs
from augpipe.pipeline.plan import build_plan
from augpipe.pipeline.reader import read_unit
from augpipe.pipeline.rows import Failure
from augpipe.pipeline.stage import StageContext
from augpipe.stages._pools import class_index, row_ident, shard_seed, soft_label_json, sorted_rows, to_image
from augpipe.stages.cluster import Cluster
from augpipe.stages.embed import Embed
from augpipe.stages.geodesic_mixup import GeodesicMixup
from augpipe.stages.interpolate import Interpolate, fit_image
from augpipe.stages.latent_space import LatentSpace
from augpipe.stages.mixup import Mixup

K = 3
CTX = StageContext(run_seed=0, recipe="cmda", multiple=K, tag="cmda")
CLUSTER_OPTIONS = {"pca_dims": 4, "m_max": 4, "seed": 7}


def make(cls, **options):
    stage = cls(cls.settings_from(options), CTX)
    stage.check()
    stage.setup()
    return stage


def fresh(rows):
    """Copies a stage may write into without touching the fixture's rows."""
    return [{**r, "lineage": json.loads(json.dumps(r["lineage"]))} for r in rows]


def columns(rows, *fields):
    return {name: [r.get(name) for r in rows] for name in ("key", *fields)}


def by_key(rows):
    return {r["key"]: r for r in rows}


@pytest.fixture(scope="module")
def shards(demo_text) -> list[list[dict]]:
    """The two demo image shards (9 rows each), read by the engine's reader and embedded by `embed`."""
    units = discover_inputs(demo_text.parent / "images", 1000)
    recipe = load_recipe("cmda")
    out = [read_unit(u, recipe.input, recipe.limits).rows for u in units]
    image = make(Embed, field="image", backend="efficientnet_lite0")
    text = make(Embed, field="text", backend="sentence_transformers")
    for rows in out:
        assert not [r for r in image.process_batch(rows) if isinstance(r, Failure)]
        assert not [r for r in text.process_batch(rows) if isinstance(r, Failure)]
    assert [len(s) for s in out] == [9, 9]
    assert out[0][0]["image_embedding"].shape == (1280,) and out[0][0]["text_embedding"].shape == (384,)
    return out


@pytest.fixture(scope="module")
def corpus(shards):
    return [r for s in shards for r in s]


@pytest.fixture(scope="module")
def fitted(shards, corpus, tmp_path_factory):
    """latent_space and cluster fitted once over the corpus; shards carry latents and cluster ids."""
    latent = make(LatentSpace, epochs=20)
    latent_dir = tmp_path_factory.mktemp("latent")
    latent_summary = latent.fit(columns(corpus, "image_embedding", "text_embedding", "label"), latent_dir)
    cluster = make(Cluster, **CLUSTER_OPTIONS)
    cluster_dir = tmp_path_factory.mktemp("cluster")
    cluster_summary = cluster.fit(columns(corpus, "text_embedding"), cluster_dir)
    prepared = []
    for rows in shards:
        rows = fresh(rows)
        latent.process_batch(rows)
        cluster.process_batch(rows)
        prepared.append(rows)
    return {
        "latent": latent,
        "latent_dir": latent_dir,
        "latent_summary": latent_summary,
        "cluster": cluster,
        "cluster_dir": cluster_dir,
        "cluster_summary": cluster_summary,
        "shards": prepared,
    }


# ------------------------------------------------------------------------------------------- cluster


def test_cluster_chooses_m_by_bic_deterministically_and_round_trips(corpus, fitted, tmp_path):
    summary = fitted["cluster_summary"]
    text = np.stack([r["text_embedding"] for r in corpus]).astype(np.float64)
    # 18 rows support 18 // 5 = 3 PCA dimensions and M <= 18 // 4 = 4 (augpipe.methods.gmm.model_budget)
    projected = PCA(n_components=3, svd_solver="full").fit_transform(text)
    expected = select_gmm_bic(projected, m_max=4, seed=7, covariance_type="tied")
    np.testing.assert_allclose(summary["bic"], expected.bic, rtol=1e-6)
    assert summary["m_star"] == expected.m_star == int(np.argmin(summary["bic"])) + 1
    assert summary["m_star"] > 1, "with 3 PCA dims BIC should find structure in the 7-class demo captions"
    assert (summary["fit_rows"], summary["m_range"]) == (18, [1, 4])
    assert (summary["covariance_type"], summary["feature_dim"], summary["pca_dims"]) == ("tied", 384, 3)
    assert 0 < summary["pca_variance_kept"] < 1 and sum(summary["weights"]) == pytest.approx(1.0)

    labels = [r["cluster"] for s in fitted["shards"] for r in s]
    np.testing.assert_array_equal(labels, expected.model.predict(projected))
    sizes = {k: v for k, v in fitted["cluster"].stats.items() if k.endswith("_rows")}  # counted per batch
    assert sizes == {f"cluster_{c}_rows": labels.count(c) for c in set(labels)} and sum(sizes.values()) == 18
    assert len(set(labels)) == summary["m_star"]
    row = fitted["shards"][0][0]
    assert row["lineage"]["cluster"] == {
        "cluster": row["cluster"],
        "m": summary["m_star"],
        "seed": 7,
        "cluster_on": "text_embedding",
    }

    again = make(Cluster, **CLUSTER_OPTIONS)
    assert again.fit(columns(corpus, "text_embedding"), tmp_path / "again") == summary  # same seed, same fit

    loaded = make(Cluster, **CLUSTER_OPTIONS)
    loaded.load_fitted(fitted["cluster_dir"])
    rows = fresh(corpus)
    loaded.process_batch(rows)
    assert [r["cluster"] for r in rows] == labels
    original = fitted["cluster"].model
    np.testing.assert_allclose(  # the saved GMM is the fitted one, not just one that labels alike
        loaded.model.selection.model.predict_proba(loaded.model.features(text)),
        original.selection.model.predict_proba(original.features(text)),
    )
    assert sorted(p.name for p in fitted["cluster_dir"].iterdir()) == ["cluster.json", "gmm.npz"]

    # The reference's model (a full covariance per component on the raw 384-d features) on 12 rows: BIC's
    # penalty wins, M* = 1, the failure the defaults avoid.
    sub = make(Cluster, m_max=2, seed=7, covariance="full", pca_dims=None)
    sub_summary = sub.fit(columns(corpus[:12], "text_embedding"), tmp_path / "sub")
    assert (sub_summary["fit_rows"], sub_summary["m_star"]) == (12, 1)
    assert sub_summary["bic"][0] < sub_summary["bic"][1] and sub_summary["gmm_dim"] == 384


# -------------------------------------------------------------------------------------- latent_space


def test_supcon_loss_is_the_reference_form():
    """SupCon on 3 stacked pairs against a direct numpy evaluation of ``losses.py`` (contrast_mode all)."""
    import torch

    rng = np.random.default_rng(0)
    f = rng.normal(size=(3, 2, 4))
    f /= np.linalg.norm(f, axis=2, keepdims=True)
    tau, base = 0.5, 0.07
    flat = np.concatenate([f[:, 0], f[:, 1]])  # torch.cat(torch.unbind(features, 1)): view-major
    logits = flat @ flat.T / tau
    ids = np.array([0, 1, 2, 0, 1, 2])
    for labels, positive in ((None, ids[:, None] == ids[None, :]), (np.array([0, 0, 1]), None)):
        if positive is None:
            y = labels[ids]
            positive = y[:, None] == y[None, :]
        losses = []
        for a in range(6):
            others = [b for b in range(6) if b != a]
            log_den = np.log(np.exp(logits[a, others]).sum())
            pos = [b for b in others if positive[a, b]]
            losses.append(-(tau / base) * np.mean([logits[a, b] - log_den for b in pos]))
        got = supcon_loss(
            torch.tensor(f),
            None if labels is None else torch.tensor(labels),
            temperature=tau,
            base_temperature=base,
        )
        assert float(got) == pytest.approx(np.mean(losses), rel=1e-9)


def test_latent_space_training_lowers_the_loss_and_saved_heads_reproduce_latents(corpus, fitted, tmp_path):
    summary = fitted["latent_summary"]
    assert summary["supervised"] is True and summary["classes"] == 7  # auto: every demo photo has a label
    assert (summary["student_dim"], summary["teacher_dim"], summary["dim"]) == (1280, 384, 128)
    assert summary["final_loss"] < 0.95 * summary["initial_loss"]
    folder = fitted["latent_dir"]
    assert sorted(p.name for p in folder.iterdir()) == ["heads.safetensors", "latent_space.json"]
    state = json.loads((folder / "latent_space.json").read_text())
    assert state["format"] == 1 and len(state["epoch_losses"]) == 20
    assert state["settings"]["temperature"] == 0.5 and state["settings"]["base_temperature"] == 0.07

    fitted_rows = [r for s in fitted["shards"] for r in s]
    # Not collapsed (every sample on one latent, which makes CMDA's |cos| weights uniform): a pair's own
    # text is closer to its image than other texts are, on average.
    cos = np.abs(
        np.stack([r["teacher_latent"] for r in fitted_rows])
        @ np.stack([r["student_latent"] for r in fitted_rows]).T
    )
    off_diagonal = cos[~np.eye(18, dtype=bool)].mean()
    assert off_diagonal < 0.8 and np.diag(cos).mean() > off_diagonal + 0.2
    loaded = make(LatentSpace, epochs=20)
    loaded.load_fitted(folder)
    rows = []
    for shard in fitted["shards"]:  # the same batches as the fitting stage projected: bit-identical latents
        shard = fresh(shard)
        assert not [r for r in loaded.process_batch(shard) if isinstance(r, Failure)]
        rows += shard
    for mine, theirs in zip(rows, fitted_rows, strict=True):
        for field in ("student_latent", "teacher_latent"):
            assert mine[field].dtype == np.float32 and mine[field].shape == (128,)
            np.testing.assert_array_equal(mine[field], theirs[field])
            assert np.linalg.norm(mine[field]) == pytest.approx(1.0, abs=1e-5)

    other = make(LatentSpace, epochs=20, dim=64)
    with pytest.raises(ValueError, match="fitted with"):
        other.load_fitted(folder)
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    (copy / "latent_space.json").write_text(json.dumps({**state, "format": 99}))
    with pytest.raises(ValueError, match="format 99"):
        loaded.load_fitted(copy)

    unsup = make(LatentSpace, epochs=3, supervised=False)
    unsup_summary = unsup.fit(columns(corpus, "image_embedding", "text_embedding", "label"), tmp_path / "u")
    assert unsup_summary["supervised"] is False and unsup_summary["initial_loss"] != summary["initial_loss"]


def test_max_steps_bounds_latent_space_training_and_is_recorded(corpus, fitted, tmp_path):
    """On a large corpus the step budget, not the epoch count, ends training; below it nothing changes."""
    data = columns(corpus, "image_embedding", "text_embedding", "label")
    assert fitted["latent_summary"]["steps"] == 20 and fitted["latent_summary"]["max_steps"] == 2000
    capped = make(LatentSpace, epochs=20, max_steps=7, train_batch_size=8)  # 18 rows: 3 steps an epoch
    summary = capped.fit(data, tmp_path / "capped")
    assert summary["steps"] == 7 and summary["epochs"] == 20
    state = json.loads((tmp_path / "capped" / "latent_space.json").read_text())
    assert len(state["epoch_losses"]) == 3  # two whole epochs and the step that began the third
    uncapped = make(LatentSpace, epochs=3, max_steps=None, train_batch_size=8)
    assert uncapped.fit(data, tmp_path / "all")["steps"] == 9
    exact = make(LatentSpace, epochs=3, max_steps=9, train_batch_size=8)
    assert exact.fit(data, tmp_path / "exact")["final_loss"] == uncapped.fitted["final_loss"]


# --------------------------------------------------------------------------------------- interpolate


def rederive(rows, seed, passes, pool_size, mode, pool="batch", clusters=True):
    """(anchor key, pass) -> (contributor keys, weights, member indices, W row) from augpipe.methods.cmda."""
    rows = sorted(rows, key=lambda r: r["key"])
    teacher = np.stack([r["teacher_latent"] for r in rows])
    student = np.stack([r["student_latent"] for r in rows])
    labels = np.array([r["cluster"] for r in rows]) if clusters else None
    found = {}
    for p in range(passes):
        if pool == "cluster":
            batches = cluster_batches(len(rows), pool_size, labels, seed=seed, pass_index=p)
        else:
            batches = permuted_batches(len(rows), pool_size, seed=seed, pass_index=p)
        for idx in batches:
            w = cmda_weights(teacher[idx], student[idx], None if labels is None else labels[idx], mode=mode)
            for r, anchor in enumerate(idx):
                nz = np.flatnonzero(w[r])
                found[(rows[anchor]["key"], p)] = ([rows[i]["key"] for i in idx[nz]], w[r][nz], idx, w[r])
    return rows, found


def test_interpolate_matches_cmda_weights_and_names_contributors(fitted):
    rows = fitted["shards"][0]
    stage = make(Interpolate, pool_size=4, soft_label=True)
    out = stage.process_batch(fresh(rows))
    assert not [o for o in out if isinstance(o, Failure)]
    assert sorted((o["key"], o["variant"]) for o in out) == sorted(
        (r["key"], (p,)) for r in rows for p in range(K)
    )
    seed = out[0]["lineage"]["interpolate"]["permutation_seed"]
    pools = [frozenset(b.tolist()) for p in range(K) for b in permuted_batches(9, 4, seed=seed, pass_index=p)]
    repeats = sum(len(pool) for i, pool in enumerate(pools) if pool in pools[:i])
    assert (stage.stats["pools"], stage.stats["singleton_pools"], stage.stats["generated"]) == (
        9,
        3,
        27,
    )  # 4+4+1
    assert stage.stats["repeated_pool_outputs"] == repeats
    ordered, expected = rederive(rows, seed, K, 4, "rownorm_cra")
    size = tuple(out[0]["lineage"]["interpolate"]["image_size"])
    assert size == ordered[0]["image"].size  # default: the shard's first image (key order)
    pixels = np.stack([np.asarray(fit_image(r["image"], size), dtype=np.float32) for r in ordered])
    m_star = fitted["cluster_summary"]["m_star"]
    clusters = by_key(rows)
    for o in out:
        info = o["lineage"]["interpolate"]
        keys, weights, idx, w_row = expected[(o["key"], o["variant"][0])]
        assert info["anchor"] == o["key"] and info["contributors"] == keys
        np.testing.assert_allclose(info["weights"], weights, rtol=1e-6)
        assert info["weight_sum"] == pytest.approx(1.0, abs=1e-5) and sum(info["weights"]) == pytest.approx(
            1.0
        )
        assert o["key"] in keys  # A_ii := 1: the anchor always contributes
        assert {clusters[k]["cluster"] for k in keys} == {clusters[o["key"]]["cluster"]}  # the DCA mask
        assert (info["m"], info["mode"], info["pool"], info["pass_index"]) == (
            m_star,
            "rownorm_cra",
            "batch",
            o["variant"][0],
        )
        want = np.clip(np.rint(generate(w_row[None, :], pixels[idx])[0]), 0, 255)
        got = np.asarray(o["generated_image"], dtype=np.float64)
        assert got.shape == (size[1], size[0], 3) and np.abs(got - want).max() <= 1
        soft = json.loads(o["soft_label"])
        assert sum(soft.values()) == pytest.approx(1.0, abs=1e-5)
        assert set(soft) == {str(clusters[k]["label"]) for k in keys}
        assert o["label"] == clusters[o["key"]]["label"]

    again = stage.process_batch(fresh(rows[::-1]))  # row order does not matter; the seed is the shard's
    assert [a["lineage"] for a in again] == [o["lineage"] for o in out]
    assert all(
        a["generated_image"].tobytes() == o["generated_image"].tobytes()
        for a, o in zip(again, out, strict=True)
    )


def test_interpolate_reference_modes_cluster_pools_and_text_students(fitted):
    rows = fitted["shards"][1]
    cma = make(Interpolate, weight_mode="reference_cma", image_size=32)
    out = cma.process_batch(fresh(rows))
    seed = out[0]["lineage"]["interpolate"]["permutation_seed"]
    _, expected = rederive(rows, seed, K, 128, "reference_cma", clusters=False)
    sums = []
    for o in out:
        info = o["lineage"]["interpolate"]
        keys, weights, _, _ = expected[(o["key"], o["variant"][0])]
        assert info["contributors"] == keys and len(keys) == 9 and info["m"] is None
        np.testing.assert_allclose(info["weights"], weights, rtol=1e-6)
        sums.append(info["weight_sum"])
        assert o["generated_image"].size == (32, 32)
    assert max(abs(s - 1) for s in sums) > 1e-3  # the reference's broadcast bug: rows do not sum to 1
    assert cma.stats["repeated_pool_outputs"] == 9 * (K - 1)  # 9 rows < 128: every pass is the same pool

    pooled = make(Interpolate, pool="cluster", pool_size=128)
    out = pooled.process_batch(fresh(rows))
    clusters = by_key(rows)
    for o in out:
        info = o["lineage"]["interpolate"]
        members = {clusters[k]["cluster"] for k in info["contributors"]}
        assert members == {clusters[o["key"]]["cluster"]}
        assert info["pool_members"] == sum(r["cluster"] == clusters[o["key"]]["cluster"] for r in rows)

    text = make(Interpolate, student="text", teacher="image")
    out = text.process_batch(fresh(rows))
    seed = out[0]["lineage"]["interpolate"]["permutation_seed"]
    ordered, expected = rederive(rows, seed, K, 128, "rownorm_cra")
    x = np.stack([r["text_embedding"] for r in ordered])
    for o in out:
        _, _, idx, w_row = expected[(o["key"], o["variant"][0])]
        assert o["generated_text_embedding"].dtype == np.float32
        np.testing.assert_allclose(o["generated_text_embedding"], w_row @ x[idx], rtol=1e-5, atol=1e-6)
        assert "generated_image" not in o

    with pytest.raises(ValueError, match="sentences cannot be interpolated"):
        Interpolate.settings_from({"student": "text", "teacher": "image", "student_field": "text"})
    with pytest.raises(ValueError, match="pool: cluster"):
        Interpolate.settings_from({"pool": "cluster", "weight_mode": "reference_cma"})
    broken = fresh(rows[:3])
    del broken[0]["student_latent"]
    out = make(Interpolate).process_batch(broken)
    assert [type(o).__name__ for o in out].count("Failure") == 1 and len(out) == 1 + 2 * K


# ------------------------------------------------------------------------------------------- mixup


def onehot_of(rows):
    classes = sorted({r["label"] for r in rows})
    return classes, np.array([[float(r["label"] == c) for c in classes] for r in rows])


def test_mixup_pairs_lambda_and_soft_labels_follow_mixup_batch(shards):
    rows = sorted(shards[0], key=lambda r: r["key"])
    stage = make(Mixup)
    out = stage.process_batch(fresh(rows))
    assert len(out) == K * 9 and all(not isinstance(o, Failure) for o in out)
    classes, onehot = onehot_of(rows)
    keys = [r["key"] for r in rows]
    for p in range(K):
        batch = [o for o in out if o["variant"] == (p,)]
        info = [o["lineage"]["mixup"] for o in batch]
        draw = mixup_batch(np.zeros((9, 1)), onehot, info[0]["seed"], alpha=0.25, per_sample=True)
        assert [i["partner"] for i in info] == [keys[j] for j in draw.partner]
        np.testing.assert_allclose([i["lam"] for i in info], draw.lam)
        for i, o in enumerate(batch):
            lam, partner = draw.lam[i], rows[draw.partner[i]]
            a = np.asarray(rows[i]["image"], dtype=np.float64)
            b = np.asarray(fit_image(partner["image"], rows[i]["image"].size), dtype=np.float64)
            got = np.asarray(o["generated_image"], dtype=np.float64)
            assert got.shape == a.shape and np.abs(got - (lam * a + (1 - lam) * b)).max() <= 0.5 + 1e-6
            soft = json.loads(o["soft_label"])
            want = {c: w for c, w in zip(classes, draw.y[i], strict=True) if w > 0}
            assert soft == pytest.approx(want) and sum(soft.values()) == pytest.approx(1.0)
    lams = [o["lineage"]["mixup"]["lam"] for o in out]
    assert all(0 <= v <= 1 for v in lams) and len(set(lams)) > 1

    emb = make(Mixup, field="text_embedding")
    out = emb.process_batch(fresh(rows))
    assert all(np.isfinite(o["generated_text_embedding"]).all() for o in out)
    assert out[0]["generated_text_embedding"].shape == (384,)


def test_geodesic_mixup_is_nan_free_unit_norm_and_flags_antipodal_pairs(shards, fitted):
    rows = sorted(shards[0], key=lambda r: r["key"])
    stage = make(GeodesicMixup)
    out = stage.process_batch(fresh(rows))
    x = np.stack([r["image_embedding"] for r in rows])
    index = {r["key"]: i for i, r in enumerate(rows)}
    assert len(out) == K * 9
    for o in out:
        info = o["lineage"]["geodesic_mixup"]
        v = o["generated_image_embedding"]
        assert np.isfinite(v).all() and np.linalg.norm(v) == pytest.approx(1.0, abs=1e-5)
        want = geodesic_mix(x[index[o["key"]]], x[index[info["partner"]]], info["lam"]).mixed
        np.testing.assert_allclose(v, want, atol=1e-6)
        assert info["antipodal"] is False and info["between"] == "samples"

    # Degenerate pairs: the same vector (reference: NaN), and exactly opposite vectors (no geodesic).
    e = np.eye(4, dtype=np.float32)[0]
    toy = [
        {"key": "a", "variant": (), "lineage": {}, "label": "x", "image_embedding": e},
        {"key": "b", "variant": (), "lineage": {}, "label": "x", "image_embedding": e.copy()},
        {"key": "c", "variant": (), "lineage": {}, "label": "y", "image_embedding": -e},
    ]
    out = make(GeodesicMixup).process_batch(fresh(toy))
    assert all(np.isfinite(o["generated_image_embedding"]).all() for o in out)
    flagged = [o for o in out if o["lineage"]["geodesic_mixup"]["antipodal"]]
    assert flagged and all({o["key"], o["lineage"]["geodesic_mixup"]["partner"]} & {"c"} for o in flagged)
    dropper = make(GeodesicMixup, on_antipodal="drop")
    kept = dropper.process_batch(fresh(toy))
    assert len(kept) == len(out) - len(flagged) and dropper.stats["antipodal_dropped"] == len(flagged)

    # m²-Mix between one pair's modalities: only in one space (the learned latents), refused across spaces.
    latent_rows = fitted["shards"][0]
    cross = make(
        GeodesicMixup, between="modalities", image_field="student_latent", text_field="teacher_latent"
    )
    out = cross.process_batch(fresh(latent_rows))
    assert len(out) == K * 9 and all(
        np.linalg.norm(o["generated_embedding"]) == pytest.approx(1.0, abs=1e-5) for o in out
    )
    refused = make(GeodesicMixup, between="modalities").process_batch(fresh(latent_rows))
    assert all(isinstance(o, Failure) and "one space" in o.message for o in refused)


# ------------------------------------------------------------------------ pre-computed embeddings


def test_embeddings_from_the_input_sidecar_are_used_as_given(demo_text, shards, corpus, tmp_path):
    """clip-retrieval-style input: a Parquet beside each tar with `key` and embedding list columns."""
    source = demo_text.parent / "images"
    for tar in sorted(source.glob("*.tar")):
        shutil.copy(tar, tmp_path / tar.name)
    dropped = shards[1][0]["key"]
    for i, rows in enumerate(shards):
        rows = [r for r in rows if r["key"] != dropped]  # one sample without a pre-computed embedding
        table = pa.table(
            {
                "key": [r["key"] for r in rows],
                "image_embedding": pa.array(
                    [r["image_embedding"].tolist() for r in rows], pa.list_(pa.float32(), 1280)
                ),
                "text_embedding": pa.array(
                    [r["text_embedding"].tolist() for r in rows], pa.list_(pa.float32(), 384)
                ),
            }
        )
        pq.write_table(table, tmp_path / f"shard-{i:05d}.parquet")

    recipe = load_recipe("cmda-precomputed")
    plan = build_plan(recipe)
    # nothing re-embeds
    assert [s.name for s in plan.stages] == ["latent_space", "cluster", "interpolate", "drop_duplicates"]
    units = discover_inputs(tmp_path, recipe.shard_size)
    assert all(u.sidecar is not None for u in units)
    results = [read_unit(u, recipe.input, recipe.limits) for u in units]
    assert [f.key for r in results for f in r.failures] == [dropped]  # input requires the embeddings
    read = [r.rows for r in results]
    given = by_key(corpus)
    for row in (r for rows in read for r in rows):
        for field in ("image_embedding", "text_embedding"):
            assert row[field].dtype == np.float32
            np.testing.assert_array_equal(row[field], given[row["key"]][field])

    everything = [r for rows in read for r in rows]
    latent = make(LatentSpace, epochs=3)
    latent.fit(columns(everything, "image_embedding", "text_embedding", "label"), tmp_path / "latent")
    cluster = make(Cluster, **CLUSTER_OPTIONS)
    assert cluster.fit(columns(everything, "text_embedding"), tmp_path / "cluster")["fit_rows"] == 17
    interpolate = make(Interpolate)
    for rows in read:
        latent.process_batch(rows)
        cluster.process_batch(rows)
        out = interpolate.process_batch(rows)
        assert len(out) == K * len(rows) and all(o["generated_image"].mode == "RGB" for o in out)
        assert all("embed" not in o["lineage"] for o in out)


# ------------------------------------------------------ pool helpers and interpolate on synthetic rows


def gradient(width: int, height: int) -> Image.Image:
    """An RGB image whose red channel encodes x (40 + 2x) and green channel y (40 + 2y)."""
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[..., 0] = 40 + 2 * np.arange(width)[None, :]
    pixels[..., 1] = 40 + 2 * np.arange(height)[:, None]
    pixels[..., 2] = 128
    return Image.fromarray(pixels)


@pytest.mark.parametrize("width,height", [(80, 40), (40, 80)])
def test_fit_image_scales_to_cover_keeping_the_aspect_then_crops_the_centre(width: int, height: int) -> None:
    """A wide and a tall image brought to 20×20: scaled by ½ (the short side fits), never stretched, and
    the middle kept. Output pixel i then shows source position 2(i + offset) + ½, offset = (W/2 − 20)/2."""
    out = np.asarray(fit_image(gradient(width, height), (20, 20)), dtype=np.float64)
    assert out.shape == (20, 20, 3)
    i = np.arange(20)
    left, top = (width // 2 - 20) // 2, (height // 2 - 20) // 2
    np.testing.assert_allclose(
        out[..., 0], np.broadcast_to(40 + 2 * (2 * (i + left) + 0.5), (20, 20)), atol=1
    )
    np.testing.assert_allclose(
        out[..., 1], np.broadcast_to(40 + 2 * (2 * (i[:, None] + top) + 0.5), (20, 20)), atol=1
    )


def test_fit_image_makes_every_mode_rgb_and_keeps_an_image_of_the_right_size() -> None:
    """Pools stack pixels as H×W×3, so greyscale, palette and alpha images must come out RGB."""
    for mode in ("L", "P", "RGBA"):
        image = gradient(12, 10).convert(mode)
        for size in ((12, 10), (6, 6)):
            fitted = fit_image(image, size)
            assert fitted.mode == "RGB" and fitted.size == size
            assert np.asarray(fitted).shape == (size[1], size[0], 3)
    same = gradient(12, 10)
    assert np.array_equal(np.asarray(fit_image(same, (12, 10))), np.asarray(same))


def test_to_image_rounds_and_saturates_instead_of_wrapping() -> None:
    """Reference-mode weights do not sum to 1, so a mixed pixel can pass 255: it must saturate at 255,
    not wrap to a dark value in uint8."""
    image = to_image(np.array([[[-3.0, 127.4, 255.6], [300.0, 0.5, 1.5]]]))
    assert image.mode == "RGB" and image.size == (2, 1)
    assert np.asarray(image).tolist() == [[[0, 127, 255], [255, 0, 2]]]


def test_rows_are_named_ordered_and_seeded_by_key_and_variant() -> None:
    """Lineage names a fanned-out row ``key:variant``; pools see rows in (key, variant) order whatever
    order they arrive in; the shard seed depends on the run seed, the stage and the rows' identities."""
    assert row_ident({"key": "a", "variant": ()}) == "a" and row_ident({"key": "a"}) == "a"
    assert row_ident({"key": "a", "variant": (1, 2)}) == "a:1-2"
    rows = [
        {"key": "b"},
        {"key": "a", "variant": (1,)},
        {"key": "a", "variant": (0, 2)},
        {"key": "a", "variant": ()},
    ]
    assert [row_ident(r) for r in sorted_rows(rows)] == ["a", "a:0-2", "a:1", "b"]
    assert [row_ident(r) for r in sorted_rows(rows[::-1])] == ["a", "a:0-2", "a:1", "b"]

    seed = shard_seed(0, rows, "interpolate")
    assert shard_seed(0, rows[::-1], "interpolate") == seed  # order-free
    assert shard_seed(1, rows, "interpolate") != seed
    assert shard_seed(0, rows, "mixup") != seed
    assert shard_seed(0, rows[:3], "interpolate") != seed
    other_variant = [*rows[:3], {"key": "a", "variant": (2,)}]
    assert shard_seed(0, other_variant, "interpolate") != seed


def test_shard_seeds_are_pinned_across_versions_and_keys_do_not_run_together() -> None:
    """``permutation_seed`` is in every output's lineage and decides which pools a rerun draws: a release
    that changed it would make a resumed or repaired shard differ from the rest of the corpus. Identities
    are joined with a separator, so shards {ab, c} and {a, bc} do not share a seed."""
    assert shard_seed(0, [{"key": "a"}, {"key": "b", "variant": (1,)}], "interpolate") == 4026766219298867437
    assert shard_seed(0, [{"key": "ab"}, {"key": "c"}], "interpolate") == 2053104278780811597
    assert shard_seed(0, [{"key": "a"}, {"key": "bc"}], "interpolate") == 1486840390271901512


def test_soft_label_json_names_the_non_zero_classes_with_sorted_keys() -> None:
    assert soft_label_json(np.array([0.25, 0.0, 0.75]), ["cat", "cow", "dog"]) == '{"cat": 0.25, "dog": 0.75}'
    assert soft_label_json(np.zeros(3), ["cat", "cow", "dog"]) is None
    classes, idx = class_index([{"label": "dog"}, {"label": None}, {"label": "cat"}, {"label": 3}, {}])
    assert classes == ["3", "cat", "dog"]
    assert idx.dtype == np.int64 and idx.tolist() == [2, -1, 1, 0, -1]  # -1: unlabelled


def synthetic(key: str, variant: tuple[int, ...] | None, rng: np.random.Generator, **fields: object) -> dict:
    """A row as interpolate finds it: 4-d student and teacher latents in the common space."""
    row = {
        "key": key,
        "student_latent": rng.normal(size=4).astype(np.float32),
        "teacher_latent": rng.normal(size=4).astype(np.float32),
        **fields,
    }
    if variant is not None:
        row["variant"] = variant
    return row


def image_shard() -> tuple[list[dict], list[dict]]:
    """Fanned-out rows of mixed image sizes and modes (the first in key order, a:0, is 12×10): cat and
    dog in cluster 0 beside one unlabelled row, an unlabelled cluster 1; then one bad row per cause."""
    rng = np.random.default_rng(5)
    m2 = {"cluster": {"m": 2}}
    spec = [
        ("a", (0,), "cat", 0, gradient(12, 10)),
        ("a", (1,), "dog", 0, gradient(16, 16)),
        ("b", (0,), "cat", 0, gradient(8, 20).convert("L")),
        ("b", (1,), "dog", 0, gradient(20, 8).convert("P")),
        ("c", (0,), None, 0, gradient(12, 10)),
        ("d", (0,), None, 1, gradient(10, 12)),
        ("e", (0,), None, 1, gradient(12, 10).convert("RGBA")),
    ]
    good = [
        synthetic(k, v, rng, label=lab, cluster=c, image=im, lineage=json.loads(json.dumps(m2)))
        for k, v, lab, c, im in spec
    ]
    bad = [
        synthetic("f", (0,), rng, cluster=0, image=gradient(12, 10), lineage={}),
        synthetic("g", (0,), rng, cluster=0, image=gradient(12, 10), lineage={}),
        synthetic("h", (0,), rng, cluster=0, image=gradient(12, 10), lineage={}),
        synthetic("i", (0,), rng, cluster=0, image=b"not decoded", lineage={}),
        synthetic("j", (0,), rng, cluster="1", image=gradient(12, 10), lineage={}),
    ]
    del bad[0]["student_latent"]
    bad[1]["teacher_latent"] = np.ones(5, np.float32)
    bad[2]["teacher_latent"] = np.zeros(4, np.float32)
    return good, bad


def test_interpolate_names_fanned_out_rows_writes_renormalised_soft_labels_and_says_why_rows_fail() -> None:
    good, bad = image_shard()
    stage = make(Interpolate, soft_label=True)
    assert stage.outputs() == {"generated_image", "soft_label"}
    arrived = [*bad[::-1], *good[::-1]]  # reversed: a:1 before a:0, as a fan-out may hand them on
    out = stage.process_batch(arrived)
    failures = [o for o in out if isinstance(o, Failure)]
    assert [(f.key, f.cause) for f in failures] == [
        ("f", "missing_field"),
        ("g", "missing_field"),
        ("h", "zero_teacher_latent"),
        ("i", "missing_field"),
        ("j", "missing_field"),
    ]
    rows = {row_ident(r): r for r in good}
    children = out[: len(out) - len(failures)]
    assert len(children) == K * len(good)
    seed = shard_seed(CTX.run_seed, good, "interpolate")  # the pool's rows only: failed rows do not count
    for child in children:
        info = child["lineage"]["interpolate"]
        source = rows[info["anchor"]]
        assert info["anchor"] == f"{child['key']}:{child['variant'][0]}"  # the fanned-out row, by name
        assert child["variant"] == (*source["variant"], info["pass_index"])
        assert {
            k: info[k] for k in ("mode", "pool", "pool_size", "permutation_seed", "student", "teacher")
        } == {
            "mode": "rownorm_cra",
            "pool": "batch",
            "pool_size": 128,
            "permutation_seed": seed,
            "student": "image",
            "teacher": "text",
        }
        assert (
            info["latents"] == ["student_latent", "teacher_latent"] and info["label_policy"] == "anchor+soft"
        )
        assert (info["cluster"], info["m"], info["pool_index"], info["pool_members"]) == (
            source["cluster"],
            2,
            0,
            7,
        )
        assert info["image_size"] == [12, 10] and child["generated_image"].size == (12, 10)
        assert child["generated_image"].mode == "RGB"
        want = sum(
            w * np.asarray(fit_image(rows[name]["image"], (12, 10)), np.float64)
            for name, w in zip(info["contributors"], info["weights"], strict=True)
        )
        got = np.asarray(child["generated_image"], np.float64)
        assert np.abs(got - np.clip(np.rint(want), 0, 255)).max() <= 1
        labelled: dict[str, float] = {}
        for name, w in zip(info["contributors"], info["weights"], strict=True):
            if rows[name]["label"] is not None:
                labelled[rows[name]["label"]] = labelled.get(rows[name]["label"], 0.0) + w
        if source["cluster"] == 1:  # no labelled contributor (the DCA mask keeps cluster 1 to itself)
            assert not labelled and child["soft_label"] is None
        else:  # renormalised over the labelled contributors; the unlabelled c:0 contributes no class
            assert "c:0" in info["contributors"]
            total = sum(labelled.values())
            assert json.loads(child["soft_label"]) == pytest.approx(
                {c: w / total for c, w in labelled.items()}
            )
    assert stage.stats["generated"] == K * len(good)
    stage.process_batch(arrived)
    assert stage.stats["generated"] == 2 * K * len(good)  # an actor's counts add up over its shards


def test_a_teacher_latent_counts_as_zero_up_to_and_including_eps() -> None:
    """|cos| with a teacher latent of norm ε is 0 by the ε guard, so such a row has no cross-modal weights
    and fails; any longer vector, however short, has a direction and joins the pool."""
    rng = np.random.default_rng(3)
    rows = [synthetic(k, None, rng, cluster=0, image=gradient(12, 10), lineage={}) for k in "abc"]
    rows[0]["teacher_latent"] = np.array([EPS, 0, 0, 0], np.float32)
    rows[1]["teacher_latent"] = np.array([2 * EPS, 0, 0, 0], np.float32)
    out = make(Interpolate).process_batch(rows)
    failed = {o.key: o.cause for o in out if isinstance(o, Failure)}
    assert failed == {"a": "zero_teacher_latent"}
    assert sorted({r["key"] for r in out if not isinstance(r, Failure)}) == ["b", "c"]


def test_interpolate_text_students_pools_clusters_given_as_input_and_unlabelled_shards() -> None:
    """Text students mixed as embeddings in pools of 2, with cluster ids read from the input (no cluster
    lineage, so M is unknown), some rows without the optional ``variant`` and ``lineage`` fields."""
    rng = np.random.default_rng(11)
    good = [
        synthetic(f"k{i}", () if i % 2 else None, rng, cluster=c, text_embedding=rng.normal(size=6))
        for i, c in enumerate([0, 0, 1, 1, 0])
    ]
    for row in good[1::2]:
        row["lineage"] = {}
    bad = [
        synthetic("x1", (), rng, cluster=0, lineage={}),
        synthetic("x2", (), rng, cluster=0, lineage={}, text_embedding=np.ones(7)),
    ]
    stage = make(Interpolate, student="text", teacher="image", pool_size=2)
    assert stage.outputs() == {"generated_text_embedding"}
    out = stage.process_batch([*bad, *good])
    assert [(f.key, f.cause) for f in out if isinstance(f, Failure)] == [
        ("x1", "missing_field"),
        ("x2", "missing_field"),
    ]
    children = [o for o in out if not isinstance(o, Failure)]
    assert len(children) == K * len(good)
    seed = shard_seed(CTX.run_seed, good, "interpolate")
    rows = {r["key"]: r for r in good}
    keys = sorted(rows)
    for child in children:
        info = child["lineage"]["interpolate"]
        assert info["anchor"] == child["key"] and info["permutation_seed"] == seed
        assert (info["cluster"], info["m"], info["label_policy"]) == (
            rows[child["key"]]["cluster"],
            None,
            "anchor",
        )
        assert "image_size" not in info and "soft_label" not in child
        pool = list(permuted_batches(len(keys), 2, seed=seed, pass_index=info["pass_index"]))[
            info["pool_index"]
        ]
        members = {keys[i] for i in pool}
        assert child["key"] in members and set(info["contributors"]) <= members
        assert info["pool_members"] == len(pool)
        want = sum(
            w * rows[k]["text_embedding"] for k, w in zip(info["contributors"], info["weights"], strict=True)
        )
        np.testing.assert_allclose(child["generated_text_embedding"], want, rtol=1e-5, atol=1e-6)
        assert child["generated_text_embedding"].dtype == np.float32  # as written: half of float64

    reseeded = Interpolate(
        Interpolate.settings_from({"student": "text", "teacher": "image"}),
        StageContext(run_seed=1, recipe="cmda", multiple=K, tag="cmda"),
    )
    again = reseeded.process_batch(good)
    assert (
        {o["lineage"]["interpolate"]["permutation_seed"] for o in again}
        == {shard_seed(1, good, "interpolate")}
        != {seed}
    )

    soft = make(Interpolate, student="text", teacher="image", soft_label=True).process_batch(good)
    assert all(o["soft_label"] is None for o in soft)  # nobody labelled: the field is there, and empty
