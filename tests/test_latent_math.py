"""The common latent space's maths (``augpipe.methods.latent``, METHODS §2.2-a) on tiny CPU arrays: the
SupCon loss against a numpy evaluation written out here, the heads, the scalers, the corpus and epoch
losses, the optimiser and its schedule, and ``train_heads``'s seeding and step budget."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from augpipe.methods.latent import (
    HeadsConfig,
    _epoch,
    _optimizer,
    corpus_loss,
    pair_loss,
    projection_head,
    scaler,
    supcon_loss,
    train_heads,
)


def unit_rows(shape, seed):
    f = np.random.default_rng(seed).normal(size=shape)
    return f / np.linalg.norm(f, axis=-1, keepdims=True)


def numpy_supcon(f, labels, tau, base):
    """``losses.py`` (contrast_mode all) one anchor at a time: views stacked view-major, self left out of
    the denominator, positives = other views of the sample (or every same-label embedding)."""
    batch, views = f.shape[:2]
    flat = np.concatenate([f[:, v] for v in range(views)]).astype(np.float64)
    ids = np.tile(np.arange(batch), views)
    y = ids if labels is None else np.asarray(labels)[ids]
    logits = flat @ flat.T / tau
    losses = []
    for a in range(len(flat)):
        others = [b for b in range(len(flat)) if b != a]
        top = logits[a, others].max()
        log_den = top + np.log(np.exp(logits[a, others] - top).sum())
        pos = [b for b in others if y[b] == y[a]]
        losses.append(-(tau / base) * np.mean([logits[a, b] - log_den for b in pos]))
    return float(np.mean(losses))


def linear_heads(d_s, d_t, dim, seed=0):
    """Fixed one-layer heads (hidden 0), so a test can project with numpy."""
    torch.manual_seed(seed)
    return {
        "student": projection_head(d_s, 0, dim).double(),
        "teacher": projection_head(d_t, 0, dim).double(),
    }


def project(head, x):
    return x @ head.weight.detach().numpy().T + head.bias.detach().numpy()


def numpy_pair_loss(heads, xs, xt, labels, rows, tau, base):
    zs = project(heads["student"], xs[rows])
    zt = project(heads["teacher"], xt[rows])
    f = np.stack(
        [zs / np.linalg.norm(zs, axis=1, keepdims=True), zt / np.linalg.norm(zt, axis=1, keepdims=True)], 1
    )
    return numpy_supcon(f, None if labels is None else labels[rows], tau, base)


# ---------------------------------------------------------------------------------------------- loss


@pytest.mark.parametrize("tau, base", [(0.5, 0.07), (0.1, 0.07), (1.0, 0.2), (0.3, 0.5)])
@pytest.mark.parametrize("labels", [None, [0, 0, 1, 2, 1]])
@pytest.mark.parametrize("views", [2, 3])
def test_supcon_loss_matches_numpy(tau, base, labels, views):
    f = unit_rows((5, views, 4), seed=views)
    got = supcon_loss(
        torch.tensor(f),
        None if labels is None else torch.tensor(labels),
        temperature=tau,
        base_temperature=base,
    )
    assert got.shape == () and got.dtype == torch.float64
    assert float(got) == pytest.approx(numpy_supcon(f, labels, tau, base), rel=1e-10)


@pytest.mark.parametrize("labels", [None, [1, 0, 1, 1]])
def test_supcon_loss_defaults_are_the_reference_tau_half_and_base_0_07(labels):
    f = unit_rows((4, 2, 3), seed=1)
    got = supcon_loss(torch.tensor(f), None if labels is None else torch.tensor(labels))
    assert float(got) == pytest.approx(numpy_supcon(f, labels, 0.5, 0.07), rel=1e-10)


def test_supcon_loss_is_stable_at_a_small_temperature():
    """Logits of 1/τ = 100 overflow exp in float32 unless each row's maximum is subtracted first."""
    f = unit_rows((6, 2, 5), seed=2).astype(np.float32)
    for labels in (None, [0, 1, 0, 1, 2, 2]):
        got = supcon_loss(
            torch.from_numpy(f), None if labels is None else torch.tensor(labels), temperature=0.01
        )
        assert got.dtype == torch.float32 and torch.isfinite(got)
        assert float(got) == pytest.approx(numpy_supcon(f, labels, 0.01, 0.07), rel=1e-4)


