"""Tests for ayt.nets: preconditioning (method.md section 1), the DDPM++ U-Net, seeded dropout
(method.md section 2) and the network factory."""

from __future__ import annotations

import math
import shutil

import pytest
import torch
from torch import nn

from ayt.errors import AytError
from ayt.nets import (NETWORK_PRESETS, Precond, SeededDropout, SongUNet, build_network,
                      count_parameters, shared_dropout)
from ayt.nets.dropout import SeededLabelDropout


def tiny(label_dim: int = 0, boundary: str = "edm", dropout: float = 0.1, **overrides) -> Precond:
    """The tiny preset at 8x8x2 (fast on CPU)."""
    torch.manual_seed(0)
    return build_network("tiny", img_resolution=8, in_channels=2, label_dim=label_dim,
                         dropout=dropout, boundary=boundary, overrides=overrides or None)


def perturb_weights(net: nn.Module, seed: int = 1, scale: float = 0.05) -> None:
    """Add Gaussian noise to every parameter so that zero-initialised paths carry signal."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


def images(b: int = 3, c: int = 2, res: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, c, res, res, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- preconditioning (section 1)

def test_exact_boundary_gives_identity_at_sigma_min():
    net = tiny(boundary="exact", label_dim=3)
    perturb_weights(net)
    x = images()
    assert torch.equal(net(x, net.sigma_min), x)
    assert torch.equal(net(x, torch.full((3,), net.sigma_min), torch.tensor([0, 1, 2])), x)
    assert not torch.allclose(net(x, 1.0), x, atol=1e-3)  # the network does contribute elsewhere


def test_edm_boundary_is_only_approximate_at_sigma_min():
    net = tiny(boundary="edm")
    perturb_weights(net)
    x = images()
    y = net.eval()(x, net.sigma_min)
    assert torch.allclose(y, x, atol=5e-2) and not torch.equal(y, x)


@pytest.mark.parametrize("boundary", ["edm", "exact"])
def test_scalings_match_formulas(boundary):
    net = tiny(boundary=boundary)
    t = torch.tensor([0.002, 0.1, 1.0, 80.0], dtype=torch.float64)
    sd, shift = 0.5, (0.002 if boundary == "exact" else 0.0)
    c_skip, c_out, c_in, c_noise = net.scalings(t)
    expected = (sd**2 / ((t - shift) ** 2 + sd**2), (t - shift) * sd / (t**2 + sd**2).sqrt(),
                1 / (t**2 + sd**2).sqrt(), t.log() / 4)
    for got, want in zip((c_skip, c_out, c_in, c_noise), expected):
        assert got.shape == (4,) and got.dtype == torch.float64  # float64 in, float64 out
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    for low in (torch.float32, torch.bfloat16):  # never below float32
        assert all(c.dtype == torch.float32 for c in net.scalings(t.to(low)))


def test_forward_is_the_preconditioned_formula():
    net = tiny().eval()
    perturb_weights(net)
    x, t = images(), torch.tensor([0.05, 1.0, 20.0])
    c_skip, c_out, c_in, c_noise = (c[:, None, None, None] for c in net.scalings(t))
    manual = c_skip * x + c_out * net.net(c_in * x, c_noise.flatten())
    torch.testing.assert_close(net(x, t), manual)


def test_output_shape_and_scalar_t_broadcast():
    net = tiny().eval()
    x = images(b=2)
    y = net(x, 0.7)
    assert y.shape == x.shape and y.dtype == x.dtype
    torch.testing.assert_close(y, net(x, torch.tensor(0.7)))
    torch.testing.assert_close(y, net(x, torch.full((2,), 0.7)))


def test_bad_t_and_boundary_raise():
    net = tiny()
    with pytest.raises(AytError, match="must be > 0"):
        net(images(), torch.tensor([1.0, 0.0, 1.0]))
    with pytest.raises(AytError, match="expected"):
        net(images(), torch.ones(2))
    with pytest.raises(AytError, match="edm"):
        Precond(net.net, boundary="song")


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch's own jvp decompositions
def test_jvp_through_precond():
    net = tiny(dropout=0.0)
    x, t = images(b=2), torch.tensor([0.5, 2.0])
    y, dy = torch.func.jvp(lambda t_: net(x, t_), (t,), (torch.ones_like(t),))
    eps = 1e-3
    fd = (net(x, t + eps) - net(x, t - eps)) / (2 * eps)
    torch.testing.assert_close(y, net(x, t))
    torch.testing.assert_close(dy, fd, rtol=1e-2, atol=1e-3)


# ---------------------------------------------------------------- U-Net

def test_cifar10_ddpmpp_has_edm_parameter_count():
    net = build_network("cifar10-ddpmpp", img_resolution=32, in_channels=3)
    assert abs(count_parameters(net) - 55.73e6) < 0.2e6
    with torch.no_grad():  # the single 32x32 forward of this file
        assert net.eval()(torch.zeros(1, 3, 32, 32), 1.0).shape == (1, 3, 32, 32)


def test_tiny_and_small_sizes():
    n_tiny16 = count_parameters(build_network("tiny", img_resolution=16, in_channels=3))
    n_tiny8 = count_parameters(build_network("tiny", img_resolution=8, in_channels=1))
    n_small = count_parameters(build_network("small", img_resolution=16, in_channels=3))
    assert n_tiny16 == 1_033_507 and n_tiny8 == 994_913
    assert 0.8e6 < n_tiny8 < n_tiny16 < 1.2e6
    assert 3.5e6 < n_small < 4.5e6


def test_class_labels_change_output_and_accept_int_or_onehot():
    net = tiny(label_dim=4).eval()
    perturb_weights(net)
    x, t = images(b=2), torch.tensor([1.0, 1.0])
    y0 = net(x, t, torch.tensor([0, 0]))
    y1 = net(x, t, torch.tensor([1, 3]))
    assert not torch.allclose(y0, y1, atol=1e-4)
    torch.testing.assert_close(y1, net(x, t, nn.functional.one_hot(torch.tensor([1, 3]), 4).float()))
    torch.testing.assert_close(net(x, t, torch.tensor([-1, -1])), net(x, t, None))
    with pytest.raises(AytError, match="class labels"):
        net(x, t, torch.tensor([0, 4]))


def test_gradient_reaches_every_parameter():
    net = tiny(label_dim=3)
    x, t = images(b=2), torch.tensor([0.3, 3.0])
    net(x, t, torch.tensor([0, 2])).square().sum().backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


def test_fourier_embedding_and_adaptive_scale():
    net = tiny(dropout=0.0, embedding_type="fourier", adaptive_scale=True).eval()
    perturb_weights(net)
    assert "net.map_noise.freqs" in net.state_dict()
    x = images(b=2)
    y = net(x, torch.tensor([0.1, 10.0]))
    assert y.shape == x.shape and torch.isfinite(y).all()
    assert not torch.allclose(net(x, 0.1)[0], net(x, 10.0)[0])  # depends on the noise level
    assert count_parameters(net) > count_parameters(tiny())  # scale doubles each affine


# ---------------------------------------------------------------- seeded dropout (section 2)

def dropout_masks(net: nn.Module, run) -> list[torch.Tensor]:
    """Keep-masks of every SeededDropout in `net` during `run()` (input nonzero almost surely)."""
    masks: list[torch.Tensor] = []
    hooks = [m.register_forward_hook(lambda m, i, o: masks.append(o != 0))
             for m in net.modules() if type(m) is SeededDropout]
    run()
    for h in hooks:
        h.remove()
    return masks


def test_shared_dropout_same_masks_within_context():
    net = tiny(dropout=0.5)
    x1, x2 = images(seed=1), images(seed=2)
    with shared_dropout(net, seed=7):
        student = dropout_masks(net, lambda: net(x1, torch.full((3,), 2.0)))
        torch.manual_seed(123)
        with torch.no_grad():
            target = dropout_masks(net, lambda: net(x2, torch.full((3,), 1.5)))
    assert len(student) == len(target) > 5
    assert all(torch.equal(a, b) for a, b in zip(student, target))
    assert 0.3 < torch.cat([m.flatten() for m in student]).float().mean() < 0.7


def test_shared_dropout_is_reproducible_and_seed_dependent():
    net = tiny(dropout=0.5)
    x = images()

    def masks(seed: int) -> list[torch.Tensor]:
        with shared_dropout(net, seed):
            return dropout_masks(net, lambda: net(x, 1.0))

    first, again, other = masks(3), masks(3), masks(4)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not any(torch.equal(a, b) for a, b in zip(first, other))


def test_shared_dropout_leaves_global_rng_untouched():
    net = tiny(label_dim=3, dropout=0.5, label_dropout=0.5)
    state = torch.get_rng_state()
    with shared_dropout(net, seed=11):
        net(images(), 1.0, torch.tensor([0, 1, 2]))
    assert torch.equal(torch.get_rng_state(), state)


def test_outside_context_matches_nn_dropout_and_eval_is_identity():
    x = torch.randn(4, 64)
    layer, reference = SeededDropout(0.3), nn.Dropout(0.3)
    torch.manual_seed(5)
    y = layer(x)
    torch.manual_seed(5)
    torch.testing.assert_close(y, reference(x), rtol=0, atol=0)
    assert not torch.equal(layer(x), layer(x))  # fresh masks outside a context
    layer.eval()
    assert torch.equal(layer(x), x)
    with shared_dropout(layer, seed=1):
        assert torch.equal(layer(x), x)
    assert layer.train().shared_seed is None  # context restored the state


def test_shared_mask_scales_survivors():
    layer = SeededDropout(0.25)
    x = torch.ones(1000)
    with shared_dropout(layer, seed=0):
        y = layer(x)
    assert set(y.unique().tolist()) <= {0.0, torch.tensor(1 / 0.75).item()}
    assert math.isclose(y.mean().item(), 1.0, abs_tol=0.1)


def test_label_dropout_drops_whole_rows_without_rescaling():
    layer = SeededLabelDropout(0.5)
    y = torch.ones(64, 5)
    with shared_dropout(layer, seed=2):
        out = layer(y)
    rows = out.sum(dim=1)
    assert set(rows.unique().tolist()) == {0.0, 5.0}


def test_hashed_mask_rate_and_independence():
    from ayt.nets.dropout import INDEX_MULTIPLIER, hashed_keep_mask

    seed = torch.tensor([12345, -678, INDEX_MULTIPLIER], dtype=torch.int32)
    keep = hashed_keep_mask((256, 64, 8), seed, 0.3)
    rate = keep.float().mean().item()
    assert abs(rate - 0.7) < 0.005  # 131k draws: std 0.0013
    # neighbouring elements are uncorrelated (a weak hash would make runs of equal bits)
    flat = keep.flatten().float() - rate
    assert abs((flat[1:] * flat[:-1]).mean().item() / flat.var().item()) < 0.02
    other = hashed_keep_mask((256, 64, 8), seed + torch.tensor([1, 0, 0], dtype=torch.int32), 0.3)
    assert abs((keep == other).float().mean().item() - (0.7 ** 2 + 0.3 ** 2)) < 0.01  # independent seeds


def test_hashed_mask_threshold_and_rank_slices():
    from ayt.nets.dropout import INDEX_MULTIPLIER, hashed_keep_mask

    seed = torch.tensor([7, -9, INDEX_MULTIPLIER], dtype=torch.int32)
    assert hashed_keep_mask((4096,), seed, 0.0).all()
    assert not hashed_keep_mask((4096,), seed, 1 - 1e-12).any()  # p -> 1 drops everything (no wrap-around)
    # the masks of a global batch of 6 rows, sliced by rank (3 rows each), equal the two ranks' masks
    with pytest.raises(AytError, match=r"int32 tensor \[3\]"):  # the two-halves key of older code
        hashed_keep_mask((4096,), seed[:2], 0.4)
    whole = hashed_keep_mask((6, 5, 4), seed, 0.4)
    ranks = [hashed_keep_mask((3, 5, 4), seed, 0.4, part=r) for r in (0, 1)]
    assert torch.equal(whole, torch.cat(ranks))


def test_unet_traces_as_one_graph_without_recompiling_per_seed():
    """torch.compile sees the whole network in train mode with seeded dropout as one graph
    (fullgraph raises on a graph break), and a new dropout seed reuses the compiled graph."""
    import torch._dynamo

    net = tiny(dropout=0.3, label_dim=3).train()
    perturb_weights(net)
    x, t, labels = images(), torch.full((3,), 1.0), torch.eye(3)
    torch._dynamo.reset()
    compiled = torch.compile(net, backend="eager", fullgraph=True, dynamic=False)
    with torch._dynamo.config.patch(error_on_recompile=True):
        outputs = []
        for seed in (1, 2):
            with shared_dropout(net, seed):
                outputs.append((compiled(x, t, labels), net(x, t, labels)))
    torch._dynamo.reset()
    for traced, eager in outputs:
        torch.testing.assert_close(traced, eager)
    assert not torch.allclose(outputs[0][0], outputs[1][0])  # the seed changed the masks


# ---------------------------------------------------------------- factory

def test_factory_errors():
    with pytest.raises(AytError, match="tiny"):
        build_network("huge", img_resolution=8, in_channels=1)
    with pytest.raises(AytError, match="model_channels"):
        build_network("tiny", img_resolution=8, in_channels=1, overrides={"channels": 8})
    with pytest.raises(AytError, match="divisible"):
        build_network("small", img_resolution=6, in_channels=1)
    with pytest.raises(AytError, match="boundary"):
        build_network("tiny", img_resolution=8, in_channels=1, boundary="song")


def test_factory_settings_reach_the_network():
    net = build_network("tiny", img_resolution=8, in_channels=1, label_dim=2, dropout=0.2,
                        boundary="exact", sigma_min=0.01, overrides={"model_channels": 16})
    assert isinstance(net.net, SongUNet)
    assert (net.boundary, net.sigma_min, net.img_resolution, net.img_channels, net.label_dim) == \
        ("exact", 0.01, 8, 1, 2)
    rates = {m.p for m in net.modules() if type(m) is SeededDropout}
    assert rates == {0.2} and net.net.map_layer0.in_features == 16
    assert NETWORK_PRESETS["cifar10-ddpmpp"]["model_channels"] == 128


def test_dropout_masks_are_pinned():
    """The masks are part of every training result (the demo's and the benchmarks' numbers):
    a change of the hash must be deliberate. Rows of a keep-mask as bit patterns."""
    from ayt.nets.dropout import hash_keys, hashed_keep_mask

    keep = hashed_keep_mask((4, 16), torch.tensor(hash_keys(2024), dtype=torch.int32), 0.5, part=1)
    assert [int("".join("1" if b else "0" for b in row), 2) for row in keep.tolist()] == [33023, 37488, 7902, 39181]


@pytest.mark.skipif(not any(shutil.which(c) for c in ("g++", "c++", "clang++")),
                    reason="Inductor's CPU kernels need a C++ compiler")
def test_inductor_reproduces_the_dropout_hash_without_folding_constants():
    """Inductor's C++ kernels give the eager masks (int32 products wrap), and the index multiplier
    is loaded, not folded into the index arithmetic as a literal: folded, its products overflow
    int32 and Triton refuses them, so train.compile failed on CUDA (seen on an H200, torch 2.11)."""
    import torch._dynamo
    from torch._inductor.utils import run_and_get_code

    from ayt.nets.dropout import INDEX_MULTIPLIER, hash_keys, hashed_keep_mask

    keys = torch.tensor(hash_keys(987654321), dtype=torch.int32)
    torch._dynamo.reset()
    compiled, code = run_and_get_code(torch.compile(lambda k: hashed_keep_mask((8, 16, 8, 8), k, 0.3, part=2)), keys)
    torch._dynamo.reset()
    assert torch.equal(compiled, hashed_keep_mask((8, 16, 8, 8), keys, 0.3, part=2))
    assert code and str(INDEX_MULTIPLIER) not in "".join(code)
