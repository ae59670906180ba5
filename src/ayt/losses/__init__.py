"""Distances (pixel and feature space) and the unit-gradient (aligned) form."""

from ayt.losses.distances import build_distance, distance_names, register_distance

__all__ = ["build_distance", "distance_names", "register_distance"]
