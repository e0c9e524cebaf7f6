"""Modality translation's maths (METHODS §3) on small random models: the DDIM step and sampler,
classifier-free guidance at every step, ẑ = cM + γ·Normalize(CDIM(c)) and the Eq. 9 loss."""

from __future__ import annotations

import math
import re

import pytest
import torch

from augpipe.methods import cdim
from augpipe.methods.translation import (
    TrainConfig,
    Translator,
    TranslatorShape,
    build,
    holdout_split,
    normalize_rows,
    row_noise,
    translate,
    translation_loss,
)

SHAPE = TranslatorShape(cond_dim=6, target_dim=5, hidden=16, layers=3, dropout=0.0, timesteps=100)


@pytest.fixture()
def net() -> cdim.EpsNet:
    torch.manual_seed(0)
    model = cdim.EpsNet(5, 6, hidden=16, layers=3, dropout=0.0)
    with torch.no_grad():  # a non-zero null embedding, so the unconditional branch differs
        model.null.normal_()
    return model.eval()


def test_schedule_is_the_reference_constant_beta():
    abar = cdim.alphas_bar(1000, 0.008)
    assert abar[0].item() == pytest.approx(0.992)
    assert abar[-1].item() == pytest.approx(0.992**1000, rel=1e-4)
    assert cdim.ddim_timesteps(1000, 50)[:3] == [980, 960, 940] and cdim.ddim_timesteps(1000, 50)[-1] == 0
    with pytest.raises(ValueError, match="DDIM steps"):
        cdim.ddim_timesteps(10, 11)


def test_ddim_step_with_the_true_noise_inverts_forward_noising():
    abar = cdim.alphas_bar(100, 0.008)
    z0, eps = torch.randn(4, 5), torch.randn(4, 5)
    t = torch.tensor([70, 70, 70, 70])
    z_t = cdim.q_sample(z0, t, eps, abar)
    a_t = abar[70].item()
    torch.testing.assert_close(z_t, math.sqrt(a_t) * z0 + math.sqrt(1 - a_t) * eps)
    torch.testing.assert_close(cdim.ddim_step(z_t, eps, a_t, 1.0), z0, atol=1e-5, rtol=1e-5)
    a_prev = abar[30].item()  # to an intermediate level: the same z0, re-noised with the same eps
    expected = math.sqrt(a_prev) * z0 + math.sqrt(1 - a_prev) * eps
    torch.testing.assert_close(cdim.ddim_step(z_t, eps, a_t, a_prev), expected, atol=1e-5, rtol=1e-5)


def test_guidance_is_eq4_at_every_step(net):
    c, z = torch.randn(3, 6), torch.randn(3, 5)
    steps = torch.full((3,), 40)
    cond = net(z, steps, c, torch.zeros(3, dtype=torch.bool))
    uncond = net(z, steps, c, torch.ones(3, dtype=torch.bool))
    assert not torch.allclose(cond, uncond)
    torch.testing.assert_close(cdim.guided_eps(net, z, 40, c, 5.0), 6.0 * cond - 5.0 * uncond)

    abar = cdim.alphas_bar(100, 0.008)
    noise = torch.randn(3, 5)
    by_hand = noise.clone()  # the sampler, written out: guidance applied to ε before every step
    schedule = cdim.ddim_timesteps(100, 4)
    for i, t in enumerate(schedule):
        prev = abar[schedule[i + 1]].item() if i + 1 < len(schedule) else 1.0
        by_hand = cdim.ddim_step(by_hand, cdim.guided_eps(net, by_hand, t, c, 2.0), abar[t].item(), prev)
    torch.testing.assert_close(cdim.ddim_sample(net, c, noise, abar, 4, 2.0), by_hand)


