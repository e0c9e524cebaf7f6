"""The dataset card: ``README.md`` at the top of an output folder, for people and for Hugging Face.

``datasets.load_dataset(OUT)`` reads the card's YAML header: the ``default`` config points at the Parquet
sidecars (``*.parquet``), which hold every typed column (the media stay in the tars, which
``load_dataset("webdataset", data_files="OUT/*.tar")`` reads), and ``dataset_info``
declares their features, with ``label`` as a ``ClassLabel`` over the manifest's label vocabulary (ids stable
across runs). The body says what the corpus is, how it was made and how to read it without augpipe. The
card is rewritten with the manifest after every run; the manifest stays the record (``_augpipe/``).
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from augpipe.pipeline import layout
from augpipe.pipeline.storage import Store

_PLAIN = {
    pa.string(): "string",
    pa.large_string(): "large_string",
    pa.bool_(): "bool",
    pa.binary(): "binary",
    pa.null(): "null",
}


def _dtype(kind: pa.DataType) -> Any:
    """A Hugging Face feature for an Arrow type, in the card's YAML form."""
    if kind in _PLAIN:
        return _PLAIN[kind]
    if pa.types.is_integer(kind):
        return str(kind)
    if pa.types.is_floating(kind):
        return f"float{kind.bit_width}"
    if pa.types.is_struct(kind):
        return [_feature(kind.field(i).name, kind.field(i).type) for i in range(kind.num_fields)]
    raise ValueError(f"no dataset-card feature for Arrow type {kind}")


def _feature(name: str, kind: pa.DataType) -> dict[str, Any]:
    if pa.types.is_fixed_size_list(kind):
        return {"name": name, "list": _dtype(kind.value_type), "length": kind.list_size}
    if pa.types.is_list(kind):
        return {"name": name, "list": _dtype(kind.value_type)}
    if pa.types.is_struct(kind):
        return {"name": name, "struct": _dtype(kind)}
    return {"name": name, "dtype": _dtype(kind)}


def features(schema: pa.Schema, label_names: list[str]) -> list[dict[str, Any]]:
    """The card's feature list for a sidecar schema; a string ``label`` becomes a ClassLabel."""
    found = []
    for item in schema:
        if item.name == "label" and pa.types.is_string(item.type) and label_names:
            names = {str(i): name for i, name in enumerate(label_names)}
            found.append({"name": "label", "dtype": {"class_label": {"names": names}}})
        else:
            found.append(_feature(item.name, item.type))
    return found


def _sidecar_schema(store: Store, manifest: dict[str, Any]) -> pa.Schema | None:
    for entry in manifest["outputs"]:
        if entry["path"].endswith(".parquet"):
            with store.open_read(entry["path"]) as fh:
                return pq.read_schema(fh).remove_metadata()
    return None


def _header(manifest: dict[str, Any], schema: pa.Schema | None) -> dict[str, Any]:
    header: dict[str, Any] = {
        "pretty_name": f"augpipe {manifest['recipe']} corpus",
        "tags": ["augpipe", "data-augmentation", manifest["recipe"]],
        "configs": [
            {
                "config_name": "default",
                "data_files": [{"split": "train", "path": "*.parquet"}],
                "default": True,
            },
        ],
    }
    if schema is not None:
        sidecar_bytes = sum(o["bytes"] for o in manifest["outputs"] if o["path"].endswith(".parquet"))
        header["dataset_info"] = {
            "config_name": "default",
            "features": features(schema, manifest.get("labels", {}).get("names", [])),
            # datasets ignores a split without its byte count (and says so on every load).
            "splits": [
                {
                    "name": "train",
                    "num_bytes": sidecar_bytes,
                    "num_examples": manifest["samples"]["out"],
                }
            ],
        }
    return header


def _body(manifest: dict[str, Any]) -> str:
    samples = manifest["samples"]
    labels = manifest.get("labels", {})
    counts = ", ".join(f"{name} {n}" for name, n in labels.get("counts", {}).items()) or "none"
    shards = sum(1 for o in manifest["outputs"] if o["path"].endswith(".tar"))
    models = [
        f"- {m['stage']}: {m.get('backend', '-')} {m['model']} ({m.get('revision', '-')})"
        for m in manifest["models"]
        if "model" in m
    ]
    return "\n".join(
        [
            f"# {manifest['recipe']} corpus, made by augpipe {manifest['augpipe_version']}",
            "",
            f"{samples['out']} samples in {shards} shards, from {samples['in']} input samples "
            f"({samples['failed']} failed, quarantined under `_augpipe/quarantine/`).",
            f"Labels (class ids in this order): {counts}.",
            "",
            f"Recipe `{manifest['recipe']}`, config hash `{manifest['config_hash']}`, "
            f"seed {manifest['seed']}, k = {manifest['multiple']}; "
            f"last run `{manifest['run_id']}` at {manifest['finished_at']}. "
            "How every sample was made (inputs and outputs with checksums, per-stage counts, failures, the "
            "history of runs) is in [`_augpipe/manifest.json`](_augpipe/manifest.json).",
            *(["", "Models:", *models] if models else []),
            "",
            "## Files",
            "",
            "- `NAME.tar`: WebDataset shards: `KEY.png|flac|txt` (the media or text) and `KEY.json` (key, "
            "parent_key, label, recipe, and where the recipe has them soft_label, cluster and score_*).",
            "- `NAME.parquet`: the same samples in the same order, typed: label, soft_label "
            "(list of {label, weight}), cluster, embeddings (fixed-size float32 lists), score_*, "
            "contributors, weights, seed, and the full lineage as JSON.",
            "- A mixed sample's `label` is its soft label's argmax (ties: the anchor's own label).",
            "",
            "## Reading it (no augpipe needed)",
            "",
            "```python",
            "import glob, datasets, pyarrow.dataset as ds, ray, webdataset as wds",
            'datasets.load_dataset("OUT")                                     # label as ClassLabel',
            'datasets.load_dataset("webdataset", data_files="OUT/*.tar")      # the tars, with media',
            'ds.dataset("OUT", format="parquet", exclude_invalid_files=True)  # skips the tars',
            'ray.data.read_parquet("OUT")',
            'ray.data.read_webdataset("OUT", file_extensions=["tar"])        # skips README and sidecars',
            'wds.WebDataset(sorted(glob.glob("OUT/*.tar"))).decode()',
            "```",
            "",
        ]
    )


def write_card(store: Store, manifest: dict[str, Any]) -> str:
    """Write ``README.md`` for the corpus as the manifest describes it; returns its path."""
    header = yaml.safe_dump(_header(manifest, _sidecar_schema(store, manifest)), sort_keys=False)
    store.write_bytes(layout.CARD, f"---\n{header}---\n\n{_body(manifest)}".encode())
    return store.display(layout.CARD)
