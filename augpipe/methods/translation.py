"""Latent modality translation through a conditional encoder-decoder (METHODS §3), in pure torch.

A condition embedding c (e.g. an image's) is mapped to the other modality's embedding space by

    ẑ = cM + γ · Normalize(CDIM(c))                                            (Eq. 5/6)

where M is one linear layer *with* bias (the reference builds it without), CDIM(c) is a sample of the
conditional latent DDIM (``augpipe.methods.cdim``) with classifier-free guidance at every step, and
Normalize is a per-row L2 normalisation (the reference divides by the Frobenius norm of the whole
batch, so one row's output depended on the others). Training minimises

    λ1 · mean|z − ẑ|  +  λ2 · mean(ε − ε_θ(z_t, t, c))²                          (Eq. 9)

with the paper's λ1 = 1, λ2 = 2 (the reference's defaults put the 2 on the other term), the
condition dropped (replaced by ∅) for a share ``p_uncond`` of the rows of the ε term, and the L1
term backpropagated through the whole guided DDIM sampler, as in the reference.

The diffusion runs on z-scored embeddings (per-coordinate mean and std of the training split, as the
reference's ``latent_znormalize``): L2-normalised embeddings have coordinates of about 1/√d, far from
the unit scale the noise schedule assumes. CDIM's sample is mapped back to the embedding space before
Normalize, so M and the CDIM term live in the same space. The ε-network also sees the z-scored c.

``Translator(shape)`` with ``projection=False`` or ``ddim=False`` gives the paper's two ablations
(without M, ẑ = γ·Normalize(CDIM(c)); without the DDIM term, ẑ = cM, trained on the L1 term alone).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from augpipe.methods.cdim import Autocast, EpsNet, alphas_bar, ddim_sample, q_sample

CHUNK = 4096
"""Rows per sampler call when translating many rows (bounds memory, not the result)."""


@dataclass(frozen=True)
class TranslatorShape:
    """What fixes the parameters' shapes; saved with a checkpoint and checked when one is loaded."""

    cond_dim: int
    target_dim: int
    hidden: int = 2048
    layers: int = 10
    dropout: float = 0.1
    time_dim: int = 64
    timesteps: int = 1000
    beta: float = 0.008
    projection: bool = True
    ddim: bool = True


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation and sampling settings of one training run (paper values as defaults)."""

    epochs: int = 50
    batch_size: int = 256
    lr: float = 1e-4
    weight_decay: float = 1e-2
    p_uncond: float = 0.05
    steps: int = 50
    omega: float | None = 5.0
    gamma: float = 1.0
    lambda_l1: float = 1.0
    lambda_ddim: float = 2.0
    seed: int = 0


def normalize_rows(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Each row scaled to unit L2 norm (the paper's Normalize, per row, not per batch)."""
    return F.normalize(x, dim=-1, eps=eps)


