"""Evaluation (method.md section 6): FID / KID / precision-recall on Inception features, FD on a
digits classifier's features, exact metrics on the shapes manifold, and the model evaluator.

`evaluate_model(net, config)` picks the metric by dataset; `build_evaluator(config, dataset)`
gives the trainer's `evaluator(ema_net, step)`. See `ayt.metrics.evaluate` for the keys.
"""

from ayt.lazy import lazy_exports

# submodule -> the names it exports, imported on first use, so that importing the package does not load torch.
__all__, __getattr__ = lazy_exports(__name__, {
    "classifier": ("DigitsFeatures", "digits_metrics", "fd_digits", "load_classifier"),
    "evaluate": ("METRICS", "build_evaluator", "build_scorer", "evaluate_model", "evaluate_runs",
                 "resolve_metric"),
    "frechet": ("FeatureStats", "feature_stats", "frechet_distance", "kid", "precision_recall"),
    "inception": ("InceptionFeatures",),
    "manifold": ("FitResult", "coverage", "fit_shapes", "manifold_metrics", "sliced_wasserstein"),
})
