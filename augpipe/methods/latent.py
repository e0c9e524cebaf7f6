"""CMDA's common latent space (METHODS §2.2-a) in pure torch: the SupCon pair loss and the heads' training.

Two projection heads, g_s (student features) and g_t (teacher features), map into one space and are
trained with SupCon/SimCLR on the stacked pair ``[g_s(x̂_i), g_t(x_i^t)]`` of L2-normalised projections
(see ``supcon_loss``). ``train_heads`` takes standardised feature arrays and returns the trained heads
with the loss before, during and after training; the ``latent_space`` stage only feeds it columns and
saves what it returns. Everything is seeded, so a fit is reproducible on CPU.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class HeadsConfig:
    """The heads' shape, the loss's temperatures and the optimiser (the stage's settings of the same name)."""

    dim: int = 128
    hidden: int = 512
    temperature: float = 0.5
    base_temperature: float = 0.07
    epochs: int = 100
    max_steps: int | None = 2000
    """Stop after this many optimiser steps when that comes before ``epochs`` (None: every epoch)."""
    lr: float = 0.01
    optimizer: Literal["sgd", "adam"] = "sgd"
    momentum: float = 0.9
    weight_decay: float = 1e-4
    batch_size: int = 128


@dataclass
class TrainedHeads:
    """Both heads (in eval mode), the optimiser steps taken, and the corpus loss before and after training
    and per epoch (the last epoch may be cut short by ``max_steps``)."""

    heads: dict[str, nn.Module]
    steps: int
    initial_loss: float
    final_loss: float
    epoch_losses: list[float] = field(default_factory=list)


def supcon_loss(
    features: Any, labels: Any | None = None, *, temperature: float = 0.5, base_temperature: float = 0.07
) -> Any:
    """SupCon (``losses.py``, contrast_mode "all") on ``features`` (B, views, d), rows L2-normalised.

    ``labels`` None is SimCLR: the positives of view v of sample i are its other views. With labels,
    every view of every same-label sample is a positive. Self-contrast is masked out; the denominator
    holds all other B·views − 1 embeddings. Every anchor has a positive (its other view), so the mean
    over positives is always defined.
    """
    batch, views = features.shape[0], features.shape[1]
    if labels is None:
        mask = torch.eye(batch, dtype=features.dtype, device=features.device)
    else:
        labels = labels.reshape(-1, 1)
        mask = (labels == labels.T).to(features.dtype)
    contrast = torch.cat(torch.unbind(features, dim=1), dim=0)
    logits = contrast @ contrast.T / temperature
    logits = logits - logits.max(dim=1, keepdim=True).values.detach()
    mask = mask.repeat(views, views)
    not_self = 1.0 - torch.eye(batch * views, dtype=features.dtype, device=features.device)
    mask = mask * not_self
    log_prob = logits - torch.log((torch.exp(logits) * not_self).sum(dim=1, keepdim=True))
    mean_log_prob_pos = (mask * log_prob).sum(dim=1) / mask.sum(dim=1)
    return -(temperature / base_temperature) * mean_log_prob_pos.mean()


def projection_head(in_dim: int, hidden: int, dim: int) -> nn.Module:
    """Linear → ReLU → Linear, or one Linear layer when ``hidden`` is 0."""
    if hidden == 0:
        return nn.Linear(in_dim, dim)
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, dim))


def scaler(x: np.ndarray, standardize: bool) -> tuple[np.ndarray, np.ndarray]:
    """(mean, std) per feature; identity when off. A constant feature keeps std 1 (it is only centred)."""
    if not standardize:
        return np.zeros(x.shape[1], np.float32), np.ones(x.shape[1], np.float32)
    std = x.std(axis=0)
    return x.mean(axis=0).astype(np.float32), np.where(std < 1e-6, 1.0, std).astype(np.float32)


def pair_loss(
    heads: dict[str, nn.Module], xs: Any, xt: Any, labels: Any, idx: Any, config: HeadsConfig
) -> Any:
    """The SupCon loss of the pairs ``idx``: both heads' normalised projections, stacked as two views."""
    zs = F.normalize(heads["student"](xs[idx]), dim=1)
    zt = F.normalize(heads["teacher"](xt[idx]), dim=1)
    return supcon_loss(
        torch.stack([zs, zt], dim=1),
        None if labels is None else labels[idx],
        temperature=config.temperature,
        base_temperature=config.base_temperature,
    )