def test_supcon_loss_ignores_sample_order_and_view_order():
    f = unit_rows((5, 2, 4), seed=3)
    labels = np.array([2, 0, 2, 1, 0])
    loss = float(supcon_loss(torch.tensor(f), torch.tensor(labels)))
    perm = np.array([3, 0, 4, 2, 1])
    assert float(supcon_loss(torch.tensor(f[perm]), torch.tensor(labels[perm]))) == pytest.approx(loss)
    assert float(supcon_loss(torch.tensor(f[:, ::-1].copy()), torch.tensor(labels))) == pytest.approx(loss)
    # Labels that are all distinct are SimCLR.
    simclr = float(supcon_loss(torch.tensor(f)))
    assert float(supcon_loss(torch.tensor(f), torch.arange(5))) == pytest.approx(simclr)


# --------------------------------------------------------------------------------------- heads, scaler


def test_projection_head_is_one_linear_layer_without_hidden_and_an_mlp_with_it():
    x = torch.tensor(np.random.default_rng(4).normal(size=(6, 5)))
    single = projection_head(5, 0, 3).double()
    assert isinstance(single, nn.Linear) and (single.in_features, single.out_features) == (5, 3)
    assert single(x).shape == (6, 3)

    mlp = projection_head(5, 7, 3).double()
    shapes = {name: tuple(p.shape) for name, p in mlp.state_dict().items()}
    assert shapes == {"0.weight": (7, 5), "0.bias": (7,), "2.weight": (3, 7), "2.bias": (3,)}
    w1, b1, w2, b2 = (p.detach().numpy() for p in mlp.parameters())
    expected = np.maximum(x.numpy() @ w1.T + b1, 0.0) @ w2.T + b2  # Linear → ReLU → Linear
    np.testing.assert_allclose(mlp(x).detach().numpy(), expected, rtol=1e-12)


def test_scaler_is_identity_when_off_and_per_column_mean_std_when_on():
    x = np.array([[1.0, 5.0, -2.0], [3.0, 5.0, 0.0], [2.0, 5.0, 8.0], [6.0, 5.0, 2.0]], np.float32)
    mean, std = scaler(x, False)
    assert mean.dtype == np.float32 and std.dtype == np.float32
    np.testing.assert_array_equal(mean, np.zeros(3))
    np.testing.assert_array_equal(std, np.ones(3))

    mean, std = scaler(x, True)
    assert mean.dtype == np.float32 and std.dtype == np.float32
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(mean, x64.mean(axis=0), rtol=1e-6)
    # The constant column (5.0) is only centred: its std is 1, not 0.
    np.testing.assert_allclose(std, [x64[:, 0].std(), 1.0, x64[:, 2].std()], rtol=1e-6)


# ------------------------------------------------------------------------------ pair and corpus losses


@pytest.mark.parametrize("supervised", [False, True])
def test_pair_loss_is_supcon_of_both_heads_normalised_projections_at_the_configured_temperatures(supervised):
    rng = np.random.default_rng(5)
    xs, xt = rng.normal(size=(6, 4)), rng.normal(size=(6, 3))
    labels = np.array([0, 1, 0, 1, 1, 2]) if supervised else None
    heads = linear_heads(4, 3, 5)
    config = HeadsConfig(temperature=0.2, base_temperature=0.3)
    rows = np.array([4, 0, 2, 5])
    got = pair_loss(
        heads,
        torch.tensor(xs),
        torch.tensor(xt),
        None if labels is None else torch.tensor(labels),
        torch.tensor(rows),
        config,
    )
    assert float(got.detach()) == pytest.approx(
        numpy_pair_loss(heads, xs, xt, labels, rows, 0.2, 0.3), rel=1e-10
    )


@pytest.mark.parametrize("n", [10, 9])
def test_corpus_loss_is_the_batch_size_weighted_mean_in_row_order(n):
    """10 rows in batches of 4: 4 + 4 + 2; with 9 the lone last row (no negative) is left out."""
    rng = np.random.default_rng(6)
    xs, xt = rng.normal(size=(n, 4)), rng.normal(size=(n, 3))
    labels = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 0])[:n]
    heads = linear_heads(4, 3, 5)
    config = HeadsConfig(temperature=0.4, base_temperature=0.1, batch_size=4)
    batches = [np.arange(a, min(a + 4, n)) for a in range(0, n, 4) if n - a >= 2]
    for lab in (None, labels):
        expected = sum(len(b) * numpy_pair_loss(heads, xs, xt, lab, b, 0.4, 0.1) for b in batches) / sum(
            len(b) for b in batches
        )
        got = corpus_loss(
            heads, torch.tensor(xs), torch.tensor(xt), None if lab is None else torch.tensor(lab), config
        )
        assert isinstance(got, float) and got == pytest.approx(expected, rel=1e-10)


