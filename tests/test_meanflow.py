"""MeanFlow (method.md section 8): the second time input, the target identity, the draws, the
adaptive weight, the MFD variant's gradient, the sampler, the CLI and the bad combinations."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from ayt.build import build_net, build_objective
from ayt.checkpoint import load_checkpoint
from ayt.cli import main
from ayt.config import load_config
from ayt.errors import AytError
from ayt.features.nets import TinyVGG
from ayt.losses.aligned import Aligned
from ayt.losses.distances import SquaredL2
from ayt.losses.mfd import MFD
from ayt.nets import MeanFlowNet, SongUNet, build_meanflow_network
from ayt.objectives.meanflow import (MeanFlowObjective, MeanFlowPair, adaptive_weight, meanflow_target,
                                     meanflow_times)
from ayt.rng import StepRandom
from ayt.sampling import meanflow_sample, parse_times, schedule_for

from test_train import tiny as tiny_args

SMALL = {"model_channels": 8, "num_blocks": 1, "attn_resolutions": []}


def small_meanflow(dtype=torch.float64, dropout: float = 0.0) -> MeanFlowNet:
    torch.manual_seed(0)
    net = build_meanflow_network("tiny", img_resolution=8, in_channels=3, dropout=dropout, overrides=SMALL)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # the zero-initialised output layer carries signal
    return net.to(dtype).train()


class Known(nn.Module):
    """`u(z, r, t) = a t z + b r`: `du/dt` along `(v, 0, 1)` is `a (t v + z)` exactly."""

    def __init__(self, a: float = 0.7, b: float = -0.3):
        super().__init__()
        self.a, self.b = a, b

    def forward(self, z, r, t, labels=None):
        view = (-1, 1, 1, 1)
        return self.a * t.view(view) * z + self.b * r.view(view)


class OnePoint(nn.Module):
    """The exact average velocity when the data is the single image `x`: `u(z, r, t) = (z - x) / t`."""

    def __init__(self, x: torch.Tensor):
        super().__init__()
        self.x = x

    def forward(self, z, r, t, labels=None):
        return (z - self.x) / t.view(-1, 1, 1, 1)


def draws(b: int = 3, seed: int = 0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(b, 3, 8, 8, generator=g, dtype=dtype) * 2 - 1
    eps = torch.randn(b, 3, 8, 8, generator=g, dtype=dtype)
    t = torch.rand(b, generator=g, dtype=dtype) * 0.8 + 0.1
    r = t * torch.rand(b, generator=g, dtype=dtype)
    return x, eps, r, t


# ---------------------------------------------------------------- the network
def test_second_time_input_is_off_by_default_and_equals_a_concatenation():
    plain = SongUNet(8, 3, 3, **SMALL)
    assert not any("map_time2" in k for k in plain.state_dict())  # existing checkpoints load unchanged
    with pytest.raises(AytError, match="second_time"):
        plain.embed(torch.rand(2), None, torch.rand(2))
    net = SongUNet(8, 3, 3, second_time=True, **SMALL).double()
    assert set(net.state_dict()) - set(plain.state_dict()) == {"map_time2.weight"}
    with pytest.raises(AytError, match="second_time"):
        net.embed(torch.rand(2), None)
    t, h = torch.rand(2, dtype=torch.float64), torch.rand(2, dtype=torch.float64)
    # MeanFlow's U-Net: one linear map of the concatenated embeddings [emb(t), emb(h)]
    weight = torch.cat([net.map_layer0.weight, net.map_time2.weight], 1)
    hidden = F.linear(torch.cat([net.map_noise(t), net.map_noise(h)], 1), weight, net.map_layer0.bias)
    torch.testing.assert_close(net.embed(t, None, h), F.silu(net.map_layer1(F.silu(hidden))))


def test_meanflow_net_feeds_t_and_t_minus_r():
    net = small_meanflow()
    z = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    r, t = torch.tensor([0.1, 0.0], dtype=torch.float64), torch.tensor([0.5, 1.0], dtype=torch.float64)
    torch.testing.assert_close(net(z, r, t), net.net(z, t, None, t - r))
    net_r = MeanFlowNet(net.net, second="r")
    torch.testing.assert_close(net_r(z, r, t), net.net(z, t, None, r))
    with pytest.raises(AytError, match="0 <= r <= t <= 1"):
        net(z, t, r)


# ---------------------------------------------------------------- the target and the draws
def test_target_is_the_meanflow_identity_on_a_known_velocity():
    x, eps, r, t = draws()
    view = t.view(-1, 1, 1, 1)
    z, v = (1 - view) * x + view * eps, eps - x
    net = Known()
    expected = v - (t - r).view(-1, 1, 1, 1) * net.a * (view * v + z)
    torch.testing.assert_close(meanflow_target(net, z, r, t, v), expected)


def test_the_exact_average_velocity_is_its_own_target():
    """One data point: straight paths, so u = (z - x)/t is exact, du/dt = 0 along (v, 0, 1) and u_tgt = u."""
    x, eps, r, t = draws()
    x = x[:1].expand_as(x)
    view = t.view(-1, 1, 1, 1)
    z, v = (1 - view) * x + view * eps, eps - x
    net = OnePoint(x)
    torch.testing.assert_close(meanflow_target(net, z, r, t, v), net(z, r, t))


def test_times_are_sorted_logit_normal_with_the_ratio_of_distinct_draws():
    g = torch.Generator().manual_seed(0)
    n = torch.randn(3, 20000, generator=g)
    r, t = meanflow_times(n[0], n[1], n[2], ratio=0.25, p_mean=-0.4, p_std=1.0)
    assert bool(((0 < r) & (r <= t) & (t < 1)).all())
    assert (r != t).float().mean().item() == pytest.approx(0.25, abs=0.01)
    r1, t1 = meanflow_times(n[0], n[1], n[2], ratio=1.0, p_mean=-2.0, p_std=2.0)
    torch.testing.assert_close(torch.logit(torch.cat([r1, t1])).mean(), torch.tensor(-2.0), atol=0.05, rtol=0)


def test_r_equal_t_draws_give_the_flow_matching_loss():
    net = small_meanflow()
    x0 = torch.rand(4, 3, 8, 8, dtype=torch.float64) * 2 - 1
    objective = MeanFlowObjective(ratio=0.0, norm_p=0.5, norm_eps=1e-2)
    loss = objective(net, x0, rng=StepRandom(torch.Generator().manual_seed(5)))
    r, t, eps = objective.sample(x0, StepRandom(torch.Generator().manual_seed(5)))
    assert torch.equal(r, t)
    view = t.view(-1, 1, 1, 1)
    squared = (net(((1 - view) * x0 + view * eps), t, t) - (eps - x0)).flatten(1).square().sum(1)
    torch.testing.assert_close(loss, squared / (squared + 1e-2) ** 0.5)


def test_adaptive_weight_value_and_gradient():
    net = small_meanflow()
    x0 = torch.rand(3, 3, 8, 8, dtype=torch.float64) * 2 - 1
    objective = MeanFlowObjective(ratio=1.0, norm_p=0.75, norm_eps=1e-3)
    pair = objective.draw(net, x0, rng=StepRandom(torch.Generator().manual_seed(1)))
    u = pair.u.detach().requires_grad_(True)
    pair = MeanFlowPair(pair.z, pair.r, pair.t, u, pair.target)
    loss = objective.loss(pair)
    delta = (u - pair.target).detach()
    squared = delta.flatten(1).square().sum(1)
    w = 1 / (squared + 1e-3) ** 0.75
    torch.testing.assert_close(loss, w * squared)
    (grad,) = torch.autograd.grad(loss.sum(), u)
    torch.testing.assert_close(grad, 2 * w.view(-1, 1, 1, 1) * delta)  # the weight is a constant
    torch.testing.assert_close(adaptive_weight(squared, 1.0, 0.5), 1 / (squared + 0.5))


# ---------------------------------------------------------------- MFD for MeanFlow
def mfd_pair(dtype=torch.float64) -> MeanFlowPair:
    x, eps, r, t = draws(2, seed=3, dtype=dtype)
    view = t.view(-1, 1, 1, 1)
    z = (1 - view) * x + view * eps
    u = (eps - x + 0.3 * torch.randn_like(x)).requires_grad_(True)
    return MeanFlowPair(z, r, t, u, (eps - x).detach())


class TinyPhi(nn.Module):
    """`d(x, y) = ||phi(x) - phi(y)||^2` with a tiny frozen float64 network phi (conv, tanh, linear)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.phi = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(256, 6)).double()
        self.phi.requires_grad_(False)

    def forward(self, x, y):
        return (self.phi(x) - self.phi(y)).square().sum(1)


