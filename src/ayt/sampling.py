"""Stateless samplers (method.md sections 1 and 8; EDM Heun from Karras et al. 2022, algorithm 1).

Every sampler has one signature, schedule in, images out:
`sampler(net, z, sigmas, labels=None, generator=None, sigma_min=0.002) -> [B, C, H, W]`, with
`z` standard-normal noise [B, C, H, W], `sigmas` the decreasing noise levels and `generator`
the noise added between steps. `Schedule` names a sampler and its levels (`schedule_for` builds
the one of a run's config); `generate` runs a schedule on given noise, `stream` draws the noise
(and labels) from a seed and yields batches. Training grids, `ayt sample`, evaluation and the
demo all sample through `generate` / `stream`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

import torch
from torch import nn

from ayt.config import HEUN_STEPS
from ayt.errors import AytError, check
from ayt.schedules import karras_sigmas

if TYPE_CHECKING:
    from ayt.config import Config

DEFAULT_T_MID = 0.821  # ECT's CIFAR-10 intermediate level for 2-step sampling


def _levels(z: torch.Tensor, t: float) -> torch.Tensor:
    return torch.full((z.shape[0],), float(t), device=z.device, dtype=z.dtype)


def check_decreasing(sigmas: Sequence[float], sigma_min: float) -> None:
    """Raise unless `sigmas` is a non-empty strictly decreasing list above `sigma_min`."""
    check(len(sigmas) >= 1, "the list of sampling noise levels is empty; give at least sigma_max")
    check(
        all(a > b for a, b in zip(sigmas, sigmas[1:])),
        f"sampling noise levels must decrease strictly, got {list(sigmas)}",
    )
    check(sigmas[-1] > sigma_min, f"sampling noise levels must exceed sigma_min={sigma_min}, got {list(sigmas)}")


@torch.no_grad()
def consistency_sample(
    net: nn.Module,
    z: torch.Tensor,
    sigmas: Sequence[float] = (80.0,),
    labels: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    sigma_min: float = 0.002,
) -> torch.Tensor:
    """Consistency multistep sampling (Song et al. 2023, algorithm 1).

    `x = f(sigmas[0] z, sigmas[0])`, then for each next level `s`:
    `x = f(x + sqrt(s^2 - sigma_min^2) z', s)`. `sigmas=(80,)` is 1-step sampling and
    `(80, 0.821)` is ECT's 2-step sampling.
    """
    check_decreasing(sigmas, sigma_min)
    x = net(z * sigmas[0], _levels(z, sigmas[0]), labels)
    for s in sigmas[1:]:
        # drawn where the generator lives (a CPU generator may drive a CUDA sampler)
        where = generator.device if generator is not None else z.device
        noise = torch.randn(z.shape, device=where, dtype=z.dtype, generator=generator).to(z.device)
        x = x + math.sqrt(s * s - sigma_min * sigma_min) * noise
        x = net(x, _levels(z, s), labels)
    return x


@torch.no_grad()
def edm_heun_sample(
    net: nn.Module,
    z: torch.Tensor,
    sigmas: Sequence[float],
    labels: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    sigma_min: float = 0.002,
) -> torch.Tensor:
    """Deterministic EDM Heun sampler for a diffusion denoiser `D(x, t)` from `sigmas[0]` to 0
    (`2 len(sigmas) - 1` calls; `sigmas` = `karras_sigmas(n)`). `generator` and `sigma_min` are
    unused (deterministic; the grid holds sigma_min); they keep the samplers' one signature."""
    sigmas = [*sigmas, 0.0]
    x = z * sigmas[0]
    for t_cur, t_next in zip(sigmas[:-1], sigmas[1:]):
        d_cur = (x - net(x, _levels(z, t_cur), labels)) / t_cur
        x_next = x + (t_next - t_cur) * d_cur
        if t_next > 0:  # second-order correction
            d_next = (x_next - net(x_next, _levels(z, t_next), labels)) / t_next
            x_next = x + (t_next - t_cur) * 0.5 * (d_cur + d_next)
        x = x_next
    return x


@torch.no_grad()
def meanflow_sample(
    net: nn.Module,
    z: torch.Tensor,
    sigmas: Sequence[float] = (1.0,),
    labels: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    sigma_min: float = 0.0,
) -> torch.Tensor:
    """MeanFlow sampling (Geng et al. 2025; method.md section 8) with the average velocity `u(z, r, t)`.

    `sigmas` are the times `1 = t_0 > t_1 > ... > t_{n-1} > 0` (then 0): `z_{t_0} = z` is the noise
    and each step jumps `z_r = z_t - (t - r) u(z_t, r, t)`; `(1.0,)` is 1-step sampling
    `x = z - u(z, 0, 1)`. Deterministic: `generator` and `sigma_min` keep the samplers' signature.
    """
    check_times(sigmas)
    times = [*sigmas, 0.0]
    for t, r in zip(times[:-1], times[1:]):
        z = z - (t - r) * net(z, _levels(z, r), _levels(z, t), labels)
    return z


