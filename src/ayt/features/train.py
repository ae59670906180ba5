"""Self-supervised training of the feature network `phi` of MFD (method.md section 4).

`FeatureTask` is the task that the training engine (`ayt.train.Trainer`, run by
`ayt.train.train_features(config)`) trains: the held-out images (the last `features.holdout`
images of the dataset, fixed) are split off, each training batch is perturbed and the network
regresses the perturbation parameters (per-example MSE). Its hooks re-estimate the BatchNorm
statistics at the end and evaluate on the held-out images at every checkpoint. Data order and
perturbations (a CPU generator seeded by `(seed, step, micro-batch, rank)`,
`StepRandom.rank_generator`) are pure functions of the step, so a resumed run is bitwise
identical to an uninterrupted one on CPU.

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator

import torch
from torch import Tensor, nn

from ayt.checkpoint import Checkpoint
from ayt.config import Config
from ayt.data import ImageDataset
from ayt.files import atomic_write
from ayt.errors import check
from ayt.features.augment import TARGET_NAMES, Perturber, perturbation_slices, target_groups
from ayt.features.load import FEATURES_KIND, FEATURES_MODULE
from ayt.features.nets import build_feature_net
from ayt.rng import StepRandom

if TYPE_CHECKING:
    from ayt.runlog import RunLogger
    from ayt.train import Trainer

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


# ---------------------------------------------------------------- the task
class FeatureTask:
    """The feature network as a task of the training engine (`ayt.train.Task`): no EMAs, the
    weights saved as module "features" with the state that rebuilds the network."""

    kind, module, emas = FEATURES_KIND, FEATURES_MODULE, False

    def __init__(self, config: Config, dataset: ImageDataset, device: torch.device) -> None:
        self.config, self.device = config, device
        fc = config.features
        self.dataset, self.heldout_images = split_holdout(dataset, fc.holdout)
        self.perturber = Perturber.from_config(fc)
        with torch.random.fork_rng(devices=[]):  # seeded initial weights, identical on every rank
            torch.manual_seed(config.train.seed)
            self.net = build_feature_net(fc.arch, in_channels=dataset.channels, target_dim=self.perturber.target_dim,
                                        resolution=dataset.resolution, width=fc.width)
        self.heldout: dict[str, Any] = {}

    def loss(self, model: nn.Module, batch: tuple[Tensor, Tensor], step: int, rng: StepRandom) -> Tensor:
        """Per-example MSE [B] between the predicted and the drawn perturbation parameters."""
        x, target = self.perturber(batch[0], rng.rank_generator(), step)
        return (model(x) - target).square().mean(1)

    def check_checkpoint(self, ckpt: Checkpoint, run_dir: Path) -> None:
        check(ckpt.state.get("kind") == FEATURES_KIND,
              f"{ckpt.path} is not a feature-network run; resume it with 'ayt train --resume {run_dir}'")

    def restore(self, state: dict[str, Any]) -> None:
        self.heldout = state.get("heldout") or {}

    def state(self) -> dict[str, Any]:
        """What rebuilds the network (see `load_feature_net`), and the latest held-out errors."""
        fc, d = self.config.features, self.dataset
        return {"arch": fc.arch, "in_channels": d.channels, "target_dim": self.perturber.target_dim,
                "resolution": d.resolution, "subset": fc.subset, "width": fc.width if fc.arch == "tiny_vgg" else None,
                "target_names": list(TARGET_NAMES[fc.subset]), "data": d.name, "heldout": self.heldout}

    def log_scalars(self, step: int) -> dict[str, float]:
        return {"p": self.perturber.probability(step)}

    def maintain(self, engine: Trainer, done: int, final: bool, logger: RunLogger | None) -> None:
        """At the end: re-estimate the BatchNorm statistics; at every checkpoint: held-out errors."""
        tc = self.config.train
        if final:
            recalibrate_batchnorm(self.net, self._bn_batches(engine, tc.batch_size // tc.grad_accum))
        if (done % tc.checkpoint_every == 0 or final) and engine.info.main:
            self._evaluate(engine, done, logger)

    def _evaluate(self, engine: Trainer, step: int, logger: RunLogger | None) -> None:
        fc = self.config.features
        if len(self.heldout_images) == 0:
            return
        result = evaluate_heldout(self.net, self.heldout_images, fc.subset, fc.p, self.config.train.seed, self.device,
                                  fc.aniso_target, fc.recipe)
        self.heldout = {"step": step, **result}
        atomic_write(engine.run_dir / HELDOUT_FILE, json.dumps(self.heldout, indent=1))
        if logger:
            logger.log(step, heldout_metrics(self.heldout), images_seen=engine.state.images_seen)

    def _bn_batches(self, engine: Trainer, size: int) -> Iterator[Tensor]:
        """Fixed perturbed training batches for `recalibrate_batchnorm` (same on every run)."""
        generator = torch.Generator().manual_seed(self.config.train.seed + EVAL_SEED_OFFSET + 1)
        p = self.perturber.probability(None)
        fc = self.config.features
        perturber = Perturber(fc.subset, p, 0, fc.aniso_target, fc.recipe)
        for i in range(BN_BATCHES):
            x0, _ = engine.stream.batch(i * size, size, self.device)
            yield perturber(x0, generator)[0]
