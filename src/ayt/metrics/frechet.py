"""Distances between feature distributions: Frechet distance, KID, precision / recall.

method.md section 6 evaluates with FID (Heusel et al. 2017): the Frechet distance between
Gaussians fitted to two sets of features,

    FD = |mu_1 - mu_2|^2 + Tr(Sigma_1 + Sigma_2 - 2 (Sigma_1 Sigma_2)^(1/2)),

and asks for precision / recall besides. KID (Binkowski et al. 2018: the unbiased MMD^2 with
the cubic polynomial kernel `k(x, y) = (x.y / D + 1)^3` over random subsets) and improved
precision / recall (Kynkaanniemi et al. 2019: k-NN balls around each set's points) come from
torch-fidelity's feature-level functions, so they work on any features, not only Inception's.
The Frechet distance is ours (float64, `scipy.linalg.sqrtm`) and is tested against
torch-fidelity's eigenvalue formula.

Features are float tensors `[N, D]` (one row per image); statistics are float64 numpy arrays.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.linalg
import torch

from ayt.data.npz import read_npz
from ayt.errors import check

#: Default KID subsets and largest subset size (torch-fidelity's and Binkowski et al.'s values).
KID_SUBSETS = 100
KID_SUBSET_SIZE = 1000
_SQRTM_TOLERANCE = 1e-3  # relative error of sqrtm (and imaginary part) accepted before the eps offset
_WARNED: set[tuple[int, int]] = set()  # (N, D) already warned about


def _as_float64(array: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu().double().numpy()
    return np.asarray(array, dtype=np.float64)


def frechet_distance(mu1: np.ndarray | torch.Tensor, sigma1: np.ndarray | torch.Tensor,
                     mu2: np.ndarray | torch.Tensor, sigma2: np.ndarray | torch.Tensor,
                     eps: float = 1e-6) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2) (method.md section 6, FID).

    Args:
        mu1, mu2: means `[D]`.
        sigma1, sigma2: covariances `[D, D]`.
        eps: when `sqrtm(sigma1 sigma2)` is not finite or inaccurate (near-singular
            covariances, e.g. fewer samples than dimensions), `eps * I` is added to both
            covariances and the root is taken again. A small imaginary part left by rounding
            is dropped; a large one is reported with a warning.
    Returns:
        the distance (float, >= 0 up to rounding), computed in float64; nan (with a warning)
        when the statistics are not finite, e.g. from a diverged model's samples.
    """
    mu1, mu2, sigma1, sigma2 = (_as_float64(a) for a in (mu1, mu2, sigma1, sigma2))
    check(mu1.ndim == 1 and mu1.shape == mu2.shape and sigma1.shape == sigma2.shape == mu1.shape * 2,
          f"frechet_distance: need means [D] and covariances [D, D] of one D, got {mu1.shape}, "
          f"{sigma1.shape}, {mu2.shape}, {sigma2.shape}; compare features of the same network")
    if not all(np.isfinite(a).all() for a in (mu1, mu2, sigma1, sigma2)):
        warnings.warn("frechet_distance: the statistics hold NaN or inf (diverged samples?); returning nan")
        return math.nan
    covmean = _sqrtm_product(sigma1, sigma2)
    if covmean is None:
        offset = eps * np.eye(len(mu1))
        covmean = _sqrtm_product(sigma1 + offset, sigma2 + offset, strict=False)
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def _sqrtm_product(sigma1: np.ndarray, sigma2: np.ndarray, strict: bool = True) -> np.ndarray | None:
    """Real `(sigma1 sigma2)^(1/2)`; None when it is not finite or not accurate (`strict`), else a
    warning for an inaccurate root."""
    product = sigma1 @ sigma2
    with warnings.catch_warnings():  # singular products are caught by the accuracy test below
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        root = scipy.linalg.sqrtm(product)
    if not np.isfinite(root).all():
        check(strict, "frechet_distance: no finite square root of the covariance product even with the eps "
              "offset; evaluate more samples")
        return None
    error = np.linalg.norm(root @ root - product) / max(np.linalg.norm(product), 1e-300)
    if error > _SQRTM_TOLERANCE:
        if strict:
            return None
        warnings.warn(f"frechet_distance: sqrtm is inaccurate (relative error {error:.2g}) even with the eps offset")
    if np.iscomplexobj(root):
        imag = np.abs(np.diagonal(root).imag).max()
        if imag > _SQRTM_TOLERANCE * max(1.0, np.abs(np.diagonal(root).real).max()):
            warnings.warn(f"frechet_distance: sqrtm left an imaginary part of {imag:.3g}; using the real part")
        root = root.real
    return root


