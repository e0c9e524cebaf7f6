"""The bundled demo corpus: real sentences with sentiment labels, written as WebDataset shards."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import pyarrow.csv as pacsv

from augpipe.pipeline.ingest import table_samples, write_shards

DEMO_SHARD_SIZE = 12


def demo_sentences_csv() -> Path:
    return Path(str(resources.files("augpipe.demo") / "sentences.csv"))


def write_demo_data(out_dir: Path) -> dict[str, list[Path]]:
    """``out_dir/text``: 24 labelled sentences in two shards (the back-speech demo input)."""
    table = pacsv.read_csv(demo_sentences_csv())
    return {"text": write_shards(table_samples(table), out_dir / "text", DEMO_SHARD_SIZE)}