def test_epoch_loss_is_the_weighted_mean_of_its_batches_and_stops_at_the_budget():
    """With lr 0 the heads do not move, so each step's loss is that of the fixed heads on its batch."""
    rng = np.random.default_rng(7)
    xs, xt = rng.normal(size=(10, 4)), rng.normal(size=(10, 3))
    labels = np.array([0, 1, 1, 0, 2, 2, 0, 1, 2, 0])
    heads = linear_heads(4, 3, 5)
    config = HeadsConfig(temperature=0.4, base_temperature=0.1, batch_size=4, lr=0.0)
    order = torch.tensor([3, 8, 1, 0, 9, 6, 2, 5, 7, 4])
    data = (torch.tensor(xs), torch.tensor(xt), torch.tensor(labels))
    batches = [order.numpy()[a : a + 4] for a in (0, 4, 8)]
    losses = [numpy_pair_loss(heads, xs, xt, labels, b, 0.4, 0.1) for b in batches]
    params = [p for h in heads.values() for p in h.parameters()]

    opt, sched, _ = _optimizer(params, 10, config)
    loss, steps = _epoch(heads, data, opt, sched, order, config, 100)
    assert steps == 3 and loss == pytest.approx(
        (4 * losses[0] + 4 * losses[1] + 2 * losses[2]) / 10, rel=1e-10
    )
    opt, sched, _ = _optimizer(params, 10, config)
    loss, steps = _epoch(heads, data, opt, sched, order, config, 2)
    assert steps == 2 and loss == pytest.approx((losses[0] + losses[1]) / 2, rel=1e-10)


# ----------------------------------------------------------------------------------- optimiser, training


def test_optimizer_uses_the_configured_settings_and_anneals_to_a_hundredth_of_lr():
    params = [nn.Parameter(torch.zeros(3))]
    sgd = HeadsConfig(lr=0.05, momentum=0.8, weight_decay=3e-3, epochs=4, batch_size=4, max_steps=None)
    opt, sched, total = _optimizer(params, 9, sgd)  # 9 rows in 4s: two steps an epoch (a lone row is none)
    group = opt.param_groups[0]
    assert type(opt) is torch.optim.SGD and total == 8
    assert (group["lr"], group["momentum"], group["weight_decay"]) == (0.05, 0.8, 3e-3)
    for _ in range(total):
        opt.step()
        sched.step()
    assert group["lr"] == pytest.approx(0.05 / 100, rel=1e-9)

    adam = HeadsConfig(optimizer="adam", lr=0.02, weight_decay=2e-3, epochs=4, batch_size=4, max_steps=5)
    opt, sched, total = _optimizer(params, 9, adam)
    group = opt.param_groups[0]
    assert type(opt) is torch.optim.Adam and total == 5
    assert (group["lr"], group["weight_decay"]) == (0.02, 2e-3)
    for _ in range(total):
        opt.step()
        sched.step()
    assert group["lr"] == pytest.approx(0.02 / 100, rel=1e-9)


def small_data(n=10, seed=8):
    rng = np.random.default_rng(seed)
    return (
        rng.normal(size=(n, 4)).astype(np.float32),
        rng.normal(size=(n, 3)).astype(np.float32),
        np.arange(n, dtype=np.int64) % 3,
    )


SMALL = HeadsConfig(dim=4, hidden=6, epochs=5, batch_size=4, lr=0.05, max_steps=None)


def weights(trained):
    return {f"{side}.{k}": v.clone() for side, h in trained.heads.items() for k, v in h.state_dict().items()}