# ---------------------------------------------------------------- statistics
@dataclass
class FeatureStats:
    """Mean and covariance of `n` feature vectors, optionally with a subset of the features.

    Attributes:
        mu: float64 `[D]`.
        sigma: float64 `[D, D]` (sample covariance, divisor `n - 1`).
        n: number of feature vectors (0 when unknown, e.g. a pytorch-fid file).
        kind: which features ("inception-v3-compat/2048", "digits-8/64", ...; "" unknown).
        features: float32 `[M, D]` kept for KID and precision / recall, or None.
        pipeline: how images became network inputs (`ayt.metrics.inception.PIPELINE`; "" unknown).
    """

    mu: np.ndarray
    sigma: np.ndarray
    n: int
    kind: str = ""
    features: np.ndarray | None = None
    pipeline: str = ""

    def __post_init__(self) -> None:
        self.mu, self.sigma = _as_float64(self.mu), _as_float64(self.sigma)
        d = self.mu.shape[0] if self.mu.ndim == 1 else -1
        check(self.mu.ndim == 1 and self.sigma.shape == (d, d),
              f"feature statistics need mu [D] and sigma [D, D], got {self.mu.shape} and {self.sigma.shape}; "
              "recompute them with 'ayt fid-stats'")
        if self.features is not None:
            self.features = np.asarray(self.features, dtype=np.float32)
            check(self.features.ndim == 2 and self.features.shape[1] == d,
                  f"stored features must be [M, {d}], got {self.features.shape}; recompute the statistics")

    @property
    def dim(self) -> int:
        return int(self.mu.shape[0])

    @property
    def provenance(self) -> str:
        """Which network and image pipeline made these statistics, in words (for FID records)."""
        return provenance(self.kind, self.pipeline)

    def save(self, path: str | Path) -> Path:
        """Write an .npz with keys mu, sigma, n, kind, pipeline (and features); atomic (temp file + rename)."""
        path = Path(path)
        check(path.suffix == ".npz", f"statistics file {path} must end in .npz; rename it")
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {"mu": self.mu, "sigma": self.sigma, "n": np.int64(self.n), "kind": np.str_(self.kind),
                  "pipeline": np.str_(self.pipeline)}
        if self.features is not None:
            arrays["features"] = self.features
        tmp = path.with_name(f".tmp-{path.name}")
        with open(tmp, "wb") as handle:
            np.savez(handle, **arrays)
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path, kind: str | None = None, pipeline: str | None = None) -> FeatureStats:
        """Read statistics written by `save`, or a file from the field with `mu` and `sigma` only
        (pytorch-fid `--save-stats`, EDM `fid.py ref`, TTUR): those carry no provenance.

        `kind`, `pipeline`: raise unless the file's are these (files without them are accepted).
        """
        path = Path(path)
        check(path.is_file(), f"statistics file {path} does not exist; compute it with 'ayt fid-stats --out {path}'")
        values = read_npz(path, "recompute the statistics with 'ayt fid-stats'")
        check("mu" in values and "sigma" in values,
              f"statistics file {path} has no 'mu' and 'sigma' arrays (has {sorted(values)}); recompute it with 'ayt fid-stats'")
        stats = cls(values["mu"], values["sigma"], int(values.get("n", 0)), str(values.get("kind", "")),
                    values.get("features"), str(values.get("pipeline", "")))
        check(bool(np.isfinite(stats.mu).all() and np.isfinite(stats.sigma).all()),
              f"statistics file {path} holds NaN or inf; recompute it with 'ayt fid-stats'")
        check(kind is None or stats.kind in ("", kind),
              f"statistics file {path} holds '{stats.kind}' features but '{kind}' are needed; "
              "compute matching statistics with 'ayt fid-stats'")
        check(pipeline is None or stats.pipeline in ("", pipeline),
              f"statistics file {path} was made with the image pipeline '{stats.pipeline}' but samples go through "
              f"'{pipeline}'; compute matching statistics with 'ayt fid-stats'")
        return stats


def read_provenance(path: str | Path) -> str:
    """`provenance` of a statistics file, reading only its small `kind` and `pipeline` entries."""
    try:
        with np.load(path, allow_pickle=False) as data:
            return provenance(*(str(data[k]) if k in data.files else "" for k in ("kind", "pipeline")))
    except (OSError, ValueError) as err:
        raise AytError(f"cannot read statistics file {path} ({err}); recompute it with 'ayt fid-stats'") from None


def provenance(kind: str, pipeline: str) -> str:
    """`kind; pipeline` in words; says so when a file from the field recorded neither."""
    if not kind and not pipeline:
        return "unknown (external mu/sigma file)"
    return f"{kind or 'features unknown'}; {pipeline or 'image pipeline not recorded'}"


