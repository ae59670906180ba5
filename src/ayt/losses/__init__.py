"""Distances (pixel and feature space) and the unit-gradient (aligned) form."""

from ayt.losses.aligned import Aligned
from ayt.losses.distances import L1, L2, PseudoHuber, SquaredL2, DISTANCES, build_distance, distance_names

__all__ = ["Aligned", "L1", "L2", "PseudoHuber", "SquaredL2", "DISTANCES", "build_distance", "distance_names"]
