"""Command line: `ayt demo | train | train-features | sample | eval | fid-stats | tangents | convert | report`.

See `ayt COMMAND --help`.

Bad input ends with one readable line on stderr and exit code 2 (`--debug` shows the traceback).
"""

from __future__ import annotations

import argparse
import errno
import sys
from pathlib import Path

from ayt.cliargs import add_model_args
from ayt.config import PRECISIONS
from ayt.errors import AytError, check


# ---------------------------------------------------------------- commands
def run_config(args: argparse.Namespace, command: str):
    """The resolved config of `ayt train` / `ayt train-features`: preset or resumed run + overrides.

    A resumed run continues with the config saved in the checkpoint it resumes from (so a failed
    or diverged resume never changes what a later plain --resume does), plus the overrides."""
    from ayt.config import apply_overrides, config_from_dict, load_config

    check(args.from_checkpoint is None or args.resume, "--from-checkpoint STEP needs --resume RUN_DIR")
    if not args.resume:
        return load_config(args.config, list(args.overrides))
    from ayt.checkpoint import read_state

    run_dir = Path(args.resume)
    check(run_dir.is_dir() and (run_dir / "checkpoints").is_dir(),
          f"--resume {run_dir}: no checkpoints there; pass the folder of a run started with 'ayt {command}'")
    check(args.config is None, "--resume continues with the config saved in the run's checkpoint; drop --config "
          "(overrides such as train.steps=N still apply)")
    path, _, state = read_state(run_dir, args.from_checkpoint)
    is_features = state.get("kind") == "features"
    check(is_features == (command == "train-features"),
          f"{run_dir} is {'a feature-network' if is_features else 'a consistency/diffusion'} run; resume it with "
          f"'ayt {'train-features' if is_features else 'train'} --resume {run_dir}'")
    check(isinstance(state.get("config"), dict), f"checkpoint {path} holds no config; it was not written by 'ayt {command}'")
    return config_from_dict(apply_overrides(state["config"], [*args.overrides, f"train.run_dir={run_dir}"]))


def cmd_train(args: argparse.Namespace) -> int:
    config = run_config(args, "train")
    if args.dry_run:
        print(config.to_yaml(), end="")
        return 0
    from ayt.train import train

    result = train(config, resume=bool(args.resume), from_step=args.from_checkpoint)
    print(f"done: {result.step} steps, {result.images_seen} images, {result.wall_s:.1f} s, last loss {result.last_loss:.4g}; run folder {result.run_dir}")
    return 0


