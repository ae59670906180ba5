"""Objectives side by side (issue 15): which training objective gets furthest on the same data?

Two groups, each on the convergence benchmark's machinery (`convergence.py`: shared cached
initialisations, segments ending at the evaluation steps, EMA scored with the dataset's metric):

- **tuned**, from one shared EDM model (the same init for every arm), one budget: ECT with
  pseudo-Huber, ECT + AYT (aligned MFD), continuous-time consistency training (CT, `v = eps`) with
  the pixel or the MFD tangent, each with and without sCM's stabilisers (tangent warm-up over the
  first quarter, adaptive weighting; with the MFD tangent also each one alone), and distillation
  (CD, the EDM model as frozen teacher) at the two ends only: pixel tangent without stabilisers, MFD tangent with them (so CD's pair changes two
  things at once; the CT arms separate them);
- **scratch**: MeanFlow from random weights, pixel loss vs the MFD direction (method.md section 8), at
  every t or only for t <= 0.2 (`objective.mf_mfd_tmax`, method.md 8.3), with the authors' CIFAR-10
  MeanFlow settings (configs/shapes-meanflow.yaml) and a longer budget.

Every arm of a group has the same steps, batch, seeds and evaluation; `train s / step` is the
median over seeds of training time / steps (1 torch thread per run, evaluation excluded).

    python benchmarks/objectives.py --quick                       # pipeline check, a few minutes
    python benchmarks/objectives.py --write BENCHMARKS.md         # shapes + digits, 3 seeds
    python benchmarks/objectives.py --datasets shapes --write BENCHMARKS.md
    python benchmarks/objectives.py --device cuda --workers 8 --write BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "src"))

import convergence as conv  # noqa: E402
from common import UsageError, run_main  # noqa: E402

PIXEL, MFD = ("distance.name=l2",), ("distance.name=mfd",)
CONTINUOUS = ("objective.kind=continuous",)
CD = ("objective.teacher={edm}",)  # {edm}: the shared EDM model (convergence.run_arm fills it in)


def stabilisers(steps: int) -> tuple[str, ...]:
    """sCM's tangent warm-up over the first quarter of the budget and its adaptive weighting."""
    return (f"objective.warmup_steps={max(1, steps // 4)}", "objective.adaptive_weight=true")


def tuned_arms(steps: int) -> dict[str, list[str]]:
    """Arms tuning the shared EDM model: name -> overrides."""
    stab = stabilisers(steps)
    return {
        "ect": ["distance.name=pseudo_huber", "distance.mode=pixel"],
        "ect_mfd": ["distance.name=mfd", "distance.mode=aligned"],
        "ct": [*CONTINUOUS, *PIXEL],
        "ct_mfd": [*CONTINUOUS, *MFD],
        "ct_stab": [*CONTINUOUS, *PIXEL, *stab],
        "ct_mfd_stab": [*CONTINUOUS, *MFD, *stab],
        "ct_mfd_warmup": [*CONTINUOUS, *MFD, stab[0]],  # each stabiliser alone, with the MFD tangent
        "ct_mfd_adaptive": [*CONTINUOUS, *MFD, stab[1]],
        "cd": [*CONTINUOUS, *PIXEL, *CD],
        "cd_mfd_stab": [*CONTINUOUS, *MFD, *CD, *stab],
    }


#: MeanFlow from scratch with configs/shapes-meanflow.yaml's settings (the authors' CIFAR-10 ones).
MEANFLOW = ("objective.kind=meanflow", "objective.init=null", "objective.p_mean=-2.0", "objective.p_std=2.0",
            "objective.mf_ratio=0.75", "objective.mf_norm_p=0.75", "objective.mf_norm_eps=0.001",
            "optim.name=adam", "optim.lr=0.0006", "optim.warmup_steps=100")
SCRATCH_ARMS = {
    "meanflow": [*MEANFLOW, "distance.name=squared_l2", "distance.mode=pixel"],
    "meanflow_mfd": [*MEANFLOW, "distance.name=mfd", "distance.mode=aligned"],
    # the feature direction only for t <= T, pixels above (method.md 8.3); T = 0.2 (EDM sigma <= 0.25)
    # was chosen before any gated run, 0.1 and 0.4 measure how much the threshold matters
    **{f"meanflow_mfd_t0{tag}": [*MEANFLOW, "distance.name=mfd", "distance.mode=aligned", f"objective.mf_mfd_tmax=0.{tag}"]
       for tag in (2, 1, 4)},
}

