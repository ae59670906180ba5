"""Turn a `Config` into the objects of a run: dataset, network, objective, and models from checkpoints."""

from __future__ import annotations

import dataclasses
import inspect
import sys
from pathlib import Path

import torch
from torch import nn

from ayt.checkpoint import check_compatible, check_finite, load_checkpoint, require_keys, save_checkpoint
from ayt.config import Config, config_from_dict, save_config
from ayt.data import ImageDataset, build_dataset
from ayt.errors import AytError, check
from ayt.losses import build_distance
from ayt.losses.aligned import Aligned
from ayt.nets import NETWORK_PRESETS, PRESET_ARCHITECTURES, MeanFlowNet, Precond, build_meanflow_network, build_network
from ayt.nets.edm_pickle import EdmArchitecture, edm_network, is_edm_pickle
from ayt.objectives import ContinuousObjective, ECTObjective, EDMObjective, MeanFlowObjective
from ayt.schedules import ect_gap

# Objective defaults of the lognormal noise-level distribution: (P_mean, P_std); for meanflow the
# logit-normal (t, r) distribution of the paper's ImageNet ablation (CIFAR-10: configs/cifar10-meanflow.yaml).
LOGNORMAL_DEFAULTS = {"ect": (-1.1, 2.0), "continuous": (-1.1, 2.0), "edm": (-1.2, 1.2), "meanflow": (-0.4, 1.0)}
MIN_GAP = 2.0**-20  # smallest relative gap d(stage) that float32 t and r still resolve


def build_data(config: Config) -> ImageDataset:
    """The training dataset described by `config.data`."""
    return build_dataset(**dataclasses.asdict(config.data))


def build_net(config: Config, resolution: int, channels: int, num_classes: int = 0) -> Precond | MeanFlowNet:
    """The preconditioned U-Net for images of the given shape (a `MeanFlowNet` for objective.kind=meanflow)."""
    n = config.network
    if n.conditional and num_classes == 0:
        raise AytError("network.conditional=true needs a labelled dataset; set network.conditional=false")
    if config.objective.kind == "meanflow":
        return build_meanflow_network(n.preset, img_resolution=resolution, in_channels=channels,
                                      label_dim=num_classes if n.conditional else 0, dropout=n.dropout,
                                      second=config.objective.mf_second, overrides=dict(n.overrides))
    return build_network(
        n.preset,
        img_resolution=resolution,
        in_channels=channels,
        label_dim=num_classes if n.conditional else 0,
        dropout=n.dropout,
        boundary=n.boundary,
        sigma_data=n.sigma_data,
        sigma_min=n.sigma_min,
        sigma_max=n.sigma_max,
        overrides=dict(n.overrides),
    )


def build_objective(config: Config, resolution: int | None = None, channels: int | None = None) -> nn.Module:
    """The training objective (`objective.kind`) with its distance(s).

    `resolution` and `channels` of the training images let feature distances check that their
    network matches the data before training starts.
    """
    o = config.objective
    p_mean, p_std = LOGNORMAL_DEFAULTS[o.kind]
    p_mean = o.p_mean if o.p_mean is not None else p_mean
    p_std = o.p_std if o.p_std is not None else p_std
    if o.kind == "edm":
        return EDMObjective(p_mean, p_std, config.network.sigma_data)
    if o.kind == "continuous":
        d = config.distance
        mfd = build_distance("mfd", **distance_options(config, "mfd", resolution, channels)) if d.name == "mfd" else None
        teacher = _load_teacher(o.teacher, resolution, channels) if o.teacher else None
        return ContinuousObjective(mfd, teacher, p_mean, p_std, o.weighting, o.warmup_steps, o.adaptive_weight, o.jvp, o.fd_eps)
    if o.kind == "meanflow":
        return _meanflow_objective(config, p_mean, p_std, resolution, channels)
    final_stage = config.train.steps // o.stage_steps if o.stage_steps else 0
    if ect_gap(final_stage, o.q) < MIN_GAP:
        raise AytError(
            f"objective.q={o.q} with stage_steps={o.stage_steps} reaches stage {final_stage} by step {config.train.steps}, "
            f"where the gap t - r is below float32 resolution; raise objective.stage_steps or lower objective.q"
        )
    d = config.distance
    main = build_distance(d.name, **distance_options(config, d.name, resolution, channels))
    if d.mode == "pixel":
        return ECTObjective(main, p_mean, p_std, o.q, o.k, o.b, o.stage_steps)
    if d.mode == "aligned":
        return ECTObjective(Aligned(main), p_mean, p_std, o.q, o.k, o.b, o.stage_steps)
    pixel = build_distance(d.pixel, **distance_options(config, d.pixel, resolution, channels))
    return ECTObjective(pixel, p_mean, p_std, o.q, o.k, o.b, o.stage_steps, Aligned(main), d.weight, d.ramp_steps)


