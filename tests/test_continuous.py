"""Continuous-time consistency training and distillation (method.md section 5)."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from ayt.build import build_objective
from ayt.cli import main
from ayt.config import load_config
from ayt.errors import AytError
from ayt.features.nets import TinyVGG
from ayt.losses.mfd import MFD
from ayt.nets import build_network
from ayt.objectives import ContinuousObjective
from ayt.objectives.continuous import rms_normalise
from ayt.rng import StepRandom

from test_train import tiny as tiny_args


def small_net(dtype=torch.float64, dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(0)
    net = build_network("tiny", img_resolution=8, in_channels=3, dropout=dropout,
                        overrides={"model_channels": 8, "num_blocks": 1, "attn_resolutions": []})
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # the zero-initialised output layer carries signal
    return net.to(dtype).train()


def student_call(net: nn.Module) -> dict:
    """Record the inputs and output of the last grad-enabled call of `net` (the student call)."""
    seen: dict = {}

    def hook(module, args, output):
        if torch.is_grad_enabled():
            seen.update(x=args[0].detach(), t=args[1].detach(), f=output)
            output.retain_grad()

    net.register_forward_hook(hook)
    return seen


def fd_velocity(fn, x: torch.Tensor, t: torch.Tensor, v: torch.Tensor, h: float = 1e-5) -> torch.Tensor:
    """d/dt fn(x + s v, t + s) at s = 0 by central differences (float64)."""
    with torch.no_grad():
        return (fn(x + h * v, t + h) - fn(x - h * v, t - h)) / (2 * h)


@pytest.mark.parametrize("features", [False, True])
def test_gradient_on_the_output_is_the_normalised_ode_velocity_over_t(features):
    """Consistency training: d loss / d phi(f) = u(d phi(f)/dt) / t with v = (x_t - x_0)/t, checked by
    finite differences; with MFD features it reaches f through J_phi^T."""
    net = small_net()
    mfd = MFD(net=TinyVGG(3, 15, width=4, resolution=8)).double() if features else None
    objective = ContinuousObjective(mfd)
    seen = student_call(net)
    x0 = torch.rand(4, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    loss = objective(net, x0, rng=StepRandom(torch.Generator().manual_seed(2)))
    loss.sum().backward()
    x_t, t, f = seen["x"], seen["t"].double(), seen["f"]  # t is drawn in float32
    phi = (lambda y: y) if mfd is None else objective.phi
    velocity = fd_velocity(lambda x, s: phi(net(x, s)), x_t, t, (x_t - x0) / t.view(-1, 1, 1, 1))
    elements = velocity[0].numel()
    u = rms_normalise(velocity) / t.view(-1, *([1] * (velocity.dim() - 1))) / elements
    if mfd is None:
        expected = u
    else:
        _, pull_back = torch.func.vjp(phi, f.detach())
        (expected,) = pull_back(u)
    torch.testing.assert_close(f.grad, expected, rtol=1e-5, atol=1e-8)
    # the value is mean(u^2) / (2 t), not an arbitrary inner product
    unit = rms_normalise(velocity).flatten(1)
    torch.testing.assert_close(loss, 0.5 * unit.square().mean(1) / t)


def test_the_tangent_uses_the_student_call_dropout_mask(monkeypatch):
    """With dropout, the JVP runs under the student call's mask: the gradient matches finite
    differences of the network with that same mask."""
    import ayt.objectives.continuous as continuous
    from ayt.nets.dropout import shared_dropout

    net = small_net(dropout=0.3)
    used = []
    real = continuous.shared_dropout

    def spy(module, seed, part=0):
        used.append((seed, part))
        return real(module, seed, part)

    monkeypatch.setattr(continuous, "shared_dropout", spy)
    seen = student_call(net)
    x0 = torch.rand(4, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    ContinuousObjective()(net, x0, rng=StepRandom(torch.Generator().manual_seed(2))).sum().backward()
    x_t, t, f = seen["x"], seen["t"].double(), seen["f"]
    (seed, part), = used
    with shared_dropout(net, seed, part):
        velocity = fd_velocity(lambda x, s: net(x, s), x_t, t, (x_t - x0) / t.view(-1, 1, 1, 1))
    u = rms_normalise(velocity) / t.view(-1, 1, 1, 1) / velocity[0].numel()
    torch.testing.assert_close(f.grad, u, rtol=1e-5, atol=1e-8)
    with shared_dropout(net, seed + 1, part):  # another mask gives another tangent
        other = fd_velocity(lambda x, s: net(x, s), x_t, t, (x_t - x0) / t.view(-1, 1, 1, 1))
    assert not torch.allclose(other, velocity)


def test_a_compiled_network_stays_compiled():
    """The JVP runs on the plain module: a torch.compile'd network keeps its graph for the student
    call (dynamo would otherwise skip every frame of the network after the JVP)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    net = small_net(torch.float32, dropout=0.2)
    x0 = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    eager = ContinuousObjective()(net, x0, rng=StepRandom(torch.Generator().manual_seed(2)))
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(net, backend="eager", dynamic=False)
    loss = ContinuousObjective()(compiled, x0, rng=StepRandom(torch.Generator().manual_seed(2)))
    graphs = counters["stats"]["unique_graphs"]
    torch._dynamo.reset()
    assert graphs == 1  # the student call, whole (through the JVP: 12 fragments, or none with inductor)
    torch.testing.assert_close(loss, eager)


