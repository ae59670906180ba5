"""Evaluate a model: generate samples, score them with the dataset's metric (method.md section 6).

The metric family follows the data (`metric="auto"`):

| data   | family      | keys (`eval.best_metric` picks the best checkpoint; default in bold) |
|--------|-------------|-------------------------------------------------------------------|
| shapes | `manifold`  | manifold_rms, **param_fd**, param_swd, coverage (higher is better) |
| digits | `fd_digits` | **fd_digits**, kid_digits                                         |
| other  | `fid`       | **fid**, kid (+ kid_std, precision, recall with reference features) |

On shapes `manifold_rms` is reported first: the usual failure of one-step samples during training
is leaving the manifold (blur, averaged shapes, noise), which `manifold_rms` measures exactly
while `param_fd` barely moves (a noisy or slightly blurred ellipse still fits plausible
parameters). Mode dropping, which `manifold_rms` cannot see, shows in `param_fd`, `param_swd`
and `coverage`. The best checkpoint follows `param_fd` by default: `manifold_rms` rises while
tuning spreads the samples over the distribution (see `ayt.train.best_metric`).

Denoising metrics (method.md section 6, "denoising FID"): training images are noised at level
`sigma`, `x_t = x_0 + sigma * eps`, mapped in one call `f(x_t, sigma)`, and the outputs are
scored like samples; the family's first key gets the suffix `_denoise_<sigma>`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ayt.config import HEUN_STEPS, METRICS, Config
from ayt.data import ImageDataset
from ayt.errors import AytError, check
from ayt.metrics.classifier import DigitsFeatures, stats_distance
from ayt.metrics.frechet import FeatureStats, feature_stats, kid, precision_recall, read_provenance
from ayt.metrics.inception import FEATURE_DIM, FEATURE_KIND, NETWORK, PIPELINE, InceptionFeatures
from ayt.metrics.manifold import manifold_metrics
from ayt.sampling import schedule_for, stream

REFERENCE_FEATURES = 10000  # reference features kept for KID and precision / recall
_WARNED_UNKNOWN: set[str] = set()  # reference statistics files already warned about
Evaluator = Callable[[nn.Module, int], dict[str, float]]


def resolve_metric(metric: str, data_name: str) -> str:
    """The metric family: `metric` itself, or for "auto" the one of the dataset (see module doc)."""
    check(metric in METRICS, f"unknown metric {metric!r}; use one of {', '.join(METRICS)}")
    if metric != "auto":
        return metric
    return {"shapes": "manifold", "digits": "fd_digits"}.get(data_name, "fid")


# ---------------------------------------------------------------- sample streams
@torch.no_grad()
def denoise(net: nn.Module, dataset: ImageDataset, n: int, sigma: float, batch: int = 256, seed: int = 0,
            device: str | torch.device = "cpu", conditional: bool = False) -> Iterator[torch.Tensor]:
    """Stream one-step outputs `f(x_0 + sigma * eps, sigma)` for `n` training images (a seeded
    random subset of `dataset`), in batches `[<= batch, C, H, W]` on `device`."""
    check(sigma > 0, f"denoising level {sigma} must be > 0")
    generator = torch.Generator().manual_seed(seed)
    index = torch.randperm(len(dataset), generator=generator)[: min(n, len(dataset))]
    for chunk in index.split(batch):
        x0 = dataset.images[chunk]
        x_t = (x0 + sigma * torch.randn(x0.shape, generator=generator)).to(device)
        labels = dataset.labels[chunk].to(device) if conditional else None
        yield net(x_t, torch.full((len(x_t),), float(sigma), device=device), labels)


# ---------------------------------------------------------------- scorers
@dataclass
class ManifoldScorer:
    """Shapes: fit the renderer to every sample, compare with the dataset's parameters `[N, P]`."""

    reference_params: torch.Tensor
    seed: int = 0

    def __call__(self, batches: Iterable[torch.Tensor]) -> dict[str, float]:
        images = torch.cat(list(batches))
        check(images.shape[1] == 3, f"manifold metrics need 3-channel shapes images, got {images.shape[1]} channels")
        return manifold_metrics(images, self.reference_params, generator=torch.Generator().manual_seed(self.seed))