def same_fit(a, b):
    wa, wb = weights(a), weights(b)
    return (a.steps, a.initial_loss, a.final_loss, a.epoch_losses) == (
        b.steps,
        b.initial_loss,
        b.final_loss,
        b.epoch_losses,
    ) and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_train_heads_is_deterministic_per_seed_and_leaves_the_callers_rng_alone():
    xs, xt, labels = small_data()
    state = torch.get_rng_state()
    fits = {seed: train_heads(xs, xt, labels, SMALL, seed, "cpu") for seed in (1, 2, 3)}
    assert torch.equal(torch.get_rng_state(), state)
    assert same_fit(fits[1], train_heads(xs, xt, labels, SMALL, 1, "cpu"))
    # The loss before training reads only the initial heads: each seed has its own.
    assert len({fit.initial_loss for fit in fits.values()}) == 3
    fit = fits[1]
    assert all(not h.training for h in fit.heads.values())
    assert fit.final_loss < fit.initial_loss


def test_train_heads_accepts_any_integer_seed():
    """The stage's ``seed`` setting is any int, negative or past 2**64: it is taken modulo 2**63, so s and
    s + 2**63 (and −1 and 2**63 − 1) are the same seed."""
    xs, xt, labels = small_data()
    config = HeadsConfig(dim=4, hidden=6, epochs=2, batch_size=4, max_steps=None)
    for small, large in ((5, 5 + 2**63), (2**63 - 1, -1), (7, 7 + 2**65)):
        assert same_fit(
            train_heads(xs, xt, labels, config, small, "cpu"),
            train_heads(xs, xt, labels, config, large, "cpu"),
        )


def test_train_heads_stops_at_max_steps_and_skips_lone_rows():
    xs, xt, labels = small_data()
    capped = train_heads(xs, xt, labels, HeadsConfig(**{**SMALL.__dict__, "max_steps": 7}), 0, "cpu")
    assert capped.steps == 7 and len(capped.epoch_losses) == 3  # 3 steps an epoch: 3 + 3 + 1
    assert all(isinstance(v, float) and np.isfinite(v) for v in capped.epoch_losses)
    full = train_heads(xs, xt, labels, SMALL, 0, "cpu")
    assert full.steps == 15 and len(full.epoch_losses) == 5
    # 9 rows in 4s: the lone ninth row is not a step, so an epoch is 2 steps.
    lone = train_heads(xs[:9], xt[:9], labels[:9], HeadsConfig(**{**SMALL.__dict__, "epochs": 3}), 0, "cpu")
    assert lone.steps == 6 and len(lone.epoch_losses) == 3


def test_train_heads_reports_supervised_losses_when_given_labels():
    """With lr 0 and one batch the heads never move: every reported loss is the supervised corpus loss."""
    xs, xt, labels = small_data()
    config = HeadsConfig(dim=4, hidden=6, epochs=2, batch_size=16, lr=0.0, max_steps=None)
    fit = train_heads(xs, xt, labels, config, 4, "cpu")
    supervised = corpus_loss(
        fit.heads, torch.from_numpy(xs), torch.from_numpy(xt), torch.from_numpy(labels), config
    )
    unsupervised = corpus_loss(fit.heads, torch.from_numpy(xs), torch.from_numpy(xt), None, config)
    assert supervised != pytest.approx(unsupervised)
    for value in (fit.initial_loss, fit.final_loss, *fit.epoch_losses):
        assert value == pytest.approx(supervised, rel=1e-5)


def partitions_seen(seed):
    """Which split of 4 rows into two training pairs each epoch used, read back from the epoch losses (lr 0
    keeps the returned heads the ones every step saw)."""
    xs, xt, _ = small_data(n=4, seed=9)
    config = HeadsConfig(dim=3, hidden=0, epochs=8, batch_size=2, lr=0.0, max_steps=None)
    fit = train_heads(xs, xt, None, config, seed, "cpu")
    splits = [((0, 1), (2, 3)), ((0, 2), (1, 3)), ((0, 3), (1, 2))]
    means = []
    for split in splits:
        values = [
            float(
                pair_loss(
                    fit.heads, torch.from_numpy(xs), torch.from_numpy(xt), None, torch.tensor(p), config
                ).detach()
            )
            for p in split
        ]
        means.append(sum(values) / 2)
    assert min(abs(a - b) for i, a in enumerate(means) for b in means[i + 1 :]) > 1e-4
    return [int(np.argmin([abs(loss - m) for m in means])) for loss in fit.epoch_losses]


def test_the_seed_also_drives_the_shuffle():
    """Two seeds must not share their epochs' batches (only the heads' init would then depend on the seed)."""
    assert partitions_seen(1) == partitions_seen(1)
    assert partitions_seen(1) != partitions_seen(3)
    assert partitions_seen(2) != partitions_seen(4)
