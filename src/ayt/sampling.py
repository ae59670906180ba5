"""Stateless samplers (method.md section 1; EDM Heun from Karras et al. 2022, algorithm 1).

All samplers take the network, the initial standard-normal noise `z` [B, C, H, W] and an
optional `torch.Generator` for the noise added between steps, and return images in about [-1, 1].
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from ayt.errors import check
from ayt.schedules import karras_sigmas

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
    num_steps: int = 18,
    labels: torch.Tensor | None = None,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho: float = 7.0,
) -> torch.Tensor:
    """Deterministic EDM Heun sampler for a diffusion denoiser `D(x, t)` (2 * num_steps - 1 calls)."""
    sigmas = karras_sigmas(num_steps, sigma_min, sigma_max, rho) + [0.0]
    x = z * sigmas[0]
    for t_cur, t_next in zip(sigmas[:-1], sigmas[1:]):
        d_cur = (x - net(x, _levels(z, t_cur), labels)) / t_cur
        x_next = x + (t_next - t_cur) * d_cur
        if t_next > 0:  # second-order correction
            d_next = (x_next - net(x_next, _levels(z, t_next), labels)) / t_next
            x_next = x + (t_next - t_cur) * 0.5 * (d_cur + d_next)
        x = x_next
    return x


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
        check(False, f"bad sampling schedule '{spec}'; use 1, 2 or a comma list like 80,0.821")
        raise  # unreachable, keeps type checkers happy
