"""Seeded dropout: the consistency student call and its target call share one mask.

method.md section 2 (ECT): the loss compares `f_theta(x_t, t)` with `stopgrad f_theta(x_r, r)`
computed with *the same dropout mask*. Inside `shared_dropout(net, seed)` every `SeededDropout`
layer of `net` draws its mask from a private `torch.Generator` seeded from `(seed, layer index)`,
so any number of forward passes inside the context (or in another context with the same seed)
see identical masks, whatever their inputs and whatever happens to the global RNG, which the
context never touches.

Assumption: each `SeededDropout` layer is called at most once per forward pass (true for
`SongUNet`). A layer called twice in one forward reuses its mask for both calls inside a context.

Outside any context a `SeededDropout` is exactly `nn.Dropout` (global RNG); in eval mode, or
with `p = 0`, it is the identity.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn
from torch.nn import functional as F

from ayt.errors import check

_MASK64 = (1 << 64) - 1


def _mix_seed(seed: int, index: int) -> int:
    """Map `(seed, index)` to a well-mixed 63-bit generator seed (splitmix64 finaliser)."""
    z = (seed * 0x9E3779B97F4A7C15 + (index + 1) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) >> 1


class SeededDropout(nn.Module):
    """Elementwise dropout with rate `p`; the mask is shared inside `shared_dropout`.

    forward: `x [*] -> [*]`, each element zeroed with probability `p`, survivors scaled by
    `1 / (1 - p)` (as `nn.Dropout`).
    """

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        check(0.0 <= p < 1.0, f"dropout p={p} is outside [0, 1); pick a rate such as 0.1")
        self.p = float(p)
        self.shared_seed: int | None = None  # set by `shared_dropout`, else None

    def extra_repr(self) -> str:
        return f"p={self.p}"

    def keep_mask(self, shape: torch.Size | tuple[int, ...], device: torch.device) -> torch.Tensor:
        """Boolean keep-mask of `shape` drawn from this layer's private generator (float32 draws)."""
        assert self.shared_seed is not None
        generator = torch.Generator(device=device)
        generator.manual_seed(self.shared_seed)
        return torch.rand(shape, generator=generator, device=device) >= self.p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if self.shared_seed is None:
            return F.dropout(x, self.p, training=True)
        return x * self.keep_mask(x.shape, x.device).to(x.dtype) / (1.0 - self.p)


class SeededLabelDropout(SeededDropout):
    """Drop whole rows (one class-label vector per example) with probability `p`, no rescaling.

    forward: `y [B, L] -> [B, L]`, row `b` set to zero with probability `p` (EDM label dropout,
    which trains the unconditional model used by classifier-free guidance).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        rows = (x.shape[0], *([1] * (x.dim() - 1)))
        if self.shared_seed is None:
            keep = torch.rand(rows, device=x.device) >= self.p
        else:
            keep = self.keep_mask(rows, x.device)
        return x * keep.to(x.dtype)


@contextmanager
def shared_dropout(module: nn.Module, seed: int) -> Iterator[None]:
    """Make every `SeededDropout` in `module` use a mask fixed by `(seed, layer index)`.

    Layer indices follow `module.modules()` order. Usage (method.md section 2)::

        with shared_dropout(net, seed):
            y_student = net(x_t, t)
            with torch.no_grad():
                y_target = net(x_r, r)      # same masks as the student call

    Nested contexts: the innermost seed wins; the previous seeds are restored on exit.
    """
    check(isinstance(seed, int), f"shared_dropout seed must be an int, got {type(seed).__name__}; "
          "draw one with torch.randint(...).item()")
    layers = [m for m in module.modules() if isinstance(m, SeededDropout)]
    previous = [layer.shared_seed for layer in layers]
    for index, layer in enumerate(layers):
        layer.shared_seed = _mix_seed(seed, index)
    try:
        yield
    finally:
        for layer, old in zip(layers, previous):
            layer.shared_seed = old
