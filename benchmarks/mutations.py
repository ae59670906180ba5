"""Mutation check of the core formulas: does some test fail when a formula is changed?

Each mutation replaces one exact piece of source text (which must occur exactly once, so the script
fails loudly when the source moves on) in a temporary copy of `src/`, runs the named test files
against that copy (`PYTHONPATH` first, bytecode off), and records the tests that fail. The
repository's own files are never written. Prints a markdown table "mutation | killed by" and exits
non-zero when a mutation survives or the unmutated copy does not pass.

    python benchmarks/mutations.py                 # all mutations (about 1 min per mutation on 2 busy cores)
    python benchmarks/mutations.py --only ema,edm  # mutations whose name contains one of these words
    python benchmarks/mutations.py --list          # names only
    python benchmarks/mutations.py --skip-formulas # without tests/test_formulas.py: what the rest protects
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FORMULAS = "tests/test_formulas.py"


@dataclass(frozen=True)
class Mutation:
    name: str
    path: str  # relative to src/ayt
    old: str
    new: str
    tests: tuple[str, ...]  # test files (or node ids) expected to catch it, besides FORMULAS


PRECOND = "nets/precond.py"
MEANFLOW = "objectives/meanflow.py"
MUTATIONS = [
    Mutation("edm weight (t^2+sd^2)/(t sd)^2 -> 1/t^2", "objectives/diffusion.py",
             "weight = (t**2 + self.sigma_data**2) / (t * self.sigma_data) ** 2", "weight = 1 / t**2",
             ("tests/test_objectives.py",)),
    Mutation("ema lerp_(p, 1-decay) -> lerp_(p, decay)", "train.py",
             "e.lerp_(p.detach(), 1.0 - decay)", "e.lerp_(p.detach(), decay)", ()),
    Mutation("ema buffers not copied", "train.py", "e.copy_(b)", "pass", ()),
    Mutation("c_skip sd^2 -> (2 sd)^2 in the denominator", PRECOND,
             "c_skip = sd2 / ((t - shift) ** 2 + sd2)", "c_skip = sd2 / ((t - shift) ** 2 + 4 * sd2)",
             ("tests/test_nets.py",)),
    Mutation("c_skip without the exact-boundary shift", PRECOND,
             "c_skip = sd2 / ((t - shift) ** 2 + sd2)", "c_skip = sd2 / (t ** 2 + sd2)", ("tests/test_nets.py",)),
    Mutation("c_out sd -> 2 sd", PRECOND,
             "c_out = (t - shift) * self.sigma_data / norm", "c_out = (t - shift) * 2 * self.sigma_data / norm",
             ("tests/test_nets.py",)),
    Mutation("c_out without the exact-boundary shift", PRECOND,
             "c_out = (t - shift) * self.sigma_data / norm", "c_out = t * self.sigma_data / norm",
             ("tests/test_nets.py",)),
    Mutation("c_in sd -> 2 sd", PRECOND,
             "return c_skip, c_out, 1.0 / norm, t.log() / 4",
             "return c_skip, c_out, 1.0 / (t ** 2 + 4 * sd2).sqrt(), t.log() / 4", ("tests/test_nets.py",)),
    Mutation("c_noise ln(t)/4 -> ln(t)/2", PRECOND,
             "return c_skip, c_out, 1.0 / norm, t.log() / 4", "return c_skip, c_out, 1.0 / norm, t.log() / 2",
             ("tests/test_nets.py",)),
    Mutation("precond forward skips c_in", PRECOND,
             "f_x = self.net((c_in * x).to(x.dtype)", "f_x = self.net((x).to(x.dtype)", ("tests/test_nets.py",)),
    Mutation("t -> r: k -> k/2", "schedules.py",
             "(1.0 + k * torch.sigmoid(-b * t))", "(1.0 + k / 2 * torch.sigmoid(-b * t))",
             ("tests/test_schedules_distances.py",)),
    Mutation("t -> r: sigmoid(-b t) -> sigmoid(-t)", "schedules.py",
             "(1.0 + k * torch.sigmoid(-b * t))", "(1.0 + k * torch.sigmoid(-t))",
             ("tests/test_schedules_distances.py",)),
    Mutation("t -> r: d = q^-(stage+1) -> q^-(stage+2)", "schedules.py",
             "return q ** -(stage + 1)", "return q ** -(stage + 2)", ("tests/test_schedules_distances.py",)),
    Mutation("t -> r: no clamp at 0", "schedules.py", "return r.clamp(min=0.0)", "return r",
             ("tests/test_schedules_distances.py",)),
    Mutation("lognormal t: P_mean and P_std swapped", "schedules.py",
             "return (normal * p_std + p_mean).exp()", "return (normal * p_mean + p_std).exp()",
             ("tests/test_schedules_distances.py",)),
    Mutation("ect w = 1/(t-r) -> 1/t", "objectives/ect.py",
             "return 1.0 / (self.t - self.r)", "return 1.0 / self.t", ("tests/test_objectives.py",)),
    Mutation("ect target evaluated at x_t instead of x_r", "objectives/ect.py",
             "target = net(x0 + r_safe.view(view) * eps, r_safe, labels)",
             "target = net(x0 + t.view(view) * eps, r_safe, labels)", ("tests/test_objectives.py",)),
    Mutation("ect target f(x_r, r) also where r = 0", "objectives/ect.py",
             "return student, torch.where((r > 0).view(view), target, x0).detach()",
             "return student, net(x0 + r.clamp_min(1e-3).view(view) * eps, r.clamp_min(1e-3), labels).detach()",
             ("tests/test_objectives.py",)),
    Mutation("aligned: no normalisation (g instead of g/||g||)", "losses/aligned.py",
             "norm = g.float().flatten(1).norm(dim=1).clamp_min(self.eps)",
             "norm = torch.ones(g.shape[0], device=g.device)", ("tests/test_aligned.py",)),
    Mutation("aligned: one norm per batch, not per example", "losses/aligned.py",
             "norm = g.float().flatten(1).norm(dim=1).clamp_min(self.eps)",
             "norm = g.float().norm().clamp_min(self.eps).expand(g.shape[0])", ("tests/test_aligned.py",)),
    Mutation("mfd reference form -> squared form", "losses/mfd.py",
             "term = pseudo_huber_channel_norms(diff, self.eps) if", "term = diff.flatten(1).square().sum(1) if",
             ("tests/test_mfd.py",)),
    Mutation("mfd reference: mean over channels instead of sum", "losses/mfd.py",
             "return ((flat.square().sum(2) + eps * eps).sqrt() - eps).sum(1)",
             "return ((flat.square().sum(2) + eps * eps).sqrt() - eps).mean(1)", ("tests/test_mfd.py",)),
    Mutation("mfd reference: squared spatial norm per channel", "losses/mfd.py",
             "return ((flat.square().sum(2) + eps * eps).sqrt() - eps).sum(1)",
             "return flat.square().sum(2).sum(1)", ("tests/test_mfd.py",)),
    Mutation("mfd squared form: sum -> mean", "losses/mfd.py",
             "else diff.flatten(1).square().sum(1)", "else diff.flatten(1).square().mean(1)", ("tests/test_mfd.py",)),
    Mutation("continuous: g/(rms+0.1) -> g/(rms+1)", "objectives/continuous.py",
             "RMS_FLOOR = 0.1 ", "RMS_FLOOR = 1.0 ", ("tests/test_continuous.py",)),
    Mutation("continuous: rms per batch, not per example", "objectives/continuous.py",
             "rms = g.flatten(1).square().mean(1).sqrt()", "rms = g.square().mean().sqrt().expand(g.shape[0])",
             ("tests/test_continuous.py",)),
    Mutation("continuous: weight 1/t -> 1", "objectives/continuous.py",
             "    w = 1.0 / t\n", "    w = torch.ones_like(t)\n", ("tests/test_continuous.py",)),
    Mutation("continuous: velocity (x_t - x_0)/t -> x_t - x_0", "objectives/continuous.py",
             "return (x_t - x0) / t.view(-1, 1, 1, 1)", "return x_t - x0", ("tests/test_continuous.py",)),
    Mutation("continuous stabiliser: warm-up r not capped at 1", "objectives/continuous.py",
             "min(1.0, step / warmup_steps)", "step / warmup_steps", ("tests/test_continuous.py",)),
    Mutation("continuous stabiliser: warm-up scales the whole direction (r v, r)", "objectives/continuous.py",
             "(v.to(x_t.dtype), torch.full_like(t, r))", "(r * v.to(x_t.dtype), torch.full_like(t, r))",
             ("tests/test_continuous.py",)),
    Mutation("continuous stabiliser: adaptive L/exp(u) + u -> L/exp(u)", "objectives/continuous.py",
             "return loss * torch.exp(-u.to(loss.dtype)) + u.to(loss.dtype)", "return loss * torch.exp(-u.to(loss.dtype))",
             ("tests/test_continuous.py",)),
    Mutation("continuous stabiliser: fd step absolute, h = eps", "objectives/continuous.py",
             "    h = eps * t\n", "    h = eps * torch.ones_like(t)\n", ("tests/test_continuous.py",)),
    Mutation("continuous stabiliser: fd one-sided difference over 2h", "objectives/continuous.py",
             "- fn(x_t - step_x, t - h * r)", "- fn(x_t, t)", ("tests/test_continuous.py",)),
    Mutation("meanflow: target v - (t-r) du/dt -> v + (t-r) du/dt", MEANFLOW,
             "return (v - (t - r).view(-1, 1, 1, 1)", "return (v + (t - r).view(-1, 1, 1, 1)", ("tests/test_meanflow.py",)),
    Mutation("meanflow: JVP tangent (v, 0, 1) -> (v, 1, 1)", MEANFLOW,
             "torch.zeros_like(r, dtype=z.dtype), torch.ones_like(t", "torch.ones_like(r, dtype=z.dtype), torch.ones_like(t",
             ("tests/test_meanflow.py",)),
    Mutation("meanflow: times not sorted (t >= r)", MEANFLOW,
             "t, r = torch.maximum(a, b), torch.minimum(a, b)", "t, r = a, b", ("tests/test_meanflow.py",)),
    Mutation("meanflow: adaptive weight power p -> p/2", MEANFLOW,
             "return 1.0 / (squared.detach() + c) ** p", "return 1.0 / (squared.detach() + c) ** (p / 2)",
             ("tests/test_meanflow.py",)),
    Mutation("meanflow MFD: implied image z - t u -> z - (1-t) u", MEANFLOW,
             "return self.z - t * self.u, self.z - t * self.target",
             "return self.z - (1 - t) * self.u, self.z - (1 - t) * self.target", ("tests/test_meanflow.py",)),
    Mutation("meanflow MFD: update size 2 w ||Delta|| -> 2 w ||Delta||^2", MEANFLOW,
             "size = 2 * w * squared.detach().sqrt()", "size = 2 * w * squared.detach()", ("tests/test_meanflow.py",)),
    Mutation("meanflow sampler: jump (t - r) u -> t u", "sampling.py",
             "z = z - (t - r) * net(z, _levels(z, r), _levels(z, t), labels)",
             "z = z - t * net(z, _levels(z, r), _levels(z, t), labels)", ("tests/test_meanflow.py",)),
]


def select(only: str | None) -> list[Mutation]:
    if not only:
        return MUTATIONS
    words = [w.strip().lower() for w in only.split(",") if w.strip()]
    return [m for m in MUTATIONS if any(w in m.name.lower() for w in words)]


def run_tests(src: Path, targets: list[str], timeout: float) -> tuple[int, list[str], str]:
    """pytest on `targets` (default markers: slow tests excluded) with `src` first on the path."""
    env = {**os.environ, "PYTHONPATH": f"{src}{os.pathsep}{os.environ.get('PYTHONPATH', '')}".rstrip(os.pathsep),
           "PYTHONDONTWRITEBYTECODE": "1", "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-rf", "--no-header", "-p", "no:cacheprovider", *targets]
    try:
        out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return -1, [], "timeout"
    failed = re.findall(r"^FAILED (\S+)", out.stdout, re.MULTILINE)
    return out.returncode, failed, out.stdout[-2000:] + out.stderr[-2000:]


def check_import(src: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(src), "PYTHONDONTWRITEBYTECODE": "1"}
    where = subprocess.run([sys.executable, "-c", "import ayt; print(ayt.__file__)"], env=env,
                           capture_output=True, text=True, check=True).stdout.strip()
    if not Path(where).resolve().is_relative_to(src.resolve()):
        sys.exit(f"ayt imports from {where}, not from the mutated copy {src}")


def short(test: str) -> str:
    return test.removeprefix("tests/").split(" ")[0]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", help="comma-separated words: run the mutations whose name contains one")
    parser.add_argument("--list", action="store_true", help="print the mutation names and exit")
    parser.add_argument("--skip-formulas", action="store_true", help=f"do not run {FORMULAS} (only the files each mutation names)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per pytest run")
    args = parser.parse_args()
    chosen = select(args.only)
    if args.list or not chosen:
        print("\n".join(m.name for m in MUTATIONS))
        return 0 if chosen or args.list else 2
    with tempfile.TemporaryDirectory(prefix="ayt-mutations-") as tmp:
        src = Path(tmp) / "src"
        shutil.copytree(ROOT / "src", src, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        check_import(src)
        always = [] if args.skip_formulas else [FORMULAS]
        targets = sorted({*always, *(t for m in chosen for t in m.tests)})
        code, failed, tail = run_tests(src, targets, args.timeout) if targets else (0, [], "")
        if code != 0:
            print(f"the unmutated copy fails ({failed or 'see below'}); fix that first\n{tail}")
            return 1
        rows, survivors = [], 0
        for m in chosen:
            file = src / "ayt" / m.path
            original = file.read_text()
            count = original.count(m.old)
            if count != 1:
                print(f"mutation {m.name!r}: {m.old!r} occurs {count} times in src/ayt/{m.path}; update the script")
                return 1
            file.write_text(original.replace(m.old, m.new))
            try:
                code, failed, tail = run_tests(src, [*always, *m.tests], args.timeout) if always or m.tests else (0, [], "")
            finally:
                file.write_text(original)
            if failed:
                killed = ", ".join(short(f) for f in failed[:3]) + (f" (+{len(failed) - 3})" if len(failed) > 3 else "")
            elif code != 0:
                killed = f"pytest exit {code} (error, not a failing test): " + tail.strip().splitlines()[-1][:80]
            else:
                killed, survivors = "SURVIVED", survivors + 1
            rows.append(f"| {m.name} | `src/ayt/{m.path}` | {killed} |")
            print(rows[-1], flush=True)
    print("\n| mutation | file | killed by (first failing tests) |\n|---|---|---|\n" + "\n".join(rows))
    print(f"\n{len(rows) - survivors} of {len(rows)} mutations killed")
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())
