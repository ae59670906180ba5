"""Run reports: loss and metric curves (PNG) and a markdown table of what each run reached."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ayt.errors import check  # noqa: E402
from ayt.markdown import markdown_table  # noqa: E402
from ayt.runlog import better_is_higher, read_log  # noqa: E402


def run_label(run_dir: Path) -> str:
    return run_dir.name


def _series(log: list[dict], key: str, x: str) -> tuple[list[float], list[float]]:
    rows = [r for r in log if key in r and x in r and isinstance(r[key], (int, float))]
    return [r[x] for r in rows], [r[key] for r in rows]


def metric_keys(logs: dict[str, list[dict]]) -> list[str]:
    """Every numeric key logged by some run besides the book-keeping ones."""
    skip = {"step", "time", "wall_s", "images_seen", "world", "lr"}
    keys = {k for log in logs.values() for r in log for k, v in r.items() if isinstance(v, (int, float)) and k not in skip}
    return sorted(keys, key=lambda k: (k != "loss", k))


def plot_curves(logs: dict[str, list[dict]], key: str, path: Path) -> Path:
    """One figure, `key` versus steps / images seen / wall-clock, one line per run."""
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, x, label in zip(axes, ["step", "images_seen", "wall_s"], ["steps", "images seen", "wall-clock (s)"]):
        for name, log in logs.items():
            xs, ys = _series(log, key, x)
            if xs:
                ax.plot(xs, ys, label=name, marker="o" if len(xs) < 30 else None, markersize=3)
        ax.set_xlabel(label)
        ax.set_ylabel(key)
        if key == "loss":
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _fmt(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.4g}"


def _largest(log: list[dict], key: str) -> float | None:
    """The largest logged value of a counter (steps, images, seconds), or None."""
    return max((r[key] for r in log if isinstance(r.get(key), (int, float))), default=None)


def summary_rows(logs: dict[str, list[dict]], keys: list[str]) -> list[dict]:
    """Per run: final value of each key, best value (min, or max where higher is better), compute spent."""
    rows = []
    for name, log in logs.items():
        devices = [r["device"] for r in log if "device" in r]
        row = {"run": name, "steps": _largest(log, "step"), "images_seen": _largest(log, "images_seen"),
               "wall_s": _largest(log, "wall_s"), "device": devices[-1] if devices else "-"}
        for key in keys:
            values = [r[key] for r in log if key in r]
            row[f"{key} (final)"] = values[-1] if values else None
            best = max if better_is_higher(key) else min
            row[f"{key} (best)"] = best(values) if values else None
        rows.append(row)
    return rows


def summary_table(rows: list[dict]) -> str:
    """`summary_rows` as markdown (numbers with 3 decimals, '-' for missing)."""
    cells = [["-" if v is None else v if isinstance(v, str) else _fmt(float(v)) for v in row.values()] for row in rows]
    return markdown_table(list(rows[0]), cells)


def write_report(run_dirs: list[str | Path], out_dir: str | Path, title: str = "ayt report") -> Path:
    """Plots for every logged quantity, the latest sample grids and `report.md` into `out_dir`."""
    runs = [Path(r) for r in run_dirs]
    for r in runs:
        check((r / "log.jsonl").is_file(), f"{r} has no log.jsonl; pass run folders written by 'ayt train'")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    logs = {run_label(r): read_log(r) for r in runs}
    keys = metric_keys(logs)
    lines = [f"# {title}", "", "## Summary", "", summary_table(summary_rows(logs, keys)), ""]
    lines += ["Time is training wall-clock (sampling and checkpoints included); images seen = steps x batch.", ""]
    for key in keys:
        name = key.replace("/", "_")
        plot_curves(logs, key, out / f"{name}.png")
        lines += [f"## {key}", "", f"![{key}]({name}.png)", ""]
    lines += ["## Latest samples", ""]
    for r in runs:
        grid = r / "samples" / "latest.png"
        if grid.is_file():
            dest = f"samples-{run_label(r)}.png"
            shutil.copyfile(grid, out / dest)
            lines += [f"**{run_label(r)}**", "", f"![{run_label(r)}]({dest})", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path
