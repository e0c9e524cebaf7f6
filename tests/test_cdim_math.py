"""CDIM's pieces one at a time (methods/cdim.py): the noise schedule, the timestep grid and features,
the ε-network's forward pass written out from METHODS §3, and the sampler's precision handling.

test_translation_math.py checks the DDIM step, guidance and the sampler as a whole; these pin the
parts it takes as given, so a wrong schedule or a network that ignores its skip inputs cannot hide
behind a loss that still goes down.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from augpipe.methods import cdim


def test_alphas_bar_is_the_cumulative_product_of_a_constant_schedule():
    abar = cdim.alphas_bar(500, 0.008)  # β_s = 0.008·1000/500 = 0.016
    assert abar.dtype == torch.float32 and abar.shape == (500,)
    np.testing.assert_allclose(abar.numpy(), 0.984 ** np.arange(1, 501), rtol=1e-5)
    default = cdim.alphas_bar()
    assert default.shape == (1000,) and default[0].item() == pytest.approx(0.992)


def test_a_one_step_schedule_is_its_single_beta():
    assert cdim.alphas_bar(1, 0.0005)[0].item() == pytest.approx(0.5)
    with pytest.raises(ValueError, match=r"got 8\.0 \(β=0\.008, T=1\)"):
        cdim.alphas_bar(1, 0.008)


@pytest.mark.parametrize(("timesteps", "beta"), [(8, 0.008), (4, 0.008), (100, 0.0), (100, -0.001)])
def test_a_schedule_whose_step_leaves_zero_to_one_is_refused(timesteps, beta):
    with pytest.raises(ValueError, match=r"β·1000/T must lie in \(0, 1\), got .* \(β=.*, T=\d+\)"):
        cdim.alphas_bar(timesteps, beta)


def test_a_schedule_just_inside_the_bounds_is_accepted():
    assert cdim.alphas_bar(9, 0.008)[0].item() == pytest.approx(1 - 8 / 9)


@pytest.mark.parametrize(
    ("timesteps", "steps", "expected"),
    [(10, 3, [6, 3, 0]), (10, 10, list(range(9, -1, -1))), (10, 1, [0]), (7, 2, [3, 0])],
)
def test_ddim_timesteps_are_every_stride_th_step_descending(timesteps, steps, expected):
    assert cdim.ddim_timesteps(timesteps, steps) == expected


def test_zero_ddim_steps_are_refused_with_the_range():
    with pytest.raises(ValueError, match=r"DDIM steps must be in 1\.\.10, got 0"):
        cdim.ddim_timesteps(10, 0)


def test_timestep_embedding_is_cosines_then_sines_of_geometric_frequencies():
    t = torch.tensor([0, 3, 250])
    got = cdim.timestep_embedding(t, 7)  # an odd width drops the last column
    freqs = np.exp(-math.log(10000.0) * np.arange(3) / 3)
    args = np.array([0, 3, 250])[:, None] * freqs
    np.testing.assert_allclose(
        got.numpy(), np.concatenate([np.cos(args), np.sin(args)], 1), rtol=1e-5, atol=1e-6
    )
    assert got.dtype == torch.float32


def test_eps_net_needs_two_layers():
    with pytest.raises(ValueError, match="EpsNet needs at least 2 layers, got 1"):
        cdim.EpsNet(3, 2, hidden=4, layers=1)
    assert len(cdim.EpsNet(3, 2, hidden=4, layers=2).linear) == 1


def test_eps_net_defaults_are_the_reference_mlp():
    with torch.device("meta"):  # shapes only: the default network is 100M parameters
        net = cdim.EpsNet(3, 2)
    assert len(net.linear) == 9 and net.linear[0].out_features == 2048
    assert net.drop.p == 0.1 and net.time_dim == 64 and net.time[0].in_features == 64


def test_time_condition_scale_and_shift_are_silu_mlps():
    net = cdim.EpsNet(3, 2, hidden=8, layers=2, time_dim=6)
    linear, silu = torch.nn.Linear, torch.nn.SiLU
    assert [type(m) for m in net.time] == [type(m) for m in net.cond] == [linear, silu, linear]
    assert [type(m) for m in net.scale[0]] == [type(m) for m in net.shift[0]] == [silu, linear]
    assert net.out.in_features == 11  # two layers: the output layer also sees z_t


def test_every_hidden_layer_after_the_first_also_sees_z_t():
    net = cdim.EpsNet(3, 2, hidden=8, layers=4, time_dim=6)
    assert [layer.in_features for layer in net.linear] == [3, 11, 11]
    assert (net.out.in_features, net.out.out_features) == (11, 3)
    assert net.time[0].in_features == 6 and net.cond[0].in_features == 2
    assert len(net.scale) == len(net.shift) == len(net.norm) == 3
    assert net.null.shape == (8,) and torch.count_nonzero(net.null) == 0
    assert net.drop.p == 0.1


def _forward_by_hand(net: cdim.EpsNet, z, t, c, uncond):
    """METHODS §3's ε-network in eval mode: x·(1 + a(t)) + b(c) in every hidden layer, z_t skips."""
    temb = net.time(cdim.timestep_embedding(t, net.time_dim))
    cemb = torch.stack([net.null if u else e for u, e in zip(uncond, net.cond(c), strict=True)])
    h = z
    for i in range(len(net.linear)):
        x = h if i == 0 else torch.cat([h, z], dim=-1)
        pre = net.linear[i](x) * (1 + net.scale[i](temb)) + net.shift[i](cemb)
        h = torch.nn.functional.silu(
            torch.nn.functional.layer_norm(pre, (pre.shape[-1],), net.norm[i].weight, net.norm[i].bias)
        )
    return net.out(torch.cat([h, z], dim=-1))


