"""Hostile and broken input: bad samples are quarantined with a cause, nothing escapes, the run goes on."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import webdataset as wds

from augpipe.pipeline import layout
from augpipe.pipeline.config import Limits, load_recipe
from augpipe.pipeline.inputs import discover_inputs
from augpipe.pipeline.reader import read_unit
from augpipe.pipeline.run import run_recipe
from tests.corpora import write_hostile_corpus

PWNED = Path("/tmp/augpipe-pwned")


@pytest.fixture()
def hostile(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    PWNED.unlink(missing_ok=True)
    expected = write_hostile_corpus(tmp_path / "in")
    return tmp_path / "in", expected


def test_reader_names_each_bad_sample_and_its_cause(hostile):
    folder, expected = hostile
    failures, rows = [], []
    for unit in discover_inputs(folder, shard_size=100):
        result = read_unit(unit, ["text"], Limits())
        failures += result.failures
        rows += result.rows
    causes = {f.key: f.cause for f in failures}
    assert causes == expected
    assert [r["key"] for r in rows] == ["good0", "good1", "intact"]
    assert rows[0]["label"] == "positive"
    by_key = {f.key: f.message for f in failures}
    assert "huge.txt" in by_key["huge"] and "2,000,000 bytes" in by_key["huge"]
    assert "never unpickles" in by_key["pickled"]
    assert "damaged at byte 1,024" in by_key["cut"] and "truncated" in by_key["cut"]
    assert not PWNED.exists()


def _quarantined(out: Path) -> dict[str, str]:
    records = {}
    for tar in sorted((out / layout.QUARANTINE_DIR).glob("*.tar")):
        for sample in wds.WebDataset(str(tar), shardshuffle=False):
            record = json.loads(sample["error.json"])
            records[record["key"]] = record["cause"]
    return records


def test_run_quarantines_and_reports_failure_rate(hostile, tmp_path, ray_session):
    folder, expected = hostile
    out = tmp_path / "out"
    recipe = load_recipe("passthrough")
    result = run_recipe(recipe, folder, out, max_failure_rate=0.9, progress=False)
    assert result.ok
    manifest = result.manifest
    assert manifest["samples"]["out"] == 3
    assert manifest["failures"]["total"] == len(expected)
    assert manifest["failures"]["by_cause"]["refused_pickle"] == 1
    assert _quarantined(out) == expected
    written = {p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file()}
    assert all(str(p).startswith(("in/", "out/")) for p in written)
    assert not (tmp_path / "escape.txt").exists() and not PWNED.exists()

    strict = run_recipe(recipe, folder, tmp_path / "strict", max_failure_rate=0.05, progress=False)
    assert not strict.ok and strict.failure_rate > 0.05


def test_tables_are_read_in_units_with_bad_rows_quarantined(tmp_path):
    table = tmp_path / "sentences.csv"
    table.write_text(
        "key,text,label\n"
        "ok1,A fine sentence.,1\n"
        "../../up,Sneaky key.,0\n"
        "blank,,1\n"
        "ok2,Another fine sentence.,0\n"
        ",A row with no key.,1\n"
    )
    units = discover_inputs(table, shard_size=2)
    assert [(u.shard_id, u.start, u.stop) for u in units] == [
        ("sentences-00000", 0, 2),
        ("sentences-00001", 2, 4),
        ("sentences-00002", 4, 5),
    ]
    results = [read_unit(unit, ["text"], Limits()) for unit in units]
    kept = [(row["key"], row["text"], row["label"]) for r in results for row in r.rows]
    assert kept == [
        ("ok1", "A fine sentence.", 1),
        ("ok2", "Another fine sentence.", 0),
        ("row000000004", "A row with no key.", 1),
    ]
    assert {(f.key, f.cause) for r in results for f in r.failures} == {
        ("../../up", "unsafe_key"),
        ("blank", "empty_text"),
    }