def _meanflow_objective(config: Config, p_mean: float, p_std: float, resolution: int | None,
                        channels: int | None) -> MeanFlowObjective:
    """MeanFlow in pixels (distance.mode=pixel) or with the unit-gradient direction of distance.name
    (distance.mode=aligned, e.g. MFD); the run's sampling schedules are checked here, before training."""
    from ayt.sampling import schedule_for

    for spec in (config.train.sample_sigmas, config.eval.sigmas):
        schedule_for(config, spec)
    o, d = config.objective, config.distance
    aligned = None
    if d.mode == "aligned":
        aligned = Aligned(build_distance(d.name, **distance_options(config, d.name, resolution, channels)))
    return MeanFlowObjective(aligned, p_mean, p_std, o.mf_ratio, o.mf_norm_p, o.mf_norm_eps, o.mf_mfd_tmax)


def distance_options(config: Config, name: str, resolution: int | None = None, channels: int | None = None) -> dict:
    """Keyword options for `build_distance(name)` taken from `config.distance`."""
    d = config.distance
    if name == "pseudo_huber":
        return {"c": d.c}
    if name == "mfd":
        return {"features": d.features, "form": d.form, "layers": d.layers, "resolution": resolution, "channels": channels,
                "arch": config.features.arch}
    if name == "lpips":
        return {"net": d.lpips_net, "upsample": d.lpips_upsample, "weights": d.lpips_weights}
    return {}


def model_key(checkpoint_modules: dict, which: str = "ema") -> str:
    """The module name in a checkpoint to use: the first EMA (`which='ema'`), `net`, or an exact name."""
    if which == "ema":
        if "ema0" not in checkpoint_modules:
            raise AytError("the checkpoint holds no EMA weights; pass --weights net to use the raw network")
        return "ema0"  # the first of train.ema_decays
    if which not in checkpoint_modules:
        networks = sorted(k for k in checkpoint_modules if k == "net" or k.startswith("ema"))  # not a task's extras (logvar)
        raise AytError(f"the checkpoint has no weights '{which}'; its networks: {', '.join(networks)}")
    return which


def _load_teacher(path: str, resolution: int | None, channels: int | None) -> Precond:
    """The frozen EDM denoiser of continuous-time distillation (its first EMA), checked against the data."""
    net, config = load_model(path)
    check(config.objective.kind == "edm",
          f"objective.teacher={path} is a {config.objective.kind!r} run; distillation needs an EDM diffusion model "
          "(ayt train objective.kind=edm)")
    check(resolution is None or (net.img_resolution, net.img_channels) == (resolution, channels),
          f"objective.teacher={path} was trained on {net.img_channels}x{net.img_resolution}^2 images, "
          f"this data is {channels}x{resolution}^2; use a teacher trained on this data")
    return net.requires_grad_(False)


def load_model(path: str | Path, which: str = "ema", device: str | torch.device = "cpu") -> tuple[Precond | MeanFlowNet, Config]:
    """Rebuild a network from a checkpoint (folder or run directory) with the config it was trained with.

    An EDM network pickle (`.pkl`, e.g. `edm-cifar10-32x32-uncond-vp.pkl`) is read without
    running its code (`ayt.nets.edm_pickle`) and comes with the config `edm_config` derives.
    """
    if is_edm_pickle(path):
        check(which == "ema", f"{path}: an EDM network pickle holds one network, its EMA; drop --weights {which}")
        net, arch = _edm_model(path)
        return net.to(device).eval(), edm_config(arch)
    ckpt = load_checkpoint(path)
    check(ckpt.state.get("kind") != "features", f"{ckpt.path} is a feature network ('ayt train-features'), not an "
          "image model; pass a run written by 'ayt train'")
    require_keys(ckpt.state, ("config", "data_info"), ckpt.path)
    config = config_from_dict(ckpt.state["config"])
    info = ckpt.state["data_info"]
    net = build_net(config, info["resolution"], info["channels"], info["num_classes"])
    weights = ckpt.modules[model_key(ckpt.modules, which)]
    check_compatible(weights, net, str(ckpt.path))
    check_finite(weights, ckpt.path)
    net.load_state_dict(weights)
    return net.to(device).eval(), config


