"""Backend ``tiny``: a StableDiffusionPipeline from randomly initialised miniature parts, built in memory
and seeded (the real diffusers code path on CPU; its images are noise)."""

from __future__ import annotations

import string
from typing import Any, ClassVar

from augpipe.stages.generate_image.diffusers import DiffusersGenerator


def _tiny_text_encoder(vocab_size: int) -> Any:
    """A 2-layer, 32-wide CLIP text encoder (randomly initialised from torch's current seed)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=vocab_size,
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            projection_dim=32,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )
    )


def _tiny_unet(sample_size: int) -> Any:
    """A 16/32-channel UNet2DConditionModel with one cross-attention block each way."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=4,
        norm_num_groups=16,
    )


def _tiny_vae(channels: tuple[int, ...], size: int) -> Any:
    """An AutoencoderKL with one down- and one up-block per entry of ``channels``."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=channels,
        down_block_types=("DownEncoderBlock2D",) * len(channels),
        up_block_types=("UpDecoderBlock2D",) * len(channels),
        latent_channels=4,
        norm_num_groups=16,
        sample_size=size,
    )


def build_tiny_sd(seed: int = 0, size: int = 64) -> Any:
    """A StableDiffusionPipeline from randomly initialised miniature parts, built offline and seeded.

    UNet2DConditionModel (16/32 channels) + AutoencoderKL (3 blocks: 4x down-scaling) + CLIPTextModel
    (2 layers, 32 wide) + a character-level CLIP BPE tokenizer (vocabulary passed in memory, no merges) +
    DDIMScheduler. No safety checker. Default output ``size`` px square. The parts are initialised in that
    fixed order (text encoder, UNet, VAE) from one seed, so the pipeline is the same on every machine.
    """
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizerFast

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for char in string.ascii_lowercase + string.digits + ".,'-!?":
        vocab.setdefault(char, len(vocab))
        vocab.setdefault(char + "</w>", len(vocab))
    tokenizer = CLIPTokenizerFast(vocab=vocab, merges=[], model_max_length=77)
    vae_channels = (16, 32, 32)
    scale = 2 ** (len(vae_channels) - 1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = _tiny_text_encoder(len(vocab))
        unet = _tiny_unet(size // scale)
        vae = _tiny_vae(vae_channels, size)
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    return StableDiffusionPipeline(
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        unet=unet.eval(),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


class TinyGenerator(DiffusersGenerator):
    """A random miniature Stable Diffusion: the real diffusers code path on CPU, 64 px in well under 1 s."""

    name = "tiny"
    default_model = None
    SEED: ClassVar[int] = 0

    def check(self) -> None:
        """Nothing to find: the pipeline is built in memory."""

    def load(self, device: str) -> None:
        self.device, self.dtype = device, self._dtype(device)
        import torch

        pipe = build_tiny_sd(self.SEED)
        if self.dtype != torch.float32:
            pipe.to(dtype=self.dtype)
        self._finish(pipe)

    def describe(self) -> dict[str, Any]:
        info = super().describe()
        info.update(model="tiny:stable-diffusion", revision=f"random-init-seed-{self.SEED}")
        return info
