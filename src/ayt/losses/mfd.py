"""Manifold feature distance `d_phi(x, y)` (method.md section 4).

`phi` is a frozen feature network trained by `ayt train-features` to regress off-manifold
perturbations. `phi.features(x)` lists the feature map after each pooling stage
`[B, C_l, H_l, W_l]` and, last, the regression head `[B, D]` (counted as D channels of one
position). Two forms:

- `reference` (the reference code): over the selected layers `l` and their channels `c`,
  `d = sum_l w_l sum_c ( sqrt(sum_hw (phi_l(x) - phi_l(y))_c^2 + eps^2) - eps )`,
  a pseudo-Huber spatial L2 norm per channel, all `w_l = 1` by default, `eps = 1e-5`;
- `squared` (the paper): `d = sum_l w_l ||phi_l(x) - phi_l(y)||^2`, i.e. with unit weights the
  squared L2 norm of the concatenated flattened features.

Gradients reach `x` (the CM output); the network itself stays frozen (eval mode, parameters
without gradients) even when a parent module calls `.train()`.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor, nn

from ayt.errors import AytError, check
from ayt.features.nets import freeze

FORMS = ("reference", "squared")


def _select_layers(layers: list[int] | None, count: int) -> list[int]:
    """Non-negative, distinct indices into `phi.features(x)` (negative ones count from the end)."""
    if layers is None:
        return list(range(count))
    check(len(layers) > 0, "mfd layers is empty; list feature indices such as [0, 1, -1] or leave it unset (all)")
    bad = [i for i in layers if not -count <= i < count]
    check(not bad, f"mfd layer {bad[0] if bad else ''} does not exist; the feature network has {count} "
          f"feature outputs (indices {-count}..{count - 1}, -1 = regression head)")
    chosen = [i % count for i in layers]
    check(len(set(chosen)) == len(chosen), f"mfd layers {layers} name a feature output twice; list each once")
    return chosen


def _feature_count(net: nn.Module) -> int:
    channels = getattr(net, "feature_channels", None)
    check(channels is not None, "the MFD feature network must expose feature_channels and features(x); "
          "use a network from ayt.features")
    return len(channels)


def pseudo_huber_channel_norms(diff: Tensor, eps: float) -> Tensor:
    """`sum_c sqrt(sum_hw diff_c^2 + eps^2) - eps` for diff [B, C, H, W] or [B, D] -> [B]."""
    flat = diff.reshape(diff.shape[0], diff.shape[1], -1)
    return ((flat.square().sum(2) + eps * eps).sqrt() - eps).sum(1)


class MFD(nn.Module):
    """`d_phi(x, y) -> [B]` for images x, y [B, C, H, W] (method.md section 4).

    Args:
        net: a feature network (`FeatureNet`); or give `features`, a checkpoint path
            (run folder of `ayt train-features`, or the AYT reference's classifier file
            `cifar10_clf.pt`), loaded with `load_feature_net`.
        form: "reference" (sum of per-channel pseudo-Huber spatial L2 norms) or "squared".
        layers: indices into `net.features(x)` (negative allowed; None = all, head included).
        weights: one weight per selected layer (default 1 each).
        eps: the pseudo-Huber constant of the reference form.
        resolution, channels: the images it will see; checked against a loaded checkpoint.
        arch: `features.arch`; must name the layout of a reference classifier file (else unused).
    """

    def __init__(
        self,
        net: nn.Module | None = None,
        features: str | os.PathLike | None = None,
        form: str = "reference",
        layers: list[int] | None = None,
        weights: list[float] | None = None,
        eps: float = 1e-5,
        resolution: int | None = None,
        channels: int | None = None,
        arch: str | None = None,
    ) -> None:
        super().__init__()
        check(form in FORMS, f"unknown mfd form {form!r}; use one of {', '.join(FORMS)}")
        check(eps >= 0, f"mfd eps must be >= 0, got {eps}")
        self.net = freeze(_resolve_net(net, features, resolution, channels, arch))
        self.form, self.eps = form, float(eps)
        self.layers = _select_layers(layers, _feature_count(self.net))
        weights = [1.0] * len(self.layers) if weights is None else [float(w) for w in weights]
        check(len(weights) == len(self.layers),
              f"mfd has {len(self.layers)} layers but {len(weights)} weights; give one weight per layer")
        self.weights = weights

    def train(self, mode: bool = True) -> MFD:
        """Keep the feature network in eval mode whatever the parent asks (it is frozen)."""
        super().train(mode)
        self.net.eval()
        return self

    def _phi(self, x: Tensor) -> list[Tensor]:
        """The selected feature outputs of x (under no_grad when x needs no gradient), in float32.

        Autocast is off here: the distance subtracts the features of two nearby images, and in
        bf16 (3 significant digits) that difference is noise once the images differ by less than
        about 1e-2 relative (small t, small ECT gaps): the direction of the aligned MFD then had a
        median cosine of 0.24 to its fp32 value at t = 5e-4. The feature network is small next to
        the U-Net, so fp32 costs little."""
        want = getattr(self.net, "in_channels", x.shape[1])
        check(x.ndim == 4 and x.shape[1] == want,
              f"mfd got images of shape {tuple(x.shape)} but its feature network takes {want} channels; "
              "train a feature network on this dataset: ayt train-features")
        with torch.set_grad_enabled(torch.is_grad_enabled() and x.requires_grad), \
                torch.autocast(x.device.type, enabled=False):
            maps = self.net.features(x.float())
        return [maps[i] for i in self.layers]

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        """Per-example distance [B] between x and y [B, C, H, W]."""
        if x.shape != y.shape:
            raise AytError(f"distance inputs differ in shape: {tuple(x.shape)} vs {tuple(y.shape)}")
        total = x.new_zeros(x.shape[0])
        for w, fx, fy in zip(self.weights, self._phi(x), self._phi(y)):
            diff = (fx - fy).float()
            term = pseudo_huber_channel_norms(diff, self.eps) if self.form == "reference" else diff.flatten(1).square().sum(1)
            total = total + w * term.to(total.dtype)
        return total


def _resolve_net(
    net: nn.Module | None, features: str | os.PathLike | None, resolution: int | None, channels: int | None,
    arch: str | None = None,
) -> nn.Module:
    """The given network, or the one loaded from the `features` checkpoint; AytError without either."""
    if net is not None:
        check(features is None, "give mfd either a feature network or a features checkpoint path, not both")
        return net
    if features is None:
        raise AytError("distance mfd needs a feature network: set distance.features=FEATURE_CHECKPOINT; "
                       "train one with 'ayt train-features'")
    from ayt.features.load import load_feature_net

    return load_feature_net(features, resolution=resolution, channels=channels, arch=arch)