def _scaler(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    std = x.std(dim=0) if x.shape[0] > 1 else torch.ones_like(x[0])
    return x.mean(dim=0), torch.where(std < 1e-6, torch.ones_like(std), std)


class Translator(nn.Module):
    """ẑ = cM + γ·Normalize(CDIM(c)); either term may be left out (the ablations)."""

    def __init__(self, shape: TranslatorShape, gamma: float = 1.0) -> None:
        super().__init__()
        if not (shape.projection or shape.ddim):
            raise ValueError("a translator needs the projection M, the DDIM term, or both")
        self.shape = shape
        self.gamma = gamma
        self.projection = nn.Linear(shape.cond_dim, shape.target_dim, bias=True) if shape.projection else None
        self.eps_net = (
            EpsNet(
                shape.target_dim,
                shape.cond_dim,
                hidden=shape.hidden,
                layers=shape.layers,
                dropout=shape.dropout,
                time_dim=shape.time_dim,
            )
            if shape.ddim
            else None
        )
        self.register_buffer("abar", alphas_bar(shape.timesteps, shape.beta))
        for name, dim in (("cond", shape.cond_dim), ("target", shape.target_dim)):
            self.register_buffer(f"{name}_mean", torch.zeros(dim))
            self.register_buffer(f"{name}_std", torch.ones(dim))

    def set_scalers(self, c: torch.Tensor, z: torch.Tensor) -> None:
        """z-score statistics of the training split (a constant coordinate keeps std 1)."""
        for name, x in (("cond", c), ("target", z)):
            mean, std = _scaler(x)
            getattr(self, f"{name}_mean").copy_(mean)
            getattr(self, f"{name}_std").copy_(std)

    def _cond(self, c: torch.Tensor) -> torch.Tensor:
        return (c - self.cond_mean) / self.cond_std

    def cdim(
        self, c: torch.Tensor, noise: torch.Tensor, steps: int, omega: float | None, autocast: Autocast = None
    ) -> torch.Tensor:
        """A guided DDIM sample for each row, mapped back from the z-scored space to embedding space."""
        assert self.eps_net is not None
        z = ddim_sample(self.eps_net, self._cond(c), noise, self.abar, steps, omega, autocast)
        return z * self.target_std + self.target_mean

    def forward(
        self, c: torch.Tensor, noise: torch.Tensor, steps: int, omega: float | None, autocast: Autocast = None
    ) -> torch.Tensor:
        out = torch.zeros(c.shape[0], self.shape.target_dim, device=c.device)
        if self.projection is not None:
            out = out + self.projection(c)
        if self.eps_net is not None:
            out = out + self.gamma * normalize_rows(self.cdim(c, noise, steps, omega, autocast))
        return out

    def eps_loss(
        self, c: torch.Tensor, z: torch.Tensor, draws: dict[str, torch.Tensor], autocast: Autocast = None
    ) -> torch.Tensor:
        """mean(ε − ε_θ(z_t, t, c))² at random timesteps; ``uncond`` rows see ∅ instead of c."""
        assert self.eps_net is not None
        z_t = q_sample((z - self.target_mean) / self.target_std, draws["t"], draws["eps"], self.abar)
        with autocast() if autocast is not None else nullcontext():
            predicted = self.eps_net(z_t, draws["t"], self._cond(c), draws["uncond"])
        return F.mse_loss(predicted.float(), draws["eps"])


def translation_loss(
    model: Translator,
    c: torch.Tensor,
    z: torch.Tensor,
    draws: dict[str, torch.Tensor],
    config: TrainConfig,
    autocast: Autocast = None,
) -> dict[str, torch.Tensor]:
    """λ1·L1(z, ẑ) + λ2·MSE(ε, ε_θ) (Eq. 9); the DDIM term is absent when the model has no CDIM."""
    z_hat = model(c, draws["z_T"], config.steps, config.omega, autocast)
    l1 = (z - z_hat).abs().mean()
    terms = {"l1": l1, "total": config.lambda_l1 * l1}
    if model.eps_net is not None:
        terms["ddim"] = model.eps_loss(c, z, draws, autocast)
        terms["total"] = terms["total"] + config.lambda_ddim * terms["ddim"]
    return terms


def _draws(n: int, shape: TranslatorShape, p_uncond: float, gen: torch.Generator, device: str) -> dict:
    """Every random number of one training step, drawn on the CPU so any device sees the same stream."""
    draws = {
        "z_T": torch.randn(n, shape.target_dim, generator=gen),
        "t": torch.randint(0, shape.timesteps, (n,), generator=gen),
        "eps": torch.randn(n, shape.target_dim, generator=gen),
        "uncond": torch.rand(n, generator=gen) < p_uncond,
    }
    return {k: v.to(device) for k, v in draws.items()}


def train(
    model: Translator, c: torch.Tensor, z: torch.Tensor, config: TrainConfig, autocast: Autocast = None
) -> list[dict[str, float]]:
    """Fit ``model`` on pairs (c, z) already on the model's device; returns the per-epoch mean losses.

    AdamW (lr 1e-4, weight decay 1e-2 in the paper); the scalers are set from these pairs first. Every
    random draw (order, noise, timesteps, dropped conditions) comes from ``config.seed``.
    """
    device = str(c.device)
    model.set_scalers(c, z)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    gen = torch.Generator().manual_seed(config.seed)
    curve = []
    for epoch in range(config.epochs):
        order = torch.randperm(c.shape[0], generator=gen).to(device)
        sums: dict[str, float] = {}
        for start in range(0, c.shape[0], config.batch_size):
            idx = order[start : start + config.batch_size]
            draws = _draws(len(idx), model.shape, config.p_uncond, gen, device)
            terms = translation_loss(model, c[idx], z[idx], draws, config, autocast)
            opt.zero_grad(set_to_none=True)
            terms["total"].backward()
            opt.step()
            for name, value in terms.items():
                sums[name] = sums.get(name, 0.0) + float(value.detach()) * len(idx)
        curve.append({"epoch": epoch + 1, **{k: v / c.shape[0] for k, v in sums.items()}})
    model.eval()
    return curve


def row_noise(seeds: Sequence[int], dim: int) -> torch.Tensor:
    """z_T for each row from its own seed: a row's translation does not depend on its batch-mates."""
    return torch.stack([torch.randn(dim, generator=torch.Generator().manual_seed(s)) for s in seeds])


@torch.no_grad()
def translate(
    model: Translator,
    c: torch.Tensor,
    noise: torch.Tensor,
    steps: int,
    omega: float | None,
    autocast: Autocast = None,
) -> torch.Tensor:
    """ẑ for every row of ``c`` (evaluation mode, no gradients), on the CPU as float32.

    ω = 0 is run as the unguided sampler: (1+0)·ε_c − 0·ε_∅ = ε_c, so the ∅ pass would be wasted.
    """
    model.eval()
    device = model.abar.device
    guidance = None if omega == 0 else omega
    parts = [
        model(c[i : i + CHUNK].to(device), noise[i : i + CHUNK].to(device), steps, guidance, autocast).cpu()
        for i in range(0, c.shape[0], CHUNK)
    ]
    return torch.cat(parts).float() if parts else torch.zeros(0, model.shape.target_dim)


def mean_cosine(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> float:
    """Mean over rows of cos(a_i, b_i): the paper's Sim_txt / Sim_img."""
    a, b = (
        torch.as_tensor(x).double() if torch.is_tensor(x) else torch.from_numpy(np.array(x, np.float64))
        for x in (a, b)
    )
    return float(F.cosine_similarity(a, b, dim=-1, eps=1e-12).mean()) if len(a) else float("nan")


def holdout_split(n: int, share: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, held-out) row indices: a seeded ``share`` of the n rows held out, at least one row each
    when ``share`` > 0 and n ≥ 2, and never every row."""
    held = 0 if share <= 0 or n < 2 else min(n - 1, max(1, round(n * share)))
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[held:]), np.sort(order[:held])


VARIANTS = {
    "full": {"projection": True, "ddim": True},
    "without_projection": {"projection": False, "ddim": True},
    "without_ddim": {"projection": True, "ddim": False},
}
"""The model and the paper's two ablations: without M (CDIM alone), without the DDIM term (M alone)."""


def build(shape: TranslatorShape, gamma: float, seed: int, device: str) -> Translator:
    """A freshly initialised translator; the initialisation depends on ``seed`` only, not on the device."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Translator(shape, gamma)
    return model.to(device)


def fit_and_evaluate(
    c: np.ndarray,
    z: np.ndarray,
    shape: TranslatorShape,
    config: TrainConfig,
    *,
    holdout: float,
    ablations: bool,
    device: str = "cpu",
    autocast: Autocast = None,
) -> tuple[Translator, dict[str, Any]]:
    """Train the translator (and, with ``ablations``, the two ablations) on a seeded split of the pairs.

    Returns the full model, trained on the training split, and a report: the split sizes, each variant's
    training curve and seconds, and its mean cosine to the true targets on the held-out pairs (None when
    nothing is held out). The held-out noise z_T is shared by every variant.
    """
    train_idx, held_idx = holdout_split(len(c), holdout, config.seed)
    ct, zt = (torch.from_numpy(np.ascontiguousarray(a[train_idx])).to(device) for a in (c, z))
    ch, zh = torch.from_numpy(c[held_idx]), torch.from_numpy(z[held_idx])
    noise = torch.randn(
        len(held_idx), shape.target_dim, generator=torch.Generator().manual_seed(config.seed + 1)
    )
    report: dict[str, Any] = {"train_rows": len(train_idx), "holdout_rows": len(held_idx), "variants": {}}
    full: Translator | None = None
    for name, parts in VARIANTS.items():
        if name != "full" and not ablations:
            continue
        model = build(replace(shape, **parts), config.gamma, config.seed, device)
        started = time.perf_counter()
        curve = train(model, ct, zt, config, autocast)
        entry: dict[str, Any] = {"train_s": time.perf_counter() - started, "curve": curve}
        if len(held_idx):
            entry["holdout_cosine"] = mean_cosine(
                translate(model, ch, noise, config.steps, config.omega, autocast), zh
            )
        report["variants"][name] = entry
        full = model if name == "full" else full
    assert full is not None
    return full, report
