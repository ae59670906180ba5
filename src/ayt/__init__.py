"""ayt: consistency models trained with manifold-aligned tangents (Align Your Tangent)."""

__version__ = "0.1.0"
