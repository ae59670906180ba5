"""Seeded dropout: the consistency student call and its target call share one mask.

method.md section 2 (ECT): the loss compares `f_theta(x_t, t)` with `stopgrad f_theta(x_r, r)`
computed with *the same dropout mask*. Inside `shared_dropout(net, seed)` every `SeededDropout`
layer of `net` takes its mask from a counter-based hash of (element index, `(seed, layer index)`),
so any number of forward passes inside the context (or in another context with the same seed)
see identical masks, whatever their inputs and whatever happens to the global RNG, which the
context never touches. The hash is plain tensor arithmetic: no generator object, so the same
masks come out on CPU and CUDA, and `torch.compile` traces the layer without graph breaks.

Assumption: each `SeededDropout` layer is called at most once per forward pass (true for
`SongUNet` and `DhariwalUNet`). A layer called twice in one forward reuses its mask for both calls inside a context.

Outside any context a `SeededDropout` is exactly `nn.Dropout` (global RNG); in eval mode, or
with `p = 0`, it is the identity.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn
from torch.nn import functional as F

from ayt.errors import AytError, check

_MASK64 = (1 << 64) - 1
_MASK32 = (1 << 32) - 1


def _mix_seed(seed: int, index: int) -> int:
    """Map `(seed, index)` to a well-mixed 63-bit generator seed (splitmix64 finaliser)."""
    z = (seed * 0x9E3779B97F4A7C15 + (index + 1) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) >> 1


def _int32(value: int) -> int:
    """A 32-bit pattern as the signed int32 with the same bits."""
    value &= _MASK32
    return value - (1 << 32) if value >= 1 << 31 else value


#: Spreads consecutive element indices before hashing (2^32 / golden ratio, as int32). It travels
#: in the key tensor rather than as a literal: Inductor folds `arange * literal` into its index
#: arithmetic, and Triton refuses the folded constants (out of int32 range), which broke
#: `train.compile` on CUDA. Multiplying by a loaded value keeps the product in int32 tensor maths.
INDEX_MULTIPLIER = _int32(0x9E3779B9)


def hash_keys(seed: int) -> list[int]:
    """The key of a 64-bit seed as int32 values: its two 32-bit halves and `INDEX_MULTIPLIER`."""
    return [_int32(seed), _int32(seed >> 32), INDEX_MULTIPLIER]


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """The 'lowbias32' integer hash, elementwise on int32 tensors (bit patterns, wrapping products).

    `(x >> k) & mask` is the logical shift of the 32-bit pattern (`>>` alone is arithmetic).
    int32 keeps the mask cheap: about half the cost of `torch.rand` with a generator on CPU.
    """
    x = x ^ ((x >> 16) & 0xFFFF)
    x = x * _int32(0x7FEB352D)
    x = x ^ ((x >> 15) & 0x1FFFF)
    x = x * _int32(0x846CA68B)
    return x ^ ((x >> 16) & 0xFFFF)


def hashed_keep_mask(shape: torch.Size | tuple[int, ...], keys: torch.Tensor, p: float, part: int = 0) -> torch.Tensor:
    """Boolean keep-mask of `shape`: element `i` kept iff `hash(part * numel + i, seed) >= p 2^32` (unsigned).

    `keys` is an int32 tensor `[3]` on the target device: the seed's two 32-bit halves and
    `INDEX_MULTIPLIER` (`hash_keys`). The mask is a pure
    function of (shape, seed, p, part): no generator state, identical on every device, and made
    of tensor ops only, so `torch.compile` traces it without graph breaks or recompiles. `part`
    (a DDP rank) selects that rank's slice of the mask of the global batch, so a run's masks do
    not depend on the number of processes.
    """
    if keys.shape != (3,) or keys.dtype != torch.int32:  # no message formatting on the training path
        raise AytError(f"dropout keys must be an int32 tensor [3] (hash_keys(seed)), got {keys.dtype} {tuple(keys.shape)}")
    n = math.prod(shape)
    check(n * (part + 1) < 2**31, f"dropout on {n * (part + 1)} elements: the seeded mask indexes at most 2^31; "
          "use a smaller batch")
    index = torch.arange(part * n, (part + 1) * n, device=keys.device, dtype=torch.int32).view(shape)
    h = _hash32(index * keys[2] ^ keys[0])
    h = _hash32(h ^ keys[1])
    # Flipping the sign bit maps the unsigned order of the bit patterns onto the signed order:
    # signed(h ^ 0x80000000) = unsigned(h) - 2^31. Keep iff unsigned(h) >= round(p 2^32).
    threshold = min(int(round(p * 2**32)), 2**32 - 1)
    return (h ^ _int32(0x80000000)) >= threshold - 2**31


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
        self.shared = False  # whether `shared_seed` is set (forward reads only this flag: a
        # compiled graph guards on its value, and on an int it would recompile per seed)
        self.part = 0  # this process's slice of the global batch (its DDP rank; fixed per process)
        # The same seed as a tensor (`hash_keys`), filled in place by `shared_dropout`: a buffer,
        # so a compiled graph reads its value instead of specialising on it.
        self.register_buffer("seed_keys", torch.tensor(hash_keys(0), dtype=torch.int32), persistent=False)

    def extra_repr(self) -> str:
        return f"p={self.p}"

    def set_shared_seed(self, seed: int | None, part: int = 0, keys: torch.Tensor | None = None) -> None:
        """Share masks under `seed` (None: back to plain dropout). `keys`: the seed's `hash_keys`
        already on this layer's device (`shared_dropout` moves all layers' at once)."""
        self.shared_seed, self.shared, self.part = seed, seed is not None, part
        if seed is not None:
            if keys is None:
                keys = torch.tensor(hash_keys(seed), dtype=torch.int32)
            self.seed_keys.copy_(keys)

    def keep_mask(self, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
        """Boolean keep-mask of `shape` for this layer's shared seed (see `hashed_keep_mask`)."""
        return hashed_keep_mask(shape, self.seed_keys, self.p, self.part)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if not self.shared:
            return F.dropout(x, self.p, training=True)
        return x * self.keep_mask(x.shape).to(x.dtype) / (1.0 - self.p)


