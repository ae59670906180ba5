"""Split CM tangents into parts along and across a known data manifold (method.md section 3).

For a tangent `g` applied to an output `f`, let `p*` be the projection of `f` on the manifold
(its closest manifold point `m = render(p*)`) and `J = d render / d p` at `p*` [D, k]: its
columns span the manifold's tangent space at `m`. Then

    g_par = P_J g   (least-squares projection onto span(J)),   g_orth = g - g_par,
    parallel fraction = ||g_par||^2 / ||g||^2   in [0, 1],
    cosine to the manifold = cos(g, m - f)   (1: straight towards the manifold).

A tangent "along" the manifold (fraction near 1) changes which image is produced; one "towards"
it (cosine near 1, fraction near 0) removes what is off the manifold. On the shapes dataset
(`ayt.data.shapes`) the manifold is known exactly: `render` over the parameter box.

Across training (several checkpoints of one run on the same `AnalysisBatch`), `oscillation`
measures whether the updates along the manifold keep one direction or cancel.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ayt.data.shapes import render
from ayt.errors import check
from ayt.metrics.manifold import fit_shapes

RTOL = 1e-6  # singular values below RTOL * largest count as rank deficiency


@dataclass
class Decomposition:
    """Parts of tangents g [B, D] (float64).

    Attributes:
        parallel: [B, D] projection of g on the tangent space.
        orthogonal: [B, D] g - parallel.
        parallel_fraction: [B] `||parallel||^2 / ||g||^2` (NaN where g = 0).
        cosine: [B] `cos(g, direction)` (NaN where either is 0), or None without a direction.
    """

    parallel: Tensor
    orthogonal: Tensor
    parallel_fraction: Tensor
    cosine: Tensor | None


def cosine(a: Tensor, b: Tensor) -> Tensor:
    """Per-example cosine of a, b [B, ...] -> [B]; NaN where either vector is 0."""
    a, b = a.flatten(1).double(), b.flatten(1).double()
    denominator = a.norm(dim=1) * b.norm(dim=1)
    return (a * b).sum(1) / torch.where(denominator > 0, denominator, torch.nan)


def orthonormal_basis(basis: Tensor, rtol: float = RTOL) -> Tensor:
    """An orthonormal basis of the column span of `basis` [B, D, k] -> [B, D, k] float64.

    Thin SVD `J = U S V^T`; columns of U whose singular value is below `rtol * max(S)` are set
    to 0, so a rank-deficient J (repeated or zero columns) projects onto its true span. (Plain
    QR without column pivoting would keep an arbitrary direction for a dependent column.)
    """
    u, s, _ = torch.linalg.svd(basis.double(), full_matrices=False)
    keep = s > rtol * s.amax(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
    return u * keep[:, None, :]


def decompose(g: Tensor, basis: Tensor, direction: Tensor | None = None, rtol: float = RTOL) -> Decomposition:
    """Split tangents g [B, ...] (flattened to [B, D]) against tangent spaces `basis` [B, D, k].

    `direction` [B, ...]: optional reference (e.g. towards the manifold, `render(p*) - f`) for
    the cosine. Computed in float64.
    """
    flat = g.flatten(1).double()
    check(basis.dim() == 3 and basis.shape[:2] == flat.shape,
          f"decompose: basis must be [B, D, k] = [{flat.shape[0]}, {flat.shape[1]}, k], got {tuple(basis.shape)}")
    q = orthonormal_basis(basis, rtol)
    parallel = (q @ (q.transpose(1, 2) @ flat[:, :, None]))[:, :, 0]
    total = flat.square().sum(1)
    fraction = parallel.square().sum(1) / torch.where(total > 0, total, torch.nan)
    cos = None if direction is None else cosine(flat, direction)
    return Decomposition(parallel, flat - parallel, fraction, cos)


# ---------------------------------------------------------------- the shapes manifold
@dataclass
class ShapesProjection:
    """Projection of images [B, 3, H, W] on the shapes manifold.

    Attributes:
        params: [B, P] fitted parameters `p*` (canonical, inside the box).
        rendered: [B, 3, H, W] `render(p*)`, the closest manifold point found.
        rms: [B] pixel RMS distance from each image to `rendered`.
        basis: [B, 3*H*W, P] the renderer's Jacobian at `p*` (tangent-space basis).
    """

    params: Tensor
    rendered: Tensor
    rms: Tensor
    basis: Tensor


def render_jacobian(params: Tensor, resolution: int) -> Tensor:
    """`d render(p) / d p` at each row of params [B, P] -> [B, 3*H*W, P] (forward mode, vmapped)."""

    def one(p: Tensor) -> Tensor:
        return render(p[None], resolution).flatten()

    return torch.func.vmap(torch.func.jacfwd(one))(params)


def project_on_shapes(images: Tensor, generator: torch.Generator | None = None, **fit_options) -> ShapesProjection:
    """Fit the renderer to each image (`ayt.metrics.manifold.fit_shapes`) and take its Jacobian there."""
    fit = fit_shapes(images, generator=generator, **fit_options)
    basis = render_jacobian(fit.params, images.shape[-1])
    return ShapesProjection(fit.params, fit.rendered, fit.rms, basis)


def decompose_on_shapes(tangent: Tensor, output: Tensor, projection: ShapesProjection) -> Decomposition:
    """Decompose a tangent [B, 3, H, W] applied to `output` [B, 3, H, W]; the cosine is with the
    direction towards the manifold, `render(p*) - output`."""
    return decompose(tangent, projection.basis, projection.rendered - output)


# ---------------------------------------------------------------- across checkpoints
@dataclass
class Oscillation:
    """How consistent the tangents of K checkpoints (same examples) are, per example.

    Attributes:
        successive_cosine: [B] mean over k of `cos(g_k, g_{k+1})` (NaN with fewer than 2
            checkpoints): 1 = every update keeps the previous direction, -1 = it reverses it.
        consistency: [B] `||sum_k g_k|| / sum_k ||g_k||` in [0, 1]: 1 = all updates point one
            way (they add up), about 0 = they cancel (the net movement is small compared with
            the distance travelled); for K random directions in high dimension about 1/sqrt(K).
    """

    successive_cosine: Tensor
    consistency: Tensor


def oscillation(components: Tensor) -> Oscillation:
    """Oscillation measures of `components` [K, B, D] (checkpoints in training order), e.g. the
    parallel parts of each checkpoint's tangents on the same analysis batch."""
    check(components.dim() == 3, f"oscillation: components must be [K, B, D], got {tuple(components.shape)}")
    g = components.double()
    num, batch = g.shape[:2]
    if num >= 2:
        pairs = torch.stack([cosine(g[i], g[i + 1]) for i in range(num - 1)])  # [K-1, B]
        successive = pairs.nanmean(0)
    else:
        successive = torch.full((batch,), torch.nan, dtype=torch.float64, device=g.device)
    travelled = g.norm(dim=2).sum(0)
    net_move = g.sum(0).norm(dim=1)
    return Oscillation(successive, net_move / torch.where(travelled > 0, travelled, torch.nan))


def bucket_means(values: Tensor, bucket: Tensor, num_buckets: int) -> list[float]:
    """Mean of values [B] within each bucket (index [B] in 0..num_buckets-1), NaNs skipped."""
    values = values.detach().double().cpu()
    bucket = bucket.cpu()
    return [float(values[bucket == i].nanmean()) for i in range(num_buckets)]
