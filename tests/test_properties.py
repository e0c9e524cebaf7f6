"""Properties a user relies on, stated once and checked on generated inputs (hypothesis).

- select: a source's k outputs are distinct candidates of its kept pool, numbered 0..k-1, and over many
  sources every kept candidate is drawn equally often (uniform sampling, METHODS §1);
- CMDA weights: non-negative, each row sums to 1 in ``rownorm_cra``, zero outside the anchor's cluster;
- soft labels (mixup, CMDA) are distributions: non-negative, summing to 1;
- the reader accounts for every sample: each one is a row or a failure, never both, never neither.
"""

from __future__ import annotations

import io
import tarfile
from collections import Counter

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from augpipe.methods.cmda import WEIGHT_MODES, cmda_weights, soft_labels
from augpipe.methods.mixup import mix_pair, mixup_batch
from augpipe.methods.text_distance import normalize_text
from augpipe.pipeline.config import Limits
from augpipe.pipeline.fitting import merge_parts
from augpipe.pipeline.inputs import discover_inputs
from augpipe.pipeline.reader import read_unit
from augpipe.pipeline.stage import StageContext
from augpipe.stages.select import Select

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def select(k: int, dedupe: str | None = "transcript", seed: int = 0) -> Select:
    context = StageContext(run_seed=seed, recipe="test", multiple=k, tag="bs")
    return Select(Select.settings_from({"dedupe_field": dedupe}), context)


def pool(key: str, transcripts: list[str]) -> list[dict]:
    return [{"key": key, "variant": (i,), "lineage": {}, "transcript": t} for i, t in enumerate(transcripts)]


# ------------------------------------------------------------------------------------------- select

words = st.sampled_from(["a cat", "A cat.", "the dog", "a bird", "two fish", "red", "blue", "green"])


@SETTINGS
@given(
    pools=st.dictionaries(
        st.sampled_from(["k0", "k1", "k2", "k3"]), st.lists(words, min_size=1, max_size=9), min_size=1
    ),
    k=st.integers(1, 6),
    seed=st.integers(0, 2**31),
)
def test_select_draws_distinct_candidates_of_the_kept_pool(pools, k, seed):
    rows = [row for key, texts in pools.items() for row in pool(key, texts)]
    stage = select(k, seed=seed)
    out = stage.process_batch([dict(r) for r in rows])
    short = 0
    for key, texts in pools.items():
        mine = [o for o in out if o["key"] == key]
        distinct = {normalize_text(t) for t in texts}
        take = min(k, len(distinct))
        short += take < k
        assert len(mine) == take
        assert [o["output_key"] for o in mine] == [f"{key}-bs-{n}" for n in range(take)]
        chosen = [normalize_text(o["transcript"]) for o in mine]
        assert len(set(chosen)) == len(chosen)  # no paraphrase twice
        assert set(chosen) <= distinct  # and each from the pool
        variants = [o["variant"] for o in mine]
        assert len(set(variants)) == len(variants)
        info = mine[0]["lineage"]["select"]
        assert info["pool_size"] == len(texts) and info["distinct"] == len(distinct)
        assert info["chosen"] == take and info["k"] == k
    assert stage.stats["short_pools"] == short
    assert stage.stats["duplicates_removed"] == sum(
        len(t) - len({normalize_text(x) for x in t}) for t in pools.values()
    )


def test_select_keeps_the_first_of_equal_candidates_and_no_dedupe_keeps_all():
    rows = pool("k", ["A cat.", "a cat", "the dog"])
    out = select(5).process_batch([dict(r) for r in rows])
    assert sorted(o["variant"] for o in out) == [(0,), (2,)]  # "a cat" repeats candidate 0
    everything = select(5, dedupe=None).process_batch([dict(r) for r in rows])
    assert sorted(o["variant"] for o in everything) == [(0,), (1,), (2,)]


def test_select_is_uniform_over_the_kept_pool():
    """2,000 sources, 5 distinct candidates each, k=2: each candidate is drawn 800 times in expectation.

    Seeds are derived from the keys, so the counts are fixed; the band is ±8 %, about 3.5 sigma."""
    rows = [row for s in range(2000) for row in pool(f"s{s}", ["p0", "p1", "p2", "p3", "p4"])]
    out = select(2).process_batch(rows)
    counts = Counter(o["transcript"] for o in out)
    assert sum(counts.values()) == 4000
    assert all(736 <= counts[f"p{i}"] <= 864 for i in range(5)), counts
    pairs = Counter(tuple(o["transcript"] for o in out if o["key"] == f"s{s}") for s in range(200))
    assert len(pairs) == 10  # every one of the C(5, 2) pairs occurs: no pair is favoured away


def test_select_is_deterministic_and_depends_on_the_run_seed():
    rows = pool("k", [f"candidate {i}" for i in range(20)])
    first = [o["variant"] for o in select(3).process_batch([dict(r) for r in rows])]
    again = [o["variant"] for o in select(3).process_batch([dict(r) for r in rows])]
    other = [o["variant"] for o in select(3, seed=1).process_batch([dict(r) for r in rows])]
    assert first == again and first != other


