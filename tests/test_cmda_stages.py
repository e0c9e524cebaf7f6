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
from sklearn.decomposition import PCA

from augpipe.methods.cmda import cluster_batches, cmda_weights, generate, permuted_batches, select_gmm_bic
from augpipe.methods.latent import supcon_loss
from augpipe.methods.mixup import geodesic_mix, mixup_batch
from augpipe.pipeline.config import load_recipe
from augpipe.pipeline.inputs import discover_inputs
from augpipe.pipeline.plan import build_plan
from augpipe.pipeline.reader import read_unit
from augpipe.pipeline.rows import Failure
from augpipe.pipeline.stage import StageContext
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
