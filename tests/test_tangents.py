"""Tangent analysis: closed-form splits, the renderer Jacobian, discrete and continuous tangents, CLI errors."""

import argparse
import json

import pytest
import torch

from ayt.commands.tangents import add_parser, run_cli
from ayt.analysis.decompose import decompose, oscillation, project_on_shapes, render_jacobian
from ayt.analysis.tangents import (
    all_tangents,
    analysis_batch,
    bucket_levels,
    consistency_outputs,
    continuous_tangent,
    discrete_tangents,
    feature_map,
    output_velocity,
    parse_tangent_names,
    rms_normalise,
)
from ayt.build import build_net
from ayt.checkpoint import save_checkpoint
from ayt.config import load_config
from ayt.data.shapes import render, sample_params
from ayt.errors import AytError
from ayt.features.nets import TinyVGG
from ayt.losses import build_distance
from ayt.losses.aligned import Aligned
from ayt.losses.mfd import MFD



TINY_NET = "network.overrides={model_channels: 16, num_blocks: 1, attn_resolutions: []}"


def tiny_config(*extra: str):
    return load_config(None, ["data.resolution=8", "data.num_samples=64", TINY_NET, *extra])


def perturb(net: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Add seeded noise to every weight: EDM zero-initialises the last layer, so a fresh net is f = c_skip x."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return net


def tiny_model(res: int = 8, channels: int = 3):
    torch.manual_seed(0)
    return perturb(build_net(tiny_config(f"data.resolution={res}"), res, channels), 0).eval()


def shapes_batch(n: int = 3, levels=(0.05, 0.5, 5.0), res: int = 8, stage: int = 0):
    x0 = render(sample_params(n, torch.Generator().manual_seed(1)), res)
    return analysis_batch(x0, torch.tensor(levels), torch.Generator().manual_seed(2), stage=stage)


# ---------------------------------------------------------------- decomposition
def test_linear_manifold_split_matches_closed_form():
    """Squared L2: tangent 2w(y - f); with y - f = a + n (a in span(A), n orthogonal) the parts are 2w a, 2w n."""
    gen = torch.Generator().manual_seed(0)
    b, d, k = 4, 30, 3
    basis = torch.randn(b, d, k, generator=gen, dtype=torch.float64)
    q, _ = torch.linalg.qr(basis)
    a = (q @ torch.randn(b, k, 1, generator=gen, dtype=torch.float64))[..., 0]
    noise = torch.randn(b, d, generator=gen, dtype=torch.float64)
    n = noise - (q @ (q.transpose(1, 2) @ noise[..., None]))[..., 0]
    f = torch.randn(b, d, generator=gen, dtype=torch.float64)
    y, w = f + a + n, torch.rand(b, generator=gen, dtype=torch.float64) + 0.5
    from ayt.analysis.tangents import discrete_tangent

    g, _ = discrete_tangent(build_distance("squared_l2"), f.view(b, 1, 5, 6), y.view(b, 1, 5, 6), w)
    assert torch.allclose(g.flatten(1), 2 * w[:, None] * (a + n), atol=1e-12)
    # rank-deficient basis: a repeated column and a zero column change nothing
    deficient = torch.cat([basis, basis[..., :1] * 3, torch.zeros(b, d, 1, dtype=torch.float64)], 2)
    for J in (basis, deficient):
        parts = decompose(g, J, direction=n)
        assert torch.allclose(parts.parallel, 2 * w[:, None] * a, atol=1e-5)
        assert torch.allclose(parts.orthogonal, 2 * w[:, None] * n, atol=1e-5)
        expected = a.square().sum(1) / (a.square().sum(1) + n.square().sum(1))
        assert torch.allclose(parts.parallel_fraction, expected, atol=1e-5)
        assert torch.allclose(parts.cosine, n.norm(dim=1) / (a + n).norm(dim=1), atol=1e-5)


def test_render_jacobian_matches_finite_differences():
    params = sample_params(3, torch.Generator().manual_seed(0)).double()
    jac = render_jacobian(params, 8)
    assert jac.shape == (3, 3 * 64, 8)
    h = 1e-5
    for j in range(8):
        step = torch.zeros_like(params)
        step[:, j] = h
        fd = (render(params + step, 8) - render(params - step, 8)).flatten(1) / (2 * h)
        assert torch.allclose(jac[..., j], fd, rtol=1e-5, atol=1e-7), j
    # a small parameter change moves the image within the span of the columns
    delta = torch.randn(3, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 1e-4
    change = (render(params + delta, 8) - render(params, 8)).flatten(1)
    assert (decompose(change, jac).parallel_fraction > 0.9999).all()


def test_projection_of_rendered_shapes_is_on_the_manifold():
    params = sample_params(6, torch.Generator().manual_seed(3))
    images = render(params, 16)
    proj = project_on_shapes(images, generator=torch.Generator().manual_seed(0))
    assert proj.rms.max() < 0.02
    assert proj.basis.shape == (6, 3 * 256, 8)
    # an off-manifold push orthogonal to the tangent space: the towards-manifold direction is orthogonal too
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(4))
    normal = decompose(noise, render_jacobian(params, 16)).orthogonal.float().view_as(images)
    off = images + 0.05 * normal / normal.flatten(1).square().mean(1).sqrt().view(-1, 1, 1, 1)
    proj = project_on_shapes(off, generator=torch.Generator().manual_seed(0))
    towards = decompose(proj.rendered - off, proj.basis)
    assert (towards.parallel_fraction < 0.05).all()
    assert ((proj.rms - 0.05).abs() < 0.01).all()


def test_oscillation_extremes():
    g = torch.randn(1, 5, 10)
    same = oscillation(g.expand(4, 5, 10))
    assert torch.allclose(same.consistency, torch.ones(5, dtype=torch.float64))
    assert torch.allclose(same.successive_cosine, torch.ones(5, dtype=torch.float64))
    flip = oscillation(torch.cat([g, -g, g, -g]))
    assert torch.allclose(flip.consistency, torch.zeros(5, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(flip.successive_cosine, -torch.ones(5, dtype=torch.float64))


# ---------------------------------------------------------------- tangents
def test_analysis_batch_layout_and_seed():
    batch = shapes_batch(n=2, levels=(0.1, 1.0, 10.0))
    again = shapes_batch(n=2, levels=(0.1, 1.0, 10.0))
    assert torch.equal(batch.eps, again.eps) and len(batch.t) == 6
    assert torch.equal(batch.bucket, torch.tensor([0, 1, 2, 0, 1, 2]))
    assert torch.equal(batch.grid(batch.x0)[1, 0], batch.grid(batch.x0)[1, 2])  # same image at every level
    assert ((batch.r < batch.t) & (batch.r >= 0)).all()
    levels = bucket_levels(6)
    assert (levels[1:] > levels[:-1]).all() and torch.isclose(levels[2:4].log().mean(), torch.tensor(-1.1))


def test_discrete_tangent_is_minus_weighted_gradient():
    net, batch = tiny_model(), shapes_batch()
    mfd = MFD(net=TinyVGG(3, 15, width=4, resolution=8))
    distances = {"pseudo_huber": build_distance("pseudo_huber"), "mfd": mfd}
    result = discrete_tangents(net, batch, distances)
    # the target: x0 where r = 0, else f(x_r, r)
    _, target = consistency_outputs(net, batch)
    assert torch.equal(result.target, target)
    w = batch.weight.view(-1, 1, 1, 1)
    # pseudo-Huber in closed form: grad = (f - y) / sqrt(||f - y||^2 + c^2)
    diff = result.output - result.target
    c = 0.00054 * (3 * 64) ** 0.5
    closed = -w * diff / (diff.flatten(1).square().sum(1) + c * c).sqrt().view(-1, 1, 1, 1)
    assert torch.allclose(result.tangents["pseudo_huber"], closed, rtol=1e-4, atol=1e-6)
    # MFD: autograd through the network, gradient read off the output tensor
    out = net(batch.x_t, batch.t)
    out.retain_grad()
    (batch.weight * mfd(out, result.target)).sum().backward()
    assert torch.allclose(result.tangents["mfd"], -out.grad, rtol=1e-4, atol=1e-6)


def test_aligned_tangent_has_norm_w_and_the_same_direction():
    net, batch = tiny_model(), shapes_batch()
    result = discrete_tangents(net, batch, {"l2": build_distance("l2"), "l2:aligned": Aligned(build_distance("l2"))})
    aligned = result.tangents["l2:aligned"].flatten(1)
    assert torch.allclose(aligned.norm(dim=1), batch.weight, rtol=1e-5)
    unit = result.tangents["l2"].flatten(1)
    assert torch.allclose((aligned * unit).sum(1) / (aligned.norm(dim=1) * unit.norm(dim=1)), torch.ones(9), atol=1e-5)


def test_continuous_tangent_matches_finite_difference_along_the_ode():
    net, batch = tiny_model(), shapes_batch(levels=(0.2, 1.0, 4.0))
    result = continuous_tangent(net, batch)
    h = 1e-3 * batch.t
    view = (-1, 1, 1, 1)
    with torch.no_grad():
        up = net(batch.x0 + (batch.t + h).view(view) * batch.eps, batch.t + h)
        down = net(batch.x0 + (batch.t - h).view(view) * batch.eps, batch.t - h)
    fd = (up - down) / (2 * h.view(view))
    err = (result.velocity - fd).flatten(1).norm(dim=1) / fd.flatten(1).norm(dim=1)
    assert (err < 1e-2).all(), err
    expected = -rms_normalise(result.velocity) / batch.t.view(view)
    assert torch.allclose(result.tangent, expected)


def test_continuous_feature_tangent_is_pulled_back_velocity():
    net, batch = tiny_model(), shapes_batch(levels=(0.5, 2.0))
    mfd = MFD(net=TinyVGG(3, 15, width=4, resolution=8))
    phi = feature_map(mfd)
    result = continuous_tangent(net, batch, phi)
    _, pixel_velocity = output_velocity(net, batch)
    # chain rule: d phi(f)/dt = J_phi(f) df/dt
    _, chained = torch.func.jvp(phi, (result.output,), (pixel_velocity,))
    assert torch.allclose(result.velocity, chained, rtol=1e-4, atol=1e-5)
    f = result.output.clone().requires_grad_(True)
    u = -rms_normalise(result.velocity) / batch.t[:, None]
    (grad,) = torch.autograd.grad((phi(f) * u).sum(), f)
    assert torch.allclose(result.tangent, grad, rtol=1e-4, atol=1e-6)
    assert all_tangents(net, batch, {"continuous:mfd": mfd}).tangents["continuous:mfd"].shape == batch.x0.shape


def test_parse_tangent_names():
    assert parse_tangent_names("pseudo_huber, mfd:aligned,continuous:mfd") == ["pseudo_huber", "mfd:aligned", "continuous:mfd"]
    for bad in ("huber", "l2:unit", "continuous:l2", "l2,l2", ""):
        with pytest.raises(AytError):
            parse_tangent_names(bad)


# ---------------------------------------------------------------- the command
def save_model(run_dir, step: int, kind: str = "ect", data: str = "shapes"):
    res, ch, classes = 8, (3 if data == "shapes" else 1), (0 if data == "shapes" else 10)
    config = tiny_config(f"data.name={data}", f"objective.kind={kind}", "objective.stage_steps=2")
    torch.manual_seed(step)
    sd = perturb(build_net(config, res, ch), step).state_dict()
    state = {"config": config.to_dict(), "kind": kind, "step": step,
             "data_info": {"name": data, "resolution": res, "channels": ch, "num_classes": classes}}
    return save_checkpoint(run_dir, step, {"net": sd, "ema0": sd}, state, keep=5)


def cli(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    return run_cli(parser.parse_args(["tangents", *argv]))


def test_cli_on_shapes_checkpoints_of_one_run(tmp_path, capsys):
    for step in (1, 2, 3):
        save_model(tmp_path / "run", step)
    out = tmp_path / "out"
    assert cli(str(tmp_path / "run"), "--all-checkpoints", "--distances", "pseudo_huber,l2:aligned,continuous",
               "--num", "3", "--buckets", "2", "--out", str(out), "--picture-images", "2") == 0
    report = json.loads((out / "tangents.json").read_text())
    assert [c["step"] for c in report["checkpoints"]] == [1, 2, 3] and report["stage"] == 1
    fractions = report["checkpoints"][-1]["tangents"]["pseudo_huber"]["parallel_fraction"]
    assert len(fractions) == 2 and all(0 <= f <= 1 for f in fractions)
    assert 0 <= report["oscillation"]["l2:aligned"]["parallel"]["consistency"][0] <= 1
    for name in ("tangents.md", "parallel_vs_t.png", "parallel_vs_step.png", "tangents.png"):
        assert (out / name).stat().st_size > 0
    assert "parallel fraction" in (out / "tangents.md").read_text()


def test_cli_without_a_known_manifold_writes_the_picture_only(tmp_path, capsys):
    save_model(tmp_path / "digits", 1, data="digits")
    out = tmp_path / "out"
    assert cli(str(tmp_path / "digits"), "--distances", "l2", "--num", "2", "--buckets", "2", "--out", str(out)) == 0
    assert "no known manifold" in capsys.readouterr().out
    assert (out / "tangents.png").is_file() and not (out / "parallel_vs_t.png").exists()
    assert "parallel_fraction" not in json.loads((out / "tangents.json").read_text())["checkpoints"][0]["tangents"]["l2"]


def test_cli_bad_input(tmp_path):
    edm = save_model(tmp_path / "edm", 1, kind="edm")
    with pytest.raises(AytError, match="diffusion"):
        cli(str(edm))
    ect = save_model(tmp_path / "ect", 1)
    with pytest.raises(AytError, match="--features"):
        cli(str(ect), "--distances", "mfd")
    features = TinyVGG(3, 15, width=4, resolution=16)  # trained at 16x16, the CM sees 8x8
    state = {"kind": "features", "arch": "tiny_vgg", "in_channels": 3, "target_dim": 15, "resolution": 16, "width": 4}
    save_checkpoint(tmp_path / "feat", 0, {"features": features.state_dict()}, state)
    with pytest.raises(AytError, match="resolution 16"):
        cli(str(ect), "--distances", "mfd:aligned", "--features", str(tmp_path / "feat"))
    with pytest.raises(AytError, match="unknown tangent"):
        cli(str(ect), "--distances", "pseudo")