@dataclass
class FeatureScorer:
    """Frechet distance (and KID, precision / recall) in a feature space against reference statistics.

    `names` maps the generic keys to reported ones, e.g. {"fd": "fid", "kid": "kid"}; precision
    and recall are only computed when `names` has them and `reference.features` is stored.
    """

    features: Callable[[torch.Tensor], torch.Tensor]
    reference: FeatureStats
    names: dict[str, str]
    seed: int = 0

    def __call__(self, batches: Iterable[torch.Tensor]) -> dict[str, float]:
        fake = torch.cat([self.features(b) for b in batches])
        ref = self.reference
        out = {self.names["fd"]: stats_distance(feature_stats(fake), ref)}
        if ref.features is None:
            return out
        real = torch.from_numpy(ref.features)
        mean, std = kid(fake, real, seed=self.seed)
        out[self.names["kid"]] = mean
        if "kid_std" in self.names:
            out[self.names["kid_std"]] = std
        if "precision" in self.names:  # sets of equal size, as Kynkaanniemi et al. compare them
            generator = torch.Generator().manual_seed(self.seed)
            m = min(len(real), len(fake))
            real, fake = (x[torch.randperm(len(x), generator=generator)[:m]] for x in (real, fake))
            out["precision"], out["recall"] = precision_recall(real, fake)
        return out


Scorer = Callable[[Iterable[torch.Tensor]], dict[str, float]]


def reference_stats(features: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, kind: str,
                    batch: int = 256, seed: int = 0, keep: int = REFERENCE_FEATURES, pipeline: str = "") -> FeatureStats:
    """Statistics of `features` over `images` `[N, C, H, W]`, keeping `keep` random feature rows."""
    feats = torch.cat([features(x) for x in images.split(batch)])
    stats = feature_stats(feats, kind, keep=keep, generator=torch.Generator().manual_seed(seed))
    stats.pipeline = pipeline
    return stats


def load_ref_stats(path: str | Path, dim: int | None = FEATURE_DIM) -> FeatureStats:
    """FID reference statistics of `dim`-d Inception features, made the way samples are (see README, FID protocol).

    An `ayt fid-stats` file records its network and image pipeline, and another one is refused.
    Files from the field (pytorch-fid, EDM `fid-refs`, the AYT reference's `FID_stats`) hold only
    `mu` and `sigma`: nothing says how they were made, which is warned about once per file.
    """
    stats = FeatureStats.load(path, kind=FEATURE_KIND, pipeline=PIPELINE)
    if dim is not None:
        check_ref_dim(stats, dim, path)
    if not stats.kind and str(path) not in _WARNED_UNKNOWN:
        _WARNED_UNKNOWN.add(str(path))
        warnings.warn(f"reference statistics {path} carry no provenance (external mu/sigma file): the FID is "
                      "comparable only if they came from the same Inception network and image pipeline as the "
                      "samples (torch-fidelity inception-v3-compat on uint8 images); see README 'FID protocol', "
                      "or make them with 'ayt fid-stats'", stacklevel=2)
    return stats


def check_ref_dim(stats: FeatureStats, dim: int, path: str | Path) -> None:
    """Reference statistics must be of the features the samples get."""
    check(stats.dim == dim, f"reference statistics {path} hold {stats.dim}-d features but the Inception pool "
          f"features are {dim}-d; use statistics of the {dim}-d pool features (pytorch-fid: --dims 2048)")


def fid_protocol(ref_stats: str | Path | None) -> dict[str, str | None]:
    """Which network and image pipeline made each side of an FID; recorded with every FID result."""
    if ref_stats is None:
        reference = f"{FEATURE_KIND}; {PIPELINE} (computed here from the training images)"
    else:
        reference = read_provenance(ref_stats)
    return {"inception": NETWORK, "sample_features": f"{FEATURE_KIND}; {PIPELINE}",
            "ref_stats": None if ref_stats is None else str(ref_stats), "ref_provenance": reference}


