"""`ayt tangents`: its flags, and the run that wires them to `ayt.analysis` (method.md section 3).

The parser imports nothing heavy, so `ayt --help` stays fast; torch and the analysis are imported
when the command runs. Writes into `--out`: `tangents.json` (every number), `tangents.md`
(tables), plots `parallel_vs_t.png` (and `parallel_vs_step.png` for several checkpoints of one
run) and `tangents.png` (the picture, last checkpoint).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ayt.cliargs import add_model_args
from ayt.errors import check


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
    p.set_defaults(func=run_cli)
    return p


def run_cli(args: argparse.Namespace) -> int:
    """Run `ayt tangents` (see the module docstring)."""
    from ayt.analysis.report import (
        MANIFOLD_DATASETS, analyse, build_modules, checkpoint_paths, default_stage, load_models, make_batch,
        tangent_report,
    )
    from ayt.analysis.tangents import parse_tangent_names
    from ayt.runtime import check_device

    check_device(args.device, "--device")
    names = parse_tangent_names(args.distances)
    check(args.picture_images >= 1, f"--picture-images {args.picture_images}: need at least 1")
    models = load_models(checkpoint_paths(args.checkpoints, args.all_checkpoints), args.weights, args.device)
    last = models[-1]
    manifold = last.data_info["name"] in MANIFOLD_DATASETS and not args.picture_only
    if last.data_info["name"] not in MANIFOLD_DATASETS:
        print(f"note: {last.data_info['name']} data has no known manifold, so there is no parallel/orthogonal split; "
              "writing the picture and tangent norms only (the decomposition needs data.name=shapes)")
    modules = build_modules(names, last, args.features, args.lpips_weights, args.device)
    stage = default_stage(last) if args.stage is None else args.stage
    check(stage >= 0, f"--stage {stage}: the ECT stage must be >= 0")
    batch = make_batch(last, args.num, args.buckets, stage, args.seed, args.device)
    results = [analyse(m, batch, modules, manifold, args.seed) for m in models]
    out = Path(args.out) if args.out else models[0].run / "tangents"
    out.mkdir(parents=True, exist_ok=True)
    report = tangent_report(results, batch, last, manifold, stage, args.seed)
    _write(report, results, batch, out, args.picture_images)
    return 0


def _write(report: dict, results: list, batch, out: Path, picture_images: int) -> None:
    """The report's JSON and markdown, its plots and the picture of the last checkpoint."""
    from ayt.analysis.pictures import plot_vs_step, plot_vs_t
    from ayt.analysis.report import json_safe, markdown, write_picture

    written = [out / "tangents.json", out / "tangents.md"]
    written[0].write_text(json.dumps(json_safe(report), indent=1))
    written[1].write_text(markdown(report))
    if report["manifold"]:
        written.append(plot_vs_t(report, out / "parallel_vs_t.png"))
        if "oscillation" in report:
            written.append(plot_vs_step(report, out / "parallel_vs_step.png"))
    written.append(write_picture(results[-1], batch, picture_images, out / "tangents.png"))
    for path in written:
        print(f"wrote {path}")
