"""The bundled demo corpora: labelled sentences, and real photos (shipped by scikit-image) with captions."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.csv as pacsv
from PIL import Image

from augpipe.pipeline.ingest import table_samples, write_shards

DEMO_SHARD_SIZE = 12
IMAGE_SHARD_SIZE = 9
IMAGE_SIDE = 128

# skimage.data name -> (caption, label); only images that ship inside the scikit-image wheel.
DEMO_IMAGES: dict[str, tuple[str, str]] = {
    "chelsea": ("a tabby cat with green eyes looking to the side", "animal"),
    "coffee": ("a cup of coffee on a saucer with a spoon", "object"),
    "rocket": ("a rocket standing on the launch pad", "space"),
    "astronaut": ("an astronaut in a white spacesuit in front of a flag", "person"),
    "hubble_deep_field": ("distant galaxies scattered across a dark sky", "space"),
    "moon": ("the grey cratered surface of the moon", "space"),
    "camera": ("a man standing behind a camera on a tripod", "person"),
    "brick": ("a wall made of rows of bricks", "texture"),
    "grass": ("a close view of blades of grass", "texture"),
    "gravel": ("small stones of gravel on the ground", "texture"),
    "immunohistochemistry": ("a stained tissue sample under a microscope", "microscopy"),
    "cell": ("a single cell seen through a microscope", "microscopy"),
    "retina": ("a photograph of the back of a human eye", "microscopy"),
    "coins": ("old coins laid out in rows", "object"),
    "clock": ("a clock face seen at an angle", "object"),
    "colorwheel": ("a colour wheel showing every hue", "object"),
    "page": ("a page of printed text", "document"),
    "text": ("a line of handwritten text on paper", "document"),
}


def demo_sentences_csv() -> Path:
    return Path(str(resources.files("augpipe.demo") / "sentences.csv"))


def _photo(name: str) -> Image.Image:
    import skimage.data

    pixels = np.asarray(getattr(skimage.data, name)())
    image = Image.fromarray(pixels).convert("RGB")
    image.thumbnail((IMAGE_SIDE, IMAGE_SIDE))
    return image


def _image_samples() -> Iterator[dict[str, Any]]:
    for name, (caption, label) in DEMO_IMAGES.items():
        buffer = io.BytesIO()
        _photo(name).save(buffer, format="JPEG", quality=92)
        key = name.replace("_", "-")
        yield {
            "__key__": key,
            "jpg": buffer.getvalue(),
            "txt": caption.encode(),
            "json": json.dumps({"label": label}).encode(),
        }


def write_demo_data(out_dir: Path) -> dict[str, list[Path]]:
    """``text``: 24 labelled sentences (2 shards); ``images``: 18 captioned, labelled photos (2 shards)."""
    table = pacsv.read_csv(demo_sentences_csv())
    return {
        "text": write_shards(table_samples(table), out_dir / "text", DEMO_SHARD_SIZE),
        "images": write_shards(_image_samples(), out_dir / "images", IMAGE_SHARD_SIZE),
    }