def corpus_loss(heads: dict[str, nn.Module], xs: Any, xt: Any, labels: Any, config: HeadsConfig) -> float:
    """Mean per-batch loss over the corpus in row order (no gradients), batch-size weighted."""
    order = torch.arange(xs.shape[0], device=xs.device)
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(order), config.batch_size):
            idx = order[start : start + config.batch_size]
            if len(idx) < 2:
                continue
            total += float(pair_loss(heads, xs, xt, labels, idx, config)) * len(idx)
            count += len(idx)
    return total / max(count, 1)


def _optimizer(params: list[Any], n: int, config: HeadsConfig) -> tuple[Any, Any, int]:
    """The optimiser, its cosine schedule to lr/100 over every step of training, and how many steps
    that is (every epoch's, or ``max_steps`` when fewer)."""
    c = config
    if c.optimizer == "sgd":
        opt: Any = torch.optim.SGD(params, lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay)
    else:
        opt = torch.optim.Adam(params, lr=c.lr, weight_decay=c.weight_decay)
    steps_per_epoch = max(1, sum(1 for a in range(0, n, c.batch_size) if n - a >= 2))
    total = c.epochs * steps_per_epoch
    if c.max_steps is not None:
        total = min(total, c.max_steps)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total, eta_min=c.lr / 100)
    return opt, sched, total


def _epoch(
    heads: dict[str, nn.Module],
    data: tuple[Any, Any, Any],
    opt: Any,
    sched: Any,
    order: Any,
    config: HeadsConfig,
    budget: int,
) -> tuple[float, int]:
    """One pass over the corpus in ``order``, of at most ``budget`` steps: the batch-size weighted mean
    training loss and the steps taken."""
    xs, xt, labels = data
    total, count, steps = 0.0, 0, 0
    for start in range(0, len(order), config.batch_size):
        idx = order[start : start + config.batch_size].to(xs.device)
        if len(idx) < 2:  # a lone pair has no negative: its loss is 0 and teaches nothing
            continue
        if steps == budget:
            break
        steps += 1
        loss = pair_loss(heads, xs, xt, labels, idx, config)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        total += float(loss.detach()) * len(idx)
        count += len(idx)
    return total / max(count, 1), steps


def train_heads(
    xs_np: np.ndarray,
    xt_np: np.ndarray,
    labels_np: np.ndarray | None,
    config: HeadsConfig,
    seed: int,
    device: str,
) -> TrainedHeads:
    """Train g_s on ``xs_np`` and g_t on ``xt_np`` (rows paired, standardised) with SupCon.

    ``seed`` initialises the heads (inside a forked RNG, so the caller's torch state is untouched) and
    shuffles every epoch; ``labels_np`` (class indices) makes the loss supervised. Training runs every
    epoch, or stops after ``config.max_steps`` steps when that comes first.
    """
    with torch.random.fork_rng(devices=[]):  # the heads are built on the CPU, then moved to ``device``
        torch.random.default_generator.manual_seed(seed % 2**63)  # torch.manual_seed would reseed CUDA too
        heads = {
            "student": projection_head(xs_np.shape[1], config.hidden, config.dim).to(device),
            "teacher": projection_head(xt_np.shape[1], config.hidden, config.dim).to(device),
        }
    xs = torch.from_numpy(xs_np).to(device)
    xt = torch.from_numpy(xt_np).to(device)
    labels = None if labels_np is None else torch.from_numpy(labels_np).to(device)
    n = xs_np.shape[0]
    opt, sched, total = _optimizer([p for h in heads.values() for p in h.parameters()], n, config)
    gen = torch.Generator().manual_seed(seed % 2**63)
    initial = corpus_loss(heads, xs, xt, labels, config)
    epoch_losses: list[float] = []
    steps = 0
    while steps < total:
        order = torch.randperm(n, generator=gen)
        loss, taken = _epoch(heads, (xs, xt, labels), opt, sched, order, config, total - steps)
        epoch_losses.append(loss)
        steps += taken
    for h in heads.values():
        h.eval()
    final = corpus_loss(heads, xs, xt, labels, config)
    return TrainedHeads(heads, steps, initial, final, epoch_losses)
