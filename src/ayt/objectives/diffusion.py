"""EDM denoising score matching (Karras et al. 2022, "EDM", section 5 and table 1).

Used to pretrain the diffusion model that initialises consistency tuning (ECT) or serves as the
teacher for continuous-time distillation.
"""

from __future__ import annotations

import torch
from torch import nn

from ayt.nets.dropout import shared_dropout
from ayt.rng import StepRandom
from ayt.schedules import lognormal_t


class EDMObjective(nn.Module):
    """Per-example EDM loss `lambda(t) * mean ||D(x_0 + t eps, t) - x_0||^2`, shape [B].

    `t ~ exp(N(P_mean, P_std^2))` and `lambda(t) = (t^2 + sd^2) / (t * sd)^2` so that the
    effective target of the raw network has unit variance at every noise level. The mean runs
    over the `C*H*W` elements, so the loss scale does not depend on resolution.
    """

    def __init__(self, p_mean: float = -1.2, p_std: float = 1.2, sigma_data: float = 0.5):
        super().__init__()
        self.p_mean, self.p_std, self.sigma_data = p_mean, p_std, sigma_data

    def forward(
        self,
        net: nn.Module,
        x0: torch.Tensor,
        labels: torch.Tensor | None = None,
        step: int = 0,
        rng: StepRandom | None = None,
    ) -> torch.Tensor:
        rng = rng or StepRandom()
        t = lognormal_t(rng.randn((x0.shape[0],), x0.device), self.p_mean, self.p_std)
        weight = (t**2 + self.sigma_data**2) / (t * self.sigma_data) ** 2
        x_t = x0 + t.view(-1, 1, 1, 1) * rng.randn_like(x0)
        with shared_dropout(net, rng.seed(), rng.rank):  # dropout drawn from `rng` too: resumable
            denoised = net(x_t, t, labels)
        return weight * (denoised - x0).square().flatten(1).mean(1)
