"""Parquet tables as input: units are row ranges across row groups, every row is read once, keyless rows
are named by their row number, text is stripped and bounded, numeric lists become float32 vectors and
other values pass through unchanged."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from augpipe.pipeline.config import Limits
from augpipe.pipeline.inputs import discover_inputs
from augpipe.pipeline.reader import read_unit
from tests.corpora import write_text_shard


def write_table(path, n: int, row_group_size: int) -> None:
    table = pa.table(
        {
            "key": [f"r{i}" if i % 4 else None for i in range(n)],
            "text": [f"  Sentence {i}.  " for i in range(n)],
            "embedding": [[float(i), 0.5] for i in range(n)],
            "flags": [[True, False]] * n,
            "tags": [["a", "b"]] * n,
            "label": list(range(n)),
        }
    )
    pq.write_table(table, path, row_group_size=row_group_size)


def test_parquet_units_cover_every_row_once_across_row_groups(tmp_path):
    write_table(tmp_path / "t.parquet", 23, row_group_size=7)
    units = discover_inputs(tmp_path / "t.parquet", shard_size=5)
    assert [(u.start, u.stop) for u in units] == [(0, 5), (5, 10), (10, 15), (15, 20), (20, 23)]
    results = [read_unit(u, ["text"], Limits()) for u in units]
    rows = [row for r in results for row in r.rows]
    assert not [f for r in results for f in r.failures]
    assert [row["label"] for row in rows] == list(range(23))
    assert [row["key"] for row in rows[:5]] == ["row000000000", "r1", "r2", "r3", "row000000004"]
    assert rows[21]["key"] == "r21" and rows[20]["key"] == "row000000020"
    assert all(r.counts["samples_in"] == u.stop - u.start for r, u in zip(results, units, strict=True))


def test_parquet_values_are_typed_and_text_is_stripped(tmp_path):
    write_table(tmp_path / "t.parquet", 3, row_group_size=2)
    (unit,) = discover_inputs(tmp_path / "t.parquet", shard_size=10)
    rows = read_unit(unit, ["text"], Limits()).rows
    assert rows[1]["text"] == "Sentence 1."
    assert rows[1]["embedding"].dtype == np.float32
    np.testing.assert_array_equal(rows[1]["embedding"], [1.0, 0.5])
    assert rows[1]["flags"] == [True, False]  # booleans are not a vector
    assert rows[1]["tags"] == ["a", "b"]
    assert rows[1]["lineage"] == {} and rows[1]["variant"] == ()
    assert rows[1]["key"] == "r1"


def test_parquet_text_limit_names_the_row(tmp_path):
    pq.write_table(pa.table({"key": ["a", "b"], "text": ["x" * 30, "y" * 31]}), tmp_path / "t.parquet")
    (unit,) = discover_inputs(tmp_path / "t.parquet", shard_size=10)
    result = read_unit(unit, ["text"], Limits(max_text_bytes=30))
    assert [r["key"] for r in result.rows] == ["a"]
    (failure,) = result.failures
    assert failure.cause == "text_too_large" and failure.key == "b"
    assert failure.message == "t.parquet[0:2] row b has 31 bytes; the limit is 30"


def test_a_tar_sidecar_adds_typed_columns_to_its_samples(tmp_path):

    write_text_shard(
        tmp_path / "shard-00000.tar", [("a", "One.", "x"), ("b", "Two.", "y"), ("c", "Three.", "z")]
    )
    vectors = pa.array([[1.0, 2.0], None, [5.0, 6.0]], pa.list_(pa.float32(), 2))
    sidecar = pa.table(
        {
            "key": ["a", "b", "c"],
            "image_embedding": pa.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]], pa.list_(pa.float32(), 2)),
            "maybe_embedding": vectors,
            "note": ["n-a", "n-b", None],
            "label": ["sidecar", "sidecar", "sidecar"],
        }
    )
    pq.write_table(sidecar, tmp_path / "shard-00000.parquet")
    (unit,) = discover_inputs(tmp_path, shard_size=10)
    rows = {r["key"]: r for r in read_unit(unit, ["text"], Limits()).rows}
    assert rows["b"]["image_embedding"].dtype == np.float32
    np.testing.assert_array_equal(rows["b"]["image_embedding"], [3.0, 4.0])
    np.testing.assert_array_equal(rows["c"]["maybe_embedding"], [5.0, 6.0])  # a column with a null
    assert rows["c"]["maybe_embedding"].dtype == np.float32 and "maybe_embedding" not in rows["b"]
    assert rows["a"]["note"] == "n-a" and "note" not in rows["c"]
    assert rows["a"]["label"] == "x"  # the sample's own label wins over the sidecar's


def test_units_that_cut_across_read_batches_read_every_row_once(tmp_path):
    n = 2600  # the reader pulls 1,024-row batches; units of 1,000 rows start inside them
    pq.write_table(pa.table({"key": [f"r{i}" for i in range(n)], "text": ["t"] * n}), tmp_path / "t.parquet")
    units = discover_inputs(tmp_path / "t.parquet", shard_size=1000)
    keys = [row["key"] for u in units for row in read_unit(u, ["text"], Limits()).rows]
    assert keys == [f"r{i}" for i in range(n)]


def test_a_unit_without_a_stop_reads_to_the_end(tmp_path):
    from augpipe.pipeline.inputs import InputUnit
    from augpipe.pipeline.storage import Store

    pq.write_table(pa.table({"key": ["a", "b", "c"], "text": ["x", "y", "z"]}), tmp_path / "t.parquet")
    unit = InputUnit("t", Store(str(tmp_path)), "t.parquet", "parquet", start=1)
    assert [r["key"] for r in read_unit(unit, ["text"], Limits()).rows] == ["b", "c"]


def test_table_duplicates_name_the_unit_and_honour_the_drop_set(tmp_path):
    from augpipe.pipeline.rows import key_digest

    table = tmp_path / "t.csv"
    table.write_text("key,text\na,One.\nb,Two.\na,Again.\n")
    (unit,) = discover_inputs(table, shard_size=10)
    result = read_unit(unit, ["text"], Limits(), drop={key_digest("b"): "earlier.tar"})
    assert [r["key"] for r in result.rows] == ["a"]
    messages = {f.key: f.message for f in result.failures}
    assert messages == {
        "b": "key b is also in earlier.tar, which comes first (kept)",
        "a": f"key a repeats an earlier sample of {unit.label} (kept)",
    }