# --------------------------------------------------------------------------------------- CMDA weights


@st.composite
def batches(draw):
    b = draw(st.integers(1, 9))
    d = draw(st.integers(1, 5))
    floats = st.floats(-10, 10, allow_nan=False, width=64)
    teacher = draw(arrays(np.float64, (b, d), elements=floats))
    student = draw(arrays(np.float64, (b, d), elements=floats))
    labels = draw(st.none() | arrays(np.int64, (b,), elements=st.integers(0, 2)))
    return teacher, student, labels


@SETTINGS
@given(batch=batches(), mode=st.sampled_from(WEIGHT_MODES))
def test_cmda_weights_are_non_negative_and_zero_outside_the_cluster(batch, mode):
    teacher, student, labels = batch
    if mode == "reference_cma":
        labels = None
    w = cmda_weights(teacher, student, labels, mode=mode)
    assert w.shape == (len(teacher), len(teacher))
    assert np.all(np.isfinite(w)) and np.all(w >= 0)
    if labels is not None:
        outside = labels[:, None] != labels[None, :]
        assert np.all(w[outside] == 0)
    if mode == "rownorm_cra":
        np.testing.assert_allclose(w.sum(axis=1), 1.0, rtol=1e-9)
        assert np.all(np.diag(w) > 0)  # A_ii := 1: an anchor always keeps some of itself


@SETTINGS
@given(batch=batches(), mode=st.sampled_from(WEIGHT_MODES), n_classes=st.integers(1, 4))
def test_cmda_soft_labels_are_distributions_over_the_cluster_labels(batch, mode, n_classes):
    teacher, student, labels = batch
    if mode == "reference_cma":
        labels = None
    w = cmda_weights(teacher, student, labels, mode=mode)
    classes = np.arange(len(teacher)) % n_classes
    y = soft_labels(w, classes, n_classes)
    assert y.shape == (len(teacher), n_classes) and np.all(y >= 0)
    has_mass = w.sum(axis=1) > 1e-9  # a row of no weight (all ≤ ε) stays all zero instead of NaN
    np.testing.assert_allclose(y[has_mass].sum(axis=1), 1.0, rtol=1e-9)
    reachable = (w > 0) @ np.eye(n_classes)[classes] > 0
    assert np.all(y[~reachable] == 0)  # mass only on classes of samples the anchor mixes


# --------------------------------------------------------------------------------------------- mixup


@SETTINGS
@given(
    n=st.integers(1, 12),
    c=st.integers(2, 5),
    seed=st.integers(0, 2**31),
    alpha=st.floats(0.05, 4.0),
    per_sample=st.booleans(),
    soft=st.booleans(),
)
def test_mixup_soft_labels_sum_to_one(n, c, seed, alpha, per_sample, soft):
    rng = np.random.default_rng(seed)
    y = rng.dirichlet(np.ones(c), size=n) if soft else np.eye(c)[rng.integers(0, c, n)]
    x = rng.normal(size=(n, 3))
    mixed = mixup_batch(x, y, seed, alpha=alpha, per_sample=per_sample)
    assert np.all(mixed.y >= 0)
    np.testing.assert_allclose(mixed.y.sum(axis=1), 1.0, rtol=1e-12)
    assert np.all((mixed.lam >= 0) & (mixed.lam <= 1))
    assert sorted(mixed.partner) == list(range(n))  # a permutation: every sample is someone's partner
    lam = mixed.lam[:, None]
    np.testing.assert_allclose(mixed.x, lam * x + (1 - lam) * x[mixed.partner])
    np.testing.assert_allclose(mixed.y, lam * y + (1 - lam) * y[mixed.partner])


def test_mix_pair_weights_the_second_label_by_one_minus_lambda():
    x, y = mix_pair(np.array([[2.0]]), np.array([[4.0]]), np.array([[1.0, 0]]), np.array([[0, 1.0]]), 0.25)
    np.testing.assert_allclose(x, [[3.5]])
    np.testing.assert_allclose(y, [[0.25, 0.75]])


# ------------------------------------------------------------------------------ reader accounting

KINDS = ["good", "empty", "latin1", "pickle", "symlink", "unknown", "unsafe"]


def _member(tar: tarfile.TarFile, name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE) -> None:
    info = tarfile.TarInfo(name)
    info.type = kind
    if kind == tarfile.REGTYPE:
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    else:
        info.linkname = "elsewhere.txt"
        tar.addfile(info)


def _write(tar: tarfile.TarFile, key: str, kind: str) -> None:
    if kind == "good":
        _member(tar, f"{key}.txt", f"Sample {key} reads fine.".encode())
    elif kind == "empty":
        _member(tar, f"{key}.txt", b"  ")
    elif kind == "latin1":
        _member(tar, f"{key}.txt", "caf\u00e9".encode("latin-1"))
    elif kind == "pickle":
        _member(tar, f"{key}.pkl", b"\x80\x04N.")
    elif kind == "symlink":
        _member(tar, f"{key}.txt", kind=tarfile.SYMTYPE)
    elif kind == "unknown":
        _member(tar, f"{key}.xyz", b"?")
    else:
        _member(tar, f"../{key}.txt", b"escape")


