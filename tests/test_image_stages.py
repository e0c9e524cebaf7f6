"""The image stages on tiny random models: caption, generate_image, filter_images, and their image checks.

The tiny backends run the real transformers/diffusers code on CPU; models are built once per module.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import math

import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError

from augpipe.methods import image_checks
from augpipe.pipeline.models import ModelNotFoundError
from augpipe.pipeline.rows import Failure
from augpipe.pipeline.stage import StageContext
from augpipe.stages.caption import Caption, build_tiny_blip
from augpipe.stages.filter_images import FilterImages
from augpipe.stages.generate_image import GenerateImage, build_tiny_sd


def make_stage(cls, run_seed: int = 7, **options):
    stage = cls(cls.settings_from(options), StageContext(run_seed=run_seed, recipe="test"))
    stage.check()
    stage.setup()
    return stage


def noise_image(seed: int, size: tuple[int, int] = (40, 48)) -> Image.Image:
    w, h = size
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def pixels(image: Image.Image) -> bytes:
    return image.tobytes()


# -- caption ---------------------------------------------------------------------------------------------


CAPTION_OPTIONS = {"backend": "tiny", "variants": 3, "max_new_tokens": 8}


@pytest.fixture(scope="module")
def captioner():
    return make_stage(Caption, **CAPTION_OPTIONS)


@pytest.fixture(scope="module")
def source_rows():
    return [{"key": "img-a", "image": noise_image(1)}, {"key": "img-b", "image": noise_image(2, (56, 32))}]


def test_tiny_caption_is_seeded_and_samples_differ(captioner, source_rows):
    out = captioner.process_batch([dict(r) for r in source_rows])
    assert [(r["key"], r["variant"]) for r in out] == [
        (k, (j,)) for k in ("img-a", "img-b") for j in range(3)
    ]
    captions = [r["caption"] for r in out]
    assert all(isinstance(c, str) and c.strip() for c in captions)
    again = captioner.process_batch([dict(r) for r in source_rows])
    assert [r["caption"] for r in again] == captions
    for i in (0, 3):
        assert len({captions[i], captions[i + 1], captions[i + 2]}) == 3, captions[i : i + 3]
    lineage = [r["lineage"]["caption"] for r in out]
    assert [info["decoding"]["mode"] for info in lineage[:3]] == ["greedy", "sample", "sample"]
    assert [info["seed"] for info in lineage] == [captioner.seed_for(r) for r in out]
    assert len({info["seed"] for info in lineage}) == 6
    assert lineage[1]["model"] == "tiny:blip" and lineage[1]["decoding"]["top_p"] == 0.9


def test_caption_follows_its_own_seed_not_the_batch(captioner, source_rows):
    together = captioner.process_batch([dict(r) for r in source_rows])
    alone = captioner.process_batch([dict(source_rows[1])])
    assert [r["caption"] for r in alone] == [r["caption"] for r in together[3:]]
    reseeded = make_stage(Caption, run_seed=8, **CAPTION_OPTIONS).process_batch([dict(source_rows[1])])
    assert reseeded[0]["caption"] == alone[0]["caption"]  # greedy: seed-independent
    assert [r["caption"] for r in reseeded[1:]] != [r["caption"] for r in alone[1:]]


def test_caption_reads_and_writes_configured_fields():
    stage = make_stage(
        Caption, backend="tiny", field="generated_image", output="text", variants=2, max_new_tokens=5,
        num_beams=2, prompt="a photo of", keep_prompt=True,
    )  # fmt: skip
    assert stage.inputs() == {"generated_image"} and stage.outputs() == {"text"}
    out = stage.process_batch([{"key": "t", "generated_image": noise_image(3)}, {"key": "u", "image": 1}])
    beam, sampled, failure = out
    for row in (beam, sampled):
        assert row["text"].startswith("a photo of ") and len(row["text"]) > len("a photo of ")
        assert row["text"].count("photo of") == 1
    assert beam["lineage"]["caption"]["decoding"] == {"mode": "beam", "max_new_tokens": 5, "num_beams": 2}
    assert sampled["lineage"]["caption"]["decoding"]["mode"] == "sample"
    assert sampled["lineage"]["caption"]["prompt"] == "a photo of"
    assert isinstance(failure, Failure) and failure.cause == "bad_input"
    assert "generated_image" in failure.message


def test_caption_top_beams_without_sampling():
    stage = make_stage(Caption, backend="tiny", variants=3, do_sample=False, max_new_tokens=6)
    out = stage.process_batch([{"key": "k", "image": noise_image(4)}])
    assert len({r["caption"] for r in out}) == 3
    assert {r["lineage"]["caption"]["decoding"]["mode"] for r in out} == {"beam"}


def test_caption_settings_are_validated():
    with pytest.raises(ValidationError, match="temprature"):
        Caption.settings_from({"temprature": 0.7})
    with pytest.raises(ValidationError, match="overwrite"):
        Caption.settings_from({"field": "image", "output": "image"})
    with pytest.raises(ValueError, match="unknown backend"):
        Caption(Caption.settings_from({"backend": "ofa"}), StageContext())


# -- generate_image --------------------------------------------------------------------------------------


GEN_OPTIONS = {"backend": "tiny", "variants": 2, "steps": 3}


@pytest.fixture(scope="module")
def generator():
    return make_stage(GenerateImage, **GEN_OPTIONS)


@pytest.fixture(scope="module")
def caption_rows():
    return [
        {"key": "with-source", "caption": "a cat on a mat", "image": noise_image(5, (40, 48))},
        {"key": "text-only", "caption": "a red car"},
    ]


@pytest.fixture(scope="module")
def generated(generator, caption_rows):
    return generator.process_batch([dict(r) for r in caption_rows])


def test_tiny_diffusion_resizes_to_source_and_variants_differ(generated):
    assert [(r["key"], r["variant"]) for r in generated] == [
        ("with-source", (0,)), ("with-source", (1,)), ("text-only", (0,)), ("text-only", (1,)),
    ]  # fmt: skip
    sizes = [r["generated_image"].size for r in generated]
    assert sizes == [(40, 48), (40, 48), (64, 64), (64, 64)]
    assert all(r["generated_image"].mode == "RGB" for r in generated)
    assert [r["lineage"]["generate_image"]["generated_size"] for r in generated] == [[64, 64]] * 4
    assert pixels(generated[0]["generated_image"]) != pixels(generated[1]["generated_image"])
    assert pixels(generated[2]["generated_image"]) != pixels(generated[3]["generated_image"])
    assert generated[2]["prompt"] == "a red car"
    info = generated[3]["lineage"]["generate_image"]
    assert (
        info["steps"] == 3
        and info["scheduler"] == "DDIMScheduler"
        and info["model"] == "tiny:stable-diffusion"
    )


def test_tiny_diffusion_is_deterministic_per_seed(generator, generated, caption_rows):
    fresh = make_stage(GenerateImage, **GEN_OPTIONS)  # a second build of the tiny model
    again = fresh.process_batch([dict(r) for r in caption_rows])
    assert [pixels(r["generated_image"]) for r in again] == [pixels(r["generated_image"]) for r in generated]
    seeds = [r["lineage"]["generate_image"]["seed"] for r in generated]
    assert seeds == [generator.seed_for(r) for r in generated] and len(set(seeds)) == 4
    other = make_stage(GenerateImage, run_seed=99, **GEN_OPTIONS).process_batch([dict(caption_rows[1])])
    assert pixels(other[0]["generated_image"]) != pixels(generated[2]["generated_image"])


def test_generation_size_template_label_and_explicit_resize():
    stage = make_stage(
        GenerateImage, backend="tiny", steps=1, height=32, width=48, resize_to=[24, 16],
        prompt_template="a photo of {caption}, a kind of {label}", label_names=["cat", "dog"],
        negative_prompt="blurry",
    )  # fmt: skip
    assert stage.inputs() == {"caption", "label"} and stage.outputs() == {"generated_image", "prompt"}
    out = stage.process_batch(
        [
            {"key": "a", "caption": "a pet", "label": 1, "image": noise_image(6)},
            {"key": "b", "caption": "a pet"},
            {"key": "c", "caption": "  ", "label": "cat"},
        ]
    )
    row, no_label, empty = out
    assert row["prompt"] == "a photo of a pet, a kind of dog"
    assert row["lineage"]["generate_image"]["generated_size"] == [48, 32]
    assert row["generated_image"].size == (24, 16)
    assert row["lineage"]["generate_image"]["negative_prompt"] == "blurry"
    assert isinstance(no_label, Failure) and "{label}" in no_label.message
    assert isinstance(empty, Failure) and empty.cause == "bad_input"


def test_generate_settings_are_validated():
    with pytest.raises(ValidationError, match="multiple of 8"):
        GenerateImage.settings_from({"height": 60})
    with pytest.raises(ValidationError, match="plain field name"):
        GenerateImage.settings_from({"prompt_template": "{caption.upper}"})
    with pytest.raises(ValidationError, match="resize_to"):
        GenerateImage.settings_from({"resize_to": [0, 64]})


# -- filter_images and its checks ------------------------------------------------------------------------


def solid(rgb: tuple[int, int, int], size: tuple[int, int] = (16, 8)) -> Image.Image:
    return Image.new("RGB", size, rgb)


def test_image_checks_exact_values():
    red = np.asarray(solid((255, 0, 0)))
    assert image_checks.mean_intensity(red) == 85.0
    assert image_checks.channel_spread(red) == 255.0
    assert image_checks.colorfulness(red) == pytest.approx(0.3 * math.hypot(255.0, 127.5))
    gray = np.asarray(solid((128, 128, 128)))
    assert image_checks.channel_spread(gray) == 0.0 and image_checks.colorfulness(gray) == 0.0
    half = np.zeros((2, 2, 3))
    half[0] = (10, 20, 30)  # spread 20 on half the pixels, mean 10 overall
    assert image_checks.channel_spread(half) == 10.0 and image_checks.mean_intensity(half) == 10.0
    assert image_checks.verdict(half, black_threshold=10.0, gray_threshold=3.0) is None
    assert image_checks.verdict(half, black_threshold=10.5, gray_threshold=3.0) == "black"
    assert image_checks.verdict(half, black_threshold=1.0, gray_threshold=10.5) == "grayscale"
    with pytest.raises(ValueError, match="RGB"):
        image_checks.as_rgb_array(np.zeros((4, 4)))


def test_filter_drops_black_and_grayscale_with_exact_stats(generated):
    stage = make_stage(FilterImages)
    assert FilterImages.cacheable is False and stage.inputs() == {"generated_image"}
    batch = [
        {"key": "black", "generated_image": solid((0, 0, 0))},
        {"key": "dark", "generated_image": solid((3, 9, 6))},
        {"key": "gray", "generated_image": solid((120, 121, 120))},
        {"key": "colour", "generated_image": noise_image(8)},
        {"key": "missing"},
        *[dict(r) for r in generated],
    ]
    out = stage.process_batch(batch)
    kept = [r for r in out if not isinstance(r, Failure)]
    failures = [r for r in out if isinstance(r, Failure)]
    assert [r["key"] for r in kept] == ["colour", "with-source", "with-source", "text-only", "text-only"]
    assert [(f.key, f.cause) for f in failures] == [("missing", "bad_input")]
    assert dict(stage.stats) == {"dropped:black": 2, "dropped:grayscale": 1}
    info = kept[0]["lineage"]["filter_images"]
    expected = image_checks.colorfulness(np.asarray(noise_image(8), dtype=np.float64))
    assert info["verdict"] == "kept" and info["score_colorfulness"] == pytest.approx(expected, abs=1e-4)
    assert info["score_colorfulness"] > 50


# -- real backends and missing models ----------------------------------------------------------------------


def test_missing_model_fails_check_clearly(tmp_path):
    with pytest.raises(ModelNotFoundError, match=r"caption backend 'blip'.*does not exist"):
        Caption(Caption.settings_from({"model": str(tmp_path / "no-blip")}), StageContext()).check()
    with pytest.raises(ModelNotFoundError, match=r"generate_image backend 'diffusers'.*does not exist"):
        GenerateImage(GenerateImage.settings_from({"model": "/nonexistent/sd"}), StageContext()).check()
    with pytest.raises(ModelNotFoundError, match="not in the Hugging Face cache"):
        Caption(Caption.settings_from({"model": "nobody/no-such-captioner"}), StageContext()).check()
    with pytest.raises(ModelNotFoundError, match="needs a model"):
        Caption(Caption.settings_from({"backend": "hf"}), StageContext()).check()


def build_tiny_blip2(path) -> None:
    """Save a random miniature BLIP-2 (OPT decoder, byte-level tokenizer without merges) to ``path``."""
    import torch
    from transformers import (
        Blip2Config,
        Blip2ForConditionalGeneration,
        Blip2Processor,
        BlipImageProcessorPil,
        GPT2TokenizerFast,
        OPTConfig,
    )
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {token: i for i, token in enumerate(["<s>", "<pad>", "</s>", "<unk>"])}
    for char in bytes_to_unicode().values():
        vocab.setdefault(char, len(vocab))
    tokenizer = GPT2TokenizerFast(
        vocab=vocab, merges=[], bos_token="</s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    image_processor = BlipImageProcessorPil(size={"height": 32, "width": 32})
    processor = Blip2Processor(image_processor=image_processor, tokenizer=tokenizer, num_query_tokens=4)
    small = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
    text = OPTConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, ffn_dim=64, num_attention_heads=2,
        max_position_embeddings=128, word_embed_proj_dim=32, bos_token_id=2, eos_token_id=2, pad_token_id=1,
    )  # fmt: skip
    config = Blip2Config(
        vision_config={**small, "image_size": 32, "patch_size": 8},
        qformer_config={**small, "vocab_size": len(tokenizer), "encoder_hidden_size": 32},
        text_config=text.to_dict(),
        num_query_tokens=4,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        Blip2ForConditionalGeneration(config).save_pretrained(path)
    processor.save_pretrained(path)


def test_blip2_backend_samples_per_row_seed(tmp_path, source_rows):
    build_tiny_blip2(tmp_path / "blip2")
    options = {"backend": "blip2", "model": str(tmp_path / "blip2"), "variants": 3, "max_new_tokens": 4}
    stage = make_stage(Caption, **options, prompt="Question: what is it? Answer:")
    together = stage.process_batch([dict(r) for r in source_rows])
    alone = stage.process_batch([dict(source_rows[1])])
    assert len(together) == 6 and len(alone) == 3
    sampled = [together[i] for i in (1, 2, 4, 5)]  # a random model's greedy caption may be empty
    assert all(isinstance(r, dict) and r["caption"] and "Question" not in r["caption"] for r in sampled)
    assert [r["caption"] for r in alone[1:]] == [r["caption"] for r in together[4:]]
    assert sampled[0]["caption"] != sampled[1]["caption"]
    assert sampled[0]["lineage"]["caption"]["backend"] == "blip2"


def test_real_backends_load_saved_models_like_tiny(tmp_path, captioner, source_rows, generated, caption_rows):
    model, processor = build_tiny_blip(0)
    model.save_pretrained(tmp_path / "blip")
    processor.save_pretrained(tmp_path / "blip")
    build_tiny_sd(0).save_pretrained(tmp_path / "sd", safe_serialization=True)
    expected = [r["caption"] for r in captioner.process_batch([dict(source_rows[0])])]
    for backend in ("blip", "hf"):
        stage = make_stage(
            Caption, **{**CAPTION_OPTIONS, "backend": backend, "model": str(tmp_path / "blip")}
        )
        out = stage.process_batch([dict(source_rows[0])])
        assert [r["caption"] for r in out] == expected
        assert out[0]["lineage"]["caption"]["revision"].startswith("local:")
    stage = make_stage(
        GenerateImage, **{**GEN_OPTIONS, "backend": "diffusers", "model": str(tmp_path / "sd")}
    )
    out = stage.process_batch([dict(caption_rows[1])])
    assert [pixels(r["generated_image"]) for r in out] == [
        pixels(r["generated_image"]) for r in generated[2:]
    ]
    assert out[0]["lineage"]["generate_image"]["model"] == str(tmp_path / "sd")