def test_mfd_gradient_equals_the_stated_formula():
    """dL/du = -2 w ||Delta|| g / ||g||, g = grad_x d(x_hat, x_tgt) at x_hat = z - t u (float64; g by
    central finite differences of d)."""
    d = TinyPhi()
    objective = MeanFlowObjective(Aligned(d), norm_p=0.75, norm_eps=1e-3)
    pair = mfd_pair()
    loss = objective.loss(pair)
    (grad,) = torch.autograd.grad(loss.sum(), pair.u)
    view = pair.t.view(-1, 1, 1, 1)
    x_hat, x_tgt = (pair.z - view * pair.u).detach(), pair.z - view * pair.target  # the implied images
    g = torch.zeros_like(x_hat).view(len(x_hat), -1)
    h = 1e-6
    for i in range(g.shape[1]):
        step = torch.zeros_like(g)
        step[:, i] = h
        step = step.view_as(x_hat)
        g[:, i] = (d(x_hat + step, x_tgt) - d(x_hat - step, x_tgt)) / (2 * h)
    g = g.view_as(x_hat)
    delta = (pair.u - pair.target).detach()
    squared = delta.flatten(1).square().sum(1)
    w = 1 / (squared + 1e-3) ** 0.75
    expected = -(2 * w * squared.sqrt()).view(-1, 1, 1, 1) * g / g.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    torch.testing.assert_close(grad, expected, atol=1e-8, rtol=1e-6)
    torch.testing.assert_close(loss.detach(), w * squared)  # the logged value: the pixel MeanFlow loss