class OracleTeacher(nn.Module):
    """A perfect denoiser for one known batch: D(x_t, t) = x_0."""

    def __init__(self, x0: torch.Tensor):
        super().__init__()
        self.x0 = x0

    def forward(self, x, t, labels=None):
        return self.x0


def test_distillation_with_a_perfect_teacher_equals_training():
    """v = (x_t - D(x_t, t)) / t; a teacher that returns x_0 gives the training velocity (x_t - x_0) / t."""
    net = small_net(torch.float32)
    x0 = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    ct = ContinuousObjective()(net, x0, rng=StepRandom(torch.Generator().manual_seed(3)))
    cd = ContinuousObjective(teacher=OracleTeacher(x0))(net, x0, rng=StepRandom(torch.Generator().manual_seed(3)))
    torch.testing.assert_close(cd, ct)
    half = ContinuousObjective(teacher=OracleTeacher(0.5 * x0))(net, x0, rng=StepRandom(torch.Generator().manual_seed(3)))
    assert not torch.allclose(half, ct)  # the teacher's prediction is used


def test_cli_continuous_training_and_distillation(tmp_path, capsys):
    """EDM teacher -> continuous CT and CD (pixels, and MFD features) train, resume exactly and sample."""
    edm = tmp_path / "edm"
    assert main(["train", *tiny_args(edm, "objective.kind=edm", "train.steps=4", "train.batch_size=8")]) == 0
    feats = tmp_path / "features"
    assert main(["train-features", *tiny_args(feats, "train.steps=3", "train.batch_size=8", "features.width=4",
                                               "features.holdout=32")]) == 0
    common = ["objective.kind=continuous", f"objective.init={edm}", "train.batch_size=8", "network.dropout=0.3",
              "train.checkpoint_every=2"]
    straight = tmp_path / "ct"
    assert main(["train", *tiny_args(straight, *common, "distance.name=l2", "train.steps=4")]) == 0
    resumed = tmp_path / "ct-resumed"
    assert main(["train", *tiny_args(resumed, *common, "distance.name=l2", "train.steps=2")]) == 0
    assert main(["train", "--resume", str(resumed), "train.steps=4"]) == 0
    from ayt.checkpoint import load_checkpoint

    a, b = load_checkpoint(straight).modules["net"], load_checkpoint(resumed).modules["net"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    init = load_checkpoint(edm).modules["ema0"]
    assert any(not torch.equal(a[k], init[k]) for k in a)  # training moved the weights
    assert main(["train", "--resume", str(resumed), "train.steps=6", "objective.adaptive_weight=true"]) == 2
    assert "has no weights 'logvar'" in capsys.readouterr().err  # the head cannot appear mid-run
    cd = tmp_path / "cd"
    assert main(["train", *tiny_args(cd, *common, "distance.name=mfd", f"distance.features={feats}",
                                     f"objective.teacher={edm}", "train.steps=2")]) == 0
    assert main(["sample", str(cd), "-n", "4", "--steps", "2", "--npz", str(tmp_path / "s.npz")]) == 0


def test_bad_continuous_configs(tmp_path):
    with pytest.raises(AytError, match="objective.kind=continuous"):
        load_config(None, ["objective.teacher=somewhere"])
    with pytest.raises(AytError, match="distance.name=l2"):
        load_config(None, ["objective.kind=continuous", "distance.name=pseudo_huber"])
    ect = tmp_path / "ect"
    assert main(["train", *tiny_args(ect, "train.steps=1", "train.batch_size=4")]) == 0
    config = load_config(None, ["objective.kind=continuous", "distance.name=l2", f"objective.teacher={ect}"])
    with pytest.raises(AytError, match="needs an EDM diffusion model"):
        build_objective(config, 8, 3)


def test_batch_mean_weighting_gives_every_example_mean_one_over_t():
    """objective.weighting=batch_mean: the reference's (1/t)[N,1,1,1] * [N,D] broadcast, i.e. one weight
    mean(1/t) for all examples; per_example divides each by its own t."""
    net = small_net()
    x0 = torch.rand(4, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    seen = student_call(net)
    per = ContinuousObjective()(net, x0, rng=StepRandom(torch.Generator().manual_seed(2)))
    t = seen["t"].double()
    batch = ContinuousObjective(weighting="batch_mean")(net, x0, rng=StepRandom(torch.Generator().manual_seed(2)))
    unweighted = per * t
    # the reference as written: (1/t) [N,1,1,1] times the [N, D] product, broadcast to [N,1,N,D], averaged
    reference = ((1 / t).view(-1, 1, 1, 1) * unweighted.view(-1, 1)).mean()
    torch.testing.assert_close(batch.mean(), reference)
    torch.testing.assert_close(batch, unweighted * (1 / t).mean())
    assert not torch.allclose(batch, per)
    with pytest.raises(AytError, match="weighting"):
        ContinuousObjective(weighting="sum")
    with pytest.raises(AytError, match="objective.weighting"):
        load_config(None, ["objective.weighting=batch_mean"])  # ECT has no continuous weighting
    config = load_config(None, ["objective.kind=continuous", "distance.name=l2", "objective.weighting=batch_mean"])
    assert build_objective(config, 8, 3).weighting == "batch_mean"


def test_effective_sample_size():
    from ayt.objectives.continuous import effective_sample_size, loss_weights
    from ayt.schedules import lognormal_t

    assert effective_sample_size(torch.ones(64)) == pytest.approx(64)
    assert effective_sample_size(torch.tensor([1.0, 0.0, 0.0])) == pytest.approx(1)
    t = lognormal_t(torch.randn(64 * 200, generator=torch.Generator().manual_seed(0)), -1.1, 2.0).view(200, 64)
    per = sum(effective_sample_size(loss_weights(row)) for row in t) / 200
    assert 4 < per < 16  # 1/t is heavy-tailed: about a tenth of the batch
    assert effective_sample_size(loss_weights(t[0], "batch_mean")) == pytest.approx(64)


# ---------------------------------------------------------------- sCM's stabilisers (method.md section 5)
def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest per-example relative error ||a - b|| / ||b||."""
    return float(((a - b).flatten(1).norm(dim=1) / b.flatten(1).norm(dim=1)).max())


def test_tangent_warmup_ramps_the_time_derivative():
    """r = min(1, step / warmup_steps): the tangent is u(J_x f v + r df/dt) at steps 0, half, end, after."""
    from ayt.objectives.continuous import output_tangent, tangent_warmup

    assert [tangent_warmup(s, 10) for s in (0, 5, 10, 15)] == [0.0, 0.5, 1.0, 1.0]
    assert tangent_warmup(0, 0) == 1.0  # off
    net = small_net()
    seen = student_call(net)
    objective = ContinuousObjective(warmup_steps=10)
    x0 = torch.rand(4, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    for step, r in ((0, 0.0), (5, 0.5), (10, 1.0), (15, 1.0)):
        pair = objective.draw(net, x0, step=step, rng=StepRandom(torch.Generator().manual_seed(2)))
        x_t, t = seen["x"], seen["t"]
        v = (x_t - x0) / t.double().view(-1, 1, 1, 1)
        _, along_x = output_tangent(net, x_t, t, v, r=0.0)  # J_x f v
        _, along_t = output_tangent(net, x_t, t, torch.zeros_like(v), r=1.0)  # df/dt at fixed x
        torch.testing.assert_close(pair.tangent, rms_normalise(along_x + r * along_t), rtol=1e-7, atol=1e-9)
    assert _relative(along_t, along_x) > 1e-3  # both parts carry signal


def test_adaptive_weighting_value_and_gradients():
    """loss_i = L_i / exp(u(t_i)) + u(t_i); d mean / d u_i = (1 - L_i exp(-u_i)) / B reaches the head's
    linear layer through its Fourier features; the network's gradient is scaled by exp(-u_i)."""
    net = small_net()
    seen = student_call(net)
    x0 = torch.rand(4, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    draw = lambda: StepRandom(torch.Generator().manual_seed(2))  # noqa: E731
    plain_loss = ContinuousObjective()(net, x0, rng=draw())
    plain_loss.sum().backward()
    plain_grad, t = seen["f"].grad.clone(), seen["t"]
    objective = ContinuousObjective(adaptive_weight=True)
    assert set(objective.trained_modules()) == {"logvar"}
    torch.testing.assert_close(objective(net, x0, rng=draw()), plain_loss)  # zero-initialised head: u = 0
    head = objective.logvar
    with torch.no_grad():
        head.linear.weight.copy_(0.3 * torch.randn(head.linear.weight.shape, generator=torch.Generator().manual_seed(3)))
        head.linear.bias.fill_(0.2)
    loss = objective(net, x0, rng=draw())
    u = head(t).double().detach()
    torch.testing.assert_close(loss.detach(), plain_loss.detach() / u.exp() + u)
    loss.mean().backward()
    coef = (1 - plain_loss.detach() * (-u).exp()) / len(u)
    torch.testing.assert_close(head.linear.weight.grad[0].double(), coef @ head.features(t).double(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(head.linear.bias.grad.double(), coef.sum().view(1), rtol=1e-5, atol=1e-7)
    # mean over the batch here, sum for the plain loss: 1/B
    torch.testing.assert_close(seen["f"].grad, plain_grad * (-u).exp().view(-1, 1, 1, 1) / len(u))


@pytest.mark.parametrize("features", [False, True])
def test_finite_difference_jvp_matches_the_exact_jvp(features):
    """jvp=fd: central differences with h = fd_eps * t agree with torch.func.jvp to ~1e-8 in float64
    (fd_eps 1e-4); in float32 at the default fd_eps 3e-3, to 2e-3 in pixels (measured 1e-3) and 1e-2
    through the ReLU feature network (measured 4e-3: a step across a kink is only first-order)."""
    from ayt.objectives.continuous import FD_EPS, fd_tangent, output_tangent
    from ayt.schedules import lognormal_t

    for dtype, eps, tol in ((torch.float64, 1e-4, 1e-6), (torch.float32, FD_EPS, 1e-2 if features else 2e-3)):
        net = small_net(dtype)
        mfd = MFD(net=TinyVGG(3, 15, width=4, resolution=8)).to(dtype) if features else None
        phi = None if mfd is None else ContinuousObjective(mfd).phi
        g = torch.Generator().manual_seed(1)
        x0 = torch.rand(6, 3, 8, 8, generator=g, dtype=dtype) * 2 - 1
        t = lognormal_t(torch.randn(6, generator=g), -1.1, 2.0).to(dtype)
        v = torch.randn(6, 3, 8, 8, generator=g, dtype=dtype)
        x_t = x0 + t.view(-1, 1, 1, 1) * v
        for r in (1.0, 0.5):
            _, exact = output_tangent(net, x_t, t, v, phi=phi, r=r)
            assert _relative(fd_tangent(net, x_t, t, v, phi=phi, r=r, eps=eps), exact) < tol, (dtype, r)
    # the objective with jvp=fd: the same loss as with the exact JVP, up to the difference error
    x0 = torch.rand(4, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    net = small_net()
    mfd = MFD(net=TinyVGG(3, 15, width=4, resolution=8)).double() if features else None
    exact = ContinuousObjective(mfd)(net, x0, rng=StepRandom(torch.Generator().manual_seed(2)))
    fd = ContinuousObjective(mfd, jvp="fd", fd_eps=1e-4)(net, x0, rng=StepRandom(torch.Generator().manual_seed(2)))
    torch.testing.assert_close(fd, exact, rtol=1e-6, atol=0)


def test_stabilisers_run_in_fp32_under_bf16_autocast():
    """Like the exact JVP, the finite differences and the log-variance head run in fp32 under autocast."""
    from ayt.objectives.continuous import LogVarianceHead, fd_tangent

    net = small_net(torch.float32)
    g = torch.Generator().manual_seed(1)
    x_t, v, t = torch.randn(2, 3, 8, 8, generator=g), torch.randn(2, 3, 8, 8, generator=g), torch.tensor([0.3, 2.0])
    plain = fd_tangent(net, x_t, t, v)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = fd_tangent(net, x_t, t, v)
        u = LogVarianceHead()(t)
    assert mixed.dtype == u.dtype == torch.float32
    torch.testing.assert_close(mixed, plain, rtol=0, atol=0)


def test_cli_training_with_all_stabilisers_resumes_bitwise(tmp_path, capsys):
    """warm-up + adaptive weighting + finite-difference JVP: trains from the CLI on 16x16 shapes, the
    log-variance head is trained and checkpointed, a resumed run equals an uninterrupted one (network,
    EMA, head, optimiser), sampling ignores the head, and resuming with other settings fails in one line."""
    from ayt.build import load_model
    from ayt.checkpoint import load_checkpoint

    common = ["objective.kind=continuous", "distance.name=l2", "data.resolution=16", "train.batch_size=8",
              "network.dropout=0.2", "train.checkpoint_every=2", "objective.warmup_steps=3",
              "objective.adaptive_weight=true", "objective.jvp=fd"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert main(["train", *tiny_args(straight, *common, "train.steps=4")]) == 0
    assert main(["train", *tiny_args(resumed, *common, "train.steps=2")]) == 0
    assert main(["train", "--resume", str(resumed), "train.steps=4"]) == 0
    a, b = load_checkpoint(straight), load_checkpoint(resumed)
    assert set(a.modules) == {"net", "ema0", "logvar"}
    for name in a.modules:
        assert all(torch.equal(a.modules[name][k], b.modules[name][k]) for k in a.modules[name]), name
    opt_a, opt_b = a.extra["optimizer"]["state"], b.extra["optimizer"]["state"]
    assert len(opt_a) == len(list(load_model(straight)[0].parameters())) + 2  # the network's, then the head's
    assert all(torch.equal(opt_a[i]["exp_avg"], opt_b[i]["exp_avg"]) for i in opt_a)
    assert a.modules["logvar"]["linear.bias"].abs().item() > 0  # the head was trained
    import json

    logged = [json.loads(line) for line in (straight / "log.jsonl").read_text().splitlines()]
    assert [r["tangent_warmup"] for r in logged if "tangent_warmup" in r] == pytest.approx([0, 1 / 3, 2 / 3, 1])
    assert main(["sample", str(resumed), "-n", "4", "--npz", str(tmp_path / "s.npz")]) == 0
    capsys.readouterr()
    assert main(["train", "--resume", str(resumed), "train.steps=6", "objective.adaptive_weight=false"]) == 2
    err = capsys.readouterr().err.strip()
    assert "holds weights ['logvar']" in err and "\n" not in err


@pytest.mark.parametrize("override, phrase", [
    ("objective.warmup_steps=-1", "objective.warmup_steps=-1 must be >= 0"),
    ("objective.fd_eps=0", "objective.fd_eps=0.0 must lie in (0, 1)"),
    ("objective.fd_eps=1", "objective.fd_eps=1.0 must lie in (0, 1)"),
    ("objective.jvp=forward", "objective.jvp='forward' is not valid"),
])
def test_bad_stabiliser_values(override, phrase):
    from ayt.config import ObjectiveConfig
    from ayt.objectives.continuous import FD_EPS

    assert ObjectiveConfig().fd_eps == FD_EPS  # the config's default is the library's (config.py cannot import it)
    with pytest.raises(AytError, match=re.escape(phrase)):
        load_config(None, ["objective.kind=continuous", "distance.name=l2", override])


@pytest.mark.parametrize("override", ["objective.warmup_steps=10", "objective.adaptive_weight=true", "objective.jvp=fd"])
def test_stabilisers_are_for_the_continuous_objective_only(override, capsys, tmp_path):
    key = override.split("=")[0]
    assert main(["train", *tiny_args(tmp_path / "ect", override)]) == 2  # ECT (the default kind)
    err = capsys.readouterr().err.strip()
    assert f"{key} applies to objective.kind=continuous only" in err and "\n" not in err
    assert not (tmp_path / "ect").exists()


@pytest.mark.slow
def test_two_processes_average_the_log_variance_head(tmp_path):
    """With adaptive weighting under 2-process gloo DDP, the head (outside DDP) gets the averaged
    gradient: both ranks hold the same head, equal to one process's at the same global batch."""
    from safetensors.torch import load_file

    from test_train import _run_worker

    args = ["objective.kind=continuous", "distance.name=l2", "objective.adaptive_weight=true", "train.batch_size=8",
            "train.steps=3", "train.checkpoint_every=3", "train.device=cpu", "optim.lr=0.01"]
    for name, nproc in (("ddp", 2), ("one", 1)):
        (tmp_path / name).mkdir()
        _run_worker(tmp_path / name, tiny_args(tmp_path / name / "run", *args), nproc=nproc)
    r0, r1 = load_file(tmp_path / "ddp" / "rank0.safetensors"), load_file(tmp_path / "ddp" / "rank1.safetensors")
    single = load_file(tmp_path / "one" / "rank0.safetensors")
    head = [k for k in r0 if k.startswith("logvar.")]
    assert head and single["logvar.linear.bias"].abs().item() > 1e-3  # the head was trained
    for key in r0:
        assert torch.equal(r0[key], r1[key]), key
        assert torch.allclose(r0[key], single[key], atol=1e-5, rtol=0), key


def test_the_log_variance_head_learns_the_expected_loss():
    """Minimising mean(L / exp(u(t)) + u(t)) over the head gives exp(u(t)) = E[L | t]: with L = 1/(2t)
    (the continuous loss of a large tangent), u(t) -> ln(1/(2t)) over the levels lognormal t visits."""
    from ayt.objectives.continuous import LogVarianceHead, adaptive_weighted
    from ayt.schedules import lognormal_t

    head = LogVarianceHead()
    optimizer = torch.optim.Adam(head.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(600):
        t = lognormal_t(torch.randn(128, generator=g), -1.1, 2.0)
        loss = adaptive_weighted(0.5 / t, head(t)).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    t = torch.tensor([0.01, 0.1, 0.5, 2.0, 10.0])
    assert (head(t).detach() - (0.5 / t).log()).abs().max() < 0.2
