"""The perturbation benchmark's measurement on the known shapes manifold (benchmarks/perturbations.py)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import perturbations  # noqa: E402


def test_on_and_off_manifold_perturbations_of_shapes():
    """Hue rotation recolours an ellipse (another valid shape); additive noise leaves the manifold."""
    rows = perturbations.measure(num=12, resolution=16, seed=0)
    assert rows["none"]["off"] < 0.01  # clean renderings fit (near) exactly
    assert rows["hue"]["off_fraction"] < 0.1 and rows["hue"]["change"] > 0.05
    assert rows["noise"]["off_fraction"] > 0.9
    assert rows["blur"]["off_fraction"] > rows["rotation"]["off_fraction"]
