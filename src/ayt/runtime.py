"""Process, device, data-order and run-folder plumbing shared by every training loop."""

from __future__ import annotations

import contextlib
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch
import torch.distributed as dist
from torch import nn

from ayt.checkpoint import Checkpoint, checkpoint_at, continue_from, find_latest, load_checkpoint
from ayt.config import Config, OptimConfig, save_config
from ayt.data import ImageDataset
from ayt.errors import AytError, check
from ayt.runlock import RunLock


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


def check_device(device: str, flag: str) -> torch.device:
    """The device named by a command-line flag; AytError if it is malformed or absent on this machine."""
    try:
        d = torch.device(device)
    except (RuntimeError, ValueError):
        raise AytError(f"{flag} {device}: not a device name; use cpu, cuda or cuda:N") from None
    if d.type == "cuda":
        check(torch.cuda.is_available(), f"{flag} {device}: CUDA is not available on this machine; use {flag} cpu")
        check(d.index is None or d.index < torch.cuda.device_count(),
              f"{flag} {device}: this machine has {torch.cuda.device_count()} GPU(s); use cuda:0 .. cuda:{torch.cuda.device_count() - 1}")
    else:
        check(d.type == "cpu", f"{flag} {device}: use cpu, cuda or cuda:N")
    return d


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
def check_run_dir(run_dir: str | Path, resume: bool) -> None:
    """Before anything is written: no other process trains in the folder, a fresh run never overwrites
    a run, a resume needs a checkpoint."""
    run_dir = Path(run_dir)
    RunLock(run_dir).check_free()
    _check_contents(run_dir, resume)


def _check_contents(run_dir: Path, resume: bool) -> None:
    has_ckpt = run_dir.is_dir() and find_latest(run_dir) is not None
    if resume:
        check(has_ckpt, f"--resume {run_dir}: no checkpoint there; train first or pass the right run folder")
    else:
        check(not has_ckpt, f"{run_dir} already holds a run; pass --resume {run_dir} to continue it or set train.run_dir to a new folder")


def open_run_dir(run_dir: str | Path, resume: bool) -> RunLock:
    """Create the run folder and make this process its only writer (see `ayt.runlock`).

    Call it after the config, data and networks have been checked, so that bad input leaves no
    folder behind; the checks of `check_run_dir` are repeated under the lock.
    """
    run_dir = Path(run_dir)
    check_run_dir(run_dir, resume)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise AytError(f"cannot write to run folder {run_dir} ({err.strerror}); choose a writable train.run_dir") from None
    lock = RunLock(run_dir).acquire()
    try:
        _check_contents(run_dir, resume)  # another writer may have finished in between
    except AytError:
        lock.release()
        raise
    return lock


def claim_run_dir(info: DistInfo, config: Config, resume: bool, restore: Callable[[], None]) -> RunLock | None:
    """Lock `train.run_dir` (rank 0), then call `restore()` when resuming or write config.yaml for a
    fresh run. The lock is released again if that fails; otherwise the caller releases it."""
    run_dir = Path(config.train.run_dir)
    lock = open_run_dir(run_dir, resume) if info.main else None
    barrier(info)
    try:
        if resume:
            restore()
        elif info.main:
            save_config(config, run_dir / "config.yaml")
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    return lock


def resume_checkpoint(info: DistInfo, run_dir: Path, steps: int, from_step: int | None = None) -> Checkpoint:
    """The checkpoint a resume continues from: the latest, or the one at `from_step` (after it is
    loaded and checked, the newer ones are set aside, see `continue_from`). `train.steps` below its
    step is an error."""
    ckpt = load_checkpoint(run_dir if from_step is None else checkpoint_at(run_dir, from_step), map_location="cpu")
    check(steps >= ckpt.step, f"train.steps={steps} is below the step {ckpt.step} of the checkpoint {ckpt.path}; "
          f"pass train.steps=N with N >= {ckpt.step} to train longer")
    if from_step is not None and info.main:
        continue_from(run_dir, from_step)
    barrier(info)
    return ckpt


# ---------------------------------------------------------------- optimisation helpers
def make_optimizer(optim: OptimConfig, params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    """RAdam (default) or Adam from `config.optim`."""
    cls = torch.optim.RAdam if optim.name == "radam" else torch.optim.Adam
    return cls(params, lr=optim.lr, betas=tuple(optim.betas), weight_decay=optim.weight_decay)


def lr_at(step: int, base: float, warmup: int) -> float:
    """Learning rate at `step`: linear warm-up from 0 over `warmup` steps, then `base`."""
    return base * min(1.0, (step + 1) / warmup) if warmup > 0 else base


class FiniteGuard:
    """Decides, before the optimiser step, whether a step's loss and gradients are finite.

    A finite step returns True. A non-finite one returns False (the caller skips the update and
    the EMAs) while at most `skip_limit` such steps come in a row (`train.skip_nonfinite`);
    beyond that it raises AytError, so nothing non-finite ever reaches the weights. With several
    processes the decision is all-reduced, so every rank skips or stops together.
    """

    def __init__(self, skip_limit: int, info: DistInfo, device: torch.device, first_step: int) -> None:
        self.skip_limit, self.info, self.device, self.first_step = skip_limit, info, device, first_step
        self.in_row = 0
        self.skipped = 0  # steps skipped in this session

    def step_ok(self, step: int, loss: float, params: Iterable[nn.Parameter]) -> bool:
        bad = not math.isfinite(loss) or not grads_finite(params)
        if self.info.world > 1:
            flag = torch.tensor([float(bad)], device=self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            bad = bool(flag.item())
        if not bad:
            self.in_row = 0
            return True
        self.in_row += 1
        self.skipped += 1
        if self.in_row > self.skip_limit:
            raise AytError(self._stop_message(step, loss))
        warnings.warn(f"step {step}: non-finite loss or gradients (loss {loss}); step skipped "
                      f"({self.in_row} in a row, train.skip_nonfinite={self.skip_limit})", stacklevel=2)
        return False

    def _stop_message(self, step: int, loss: float) -> str:
        what = f"the loss is {loss}" if not math.isfinite(loss) else "the gradients hold NaN or inf"
        if step == self.first_step:
            return (f"{what} at step {step}, the first of this session, before any weight update, so the learning "
                    "rate is not the cause: check the starting weights (objective.init), the data and the network "
                    "settings; nothing was saved")
        row = f" for {self.in_row} steps in a row (train.skip_nonfinite={self.skip_limit})" if self.skip_limit else ""
        return (f"{what} at step {step}{row}; the step was not applied and nothing non-finite was saved (the latest "
                "checkpoint is intact); lower optim.lr, set optim.grad_clip, or skip such steps with "
                "train.skip_nonfinite=N, then resume with --resume RUN_DIR")


@torch.no_grad()
def grads_finite(params: Iterable[nn.Parameter]) -> bool:
    """Whether every gradient is free of NaN and inf (one reduction over all of them)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return True
    return bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())


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


def average_gradients(params: Iterable[nn.Parameter], info: DistInfo) -> None:
    """Average the gradients of parameters outside DDP (a task's trained modules) over the processes."""
    if info.world == 1:
        return
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad.div_(info.world)


def barrier(info: DistInfo) -> None:
    if info.world > 1:
        dist.barrier()


def finish_distributed(info: DistInfo) -> None:
    """Leave the process group cleanly at the end of a torchrun job."""
    if info.world > 1 and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
