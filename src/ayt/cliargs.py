"""The command-line flags shared by every command that loads a model (`ayt sample`, `ayt eval`,
`ayt tangents`), defined once. Stdlib only: `ayt --help` imports it."""

from __future__ import annotations

import argparse

from ayt.config import HEUN_STEPS


def add_model_args(p: argparse.ArgumentParser, seed_help: str = "noise seed (default 0)", sampling: bool = True) -> None:
    """`--weights`, `--device`, `--seed`; with `sampling` also `--batch` and `--heun-steps`."""
    p.add_argument("--weights", default="ema", help="which weights: ema (default), net, or a name such as ema1")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    p.add_argument("--seed", type=int, default=0, help=seed_help)
    if sampling:
        p.add_argument("--batch", type=int, default=256, help="images per network call (default 256)")
        p.add_argument("--heun-steps", type=int, default=HEUN_STEPS,
                       help=f"EDM Heun steps for diffusion checkpoints (default {HEUN_STEPS})")
