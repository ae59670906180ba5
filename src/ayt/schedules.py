"""Noise-level schedules as pure functions (method.md section 2).

Every function takes explicit inputs (shape, step, generator) and returns tensors; nothing here
holds state, so the training loop, the tests and the tangent analysis share one definition.
"""

from __future__ import annotations

import math

import torch

from ayt.errors import check


def lognormal_t(normal: torch.Tensor, p_mean: float = -1.1, p_std: float = 2.0) -> torch.Tensor:
    """`t = exp(P_mean + P_std * n)` from standard normal draws `n` [B] (ECT / EDM noise levels)."""
    return (normal * p_std + p_mean).exp()


def ect_stage(step: int, stage_steps: int) -> int:
    """The ECT stage at training step `step`: it grows by one every `stage_steps` steps."""
    check(stage_steps > 0, f"stage_steps must be > 0, got {stage_steps}")
    return step // stage_steps


def ect_gap(stage: int, q: float) -> float:
    """`d(stage) = q^-(stage + 1)`: the relative size of the gap `t - r` (method.md section 2)."""
    check(q > 1, f"q must be > 1, got {q}")
    return q ** -(stage + 1)


def ect_r_from_t(t: torch.Tensor, stage: int, q: float = 2.0, k: float = 8.0, b: float = 1.0) -> torch.Tensor:
    """Map `t` [B] to the smaller level `r` [B] (ECT, method.md section 2).

    `r = t * (1 - d(stage) * (1 + k * sigmoid(-b t)))`, clamped at 0, with `d = q^-(stage+1)`.
    Published ECT: `q = 2`, stage += 1 every 25k iterations at batch 128. AYT reference code:
    fixed stage 0 with `q = 256`.
    """
    d = ect_gap(stage, q)
    r = t * (1.0 - d * (1.0 + k * torch.sigmoid(-b * t)))
    return r.clamp(min=0.0)


def karras_sigmas(
    num_steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0
) -> list[float]:
    """EDM's decreasing grid of `num_steps` noise levels from sigma_max to sigma_min (Karras et al. 2022, eq. 5)."""
    check(num_steps >= 1, f"num_steps must be >= 1, got {num_steps}")
    if num_steps == 1:
        return [sigma_max]
    inv = 1.0 / rho
    return [
        (sigma_max**inv + i / (num_steps - 1) * (sigma_min**inv - sigma_max**inv)) ** rho
        for i in range(num_steps)
    ]


def lognormal_quantile(q: float, p_mean: float = -1.1, p_std: float = 2.0) -> float:
    """The `q`-quantile of `t = exp(N(P_mean, P_std^2))`."""
    from statistics import NormalDist

    return math.exp(NormalDist(p_mean, p_std).inv_cdf(q))


def lognormal_bucket_edges(num: int, p_mean: float = -1.1, p_std: float = 2.0) -> list[float]:
    """The `num - 1` inner edges of `num` equal-probability buckets of the lognormal `t` distribution."""
    return [lognormal_quantile(i / num, p_mean, p_std) for i in range(1, num)]


def lognormal_bucket_medians(num: int, p_mean: float = -1.1, p_std: float = 2.0) -> list[float]:
    """The medians of those buckets, increasing: quantiles `(i + 0.5) / num`."""
    check(num >= 1, f"need at least 1 noise-level bucket, got {num}")
    return [lognormal_quantile((i + 0.5) / num, p_mean, p_std) for i in range(num)]
