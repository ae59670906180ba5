"""The one training engine, shared by every task: EDM pretraining, ECT, ECT + AYT, continuous-time
CT/CD (`ObjectiveTask`) and the MFD feature network (`ayt.features.train.FeatureTask`).

A task supplies what differs: its training images and network, `loss(model, batch, step, rng)`
-> per-example values [B], and hooks for maintenance (evaluation, sample grids), logging and the
JSON state of its checkpoints. The engine (`Trainer`) does the rest the same way for all: set up
processes and the run folder, restore a checkpoint when resuming, then loop: `step()` (learning
rate, micro-batches with DDP and autocast, finiteness check, clipping, optimiser, EMAs), then
maintenance (log, the task's hook, checkpoints). Data order and noise are pure functions of
`(seed, step)`, so a resumed run is bitwise identical to an uninterrupted one on CPU and the noise
does not depend on the world size.
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.profiler import record_function

from ayt.build import build_data, build_net, build_objective, load_model
from ayt.checkpoint import Checkpoint, check_compatible, check_finite, require_keys, save_checkpoint
from ayt.config import Config, save_config
from ayt.data import ImageDataset
from ayt.errors import AytError, check
from ayt.features.train import FeatureRunResult, FeatureTask
from ayt.nets.edm_pickle import is_edm_pickle
from ayt.images import save_grid
from ayt.rng import StepRandom
from ayt.runtime import (
    BatchStream,
    FiniteGuard,
    average_gradients,
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
Batch = tuple[Tensor, Tensor]  # images [B, C, H, W] in [-1, 1], labels [B] (-1 if none)
# The parts of `Trainer.step`, each run inside a profiler range `ayt.step.<part>` (see `phase`).
STEP_PHASES = ("batch", "loss", "backward", "check", "clip", "optimizer", "ema")


def phase(name: str) -> record_function:
    """The `torch.profiler.record_function` range `ayt.step.<name>` of one part of `Trainer.step`
    (`STEP_PHASES`): about 20 us when no profiler runs (loaded 2-core CPU); a profiler (e.g.
    `benchmarks/throughput.py --phases`) reports the time of each part under that name."""
    return record_function(f"ayt.step.{name}")


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


def _init_from(net: nn.Module, path: str, resolution: int, channels: int, kind: str) -> None:
    """Copy the EMA weights of another run's checkpoint or of an EDM pickle (e.g. an EDM model to tune with ECT).
    A MeanFlow run starts only from another MeanFlow run (its network predicts velocities, not images)."""
    source, source_config = load_model(path, which="ema")
    source_kind = source_config.objective.kind
    check((source_kind == "meanflow") == (kind == "meanflow"),
          f"objective.init={path} is a {source_kind!r} model; objective.kind={kind} "
          + ("starts from scratch (drop objective.init) or from a meanflow run" if kind == "meanflow"
             else "cannot start from a MeanFlow velocity network; use an EDM or consistency model"))
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


# ---------------------------------------------------------------- tasks
class Task:
    """What one kind of run trains; the engine (`Trainer`) does everything else.

    Attributes: `kind` (the checkpoint's "kind"), `dataset` (training images), `net` (the trained
    network, built on the CPU), `module` (its name in checkpoints), `emas` (whether the engine keeps
    EMAs of it, `train.ema_decays`). `trained_modules()` names further modules trained with `net`
    (e.g. the log-variance head of adaptive weighting).
    """

    kind: str
    dataset: ImageDataset
    net: nn.Module
    module: str = "net"
    emas: bool = True

    def loss(self, model: nn.Module, batch: Batch, step: int, rng: StepRandom) -> Tensor:
        """Per-example loss [B] of `batch` (this rank's share) at training step `step`."""
        raise NotImplementedError

    def trained_modules(self) -> dict[str, nn.Module]:
        """Further modules trained jointly with `net`, by checkpoint name: their parameters join the
        optimiser (after the network's), the finiteness check and clipping; their gradients are averaged
        over processes; they are saved in every checkpoint and restored on resume; no EMAs, and the
        samplers never see them (`load_model` reads the network only)."""
        return {}

    def check_checkpoint(self, ckpt: Checkpoint, run_dir: Path) -> None:
        """Raise AytError unless `ckpt` was written by this kind of task (before it is loaded)."""

    def restore(self, state: dict[str, Any]) -> None:
        """Take back the task's part of a checkpoint's JSON state."""

    def state(self) -> dict[str, Any]:
        """The task's part of a checkpoint's JSON state."""
        return {}

    def log_scalars(self, step: int) -> dict[str, float]:
        """Extra values logged with the loss at training step `step`."""
        return {}

    def maintain(self, engine: Trainer, done: int, final: bool, logger: RunLogger | None) -> None:
        """After `done` steps, on every rank, before the checkpoint of that step (if any)."""


# ---------------------------------------------------------------- the engine
class Trainer:
    """Holds one run's objects; `step()` is one optimiser step, `run()` the loop. Use `train(config)`
    or `train_features(config)` unless you extend it; `task` builds the task (default: `ObjectiveTask`)."""

    def __init__(self, config: Config, resume: bool = False, evaluator: Evaluator | None = None,
                 from_step: int | None = None, task: Callable[..., Task] | None = None):
        self.config = config
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

        # Task (data, network, loss), EMAs, optimiser (all checked before the run folder is touched).
        make_task = task or ObjectiveTask
        self.task = make_task(config, device=self.device, main=self.info.main, resume=resume, evaluator=evaluator)
        self.dataset, self.net = self.task.dataset, self.task.net
        self.net.to(self.device).train()
        self.extras = getattr(self.task, "trained_modules", dict)()  # optional: tasks are duck-typed (FeatureTask)
        check(not {self.task.module, *map(_ema_name, range(len(tc.ema_decays)))} & set(self.extras),
              f"trained modules {sorted(self.extras)} must not reuse the names of the network or its EMAs")
        for module in self.extras.values():
            module.to(self.device).train()
        self.extra_params = [p for module in self.extras.values() for p in module.parameters()]
        self.params = [*self.net.parameters(), *self.extra_params]  # the optimiser's order: network first
        self.emas = [make_ema(self.net) for _ in tc.ema_decays] if self.task.emas else []
        self.optimizer = make_optimizer(config.optim, self.params)
        self.state = RunState()

        # The run folder: one writer (a lock the OS frees when this process ends), then the checkpoint.
        self.lock = claim_run_dir(self.info, config, resume, lambda: self._restore(from_step))
        self.model = self._wrap(self.net)
        self.stream = BatchStream(self.dataset, tc.seed, self.info)
        self.guard = FiniteGuard(tc.skip_nonfinite, self.info, self.device, self.state.step)

    # ---- set-up helpers
    def _wrap(self, net: nn.Module) -> nn.Module:
        # The network traces as one graph (seeded dropout is plain tensor arithmetic) and recompiles
        # once, for the target's no-grad call; batch shapes are fixed, so dynamic=False.
        return wrap_ddp(torch.compile(net, dynamic=False) if self.config.train.compile else net, self.info, self.device)

    def _restore(self, from_step: int | None) -> None:
        ckpt = resume_checkpoint(self.info, self.run_dir, self.config.train.steps, from_step)
        self.task.check_checkpoint(ckpt, self.run_dir)
        require_keys(ckpt.state, ("kind", "images_seen", "wall_s"), ckpt.path)
        name = self.task.module
        check(name in ckpt.modules, f"{ckpt.path} has no weights '{name}'; pass a run written by "
              f"'ayt {'train-features' if self.task.kind == 'features' else 'train'}'")
        check_compatible(ckpt.modules[name], self.net, str(ckpt.path))
        for weights in ckpt.modules.values():
            check_finite(weights, ckpt.path)
        self.net.load_state_dict(ckpt.modules[name])
        for i, ema in enumerate(self.emas):
            ema_name = _ema_name(i)
            check(ema_name in ckpt.modules, f"{ckpt.path} has no weights '{ema_name}'; keep train.ema_decays as in the run's config.yaml")
            ema.load_state_dict(ckpt.modules[ema_name])
        for extra_name, module in self.extras.items():
            check(extra_name in ckpt.modules, f"{ckpt.path} has no weights '{extra_name}': it was trained without "
                  "them (e.g. objective.adaptive_weight=false); resume with the run's objective settings")
            check_compatible(ckpt.modules[extra_name], module, str(ckpt.path))
            module.load_state_dict(ckpt.modules[extra_name])
        unknown = sorted(set(ckpt.modules) - {name, *self.extras} - {n for n in ckpt.modules if n.startswith("ema")})
        check(not unknown, f"{ckpt.path} holds weights {unknown} that this run does not train "
              "(e.g. objective.adaptive_weight=true); resume with the run's objective settings")
        self.optimizer.load_state_dict(ckpt.extra["optimizer"])
        s = ckpt.state
        self.state = RunState(ckpt.step, s["images_seen"], s["wall_s"], s.get("metrics", []), s.get("best"))
        self.task.restore(s)

    def close(self) -> None:
        """Release the run folder (also done when the process ends, however it ends)."""
        if self.lock is not None:
            self.lock.release()

    # ---- one step
    def step(self, step: int) -> float:
        """Training step `step`: the loss over its micro-batches (data and noise keyed by (seed, step)),
        then, only if the loss and gradients are finite, the (optionally clipped) optimiser step and the
        EMAs (otherwise the step is skipped, or training stops: see `train.skip_nonfinite`).
        Each part runs in its profiler range (`phase`, `STEP_PHASES`). Returns the step's mean loss."""
        tc, info = self.config.train, self.info
        micro_global = tc.batch_size // tc.grad_accum
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(step, self.config.optim.lr, self.config.optim.warmup_steps)
        self.optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), dtype=torch.float64, device=self.device)  # on the device: one sync per step
        for micro in range(tc.grad_accum):
            with phase("batch"):
                batch = self.stream.batch((step * tc.grad_accum + micro) * micro_global, micro_global, self.device)
            rng = StepRandom.for_step(tc.seed, step, micro, self.device, info.rank, info.world)
            with no_sync(self.model, micro < tc.grad_accum - 1), self._autocast(), phase("loss"):
                loss = self.task.loss(self.model, batch, step, rng).mean()
            with phase("backward"):
                (loss / tc.grad_accum).backward()
            total += loss.detach().double() / tc.grad_accum
        step_loss = total.item()
        average_gradients(self.extra_params, info)  # DDP averages the network's
        with phase("check"):
            ok = self.guard.step_ok(step, step_loss, self.params)
        if ok:
            if self.config.optim.grad_clip is not None:
                with phase("clip"):
                    torch.nn.utils.clip_grad_norm_(self.params, self.config.optim.grad_clip)
            with phase("optimizer"):
                self.optimizer.step()
            with phase("ema"):
                for ema, decay in zip(self.emas, tc.ema_decays):
                    update_ema(ema, self.net, decay)
        return step_loss

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
        window: list[float] = []
        last_loss = math.nan
        session_start, session_wall0 = time.perf_counter(), self.state.wall_s

        for step in range(self.state.step, tc.steps):
            # 1. Loss, update, EMAs.
            step_loss = self.step(step)

            # 2. Book-keeping and maintenance (rank 0 logs and writes; the task evaluates, samples, ...).
            done = step + 1
            self.state.step, self.state.images_seen = done, done * tc.batch_size
            self.state.wall_s = session_wall0 + time.perf_counter() - session_start
            window.append(step_loss)
            last_loss = step_loss
            progress.update(done, step_loss)
            final = done == tc.steps
            if logger and (done % tc.log_every == 0 or final):
                skipped = {"skipped_nonfinite": self.guard.skipped} if tc.skip_nonfinite else {}
                logger.log(done, {"loss": sum(window) / len(window), "lr": self.optimizer.param_groups[0]["lr"],
                                  **self.task.log_scalars(step), **skipped}, **self.compute_info())
                window.clear()
            self.task.maintain(self, done, final, logger)
            if done % tc.checkpoint_every == 0 or final:
                self.save(done)
        progress.close()
        if logger:
            logger.close()
        finish_distributed(self.info)
        return RunResult(self.run_dir, self.state.step, last_loss, self.state.wall_s, self.state.images_seen)

    def _autocast(self):
        use_bf16 = self.config.train.precision == "bf16" and self.device.type == "cuda"
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=use_bf16)

    def compute_info(self) -> dict:
        """Images seen, device and world size, logged with every record."""
        name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"
        return {"images_seen": self.state.images_seen, "device": name, "world": self.info.world}

    # ---- checkpoints
    def save(self, step: int, name_suffix: str | None = None) -> None:
        """Checkpoint the network, EMAs, optimiser and run state (rank 0 writes)."""
        if not self.info.main:
            return
        modules = {self.task.module: self.net.state_dict()}
        modules.update({_ema_name(i): ema.state_dict() for i, ema in enumerate(self.emas)})
        modules.update({name: module.state_dict() for name, module in self.extras.items()})
        state = {
            "config": self.config.to_dict(),
            "kind": self.task.kind,
            **self.task.state(),
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


# ---------------------------------------------------------------- diffusion and consistency models
class ObjectiveTask(Task):
    """A denoiser / consistency model trained by `config.objective` (EDM, ECT, continuous); keeps
    EMAs, evaluates the first one every `eval.every` steps (the best checkpoint goes to
    `RUN_DIR/best`) and writes sample grids from fixed noise."""

    def __init__(self, config: Config, device: torch.device, main: bool = True, resume: bool = False,
                 evaluator: Evaluator | None = None):
        self.config, self.device, self.evaluator = config, device, evaluator
        self.kind = config.objective.kind
        self.dataset = build_data(config)
        d = self.dataset
        torch.manual_seed(config.train.seed)  # the initial weights (identical on every rank)
        self.net = build_net(config, d.resolution, d.channels, d.num_classes)
        if config.objective.init and not resume:
            _init_from(self.net, config.objective.init, d.resolution, d.channels, self.kind)
        self.objective = build_objective(config, d.resolution, d.channels).to(device)
        if self.evaluator is None and config.eval.every and main:
            from ayt.metrics.evaluate import build_evaluator

            self.evaluator = build_evaluator(config, d, device)
        tc = config.train
        self.grid_noise = torch.randn((tc.grid_size, d.channels, d.resolution, d.resolution),
                                      generator=torch.Generator().manual_seed(tc.seed + 12345))

    def trained_modules(self) -> dict[str, nn.Module]:
        trained = getattr(self.objective, "trained_modules", None)  # ContinuousObjective's log-variance head
        return trained() if trained else {}

    def log_scalars(self, step: int) -> dict[str, float]:
        scalars = getattr(self.objective, "log_scalars", None)  # the continuous objective's warm-up factor
        return scalars(step) if scalars else {}

    def loss(self, model: nn.Module, batch: Batch, step: int, rng: StepRandom) -> Tensor:
        x0, labels = batch
        return self.objective(model, x0, labels if self.config.network.conditional else None, step, rng)

    def check_checkpoint(self, ckpt: Checkpoint, run_dir: Path) -> None:
        check(ckpt.state.get("kind") != "features", f"{run_dir} is a feature-network run; "
              f"resume it with 'ayt train-features --resume {run_dir}'")

    def state(self) -> dict[str, Any]:
        d = self.dataset
        return {"data_info": {"name": d.name, "resolution": d.resolution, "channels": d.channels,
                              "num_classes": d.num_classes},
                "ema_decays": list(self.config.train.ema_decays)}

    def maintain(self, engine: Trainer, done: int, final: bool, logger: RunLogger | None) -> None:
        if not engine.info.main:
            return
        if self.evaluator and self._evaluate_now(done, final):
            self._evaluate(engine, done, logger)
        tc = self.config.train
        if (tc.sample_every and done % tc.sample_every == 0) or final:
            self.sample_grid(engine.emas[0], engine.run_dir, done)

    def _evaluate_now(self, done: int, final: bool) -> bool:
        """Every `eval.every` steps, and at the end of a run that is at least `eval.every` steps long
        (a smoke test with train.steps=2 does not pay for a full evaluation)."""
        every = self.config.eval.every
        return bool(every) and (done % every == 0 or (final and done >= every))

    def _evaluate(self, engine: Trainer, step: int, logger: RunLogger | None) -> None:
        metrics = self.evaluator(engine.emas[0], step)
        state = engine.state
        record = {"step": step, "wall_s": round(state.wall_s, 3), **engine.compute_info(), **metrics}
        state.metrics.append(record)
        key, mode = best_metric(self.config, metrics)
        previous = state.best.get(key) if state.best else None
        better = previous is None or (metrics[key] > previous if mode == "max" else metrics[key] < previous)
        if better:
            state.best = {**record, "best_metric": key, "best_mode": mode}
            engine.save(step, name_suffix="best")
        if logger:
            chosen = {"best_by": f"{key} ({mode})", "best_step": state.best["step"]}
            logger.log(step, {f"eval/{k}": v for k, v in metrics.items()}, **engine.compute_info(), **chosen)

    @torch.no_grad()
    def sample_grid(self, ema: nn.Module, run_dir: Path, step: int) -> Path:
        """Write `samples/step-N.png` (and `samples/latest.png`) from fixed noise with `ema`."""
        z = self.grid_noise.to(self.device)
        labels = None
        if self.config.network.conditional:
            labels = torch.arange(len(z), device=self.device) % self.dataset.num_classes
        schedule = schedule_for(self.config, self.config.train.sample_sigmas)
        images = generate(ema, z, schedule, labels, torch.Generator(self.device).manual_seed(1))
        out = run_dir / "samples"
        out.mkdir(exist_ok=True)
        path = save_grid(images, out / f"step-{step:09d}.png")
        save_grid(images, out / "latest.png")
        return path


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


def train_features(config: Config, resume: bool = False, from_step: int | None = None) -> FeatureRunResult:
    """Train (or resume) the feature network described by `config.features` (method.md section 4);
    returns a summary with the held-out errors. One process at a time may write a run folder;
    `from_step` resumes from that checkpoint."""

    def task(config: Config, device: torch.device, **_: Any) -> FeatureTask:
        return FeatureTask(config, build_data(config), device)

    trainer = Trainer(config, resume, from_step=from_step, task=task)
    result = trainer.run()
    return FeatureRunResult(**vars(result), heldout=trainer.task.heldout)
