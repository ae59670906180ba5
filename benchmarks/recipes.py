"""Held-out regression of the feature network per perturbation slot: reference vs legacy recipe.

Issue 12's "Show" item. Trains (or reuses) `ayt train-features` with the CPU presets
`configs/<data>-features.yaml` on shapes and digits, once per `features.recipe`, and tabulates
each target slot's held-out ratio from `heldout.json` (mse / mse of predicting zeros on the
held-out images, p = 0.5; 1 = nothing learnt, below 1 = learnt).

    python benchmarks/recipes.py --write BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine_info, machine_line, markdown_table, write_section  # noqa: E402

DATASETS = ("shapes", "digits")
RECIPES = ("reference", "legacy")


def train(dataset: str, recipe: str, out: Path) -> dict:
    """Run `ayt train-features` for one preset and recipe unless its heldout.json exists; returns it."""
    run = out / f"{dataset}-features-{recipe}"
    if not (run / "heldout.json").is_file():
        cmd = [sys.executable, "-m", "ayt", "train-features", "--config", str(ROOT / "configs" / f"{dataset}-features.yaml"),
               f"features.recipe={recipe}", f"train.run_dir={run}", "log.progress=false", "log.tensorboard=false"]
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
        subprocess.run(cmd, check=True, env=env)
    return json.loads((run / "heldout.json").read_text())


def markdown(results: dict, command: str, wall: float) -> str:
    slots = list(results[DATASETS[0]][RECIPES[0]]["slots"])
    header = ["target slot"] + [f"{ds} {recipe}" for ds in DATASETS for recipe in RECIPES]
    cell = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    rows = [[f"`{s}`"] + [cell(results[ds][r]["slots"][s]["ratio"]) for ds in DATASETS for r in RECIPES] for s in slots]
    rows += [[f"**{g}** (group)"] + [cell(results[ds][r]["groups"][g]["ratio"]) for ds in DATASETS for r in RECIPES]
             for g in results[DATASETS[0]][RECIPES[0]]["groups"]]
    return "\n".join([
        "## Perturbation recipe: what the feature network learns (reference vs legacy)", "",
        f"Command: `{command}` (runs `ayt train-features --config configs/<data>-features.yaml "
        "features.recipe=reference|legacy train.run_dir=runs/show/<data>-features-<recipe>`)", "",
        machine_line(machine_info()), "",
        "Held-out ratio per target slot (mse / mse of predicting zeros on the held-out images, p = 0.5; "
        "1 = not learnt) after the presets' 1500 steps (tiny_vgg width 16, batch 64, p = 0.5). Gray digits "
        f"never get hue or saturation (-). Wall-clock of the table (reusing finished runs): {wall:.0f} s.", "",
        markdown_table(header, rows),
    ])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "show", help="run folders (reused when finished)")
    p.add_argument("--write", metavar="PATH", help="write the 'recipes' section of this file")
    args = p.parse_args()
    start = time.perf_counter()
    results = {ds: {r: train(ds, r, args.out) for r in RECIPES} for ds in DATASETS}
    command = "python benchmarks/recipes.py" + (f" --write {args.write}" if args.write else "")
    text = markdown(results, command, time.perf_counter() - start)
    print(text)
    if args.write:
        write_section(args.write, "recipes", text)


if __name__ == "__main__":
    main()
