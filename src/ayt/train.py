"""The training loop shared by every objective (EDM pretraining, ECT, ECT + AYT).

`train(config)` reads top to bottom: set up processes and the run folder, build data / network /
objective, restore a checkpoint when resuming, then loop: fetch the batch of this step, compute
the loss, update weights, update the EMAs, and do maintenance (log, sample grids, evaluation,
checkpoints). Data order and noise are pure functions of `(seed, step)`, so a resumed run is
bitwise identical to an uninterrupted one on CPU and the noise does not depend on the world size.
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ayt.build import build_data, build_net, build_objective, load_model
from ayt.checkpoint import check_compatible, check_finite, require_keys, save_checkpoint
from ayt.config import Config, save_config
from ayt.errors import AytError, check
from ayt.nets.edm_pickle import is_edm_pickle
from ayt.images import save_grid
from ayt.rng import StepRandom
from ayt.runtime import (
    BatchStream,
    FiniteGuard,
    barrier,
    claim_run_dir,
    check_run_dir,
    finish_distributed,
    init_distributed,
    lr_at,
    make_optimizer,
    no_sync,
    resume_checkpoint,
    resolve_device,
    wrap_ddp,
)
from ayt.runlog import Progress, RunLogger, better_is_higher
from ayt.sampling import generate, schedule_for

Evaluator = Callable[[nn.Module, int], dict[str, float]]  # (EMA model, step) -> metrics


# ---------------------------------------------------------------- EMA
@torch.no_grad()
def update_ema(ema: nn.Module, net: nn.Module, decay: float) -> None:
    """`ema <- decay * ema + (1 - decay) * net` for parameters; buffers are copied."""
    for e, p in zip(ema.parameters(), net.parameters()):
        e.lerp_(p.detach(), 1.0 - decay)
    for e, b in zip(ema.buffers(), net.buffers()):
        e.copy_(b)


def make_ema(net: nn.Module) -> nn.Module:
    ema = copy.deepcopy(net).eval()
    ema.requires_grad_(False)
    return ema


# ---------------------------------------------------------------- the run's state
@dataclass
class RunState:
    """What the loop carries besides tensors; saved as JSON in every checkpoint."""

    step: int = 0
    images_seen: int = 0
    wall_s: float = 0.0  # training seconds over all sessions of this run
    metrics: list[dict] = field(default_factory=list)  # evaluation history
    best: dict | None = None  # best evaluation so far


@dataclass
class RunResult:
    """What `train` returns."""

    run_dir: Path
    step: int
    last_loss: float
    wall_s: float
    images_seen: int


def _ema_name(i: int) -> str:
    return f"ema{i}"


def _init_from(net: nn.Module, path: str, resolution: int, channels: int) -> None:
    """Copy the EMA weights of another run's checkpoint or of an EDM pickle (e.g. an EDM model to tune with ECT)."""
    source, source_config = load_model(path, which="ema")
    check((source.img_resolution, source.img_channels) == (resolution, channels),
          f"objective.init={path} was trained on {source.img_channels}x{source.img_resolution}^2 images, this data is "
          f"{channels}x{resolution}^2; set data.resolution={source.img_resolution} or initialise from a model of this data")
    try:
        check_compatible(source.state_dict(), net, path)
    except AytError:
        if not is_edm_pickle(path):
            raise
        n = source_config.network
        flow = ", ".join(f"{k}: {list(v) if isinstance(v, (list, tuple)) else v}" for k, v in n.overrides.items())
        overrides = f' "network.overrides={{{flow}}}"' if n.overrides else ""
        raise AytError(f"objective.init={path} is an EDM network of another architecture than this run's; "
                       f"set network.preset={n.preset}{overrides} to train it") from None
    net.load_state_dict(source.state_dict())


