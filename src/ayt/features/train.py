"""Self-supervised training of the feature network `phi` of MFD (method.md section 4).

`train_features(config)` reads top to bottom: set up processes and the run folder, split off the
held-out images (the last `features.holdout` images of the dataset, fixed), build the
perturbations and the network, restore a checkpoint when resuming, then loop: fetch the batch of
this step, perturb it, regress the perturbation parameters with MSE, update the weights, and do
maintenance (log, held-out evaluation, checkpoints). Data order (`BatchStream`) and perturbations
(a generator seeded by `(seed, step, micro-batch, rank)`) are pure functions of the step, so a
resumed run is bitwise identical to an uninterrupted one on CPU.

Held-out evaluation (at every checkpoint and at the end): the held-out images are perturbed
with a fixed seed and probability `max(features.p, 0.5)` (so that about half of the images carry
each perturbation and the error is not dominated by the many zero targets of p = 0.15), and for
each target group (geometric / colour / degradation) we report the MSE of the predictions, the
MSE of predicting zeros (the mean squared target) and their ratio (below 1: better than zeros).
They go to the run log (`eval/mse_geometric`, `eval/mse_zero_geometric`,
`eval/ratio_geometric`, ...), the checkpoint state (`heldout`) and `RUN_DIR/heldout.json`.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ayt.build import build_data
from ayt.checkpoint import check_compatible, load_checkpoint, save_checkpoint
from ayt.config import Config, save_config
from ayt.data import ImageDataset
from ayt.errors import check
from ayt.features.augment import TARGET_NAMES, Perturber, perturbation_slices, target_groups
from ayt.features.load import FEATURES_KIND, FEATURES_MODULE
from ayt.features.nets import build_feature_net
from ayt.runlog import Progress, RunLogger
from ayt.runtime import (
    BatchStream,
    barrier,
    finish_distributed,
    init_distributed,
    lr_at,
    make_optimizer,
    no_sync,
    prepare_run_dir,
    resolve_device,
    wrap_ddp,
)

HELDOUT_FILE = "heldout.json"
EVAL_P_MIN = 0.5  # held-out perturbation probability is max(features.p, EVAL_P_MIN)
EVAL_SEED_OFFSET = 999_983  # the held-out perturbations use seed + this, fixed for the whole run
EVAL_CHUNK = 256  # held-out images per forward pass (mixup partners are drawn within a chunk)
BN_BATCHES = 32  # perturbed training batches that re-estimate BatchNorm statistics at the end


@dataclass
class FeatureRunResult:
    """What `train_features` returns; `heldout` as in `evaluate_heldout` (empty if holdout = 0)."""

    run_dir: Path
    step: int
    last_loss: float
    wall_s: float
    images_seen: int
    heldout: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------- pieces
def split_holdout(dataset: ImageDataset, holdout: int) -> tuple[ImageDataset, Tensor]:
    """(training images, held-out images [holdout, C, H, W]): the last `holdout` images are held out."""
    n = len(dataset)
    check(holdout < n, f"features.holdout={holdout} leaves no training images out of {n}; lower features.holdout")
    keep = n - holdout
    train = ImageDataset(dataset.name, dataset.images[:keep], dataset.labels[:keep], dataset.num_classes)
    return train, dataset.images[keep:]


def step_generator(seed: int, step: int, micro: int, rank: int) -> torch.Generator:
    """The CPU generator of the perturbations of one (micro-)batch on one rank."""
    return torch.Generator().manual_seed(((seed * 1_000_003 + step) * 1_009 + micro) * 997 + rank)


@torch.no_grad()
def recalibrate_batchnorm(net: nn.Module, batches: Iterable[Tensor]) -> None:
    """Re-estimate every BatchNorm's running statistics as the plain average over `batches`.

    The frozen feature network runs in eval mode (method.md section 4), i.e. with running
    statistics; the exponential averages collected during training can lag far behind the
    final weights (seen on the `geo` subset: held-out MSE 0.65 in eval mode, 0.24 with batch
    statistics), so they are recomputed once, at the end of training, with the final weights.
    """
    norms = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    was_training, momenta = net.training, [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    net.train()
    for x in batches:
        net(x)
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    net.train(was_training)


@torch.no_grad()
def evaluate_heldout(
    net: nn.Module, images: Tensor, subset: str, p: float, seed: int, device: torch.device,
    aniso_target: str = "paper", recipe: str = "reference",
) -> dict[str, Any]:
    """Per-group held-out regression error of `net` (eval mode) on perturbed `images` [N, C, H, W].

    Returns {"p", "recipe", "images", "groups": {group: {"mse", "mse_zero", "ratio"}},
    "perturbations": {name: {...}}, "slots": {target name: {...}}}; `ratio` is mse / mse_zero
    (None where nothing of the group, perturbation or slot was applied, e.g. the colour slots of
    gray images).
    """
    perturber = Perturber(subset, max(p, EVAL_P_MIN), 0, aniso_target, recipe)
    generator = torch.Generator().manual_seed(seed + EVAL_SEED_OFFSET)
    was_training = net.training
    net.eval()
    preds, targets = [], []
    for start in range(0, len(images), EVAL_CHUNK):
        x, target = perturber(images[start : start + EVAL_CHUNK].to(device), generator)
        preds.append(net(x).float().cpu())
        targets.append(target.float().cpu())
    net.train(was_training)
    pred, target = torch.cat(preds), torch.cat(targets)

    def errors(slots: slice) -> dict[str, float | None]:
        mse = float((pred[:, slots] - target[:, slots]).square().mean())
        mse_zero = float(target[:, slots].square().mean())
        return {"mse": mse, "mse_zero": mse_zero, "ratio": mse / mse_zero if mse_zero > 0 else None}

    groups = {group: errors(slots) for group, slots in target_groups(subset).items()}
    perturbations = {name: errors(slots) for name, slots in perturbation_slices(subset).items()}
    per_slot = {name: errors(slice(i, i + 1)) for i, name in enumerate(TARGET_NAMES[subset])}
    return {"p": perturber.p, "recipe": recipe, "images": len(images), "groups": groups,
            "perturbations": perturbations, "slots": per_slot}


def heldout_metrics(heldout: dict[str, Any]) -> dict[str, float]:
    """Flatten an `evaluate_heldout` result into run-log metrics (eval/mse_geometric, ...)."""
    out = {}
    for group, values in heldout.get("groups", {}).items():
        for key, value in values.items():
            if value is not None:
                out[f"eval/{key}_{group}"] = value
    return out


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    """Write JSON atomically (temp file + os.replace)."""
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=1)
    os.replace(tmp, path)


# ---------------------------------------------------------------- the trainer
class FeatureTrainer:
    """One feature-network run; `run()` is the loop. Use `train_features(config)`."""

    def __init__(self, config: Config, resume: bool = False) -> None:
        self.config = config
        tc, fc = config.train, config.features
        self.info = init_distributed(tc.device)
        self.device = resolve_device(tc.device, self.info)
        check(tc.batch_size % (tc.grad_accum * self.info.world) == 0,
              f"train.batch_size={tc.batch_size} must be divisible by grad_accum x processes = {tc.grad_accum * self.info.world}")
        self.run_dir = prepare_run_dir(tc.run_dir, resume) if self.info.main else Path(tc.run_dir)
        barrier(self.info)

        # Data (training part + fixed held-out part), perturbations, network, optimiser.
        dataset = build_data(config)
        self.train_set, self.heldout_images = split_holdout(dataset, fc.holdout)
        self.perturber = Perturber(fc.subset, fc.p, fc.ramp_steps, fc.aniso_target, fc.recipe)
        with torch.random.fork_rng(devices=[]):  # seeded initial weights, identical on every rank
            torch.manual_seed(tc.seed)
            self.net = build_feature_net(fc.arch, in_channels=dataset.channels, target_dim=self.perturber.target_dim,
                                        resolution=dataset.resolution, width=fc.width)
        self.net.to(self.device).train()
        self.optimizer = make_optimizer(config.optim, self.net.parameters())
        self.step, self.images_seen, self.wall_s = 0, 0, 0.0
        self.heldout: dict[str, Any] = {}
        if resume:
            self._restore()
        self.model = wrap_ddp(self.net, self.info, self.device)
        self.stream = BatchStream(self.train_set, tc.seed, self.info)

    def _restore(self) -> None:
        ckpt = load_checkpoint(self.run_dir, map_location="cpu")
        s = ckpt.state
        check(s.get("kind") == FEATURES_KIND, f"{ckpt.path} is not a feature-network run; resume it with 'ayt train'")
        check_compatible(ckpt.modules[FEATURES_MODULE], self.net, str(ckpt.path))
        self.net.load_state_dict(ckpt.modules[FEATURES_MODULE])
        self.optimizer.load_state_dict(ckpt.extra["optimizer"])
        self.step, self.images_seen, self.wall_s = s["step"], s["images_seen"], s["wall_s"]
        self.heldout = s.get("heldout") or {}

    # ---- the loop
    def run(self) -> FeatureRunResult:
        tc, info = self.config.train, self.info
        logger = None
        if info.main:
            save_config(self.config, self.run_dir / "config.yaml")
            lc = self.config.log
            logger = RunLogger(self.run_dir, lc.tensorboard, lc.wandb, lc.wandb_project, self.config.to_dict(), resume_step=self.step)
        progress = Progress(tc.steps, self.step, tc.batch_size, enabled=info.main and self.config.log.progress)
        micro_global = tc.batch_size // tc.grad_accum
        window: list[float] = []
        last_loss = math.nan
        session_start, session_wall0 = time.perf_counter(), self.wall_s

        for step in range(self.step, tc.steps):
            # 1. Regression loss over the micro-batches (data and perturbations keyed by (seed, step)).
            for group in self.optimizer.param_groups:
                group["lr"] = lr_at(step, self.config.optim.lr, self.config.optim.warmup_steps)
            self.optimizer.zero_grad(set_to_none=True)
            step_loss = 0.0
            for micro in range(tc.grad_accum):
                x0, _ = self.stream.batch((step * tc.grad_accum + micro) * micro_global, micro_global, self.device)
                x, target = self.perturber(x0, step_generator(tc.seed, step, micro, info.rank), step)
                with no_sync(self.model, micro < tc.grad_accum - 1):
                    loss = F.mse_loss(self.model(x), target)
                    (loss / tc.grad_accum).backward()
                step_loss += loss.item() / tc.grad_accum

            # 2. Update the weights (optionally clipped).
            if self.config.optim.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(self.net.parameters(), self.config.optim.grad_clip)
            self.optimizer.step()
            check(math.isfinite(step_loss), f"loss became {step_loss} at step {step}; lower optim.lr or set optim.grad_clip")

            # 3. Book-keeping and maintenance: log, held-out evaluation + checkpoint.
            done = step + 1
            self.step, self.images_seen = done, done * tc.batch_size
            self.wall_s = session_wall0 + time.perf_counter() - session_start
            window.append(step_loss)
            last_loss = step_loss
            progress.update(done, step_loss)
            final = done == tc.steps
            if logger and (done % tc.log_every == 0 or final):
                metrics = {"loss": sum(window) / len(window), "lr": self.optimizer.param_groups[0]["lr"],
                           "p": self.perturber.probability(step)}
                logger.log(done, metrics, images_seen=self.images_seen)
                window.clear()
            if final:
                recalibrate_batchnorm(self.net, self._bn_batches(micro_global))
            if done % tc.checkpoint_every == 0 or final:
                self._evaluate(done, logger)
                self.save(done)
        progress.close()
        if logger:
            logger.close()
        finish_distributed(self.info)
        return FeatureRunResult(self.run_dir, self.step, last_loss, self.wall_s, self.images_seen, self.heldout)

    def _evaluate(self, step: int, logger: RunLogger | None) -> None:
        fc = self.config.features
        if not self.info.main or len(self.heldout_images) == 0:
            return
        result = evaluate_heldout(self.net, self.heldout_images, fc.subset, fc.p, self.config.train.seed, self.device,
                                  fc.aniso_target, fc.recipe)
        self.heldout = {"step": step, **result}
        _write_json(self.run_dir / HELDOUT_FILE, self.heldout)
        if logger:
            logger.log(step, heldout_metrics(self.heldout), images_seen=self.images_seen)

    def _bn_batches(self, size: int) -> Iterator[Tensor]:
        """Fixed perturbed training batches for `recalibrate_batchnorm` (same on every run)."""
        generator = torch.Generator().manual_seed(self.config.train.seed + EVAL_SEED_OFFSET + 1)
        p = self.perturber.probability(None)
        fc = self.config.features
        perturber = Perturber(fc.subset, p, 0, fc.aniso_target, fc.recipe)
        for i in range(BN_BATCHES):
            x0, _ = self.stream.batch(i * size, size, self.device)
            yield perturber(x0, generator)[0]

    def save(self, step: int) -> None:
        """Checkpoint the network and optimiser; the state rebuilds the network (see `load_feature_net`)."""
        if not self.info.main:
            return
        fc = self.config.features
        state = {
            "kind": FEATURES_KIND,
            "config": self.config.to_dict(),
            "arch": fc.arch,
            "in_channels": self.train_set.channels,
            "target_dim": self.perturber.target_dim,
            "resolution": self.train_set.resolution,
            "subset": fc.subset,
            "width": fc.width if fc.arch == "tiny_vgg" else None,
            "target_names": list(TARGET_NAMES[fc.subset]),
            "data": self.train_set.name,
            "step": step,
            "images_seen": self.images_seen,
            "wall_s": self.wall_s,
            "heldout": self.heldout,
            "torch": torch.__version__,
        }
        extra = {"optimizer": self.optimizer.state_dict()}
        save_checkpoint(self.run_dir, step, {FEATURES_MODULE: self.net.state_dict()}, state, extra,
                        keep=self.config.train.keep_checkpoints)


def train_features(config: Config, resume: bool = False) -> FeatureRunResult:
    """Train (or resume) the feature network described by `config.features`; returns a summary."""
    return FeatureTrainer(config, resume).run()


# ---------------------------------------------------------------- command line
