"""Randomness for one training step, independent of the number of processes.

`StepRandom` draws the random numbers of a *global* batch from one generator seeded by
`(seed, step, micro-batch)` and hands each rank its slice. So a run's noise does not depend on
the world size (2 ranks at batch 2B draw exactly what 1 process at batch 2B draws), and a run
resumed at step k draws exactly what the uninterrupted run drew: no RNG state to carry.
"""

from __future__ import annotations

import torch


class StepRandom:
    """Rank-sliced draws for one (micro-)step; shapes are the local batch's.

    Args:
        generator: the shared generator (same seed on every rank); None uses the global RNG
            (convenient in tests and notebooks, then the rank slicing is skipped).
        rank, world: this process's slice of the global batch.
    """

    def __init__(self, generator: torch.Generator | None = None, rank: int = 0, world: int = 1, key: int = 0):
        self.generator, self.rank, self.world, self.key = generator, rank, world, key

    @classmethod
    def for_step(cls, seed: int, step: int, micro: int, device: torch.device, rank: int = 0, world: int = 1) -> "StepRandom":
        """The draws of micro-batch `micro` of training step `step` (seeded, device-side)."""
        key = (seed * 1_000_003 + step) * 1_009 + micro
        generator = torch.Generator(device=device)
        generator.manual_seed(key)
        return cls(generator, rank, world, key)

    def rank_generator(self) -> torch.Generator:
        """A CPU generator of this rank alone, seeded by (seed, step, micro-batch, rank): for draws
        that each rank makes for its own images (the perturbations of feature training)."""
        return torch.Generator().manual_seed(self.key * 997 + self.rank)

    def _slice(self, full: torch.Tensor, local: int) -> torch.Tensor:
        return full[self.rank * local : (self.rank + 1) * local]

    def randn(self, shape: tuple[int, ...] | torch.Size, device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Standard normal draws of the local `shape` [B, ...]."""
        if self.generator is None:
            return torch.randn(tuple(shape), device=device, dtype=dtype)
        full = torch.randn((shape[0] * self.world, *shape[1:]), generator=self.generator, device=self.generator.device, dtype=dtype)
        return self._slice(full, shape[0]).to(device)

    def randn_like(self, x: torch.Tensor) -> torch.Tensor:
        return self.randn(x.shape, x.device, x.dtype)

    def seed(self) -> int:
        """One integer seed, the same on every rank (e.g. for a shared dropout mask)."""
        g = self.generator
        device = g.device if g is not None else "cpu"
        return int(torch.randint(0, 2**62, (1,), generator=g, device=device))
