"""Which of phi's training perturbations actually leave the shapes manifold?

MFD rests on a feature network `phi` trained to detect off-manifold perturbations
(method.md section 4). On `shapes` the manifold is known exactly, so each perturbation can be
measured: apply it alone to clean images, fit the renderer to the result, and compare the
distance left to the manifold with the size of the perturbation. A perturbation that maps an
ellipse to another ellipse (a rotation, a shift, a scale) is an *on-manifold* move there: a
phi trained to detect it is trained to be sensitive along the manifold, the opposite of what
MFD needs. Next to it: how well trained feature networks regress each perturbation on held-out
images (mse / mse of predicting zeros; 1 = nothing learnt).

    python benchmarks/perturbations.py --write BENCHMARKS.md
    python benchmarks/perturbations.py --features runs/bench/convergence/shapes/features ...
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine_info, machine_line, markdown_table, write_section  # noqa: E402

DEFAULT_FEATURES = [
    ROOT / "runs/bench/convergence/shapes/features",
    ROOT / "runs/bench/convergence/shapes/features-geo",
    ROOT / "runs/bench/convergence/shapes/features-degrade",
]


def measure(num: int, resolution: int, seed: int, recipe: str = "reference") -> dict:
    """Per perturbation: median pixel RMS of the change and of the distance left to the manifold."""
    import torch

    from ayt.data import build_dataset
    from ayt.features.augment import PERTURBATIONS, Perturber
    from ayt.metrics.manifold import fit_shapes

    clean = build_dataset("shapes", resolution=resolution, num_samples=num, seed=seed).images
    fit_gen = lambda: torch.Generator().manual_seed(seed + 1)  # noqa: E731 (same fit starts for every row)
    rows = {"none": {"change": 0.0, "off": float(fit_shapes(clean, generator=fit_gen()).rms.median())}}
    perturber = Perturber("all", p=1.0, recipe=recipe)
    for name in PERTURBATIONS:
        generator = torch.Generator().manual_seed(seed + 2)
        params = perturber.sample_params(num, clean.shape[1], generator=generator)
        params.applied = {n: torch.full((num,), n == name) for n in params.applied}
        x = perturber.apply(clean, params, generator)
        change = (x - clean).square().mean(dim=(1, 2, 3)).sqrt()
        off = fit_shapes(x, generator=fit_gen()).rms
        keep = change > 1e-3  # draws that barely move the image say nothing about the direction
        rows[name] = {"change": float(change.median()), "off": float(off.median()),
                      "off_fraction": float((off[keep] / change[keep]).median()) if keep.any() else None}
    return rows


def heldout(paths: list[Path], num: int, resolution: int, seed: int) -> dict:
    """Per feature network: held-out mse / mse_zero per perturbation of its subset (p = 0.5)."""
    from ayt.checkpoint import load_checkpoint
    from ayt.data import build_dataset
    from ayt.features.load import load_feature_net
    from ayt.features.train import evaluate_heldout

    images = build_dataset("shapes", resolution=resolution, num_samples=num, seed=seed + 3).images
    out = {}
    for path in paths:
        if not path.is_dir():
            print(f"skip {path}: not trained (python benchmarks/convergence.py trains it)")
            continue
        state = load_checkpoint(path).state
        fc = state["config"]["features"]
        net = load_feature_net(path, resolution=resolution, channels=3)
        result = evaluate_heldout(net, images, fc["subset"], 0.5, seed, "cpu", fc.get("aniso_target", "paper"),
                                  fc.get("recipe", "legacy"))  # saved before features.recipe existed: legacy
        out[path.name] = {"subset": fc["subset"], "width": fc.get("width"), "steps": state["step"],
                          "ratio": {k: v["ratio"] for k, v in result["perturbations"].items()}}
    return out


def markdown(rows: dict, nets: dict, command: str, info: dict, num: int, wall: float) -> str:
    from ayt.features.augment import PERTURBATIONS

    header = ["perturbation", "group", "pixel RMS of the change", "RMS left to the manifold",
              "off-manifold share (median of left / change)"]
    header += [f"phi `{name}` ({net['subset']}) held-out ratio" for name, net in nets.items()]
    table = []
    for name, r in rows.items():
        group = PERTURBATIONS[name][0] if name in PERTURBATIONS else "-"
        share = "-" if r.get("off_fraction") is None else f"{r['off_fraction']:.2f}"
        cells = [name if name != "none" else "none (clean images)", group, f"{r['change']:.3f}", f"{r['off']:.4f}", share]
        for net in nets.values():
            ratio = net["ratio"].get(name)
            cells.append("-" if ratio is None else f"{ratio:.2f}")
        table.append(cells)
    on = [n for n, r in rows.items() if r.get("off_fraction") is not None and r["off_fraction"] < 0.3]
    lines = [
        "## Which perturbations leave the shapes manifold?", "",
        f"Command: `{command}`", "", machine_line(info), "",
        f"Each perturbation of phi's training pipeline (method.md section 4) is applied alone to {num} clean "
        "shapes images (16x16, p = 1, its usual random strength); the renderer is fitted to the result "
        "(as `manifold_rms`). 'RMS left to the manifold' is the per-pixel distance to the fitted rendering; "
        "the off-manifold share divides it by the size of the change (1: the change leaves the manifold "
        "entirely; near 0: it moves along it, to another valid ellipse). The held-out ratio columns are "
        "mse / mse of predicting zeros for the feature networks named in the columns, on new "
        f"images (1 = not learnt). Wall-clock {wall:.0f} s.", "",
        markdown_table(header, table), "",
        "Perturbations with an off-manifold share below 0.3 (mostly on-manifold moves here): "
        + (", ".join(f"`{n}`" for n in on) if on else "none") + ".",
    ]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num", type=int, default=256, help="images per perturbation (default 256)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--features", nargs="*", type=Path, default=DEFAULT_FEATURES,
                   help="feature-network run folders to score per perturbation (missing ones are skipped)")
    p.add_argument("--recipe", default="reference", choices=["reference", "legacy"],
                   help="how the perturbations are made (features.recipe; default reference)")
    p.add_argument("--write", metavar="PATH", help="write the 'perturbations' section of this file")
    args = p.parse_args()
    import torch

    torch.set_num_threads(min(2, torch.get_num_threads()))
    start = time.perf_counter()
    rows = measure(args.num, 16, args.seed, args.recipe)
    nets = heldout(args.features, args.num, 16, args.seed)
    wall = time.perf_counter() - start
    command = "python benchmarks/perturbations.py" + (f" --recipe {args.recipe}" if args.recipe != "reference" else "")
    if args.features != DEFAULT_FEATURES:
        command += " --features " + " ".join(os.path.relpath(f, ROOT) for f in args.features)
    command += f" --write {args.write}" if args.write else ""
    text = markdown(rows, nets, command, machine_info(), args.num, wall)
    print(text)
    if args.write:
        write_section(args.write, "perturbations", text)
        print(f"wrote the perturbations section of {args.write}")


if __name__ == "__main__":
    main()