def build_scorer(config: Config, metric: str = "auto", *, image_shape: tuple[int, int],
                 dataset: ImageDataset | None = None, device: str | torch.device = "cpu",
                 inception_weights: str | Path | None = None, ref_stats: str | Path | None = None,
                 seed: int = 0) -> Scorer:
    """The scorer of `metric` for images of `image_shape = (channels, resolution)`.

    `dataset` (default: built from `config.data` when needed) gives the shapes parameters
    and, for FID without `ref_stats`, the reference images.
    """
    family = resolve_metric(metric, config.data.name)
    check(family != "none", "metric 'none' computes nothing; choose auto, manifold, fd_digits or fid")
    channels, resolution = image_shape
    if family == "manifold":
        data = dataset if dataset is not None else _dataset(config, "the manifold metrics need the shapes parameters")
        check(hasattr(data, "params"), f"metric 'manifold' needs shapes data, not {data.name}; use --metric fid")
        return ManifoldScorer(data.params, seed)
    if family == "fd_digits":
        check(channels == 1, f"metric 'fd_digits' needs 1-channel digits images, got {channels}; use --metric fid")
        digits = DigitsFeatures(resolution, device=device)
        names = {"fd": "fd_digits", "kid": "kid_digits"}
        return FeatureScorer(digits, feature_stats(digits.reference("train"), digits.kind, keep=1500), names, seed)
    stats = load_ref_stats(ref_stats, dim=None) if ref_stats is not None else None  # before the weights: the right error first
    inception = InceptionFeatures(inception_weights, device)
    if stats is not None:
        check_ref_dim(stats, inception.dim, ref_stats)
    else:
        data = dataset if dataset is not None else _dataset(config, "FID needs reference statistics: pass --ref-stats STATS.npz (see 'ayt fid-stats')")
        stats = reference_stats(inception, data.images, FEATURE_KIND, seed=seed, pipeline=PIPELINE)
    names = {"fd": "fid", "kid": "kid", "kid_std": "kid_std", "precision": "precision", "recall": "recall"}
    return FeatureScorer(inception, stats, names, seed)


def _dataset(config: Config, why: str) -> ImageDataset:
    from ayt.build import build_data

    try:
        return build_data(config)
    except AytError as err:
        raise AytError(f"{why}, or make the training data available ({err})") from None


# ---------------------------------------------------------------- evaluation
def _score_model(net: nn.Module, config: Config, scorer: Scorer, *, num_samples: int, sigmas: str | Sequence[float],
                 seed: int, device: str | torch.device, batch: int, heun_steps: int,
                 denoise_sigmas: Sequence[float], dataset: ImageDataset | None) -> dict[str, float]:
    """Sample metrics, then one `<first key>_denoise_<sigma>` per denoising level."""
    was_training = net.training
    net.eval()
    try:
        samples = stream(net, schedule_for(config, sigmas, heun_steps), num_samples, batch, seed, device,
                         config.network.conditional)
        out = scorer(samples)
        primary = next(iter(out))
        if denoise_sigmas:
            data = dataset if dataset is not None else _dataset(config, "denoising metrics need the training images")
            for sigma in denoise_sigmas:
                noised = denoise(net, data, num_samples, sigma, batch, seed, device, config.network.conditional)
                out[f"{primary}_denoise_{sigma:g}"] = scorer(noised)[primary]
    finally:
        net.train(was_training)
    return out


def evaluate_model(net: nn.Module, config: Config, *, metric: str = "auto", num_samples: int = 1000,
                   sigmas: str | Sequence[float] = "1", seed: int = 0, device: str | torch.device = "cpu",
                   inception_weights: str | Path | None = None, ref_stats: str | Path | None = None,
                   denoise_sigmas: Sequence[float] = (), dataset: ImageDataset | None = None,
                   batch: int = 256, heun_steps: int = HEUN_STEPS) -> dict[str, float]:
    """Score `num_samples` samples of `net` (keys: see the module doc; first = primary, lower is better).

    `sigmas`: consistency schedule ("1", "2", comma list); `heun_steps` for EDM models.
    `denoise_sigmas`: also score one-step denoising of training images at these levels.
    """
    runs = evaluate_runs(net, config, runs=1, metric=metric, num_samples=num_samples, sigmas=sigmas, seed=seed,
                         device=device, inception_weights=inception_weights, ref_stats=ref_stats,
                         denoise_sigmas=denoise_sigmas, dataset=dataset, batch=batch, heun_steps=heun_steps)
    return {key: summary["mean"] for key, summary in runs.items()}


