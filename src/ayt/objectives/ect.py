"""ECT: Easy Consistency Training / Tuning (Geng et al. 2024; method.md section 2).

Per example: `w(t, r) * d(f(x_t, t), stopgrad f(x_r, r))` with the same `x_0` and `eps` in both
calls and the same dropout mask, `w = 1 / (t - r)`, and target `x_0` when `r = 0`.

AYT (method.md section 4) enters through `d`: the aligned MFD term alone (`d = Aligned(MFD)`,
the reference runs), or added to the pixel distance with a weight `lambda(step)` that ramps
linearly from 0 to `extra_weight` over `extra_ramp_steps`:
`w * (d(f, y) + lambda(step) * extra(f, y))`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ayt.nets.dropout import shared_dropout
from ayt.rng import StepRandom
from ayt.schedules import ect_r_from_t, ect_stage, lognormal_t


@dataclass
class ConsistencyPair:
    """One ECT draw: student output, its stop-gradient target and the levels. Shapes in brackets."""

    x0: torch.Tensor  # [B, C, H, W] clean images
    eps: torch.Tensor  # [B, C, H, W] the shared noise
    t: torch.Tensor  # [B] student noise level
    r: torch.Tensor  # [B] target noise level, 0 <= r < t
    student: torch.Tensor  # [B, C, H, W] f(x_t, t), with gradient
    target: torch.Tensor  # [B, C, H, W] stopgrad f(x_r, r), or x_0 where r = 0

    @property
    def weight(self) -> torch.Tensor:
        """`w(t, r) = 1 / (t - r)`, shape [B]."""
        return 1.0 / (self.t - self.r)


def consistency_pair(
    net: nn.Module, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, r: torch.Tensor,
    labels: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(f(x_0 + t eps, t), stopgrad f(x_0 + r eps, r))` for given draws (pure: draws nothing).

    `x0`, `eps` [B, C, H, W], `t`, `r` [B] with `0 <= r < t`; the target is `x_0` where `r = 0`
    (method.md section 2). The student keeps its gradient.
    """
    view = (-1, 1, 1, 1)
    student = net(x0 + t.view(view) * eps, t, labels)
    with torch.no_grad():
        r_safe = torch.where(r > 0, r, t)  # the r = 0 entries are replaced by x0 below
        target = net(x0 + r_safe.view(view) * eps, r_safe, labels)
    return student, torch.where((r > 0).view(view), target, x0).detach()


class ECTObjective(nn.Module):
    """ECT consistency loss; returns per-example values [B].

    Args:
        distance: a distance module `(x, y) -> [B]` (pixel, LPIPS, MFD or an aligned form).
        p_mean, p_std: lognormal `t` distribution.
        q, k, b: the `t -> r` mapping; `d(stage) = q^-(stage+1)`.
        stage_steps: steps per ECT stage (published: 25k at batch 128); `None` keeps stage 0
            forever (the AYT reference: `q = 256`, fixed).
        extra, extra_weight, extra_ramp_steps: an optional second distance added with weight
            `lambda(step)` (e.g. the aligned MFD term next to pseudo-Huber).
    """

    def __init__(
        self,
        distance: nn.Module,
        p_mean: float = -1.1,
        p_std: float = 2.0,
        q: float = 2.0,
        k: float = 8.0,
        b: float = 1.0,
        stage_steps: int | None = 25_000,
        extra: nn.Module | None = None,
        extra_weight: float = 1.0,
        extra_ramp_steps: int = 0,
    ):
        super().__init__()
        self.distance, self.extra = distance, extra
        self.extra_weight, self.extra_ramp_steps = extra_weight, extra_ramp_steps
        self.p_mean, self.p_std = p_mean, p_std
        self.q, self.k, self.b = q, k, b
        self.stage_steps = stage_steps

    def extra_lambda(self, step: int) -> float:
        """`lambda(step)`: the weight of the extra distance, ramped linearly from 0."""
        ramp = min(1.0, step / self.extra_ramp_steps) if self.extra_ramp_steps > 0 else 1.0
        return self.extra_weight * ramp

    def stage(self, step: int) -> int:
        """The ECT stage at training step `step`."""
        return 0 if self.stage_steps is None else ect_stage(step, self.stage_steps)

    def sample(self, x0: torch.Tensor, step: int, rng: StepRandom) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The draws of one step: `(t [B], r [B], eps [B, C, H, W])`, `t` lognormal, `r` by ECT's mapping."""
        t = lognormal_t(rng.randn((x0.shape[0],), x0.device), self.p_mean, self.p_std)
        r = ect_r_from_t(t, self.stage(step), self.q, self.k, self.b)
        return t, r, rng.randn_like(x0)

    def draw(
        self, net: nn.Module, x0: torch.Tensor, labels: torch.Tensor | None, step: int, rng: StepRandom | None = None
    ) -> ConsistencyPair:
        """Sample `(t, r, eps)` and evaluate student and target with one shared dropout mask."""
        rng = rng or StepRandom()
        t, r, eps = self.sample(x0, step, rng)
        with shared_dropout(net, rng.seed(), rng.rank):
            student, target = consistency_pair(net, x0, eps, t, r, labels)
        return ConsistencyPair(x0, eps, t, r, student, target)

    def forward(
        self,
        net: nn.Module,
        x0: torch.Tensor,
        labels: torch.Tensor | None = None,
        step: int = 0,
        rng: StepRandom | None = None,
    ) -> torch.Tensor:
        return self.loss(self.draw(net, x0, labels, step, rng), step)

    def loss(self, pair: ConsistencyPair, step: int) -> torch.Tensor:
        """Per-example `w * (d(f, y) + lambda(step) * extra(f, y))` [B] for a drawn pair."""
        d = self.distance(pair.student, pair.target)
        if self.extra is not None:
            d = d + self.extra_lambda(step) * self.extra(pair.student, pair.target)
        return pair.weight * d
