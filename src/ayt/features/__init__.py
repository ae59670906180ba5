"""Self-supervised feature networks `phi` and the perturbations they regress (method.md section 4)."""

from ayt.features.augment import (
    PERTURBATIONS,
    SUBSETS,
    TARGET_NAMES,
    PerturbationParams,
    Perturber,
    perturbation_slices,
    target_groups,
)
from ayt.features.nets import FEATURE_NETS, FeatureNet, ResNet18, TinyVGG, VGG16BN, build_feature_net, freeze

__all__ = [
    "FEATURE_NETS",
    "PERTURBATIONS",
    "SUBSETS",
    "TARGET_NAMES",
    "FeatureNet",
    "PerturbationParams",
    "Perturber",
    "ResNet18",
    "TinyVGG",
    "VGG16BN",
    "build_feature_net",
    "freeze",
    "perturbation_slices",
    "target_groups",
]
