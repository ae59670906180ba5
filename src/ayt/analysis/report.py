"""Tangent analysis of checkpoints: do training updates of a consistency model move along the data manifold or towards it?

method.md section 3. For each checkpoint (ECT runs only) and each requested tangent, on one fixed
analysis batch (`--num` images, each at the `--buckets` noise levels, seeded):

- shapes data (known manifold): the fraction of each tangent's squared norm that lies along the
  manifold and its cosine with the direction towards the manifold, per noise-level bucket; with
  several checkpoints of one run, how much successive updates cancel (`decompose.oscillation`);
- any other dataset: the picture only (plus tangent norms) -- there is no manifold to split
  against. This is automatic and printed as a note; `--picture-only` asks for the same on shapes.

`tangent_report` gathers every number into one dict (`tangents.json`), `markdown` renders its
tables (`tangents.md`); the plots are in `ayt.analysis.pictures`, and the `ayt tangents` command
that wires them to its flags and output folder is `ayt.commands.tangents`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from ayt.analysis.decompose import (
    Decomposition,
    bucket_means,
    decompose_on_shapes,
    oscillation,
    project_on_shapes,
)
from ayt.analysis.pictures import picture_rows, tangent_picture
from ayt.analysis.tangents import (
    AnalysisBatch,
    TangentSet,
    all_tangents,
    analysis_batch,
    base_distance,
    bucket_levels,
    build_tangent_distance,
    check_consistency_state,
    is_continuous,
)
from ayt.build import LOGNORMAL_DEFAULTS, build_data, distance_options, load_model
from ayt.checkpoint import list_checkpoints, load_checkpoint
from ayt.config import Config
from ayt.data.shapes import NUM_PARAMS
from ayt.errors import check
from ayt.schedules import ect_stage, lognormal_bucket_edges

MANIFOLD_DATASETS = ("shapes",)


# ---------------------------------------------------------------- loading
@dataclass
class Model:
    """One consistency checkpoint: its folder, run folder, step, network and config."""

    path: Path
    run: Path
    step: int
    net: nn.Module
    config: Config
    data_info: dict


def checkpoint_paths(paths: list[str], expand: bool) -> list[Path]:
    """The given paths; with `expand`, each run folder is replaced by all its complete checkpoints."""
    result = []
    for path in map(Path, paths):
        found = list_checkpoints(path) if expand and (path / "checkpoints").is_dir() else []
        result += found or [path]
    return result


def load_models(paths: list[Path], which: str, device: str) -> list[Model]:
    """Load every checkpoint; AytError for diffusion checkpoints or mixed datasets. Sorted by step
    when all come from one run."""
    models = []
    for path in paths:
        ckpt = load_checkpoint(path)
        check_consistency_state(ckpt.state, str(ckpt.path))
        net, config = load_model(ckpt.path, which=which, device=device)
        models.append(Model(ckpt.path, ckpt.path.parent.parent, ckpt.step, net, config, ckpt.state["data_info"]))
    first = models[0]
    for m in models[1:]:
        check(m.data_info == first.data_info, f"{m.path} was trained on {m.data_info} but {first.path} on "
              f"{first.data_info}; compare checkpoints trained on the same data")
    return sorted(models, key=lambda m: m.step) if one_run(models) else models


def one_run(models: list[Model]) -> bool:
    """Whether all models are checkpoints of one run (then they are compared across training)."""
    return len({m.run.resolve() for m in models}) == 1


# ---------------------------------------------------------------- the batch and the distances
def make_batch(model: Model, num: int, buckets: int, stage: int, seed: int, device: str) -> AnalysisBatch:
    """The fixed analysis batch: `num` training images (seeded choice) at `buckets` levels."""
    check(num >= 1, f"--num {num}: need at least one image")
    dataset = build_data(model.config)
    generator = torch.Generator().manual_seed(seed)
    index = torch.randperm(len(dataset), generator=generator)[:num]
    o = model.config.objective
    p_mean, p_std = _lognormal(model.config)
    labels = dataset.labels[index].to(device) if model.net.label_dim else None
    return analysis_batch(dataset.images[index].to(device), bucket_levels(buckets, p_mean, p_std), generator,
                          stage, o.q, o.k, o.b, labels)


def _lognormal(config: Config) -> tuple[float, float]:
    """(P_mean, P_std) of the run's training `t` distribution."""
    o = config.objective
    p_mean, p_std = LOGNORMAL_DEFAULTS[o.kind]
    return (o.p_mean if o.p_mean is not None else p_mean), (o.p_std if o.p_std is not None else p_std)