def test_cfg_with_omega_zero_equals_the_unguided_sampler(net):
    abar = cdim.alphas_bar(100, 0.008)
    c, noise = torch.randn(7, 6), torch.randn(7, 5)
    with torch.no_grad():
        unguided = cdim.ddim_sample(net, c, noise, abar, 10, None)
        zero = cdim.ddim_sample(net, c, noise, abar, 10, 0.0)
        guided = cdim.ddim_sample(net, c, noise, abar, 10, 5.0)
    torch.testing.assert_close(zero, unguided, atol=1e-6, rtol=1e-6)
    assert (guided - unguided).abs().max() > 1e-3, "ω = 5 must change the sample"


def test_translation_is_cm_plus_gamma_times_the_row_normalised_sample():
    model = build(SHAPE, gamma=0.7, seed=1, device="cpu").eval()
    assert model.projection is not None and model.projection.bias is not None, (
        "M has a bias (P: 1 FC with bias)"
    )
    c, noise = torch.randn(6, 6), torch.randn(6, 5)
    with torch.no_grad():
        sample = model.cdim(c, noise, 5, 5.0)
        z_hat = model(c, noise, 5, 5.0)
        by_rows = torch.cat([model(c[i : i + 1], noise[i : i + 1], 5, 5.0) for i in range(6)])
    torch.testing.assert_close(z_hat, model.projection(c) + 0.7 * sample / sample.norm(dim=1, keepdim=True))
    torch.testing.assert_close(by_rows, z_hat, atol=1e-5, rtol=1e-5)  # per-row Normalize, not per batch
    torch.testing.assert_close(normalize_rows(sample).norm(dim=1), torch.ones(6))


def test_ablations_drop_one_term_each():
    c, noise = torch.randn(4, 6), torch.randn(4, 5)
    no_m = build(TranslatorShape(**{**vars(SHAPE), "projection": False}), 1.0, 1, "cpu").eval()
    no_ddim = build(TranslatorShape(**{**vars(SHAPE), "ddim": False}), 1.0, 1, "cpu").eval()
    with torch.no_grad():
        torch.testing.assert_close(no_m(c, noise, 5, 5.0).norm(dim=1), torch.ones(4))
        torch.testing.assert_close(no_ddim(c, noise, 5, 5.0), no_ddim.projection(c))
    with pytest.raises(ValueError, match="needs the projection"):
        Translator(TranslatorShape(6, 5, projection=False, ddim=False))


def test_loss_is_l1_plus_two_times_the_ddim_mse():
    model = build(SHAPE, 1.0, 2, "cpu")
    model.set_scalers(torch.randn(32, 6), torch.randn(32, 5))
    gen = torch.Generator().manual_seed(0)
    draws = {
        "z_T": torch.randn(8, 5, generator=gen),
        "t": torch.randint(0, 100, (8,), generator=gen),
        "eps": torch.randn(8, 5, generator=gen),
        "uncond": torch.tensor([True] + [False] * 7),
    }
    c, z = torch.randn(8, 6), torch.randn(8, 5)
    config = TrainConfig(steps=3, omega=5.0)
    terms = translation_loss(model.eval(), c, z, draws, config)
    assert (config.lambda_l1, config.lambda_ddim) == (1.0, 2.0)
    torch.testing.assert_close(terms["total"], terms["l1"] + 2.0 * terms["ddim"])
    z_hat = model(c, draws["z_T"], 3, 5.0)
    torch.testing.assert_close(terms["l1"], (z - z_hat).abs().mean())
    terms["total"].backward()  # the L1 term reaches the ε-network through the sampler
    assert model.eps_net is not None and model.eps_net.out.weight.grad is not None
    assert model.projection.weight.grad.abs().sum() > 0