INITS = dict(edm_steps={"shapes": 1200, "digits": 1500}, feature_steps={"shapes": 1000, "digits": 1000},
             num_samples={"shapes": 256, "digits": 500}, noise_seeds=0)
GROUPS = {
    "full": {
        "tuned": conv.Budget(name="objectives-tuned", datasets=["shapes", "digits"], seeds=[0, 1, 2], ect_steps=200,
                             eval_steps=[25, 50, 100, 200], batches=[16], ema_decay=0.87, **INITS),  # 0.87^20 = 0.06
        "scratch": conv.Budget(name="objectives-scratch", datasets=["shapes", "digits"], seeds=[0, 1, 2], ect_steps=800,
                               eval_steps=[100, 200, 400, 800], batches=[16], ema_decay=0.99, **INITS),
    },
    "quick": {
        "tuned": conv.Budget(name="objectives-tuned-quick", datasets=["shapes"], seeds=[0], ect_steps=20,
                             eval_steps=[10, 20], batches=[8], ema_decay=0.5, edm_steps={"shapes": 100},
                             feature_steps={"shapes": 60}, num_samples={"shapes": 64}, noise_seeds=0),
        "scratch": conv.Budget(name="objectives-scratch-quick", datasets=["shapes"], seeds=[0], ect_steps=20,
                               eval_steps=[10, 20], batches=[8], ema_decay=0.5, edm_steps={"shapes": 100},
                               feature_steps={"shapes": 60}, num_samples={"shapes": 64}, noise_seeds=0),
    },
}


def run(size: str, datasets: list[str] | None, out: Path, workers: int, device: str) -> dict:
    """Both groups (the scratch group reuses the tuned group's cached inits); returns their results."""
    results = {}
    for group, budget in GROUPS[size].items():
        arms = tuned_arms(budget.ect_steps) if group == "tuned" else SCRATCH_ARMS
        budget = replace(budget, arms=arms, datasets=datasets or budget.datasets)
        results[group] = conv.run_benchmark(budget, out / group, workers, None, out / "inits", device)
    return results


# ---------------------------------------------------------------- report
def ms_per_step(runs: list[dict]) -> float:
    return 1000 * statistics.median(r["wall_s"] / r["steps"] for r in runs)


def final_table(results: dict, ds: str) -> list[str]:
    """One row per arm: final metrics (mean ± std over seeds) and the training cost per step."""
    from common import markdown_table

    keys = [conv.PRIMARY[ds], *conv.SECONDARY[ds]]
    rows = []
    for group, res in results.items():
        budget = conv.Budget(**res["budget"])
        for arm in conv.main_arms(budget):
            runs = conv.curves(res, ds, arm)
            if runs:
                rows.append([group, arm.name, budget.ect_steps, arm.batch, len(runs),
                             *[conv._pm(conv._final(runs, k)) for k in keys], f"{ms_per_step(runs):.0f}"])
    return [markdown_table(["group", "arm", "steps", "batch", "seeds", *[f"final {k}" for k in keys],
                            "train ms / step"], rows)]


