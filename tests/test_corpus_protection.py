"""A nightly rerun must never clobber a corpus: the output folder's owner is checked before any work, the
refusal names what differs, ``--overwrite`` clears only the old shards, and every shard of a corpus is
judged on its own when a run decides what to skip."""

from __future__ import annotations

import hashlib
import json
import tarfile
from pathlib import Path

import pytest

from augpipe.pipeline import corpus, layout
from augpipe.pipeline.config import load_recipe
from augpipe.pipeline.index import IndexSummary
from augpipe.pipeline.inputs import discover_inputs
from augpipe.pipeline.storage import Store
from augpipe.pipeline.writer import write_stats

SHA = "ab" * 32


def previous_of(recipe_name: str, fingerprint: str, sets: tuple[str, ...] = ()) -> dict:
    recipe = load_recipe(recipe_name, sets=list(sets))
    return {"recipe": recipe.name, "fingerprint": fingerprint, "config": recipe.model_dump(mode="json")}


def test_the_same_recipe_and_fingerprint_resumes_without_clearing(tmp_path):
    store = Store(tmp_path)
    recipe = load_recipe("back-speech")
    assert corpus.check_protection(store, recipe, "fp", False, previous_of("back-speech", "fp")) is False
    assert corpus.check_protection(store, recipe, "fp", True, previous_of("back-speech", "fp")) is False


def test_a_corpus_of_another_recipe_is_refused_by_name_and_overwrite_clears_it(tmp_path):
    store = Store(tmp_path)
    recipe = load_recipe("back-speech")
    with pytest.raises(corpus.CorpusConflict) as refused:
        corpus.check_protection(store, recipe, "fp", False, previous_of("mixup", "other"))
    assert str(refused.value) == (
        f"{store.display()} already holds a corpus and it holds a 'mixup' corpus; this run is 'back-speech'. "
        "Pass --overwrite to rebuild it (stage outputs cached with --keep-cache are reused), or choose "
        "another --output"
    )
    assert corpus.check_protection(store, recipe, "fp", True, previous_of("mixup", "other")) is True


def test_a_changed_configuration_is_refused_naming_each_difference(tmp_path):
    store = Store(tmp_path)
    recipe = load_recipe("back-speech", sets=["seed=7", "multiple=5"])
    with pytest.raises(corpus.CorpusConflict, match="its configuration differs: ") as refused:
        corpus.check_protection(store, recipe, "new", False, previous_of("back-speech", "old"))
    detail = str(refused.value).split("its configuration differs: ")[1].split(". Pass --overwrite")[0]
    assert detail.split("; ") == corpus.config_differences(
        previous_of("back-speech", "old")["config"], recipe.model_dump(mode="json")
    )
    assert "multiple: 3 -> 5" in detail.split("; ") and any(
        d.startswith("seed: ") for d in detail.split("; ")
    )


def test_a_refusal_names_at_most_eight_differences(tmp_path):
    old = previous_of("back-speech", "old")
    names = ("max_text_bytes", "max_member_bytes", "max_image_pixels", "max_audio_seconds")
    sets = [f"limits.{name}=1" for name in names]
    recipe = load_recipe(
        "back-speech",
        sets=[
            *sets,
            "seed=9",
            "multiple=6",
            "tag=zz",
            "shard_size=7",
            "filter_paraphrase.max_edit_ratio=0.3",
        ],
    )
    changes = corpus.config_differences(old["config"], recipe.model_dump(mode="json"))
    assert len(changes) > 8, changes
    with pytest.raises(corpus.CorpusConflict) as refused:
        corpus.check_protection(Store(tmp_path), recipe, "new", False, old)
    assert "; ".join(changes[:8]) + ". Pass" in str(refused.value)
    assert changes[8] not in str(refused.value)


def test_a_fingerprint_change_without_a_config_change_blames_upstream_inputs(tmp_path):
    recipe = load_recipe("back-speech")
    with pytest.raises(
        corpus.CorpusConflict, match="its configuration differs: upstream inputs or limits\\."
    ):
        corpus.check_protection(Store(tmp_path), recipe, "new", False, previous_of("back-speech", "old"))


def test_config_differences_ignore_execution_only_options_and_show_unset_keys():
    old = {
        "name": "r",
        "stages": [{"name": "tts", "stage": "synthesize_speech", "options": {"concurrency": 1}}],
    }
    new = {
        "name": "r",
        "description": "another text",
        "stages": [
            {"name": "tts", "stage": "synthesize_speech", "options": {"concurrency": 4, "voice": "b"}}
        ],
    }
    assert corpus.config_differences(old, new) == ['stages.tts.voice: (unset) -> "b"']
    assert corpus.config_differences(new, old) == ['stages.tts.voice: "b" -> (unset)']
    renamed = {**old, "stages": [{**old["stages"][0], "stage": "transcribe"}]}
    assert corpus.config_differences(old, renamed) == ['stages.tts: "synthesize_speech" -> "transcribe"']
    nulled = {**old, "seed": None}
    assert corpus.config_differences(old, nulled) == ["seed: (unset) -> null"], "null is a value, not unset"


