"""Evaluation (method.md section 6): FID / KID / precision-recall on Inception features, FD on a
digits classifier's features, exact metrics on the shapes manifold, and the model evaluator.

`evaluate_model(net, config)` picks the metric by dataset; `build_evaluator(config, dataset)`
gives the trainer's `evaluator(ema_net, step)`. See `ayt.metrics.evaluate` for the keys.
"""

from ayt.metrics.classifier import DigitsFeatures, digits_metrics, fd_digits, load_classifier
from ayt.metrics.evaluate import (
    METRICS,
    build_evaluator,
    build_scorer,
    evaluate_model,
    evaluate_runs,
    generate,
    resolve_metric,
)
from ayt.metrics.frechet import FeatureStats, feature_stats, frechet_distance, kid, precision_recall
from ayt.metrics.inception import InceptionFeatures
from ayt.metrics.manifold import FitResult, coverage, fit_shapes, manifold_metrics, sliced_wasserstein

__all__ = [
    "METRICS",
    "DigitsFeatures",
    "FeatureStats",
    "FitResult",
    "InceptionFeatures",
    "build_evaluator",
    "build_scorer",
    "coverage",
    "digits_metrics",
    "evaluate_model",
    "evaluate_runs",
    "fd_digits",
    "feature_stats",
    "fit_shapes",
    "frechet_distance",
    "generate",
    "kid",
    "load_classifier",
    "manifold_metrics",
    "precision_recall",
    "resolve_metric",
    "sliced_wasserstein",
]