def test_mfd_meanflow_keeps_the_feature_network_frozen():
    torch.manual_seed(0)
    phi = MFD(TinyVGG(3, target_dim=5, width=4, resolution=8))
    pair = mfd_pair(torch.float32)
    MeanFlowObjective(Aligned(phi)).loss(pair).sum().backward()
    assert pair.u.grad is not None and bool(torch.isfinite(pair.u.grad).all())
    assert all(p.grad is None for p in phi.parameters())


def test_aligned_squared_pixels_is_the_pixel_gradient():
    """With phi = identity and the squared distance the MFD variant reduces to the paper's loss."""
    pair = mfd_pair()
    pixel = torch.autograd.grad(MeanFlowObjective().loss(pair).sum(), pair.u)[0]
    aligned = torch.autograd.grad(MeanFlowObjective(Aligned(SquaredL2())).loss(pair).sum(), pair.u)[0]
    torch.testing.assert_close(aligned, pixel)


def test_gated_mfd_takes_the_pixel_gradient_above_tmax():
    """objective.mf_mfd_tmax: rows with t > tmax get the pixel gradient 2 w Delta, the others the
    feature direction; the logged value stays the pixel loss."""
    d = TinyPhi()
    pair = mfd_pair()
    tmax = float(pair.t.min() + pair.t.max()) / 2  # splits the two draws
    assert pair.t.min() < tmax < pair.t.max()
    grads = {}
    for name, objective in {"pixel": MeanFlowObjective(norm_p=0.75, norm_eps=1e-3),
                            "mfd": MeanFlowObjective(Aligned(d), norm_p=0.75, norm_eps=1e-3),
                            "gated": MeanFlowObjective(Aligned(d), norm_p=0.75, norm_eps=1e-3, mfd_tmax=tmax)}.items():
        loss = objective.loss(pair)
        grads[name] = torch.autograd.grad(loss.sum(), pair.u)[0]
    near, far = pair.t <= tmax, pair.t > tmax
    torch.testing.assert_close(grads["gated"][near], grads["mfd"][near])
    torch.testing.assert_close(grads["gated"][far], grads["pixel"][far])
    assert not torch.allclose(grads["mfd"][far], grads["pixel"][far])  # the gate changes something
    zero = MeanFlowObjective(Aligned(d), norm_p=0.75, norm_eps=1e-3, mfd_tmax=0.0)
    torch.testing.assert_close(torch.autograd.grad(zero.loss(pair).sum(), pair.u)[0], grads["pixel"])
    # the config option reaches the objective the trainer builds
    config = load_config(None, ["objective.kind=meanflow", "distance.name=squared_l2", "distance.mode=aligned",
                                "objective.mf_mfd_tmax=0.2"])
    assert build_objective(config, 8, 3).mfd_tmax == 0.2


# ---------------------------------------------------------------- sampling
def test_sampler_one_step_and_few_steps():
    net = small_meanflow().eval()
    z = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    ones, zeros = torch.ones(2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64)
    torch.testing.assert_close(meanflow_sample(net, z, (1.0,)), z - net(z, zeros, ones))
    half = torch.full((2,), 0.5, dtype=torch.float64)
    z_half = z - 0.5 * net(z, half, ones)
    torch.testing.assert_close(meanflow_sample(net, z, (1.0, 0.5)), z_half - 0.5 * net(z_half, zeros, half))
    x = torch.rand(1, 3, 8, 8, dtype=torch.float64).expand(2, -1, -1, -1)
    for times in ([1.0], [1.0, 0.5], parse_times("4")):  # the exact u lands on the data from any grid
        torch.testing.assert_close(meanflow_sample(OnePoint(x), z, times), x)
    assert parse_times("4") == [1.0, 0.75, 0.5, 0.25]
    assert parse_times("1,0.3") == [1.0, 0.3]
    for bad in ("0.5", "1,0.5,0.7", "1,0", "x"):
        with pytest.raises(AytError):
            parse_times(bad)
    config = load_config(None, ["objective.kind=meanflow", "distance.name=squared_l2"])
    assert schedule_for(config, "2").sampler == "meanflow"