def test_the_forward_pass_is_scale_and_shift_modulation_with_skips():
    torch.manual_seed(1)
    net = cdim.EpsNet(3, 2, hidden=8, layers=3, time_dim=6, dropout=0.3).eval()
    with torch.no_grad():
        net.null.normal_()
        for norm in net.norm:  # non-trivial LayerNorm affine, so dropping the norm shows
            norm.weight.normal_()
            norm.bias.normal_()
        z, t, c = torch.randn(4, 3), torch.tensor([0, 5, 50, 99]), torch.randn(4, 2)
        uncond = torch.tensor([False, True, False, True])
        torch.testing.assert_close(net(z, t, c, uncond), _forward_by_hand(net, z, t, c, uncond))


def test_unconditional_rows_ignore_the_condition_and_see_the_null_embedding():
    torch.manual_seed(2)
    net = cdim.EpsNet(3, 2, hidden=8, layers=3, dropout=0.0).eval()
    z, t = torch.randn(2, 3), torch.tensor([10, 10])
    uncond = torch.tensor([False, True])
    with torch.no_grad():
        first = net(z, t, torch.randn(2, 2), uncond)
        second = net(z, t, torch.randn(2, 2), uncond)
        assert not torch.allclose(first[0], second[0]) and torch.equal(first[1], second[1])
        net.null.add_(1.0)
        moved = net(z, t, torch.zeros(2, 2), uncond)
        assert not torch.allclose(moved[1], second[1])


def test_dropout_is_active_in_training_only():
    torch.manual_seed(3)
    net = cdim.EpsNet(3, 2, hidden=32, layers=3, dropout=0.5)
    args = (torch.randn(5, 3), torch.full((5,), 7), torch.randn(5, 2), torch.zeros(5, dtype=torch.bool))
    with torch.no_grad():
        assert not torch.allclose(net(*args), net(*args))
        net.eval()
        assert torch.equal(net(*args), net(*args))


def test_unguided_eps_is_one_conditional_pass():
    torch.manual_seed(4)
    net = cdim.EpsNet(3, 2, hidden=8, layers=3, dropout=0.0).eval()
    z, c = torch.randn(4, 3), torch.randn(4, 2)
    with torch.no_grad():
        direct = net(z, torch.full((4,), 12), c, torch.zeros(4, dtype=torch.bool))
        torch.testing.assert_close(cdim.guided_eps(net, z, 12, c, None), direct)


def test_the_network_runs_inside_the_autocast_and_eps_comes_back_float32():
    torch.manual_seed(5)
    net = cdim.EpsNet(3, 2, hidden=8, layers=3, dropout=0.0).eval()
    entered = []

    def bf16():
        entered.append(True)
        return torch.autocast("cpu", dtype=torch.bfloat16)

    z, c = torch.randn(4, 3), torch.randn(4, 2)
    with torch.no_grad():
        eps = cdim.guided_eps(net, z, 12, c, 1.5, bf16)
        full = cdim.guided_eps(net, z, 12, c, 1.5)
    assert entered == [True] and eps.dtype == torch.float32
    assert not torch.equal(eps, full)
    torch.testing.assert_close(eps, full, atol=0.2, rtol=0.1)


def test_one_step_sampling_lands_on_the_predicted_z0_in_float32():
    torch.manual_seed(6)
    net = cdim.EpsNet(3, 2, hidden=8, layers=3, dropout=0.0).eval()
    abar = cdim.alphas_bar(100, 0.008)
    c, noise = torch.randn(4, 2), torch.randn(4, 3, dtype=torch.float64)
    with torch.no_grad():
        sample = cdim.ddim_sample(net, c, noise, abar, 1, None)
        eps = cdim.guided_eps(net, noise.float(), 0, c, None)
    a0 = abar[0].item()
    assert sample.dtype == torch.float32
    torch.testing.assert_close(sample, (noise.float() - math.sqrt(1 - a0) * eps) / math.sqrt(a0))


def test_the_sampler_runs_every_step_inside_the_autocast():
    torch.manual_seed(7)
    net = cdim.EpsNet(3, 2, hidden=8, layers=3, dropout=0.0).eval()
    entered = []

    def bf16():
        entered.append(True)
        return torch.autocast("cpu", dtype=torch.bfloat16)

    with torch.no_grad():
        cdim.ddim_sample(net, torch.randn(2, 2), torch.randn(2, 3), cdim.alphas_bar(100, 0.008), 4, 1.0, bf16)
    assert len(entered) == 4
