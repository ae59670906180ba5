"""Evaluation (method.md section 6): FID / KID / precision-recall on Inception features, FD on a
digits classifier's features, exact metrics on the shapes manifold, and the model evaluator.

`evaluate_model(net, config)` picks the metric by dataset; `build_evaluator(config, dataset)`
gives the trainer's `evaluator(ema_net, step)`. See `ayt.metrics.evaluate` for the keys.
"""

import importlib

# name -> submodule; imported on first use, so that `ayt --help` (which imports `ayt.metrics.commands`)
# does not load torch.
_EXPORTS = {
    "classifier": ("DigitsFeatures", "digits_metrics", "fd_digits", "load_classifier"),
    "evaluate": ("METRICS", "build_evaluator", "build_scorer", "evaluate_model", "evaluate_runs", "generate",
                 "resolve_metric"),
    "frechet": ("FeatureStats", "feature_stats", "frechet_distance", "kid", "precision_recall"),
    "inception": ("InceptionFeatures",),
    "manifold": ("FitResult", "coverage", "fit_shapes", "manifold_metrics", "sliced_wasserstein"),
}
_SOURCES = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_SOURCES)


def __getattr__(name: str):
    if name in _SOURCES:
        return getattr(importlib.import_module(f"ayt.metrics.{_SOURCES[name]}"), name)
    raise AttributeError(f"module 'ayt.metrics' has no attribute {name!r}")