def plot(results: dict, ds: str, path: Path) -> Path:
    """Each metric (rows) versus steps, one column per group; mean line and min/max band over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    keys = [conv.PRIMARY[ds], *conv.SECONDARY[ds]]
    fig, axes = plt.subplots(len(keys), len(results), figsize=(6 * len(results), 3.2 * len(keys)), squeeze=False)
    for col, (group, res) in enumerate(results.items()):
        for arm in conv.main_arms(conv.Budget(**res["budget"])):
            runs = conv.curves(res, ds, arm)
            for row, key in enumerate(keys if runs else []):
                ax = axes[row][col]
                steps, mean, lo, hi, _ = conv.mean_curve(runs, key)
                line, = ax.plot(steps, mean, "--" if "mfd" in arm.name else "-", marker=".", label=arm.name)
                ax.fill_between(steps, lo, hi, color=line.get_color(), alpha=0.12)
                ax.set(xscale="log", xlabel="training steps", ylabel=key, title=f"{ds}: {group}")
                ax.xaxis.set_minor_formatter(NullFormatter())  # minor labels (2x10^1, ...) overlap
                ax.grid(alpha=0.3, which="both")
        axes[0][col].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=70)
    plt.close(fig)
    return path


def markdown(results: dict, plots: dict[str, str], command: str, notes: str | None) -> str:
    from common import machine_line

    first = next(iter(results.values()))
    out = ["## Objectives side by side (ECT, ECT + AYT, continuous CT/CD with sCM's stabilisers, MeanFlow)", "",
           f"Command: `{command}`", "",
           machine_line(first["machine"]).replace("Machine:", "Machine of the last invocation (runs finished by earlier "
                                                  "invocations are reused, not rerun; the notes say when they ran):", 1), ""]
    for group, res in results.items():
        b = res["budget"]
        samples = ", ".join(f"{b['num_samples'][ds]} ({ds})" for ds in b["datasets"])
        out += [f"- **{group}**: {b['ect_steps']} steps, batch {b['batches']}, seeds {b['seeds']}, EMA {b['ema_decay']}, "
                f"scored at steps {b['eval_steps']} with {samples} samples; arms: "
                + "; ".join(f"`{name}` = {' '.join(o for o in ov)}" for name, ov in b["arms"].items())
                + f". {res['workers']} workers, 1 torch thread each, on {res['device']}; the last invocation took "
                f"{res['total_wall_s'] / 60:.1f} min."]
    out += ["", "Shared initialisations (the tuned arms start from the EDM model; MFD arms use the feature network):", "",
            *conv.init_lines(first), ""]
    if notes:
        out += [notes.strip(), ""]
    for ds in first["budget"]["datasets"]:
        keys = [conv.PRIMARY[ds], *conv.SECONDARY[ds]]
        out += [f"### {ds}", "", *final_table(results, ds), ""]
        for group, res in results.items():
            out += [f"{group}, mean ± std over seeds at every evaluation step:", "", conv.step_table(res, ds, keys), ""]
        if ds in plots:
            out += [f"![{ds} objectives]({plots[ds]})", ""]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny budgets: checks the whole pipeline in a few minutes")
    p.add_argument("--datasets", default=None, help="comma list, a subset of shapes,digits")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--workers", type=int, default=2, help="parallel runs, 1 torch thread each")
    p.add_argument("--out", default=None, help="run folders (default runs/bench/objectives[-quick])")
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "results"), help="JSON + PNG folder")
    p.add_argument("--report-only", action="store_true", help="rebuild the section from the saved JSON")
    p.add_argument("--write", default=None, help="write the 'objectives' section of this markdown file")
    args = p.parse_args(argv)
    datasets = args.datasets.split(",") if args.datasets else None
    unknown = sorted(set(datasets or []) - set(conv.PRIMARY))
    if unknown:
        raise UsageError(f"--datasets: unknown {unknown}; choose from {', '.join(conv.PRIMARY)}")
    conv._reexec_with_malloc_env()
    from ayt.runtime import check_device

    check_device(args.device, "--device")
    size = "quick" if args.quick else "full"
    suffix = "-quick" if args.quick else ""
    out = Path(args.out or ROOT / "runs" / "bench" / f"objectives{suffix}")
    results_dir = Path(args.results)
    json_path = results_dir / f"objectives{suffix}.json"
    command = " ".join(["python benchmarks/objectives.py", *sys.argv[1:]])
    if args.report_only:
        results = json.loads(json_path.read_text())
    else:
        from common import machine_info

        results = run(size, datasets, out, args.workers, args.device)
        failed = [name for res in results.values() for part in ("inits", "arms") for name, v in res[part].items() if v is None]
        if failed:  # keep the previous results file and section: a partial run must not replace them
            raise UsageError(f"{len(failed)} runs failed or were skipped ({', '.join(failed[:3])}"
                                  f"{', ...' if len(failed) > 3 else ''}; see the log above); {json_path} and the section "
                                  "are unchanged; finished runs are reused when you run the command again")
        for res in results.values():
            res.update(machine=machine_info(), command=command)
        results_dir.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(results, indent=1))
    target = Path(args.write) if args.write else None
    base = (target or ROOT / "BENCHMARKS.md").resolve().parent
    plots = {ds: os.path.relpath(plot(results, ds, results_dir / f"objectives{suffix}-{ds}.png"), base)
             for ds in next(iter(results.values()))["budget"]["datasets"]}
    notes_path = results_dir / f"objectives{suffix}-notes.md"
    text = markdown(results, plots, next(iter(results.values()))["command"], notes_path.read_text() if notes_path.is_file() else None)
    print(text)
    if target:
        from common import write_section

        write_section(target, f"objectives{suffix}", text)
        print(f"wrote the objectives{suffix} section of {target}")


if __name__ == "__main__":
    run_main(main)
