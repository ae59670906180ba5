"""The argument parser of `ayt tangents`, kept apart from `ayt.analysis.commands` so that `ayt --help`
does not import torch (the command itself is imported when it runs)."""

from __future__ import annotations

import argparse

from ayt.cliargs import add_model_args


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `ayt tangents` on the CLI's subparsers; returns the new parser."""
    p = subparsers.add_parser(
        "tangents", help="split CM training tangents into parts along / towards the data manifold",
        description="Tangents of consistency checkpoints on a fixed batch: parallel fraction and cosine to the "
        "manifold per noise level (shapes data), oscillation across checkpoints of one run, and a picture. "
        "Datasets without a known manifold get the picture only (printed as a note).")
    p.add_argument("checkpoints", nargs="+", metavar="CHECKPOINT", help="checkpoint or run folders of ECT runs (a run folder means its latest checkpoint)")
    p.add_argument("--distances", default="pseudo_huber,continuous", help="comma list: distances (l2, pseudo_huber, squared_l2, l1, lpips, mfd), NAME:aligned, continuous, continuous:mfd (default pseudo_huber,continuous)")
    p.add_argument("--features", help="feature-network checkpoint (ayt train-features) for mfd tangents")
    p.add_argument("--lpips-weights", help="torchvision trunk weights file for lpips tangents (offline use)")
    p.add_argument("--num", type=int, default=64, help="images in the analysis batch; each is used at every noise level (default 64)")
    p.add_argument("--buckets", type=int, default=6, help="noise levels: medians of this many equal-probability buckets of the training t distribution (default 6)")
    p.add_argument("--stage", type=int, help="ECT stage of the t -> r map (default: the stage the last checkpoint trained at)")
    p.add_argument("--all-checkpoints", action="store_true", help="expand each run folder to all its complete checkpoints")
    p.add_argument("--picture-only", action="store_true", help="skip the manifold decomposition (automatic for data without a known manifold)")
    p.add_argument("--picture-images", type=int, default=4, help="images shown in the picture (default 4)")
    add_model_args(p, "seed of the analysis batch and of the manifold fits (default 0)", sampling=False)
    p.add_argument("--out", help="output folder (default RUN_OF_FIRST_CHECKPOINT/tangents)")
    p.set_defaults(func=_run)
    return p


def _run(args: argparse.Namespace) -> int:
    from ayt.analysis.commands import run_cli

    return run_cli(args)