class Trainer:
    """Holds one run's objects; `run()` is the loop. Use `train(config)` unless you extend it."""

    def __init__(self, config: Config, resume: bool = False, evaluator: Evaluator | None = None,
                 from_step: int | None = None):
        self.config, self.evaluator = config, evaluator
        tc = config.train
        self.info = init_distributed(tc.device)
        self.device = resolve_device(tc.device, self.info)
        check(
            tc.batch_size % (tc.grad_accum * self.info.world) == 0,
            f"train.batch_size={tc.batch_size} must be divisible by grad_accum x processes = {tc.grad_accum * self.info.world}",
        )
        if tc.precision == "bf16" and self.device.type != "cuda":
            warnings.warn("train.precision=bf16 uses autocast on CUDA only; this CPU run uses fp32")
        self.run_dir, self.lock = Path(tc.run_dir), None
        if self.info.main:
            check_run_dir(self.run_dir, resume)

        # Data, network, EMAs, objective, optimiser (all checked before the run folder is touched).
        self.dataset = build_data(config)
        self.data_info = {
            "name": self.dataset.name,
            "resolution": self.dataset.resolution,
            "channels": self.dataset.channels,
            "num_classes": self.dataset.num_classes,
        }
        torch.manual_seed(tc.seed)  # the initial weights (identical on every rank)
        self.net = build_net(config, self.dataset.resolution, self.dataset.channels, self.dataset.num_classes)
        if config.objective.init and not resume:
            _init_from(self.net, config.objective.init, self.dataset.resolution, self.dataset.channels)
        self.net.to(self.device).train()
        self.emas = [make_ema(self.net) for _ in tc.ema_decays]
        self.objective = build_objective(config, self.dataset.resolution, self.dataset.channels).to(self.device)
        self.optimizer = make_optimizer(config.optim, self.net.parameters())
        self.state = RunState()
        if self.evaluator is None and config.eval.every and self.info.main:
            from ayt.metrics.evaluate import build_evaluator

            self.evaluator = build_evaluator(config, self.dataset, self.device)

        # The run folder: one writer (a lock the OS frees when this process ends), then the checkpoint.
        self.lock = claim_run_dir(self.info, config, resume, lambda: self._restore(from_step))
        self.model = self._wrap(self.net)
        self.stream = BatchStream(self.dataset, tc.seed, self.info)
        self.grid_noise = torch.randn(
            (tc.grid_size, self.dataset.channels, self.dataset.resolution, self.dataset.resolution),
            generator=torch.Generator().manual_seed(tc.seed + 12345),
        )

    # ---- set-up helpers
    def _wrap(self, net: nn.Module) -> nn.Module:
        # The network traces as one graph (seeded dropout is plain tensor arithmetic) and recompiles
        # once, for the target's no-grad call; batch shapes are fixed, so dynamic=False.
        return wrap_ddp(torch.compile(net, dynamic=False) if self.config.train.compile else net, self.info, self.device)

    def _restore(self, from_step: int | None) -> None:
        ckpt = resume_checkpoint(self.info, self.run_dir, self.config.train.steps, from_step)
        require_keys(ckpt.state, ("kind", "images_seen", "wall_s"), ckpt.path)
        check(ckpt.state["kind"] != "features", f"{self.run_dir} is a feature-network run; "
              f"resume it with 'ayt train-features --resume {self.run_dir}'")
        check("net" in ckpt.modules, f"{ckpt.path} has no weights 'net'; pass a run written by 'ayt train'")
        check_compatible(ckpt.modules["net"], self.net, str(ckpt.path))
        for weights in ckpt.modules.values():
            check_finite(weights, ckpt.path)
        self.net.load_state_dict(ckpt.modules["net"])
        for i, ema in enumerate(self.emas):
            name = _ema_name(i)
            check(name in ckpt.modules, f"{ckpt.path} has no weights '{name}'; keep train.ema_decays as in the run's config.yaml")
            ema.load_state_dict(ckpt.modules[name])
        self.optimizer.load_state_dict(ckpt.extra["optimizer"])
        s = ckpt.state
        self.state = RunState(ckpt.step, s["images_seen"], s["wall_s"], s.get("metrics", []), s.get("best"))

    def close(self) -> None:
        """Release the run folder (also done when the process ends, however it ends)."""
        if self.lock is not None:
            self.lock.release()

    # ---- the loop
    def run(self) -> RunResult:
        try:
            return self._loop()
        finally:
            self.close()

    def _loop(self) -> RunResult:
        tc, info = self.config.train, self.info
        logger = None
        if info.main:
            lc = self.config.log
            logger = RunLogger(self.run_dir, lc.tensorboard, lc.wandb, lc.wandb_project, self.config.to_dict(), resume_step=self.state.step)
        progress = Progress(tc.steps, self.state.step, tc.batch_size, enabled=info.main and self.config.log.progress)
        micro_global = tc.batch_size // tc.grad_accum
        window: list[float] = []
        last_loss = math.nan
        session_start, session_wall0 = time.perf_counter(), self.state.wall_s
        guard = FiniteGuard(tc.skip_nonfinite, info, self.device, self.state.step)

        for step in range(self.state.step, tc.steps):
            # 1. Loss over the micro-batches of this step (noise and data keyed by (seed, step)).
            for group in self.optimizer.param_groups:
                group["lr"] = lr_at(step, self.config.optim.lr, self.config.optim.warmup_steps)
            self.optimizer.zero_grad(set_to_none=True)
            step_loss = 0.0
            for micro in range(tc.grad_accum):
                x0, labels = self.stream.batch((step * tc.grad_accum + micro) * micro_global, micro_global, self.device)
                rng = StepRandom.for_step(tc.seed, step, micro, self.device, info.rank, info.world)
                with no_sync(self.model, micro < tc.grad_accum - 1), self._autocast():
                    loss = self.objective(self.model, x0, labels if self.config.network.conditional else None, step, rng).mean()
                (loss / tc.grad_accum).backward()
                step_loss += loss.item() / tc.grad_accum

            # 2. Update weights (optionally clipped), then the EMAs -- only if the loss and gradients are
            #    finite (otherwise the step is skipped, or training stops: see train.skip_nonfinite).
            if guard.step_ok(step, step_loss, self.net.parameters()):
                if self.config.optim.grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_(self.net.parameters(), self.config.optim.grad_clip)
                self.optimizer.step()
                for ema, decay in zip(self.emas, tc.ema_decays):
                    update_ema(ema, self.net, decay)

            # 3. Book-keeping and maintenance (rank 0 logs, evaluates, samples and writes).
            done = step + 1
            self.state.step, self.state.images_seen = done, done * tc.batch_size
            self.state.wall_s = session_wall0 + time.perf_counter() - session_start
            window.append(step_loss)
            last_loss = step_loss
            progress.update(done, step_loss)
            final = done == tc.steps
            if logger and (done % tc.log_every == 0 or final):
                skipped = {"skipped_nonfinite": guard.skipped} if tc.skip_nonfinite else {}
                logger.log(done, {"loss": sum(window) / len(window), "lr": self.optimizer.param_groups[0]["lr"], **skipped},
                           **self._compute())
                window.clear()
            if info.main and self.evaluator and self._evaluate_now(done, final):
                self._evaluate(done, logger)
            if info.main and ((tc.sample_every and done % tc.sample_every == 0) or final):
                self.sample_grid(done)
            if done % tc.checkpoint_every == 0 or final:
                self.save(done)
        progress.close()
        if logger:
            logger.close()
        finish_distributed(self.info)
        return RunResult(self.run_dir, self.state.step, last_loss, self.state.wall_s, self.state.images_seen)

    def _evaluate_now(self, done: int, final: bool) -> bool:
        """Every `eval.every` steps, and at the end of a run that is at least `eval.every` steps long
        (a smoke test with train.steps=2 does not pay for a full evaluation)."""
        every = self.config.eval.every
        return bool(every) and (done % every == 0 or (final and done >= every))

    def _autocast(self):
        use_bf16 = self.config.train.precision == "bf16" and self.device.type == "cuda"
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=use_bf16)

    def _compute(self) -> dict:
        name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"
        return {"images_seen": self.state.images_seen, "device": name, "world": self.info.world}

    # ---- maintenance
    def _evaluate(self, step: int, logger: RunLogger | None) -> None:
        metrics = self.evaluator(self.emas[0], step)
        record = {"step": step, "wall_s": round(self.state.wall_s, 3), **self._compute(), **metrics}
        self.state.metrics.append(record)
        key, mode = best_metric(self.config, metrics)
        previous = self.state.best.get(key) if self.state.best else None
        better = previous is None or (metrics[key] > previous if mode == "max" else metrics[key] < previous)
        if better:
            self.state.best = {**record, "best_metric": key, "best_mode": mode}
            self.save(step, name_suffix="best")
        if logger:
            chosen = {"best_by": f"{key} ({mode})", "best_step": self.state.best["step"]}
            logger.log(step, {f"eval/{k}": v for k, v in metrics.items()}, **self._compute(), **chosen)

    @torch.no_grad()
    def sample_grid(self, step: int) -> Path:
        """Write `samples/step-N.png` (and `samples/latest.png`) from fixed noise with the first EMA."""
        ema, z = self.emas[0], self.grid_noise.to(self.device)
        labels = None
        if self.config.network.conditional:
            labels = torch.arange(len(z), device=self.device) % self.dataset.num_classes
        schedule = schedule_for(self.config, self.config.train.sample_sigmas)
        images = generate(ema, z, schedule, labels, torch.Generator(self.device).manual_seed(1))
        out = self.run_dir / "samples"
        out.mkdir(exist_ok=True)
        path = save_grid(images, out / f"step-{step:09d}.png")
        save_grid(images, out / "latest.png")
        return path

    def save(self, step: int, name_suffix: str | None = None) -> None:
        """Checkpoint the network, EMAs, optimiser and run state (rank 0 writes)."""
        if not self.info.main:
            return
        modules = {"net": self.net.state_dict()}
        modules.update({_ema_name(i): ema.state_dict() for i, ema in enumerate(self.emas)})
        state = {
            "config": self.config.to_dict(),
            "data_info": self.data_info,
            "ema_decays": list(self.config.train.ema_decays),
            "kind": self.config.objective.kind,
            "step": step,
            "images_seen": self.state.images_seen,
            "wall_s": self.state.wall_s,
            "metrics": self.state.metrics,
            "best": self.state.best,
            "torch": torch.__version__,
        }
        extra = {"optimizer": self.optimizer.state_dict()}
        target = self.run_dir if name_suffix is None else self.run_dir / name_suffix
        save_checkpoint(target, step, modules, state, extra, keep=self.config.train.keep_checkpoints, require_finite=True)
        if name_suffix is None:
            save_config(self.config, self.run_dir / "config.yaml")  # the config of the newest checkpoint


