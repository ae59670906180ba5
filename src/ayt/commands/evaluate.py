"""`ayt eval` and `ayt fid-stats`: their flags and the runs that wire them to `ayt.metrics` (wired in `ayt.cli`).

Each `cmd_*` takes the parsed arguments and returns an exit code; bad input raises `AytError`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ayt.cliargs import add_model_args
from ayt.config import METRICS
from ayt.errors import AytError, check


# ---------------------------------------------------------------- argument parsing helpers
def parse_schedules(items: list[str], sigma_max: float, sigma_min: float) -> dict[str, list[float]]:
    """`--steps` items ("1", "2", "80,0.821") -> {label: decreasing levels}."""
    from ayt.sampling import check_decreasing, parse_sigmas

    schedules = {}
    for item in items:
        levels = parse_sigmas(item, sigma_max)
        try:
            check_decreasing(levels, sigma_min)
        except AytError as err:
            hint = "; to evaluate several schedules separate them by spaces: --steps 1 2" if "," in item else ""
            raise AytError(f"--steps {item}: {err}{hint}") from None
        schedules[item] = levels
    return schedules


def parse_levels(text: str | None) -> list[float]:
    """`--denoise 0.2,0.4,0.8` -> [0.2, 0.4, 0.8] (positive levels)."""
    if not text:
        return []
    try:
        levels = [float(s) for s in text.split(",")]
    except ValueError:
        raise AytError(f"--denoise {text}: give comma-separated noise levels such as 0.2,0.4,0.8") from None
    check(all(s > 0 for s in levels), f"--denoise {text}: noise levels must be > 0")
    return levels


def results_table(results: dict[str, dict[str, dict]]) -> str:
    """{schedule: {key: summary}} -> a markdown table, one row per schedule (mean, or mean ± std)."""
    from ayt.markdown import markdown_table

    keys = list(dict.fromkeys(k for row in results.values() for k in row))
    rows = [[label, *(_cell(row[k]) if k in row else "-" for k in keys)] for label, row in results.items()]
    return markdown_table(["schedule", *keys], rows)


def _cell(summary: dict) -> str:
    if len(summary["values"]) == 1:
        return f"{summary['mean']:.5g}"
    return f"{summary['mean']:.5g} ± {summary['std']:.2g}"


def check_common(args: argparse.Namespace) -> None:
    """--batch, --device and the input files of `ayt eval` / `ayt fid-stats`, before any work."""
    from ayt.runtime import check_device

    check(args.batch > 0, f"--batch {args.batch}: the number of images per call must be > 0")
    check_device(args.device, "--device")
    for flag, value in (("--inception-weights", args.inception_weights), ("--ref-stats", getattr(args, "ref_stats", None))):
        check(value is None or Path(value).is_file(), f"{flag} {value}: no such file")


# ---------------------------------------------------------------- commands
def cmd_eval(args: argparse.Namespace) -> int:
    """`ayt eval`: score a checkpoint under each schedule; print a table, optionally write JSON."""
    from ayt.build import load_model
    from ayt.metrics.evaluate import evaluate_runs, fid_protocol, resolve_metric
    from ayt.sampling import schedule_for

    check(args.num >= 2, f"--num {args.num}: evaluate at least 2 samples")
    check(args.runs >= 1, f"--runs {args.runs}: must be >= 1")
    check_common(args)
    denoise_sigmas = parse_levels(args.denoise)
    net, config = load_model(args.checkpoint, which=args.weights, device=args.device)
    if config.objective.kind == "edm":
        schedules: dict[str, list[float] | str] = {f"heun{args.heun_steps}": "1"}
    elif config.objective.kind == "meanflow":
        check(not denoise_sigmas, "--denoise scores one-step denoising at noise levels sigma; a MeanFlow model has none: drop --denoise")
        schedules = {item: list(schedule_for(config, item).sigmas) for item in args.steps}
    else:
        schedules = dict(parse_schedules(args.steps, config.network.sigma_max, config.network.sigma_min))
    results = {}
    for i, (label, sigmas) in enumerate(schedules.items()):
        results[label] = evaluate_runs(
            net, config, runs=args.runs, metric=args.metric, num_samples=args.num, sigmas=sigmas, seed=args.seed,
            device=args.device, inception_weights=args.inception_weights, ref_stats=args.ref_stats,
            denoise_sigmas=denoise_sigmas if i == 0 else (), batch=args.batch, heun_steps=args.heun_steps)
    print(results_table(results))
    metric = resolve_metric(args.metric, config.data.name)
    protocol = fid_protocol(args.ref_stats) if metric == "fid" else None
    if protocol:
        print(f"FID samples: {protocol['sample_features']}\nFID reference: {protocol['ref_provenance']}")
    if args.out:
        record = {"checkpoint": str(args.checkpoint), "weights": args.weights, "metric": metric,
                  "num_samples": args.num, "runs": args.runs, "seed": args.seed, "denoise_sigmas": denoise_sigmas,
                  "results": results}
        if protocol:
            record["fid_protocol"] = protocol
        print(f"wrote {_write_json(record, Path(args.out))}")
    return 0


def cmd_fid_stats(args: argparse.Namespace) -> int:
    """`ayt fid-stats`: Inception statistics (+ up to --keep-features rows) of a dataset."""
    from ayt.data import build_dataset
    from ayt.metrics.evaluate import reference_stats
    from ayt.metrics.inception import FEATURE_KIND, PIPELINE, InceptionFeatures

    from ayt.images import check_output_path

    check_common(args)
    check_output_path(args.out, "--out", (".npz",))
    check(args.keep_features >= 0, f"--keep-features {args.keep_features}: must be >= 0")
    dataset = build_dataset(args.data, root=args.root, resolution=args.resolution, num_samples=args.num_samples,
                            seed=args.seed, split=args.split)
    inception = InceptionFeatures(args.inception_weights, args.device, batch=args.batch)
    stats = reference_stats(inception, dataset.images, FEATURE_KIND, args.batch, args.seed, args.keep_features,
                            PIPELINE)
    path = stats.save(args.out)
    kept = 0 if stats.features is None else len(stats.features)
    print(f"wrote {path} ({stats.n} images of {args.data}, {stats.dim}-d features, {kept} feature rows kept)")
    return 0


def _write_json(record: dict, path: Path) -> Path:
    from ayt.files import atomic_write

    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, json.dumps(record, indent=1) + "\n")


# ---------------------------------------------------------------- parsers
def add_parsers(subparsers: argparse._SubParsersAction) -> None:
    """Add `eval` and `fid-stats` to the `ayt` sub-command parsers."""
    from ayt.config import DATASETS

    p = subparsers.add_parser("eval", help="score a checkpoint (shapes manifold metrics, FD-digits or FID)",
                              description="Sample from a checkpoint and score the samples with the dataset's metric "
                                          "(shapes: manifold_rms ...; digits: fd_digits; others: FID, KID, precision, recall).")
    p.add_argument("checkpoint", help="checkpoint folder, run folder (its latest checkpoint) or EDM network .pkl")
    p.add_argument("--metric", choices=[m for m in METRICS if m != "none"], default="auto", help="metric family (default auto: by dataset)")
    p.add_argument("-n", "--num", type=int, default=10000, help="samples per evaluation (default 10000; the paper uses 50000)")
    p.add_argument("--steps", nargs="+", default=["1"], metavar="SCHEDULE",
                   help="consistency schedules, space-separated: 1, 2 (80, 0.821) or a comma list of levels "
                   "(MeanFlow: N uniform steps or a comma list of times from 1) (default 1)")
    p.add_argument("--runs", type=int, default=1, help="independent evaluations with seeds SEED.. (default 1)")
    p.add_argument("--denoise", metavar="LEVELS", help="also score one-step denoising of training images, e.g. 0.2,0.4,0.8")
    p.add_argument("--inception-weights", metavar="PATH", help="torch-fidelity Inception weights file (offline use)")
    p.add_argument("--ref-stats", metavar="PATH", help="reference statistics: 'ayt fid-stats' output, or an .npz with mu and "
                   "sigma (pytorch-fid, EDM fid-refs; provenance unknown, warned) (default: computed from the training data)")
    add_model_args(p, "noise seed of the first run (default 0)")
    p.add_argument("--out", metavar="JSON", help="write the results (mean, std, min, max, values per key) here")
    p.set_defaults(func=cmd_eval)

    p = subparsers.add_parser("fid-stats", help="Inception reference statistics of a dataset (for eval --ref-stats)")
    p.add_argument("--data", choices=DATASETS, required=True, help="dataset name")
    p.add_argument("--root", help="data folder (cifar10, folder) or .npz file")
    p.add_argument("--resolution", type=int, help="image size (default: the dataset's own)")
    p.add_argument("--num-samples", type=int, help="a random subset of this size (default: all images)")
    p.add_argument("--split", default="train", choices=["train", "test", "all"], help="split (default train)")
    p.add_argument("--seed", type=int, default=0, help="subset / shapes seed (default 0)")
    p.add_argument("--keep-features", type=int, default=10000, help="feature rows stored for KID and precision/recall (default 10000; 0: none)")
    p.add_argument("--inception-weights", metavar="PATH", help="torch-fidelity Inception weights file (offline use)")
    p.add_argument("--batch", type=int, default=64, help="images per Inception call (default 64)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    p.add_argument("--out", required=True, help="statistics file to write (.npz)")
    p.set_defaults(func=cmd_fid_stats)
