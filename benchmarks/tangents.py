"""Tangent analysis of the demo's two ECT runs (issue: does the MFD tangent leave the manifold less?).

Runs `ayt tangents` on every kept checkpoint of the demo's pseudo-Huber and aligned-MFD runs
(same EDM initialisation, same budget), copies the tables and plots to
`benchmarks/results/tangents/`, and writes the `tangents` section of BENCHMARKS.md.

    ayt demo --size long --out runs/demo          # once (about 20 minutes on 2 busy cores)
    python benchmarks/tangents.py --demo runs/demo --write BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info, markdown_table, write_section  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "tangents"
DISTANCES = "pseudo_huber,mfd:aligned,continuous,continuous:mfd"
ARMS = {"pseudo_huber": "ECT, pseudo-Huber", "mfd": "ECT + AYT, aligned MFD"}


def run_tangents(demo: Path, arm: str, num: int) -> Path:
    """`ayt tangents` on one demo run; returns its output folder."""
    out = demo / f"tangents-{arm}"
    cmd = [sys.executable, "-m", "ayt", "tangents", str(demo / f"ect-{arm}"), "--all-checkpoints", "--distances", DISTANCES,
           "--features", str(demo / "features"), "--num", str(num), "--out", str(out)]
    print(" ".join(cmd[2:]), flush=True)
    subprocess.run(cmd, check=True)
    return out


def summary(results: dict[str, dict]) -> str:
    """Parallel fraction and cosine to the manifold at the last checkpoint of each run."""
    levels = next(iter(results.values()))["levels"]
    header = ["", *(f"t={t:.3g}" for t in levels)]
    lines = []
    for key, title in (("parallel_fraction", "Parallel fraction (share of the squared norm along the manifold)"),
                       ("cosine_to_manifold", "Cosine between the tangent and the direction to the manifold point")):
        rows = []
        for arm, res in results.items():
            last = res["checkpoints"][-1]
            for dist in ("pseudo_huber", "mfd:aligned"):
                label = f"{dist} tangent, run ect-{arm} (step {last['step']})"
                rows.append([label, *(f"{v:.3f}" for v in last["tangents"][dist][key])])
        lines += [f"**{title}**, last checkpoint:", "", markdown_table(header, rows), ""]
    return "\n".join(lines)


def findings(results: dict[str, dict]) -> str:
    """Measured averages over the noise levels t >= 0.2, where the paper's observation is about."""
    lines = []
    for arm, res in results.items():
        last = res["checkpoints"][-1]
        keep = [i for i, t in enumerate(res["levels"]) if t >= 0.2]
        mean = {d: sum(last["tangents"][d]["parallel_fraction"][i] for i in keep) / len(keep) for d in ("pseudo_huber", "mfd:aligned")}
        lines.append(
            f"- run ect-{arm}, step {last['step']}, t >= 0.2: pseudo-Huber tangent {mean['pseudo_huber']:.2f} parallel, "
            f"MFD tangent {mean['mfd:aligned']:.2f} parallel ({mean['pseudo_huber'] / mean['mfd:aligned']:.1f}x less along the manifold)."
        )
    return "\n".join(lines)


def section(demo: Path, results: dict[str, dict], command: str) -> str:
    info = machine_info()
    chance = next(iter(results.values()))["chance_parallel_fraction"]
    parts = [
        "## Tangent analysis (shapes 16x16, the demo's two ECT runs)",
        "",
        f"Command: `{command}` after `ayt demo --size long --out {demo}` "
        f"(EDM 1,500 steps, feature network 1,000 steps, ECT 1,000 steps at batch 16 with each distance). "
        f"Machine: {info.get('cpu', '?')}, {info.get('cores', '?')} cores, torch {info.get('torch', '?')}, {info.get('date', '?')}.",
        "",
        "Each output `f(x_t, t)` of 64 shapes images x 6 noise levels is projected on the shapes manifold (renderer "
        "parameters fitted per image); the renderer's Jacobian there spans the tangent space. A tangent is the "
        "direction one training step moves the output: `-grad_f w(t, r) d(f, target)` for a distance, or the "
        "continuous-time `d f/dt` along the ODE. A random direction would have parallel fraction "
        f"{chance:.4f} (k/D).",
        "",
        summary(results),
        "Mean parallel fraction over the noise levels t >= 0.2:",
        "",
        findings(results),
        "",
        "Full tables per checkpoint (and oscillation across checkpoints): "
        + ", ".join(f"[{arm}](benchmarks/results/tangents/tangents-{arm}.md)" for arm in results) + ".",
        "",
        "![parallel fraction, pseudo-Huber run](benchmarks/results/tangents/parallel_vs_t-pseudo_huber.png)",
        "![parallel fraction, MFD run](benchmarks/results/tangents/parallel_vs_t-mfd.png)",
        "![tangent picture, MFD run](benchmarks/results/tangents/tangents-mfd.png)",
    ]
    return "\n".join(parts)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo", type=Path, default=Path("runs/demo"), help="the demo folder (default runs/demo)")
    parser.add_argument("--num", type=int, default=64, help="images per noise level (default 64)")
    parser.add_argument("--skip-run", action="store_true", help="reuse existing tangents-* folders")
    parser.add_argument("--write", type=Path, help="write the 'tangents' section of this markdown file")
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    results = {}
    for arm in ARMS:
        out = args.demo / f"tangents-{arm}" if args.skip_run else run_tangents(args.demo, arm, args.num)
        results[arm] = json.loads((out / "tangents.json").read_text())
        shutil.copyfile(out / "tangents.md", RESULTS / f"tangents-{arm}.md")
        shutil.copyfile(out / "parallel_vs_t.png", RESULTS / f"parallel_vs_t-{arm}.png")
        shutil.copyfile(out / "tangents.png", RESULTS / f"tangents-{arm}.png")
    command = f"python benchmarks/tangents.py --demo {args.demo} --num {args.num} --write BENCHMARKS.md"
    text = section(args.demo, results, command)
    print(text)
    if args.write:
        write_section(args.write, "tangents", text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
