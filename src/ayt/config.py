"""Typed run configuration: one dataclass per concern, YAML presets, `key=value` overrides.

A run is fully described by a `Config`. It is loaded from a YAML file under `configs/`, then
`section.key=value` overrides from the command line are applied (values are parsed as YAML, so
`train.batch_size=16`, `distance.c=null`, `train.ema_decays=[0.999,0.9999]` all work). Unknown
keys, wrong types and out-of-range values raise `AytError` naming the key and the fix. Every run
directory holds the resolved config it ran with (`config.yaml`).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

from ayt.files import atomic_write
from ayt.errors import AytError, check


DATASETS = ("shapes", "digits", "cifar10", "folder", "npz")  # see ayt.data.build_dataset
# The named choices of the config, defined once (the modules that act on them import these).
OBJECTIVE_KINDS = ("ect", "edm", "continuous", "meanflow")
FEATURE_ARCHS = ("vgg16_bn", "resnet18", "tiny_vgg")  # see ayt.features.nets.build_feature_net
OPTIMIZERS = ("radam", "adam")
PRECISIONS = ("fp32", "bf16")
METRICS = ("auto", "manifold", "fd_digits", "fid", "none")  # eval.metric; see ayt.metrics.evaluate
HEUN_STEPS = 18  # EDM's Heun steps for CIFAR-10 (35 network calls): diffusion models' default sampler


@dataclass
class DataConfig:
    """Which images to train on (see `ayt.data.build_dataset`)."""

    name: str = "shapes"  # shapes | digits | cifar10 | folder | npz
    root: str | None = None  # data folder (cifar10, folder) or .npz file
    resolution: int | None = 16  # image size; None keeps the dataset's own
    num_samples: int | None = None  # shapes: how many images to render (default 10000)
    seed: int = 0  # shapes: rendering seed
    split: str = "train"  # train | test | all (where the dataset has splits)
    channels: int | None = None  # folder: 1 (gray) or 3 (RGB)
    download: bool = False  # cifar10: download through torchvision when missing
    class_folders: bool = False  # folder: label each image by its top-level subfolder (ImageNet layout)


@dataclass
class NetworkConfig:
    """The U-Net and its preconditioning (see `ayt.nets.build_network`)."""

    preset: str = "tiny"  # tiny | small | cifar10-ddpmpp | cifar10-ncsnpp (SongUNet) | imagenet64-adm (DhariwalUNet)
    dropout: float | None = None  # None keeps the preset's dropout
    boundary: str = "edm"  # edm (plain EDM scalings) | exact (f(x, sigma_min) = x)
    sigma_data: float = 0.5
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    conditional: bool = False  # condition on class labels (datasets with labels)
    overrides: dict = field(default_factory=dict)  # any keyword of the preset's network class, e.g. {model_channels: 64}


@dataclass
class ObjectiveConfig:
    """What the loss is: EDM diffusion pretraining, ECT, continuous-time consistency training/distillation,
    or MeanFlow (method.md section 8)."""

    kind: str = "ect"  # ect | edm | continuous | meanflow
    p_mean: float | None = None  # lognormal t (meanflow: logit-normal t and r): None -> -1.1 for ect and continuous, -1.2 for edm, -0.4 for meanflow
    p_std: float | None = None  # None -> 2.0 for ect, 1.2 for edm, 1.0 for meanflow
    q: float = 2.0  # ECT gap ratio: d(stage) = q^-(stage+1)
    k: float = 8.0  # ECT t -> r mapping constant
    b: float = 1.0  # ECT t -> r mapping constant
    stage_steps: int | None = 25000  # ECT steps per stage; None = fixed stage (AYT reference)
    init: str | None = None  # checkpoint (folder, run dir or EDM .pkl) whose EMA weights initialise the net
    teacher: str | None = None  # continuous only: EDM checkpoint (run dir or EDM .pkl) whose EMA is the frozen teacher (distillation)
    weighting: str = "per_example"  # continuous only: per_example (1/t_i) | batch_mean (mean 1/t, the reference as written)
    # continuous only, sCM's stabilisers (Lu & Song 2024, Algorithm 1; method.md section 5); all off by default:
    warmup_steps: int = 0  # tangent warm-up: JVP along (v, r), r = min(1, step/warmup_steps); 0 = off (sCM: 10k iterations)
    adaptive_weight: bool = False  # learned log-variance u(t) (EDM2 head on c_noise): loss L / exp(u) + u per example
    jvp: str = "exact"  # exact (torch.func.jvp) | fd (central differences, for networks without forward-mode AD)
    fd_eps: float = 3e-3  # jvp=fd: relative step h = fd_eps * t, in (0, 1); balances truncation and fp32 rounding (error ~1e-3 pixels, ~4e-3 MFD)
    # meanflow only (method.md section 8); defaults: the official JAX code's ImageNet config (CIFAR-10: configs/cifar10-meanflow.yaml)
    mf_ratio: float = 0.25  # fraction of draws with r != t (the others have r = t: plain flow matching)
    mf_norm_p: float = 1.0  # adaptive loss weight 1 / (loss + mf_norm_eps)^mf_norm_p
    mf_norm_eps: float = 0.01
    mf_second: str = "t-r"  # the net's second time input: t-r (paper) | r
    mf_mfd_tmax: float = 1.0  # distance.mode=aligned: the feature direction for draws with t <= this, the pixel gradient above (method.md 8.3)


@dataclass
class DistanceConfig:
    """The distance `d` inside the consistency loss (see `ayt.losses.build_distance`).

    `mode` says how the ECT loss uses it (method.md section 4):
    `pixel`: `w * d(f, target)` with `d = name`;
    `aligned`: `w * g_unit`, the unit-gradient form of `name` (the AYT reference runs use
    `name: mfd`);
    `pixel+aligned`: `w * (pixel(f, target) + lambda(step) * aligned term of name)`, with
    `lambda` ramped linearly from 0 to `weight` over `ramp_steps`.
    """

    name: str = "pseudo_huber"  # l2 | pseudo_huber | squared_l2 | l1 | lpips | mfd
    mode: str = "pixel"  # pixel | aligned | pixel+aligned
    c: float | None = None  # pseudo-Huber constant; None -> 0.00054 * sqrt(dim)
    pixel: str = "pseudo_huber"  # the pixel distance of mode pixel+aligned
    weight: float = 1.0  # lambda of mode pixel+aligned
    ramp_steps: int = 0  # lambda ramp of mode pixel+aligned (0 = no ramp)
    features: str | None = None  # mfd: run folder of train-features, or the AYT reference .pt (+ features.arch)
    form: str = "reference"  # mfd: reference (sum of spatial L2 norms) | squared (paper)
    layers: list[int] | None = None  # mfd: feature stages used (None = all, head included)
    lpips_net: str = "vgg"  # lpips: vgg | alex
    lpips_weights: str | None = None  # lpips: trunk weights file (offline use)
    lpips_upsample: bool = False  # lpips: resize inputs to 224 first


@dataclass
class FeaturesConfig:
    """The self-supervised feature network of MFD (trained by `ayt train-features`)."""

    arch: str = "tiny_vgg"  # tiny_vgg | vgg16_bn | resnet18
    width: int = 32  # tiny_vgg base width
    subset: str = "all"  # perturbations: geo | geo_colour | geo_degrade | degrade | all
    p: float = 0.15  # probability of each perturbation
    ramp_steps: int = 0  # linear ramp of p from 0 (reference: 50k)
    aniso_target: str = "paper"  # paper: (w cos u, w sin u) as method.md | double_angle: (w cos 2u, w sin 2u)
    recipe: str = "reference"  # perturbations as the AYT reference code makes them | legacy (ayt before issue 12)
    holdout: int = 512  # held-out images for the per-group regression error


@dataclass
class OptimConfig:
    """Optimiser and learning-rate schedule."""

    name: str = "radam"  # radam | adam
    lr: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.0
    warmup_steps: int = 0  # linear LR warm-up from 0
    grad_clip: float | None = None  # clip the global gradient norm; None = off


@dataclass
class TrainConfig:
    """The training loop."""

    run_dir: str = "runs/default"  # where checkpoints, logs, samples and config.yaml go
    steps: int = 2000  # total optimiser steps
    batch_size: int = 16  # global batch (split across DDP ranks)
    grad_accum: int = 1  # micro-batches per step (batch_size must divide evenly)
    seed: int = 0
    ema_decays: list[float] = field(default_factory=lambda: [0.999])
    precision: str = "fp32"  # fp32 | bf16 (autocast; CUDA only)
    compile: bool = False  # torch.compile the network
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    sample_every: int = 500  # sample grid PNG every N steps (0 = only at the end)
    grid_size: int = 64  # images per sample grid (fixed noise, comparable across steps)
    sample_sigmas: str = "1"  # 1 | 2 | comma list of levels for the consistency grids
    log_every: int = 10
    skip_nonfinite: int = 0  # skip a step whose loss or gradients are non-finite, stopping after N in a row (0 = stop at once)


@dataclass
class EvalConfig:
    """In-training evaluation (the metric depends on the dataset)."""

    every: int = 0  # evaluate the EMA model every N steps (0 = off)
    metric: str = "auto"  # auto (by dataset) | manifold (shapes) | fd_digits | fid | none
    num_samples: int = 1000
    sigmas: str = "1"  # sampling schedule evaluated
    denoise_sigmas: list[float] = field(default_factory=list)  # also score one-step denoising at these t
    inception_weights: str | None = None  # fid: local Inception weights file (offline use)
    ref_stats: str | None = None  # fid: reference statistics (.npz: 'ayt fid-stats', or mu/sigma from pytorch-fid / EDM)
    best_metric: str = "auto"  # metric that picks RUN/best; auto: param_fd (shapes), fd_digits (digits), fid (others)
    best_mode: str = "auto"  # min | max | auto (max for coverage, precision, recall; min otherwise)


@dataclass
class LogConfig:
    """Where progress goes."""

    progress: bool = True  # tqdm progress bar (only on a terminal)
    tensorboard: bool = True
    wandb: bool = False
    wandb_project: str | None = None


@dataclass
class Config:
    """A whole run."""

    data: DataConfig = field(default_factory=DataConfig)
    network: NetworkConfig = field(default_factory=NetworkConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    distance: DistanceConfig = field(default_factory=DistanceConfig)
    features: FeaturesConfig = field(default_factory=FeaturesConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def validate(self) -> "Config":
        """Raise `AytError` on out-of-range values; return self."""
        for section in SECTIONS:
            _RULES[section](getattr(self, section))
        check(self.objective.kind != "continuous" or self.distance.name in ("l2", "mfd"),
              f"objective.kind=continuous takes tangents in pixels (distance.name=l2) or in MFD features "
              f"(distance.name=mfd), not distance.name={self.distance.name}")
        if self.objective.kind == "meanflow":
            _rules_meanflow(self)
        check(
            self.train.batch_size % self.train.grad_accum == 0,
            f"train.batch_size={self.train.batch_size} is not divisible by train.grad_accum={self.train.grad_accum}",
        )
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


SECTIONS = [f.name for f in dataclasses.fields(Config)]


# ---------------------------------------------------------------- validation rules per section
def _one_of(value: Any, allowed: list[str], key: str) -> None:
    check(value in allowed, f"{key}='{value}' is not valid; choose one of: {', '.join(allowed)}")


def _positive(value: float | int | None, key: str, allow_none: bool = False, zero: bool = False) -> None:
    if value is None and allow_none:
        return
    ok = value is not None and math.isfinite(value) and (value >= 0 if zero else value > 0)
    check(ok, f"{key}={value} must be {'>= 0' if zero else '> 0'} and finite")


def _rules_data(c: DataConfig) -> None:
    _one_of(c.name, list(DATASETS), "data.name")
    _positive(c.resolution, "data.resolution", allow_none=True)
    _positive(c.num_samples, "data.num_samples", allow_none=True)
    _one_of(c.split, ["train", "test", "all"], "data.split")
    check(c.channels in (None, 1, 3), f"data.channels={c.channels} must be 1, 3 or null")
    check(not c.class_folders or c.name == "folder",
          f"data.class_folders labels a folder dataset; data.name={c.name} has its own labels, so drop it")


def _rules_network(c: NetworkConfig) -> None:
    _one_of(c.boundary, ["edm", "exact"], "network.boundary")
    check(c.dropout is None or 0 <= c.dropout < 1, f"network.dropout={c.dropout} must be in [0, 1)")
    check(0 < c.sigma_min < c.sigma_max, "network.sigma_min must be > 0 and below network.sigma_max")
    _positive(c.sigma_data, "network.sigma_data")


def _rules_objective(c: ObjectiveConfig) -> None:
    _one_of(c.kind, list(OBJECTIVE_KINDS), "objective.kind")
    check(c.teacher is None or c.kind != "meanflow",
          "objective.kind=meanflow trains from data alone (no teacher); drop objective.teacher")
    check(c.teacher is None or c.kind == "continuous",
          "objective.teacher is used by continuous-time distillation only; set objective.kind=continuous or drop the teacher")
    _one_of(c.weighting, ["per_example", "batch_mean"], "objective.weighting")
    check(c.weighting == "per_example" or c.kind == "continuous",
          "objective.weighting applies to objective.kind=continuous only; drop it or set objective.kind=continuous")
    _one_of(c.jvp, ["exact", "fd"], "objective.jvp")
    _positive(c.warmup_steps, "objective.warmup_steps", zero=True)
    check(0 < c.fd_eps < 1, f"objective.fd_eps={c.fd_eps} must lie in (0, 1): the step is fd_eps * t, and t - fd_eps * t must stay > 0")
    stabilisers = {"objective.warmup_steps": c.warmup_steps != 0, "objective.adaptive_weight": c.adaptive_weight,
                   "objective.jvp": c.jvp != "exact"}
    for key, used in stabilisers.items():
        check(not used or c.kind == "continuous",
              f"{key} applies to objective.kind=continuous only (sCM's stabilisers); drop it or set objective.kind=continuous")
    _positive(c.p_std, "objective.p_std", allow_none=True)
    check(c.q > 1, f"objective.q={c.q} must be > 1")
    _positive(c.k, "objective.k", zero=True)
    _positive(c.stage_steps, "objective.stage_steps", allow_none=True)
    check(0 <= c.mf_ratio <= 1, f"objective.mf_ratio={c.mf_ratio} must lie in [0, 1]")
    _positive(c.mf_norm_p, "objective.mf_norm_p", zero=True)
    _positive(c.mf_norm_eps, "objective.mf_norm_eps")
    _one_of(c.mf_second, ["t-r", "r"], "objective.mf_second")
    check(0 < c.mf_mfd_tmax <= 1, f"objective.mf_mfd_tmax={c.mf_mfd_tmax} must lie in (0, 1] (1: the feature direction at every t; "
          "for none, train in pixels: distance.mode=pixel distance.name=squared_l2)")
    defaults = ObjectiveConfig()
    for key in ("mf_ratio", "mf_norm_p", "mf_norm_eps", "mf_second", "mf_mfd_tmax"):
        check(getattr(c, key) == getattr(defaults, key) or c.kind == "meanflow",
              f"objective.{key} applies to objective.kind=meanflow only; drop it or set objective.kind=meanflow")


def _rules_meanflow(c: Config) -> None:
    """The combinations objective.kind=meanflow cannot run (method.md section 8)."""
    d = c.distance
    check(d.mode != "pixel+aligned", "objective.kind=meanflow takes one distance: distance.mode=pixel "
          "(distance.name=squared_l2, the paper's loss) or distance.mode=aligned (e.g. distance.name=mfd), not pixel+aligned")
    check(c.objective.mf_mfd_tmax == 1 or d.mode == "aligned",
          f"objective.mf_mfd_tmax={c.objective.mf_mfd_tmax} gates the feature direction of distance.mode=aligned; "
          "drop it, or set distance.mode=aligned distance.name=mfd")
    check(d.mode != "pixel" or d.name == "squared_l2",
          f"objective.kind=meanflow in pixels is the paper's squared L2 with the adaptive weight: set distance.name=squared_l2, "
          f"or distance.mode=aligned for a feature direction (distance.name=mfd); not distance.name={d.name}")
    check(not c.eval.denoise_sigmas, "eval.denoise_sigmas scores a consistency model's one-step denoising; "
          "objective.kind=meanflow has no noise levels sigma: drop eval.denoise_sigmas")


def _rules_distance(c: DistanceConfig) -> None:
    _positive(c.c, "distance.c", allow_none=True, zero=True)
    _one_of(c.mode, ["pixel", "aligned", "pixel+aligned"], "distance.mode")
    _one_of(c.form, ["reference", "squared"], "distance.form")
    _one_of(c.lpips_net, ["vgg", "alex"], "distance.lpips_net")
    _positive(c.weight, "distance.weight", zero=True)
    _positive(c.ramp_steps, "distance.ramp_steps", zero=True)
    check(c.name != "mfd" or c.features, "distance.name=mfd needs distance.features=FEATURE_CHECKPOINT; train one with 'ayt train-features'")


def _rules_features(c: FeaturesConfig) -> None:
    _one_of(c.arch, list(FEATURE_ARCHS), "features.arch")
    _one_of(c.subset, ["geo", "geo_colour", "geo_degrade", "degrade", "all"], "features.subset")
    _one_of(c.aniso_target, ["paper", "double_angle"], "features.aniso_target")
    _one_of(c.recipe, ["reference", "legacy"], "features.recipe")
    check(0 <= c.p <= 1, f"features.p={c.p} must lie in [0, 1]")
    _positive(c.width, "features.width")
    _positive(c.ramp_steps, "features.ramp_steps", zero=True)
    _positive(c.holdout, "features.holdout", zero=True)


def _rules_optim(c: OptimConfig) -> None:
    _one_of(c.name, list(OPTIMIZERS), "optim.name")
    _positive(c.lr, "optim.lr")
    check(len(c.betas) == 2 and all(0 <= b < 1 for b in c.betas), f"optim.betas={c.betas} must be two values in [0, 1)")
    _positive(c.weight_decay, "optim.weight_decay", zero=True)
    _positive(c.warmup_steps, "optim.warmup_steps", zero=True)
    _positive(c.grad_clip, "optim.grad_clip", allow_none=True)


def _rules_train(c: TrainConfig) -> None:
    for key in ("steps", "batch_size", "grad_accum", "checkpoint_every", "keep_checkpoints", "grid_size", "log_every"):
        _positive(getattr(c, key), f"train.{key}")
    _positive(c.sample_every, "train.sample_every", zero=True)
    _positive(c.skip_nonfinite, "train.skip_nonfinite", zero=True)
    check(all(0 < d < 1 for d in c.ema_decays), f"train.ema_decays={c.ema_decays} must lie in (0, 1)")
    _one_of(c.precision, list(PRECISIONS), "train.precision")
    check(c.device == "auto" or c.device == "cpu" or c.device.startswith("cuda"), f"train.device='{c.device}' must be auto, cpu, cuda or cuda:N")


def _rules_eval(c: EvalConfig) -> None:
    _positive(c.every, "eval.every", zero=True)
    _positive(c.num_samples, "eval.num_samples")
    _one_of(c.metric, list(METRICS), "eval.metric")
    check(all(s > 0 for s in c.denoise_sigmas), f"eval.denoise_sigmas={c.denoise_sigmas} must be > 0")
    _one_of(c.best_mode, ["auto", "min", "max"], "eval.best_mode")


def _rules_log(c: LogConfig) -> None:
    return None


_RULES = {
    "data": _rules_data,
    "network": _rules_network,
    "objective": _rules_objective,
    "distance": _rules_distance,
    "features": _rules_features,
    "optim": _rules_optim,
    "train": _rules_train,
    "eval": _rules_eval,
    "log": _rules_log,
}


# ---------------------------------------------------------------- building from dicts
def _type_ok(value: Any, hint: Any) -> bool:
    """Whether a YAML value fits a dataclass field's type hint (ints are accepted for floats)."""
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        return any(_type_ok(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is list:
        (item,) = typing.get_args(hint) or (Any,)
        return isinstance(value, list) and all(_type_ok(v, item) for v in value)
    if hint is Any:
        return True
    return isinstance(value, origin or hint)


_FLOAT_TEXT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


def _read_floats(value: Any, hint: Any) -> Any:
    """Accept `1e-4` where a float is expected: YAML 1.1 reads an exponent without a dot as a string."""
    if isinstance(value, str) and _accepts_float(hint) and not _accepts(hint, str) and _FLOAT_TEXT.match(value.strip()):
        return float(value)
    if isinstance(value, list) and typing.get_origin(hint) is list:
        (item,) = typing.get_args(hint) or (Any,)
        return [_read_floats(v, item) for v in value]
    return value


def _non_finite(value: Any) -> bool:
    if isinstance(value, float):
        return not math.isfinite(value)
    return isinstance(value, list) and any(_non_finite(v) for v in value)


def _coerce(value: Any, hint: Any) -> Any:
    """Turn YAML ints into floats where a float is expected (so configs round-trip exactly)."""
    if isinstance(value, int) and not isinstance(value, bool) and _accepts_float(hint) and not _accepts_int(hint):
        return float(value)
    if isinstance(value, list) and typing.get_origin(hint) is list:
        (item,) = typing.get_args(hint) or (Any,)
        return [_coerce(v, item) for v in value]
    return value


def _accepts(hint: Any, kind: type) -> bool:
    return hint is kind or kind in typing.get_args(hint)


def _accepts_float(hint: Any) -> bool:
    return _accepts(hint, float)


def _accepts_int(hint: Any) -> bool:
    return _accepts(hint, int)


def _unknown_key(key: str, valid: list[str]) -> AytError:
    close = difflib.get_close_matches(key.rsplit(".", 1)[-1], valid, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(valid)}"
    return AytError(f"unknown config key '{key}'{hint}")


RETIRED_KEYS = {"train.num_workers"}  # never read; still in the config.yaml of older runs, ignored


def _section_from_dict(cls: type, values: dict, prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if f"{prefix}.{key}" in RETIRED_KEYS:
            continue
        if key not in names:
            raise _unknown_key(f"{prefix}.{key}", names)
        value = _read_floats(value, hints[key])
        if not _type_ok(value, hints[key]):
            raise AytError(f"config key '{prefix}.{key}' has the wrong type: got {value!r}, expected {_type_name(hints[key])}")
        check(not _non_finite(value), f"config key '{prefix}.{key}' is {value!r}; give a finite number")
        kwargs[key] = _coerce(value, hints[key])
    return cls(**kwargs)


def _type_name(hint: Any) -> str:
    return str(hint).replace("typing.", "").replace("<class '", "").replace("'>", "")


def config_from_dict(values: dict) -> Config:
    """Build and validate a `Config` from a nested dict (as read from YAML)."""
    check(isinstance(values, dict), "a config must be a mapping of sections (data, network, ...)")
    hints = typing.get_type_hints(Config)
    sections = {}
    for name, section in values.items():
        if name not in SECTIONS:
            raise _unknown_key(name, SECTIONS)
        check(isinstance(section, dict), f"config section '{name}' must be a mapping, got {section!r}")
        sections[name] = _section_from_dict(hints[name], section, name)
    return Config(**sections).validate()


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split `section.key=value` into its key path and YAML-parsed value."""
    check(not text.endswith((".yaml", ".yml")) or "=" in text,
          f"'{text}' looks like a preset; pass it as --config {text}")
    check("=" in text, f"override '{text}' must look like section.key=value (e.g. train.batch_size=16)")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else None
    except yaml.YAMLError:
        raise AytError(f"override '{text}': the value is not valid YAML") from None
    path = key.strip().split(".")
    check(len(path) == 2 and all(path), f"override key '{key}' must be section.key (e.g. train.batch_size)")
    return path, value


def apply_overrides(values: dict, overrides: list[str]) -> dict:
    """Return a copy of the nested dict `values` with `section.key=value` overrides applied."""
    merged = {}
    for name, section in values.items():
        check(isinstance(section, dict), f"config section '{name}' must be a mapping of keys, got {section!r}; "
              f"write it as '{name}:' followed by indented 'key: value' lines")
        merged[name] = dict(section)
    for text in overrides:
        (section, key), value = parse_override(text)
        merged.setdefault(section, {})[key] = value
    return merged


def load_yaml(path: str | Path) -> dict:
    """Read a YAML config file into a dict; clear errors for missing or malformed files."""
    path = Path(path)
    check(not path.is_dir(), f"config file '{path}' is a folder; pass a YAML file such as configs/shapes-ect.yaml "
          "(to continue a run in a folder use --resume)")
    check(path.is_file(), f"config file '{path}' does not exist; see configs/ for presets")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise AytError(f"config file '{path}' is not valid YAML: {str(err).splitlines()[0]}") from None
    check(isinstance(values, dict), f"config file '{path}' must hold a mapping of sections")
    return values


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML preset (or the defaults when `path` is None) and apply overrides."""
    values = load_yaml(path) if path is not None else {}
    return config_from_dict(apply_overrides(values, overrides or []))


def save_config(config: Config, path: str | Path) -> None:
    """Write the resolved config as YAML, atomically."""
    atomic_write(path, config.to_yaml())
