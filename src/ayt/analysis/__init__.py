"""Tangent analysis (method.md sections 3-5): in which direction does training move a CM's output?

- `tangents`: the fixed analysis batch and the discrete / continuous tangents of a checkpoint;
- `decompose`: parts along and across a known manifold (shapes), oscillation across checkpoints;
- `pictures`: the paper-style picture for any dataset;
- `commands`: the `ayt tangents` command (`run_cli`; its parser `add_parser` is in `args`).
"""

import importlib

# name -> submodule; imported on first use, so that `ayt --help` (which imports `ayt.analysis.args`)
# does not load torch. (The function `decompose` is shadowed by its submodule once that is imported:
# import it from `ayt.analysis.decompose`.)
_EXPORTS = {
    "decompose": ("Decomposition", "Oscillation", "ShapesProjection", "bucket_means", "decompose",
                  "decompose_on_shapes", "oscillation", "project_on_shapes", "render_jacobian"),
    "pictures": ("tangent_picture",),
    "tangents": ("AnalysisBatch", "ContinuousTangent", "TangentSet", "all_tangents", "analysis_batch",
                 "bucket_levels", "continuous_tangent", "discrete_tangent", "discrete_tangents",
                 "parse_tangent_names"),
}
_SOURCES = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_SOURCES)


def __getattr__(name: str):
    if name in _SOURCES:
        return getattr(importlib.import_module(f"ayt.analysis.{_SOURCES[name]}"), name)
    raise AttributeError(f"module 'ayt.analysis' has no attribute {name!r}")