def cmd_train_features(args: argparse.Namespace) -> int:
    config = run_config(args, "train-features")
    if args.dry_run:
        print(config.to_yaml(), end="")
        return 0
    from ayt.train import train_features

    result = train_features(config, resume=bool(args.resume), from_step=args.from_checkpoint)
    groups = result.heldout.get("groups", {})
    ratios = ", ".join(f"{g} {v['ratio']:.3f}" for g, v in groups.items() if v["ratio"] is not None)
    held = f"; held-out mse/mse_zero: {ratios}" if ratios else ""
    print(f"done: {result.step} steps, {result.images_seen} images, {result.wall_s:.1f} s, last loss {result.last_loss:.4g}{held}; run folder {result.run_dir}")
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    import torch

    from ayt.build import load_model
    from ayt.images import save_grid, save_npz
    from ayt.sampling import schedule_for, stream

    from ayt.images import check_output_path
    from ayt.runtime import check_device

    check(args.num > 0, f"-n {args.num}: the number of images must be > 0")
    check(args.batch > 0, f"--batch {args.batch}: the number of images per network call must be > 0")
    check(args.out or args.npz, "give --out GRID.png and/or --npz IMAGES.npz")
    if args.out:
        check_output_path(args.out, "--out", (".png", ".jpg", ".jpeg"))
    if args.npz:
        check_output_path(args.npz, "--npz", (".npz",))
    check_device(args.device, "--device")
    net, config = load_model(args.checkpoint, which=args.weights, device=args.device)
    device_type = torch.device(args.device).type
    autocast = torch.autocast(device_type, dtype=torch.bfloat16, enabled=args.precision == "bf16")
    schedule = schedule_for(config, args.steps, args.heun_steps)
    with autocast:
        batches = stream(net, schedule, args.num, args.batch, args.seed, args.device, bool(net.label_dim))
        images = torch.cat([x.float().cpu() for x in batches])
    if args.out:
        print(f"wrote {save_grid(images[: args.grid_max], args.out)}")
    if args.npz:
        print(f"wrote {save_npz(images, args.npz)} ({len(images)} images)")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from ayt.build import convert_edm, load_model

    out = convert_edm(args.pickle, args.out)
    net, config = load_model(out)
    print(f"wrote {out}: {config.network.preset} network ({sum(p.numel() for p in net.parameters()):,} parameters), "
          f"EMA weights as ema0; use it as objective.init={out}, objective.teacher={out}, ayt sample {out}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from ayt.demo import run_demo

    run_demo(args.out, args.size, progress=not args.no_progress)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from ayt.report import write_report

    out = args.out or (Path(args.runs[0]) / "report")
    print(f"wrote {write_report(args.runs, out)}")
    return 0


# ---------------------------------------------------------------- parser
def _add_run_args(p: argparse.ArgumentParser, example: str) -> None:
    p.add_argument("--config", type=Path, help="YAML preset (see configs/); omitted: library defaults")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its latest checkpoint, with the config saved there")
    p.add_argument("--from-checkpoint", metavar="STEP", type=int,
                   help="with --resume: continue from the checkpoint of this step instead of the latest (newer ones are "
                        "moved to checkpoints/superseded/)")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    p.add_argument("overrides", nargs="*", help=f"section.key=value, e.g. {example}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ayt", description="Consistency models trained fast with manifold-aligned tangents (AYT).")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks instead of one-line errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("train", help="train or resume a run (EDM diffusion, ECT, ECT+AYT)", description="Train from a YAML config plus section.key=value overrides. Multi-GPU: torchrun --nproc_per_node N -m ayt train ...")
    _add_run_args(p, "train.batch_size=16 distance.name=l2")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "train-features",
        help="train the feature network of the MFD distance (self-supervised)",
        description="Train a feature network to regress random off-manifold perturbations (method.md section 4), "
        "from the data, features, optim, train and log sections of a config. Multi-GPU: torchrun --nproc_per_node N -m ayt train-features ...",
    )
    _add_run_args(p, "features.arch=vgg16_bn features.subset=geo")
    p.set_defaults(func=cmd_train_features)

    p = sub.add_parser("sample", help="generate images from a checkpoint", description="1-step or multistep sampling from a checkpoint (file or run folder).")
    p.add_argument("checkpoint", help="checkpoint folder, run folder (its latest checkpoint) or EDM network .pkl")
    p.add_argument("-n", "--num", type=int, default=64, help="number of images (default 64)")
    p.add_argument("--steps", default="1", help="consistency schedule: 1, 2 (80, 0.821) or a comma list of levels; "
                   "MeanFlow: N uniform steps or a comma list of times from 1")
    p.add_argument("--out", help="PNG grid to write")
    p.add_argument("--grid-max", type=int, default=256, help="at most this many images in the grid (default 256)")
    p.add_argument("--npz", help="npz file for all images (uint8 NHWC, key 'images')")
    add_model_args(p)
    p.add_argument("--precision", choices=PRECISIONS, default="fp32",
                   help="fp32 (default) or bf16 autocast for the network (CPU and CUDA; about 1.7x faster on a "
                        "CPU with bf16 matmul, see BENCHMARKS.md)")
    p.set_defaults(func=cmd_sample)

    from ayt.commands.evaluate import add_parsers as add_eval
    from ayt.commands.tangents import add_parser as add_tangents

    add_eval(sub)
    add_tangents(sub)

    p = sub.add_parser("convert", help="convert an EDM network pickle into an ayt run folder (no pickled code is run)",
                       description="Read an NVlabs EDM network pickle (released edm-*.pkl or network-snapshot-*.pkl) "
                       "without executing its code and write its EMA network as an ayt checkpoint with a config that rebuilds it.")
    p.add_argument("pickle", help="EDM network pickle, e.g. edm-cifar10-32x32-uncond-vp.pkl")
    p.add_argument("--out", required=True, help="new run folder to write (must not exist or be empty)")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("demo", help="end-to-end demo on built-in shapes data (about 10 minutes on 2 CPU cores)")
    p.add_argument("--out", default="runs/demo", help="demo folder (default runs/demo); a rerun reuses finished stages")
    p.add_argument("--size", choices=["full", "quick", "long"], default="full", help="full (default), quick (a smoke test of a minute) or long (longer runs, for the tangent analysis)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("report", help="plots and a markdown table for one or more runs")
    p.add_argument("runs", nargs="+", help="run folders")
    p.add_argument("--out", help="output folder (default FIRST_RUN/report)")
    p.set_defaults(func=cmd_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return args.func(args)
    except AytError as err:
        if args.debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; the last complete checkpoint is intact (resume with --resume RUN_DIR)", file=sys.stderr)
        return 130
    except OSError as err:
        if args.debug or err.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        print(f"error: the disk is full (writing {err.filename or 'a file'}); free some space; complete checkpoints "
              "are intact (a run continues with --resume RUN_DIR)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