def evaluate_runs(net: nn.Module, config: Config, *, runs: int = 3, metric: str = "auto", num_samples: int = 1000,
                  sigmas: str | Sequence[float] = "1", seed: int = 0, device: str | torch.device = "cpu",
                  inception_weights: str | Path | None = None, ref_stats: str | Path | None = None,
                  denoise_sigmas: Sequence[float] = (), dataset: ImageDataset | None = None,
                  batch: int = 256, heun_steps: int = HEUN_STEPS) -> dict[str, dict]:
    """`runs` independent evaluations (seeds `seed .. seed + runs - 1`) against one reference.

    Returns `{key: {"mean", "std", "min", "max", "values"}}` in the order of `evaluate_model`'s keys.
    """
    check(runs >= 1 and num_samples >= 2, f"need runs >= 1 and num_samples >= 2, got {runs} and {num_samples}")
    net = net.to(device)
    if denoise_sigmas and dataset is None:
        dataset = _dataset(config, "denoising metrics need the training images")
    scorer = build_scorer(config, metric, image_shape=(net.img_channels, net.img_resolution), dataset=dataset,
                          device=device, inception_weights=inception_weights, ref_stats=ref_stats, seed=seed)
    results = [_score_model(net, config, scorer, num_samples=num_samples, sigmas=sigmas, seed=seed + i,
                            device=device, batch=batch, heun_steps=heun_steps, denoise_sigmas=denoise_sigmas,
                            dataset=dataset) for i in range(runs)]
    return {key: summarise([r[key] for r in results]) for key in results[0]}


def summarise(values: list[float]) -> dict:
    """Mean, std (population), min, max and the values themselves."""
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
    return {"mean": mean, "std": std, "min": min(values), "max": max(values), "values": list(values)}


# The keys each metric family reports, the first one also per denoising level (see `_score_model`).
FAMILY_KEYS = {"manifold": ("manifold_rms", "param_fd", "param_swd", "coverage"),
               "fd_digits": ("fd_digits", "kid_digits"),
               "fid": ("fid", "kid", "kid_std", "precision", "recall")}


def check_best_metric(config: Config) -> None:
    """`eval.best_metric` must be a key this run's evaluation reports (checked before training starts)."""
    ec = config.eval
    if ec.best_metric == "auto":
        return
    keys = FAMILY_KEYS[resolve_metric(ec.metric, config.data.name)]
    keys = (*keys, *(f"{keys[0]}_denoise_{s:g}" for s in ec.denoise_sigmas))
    check(ec.best_metric in keys, f"eval.best_metric={ec.best_metric} is not measured by this run's evaluation; "
          f"choose one of: {', '.join(keys)}")


def build_evaluator(config: Config, dataset: ImageDataset, device: str | torch.device = "cpu") -> Evaluator | None:
    """The trainer's `evaluator(ema_net, step) -> dict[str, float]` (None when `eval.metric` is none).

    Uses `eval.metric`, `eval.num_samples`, `eval.sigmas`, `eval.inception_weights`,
    `eval.ref_stats` and `eval.denoise_sigmas`. The reference and the
    noise are fixed once (seed `train.seed`), so scores at different steps are comparable.
    """
    ec = config.eval
    if ec.metric == "none":
        return None
    denoise_sigmas = list(ec.denoise_sigmas)
    check_best_metric(config)
    scorer = build_scorer(config, ec.metric, image_shape=(dataset.channels, dataset.resolution), dataset=dataset,
                          device=device, inception_weights=ec.inception_weights, ref_stats=ec.ref_stats,
                          seed=config.train.seed)

    def evaluator(net: nn.Module, step: int) -> dict[str, float]:
        return _score_model(net, config, scorer, num_samples=ec.num_samples, sigmas=ec.sigmas,
                            seed=config.train.seed, device=device, batch=256, heun_steps=HEUN_STEPS,
                            denoise_sigmas=denoise_sigmas, dataset=dataset)

    return evaluator
