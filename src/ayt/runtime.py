"""Process, device, data-order and run-folder plumbing shared by every training loop."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch
import torch.distributed as dist
from torch import nn

from ayt.checkpoint import find_latest
from ayt.config import OptimConfig
from ayt.data import ImageDataset
from ayt.errors import AytError, check


# ---------------------------------------------------------------- processes and devices
@dataclass
class DistInfo:
    """This process's place in a torchrun job (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device_pref: str) -> DistInfo:
    """Join the torchrun process group when `WORLD_SIZE > 1` (nccl on CUDA, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return DistInfo()
    info = DistInfo(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    use_cuda = device_pref != "cpu" and torch.cuda.is_available()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    if not use_cuda:  # several processes share the cores: more threads than cores is very slow
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world))))
    return info


def resolve_device(pref: str, info: DistInfo) -> torch.device:
    """`auto` picks this rank's GPU when there is one, else the CPU."""
    if pref == "auto":
        pref = "cuda" if torch.cuda.is_available() else "cpu"
    if pref == "cuda":
        pref = f"cuda:{info.local_rank}"
    check(pref == "cpu" or torch.cuda.is_available(), f"train.device={pref} but CUDA is not available; use train.device=cpu")
    return torch.device(pref)


# ---------------------------------------------------------------- data order
class BatchStream:
    """Global batches from an endless stream of seeded permutations; each rank takes its slice."""

    def __init__(self, dataset: ImageDataset, seed: int, info: DistInfo):
        self.dataset, self.seed, self.info = dataset, seed, info
        self._perms: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            if len(self._perms) >= 2:  # a batch spans at most two epochs
                self._perms.pop(min(self._perms))
            g = torch.Generator().manual_seed(self.seed * 7919 + epoch)
            self._perms[epoch] = torch.randperm(len(self.dataset), generator=g)
        return self._perms[epoch]

    def indices(self, start: int, count: int) -> torch.Tensor:
        """Dataset indices at stream positions `start .. start + count - 1`."""
        n = len(self.dataset)
        pos = torch.arange(start, start + count)
        epochs, out = pos // n, torch.empty_like(pos)
        for epoch in epochs.unique().tolist():
            mask = epochs == epoch
            out[mask] = self._perm(epoch)[pos[mask] % n]
        return out

    def batch(self, position: int, global_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's share of the global batch starting at stream `position`."""
        local = global_size // self.info.world
        idx = self.indices(position + self.info.rank * local, local)
        images, labels = self.dataset.images[idx], self.dataset.labels[idx]
        return images.to(device, non_blocking=True), labels.to(device, non_blocking=True)


# ---------------------------------------------------------------- run folder
def prepare_run_dir(run_dir: str | Path, resume: bool) -> Path:
    """Create (or check, when resuming) the run folder; never touch an existing run otherwise."""
    run_dir = Path(run_dir)
    has_ckpt = run_dir.is_dir() and find_latest(run_dir) is not None
    if resume:
        check(has_ckpt, f"--resume {run_dir}: no checkpoint there; train first or pass the right run folder")
    else:
        check(not has_ckpt, f"{run_dir} already holds a run; pass --resume {run_dir} to continue it or set train.run_dir to a new folder")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise AytError(f"cannot write to run folder {run_dir} ({err.strerror}); choose a writable train.run_dir") from None
    return run_dir


# ---------------------------------------------------------------- optimisation helpers
def make_optimizer(optim: OptimConfig, params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    """RAdam (default) or Adam from `config.optim`."""
    cls = torch.optim.RAdam if optim.name == "radam" else torch.optim.Adam
    return cls(params, lr=optim.lr, betas=tuple(optim.betas), weight_decay=optim.weight_decay)


def lr_at(step: int, base: float, warmup: int) -> float:
    """Learning rate at `step`: linear warm-up from 0 over `warmup` steps, then `base`."""
    return base * min(1.0, (step + 1) / warmup) if warmup > 0 else base


def wrap_ddp(net: nn.Module, info: DistInfo, device: torch.device) -> nn.Module:
    """`net` wrapped in DistributedDataParallel when there are several processes."""
    if info.world == 1:
        return net
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(net, device_ids=ids)


def no_sync(model: nn.Module, skip: bool) -> contextlib.AbstractContextManager:
    """Skip DDP's gradient all-reduce for a micro-batch that is not the last of its step."""
    if skip and isinstance(model, nn.parallel.DistributedDataParallel):
        return model.no_sync()
    return contextlib.nullcontext()


def barrier(info: DistInfo) -> None:
    if info.world > 1:
        dist.barrier()


def finish_distributed(info: DistInfo) -> None:
    """Leave the process group cleanly at the end of a torchrun job."""
    if info.world > 1 and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