def test_shards_of_another_configuration_without_a_manifest_are_refused_and_cleared_on_overwrite(tmp_path):
    store = Store(tmp_path)
    recipe = load_recipe("back-speech")
    assert corpus.check_protection(store, recipe, "fp", False, None) is False, "an empty folder is free"
    write_stats(store, "shard-00000", {"shard": "shard-00000", "fingerprint": "fp"})
    assert corpus.check_protection(store, recipe, "fp", False, None) is False, "a resumable run of ours"
    write_stats(store, "shard-00001", {"shard": "shard-00001", "fingerprint": "old"})
    with pytest.raises(corpus.CorpusConflict) as refused:
        corpus.check_protection(store, recipe, "fp", False, None)
    assert str(refused.value) == (
        f"{store.display()} holds 1 shards written with another configuration (a run that did not finish?); "
        "pass --overwrite to rebuild, or choose another --output"
    )
    assert corpus.check_protection(store, recipe, "fp", True, None) is True


def test_stats_records_skip_unreadable_records_and_other_files(tmp_path):
    store = Store(tmp_path)
    write_stats(store, "shard-00000", {"shard": "shard-00000"})
    store.write_bytes(layout.stats_file("shard-00001"), b"{cut off")
    write_stats(store, "shard-00002", {"shard": "shard-00002"})
    store.write_bytes(f"{layout.STATS_DIR}/notes.txt", b"{}")
    assert corpus.stats_records(store) == [{"shard": "shard-00000"}, {"shard": "shard-00002"}], (
        "an unreadable record hides neither the records before it nor those after it"
    )


def test_clear_corpus_removes_every_shard_file_and_the_manifest_but_keeps_caches(tmp_path):
    store = Store(tmp_path)
    for shard in ("shard-00000", "shard-00001"):
        store.write_bytes(f"{shard}.tar", b"t")
        store.write_bytes(layout.quarantine_file(shard), b"q")
        write_stats(
            store,
            shard,
            {
                "shard": shard,
                "outputs": [{"path": f"{shard}.tar"}],
                "quarantine": layout.quarantine_file(shard),
            },
        )
    store.write_bytes(layout.MANIFEST, b"{}")
    store.write_bytes(f"{layout.CACHE_DIR}/embed-1/shard-00000.parquet", b"c")
    assert corpus.clear_corpus(store) == 2
    left = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file())
    assert left == [f"{layout.CACHE_DIR}/embed-1/shard-00000.parquet"]


# ------------------------------------------------------------------------------------------- resume


def two_committed_shards(tmp_path: Path) -> tuple[Store, list, dict[str, IndexSummary]]:
    """Two input shards, each with a committed, intact output shard of fingerprint ``fp``."""
    (tmp_path / "in").mkdir()
    for name in ("shard-00000", "shard-00001"):
        with tarfile.open(tmp_path / "in" / f"{name}.tar", "w"):
            pass
    units = discover_inputs(tmp_path / "in", shard_size=10)
    store = Store(str(tmp_path / "out"))
    for unit in units:
        data = unit.shard_id.encode() * 10
        store.write_bytes(f"{unit.shard_id}.tar", data)
        found = store.stat(f"{unit.shard_id}.tar")
        output = {"path": f"{unit.shard_id}.tar", "bytes": len(data), "mtime_ns": found.mtime_ns}
        stats = {
            "shard": unit.shard_id,
            "fingerprint": "fp",
            "input_identity": {"sha256": SHA},
            "outputs": [output | {"sha256": hashlib.sha256(data).hexdigest()}],
        }
        write_stats(store, unit.shard_id, stats)
    index = {u.shard_id: IndexSummary(u.shard_id, 0, SHA, {}) for u in units}
    return store, units, index


@pytest.mark.parametrize("fault", ["no_record", "fingerprint", "input", "drop", "damaged"])
def test_a_first_shard_that_cannot_be_skipped_leaves_the_next_one_judged_on_its_own(tmp_path, fault):
    store, units, index = two_committed_shards(tmp_path)
    drops = {}
    first = units[0].shard_id
    if fault == "no_record":
        store.delete(layout.stats_file(first))
    elif fault == "fingerprint":
        write_stats(store, first, {"shard": first, "fingerprint": "old"})
    elif fault == "input":
        index[first] = IndexSummary(first, 0, "cd" * 32, {})
    elif fault == "drop":
        drops[first] = "d1"
    else:
        store.write_bytes(f"{first}.tar", b"short")
    found = corpus.verify_done(store, units, "fp", index, drops, full_hash=False)
    assert list(found.done) == [units[1].shard_id]
    assert list(found.redo) == ([] if fault == "no_record" else [first])


def test_a_record_from_before_drop_digests_counts_as_done_when_no_keys_are_dropped(tmp_path):
    store, units, index = two_committed_shards(tmp_path)
    found = corpus.verify_done(store, units, "fp", index, {}, full_hash=False)
    assert sorted(found.done) == [u.shard_id for u in units] and found.redo == {}
    stats = json.loads(store.read_bytes(layout.stats_file(units[0].shard_id)))
    assert "drop_digest" not in stats