class SeededLabelDropout(SeededDropout):
    """Drop whole rows (one class-label vector per example) with probability `p`, no rescaling.

    forward: `y [B, L] -> [B, L]`, row `b` set to zero with probability `p` (EDM label dropout,
    which trains the unconditional model used by classifier-free guidance).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        rows = (x.shape[0], *([1] * (x.dim() - 1)))
        if not self.shared:
            keep = torch.rand(rows, device=x.device) >= self.p
        else:
            keep = self.keep_mask(rows)
        return x * keep.to(x.dtype)


def _keys_on_device(seeds: list[int], device: torch.device) -> torch.Tensor:
    """`[L, 3]` int32 `hash_keys` of the layers' seeds on `device`, in one host-to-device copy
    (pinned and asynchronous on CUDA, instead of one blocking copy per layer)."""
    keys = torch.tensor([hash_keys(s) for s in seeds], dtype=torch.int32)
    if device.type == "cuda":
        return keys.pin_memory().to(device, non_blocking=True)
    return keys.to(device)


@contextmanager
def shared_dropout(module: nn.Module, seed: int, part: int = 0) -> Iterator[None]:
    """Make every `SeededDropout` in `module` use a mask fixed by `(seed, layer index)`.

    Layer indices follow `module.modules()` order. Usage (method.md section 2)::

        with shared_dropout(net, seed):
            y_student = net(x_t, t)
            with torch.no_grad():
                y_target = net(x_r, r)      # same masks as the student call

    Nested contexts: the innermost seed wins; the previous seeds are restored on exit. `part` is
    the DDP rank: rank r takes rows r*B..(r+1)*B-1 of the global batch's masks (B local rows).
    """
    check(isinstance(seed, int), f"shared_dropout seed must be an int, got {type(seed).__name__}; "
          "draw one with torch.randint(...).item()")
    layers = [m for m in module.modules() if isinstance(m, SeededDropout)]
    previous = [(layer.shared_seed, layer.part) for layer in layers]
    seeds = [_mix_seed(seed, index) for index in range(len(layers))]
    keys = _keys_on_device(seeds, layers[0].seed_keys.device) if layers else None
    for index, layer in enumerate(layers):
        layer.set_shared_seed(seeds[index], part, keys[index])
    try:
        yield
    finally:
        for layer, (old, old_part) in zip(layers, previous):
            layer.set_shared_seed(old, old_part)  # nested contexts only copy again