def test_the_ddim_loss_noises_the_z_scored_target_and_conditions_on_the_z_scored_source():
    """Eq. 9's MSE term, with scalers far from (0, 1): the target is z-scored before noising, the
    condition z-scored before the ε-network, and ∅ replaces it on ``uncond`` rows."""
    model = build(SHAPE, 1.0, 2, "cpu").eval()
    gen = torch.Generator().manual_seed(1)
    c_train = 3.0 * torch.randn(64, 6, generator=gen) + 2.0
    z_train = 0.5 * torch.randn(64, 5, generator=gen) - 4.0
    model.set_scalers(c_train, z_train)
    c, z = c_train[:8], z_train[:8]
    draws = {
        "t": torch.randint(0, 100, (8,), generator=gen),
        "eps": torch.randn(8, 5, generator=gen),
        "uncond": torch.tensor([True, False] * 4),
    }
    z0 = (z - z_train.mean(0)) / z_train.std(0)
    a = model.abar[draws["t"]].unsqueeze(-1)
    z_t = a.sqrt() * z0 + (1 - a).sqrt() * draws["eps"]
    cond = (c - c_train.mean(0)) / c_train.std(0)
    with torch.no_grad():
        predicted = model.eps_net(z_t, draws["t"], cond, draws["uncond"])
        expected = ((predicted - draws["eps"]) ** 2).mean()
        torch.testing.assert_close(model.eps_loss(c, z, draws), expected)
        config = TrainConfig(steps=3, omega=5.0)
        terms = translation_loss(model, c, z, {**draws, "z_T": torch.randn(8, 5, generator=gen)}, config)
        torch.testing.assert_close(terms["ddim"], expected)


def test_row_noise_and_split_are_seeded():
    torch.testing.assert_close(row_noise([5, 9], 4)[1], row_noise([9], 4)[0])
    assert not torch.equal(row_noise([5], 4), row_noise([6], 4))
    train, held = holdout_split(50, 0.2, seed=3)
    assert len(held) == 10 and sorted([*train, *held]) == list(range(50))
    assert holdout_split(50, 0.2, seed=3)[1].tolist() == held.tolist()
    assert len(holdout_split(2, 0.01, seed=0)[1]) == 1 and len(holdout_split(2, 0.0, seed=0)[1]) == 0


def test_translate_guidance_zero_runs_the_unguided_path():
    model = build(SHAPE, 1.0, 4, "cpu")
    c, noise = torch.randn(5, 6), torch.randn(5, 5)
    with torch.no_grad():
        direct = model.eval()(c, noise, 6, None)
    torch.testing.assert_close(translate(model, c, noise, 6, 0.0), direct)


def test_holdout_split_holds_out_at_least_one_row_and_never_all():
    from augpipe.methods.translation import holdout_split

    train, held = holdout_split(2, 0.9, seed=0)  # round(1.8) = 2 would leave nothing to train on
    assert len(train) == 1 and len(held) == 1
    train, held = holdout_split(10, 0.01, seed=0)  # round(0.1) = 0, but a share > 0 holds out one row
    assert len(held) == 1 and sorted([*train, *held]) == list(range(10))
    assert len(holdout_split(1, 0.5, seed=0)[1]) == 0 and len(holdout_split(10, 0.0, seed=0)[1]) == 0


def test_scaler_standardises_per_column_and_never_divides_by_zero():
    from augpipe.methods.translation import _scaler

    x = torch.tensor([[1.0, 5.0, 0.0], [3.0, 5.0, 1.0], [5.0, 5.0, 2.0]])
    mean, std = _scaler(x)
    torch.testing.assert_close(mean, torch.tensor([3.0, 5.0, 1.0]))
    torch.testing.assert_close(std, torch.tensor([2.0, 1.0, 1.0]))  # a constant column scales by 1
    half = torch.tensor([[0.0], [0.5], [1.0]]) / 2
    torch.testing.assert_close(_scaler(half)[1], torch.tensor([0.25]))  # small but real spread is kept
    one = torch.tensor([[2.0, -1.0]])
    mean, std = _scaler(one)  # a single row has no spread: unit scale, not NaN
    torch.testing.assert_close(mean, one[0])
    torch.testing.assert_close(std, torch.ones(2))


