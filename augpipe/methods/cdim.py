"""CDIM, the conditional latent DDIM of modality translation (METHODS §3), as pure torch functions.

A diffusion model over target-modality embeddings z ∈ R^{h2}, conditioned on a source embedding
c ∈ R^{h1}:

- forward noising z_t = √ᾱ_t z_0 + √(1−ᾱ_t) ε (``q_sample``), with the reference's schedule, a
  constant β = 0.008 over T = 1000 steps (``const0.008``; ᾱ_T ≈ 3e-4, ``alphas_bar``);
- an ε-network ε_θ(z_t, t, c) (``EpsNet``): the reference's MLP with skips (z_t is concatenated to the
  input of every hidden layer), LayerNorm, SiLU and dropout, with the timestep and the condition
  injected into every hidden layer as x·(1 + a(t)) + b(c); ``c = None`` rows use a learned null
  embedding ∅, which classifier-free guidance needs;
- the deterministic DDIM step (η = 0, Eq. 3, ``ddim_step``) over ``steps`` evenly spaced timesteps
  (``ddim_timesteps``), the last one landing on ᾱ = 1, i.e. on the predicted z_0;
- classifier-free guidance applied to ε at every sampling step (Eq. 4, ``guided_eps``):
  ε̃ = (1 + ω) ε_θ(z_t, t, c) − ω ε_θ(z_t, t, ∅). The reference instead mixes the *final* samples of
  two independent conditional and unconditional runs; this follows the paper.

``ddim_sample`` keeps the autograd graph when called with gradients enabled: the translation loss
backpropagates through the sampler, as the reference does. Half precision is the caller's choice
(``autocast``, a context factory): the network runs inside it, the DDIM arithmetic stays in float32.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import torch
from torch import nn

Autocast = Callable[[], AbstractContextManager] | None
"""A factory of the precision context the ε-network runs in (e.g. bf16 autocast on CUDA); None: float32."""


def alphas_bar(timesteps: int = 1000, beta: float = 0.008) -> torch.Tensor:
    """ᾱ_t = Π_{s≤t} (1 − β_s) for the constant schedule β_s = β·1000/T (the reference's ``const0.008``)."""
    betas = torch.full((timesteps,), beta * 1000 / timesteps, dtype=torch.float64)
    if not 0 < float(betas[0]) < 1:
        raise ValueError(f"β·1000/T must lie in (0, 1), got {float(betas[0])} (β={beta}, T={timesteps})")
    return torch.cumprod(1 - betas, dim=0).float()


def ddim_timesteps(timesteps: int, steps: int) -> list[int]:
    """The ``steps`` sampling timesteps, descending: every T/steps-th of 0 … T−1 (``ddimN`` spacing)."""
    if not 1 <= steps <= timesteps:
        raise ValueError(f"DDIM steps must be in 1..{timesteps}, got {steps}")
    stride = timesteps // steps
    return list(range(0, stride * steps, stride))[::-1]


def q_sample(z0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, abar: torch.Tensor) -> torch.Tensor:
    """z_t = √ᾱ_t z_0 + √(1−ᾱ_t) ε, per row at timestep t (the forward process)."""
    a = abar[t].unsqueeze(-1)
    return a.sqrt() * z0 + (1 - a).sqrt() * noise


def ddim_step(z_t: torch.Tensor, eps: torch.Tensor, a_t: float, a_prev: float) -> torch.Tensor:
    """One deterministic DDIM step (η = 0): predict z_0 from ε, then re-noise it to level ᾱ_prev."""
    z0 = (z_t - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
    return math.sqrt(a_prev) * z0 + math.sqrt(1 - a_prev) * eps


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal features of the timestep (as in DDPM and the reference's ``timestep_embedding``)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float().unsqueeze(-1) * freqs
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class EpsNet(nn.Module):
    """ε_θ(z_t, t, c): ``layers`` linear layers, the first ``layers − 1`` with LayerNorm, SiLU, dropout."""

    def __init__(
        self,
        target_dim: int,
        cond_dim: int,
        *,
        hidden: int = 2048,
        layers: int = 10,
        dropout: float = 0.1,
        time_dim: int = 64,
    ) -> None:
        super().__init__()
        if layers < 2:
            raise ValueError(f"EpsNet needs at least 2 layers, got {layers}")
        self.time_dim = time_dim
        self.time = nn.Sequential(nn.Linear(time_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.cond = nn.Sequential(nn.Linear(cond_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.null = nn.Parameter(torch.zeros(hidden))
        widths = [target_dim] + [hidden + target_dim] * (layers - 1)
        self.linear = nn.ModuleList(nn.Linear(w, hidden) for w in widths[:-1])
        self.out = nn.Linear(widths[-1], target_dim)
        self.scale = nn.ModuleList(nn.Sequential(nn.SiLU(), nn.Linear(hidden, hidden)) for _ in widths[:-1])
        self.shift = nn.ModuleList(nn.Sequential(nn.SiLU(), nn.Linear(hidden, hidden)) for _ in widths[:-1])
        self.norm = nn.ModuleList(nn.LayerNorm(hidden) for _ in widths[:-1])
        self.act = nn.SiLU()
        self.drop = nn.Dropout(dropout)

    def forward(
        self, z_t: torch.Tensor, t: torch.Tensor, c: torch.Tensor, uncond: torch.Tensor
    ) -> torch.Tensor:
        """ε for each row; rows where ``uncond`` is True ignore ``c`` and see the null embedding ∅."""
        temb = self.time(timestep_embedding(t, self.time_dim))
        cond = self.cond(c)
        cemb = torch.where(uncond.unsqueeze(-1), self.null.to(cond.dtype), cond)
        h = z_t
        for i, linear in enumerate(self.linear):
            h = linear(h if i == 0 else torch.cat([h, z_t], dim=-1))
            h = h * (1 + self.scale[i](temb)) + self.shift[i](cemb)
            h = self.drop(self.act(self.norm[i](h)))
        return self.out(torch.cat([h, z_t], dim=-1))


def guided_eps(
    net: EpsNet,
    z_t: torch.Tensor,
    t: int,
    c: torch.Tensor,
    omega: float | None,
    autocast: Autocast = None,
) -> torch.Tensor:
    """ε̃ = (1+ω) ε_θ(z_t,t,c) − ω ε_θ(z_t,t,∅) (Eq. 4), in float32; ``omega=None`` is unguided.

    The conditional and unconditional passes run as one batch of 2B rows.
    """
    n = z_t.shape[0]
    guided = omega is not None
    z_in = torch.cat([z_t, z_t]) if guided else z_t
    c_in = torch.cat([c, c]) if guided else c
    uncond = torch.zeros(z_in.shape[0], dtype=torch.bool, device=z_t.device)
    if guided:
        uncond[n:] = True
    steps = torch.full((z_in.shape[0],), t, dtype=torch.long, device=z_t.device)
    with autocast() if autocast is not None else nullcontext():
        eps = net(z_in, steps, c_in, uncond)
    eps = eps.float()
    if not guided:
        return eps
    return (1 + omega) * eps[:n] - omega * eps[n:]


def ddim_sample(
    net: EpsNet,
    c: torch.Tensor,
    noise: torch.Tensor,
    abar: torch.Tensor,
    steps: int,
    omega: float | None,
    autocast: Autocast = None,
) -> torch.Tensor:
    """z_0 from z_T = ``noise`` by ``steps`` deterministic DDIM steps with guidance ω at every step."""
    z = noise.float()
    schedule = ddim_timesteps(abar.shape[0], steps)
    levels = abar.tolist()
    for i, t in enumerate(schedule):
        a_prev = levels[schedule[i + 1]] if i + 1 < len(schedule) else 1.0
        z = ddim_step(z, guided_eps(net, z, t, c, omega, autocast), levels[t], a_prev)
    return z
