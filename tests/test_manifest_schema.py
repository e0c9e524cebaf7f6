"""The manifest schema is a published contract: the golden example passes it, and it catches breakage."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import jsonschema
import pytest

from augpipe.pipeline.manifest import validate_manifest

EXAMPLE = Path(__file__).resolve().parents[1] / "manifests" / "example.manifest.json"


@pytest.fixture()
def example() -> dict:
    return json.loads(EXAMPLE.read_text())


def test_golden_example_is_valid(example):
    validate_manifest(example)
    assert example["recipe"] == "back-speech"
    assert example["samples"]["out"] == sum(o["samples"] for o in example["outputs"]) // 2


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("samples", "failed"), -1),
        (("outputs", 0, "sha256"), "not-a-digest"),
        (("stages", "transcribe", "samples_per_s"), "fast"),
        (("failures", "by_cause", "empty_text"), 0),
        (("unexpected",), True),
    ],
)
def test_schema_rejects_broken_manifests(example, path, value):
    broken = copy.deepcopy(example)
    target = broken
    for part in path[:-1]:
        target = target[part]
    target[path[-1]] = value
    with pytest.raises(jsonschema.ValidationError):
        validate_manifest(broken)