def test_scaler_of_two_rows_uses_their_spread():
    from augpipe.methods.translation import _scaler

    torch.testing.assert_close(_scaler(torch.tensor([[0.0], [2.0]]))[1], torch.tensor([2.0**0.5]))


def test_normalize_rows_scales_the_last_axis_to_unit_norm_and_honours_eps():
    """Rows of any norm (small ones too) come out unit length along the last axis; a zero row stays
    zero; ``eps`` is the floor on the divisor."""
    x = torch.tensor([[0.03, 0.04], [3.0, 4.0], [0.0, 0.0]])
    torch.testing.assert_close(normalize_rows(x), torch.tensor([[0.6, 0.8], [0.6, 0.8], [0.0, 0.0]]))
    torch.testing.assert_close(normalize_rows(torch.tensor([0.3, 0.4])), torch.tensor([0.6, 0.8]))
    batches = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(normalize_rows(batches), batches / batches.norm(dim=-1, keepdim=True))
    torch.testing.assert_close(normalize_rows(x[:1], eps=0.1), torch.tensor([[0.3, 0.4]]))


def test_default_gamma_is_one_and_the_empty_translator_error_is_exact():
    torch.manual_seed(0)
    no_m = Translator(TranslatorShape(**{**vars(SHAPE), "projection": False})).eval()
    c, noise = torch.randn(4, 6), torch.randn(4, 5)
    with torch.no_grad():
        torch.testing.assert_close(no_m(c, noise, 3, 5.0).norm(dim=1), torch.ones(4))  # γ = 1 (P)
    message = "a translator needs the projection M, the DDIM term, or both"
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        Translator(TranslatorShape(6, 5, projection=False, ddim=False))


def test_every_shape_field_fixes_the_network_and_schedule():
    """Non-default hidden, layers, dropout, time_dim and beta all reach the ε-network and the schedule."""
    shape = TranslatorShape(6, 5, hidden=12, layers=4, dropout=0.3, time_dim=8, timesteps=50, beta=0.004)
    torch.manual_seed(0)
    model = Translator(shape)
    net = model.eps_net
    assert net is not None and model.projection is not None and model.projection.bias is not None
    assert (net.time[0].in_features, net.time[0].out_features) == (8, 12)
    assert net.time_dim == 8 and len(net.linear) == 3 and net.linear[0].out_features == 12
    assert net.drop.p == 0.3
    torch.testing.assert_close(model.abar, cdim.alphas_bar(50, 0.004))
    assert model.abar[0].item() == pytest.approx(1 - 0.004 * 1000 / 50)


def test_cdim_samples_the_z_scored_condition_with_guidance_and_maps_back_to_embedding_space():
    """CDIM(c) = the ω-guided DDIM sample for the z-scored c, times the target std plus its mean,
    with scalers far from (0, 1) so a missing or inverted step shows."""
    model = build(SHAPE, 1.0, 3, "cpu").eval()
    assert model.eps_net is not None
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        model.eps_net.null.normal_(generator=gen)
    c_train = 3.0 * torch.randn(64, 6, generator=gen) + 2.0
    z_train = 0.5 * torch.randn(64, 5, generator=gen) - 4.0
    model.set_scalers(c_train, z_train)
    c, noise = c_train[:6], torch.randn(6, 5, generator=gen)
    cond = (c - c_train.mean(0)) / c_train.std(0)
    abar = cdim.alphas_bar(100, 0.008)
    with torch.no_grad():
        guided = cdim.ddim_sample(model.eps_net, cond, noise, abar, 5, 5.0)
        unguided = cdim.ddim_sample(model.eps_net, cond, noise, abar, 5, None)
        assert (guided - unguided).abs().max() > 1e-3
        expected = guided * z_train.std(0) + z_train.mean(0)
        torch.testing.assert_close(model.cdim(c, noise, 5, 5.0), expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(
            model.cdim(c, noise, 5, None), unguided * z_train.std(0) + z_train.mean(0), atol=1e-5, rtol=1e-5
        )
