"""Training objectives; each maps `(net, x0, labels, step)` to a per-example loss [B]."""

from ayt.objectives.continuous import ContinuousObjective
from ayt.objectives.diffusion import EDMObjective
from ayt.objectives.ect import ConsistencyPair, ECTObjective
from ayt.objectives.meanflow import MeanFlowObjective

__all__ = ["ConsistencyPair", "ContinuousObjective", "ECTObjective", "EDMObjective", "MeanFlowObjective"]