# ---------------------------------------------------------------- CLI and bad input
MEANFLOW = ["objective.kind=meanflow", "distance.name=squared_l2", "data.resolution=16", "train.batch_size=4",
            "network.dropout=0.3", "train.checkpoint_every=2", "objective.mf_ratio=0.5"]


def test_cli_meanflow_trains_resumes_bitwise_and_samples(tmp_path, capsys):
    straight, resumed = tmp_path / "a", tmp_path / "b"
    assert main(["train", *tiny_args(straight, *MEANFLOW, "train.steps=4")]) == 0
    assert main(["train", *tiny_args(resumed, *MEANFLOW, "train.steps=2")]) == 0
    assert main(["train", "--resume", str(resumed), "train.steps=4"]) == 0
    a, b = load_checkpoint(straight), load_checkpoint(resumed)
    for name in ("net", "ema0"):
        assert all(torch.equal(a.modules[name][k], b.modules[name][k]) for k in a.modules[name]), name
    assert (straight / "samples" / "latest.png").is_file()
    out = tmp_path / "s.npz"
    assert main(["sample", str(straight), "-n", "3", "--steps", "2", "--npz", str(out)]) == 0
    import numpy as np

    assert np.load(out)["images"].shape == (3, 16, 16, 3)
    assert main(["eval", str(straight), "--num", "2", "--steps", "1", "3"]) == 0
    assert "| 3 |" in capsys.readouterr().out
    assert main(["eval", str(straight), "--num", "2", "--denoise", "0.2"]) == 2  # no noise levels sigma
    assert main(["tangents", str(straight)]) == 2  # not a consistency model


def test_cli_meanflow_with_mfd(tmp_path):
    feats = tmp_path / "features"
    assert main(["train-features", *tiny_args(feats, "data.resolution=16", "train.steps=2", "train.batch_size=4",
                                               "features.width=4", "features.holdout=16")]) == 0
    run = tmp_path / "mfd"
    assert main(["train", *tiny_args(run, *MEANFLOW, "distance.name=mfd", "distance.mode=aligned",
                                     f"distance.features={feats}", "train.steps=2")]) == 0
    assert main(["sample", str(run), "-n", "2", "--steps", "1", "--npz", str(tmp_path / "s.npz")]) == 0


def test_bad_meanflow_combinations_fail_in_one_line(tmp_path):
    base = ["objective.kind=meanflow", "distance.name=squared_l2"]
    cases = {
        "no teacher": [*base, "objective.teacher=runs/edm"],
        r"not pixel\+aligned": ["objective.kind=meanflow", "distance.mode=pixel+aligned", "distance.name=mfd",
                          "distance.features=x"],
        "distance.name=squared_l2": ["objective.kind=meanflow"],  # the default pseudo-Huber is not the paper's loss
        "denoise_sigmas": [*base, "eval.denoise_sigmas=[0.2]"],
        "mf_ratio": [*base, "objective.mf_ratio=1.5"],
        "mf_second": [*base, "objective.mf_second=h"],
        "mf_mfd_tmax=1.5 must lie": [*base, "objective.mf_mfd_tmax=1.5"],
        r"mf_mfd_tmax=0.0 must lie in \(0, 1\]": ["objective.kind=meanflow", "distance.name=squared_l2",
                                                 "distance.mode=aligned", "objective.mf_mfd_tmax=0"],
        "gates the feature direction": [*base, "objective.mf_mfd_tmax=0.5"],  # pixel mode has no feature direction
        "applies to objective.kind=meanflow only": ["objective.kind=ect", "objective.mf_ratio=0.5"],
    }
    for match, overrides in cases.items():
        with pytest.raises(AytError, match=match) as err:
            load_config(None, overrides)
        assert "\n" not in str(err.value)
    with pytest.raises(AytError, match="SongUNet preset"):
        build_net(load_config(None, [*base, "network.preset=imagenet64-adm"]), 64, 3)
    with pytest.raises(AytError, match="must start at 1"):
        build_objective(load_config(None, [*base, "train.sample_sigmas=80,0.821"]), 8, 3)
    edm = tmp_path / "edm"
    assert main(["train", *tiny_args(edm, "objective.kind=edm", "train.steps=1", "train.batch_size=4")]) == 0
    with pytest.raises(AytError, match="starts from scratch"):
        from ayt.train import train

        train(load_config(None, tiny_args(tmp_path / "mf", *base, f"objective.init={edm}")))
    assert not (tmp_path / "mf").exists()  # refused before the run folder was made