PRINCIPAL_METRICS = {"shapes": "param_fd", "digits": "fd_digits"}  # by data.name; others: fid


def best_metric(config: Config, metrics: dict[str, float]) -> tuple[str, str]:
    """(key, "min" or "max") of the metric that decides `RUN_DIR/best`: `eval.best_metric` and
    `eval.best_mode`; by default the principal metric of the dataset (param_fd on shapes,
    fd_digits on digits, fid otherwise), or the first metric for an evaluator without it."""
    ec = config.eval
    key = ec.best_metric
    if key == "auto":
        key = PRINCIPAL_METRICS.get(config.data.name, "fid")
        key = key if key in metrics else next(iter(metrics))
    check(key in metrics, f"eval.best_metric={key} is not measured by this run's evaluation; "
          f"choose one of: {', '.join(metrics)}")
    mode = ec.best_mode if ec.best_mode != "auto" else ("max" if better_is_higher(key) else "min")
    return key, mode


def train(config: Config, resume: bool = False, evaluator: Evaluator | None = None,
          from_step: int | None = None) -> RunResult:
    """Train (or resume) the run described by `config`; returns a small summary.

    Only one process at a time may write a run folder (`ayt.runlock`). With `eval.every > 0` and
    no `evaluator` given, the dataset's metric (`ayt.metrics`) scores the first EMA model every
    `eval.every` steps and the best checkpoint, by `eval.best_metric`, is kept in `RUN_DIR/best`.
    `from_step` resumes from that checkpoint instead of the latest (newer ones are set aside).
    """
    return Trainer(config, resume, evaluator, from_step).run()
