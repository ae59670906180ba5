"""Tangent analysis (method.md sections 3-5): in which direction does training move a CM's output?

- `tangents`: the fixed analysis batch and the discrete / continuous tangents of a checkpoint;
- `decompose`: parts along and across a known manifold (shapes), oscillation across checkpoints;
- `pictures`: the paper-style picture for any dataset, and the report's plots;
- `report`: checkpoints loaded, analysed and summarised into one report dict and its markdown
  (the `ayt tangents` command that drives it is `ayt.commands.tangents`).
"""

from ayt.lazy import lazy_exports

# submodule -> the names it exports, imported on first use, so that importing the package does not load torch.
# (The function `decompose` is shadowed by its submodule once that is imported: import it from
# `ayt.analysis.decompose`.)
__all__, __getattr__ = lazy_exports(__name__, {
    "decompose": ("Decomposition", "Oscillation", "ShapesProjection", "bucket_means", "decompose",
                  "decompose_on_shapes", "oscillation", "project_on_shapes", "render_jacobian"),
    "pictures": ("tangent_picture",),
    "tangents": ("AnalysisBatch", "ContinuousTangent", "TangentSet", "all_tangents", "analysis_batch",
                 "bucket_levels", "continuous_tangent", "discrete_tangent", "discrete_tangents",
                 "parse_tangent_names"),
})