def _edm_model(path: str | Path) -> tuple[Precond, EdmArchitecture]:
    """An EDM pickle's EMA network on ayt's sampling range; what was dropped is said on stderr."""
    defaults = Config().network
    net, arch = edm_network(path, sigma_min=defaults.sigma_min, sigma_max=defaults.sigma_max)
    for note in arch.notes:
        print(f"note: {path}: {note}", file=sys.stderr)
    return net, arch


def _closest_preset(model_type: str, unet_kwargs: dict) -> tuple[str, dict]:
    """The network preset of this architecture nearest to `unet_kwargs`, and the overrides that turn it into them."""
    fixed = ("img_resolution", "in_channels", "out_channels", "label_dim", "dropout")
    wanted = {k: v for k, v in unet_kwargs.items() if k not in fixed}
    presets = [name for name, cls in PRESET_ARCHITECTURES.items() if cls.__name__ == model_type]

    def overrides(preset: str) -> dict:
        base = preset_kwargs(preset)
        return {k: _plain(v) for k, v in wanted.items() if _plain(base.get(k)) != _plain(v)}

    best = min(presets, key=lambda name: len(overrides(name)))
    return best, overrides(best)


def _plain(value):
    return list(value) if isinstance(value, (tuple, list)) else value


def preset_kwargs(preset: str) -> dict:
    """The network keyword arguments of a preset, with its class's own defaults filled in."""
    params = inspect.signature(PRESET_ARCHITECTURES[preset].__init__).parameters.items()
    defaults = {k: p.default for k, p in params if p.default is not inspect.Parameter.empty}
    return {**defaults, **NETWORK_PRESETS[preset]}


def edm_config(arch: EdmArchitecture) -> Config:
    """An `ayt` config that rebuilds an EDM pickle's network: a preset (+ overrides), EDM scalings, kind `edm`.

    The data section names CIFAR-10 for 32x32 RGB networks (EDM's CIFAR-10 models) and an image
    folder otherwise; pass `data.*` overrides to train or evaluate on other data.
    """
    kw = arch.unet_kwargs
    preset, overrides = _closest_preset(arch.model_type, kw)
    res, channels = kw["img_resolution"], kw["in_channels"]
    data = {"name": "cifar10", "root": "data/cifar10", "resolution": 32} if (res, channels) == (32, 3) else \
        {"name": "folder", "root": None, "resolution": res, "channels": channels}
    return config_from_dict({
        "data": data,
        "network": {"preset": preset, "dropout": kw["dropout"], "sigma_data": arch.sigma_data,
                    "conditional": kw["label_dim"] > 0, "overrides": overrides},
        "objective": {"kind": "edm"},
    })


def convert_edm(path: str | Path, out: str | Path) -> Path:
    """Write an EDM network pickle as an `ayt` run folder: `config.yaml` + a step-0 checkpoint.

    The checkpoint holds the EMA weights as `ema0` (what `load_model`, `objective.init`,
    `objective.teacher`, `ayt sample` and `ayt eval` read) and `net`; its config rebuilds the
    network exactly (`edm_config`). `out` must not exist yet or be empty, so nothing is overwritten.
    """
    out = Path(out)
    check(is_edm_pickle(path), f"{path}: ayt convert reads EDM network pickles (.pkl); an ayt run folder needs no conversion")
    check(not out.exists() or (out.is_dir() and not any(out.iterdir())),
          f"--out {out} exists and is not empty; choose a new folder")
    check(out.parent.is_dir(), f"--out {out}: the folder {out.parent} does not exist; create it first")
    net, arch = _edm_model(path)
    config = edm_config(arch)
    kw = arch.unet_kwargs
    info = {"name": config.data.name, "resolution": kw["img_resolution"], "channels": kw["in_channels"],
            "num_classes": kw["label_dim"]}
    weights = net.state_dict()
    check_compatible(weights, build_net(config, info["resolution"], info["channels"], info["num_classes"]), str(path))
    out.mkdir(exist_ok=True)
    state = {"config": config.to_dict(), "data_info": info,
             "source": {"edm_pickle": str(Path(path).resolve()), "notes": arch.notes}}
    save_checkpoint(out, 0, {"ema0": weights, "net": weights}, state)
    save_config(config, out / "config.yaml")
    return out