def default_stage(model: Model) -> int:
    """The ECT stage the checkpoint was trained at (0 for a fixed stage)."""
    steps = model.config.objective.stage_steps
    return 0 if steps is None else ect_stage(model.step, steps)


def build_modules(names: list[str], model: Model, features: str | None, lpips_weights: str | None,
                  device: str) -> dict[str, nn.Module | None]:
    """name -> distance module (continuous: its feature distance, or None for pixels); `features`
    is the feature-network checkpoint of mfd tangents, `lpips_weights` overrides the run's LPIPS trunk."""
    check(not any(base_distance(n) == "mfd" for n in names) or features,
          "mfd tangents need a feature network: pass --features FEATURE_CHECKPOINT (train one with 'ayt train-features')")
    d = dataclasses.replace(model.config.distance, features=features,
                            lpips_weights=lpips_weights or model.config.distance.lpips_weights)
    config = dataclasses.replace(model.config, distance=d)
    res, ch = model.data_info["resolution"], model.data_info["channels"]
    modules: dict[str, nn.Module | None] = {}
    for name in names:
        base = base_distance(name)
        options = distance_options(config, base, res, ch) if base else {}
        options.pop("arch", None)  # --features names its own network: the run's features.arch does not describe it
        if is_continuous(name):
            modules[name] = None if base is None else build_tangent_distance(base, **options).to(device)
        else:
            modules[name] = build_tangent_distance(name, **options).to(device)
    return modules


# ---------------------------------------------------------------- analysis
@dataclass
class CheckpointResult:
    """Tangents of one checkpoint and, on a known manifold, their decompositions and fit quality."""

    model: Model
    tangents: TangentSet
    parts: dict[str, Decomposition] | None
    fit_rms: Tensor | None  # [B]
    direction_fraction: Tensor | None  # [B] parallel fraction of the towards-manifold direction (ideal 0)


def analyse(model: Model, batch: AnalysisBatch, modules: dict[str, nn.Module | None], manifold: bool, seed: int) -> CheckpointResult:
    """Tangents of one checkpoint; decomposed on the shapes manifold when `manifold`."""
    tangents = all_tangents(model.net, batch, modules)
    if not manifold:
        return CheckpointResult(model, tangents, None, None, None)
    projection = project_on_shapes(tangents.output, generator=torch.Generator().manual_seed(seed))
    parts = {name: decompose_on_shapes(g, tangents.output, projection) for name, g in tangents.tangents.items()}
    direction = decompose_on_shapes(projection.rendered - tangents.output, tangents.output, projection)
    return CheckpointResult(model, tangents, parts, projection.rms, direction.parallel_fraction)


def summarise(result: CheckpointResult, batch: AnalysisBatch) -> dict:
    """Per-bucket means of one checkpoint: per tangent `norm`, and on a manifold
    `parallel_fraction` and `cosine_to_manifold`; plus `fit_rms` and `direction_parallel_fraction`."""
    k = len(batch.levels)
    per = {name: {"norm": bucket_means(g.flatten(1).norm(dim=1), batch.bucket, k)} for name, g in result.tangents.tangents.items()}
    out = {"checkpoint": str(result.model.path), "step": result.model.step, "tangents": per}
    if result.parts is not None:
        for name, part in result.parts.items():
            per[name]["parallel_fraction"] = bucket_means(part.parallel_fraction, batch.bucket, k)
            per[name]["cosine_to_manifold"] = bucket_means(part.cosine, batch.bucket, k)
        out["fit_rms"] = bucket_means(result.fit_rms, batch.bucket, k)
        out["direction_parallel_fraction"] = bucket_means(result.direction_fraction, batch.bucket, k)
    return out


def oscillation_summary(results: list[CheckpointResult], batch: AnalysisBatch) -> dict:
    """Per tangent and part (tangent, parallel, orthogonal): per-bucket successive cosine and
    consistency ratio across the checkpoints (training order)."""
    k = len(batch.levels)
    out = {}
    for name in results[0].tangents.tangents:
        parts = {"tangent": torch.stack([r.tangents.tangents[name].flatten(1) for r in results])}
        if results[0].parts is not None:
            parts["parallel"] = torch.stack([r.parts[name].parallel for r in results])
            parts["orthogonal"] = torch.stack([r.parts[name].orthogonal for r in results])
        out[name] = {}
        for part, stacked in parts.items():
            osc = oscillation(stacked)
            out[name][part] = {"successive_cosine": bucket_means(osc.successive_cosine, batch.bucket, k),
                               "consistency": bucket_means(osc.consistency, batch.bucket, k)}
    return out