@SETTINGS
@given(steps=st.lists(st.tuples(st.integers(1, 6), st.sampled_from(KINDS)), min_size=1, max_size=14))
def test_every_sample_is_a_row_or_a_failure_never_both_never_neither(steps, tmp_path_factory):
    # Neighbours never share a key (WebDataset would merge them into one sample); others may repeat.
    numbers = np.cumsum([step for step, _ in steps]) % 7
    samples = [(int(n), kind) for n, (_, kind) in zip(numbers, steps, strict=True)]
    folder = tmp_path_factory.mktemp("acct")
    with tarfile.open(folder / "shard-00000.tar", "w") as tar:
        for number, kind in samples:
            _write(tar, f"s{number}", kind)
    (unit,) = discover_inputs(folder, shard_size=100)
    result = read_unit(unit, ["text"], Limits())
    rows = [r["key"] for r in result.rows]
    failed = [f.key for f in result.failures]
    assert result.counts["samples_in"] == len(samples) == len(rows) + len(failed)
    assert len(set(rows)) == len(rows)  # a key is written once
    keys = [("../" if kind == "unsafe" else "") + f"s{n}" for n, kind in samples]
    first = {}
    for key, (_, kind) in zip(keys, samples, strict=True):
        first.setdefault(key, kind)
    for key, kind in first.items():
        if kind == "good":
            assert key in rows
        else:
            assert key not in rows and key in failed
    for key in set(keys):
        assert failed.count(key) == keys.count(key) - (key in rows)


@pytest.mark.parametrize("kind", KINDS[1:])
def test_each_bad_kind_names_its_cause(kind, tmp_path):
    with tarfile.open(tmp_path / "shard-00000.tar", "w") as tar:
        _write(tar, "s0", kind)
    (unit,) = discover_inputs(tmp_path, shard_size=100)
    (failure,) = read_unit(unit, ["text"], Limits()).failures
    expected = {
        "empty": "empty_text",
        "latin1": "text_not_utf8",
        "pickle": "refused_pickle",
        "symlink": "non_regular_member",
        "unknown": "unknown_member_type",
        "unsafe": "unsafe_key",
    }
    assert failure.cause == expected[kind]


def test_select_declares_its_dedupe_field_and_fingerprints_k_and_tag():
    assert select(2).inputs() == frozenset({"transcript"})
    assert select(2, dedupe=None).inputs() == frozenset()
    other_tag = Select(Select.settings_from({}), StageContext(recipe="test", multiple=2, tag="xx"))
    prints = {select(2).fingerprint(), select(3).fingerprint(), other_tag.fingerprint()}
    assert len(prints) == 3 and select(2).fingerprint() == select(2).fingerprint()


def test_select_fingerprint_follows_its_settings():
    assert select(2).fingerprint() != select(2, dedupe=None).fingerprint()
    assert len(select(2).fingerprint()) == 16  # the width of every stage fingerprint (cache folder names)


def test_select_records_its_seed_and_candidate_and_dedupes_non_text_values():
    from augpipe.pipeline.rows import derive_seed

    out = select(2, seed=7).process_batch(pool("k", ["a", "b", "c"]))
    for row in out:
        info = row["lineage"]["select"]
        assert info["sampling_seed"] == derive_seed(7, "k", "select")
        assert info["candidate"] == f"v{row['variant'][0]}"
    numbers = [{"key": "k", "variant": (i,), "lineage": {}, "label": v} for i, v in enumerate([3, 3, 4])]
    picked = select(5, dedupe="label").process_batch(numbers)
    assert sorted(r["label"] for r in picked) == [3, 4]


# ------------------------------------------------------------------------------------ fit samples


@st.composite
def sample_parts(draw) -> list[dict[str, list]]:
    """Per-shard parts of a fit sample: keys, 63-bit ranks (ties allowed) and one fit field."""
    parts = []
    for shard in range(draw(st.integers(0, 8))):
        ranks = draw(st.lists(st.integers(0, 2**63 - 1) | st.sampled_from([0, 7, 2**62]), max_size=6))
        keys = [f"s{shard}k{i}" for i in range(len(ranks))]
        parts.append({"key": keys, "_rank": ranks, "x": [f"{k}-x" for k in keys]})
    return parts


@SETTINGS
@given(parts=sample_parts(), chunk=st.integers(1, 4), cap=st.none() | st.integers(0, 12))
def test_merging_fit_parts_chunk_by_chunk_gives_the_sample_merging_them_at_once_gives(parts, chunk, cap):
    chunks = [merge_parts(parts[i : i + chunk], cap) for i in range(0, len(parts), chunk)]
    at_once = merge_parts(parts, cap)
    assert merge_parts(chunks, cap) == at_once
    assert at_once["_rank"] == sorted(at_once["_rank"])
    assert len(at_once["key"]) == min(sum(len(p["key"]) for p in parts), cap if cap is not None else 10**9)