def check_times(times: Sequence[float]) -> None:
    """Raise unless `times` is a MeanFlow grid: starts at 1, decreases strictly, stays above 0."""
    check(len(times) >= 1 and times[0] == 1.0, f"MeanFlow sampling times must start at 1 (the noise), got {list(times)}")
    check(all(a > b for a, b in zip(times, times[1:])) and times[-1] > 0,
          f"MeanFlow sampling times must decrease strictly and stay above 0, got {list(times)}")


def parse_times(spec: str | Sequence[float]) -> list[float]:
    """A MeanFlow schedule: `"N"` -> N uniform steps `[1, (N-1)/N, ..., 1/N]`, or an explicit comma
    list of times such as `"1,0.5"`; checked by `check_times`."""
    if not isinstance(spec, str):
        times = [float(s) for s in spec]
    elif spec.strip().isdigit():
        n = int(spec)
        check(n >= 1, f"MeanFlow sampling needs at least 1 step, got {spec!r}")
        times = [1.0 - i / n for i in range(n)]
    else:
        try:
            times = [float(s) for s in spec.split(",")]
        except ValueError:
            raise AytError(f"bad MeanFlow schedule '{spec}'; use a number of steps N or a comma list of times like 1,0.5") from None
    check_times(times)
    return times


def parse_sigmas(spec: str | Sequence[float], sigma_max: float = 80.0) -> list[float]:
    """Parse a sampling schedule: `"1"` -> [sigma_max], `"2"` -> [sigma_max, 0.821],
    or an explicit comma-separated list of decreasing levels such as `"80,1.5,0.4"`."""
    if not isinstance(spec, str):
        return [float(s) for s in spec]
    spec = spec.strip()
    if spec == "1":
        return [sigma_max]
    if spec == "2":
        return [sigma_max, DEFAULT_T_MID]
    try:
        return [float(s) for s in spec.split(",")]
    except ValueError:
        raise AytError(f"bad sampling schedule '{spec}'; use 1, 2 or a comma list like 80,0.821") from None


# ---------------------------------------------------------------- the one entry point
Sampler = Callable[..., torch.Tensor]  # (net, z, sigmas, labels, generator, sigma_min) -> images
SAMPLERS: dict[str, Sampler] = {"consistency": consistency_sample, "heun": edm_heun_sample,
                                 "meanflow": meanflow_sample}


@dataclass(frozen=True)
class Schedule:
    """A sampler (a key of `SAMPLERS`) and its decreasing noise levels."""

    sampler: str
    sigmas: tuple[float, ...]
    sigma_min: float = 0.002


def schedule_for(config: Config, steps: str | Sequence[float] = "1", heun_steps: int = HEUN_STEPS) -> Schedule:
    """The schedule of a run: EDM Heun on `karras_sigmas(heun_steps)` for a diffusion model
    (`objective.kind` edm, `steps` ignored), MeanFlow jumps on `parse_times(steps)` for a MeanFlow
    model, else consistency sampling on `parse_sigmas(steps)`."""
    nc = config.network
    if config.objective.kind == "edm":
        return Schedule("heun", tuple(karras_sigmas(heun_steps, nc.sigma_min, nc.sigma_max)), nc.sigma_min)
    if config.objective.kind == "meanflow":
        return Schedule("meanflow", tuple(parse_times(steps)), 0.0)
    return Schedule("consistency", tuple(parse_sigmas(steps, nc.sigma_max)), nc.sigma_min)


def generate(net: nn.Module, z: torch.Tensor, schedule: Schedule, labels: torch.Tensor | None = None,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """Images [B, C, H, W] from the noise `z` [B, C, H, W] by `schedule`."""
    return SAMPLERS[schedule.sampler](net, z, schedule.sigmas, labels, generator, schedule.sigma_min)


@torch.no_grad()
def stream(net: nn.Module, schedule: Schedule, n: int, batch: int = 256, seed: int = 0,
           device: str | torch.device = "cpu", conditional: bool = False) -> Iterator[torch.Tensor]:
    """Stream `n` samples in batches `[<= batch, C, H, W]` on `device`.

    The noise `z` (and the class labels of a conditional net) come from a CPU generator seeded
    with `seed`, so they do not depend on the device or the batch size; the noise between the
    steps of a multistep schedule from a generator on `device` seeded with `seed + 1`.
    """
    check(n > 0 and batch > 0, f"need n > 0 and batch > 0 to sample, got {n} and {batch}")
    generator = torch.Generator().manual_seed(seed)
    step_noise = torch.Generator(device).manual_seed(seed + 1)
    shape = (net.img_channels, net.img_resolution, net.img_resolution)
    label_dim = getattr(net, "label_dim", 0)
    for start in range(0, n, batch):
        z = torch.randn((min(batch, n - start), *shape), generator=generator).to(device)
        labels = None
        if conditional and label_dim:
            labels = torch.randint(0, label_dim, (len(z),), generator=generator).to(device)
        yield generate(net, z, schedule, labels, step_noise)