def tangent_report(results: list[CheckpointResult], batch: AnalysisBatch, last: Model, manifold: bool, stage: int,
                   seed: int) -> dict:
    """Every number of an analysis (`tangents.json`): levels, per-checkpoint summaries, and across
    checkpoints of one run the oscillation measures."""
    p_mean, p_std = _lognormal(last.config)
    report = {
        "data": last.data_info["name"], "manifold": manifold, "num_images": batch.num_images,
        "levels": batch.levels.tolist(), "bucket_edges": lognormal_bucket_edges(len(batch.levels), p_mean, p_std),
        "stage": stage, "seed": seed, "distances": list(results[0].tangents.tangents),
        "checkpoints": [summarise(r, batch) for r in results],
    }
    if manifold:
        info = last.data_info
        report["chance_parallel_fraction"] = NUM_PARAMS / (info["channels"] * info["resolution"] ** 2)
    if len(results) >= 2 and one_run([r.model for r in results]):
        report["oscillation"] = oscillation_summary(results, batch)
    elif len(results) >= 2:
        print("note: the checkpoints come from different runs; no oscillation measures (give checkpoints of one run)")
    return report


# ---------------------------------------------------------------- writing
def _fmt(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.3f}"


def table(rows: dict[str, list[float]], levels: list[float]) -> list[str]:
    """A markdown table: one row per name, one column per noise level."""
    from ayt.markdown import markdown_table

    header = ["", *(f"t={t:.3g}" for t in levels)]
    return [markdown_table(header, [[name, *map(_fmt, values)] for name, values in rows.items()]), ""]


def markdown(report: dict) -> str:
    """`tangents.md`: per checkpoint the parallel-fraction and cosine tables, then oscillation."""
    levels = report["levels"]
    lines = ["# CM tangents", "", (f"Data: {report['data']}; {report['num_images']} images x {len(levels)} noise levels; "
             f"ECT stage {report['stage']}; seed {report['seed']}. Tangent = the direction training moves the output "
             "f(x_t, t) (method.md section 3)."), ""]
    if report["manifold"]:
        lines += [("Parallel fraction = share of the tangent's squared norm along the shapes manifold (1 = along, "
                   "0 = across; a random direction gives k/D = "
                   f"{report['chance_parallel_fraction']:.4f}); cosine = cos(tangent, render(p*) - f), 1 = straight "
                   "towards the manifold. The pixel distances l2, pseudo_huber and squared_l2 all push along y - f, so "
                   "their fractions and cosines coincide; so do NAME and NAME:aligned (only the size differs)."), ""]
    for ck in report["checkpoints"]:
        lines += [f"## {ck['checkpoint']} (step {ck['step']})", ""]
        keys = ("parallel_fraction", "cosine_to_manifold", "norm") if report["manifold"] else ("norm",)
        for key in keys:
            lines += [f"{key.replace('_', ' ')}:", ""] + table({n: v[key] for n, v in ck["tangents"].items()}, levels)
        if report["manifold"]:
            lines += ["fit quality (RMS of f to its projection; parallel fraction of the towards direction, ideally 0):", ""]
            lines += table({"fit rms": ck["fit_rms"], "direction parallel": ck["direction_parallel_fraction"]}, levels)
    if report.get("oscillation"):
        lines += ["## Oscillation across checkpoints", "",
                  ("consistency = ||sum_k g_k|| / sum_k ||g_k|| over checkpoints (1 = same direction, ~0 = cancelling); "
                   "successive cosine = mean cos(g_k, g_k+1)."), ""]
        for measure in ("consistency", "successive_cosine"):
            rows = {f"{n} {part}": v[measure] for n, parts in report["oscillation"].items() for part, v in parts.items()}
            lines += [f"{measure.replace('_', ' ')}:", ""] + table(rows, levels)
    return "\n".join(lines)


def json_safe(obj):
    """NaN -> None, recursively (strict JSON)."""
    if isinstance(obj, float):
        return None if math.isnan(obj) else obj
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [json_safe(v) for v in obj]
    return obj


def write_picture(result: CheckpointResult, batch: AnalysisBatch, num: int, path: Path) -> Path:
    """The paper-style picture of the first `num` images of the batch (one checkpoint)."""

    def grid(x: Tensor) -> Tensor:
        return picture_rows(batch.grid(x), num)

    tangents = {name: grid(g) for name, g in result.tangents.tangents.items()}
    return tangent_picture(grid(batch.x_t), grid(result.tangents.output), tangents, batch.levels.cpu(), path,
                           title=f"{result.model.run.name}, step {result.model.step}")