def feature_stats(features: torch.Tensor | np.ndarray, kind: str = "", keep: int = 0,
                  generator: torch.Generator | None = None) -> FeatureStats:
    """Mean and covariance of features `[N, D]` (float64, accumulated in chunks of rows).

    Warns (once per `N, D`) when `N <= D`: the covariance then has rank at most `N - 1 < D` and
    the Frechet distance is biased and unstable; at least `D + 1` samples are needed (several
    times `D` in practice). `keep > 0` stores a random subset (drawn with `generator`) of `keep` rows
    for KID and precision / recall.
    """
    x = torch.as_tensor(features).detach().cpu()
    check(x.dim() == 2 and x.shape[0] >= 2, f"feature_stats: need features [N, D] with N >= 2, got "
          f"{tuple(x.shape)}; evaluate more samples")
    n, d = x.shape
    if n <= d and (n, d) not in _WARNED:  # once per size: evaluations repeat in a training run
        _WARNED.add((n, d))
        warnings.warn(f"{n} samples for {d}-dimensional features: the covariance is not full rank; "
                      f"use at least {d + 1} samples (e.g. --num {max(2 * d, 1000)}) for a meaningful Frechet distance")
    mu, sigma = _mean_cov(x)
    kept = None
    if keep > 0:
        rows = torch.arange(n) if keep >= n else torch.randperm(n, generator=generator)[:keep].sort().values
        kept = x[rows].float().numpy()
    return FeatureStats(mu, sigma, n, kind, kept)


def _mean_cov(x: torch.Tensor, chunk: int = 8192) -> tuple[np.ndarray, np.ndarray]:
    """Mean `[D]` and sample covariance `[D, D]` (divisor N - 1) of `x` `[N, D]`, two passes in float64."""
    n = x.shape[0]
    mu = sum(c.double().sum(0) for c in x.split(chunk)) / n
    centred = (c.double() - mu for c in x.split(chunk))
    sigma = sum(c.T @ c for c in centred) / (n - 1)
    return mu.numpy(), sigma.numpy()


# ---------------------------------------------------------------- KID, precision / recall
def _as_tensor(features: torch.Tensor | np.ndarray) -> torch.Tensor:
    t = torch.as_tensor(features).detach().cpu().float()
    check(t.dim() == 2, f"features must be [N, D], got {tuple(t.shape)}")
    return t


def kid(features_a: torch.Tensor | np.ndarray, features_b: torch.Tensor | np.ndarray,
        subsets: int = KID_SUBSETS, subset_size: int | None = None, seed: int = 0) -> tuple[float, float]:
    """Kernel Inception Distance (Binkowski et al. 2018) between features `[N_a, D]`, `[N_b, D]`.

    The unbiased MMD^2 with kernel `(x.y / D + 1)^3`, averaged over `subsets` random subsets
    of `subset_size` rows of each set (default `min(1000, N_a, N_b)`); computed by
    torch-fidelity's `kid_features_to_metric` with `seed` for the subsets.
    Returns `(mean, std)` over the subsets; values near 0 (even slightly negative) mean
    the distributions match.
    """
    from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric

    a, b = _as_tensor(features_a), _as_tensor(features_b)
    check(a.shape[1] == b.shape[1], f"kid: feature dimensions differ ({a.shape[1]} vs {b.shape[1]})")
    largest = min(len(a), len(b))
    size = min(KID_SUBSET_SIZE, largest) if subset_size is None else subset_size
    check(2 <= size <= largest, f"kid: subset_size={size} must be in 2..{largest} (the smaller set's size); "
          "lower it or evaluate more samples")
    out = kid_features_to_metric(a, b, kid_subsets=subsets, kid_subset_size=size, rng_seed=seed, verbose=False)
    return out[KEY_METRIC_KID_MEAN], out[KEY_METRIC_KID_STD]


def precision_recall(real: torch.Tensor | np.ndarray, fake: torch.Tensor | np.ndarray,
                     k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019) of `fake` `[N_f, D]` against `real` `[N_r, D]`.

    Each set's manifold is the union of balls around its points with radius the distance to
    the point's k-th nearest neighbour in the same set. Precision: fraction of fake points
    inside the real manifold; recall: fraction of real points inside the fake manifold.
    Computed by torch-fidelity's `prc_features_to_metric` (batched distances). Use sets of
    equal size: the radii shrink as a set grows.
    """
    from torch_fidelity.metric_prc import KEY_METRIC_PRECISION, KEY_METRIC_RECALL, prc_features_to_metric

    r, f = _as_tensor(real), _as_tensor(fake)
    check(r.shape[1] == f.shape[1], f"precision_recall: feature dimensions differ ({r.shape[1]} vs {f.shape[1]})")
    check(1 <= k < min(len(r), len(f)), f"precision_recall: k={k} needs more than k points in each set "
          f"(got {len(r)} real, {len(f)} fake); lower k or evaluate more samples")
    out = prc_features_to_metric(f, r, prc_neighborhood=k, prc_batch_size=10000, save_cpu_ram=True, verbose=False)
    return out[KEY_METRIC_PRECISION], out[KEY_METRIC_RECALL]
