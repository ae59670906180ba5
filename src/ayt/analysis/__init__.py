"""Tangent analysis (method.md sections 3-5): in which direction does training move a CM's output?

- `tangents`: the fixed analysis batch and the discrete / continuous tangents of a checkpoint;
- `decompose`: parts along and across a known manifold (shapes), oscillation across checkpoints;
- `pictures`: the paper-style picture for any dataset;
- `commands`: the `ayt tangents` command (`add_parser`, `run_cli`).
"""

from ayt.analysis.decompose import (
    Decomposition,
    Oscillation,
    ShapesProjection,
    bucket_means,
    decompose,
    decompose_on_shapes,
    oscillation,
    project_on_shapes,
    render_jacobian,
)
from ayt.analysis.pictures import tangent_picture
from ayt.analysis.tangents import (
    AnalysisBatch,
    ContinuousTangent,
    TangentSet,
    all_tangents,
    analysis_batch,
    bucket_levels,
    continuous_tangent,
    discrete_tangent,
    discrete_tangents,
    parse_tangent_names,
)

__all__ = [
    "AnalysisBatch", "ContinuousTangent", "Decomposition", "Oscillation", "ShapesProjection", "TangentSet",
    "all_tangents", "analysis_batch", "bucket_levels", "bucket_means", "continuous_tangent", "decompose",
    "decompose_on_shapes", "discrete_tangent", "discrete_tangents", "oscillation", "parse_tangent_names",
    "project_on_shapes", "render_jacobian", "tangent_picture",
]
