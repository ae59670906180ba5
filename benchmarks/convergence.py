"""Convergence benchmark (issue 7): does ECT + AYT (aligned MFD) converge faster than ECT?

Tests the two claims of method.md section 6 at CPU scale, on two built-in datasets:

1. ECT + AYT reaches the ECT baseline's final quality about 10x sooner (here: the aligned MFD
   at batch 64 reaches the final metric of pseudo-Huber at batch 64 within 1/10 of the steps);
2. at 1/8 of the batch it matches the baseline (MFD at batch 8 ends at least as good as
   pseudo-Huber at batch 64, same number of steps).

Pipeline per dataset (shapes 16x16 with exact manifold metrics; digits 8x8 with FD-digits):
one EDM diffusion model (tiny preset) and one tiny_vgg feature network are trained once and
shared by every arm; the arms tune that diffusion model with ECT, using pseudo-Huber
(`distance.mode=pixel`, ECT's baseline) or the aligned MFD (`distance.name=mfd`,
`distance.mode=aligned`, the AYT reference form), at batch 8 and 64, over several seeds
(`train.seed`), all with the same step budget. Each arm is trained in segments that end at the
evaluation steps (a resumed run is bitwise identical to an uninterrupted one), so the EMA model
is scored at log-spaced steps (dense early, where a 10x speed-up would show) and the logged
`wall_s` is training time only (evaluation runs after the segment's clock stops).

All jobs (inits, then the arms seed by seed) go to one pool of `--workers` processes; an arm waits
for its dataset's inits, so the arms of one dataset start while the other's inits still train.
`--device cuda` trains and evaluates every run on the GPU (the workers share it; use several,
e.g. 8 on an H200 with 16 cores); the default is the CPU, 1 torch thread per worker.

Budgets: `full` (the default), `quick`, `long` (seed 0, batch 64, 480 steps on the full budget's
inits) and `near`, the near-convergence regime of issue 12: EDM inits trained 10x longer (12000 /
15000 steps), their metric scored 12 times over the run (reported, with the step where each metric
stopped improving), then 640 ECT steps (4x), EMA 0.947 (0.947^64 ~ 0.03: ~3% of the init left at
1/10 of the steps, as in `full`), feature networks and arms as in `full`. `--datasets` keeps a
subset of the datasets, `--arms 'NAME=override,override;NAME=...'` replaces the two distances (the
baseline is the arm named pseudo_huber, the claims use the arm named mfd; give such a set its own
`--out`), and `--budget-json '{...}'` replaces any Budget field (tests, variants).

Runs go to `runs/bench/convergence[-quick|-long|-near]/` (or `--out`) and are reused: rerunning
skips finished runs and resumes unfinished ones. Results (JSON + PNG) go to `benchmarks/results/`
(or `--results`); `--write FILE` writes the section named after the budget ("convergence",
"convergence-near", ...) and nothing else; the JSON keeps the machine and the command, so
`--near --report-only --write BENCHMARKS.md` rebuilds the section elsewhere from the JSON in
`benchmarks/results/`.

    python benchmarks/convergence.py --quick                      # < 10 min, 1 seed, whole pipeline
    python benchmarks/convergence.py --write BENCHMARKS.md        # full size (< 90 min on 2 cores)
    python benchmarks/convergence.py --near --device cuda --workers 8 --write BENCHMARKS.md  # GPU, ~4-5 min
    python benchmarks/convergence.py --ablations                  # small ablations on shapes, seed 0
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import sys
import time
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field, replace
from multiprocessing import get_context
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "src"))

from common import UsageError, run_main  # noqa: E402

MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "17179869184", "MALLOC_TRIM_THRESHOLD_": "17179869184"}
PRIMARY = {"shapes": "manifold_rms", "digits": "fd_digits"}
SECONDARY = {"shapes": ["param_fd", "coverage"], "digits": []}  # digits: KID only in the noise check
HIGHER_IS_BETTER = {"coverage"}
BASELINE = ("pseudo_huber", 64)  # the reference arm: ECT's pseudo-Huber at batch 64
#: The main arms' learning rate (1x of the sweep), fixed here so that the CPU presets may carry
#: each distance's best rate; the `-lr3x` / `-lr10x` ablations override it.
BENCH_LR = 2e-4


# ---------------------------------------------------------------- budgets
@dataclass
class Budget:
    """Step budgets and evaluation sizes of one benchmark size."""

    name: str
    datasets: list[str]
    seeds: list[int]
    ect_steps: int  # the same for every arm
    eval_steps: list[int]  # segment ends = evaluation steps (the last one is ect_steps)
    batches: list[int] = field(default_factory=lambda: [8, 64])
    edm_steps: dict[str, int] = field(default_factory=dict)  # None -> the preset's
    feature_steps: dict[str, int] = field(default_factory=dict)
    num_samples: dict[str, int] = field(default_factory=dict)  # eval.num_samples per dataset
    noise_seeds: int = 3  # evaluation seeds for the metric-noise measurement
    #: EMA decay of the tuned models, chosen so that the EMA keeps only ~3% of the initial
    #: weights at the 1/10 budget point (decay^(steps/10) ~ 0.03); the presets' 0.99 would keep
    #: 85% at step 16 and hide any early speed-up.
    ema_decay: float = 0.8
    edm_evals: int = 0  # evaluations of each EDM initialisation over its run (its metric curve; 0 = none)
    arms: dict[str, list[str]] | None = None  # distance name -> overrides (None: MAIN_DISTANCES)


FULL = Budget(
    name="full", datasets=["shapes", "digits"], seeds=[0, 1, 2], ect_steps=160,
    eval_steps=[8, 16, 32, 60, 100, 160], ema_decay=0.8,
    edm_steps={"shapes": 1200, "digits": 1500}, feature_steps={"shapes": 1000, "digits": 1000},
    num_samples={"shapes": 256, "digits": 500},
)
#: A longer check (seed 0, batch 64) with the FULL budget's cached initialisations.
LONG = Budget(
    name="long", datasets=["shapes", "digits"], seeds=[0], ect_steps=480,
    eval_steps=[12, 24, 48, 96, 160, 240, 360, 480], ema_decay=0.93, batches=[64],
    edm_steps=FULL.edm_steps, feature_steps=FULL.feature_steps, num_samples=FULL.num_samples, noise_seeds=0,
)
#: The near-convergence regime (issue 12): EDM inits 10x FULL's, with their metric curve; 4x FULL's tuning.
NEAR = Budget(
    name="near", datasets=["shapes", "digits"], seeds=[0, 1, 2], ect_steps=640,
    eval_steps=[16, 32, 64, 128, 256, 400, 640], ema_decay=0.947,  # 0.947^64 = 0.03
    edm_steps={"shapes": 12000, "digits": 15000}, feature_steps=FULL.feature_steps, num_samples=FULL.num_samples,
    edm_evals=12,
)
QUICK = Budget(
    name="quick", datasets=["shapes", "digits"], seeds=[0], ect_steps=40,
    eval_steps=[10, 20, 40], ema_decay=0.5,
    edm_steps={"shapes": 200, "digits": 300}, feature_steps={"shapes": 150, "digits": 150},
    num_samples={"shapes": 128, "digits": 500},
)


# ---------------------------------------------------------------- arms
@dataclass(frozen=True)
class Arm:
    """One way of tuning: a distance (and optional extra overrides) at one batch size."""

    name: str  # e.g. "mfd" or "pseudo_huber"
    batch: int
    overrides: tuple[str, ...] = ()
    features: str = "features"  # which cached feature network (folder name) MFD uses

    @property
    def label(self) -> str:
        return f"{self.name} b{self.batch}"

    @property
    def folder(self) -> str:
        return f"{self.name}-b{self.batch}"


MAIN_DISTANCES = {
    "pseudo_huber": ("distance.name=pseudo_huber", "distance.mode=pixel"),
    "mfd": ("distance.name=mfd", "distance.mode=aligned"),
}
#: Small ablations (shapes, seed 0): name -> (overrides, feature network folder).
ABLATIONS = {
    "mfd-squared": (("distance.name=mfd", "distance.mode=aligned", "distance.form=squared"), "features"),
    "mfd-geo": (("distance.name=mfd", "distance.mode=aligned"), "features-geo"),
    "mfd-pixelmode": (("distance.name=mfd", "distance.mode=pixel"), "features"),
    "mfd-q256": (("distance.name=mfd", "distance.mode=aligned", "objective.stage_steps=null", "objective.q=256"), "features"),
    "pseudo_huber-q256": (("distance.name=pseudo_huber", "distance.mode=pixel", "objective.stage_steps=null", "objective.q=256"), "features"),
    "mfd-feat4k": (("distance.name=mfd", "distance.mode=aligned"), "features-4k"),
    "mfd-wide": (("distance.name=mfd", "distance.mode=aligned"), "features-wide"),
    # the main arms' seed-0 runs again, with the current code (paired with later ablations)
    "mfd-repeat": (MAIN_DISTANCES["mfd"], "features"),
    "pseudo_huber-repeat": (MAIN_DISTANCES["pseudo_huber"], "features"),
    "mfd-degrade": (("distance.name=mfd", "distance.mode=aligned"), "features-degrade"),
    "mfd-lr3x": (("distance.name=mfd", "distance.mode=aligned", "optim.lr=0.0006"), "features"),
    "pseudo_huber-lr3x": (("distance.name=pseudo_huber", "distance.mode=pixel", "optim.lr=0.0006"), "features"),
    "mfd-lr10x": (("distance.name=mfd", "distance.mode=aligned", "optim.lr=0.002"), "features"),
    "pseudo_huber-lr10x": (("distance.name=pseudo_huber", "distance.mode=pixel", "optim.lr=0.002"), "features"),
    "mfd-lr30x": (("distance.name=mfd", "distance.mode=aligned", "optim.lr=0.006"), "features"),
    "pseudo_huber-lr30x": (("distance.name=pseudo_huber", "distance.mode=pixel", "optim.lr=0.006"), "features"),
    "l2": (("distance.name=l2", "distance.mode=pixel"), "features"),
    # continuous-time consistency training (CT) and distillation from the EDM init ({edm}) (CD)
    "continuous-ct": (("objective.kind=continuous", "distance.name=l2"), "features"),
    "continuous-ct-mfd": (("objective.kind=continuous", "distance.name=mfd"), "features"),
    "continuous-cd": (("objective.kind=continuous", "distance.name=l2", "objective.teacher={edm}"), "features"),
    "continuous-cd-mfd": (("objective.kind=continuous", "distance.name=mfd", "objective.teacher={edm}"), "features"),
    # the reference's continuous loss as written: one weight mean(1/t) for the whole batch (issue 12)
    "continuous-ct-batchmean": (("objective.kind=continuous", "distance.name=l2", "objective.weighting=batch_mean"), "features"),
    "continuous-ct-mfd-batchmean": (("objective.kind=continuous", "distance.name=mfd", "objective.weighting=batch_mean"), "features"),
    # late instability at batch 8 and 10x: the reference's fixed stage (q = 256: w = 1/(t - r) never doubles)
    "mfd-lr10x-q256": (("distance.name=mfd", "distance.mode=aligned", "optim.lr=0.002", "objective.stage_steps=null",
                        "objective.q=256"), "features"),
    # the legacy-recipe feature network (before issue 12) against the reference recipe's `features`
    "mfd-legacy": (MAIN_DISTANCES["mfd"], "features-legacy"),
}
#: Extra feature networks of the ablations: folder -> (steps, overrides).
FEATURE_VARIANTS = {"features-geo": (1000, ("features.subset=geo",)), "features-4k": (4000, ()),
                    "features-wide": (1000, ("features.width=64",)),
                    "features-degrade": (1000, ("features.subset=degrade",)),
                    "features-legacy": (1000, ("features.recipe=legacy",))}


def main_arms(budget: Budget) -> list[Arm]:
    distances = budget.arms or MAIN_DISTANCES
    return [Arm(name, b, tuple(distances[name])) for name in distances for b in budget.batches]


def parse_arms(text: str) -> dict[str, list[str]]:
    """`NAME=override,override;NAME=...` -> {NAME: [override, ...]} (commas inside [...] stay)."""
    parts = [part for part in text.split(";") if part.strip()]
    bad = [part for part in parts if "=" not in part]
    if bad or not parts:
        raise UsageError(f"--arms {text!r}: write NAME=override,override;NAME=... (e.g. 'l2=distance.name=l2')")
    pairs = [part.split("=", 1) for part in parts]
    return {name.strip(): re.split(r",(?![^\[]*\])", overrides) for name, overrides in pairs}


# ---------------------------------------------------------------- jobs (run in worker processes)
DEVICE = "cpu"  # where a worker trains and evaluates (set by `_worker_init` from --device)


def _worker_init(device: str = "cpu") -> None:
    import warnings

    import torch

    global DEVICE
    DEVICE = device
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")


def _common(run_dir: Path, steps: int) -> list[str]:
    return [f"train.run_dir={run_dir}", f"train.steps={steps}", "log.progress=false", "log.tensorboard=false",
            f"train.checkpoint_every={steps}", "train.keep_checkpoints=1", f"train.device={DEVICE}"]


def _finished(run_dir: Path, steps: int) -> bool:
    from ayt.checkpoint import find_latest, load_checkpoint

    latest = find_latest(run_dir) if run_dir.is_dir() else None
    return latest is not None and load_checkpoint(latest).step >= steps


def _failed_marker(run_dir: str | Path) -> Path:
    """`RUN.failed`, written when an init fails, so that the arms waiting for it stop waiting."""
    return Path(f"{run_dir}.failed")


def _has_checkpoint(run_dir: Path) -> bool:
    from ayt.checkpoint import find_latest

    return run_dir.is_dir() and find_latest(run_dir) is not None


def run_init(kind: str, dataset: str, run_dir: str, steps: int, extra: tuple[str, ...] = ()) -> dict:
    """Train (or reuse) the EDM initialisation or a feature network; returns its cost (and, with
    `eval.every` among `extra`, the EDM model's metric curve, scored as the arms are)."""
    from ayt.checkpoint import load_checkpoint
    from ayt.config import load_config

    run = Path(run_dir)
    preset = ROOT / "configs" / f"{dataset}-{'edm' if kind == 'edm' else 'features'}.yaml"
    start = time.perf_counter()
    try:
        config = load_config(preset, [*_common(run, steps), "train.sample_every=0", *extra])
        if not _finished(run, steps):
            if kind == "edm":
                from ayt.train import train

                evaluator = _timed_evaluator(config) if config.eval.every else None
                train(config, resume=_has_checkpoint(run), evaluator=evaluator)
            else:
                from ayt.train import train_features

                train_features(config, resume=_has_checkpoint(run))
    except Exception:
        _failed_marker(run).parent.mkdir(parents=True, exist_ok=True)
        _failed_marker(run).write_text(traceback.format_exc())
        raise
    state = load_checkpoint(run).state
    out = {"kind": kind, "dataset": dataset, "run_dir": str(run), "steps": state["step"],
           "batch": config.train.batch_size, "images": state["images_seen"], "wall_s": state["wall_s"],
           "session_s": time.perf_counter() - start}
    if kind == "features":
        out["heldout"] = state.get("heldout")
    elif state.get("metrics"):
        out["curve"] = state["metrics"]
    return out


def _timed_evaluator(config):
    """The dataset's metric on the EMA model (as the trainer's own evaluator) plus `eval_s`.

    On digits the curve scores FD-digits only: KID (100 subsets in numpy) costs more than the
    sampling and the FD together; it is measured at the end by `run_noise`.
    """
    import dataclasses

    from ayt.build import build_data
    from ayt.config import HEUN_STEPS
    from ayt.metrics.evaluate import FeatureScorer, _score_model, build_scorer

    dataset, ec = build_data(config), config.eval
    scorer = build_scorer(config, ec.metric, image_shape=(dataset.channels, dataset.resolution), dataset=dataset,
                          device=DEVICE, seed=config.train.seed)
    if isinstance(scorer, FeatureScorer):
        scorer = dataclasses.replace(scorer, reference=dataclasses.replace(scorer.reference, features=None))

    def evaluator(net, step):
        start = time.perf_counter()
        metrics = _score_model(net, config, scorer, num_samples=ec.num_samples, sigmas=ec.sigmas,
                               seed=config.train.seed, device=DEVICE, batch=256, heun_steps=HEUN_STEPS,
                               denoise_sigmas=[], dataset=dataset)
        return {**metrics, "eval_s": time.perf_counter() - start}

    return evaluator


def run_arm(dataset: str, arm: Arm, seed: int, run_dir: str, init_dir: str, features_dir: str,
            eval_steps: list[int], num_samples: int, ema_decay: float, init_steps: int = 0) -> dict:
    """Tune the cached EDM model with one arm, in segments ending at `eval_steps`; returns the curve.
    Waits until the EDM model has `init_steps` steps (and MFD's feature network a checkpoint)."""
    from ayt.checkpoint import load_checkpoint
    from ayt.config import load_config

    run, total = Path(run_dir), eval_steps[-1]
    done_file = run / "bench_done.json"
    if done_file.is_file():
        return json.loads(done_file.read_text())
    needed = [(init_dir, init_steps), *([(features_dir, 0)] if "distance.name=mfd" in arm.overrides else [])]
    while not all(_finished(Path(d), n) for d, n in needed):  # trained by an earlier job of the same pool
        failed = [d for d, _ in needed if _failed_marker(d).is_file()]
        if failed:
            raise RuntimeError(f"not tuned: {failed[0]} failed to train")
        time.sleep(5)
    preset = ROOT / "configs" / f"{dataset}-ect.yaml"
    overrides = [*_common(run, total), f"train.batch_size={arm.batch}", f"train.seed={seed}",
                 f"objective.init={init_dir}", f"objective.stage_steps={max(1, total // 4)}",
                 f"distance.features={features_dir}", "train.sample_every=0",
                 f"eval.num_samples={num_samples}", f"train.ema_decays=[{ema_decay}]",
                 f"optim.lr={BENCH_LR}", *(o.replace("{edm}", init_dir) for o in arm.overrides)]
    start = time.perf_counter()
    evaluator = None
    for k in eval_steps:
        if _finished(run, k):
            continue
        # eval.every=k: the trainer scores a run at its end only if it is at least eval.every steps long
        config = load_config(preset, [*overrides, f"train.steps={k}", f"train.checkpoint_every={k}", f"eval.every={k}"])
        evaluator = evaluator or _timed_evaluator(config)
        from ayt.train import train

        train(config, resume=_has_checkpoint(run), evaluator=evaluator)
    state = load_checkpoint(run).state
    result = {"dataset": dataset, "arm": arm.name, "batch": arm.batch, "seed": seed, "run_dir": str(run),
              "steps": state["step"], "images": state["images_seen"], "wall_s": state["wall_s"],
              "curve": state["metrics"], "session_s": time.perf_counter() - start}
    done_file.write_text(json.dumps(result, indent=1))
    return result


def run_noise(dataset: str, run_dirs: list[str], runs: int, num_samples: int, seed: int = 1000) -> dict:
    """Score the final EMA of each run with `runs` evaluation seeds: the metric's own noise."""
    from ayt.build import load_model
    from ayt.metrics.evaluate import evaluate_runs

    out = {}
    for run_dir in run_dirs:
        net, config = load_model(run_dir)
        start = time.perf_counter()
        summary = evaluate_runs(net, config, runs=runs, num_samples=num_samples, seed=seed, device=DEVICE)
        out[run_dir] = {"seconds": time.perf_counter() - start, **summary}
    return {"dataset": dataset, "num_samples": num_samples, "runs": runs, "results": out}


def lpips_status() -> str | None:
    """None when LPIPS can be built here, else the reason it cannot."""
    try:
        from ayt.losses.distances import build_distance

        build_distance("lpips", net="vgg", upsample=False, weights=None)
        return None
    except Exception as err:  # noqa: BLE001 -- AytError (weights missing offline) or a missing package
        return str(err).splitlines()[0]


# ---------------------------------------------------------------- orchestration
class Runner:
    """Submits jobs to a process pool (1 torch thread each, all on `device`) and logs start / end lines."""

    def __init__(self, workers: int, deadline: float | None, device: str = "cpu"):
        self.pool = ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn"), initializer=_worker_init,
                                        initargs=(device,))
        self.deadline = deadline
        self.t0 = time.perf_counter()

    def log(self, text: str) -> None:
        print(f"[{time.perf_counter() - self.t0:7.0f}s] {text}", flush=True)

    def map(self, jobs: list[tuple[str, object, tuple]]) -> dict[str, object]:
        """Run `(name, fn, args)` jobs; returns name -> result (or None where skipped / failed)."""
        futures, results = {}, {}
        for _, _, args in (job for job in jobs if job[1] is run_init):
            _failed_marker(args[2]).unlink(missing_ok=True)  # from an earlier session
        for name, fn, args in jobs:
            futures[self.pool.submit(_guarded, name, fn, args, self.deadline)] = name
        for future in as_completed(futures):
            name = futures[future]
            status, value, seconds = future.result()
            results[name] = value if status == "ok" else None
            self.log(f"{status:7s} {name} ({seconds:.0f} s){'' if status == 'ok' else ': ' + str(value)}")
        return results

    def close(self) -> None:
        self.pool.shutdown()


def _guarded(name: str, fn, args: tuple, deadline: float | None):
    if deadline is not None and time.time() > deadline:
        return "skipped", "past the deadline", 0.0
    start = time.perf_counter()
    try:
        return "ok", fn(*args), time.perf_counter() - start
    except Exception:  # noqa: BLE001 -- one failed run must not stop the others; it is reported
        return "failed", traceback.format_exc(limit=3).strip().splitlines()[-1], time.perf_counter() - start


def _seeds_first(budget: Budget, arms: list[Arm]) -> list[tuple[int, str, Arm]]:
    """Job order: seed by seed (so a deadline cuts whole seeds), costly arms first within a seed."""
    order = []
    for seed in budget.seeds:
        for dataset in budget.datasets:
            for arm in sorted(arms, key=lambda a: -a.batch):
                order.append((seed, dataset, arm))
    return order


def run_benchmark(budget: Budget, out: Path, workers: int, deadline: float | None, init_root: Path | None = None,
                  device: str = "cpu") -> dict:
    """Train the cached inits, every arm x seed, then measure the metric noise; returns all results."""
    runner = Runner(workers, deadline, device)
    start = time.perf_counter()
    runner.log(f"convergence benchmark '{budget.name}': {asdict(budget)} -> {out}")
    lpips = lpips_status()
    runner.log("LPIPS arm: " + ("available but not part of this budget" if lpips is None else f"skipped ({lpips})"))
    init_jobs, init_root = [], init_root or out
    for ds in budget.datasets:
        every = budget.edm_steps[ds] // budget.edm_evals if budget.edm_evals else 0
        evals = (f"eval.every={every}", f"eval.num_samples={budget.num_samples[ds]}") if every else ()
        init_jobs.append((f"{ds}/edm", run_init, ("edm", ds, str(init_root / ds / "edm"), budget.edm_steps[ds], evals)))
        init_jobs.append((f"{ds}/features", run_init, ("features", ds, str(init_root / ds / "features"), budget.feature_steps[ds])))
    init_jobs.sort(key=lambda j: j[0].endswith("features"))
    arm_jobs = []
    for seed, ds, arm in _seeds_first(budget, main_arms(budget)):
        args = (ds, arm, seed, str(out / ds / f"{arm.folder}-s{seed}"), str(init_root / ds / "edm"),
                str(init_root / ds / arm.features), budget.eval_steps, budget.num_samples[ds], budget.ema_decay,
                budget.edm_steps[ds])
        arm_jobs.append((f"{ds}/{arm.folder}-s{seed}", run_arm, args))
    done = runner.map(init_jobs + arm_jobs)  # a dataset's arms start as soon as its inits are trained (run_arm waits)
    inits, arms = ({name: done[name] for name, _, _ in jobs} for jobs in (init_jobs, arm_jobs))
    noise_jobs = []
    for ds in budget.datasets if budget.noise_seeds else []:
        dirs = [str(out / ds / f"{name}-b64-s{budget.seeds[0]}") for name in budget.arms or MAIN_DISTANCES]
        dirs = [d for d in dirs if (Path(d) / "bench_done.json").is_file()]
        if dirs:
            noise_jobs.append((f"{ds}/noise", run_noise, (ds, dirs, budget.noise_seeds, budget.num_samples[ds])))
    noise = runner.map(noise_jobs)
    runner.close()
    total = time.perf_counter() - start
    runner.log(f"done in {total:.0f} s")
    return {"budget": asdict(budget), "workers": workers, "device": device, "lpips_skipped": lpips, "inits": inits, "arms": arms,
            "noise": noise, "total_wall_s": total}


def run_ablations(out: Path, workers: int, budget: Budget, names: list[str], batch: int,
                  seeds: tuple[int, ...] = (0,), ds: str = "shapes", init_root: Path | None = None,
                  device: str = "cpu") -> dict:
    """Small ablations on one dataset (seed 0 unless told): each named variant (plus its feature net if needed)."""
    runner = Runner(workers, None, device)
    inits = init_root or out  # --long reuses the main benchmark's EDM model and feature networks
    variants = sorted({ABLATIONS[n][1] for n in names} & set(FEATURE_VARIANTS))
    jobs = [(f"{ds}/{v}", run_init, ("features", ds, str(inits / ds / v), *FEATURE_VARIANTS[v])) for v in variants]
    for name in sorted(names, key=lambda n: ABLATIONS[n][1] in FEATURE_VARIANTS):  # those needing a new phi last
        overrides, feats = ABLATIONS[name]
        arm = Arm(name, batch, overrides, feats)
        for seed in seeds:
            args = (ds, arm, seed, str(out / ds / "ablations" / f"{arm.folder}-s{seed}"), str(inits / ds / "edm"),
                    str(inits / ds / feats), budget.eval_steps, budget.num_samples[ds], budget.ema_decay)
            jobs.append((f"{ds}/ablation/{arm.folder}" + (f"-s{seed}" if seed else ""), run_arm, args))
    results = runner.map(jobs)
    runner.close()
    return results


# ---------------------------------------------------------------- analysis
def _better(a: float, b: float, key: str) -> bool:
    """Whether value `a` is at least as good as `b` for metric `key`."""
    return a >= b if key in HIGHER_IS_BETTER else a <= b


def _std(values: list[float]) -> float:
    if len(values) < 2:
        return 0.0
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def curves(results: dict, ds: str, arm: Arm) -> list[dict]:
    """The per-seed results of one arm on one dataset."""
    return [r for r in results["arms"].values() if r and r["dataset"] == ds and r["arm"] == arm.name and r["batch"] == arm.batch]


def mean_curve(runs: list[dict], key: str) -> tuple[list[int], list[float], list[float], list[float], list[float]]:
    """(steps, mean, min, max, mean train wall_s) over seeds at the evaluation steps all runs share."""
    steps = sorted(set.intersection(*[{m["step"] for m in r["curve"]} for r in runs]))
    mean, lo, hi, wall = [], [], [], []
    for s in steps:
        values = [next(m[key] for m in r["curve"] if m["step"] == s) for r in runs]
        walls = [next(m["wall_s"] for m in r["curve"] if m["step"] == s) for r in runs]
        mean.append(sum(values) / len(values))
        lo.append(min(values))
        hi.append(max(values))
        wall.append(sum(walls) / len(walls))
    return steps, mean, lo, hi, wall


def first_reach(steps: list[int], values: list[float], target: float, key: str) -> int | None:
    """The first evaluation step whose value is at least as good as `target` (None: never)."""
    return next((s for s, v in zip(steps, values) if _better(v, target, key)), None)


def crossing(steps: list[int], values: list[float], target: float, key: str) -> float | None:
    """The step where the curve first reaches `target`, linearly interpolated between evaluations."""
    reach = first_reach(steps, values, target, key)
    if reach is None:
        return None
    i = steps.index(reach)
    if i == 0 or values[i] == values[i - 1]:
        return float(reach)
    frac = (target - values[i - 1]) / (values[i] - values[i - 1])
    return steps[i - 1] + min(max(frac, 0.0), 1.0) * (steps[i] - steps[i - 1])


def _reach(runs: list[dict], key: str, target: float, total: int, base_wall: float) -> dict:
    """When the mean curve over seeds (and each seed's curve) first gets as good as `target`."""
    steps, mean, _, _, wall = mean_curve(runs, key)
    reach = first_reach(steps, mean, target, key)
    cross = crossing(steps, mean, target, key)
    return {
        "step": reach,
        "interp_step": cross,
        "interp_speedup": None if not cross else total / cross,
        "per_seed": [first_reach(*mean_curve([r], key)[:2], target, key) for r in runs],
        "speedup": None if reach is None else total / reach,
        "wall_s": None if reach is None else wall[steps.index(reach)],
        "wall_speedup": None if reach is None else base_wall / max(wall[steps.index(reach)], 1e-9),
    }


def _final(runs: list[dict], key: str) -> dict:
    values = [r["curve"][-1][key] for r in runs]
    return {"mean": sum(values) / len(values), "std": _std(values), "values": values}


def summarise(results: dict) -> dict:
    """Per dataset and metric: final values per arm, steps to the baseline's final value, the two claims."""
    budget = results["budget"]
    total = budget["ect_steps"]
    base_label = f"{BASELINE[0]} b{BASELINE[1]}"
    summary = {}
    for ds in budget["datasets"]:
        keys = [PRIMARY[ds], *SECONDARY[ds]]
        rows = {}
        for arm in main_arms(Budget(**budget)):
            runs = curves(results, ds, arm)
            if runs:
                rows[arm.label] = {"runs": runs, "seeds": len(runs), "steps": runs[0]["steps"], "images": runs[0]["images"],
                                   "wall_s": sum(r["wall_s"] for r in runs) / len(runs),
                                   "eval_s": sum(sum(m.get("eval_s", 0.0) for m in r["curve"]) for r in runs) / len(runs),
                                   "final": {k: _final(runs, k) for k in keys}}
        if base_label not in rows:
            continue
        base = rows[base_label]
        targets = {k: base["final"][k]["mean"] for k in keys}
        for row in rows.values():
            row["reach"] = {k: _reach(row["runs"], k, targets[k], total, base["wall_s"]) for k in keys}
        claims = {}
        first_eval = min(m["step"] for m in results["arms"][next(iter(k for k, v in results["arms"].items() if v))]["curve"])
        for k in keys:
            if "mfd b64" in rows:
                step = rows["mfd b64"]["reach"][k]["step"]
                # If the baseline itself is as good at its first evaluation as at its end, the metric
                # does not measure progress of the tuning and "reaching" it says nothing.
                flat = base["reach"][k]["step"] == first_eval
                claims[f"10x/{k}"] = {"pass": None if flat else (step is not None and step <= total / 10),
                                      "reach_step": step, "interp_step": rows["mfd b64"]["reach"][k]["interp_step"],
                                      "limit": total / 10}
            if "mfd b8" in rows:
                a, b = rows["mfd b8"]["final"][k], base["final"][k]
                claims[f"batch8/{k}"] = {"pass": _better(a["mean"], b["mean"], k), "mfd_b8": a, "ph_b64": b}
        for row in rows.values():
            row.pop("runs")
        summary[ds] = {"keys": keys, "targets": targets, "rows": rows, "claims": claims}
    return summary


# ---------------------------------------------------------------- plots
def plot(results: dict, ds: str, path: Path) -> Path:
    """Rows: metrics; columns: vs steps, vs training seconds. Mean line and min/max band over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    keys = [PRIMARY[ds], *SECONDARY[ds]]
    fig, axes = plt.subplots(len(keys), 2, figsize=(10, 3.2 * len(keys)), squeeze=False)
    colours = {"pseudo_huber b64": "tab:blue", "pseudo_huber b8": "tab:cyan", "mfd b64": "tab:red", "mfd b8": "tab:orange"}
    for arm in main_arms(Budget(**results["budget"])):
        runs = curves(results, ds, arm)
        if not runs:
            continue
        for row, key in enumerate(keys):
            steps, mean, lo, hi, wall = mean_curve(runs, key)
            for col, x in enumerate((steps, wall)):
                ax = axes[row][col]
                style = "-" if arm.batch == 64 else "--"
                ax.plot(x, mean, style, color=colours.get(arm.label), label=f"{arm.label} ({len(runs)} seeds)", marker=".")
                ax.fill_between(x, lo, hi, color=colours.get(arm.label), alpha=0.15)
                ax.set_xscale("log")
                ax.xaxis.set_minor_formatter(NullFormatter())  # minor labels (2x10^1, ...) overlap
                if key.startswith("fd"):
                    ax.set_yscale("log")
                ax.set_ylabel(key + (" (higher is better)" if key in HIGHER_IS_BETTER else ""))
                ax.set_xlabel("ECT steps" if col == 0 else "training wall-clock (s, 1 thread)")
                ax.grid(alpha=0.3, which="both")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"ECT tuning on {ds}: pseudo-Huber vs aligned MFD (EMA, 1-step samples)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=70)
    plt.close(fig)
    return path


# ---------------------------------------------------------------- markdown
def _fmt(x: float | None, digits: int = 4) -> str:
    return "-" if x is None else f"{x:.{digits}g}"


def _pm(stats: dict) -> str:
    return f"{stats['mean']:.4g} ± {stats['std']:.2g}"


def dataset_table(ds: str, s: dict, total: int) -> str:
    """Final values (mean ± std over seeds) and, per metric, the first step reaching pH b64's final value."""
    from common import markdown_table

    keys = s["keys"]
    header = ["arm", "seeds", *[f"final {k}" for k in keys],
              *[f"reaches pH b64 final {k} ({_fmt(s['targets'][k])}): eval step (≈ interpolated, speed-up)" for k in keys],
              "train s / run", "images / run"]
    rows = []
    for label, r in s["rows"].items():
        reach = []
        for k in keys:
            x = r["reach"][k]
            seeds = ", ".join("-" if v is None else str(v) for v in x["per_seed"])
            reach.append("not reached" + (f" (seeds: {seeds})" if r["seeds"] > 1 else "") if x["step"] is None else
                         f"{x['step']} (≈{x['interp_step']:.0f}, {x['interp_speedup']:.2g}x; seeds: {seeds})")
        rows.append([f"**{label}**" if label.startswith("mfd") else label, r["seeds"],
                     *[_pm(r["final"][k]) for k in keys], *reach, f"{r['wall_s']:.0f}", r["images"]])
    return markdown_table(header, rows)


def claims_text(ds: str, s: dict, total: int) -> list[str]:
    """One verdict line per claim and metric."""
    lines = []
    for k in s["keys"]:
        c = s["claims"].get(f"10x/{k}")
        if c:
            where = "never" if c["reach_step"] is None else f"first at eval step {c['reach_step']} (interpolated {c['interp_step']:.0f})"
            verdict = ("n/a: pseudo-Huber b64 is already at its final value at the first evaluation, so this metric "
                       "does not track the tuning's progress here" if c["pass"] is None else
                       "holds" if c["pass"] else "does not hold")
            lines.append(f"- 10x claim, {ds}, {k}: MFD b64 reaches pseudo-Huber b64's final value ({_fmt(s['targets'][k])}) "
                         f"{where}; needed: step ≤ {c['limit']:.0f} of {total}: **{verdict}**.")
        c = s["claims"].get(f"batch8/{k}")
        if c:
            lines.append(f"- 1/8-batch claim, {ds}, {k}: MFD b8 ends at {_pm(c['mfd_b8'])} vs pseudo-Huber b64 "
                         f"{_pm(c['ph_b64'])}: **{'holds' if c['pass'] else 'does not hold'}**.")
    return lines


def ablation_table(paths: list[Path], results: dict, summary: dict, ds: str = "shapes") -> list[str]:
    """One dataset: each ablation next to the main arms' seed-0 runs, same targets as above."""
    from common import markdown_table

    saved = {k: v for p in paths if p.is_file() for k, v in json.loads(p.read_text()).items()}
    ablations = [v for v in saved.values() if "arm" in v and v["dataset"] == ds]
    if not ablations or ds not in summary:
        return []
    feature_nets = [v for v in saved.values() if v.get("kind") == "features" and v["dataset"] == ds]
    s, total = summary[ds], results["budget"]["ect_steps"]
    main = [r for r in results["arms"].values() if r and r["dataset"] == ds and r["seed"] == 0]
    rows = []
    for r in sorted(main, key=lambda r: (-r["batch"], r["arm"])) + sorted(ablations, key=lambda r: (-r["batch"], r.get("seed", 0))):
        cells = [f"{r['arm']} b{r['batch']}" + (f" s{r['seed']}" if r.get("seed") else "")
                 + (" (ablation)" if r in ablations else "")]
        cells += [_fmt(r["curve"][-1][k]) for k in s["keys"]]
        for k in s["keys"]:
            steps, values = mean_curve([r], k)[:2]
            cross = crossing(steps, values, s["targets"][k], k)
            cells.append("not reached" if cross is None else f"≈{cross:.0f} ({total / cross:.2g}x)")
        rows.append(cells)
    groups: dict[tuple[str, int], list[dict]] = {}
    for r in ablations:
        groups.setdefault((r["arm"], r["batch"]), []).append(r)
    for (arm, batch), runs in sorted(groups.items(), key=lambda kv: (-kv[0][1], kv[0][0])):
        if len(runs) < 2:
            continue
        cells = [f"**{arm} b{batch}, mean of {len(runs)} seeds** (ablation)"]
        cells += [_fmt(mean_curve(runs, k)[1][-1]) for k in s["keys"]]
        for k in s["keys"]:
            steps, values = mean_curve(runs, k)[:2]
            cross = crossing(steps, values, s["targets"][k], k)
            cells.append("not reached" if cross is None else f"≈{cross:.0f} ({total / cross:.2g}x)")
        rows.append(cells)
    header = [f"run ({ds}, seed 0 unless marked s1, s2)", *[f"final {k}" for k in s["keys"]], *[f"reaches {k} {_fmt(s['targets'][k])} at" for k in s["keys"]]]
    out = [markdown_table(header, rows)]
    for f in feature_nets:
        groups = ", ".join(f"{g} {v['ratio']:.2f}" for g, v in (f.get("heldout") or {}).get("groups", {}).items() if v.get("ratio") is not None)
        out += ["", f"Feature network `{Path(f['run_dir']).name}`: {f['steps']} steps, held-out MSE ratio {groups}."]
    return out


def late_stability(paths: list[Path], results: dict, ds: str) -> list[str]:
    """Does any arm get worse over the last ECT stage? Per arm (main and ablations), the change of each
    metric from the second-to-last to the last evaluation (mean over seeds) and how many seeds got worse."""
    from common import markdown_table

    saved = {k: v for p in paths if p.is_file() for k, v in json.loads(p.read_text()).items()}
    runs = [r for r in [*results["arms"].values(), *saved.values()] if r and "arm" in r and r["dataset"] == ds]
    keys = [PRIMARY[ds], *SECONDARY[ds]]
    groups: dict[tuple[str, int], list[dict]] = {}
    for r in runs:
        groups.setdefault((r["arm"], r["batch"]), []).append(r)
    rows = []
    for (arm, batch), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], -kv[0][1])):
        a, b = rs[0]["curve"][-2]["step"], rs[0]["curve"][-1]["step"]
        cells = [f"{arm} b{batch}", str(len(rs)), f"{a} -> {b}"]
        for k in keys:
            deltas = [r["curve"][-1][k] - r["curve"][-2][k] for r in rs]
            worse = sum(not _better(r["curve"][-1][k], r["curve"][-2][k], k) for r in rs)
            cells.append(f"{sum(deltas) / len(deltas):+.3g} ({worse} worse)")
        rows.append(cells)
    header = ["arm", "seeds", "evaluations", *[f"change of {k} over the last stage" for k in keys]]
    return [f"Late stability, {ds}: change over the last evaluation interval (it contains the whole last ECT stage; "
            "'worse' counts the seeds that ended worse than they were at its start):", "", markdown_table(header, rows), ""]


LR_FACTORS = {"": 1, "-lr3x": 3, "-lr10x": 10, "-lr30x": 30}


def lr_sweep(paths: list[Path], results: dict, summary: dict, ds: str) -> list[str]:
    """Learning-rate sweep from the `-lrNx` ablations: each distance at each rate (seeds with 3 runs only),
    then each distance at its best rate against the other's best (speed-up, and batch 8 against batch 64)."""
    from common import markdown_table

    saved = {k: v for p in paths if p.is_file() for k, v in json.loads(p.read_text()).items()}
    runs = [r for r in [*results["arms"].values(), *saved.values()] if r and "arm" in r and r["dataset"] == ds]
    s, total = summary[ds], results["budget"]["ect_steps"]
    key = s["keys"][-1] if ds == "shapes" else s["keys"][0]  # shapes: coverage; digits: fd_digits
    keys = s["keys"]
    groups: dict[tuple[str, int, int], list[dict]] = {}
    for r in runs:
        for suffix, factor in LR_FACTORS.items():
            for dist in MAIN_DISTANCES:
                if r["arm"] == dist + suffix:
                    groups.setdefault((dist, r["batch"], factor), []).append(r)
    groups = {g: rs for g, rs in groups.items() if len({r["seed"] for r in rs}) >= 3}
    if not any(f > 1 for _, _, f in groups):
        return []
    final = {g: {k: mean_curve(rs, k)[1][-1] for k in keys} for g, rs in groups.items()}
    header = ["distance", "batch", "lr", *[f"final {k} (mean of 3 seeds)" for k in keys]]
    rows = [[d, str(b), f"{2e-4 * f:.0e} ({f}x)", *[_fmt(final[(d, b, f)][k]) for k in keys]]
            for d, b, f in sorted(groups, key=lambda g: (-g[1], g[0], g[2]))]
    out = [f"Learning-rate sweep, {ds} (`-lr3x`, `-lr10x`, `-lr30x` ablations; 1x = the main arms):", "",
           markdown_table(header, rows), ""]
    def best(dist: str, batch: int) -> tuple[str, int, int] | None:
        mine = [g for g in groups if g[0] == dist and g[1] == batch]
        if not mine:
            return None
        top = mine[0]
        for g in mine[1:]:
            if _better(final[g][key], final[top][key], key):
                top = g
        return top

    ph, mfd, mfd8 = best("pseudo_huber", 64), best("mfd", 64), best("mfd", 8)
    if ph and mfd:
        lines = [f"Each distance at its best rate by final {key}: pseudo-Huber {ph[2]}x, MFD {mfd[2]}x (batch 64)."]
        for k in keys:
            target = final[ph][k]
            steps, values = mean_curve(groups[mfd], k)[:2]
            cross = crossing(steps, values, target, k)
            got = "not reached" if cross is None else f"at ≈{cross:.0f} of {total} steps ({total / cross:.2g}x)"
            if cross is not None and cross <= steps[0]:
                got = "at the first evaluation: n/a, this metric does not track the tuning's progress (see above)"
            lines.append(f"- {k}: MFD b64 at {mfd[2]}x reaches pseudo-Huber b64's best final ({_fmt(target)}) {got}; "
                         f"MFD ends at {_fmt(final[mfd][k])}.")
        if mfd8:
            for k in keys:
                holds = _better(final[mfd8][k], final[ph][k], k)
                lines.append(f"- 1/8 batch, {k}: MFD b8 at its best rate ({mfd8[2]}x) ends at {_fmt(final[mfd8][k])} vs "
                             f"pseudo-Huber b64 at its best rate {_fmt(final[ph][k])}: **{'holds' if holds else 'does not hold'}**.")
        out += lines + [""]
    return out


def long_markdown(results: dict, results_dir: Path, target: Path | None) -> str:
    """The longer check (`--long`): tables and plots like the main ones, seed 0, batch 64."""
    summary = summarise(results)
    total = results["budget"]["ect_steps"]
    out = [f"### Longer budget: {total} steps, seed 0, batch 64 (`python benchmarks/convergence.py --long`)", "",
           (f"Same cached initialisations; gap halves every {total // 4} steps; EMA {results['budget']['ema_decay']}; "
            f"evaluated at steps {results['budget']['eval_steps']}. Wall-clock {results['total_wall_s'] / 60:.1f} min "
            "(1 worker, run beside the ablations)."), ""]
    for ds, s in summary.items():
        png = plot(results, ds, results_dir / f"convergence-long-{ds}.png")
        rel = os.path.relpath(png, (target or ROOT / "BENCHMARKS.md").resolve().parent)
        out += [f"#### {ds} ({total} steps)", "", dataset_table(ds, s, total), "", *claims_text(ds, s, total), "",
                "Paired final differences:", "", *paired_table(results, ds, s["keys"]), "",
                f"![{ds} long curves]({rel})", ""]
        table = ablation_table([results_dir / "convergence-long-ablations-b64.json"], results, summary, ds)
        if table:
            out += [f"Ablations at {total} steps (`python benchmarks/convergence.py --long --ablations NAMES`), "
                    "next to the seed-0 main arms:", "", *table, ""]
    return "\n".join(out)


def paired_table(results: dict, ds: str, keys: list[str]) -> list[str]:
    """Final-value differences within each seed (same data order and noise): MFD minus pseudo-Huber."""
    from common import markdown_table

    arms = {(r["arm"], r["batch"], r["seed"]): r["curve"][-1] for r in results["arms"].values() if r and r["dataset"] == ds}
    pairs = [("mfd", 64, "pseudo_huber", 64), ("mfd", 8, "pseudo_huber", 8), ("mfd", 8, "pseudo_huber", 64)]
    rows = []
    for a, ba, b, bb in pairs:
        for k in keys:
            seeds = [s for s in results["budget"]["seeds"] if (a, ba, s) in arms and (b, bb, s) in arms]
            diffs = [arms[(a, ba, s)][k] - arms[(b, bb, s)][k] for s in seeds]
            if not diffs:
                continue
            better = sum(_better(arms[(a, ba, s)][k], arms[(b, bb, s)][k], k) for s in seeds)
            rows.append([f"{a} b{ba} − {b} b{bb}", k, ", ".join(f"{d:+.3g}" for d in diffs),
                         f"{sum(diffs) / len(diffs):+.3g}", f"{better} of {len(diffs)}"])
    return [markdown_table(["pair (same seed)", "metric", "difference per seed", "mean", "MFD better in"], rows)] if rows else []


def noise_lines(results: dict) -> list[str]:
    lines = []
    for value in (results.get("noise") or {}).values():
        if not value:
            continue
        for run_dir, res in value["results"].items():
            parts = [f"{k} {v['mean']:.4g} (std {v['std']:.2g}, range {v['max'] - v['min']:.2g})"
                     for k, v in res.items() if isinstance(v, dict)]
            lines.append(f"- {value['dataset']}, `{Path(run_dir).name}` final EMA, {value['runs']} evaluation seeds x "
                         f"{value['num_samples']} samples: " + "; ".join(parts) + f" ({res['seconds']:.0f} s).")
    return lines


def init_lines(results: dict) -> list[str]:
    from common import markdown_table

    rows = []
    for name, r in (results.get("inits") or {}).items():
        if not r:
            continue
        held = ""
        if r.get("heldout"):
            held = ", ".join(f"{g} {v['ratio']:.2f}" for g, v in r["heldout"]["groups"].items() if v.get("ratio") is not None)
        rows.append([name, r["steps"], r["batch"], r["images"], f"{r['wall_s']:.0f}", held or "-"])
    return [markdown_table(["shared init", "steps", "batch", "images", "train s", "held-out MSE ratio (features; < 1 beats zeros)"], rows)]


def init_curve_lines(results: dict) -> list[str]:
    """Each EDM initialisation's metric curve (`Budget.edm_evals`) and, per metric, where it stopped improving."""
    from common import markdown_table

    out = []
    for name, r in (results.get("inits") or {}).items():
        if not r or not r.get("curve"):
            continue
        curve, keys = r["curve"], [PRIMARY[r["dataset"]], *SECONDARY[r["dataset"]]]
        rows = [[m["step"], *[_fmt(m[k]) for k in keys], f"{m['wall_s']:.0f}"] for m in curve]
        out += [f"Metric curve of `{name}` (EMA, Heun 18 steps, scored like the arms; ECT tunes its last checkpoint):", "",
                markdown_table(["step", *keys, "wall s (with the earlier evaluations)"], rows), ""]
        for k in keys:
            best = curve[0]
            for m in curve[1:]:
                best = m if not _better(best[k], m[k], k) else best
            end = ("still improving at the last evaluation" if best is curve[-1] else
                   f"no later evaluation improves on it (last: {_fmt(curve[-1][k])})")
            out.append(f"- {k}: best {_fmt(best[k])} at step {best['step']} of {r['steps']}; {end}.")
        out.append("")
    return out


def step_table(results: dict, ds: str, keys: list[str]) -> str:
    """Each arm's metrics at every evaluation step: mean ± std over seeds."""
    from common import markdown_table

    steps, rows = results["budget"]["eval_steps"], []
    for arm in main_arms(Budget(**results["budget"])):
        runs = curves(results, ds, arm)
        for k in keys if runs else []:
            values = [[m[k] for r in runs for m in r["curve"] if m["step"] == s] for s in steps]
            rows.append([arm.label, k, len(runs), *[_pm({"mean": sum(v) / len(v), "std": _std(v)}) if v else "-" for v in values]])
    return markdown_table(["arm", "metric", "seeds", *[f"step {s}" for s in steps]], rows)


def markdown(results: dict, summary: dict, plots: dict, command: str, notes: str | None,
             ablations: list[str] | None = None, extra: str | None = None) -> str:
    from common import machine_line

    budget = results["budget"]
    total = budget["ect_steps"]
    device = results.get("device", "cpu")
    out = [f"## Convergence{', near-convergence regime' if budget['name'] == 'near' else ''} (ECT vs ECT + AYT)", "",
           ("Tests method.md section 6 at CPU scale: *ECT + AYT reaches the baseline's final quality about 10x "
            "sooner* and *at 1/8 of the batch it matches the baseline*."), "",
           f"Command: `{command}`", "",
           machine_line(results["machine"]) if results.get("machine") else "Machine: not recorded with these results.", "",
           (f"Budget ({budget['name']}): every arm tunes the same cached EDM model for **{total} ECT steps** "
            f"(gap halves every {total // 4} steps, lr {BENCH_LR:g} for every arm, EMA {budget.get('ema_decay')}, preset `configs/<data>-ect.yaml` "
            "plus the distance), "
            f"seeds {budget['seeds']}, batches {budget['batches']}; the EMA model's 1-step samples are scored at steps "
            f"{budget['eval_steps']} with {budget['num_samples']} samples (fixed noise per seed). "
            f"{results['workers']} worker processes, 1 torch thread each"
            + ("; the machine was shared with other jobs, so " if device == "cpu" else f", all on one GPU ({device}); ")
            + f"wall-clock numbers are indicative. Total wall-clock {results['total_wall_s'] / 60:.1f} min."), ""]
    if results.get("lpips_skipped"):
        out += [f"LPIPS arm skipped: {results['lpips_skipped']}", ""]
    if notes:  # the findings first; the tables they refer to follow
        out += [notes.strip(), ""]
    out += ["### Shared initialisations (trained once, reused by every arm)", "", *init_lines(results), "",
            *init_curve_lines(results)]
    for ds, s in summary.items():
        out += [f"### {ds}", "", dataset_table(ds, s, total), "", *claims_text(ds, s, total), "",
                "Mean ± std over seeds at every evaluation step:", "", step_table(results, ds, s["keys"]), "",
                "Paired final differences (lower is better except coverage):", "", *paired_table(results, ds, s["keys"]), ""]
        if ds in plots:
            out += [f"![{ds} curves]({plots[ds]})", ""]
    noise = noise_lines(results)
    if noise:
        out += ["### Metric noise (one checkpoint, several evaluation seeds)", "", *noise, ""]
    out += [("How to read the tables: 'eval step k' is the first evaluation at which the mean curve over seeds is at "
             "least as good as pseudo-Huber b64's final mean; it crossed somewhere in (previous evaluation, k]; "
             "'≈' interpolates linearly between the two evaluations and the speed-up is steps budget / that step. "
             "'seeds' gives the same first step for each seed's own curve. 'train s' is training time only "
             "(evaluation excluded), 1 torch thread per run."), ""]
    if ablations:
        out += [("### Ablations (`python benchmarks/convergence.py --ablations NAMES [--ablation-batch 8] "
                 "[--ablation-seeds 0,1,2] [--ablation-data digits]`)"), "",
                f"Targets: pseudo-Huber b64's 3-seed final means above; same {total}-step budget, schedule and evaluation.", "",
                *ablations, ""]
    if extra:
        out += [extra.strip(), ""]
    return "\n".join(out)


# ---------------------------------------------------------------- command line
def _reexec_with_malloc_env() -> None:
    """glibc malloc tuning must be in the environment before Python starts (machine-notes.md)."""
    if all(os.environ.get(k) == v for k, v in MALLOC_ENV.items()):
        return
    os.environ.update(MALLOC_ENV)
    os.execv(sys.executable, [sys.executable, *sys.argv])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="small budgets (< 10 min): checks the whole pipeline")
    size.add_argument("--long", action="store_true", help="seed 0, batch 64, 3x the steps, reusing the full run's inits")
    size.add_argument("--near", action="store_true", help="near convergence: 10x longer EDM inits (metric curve), 4x the tuning")
    p.add_argument("--device", default="cpu", help="where every run trains and is evaluated: cpu, cuda or cuda:N")
    p.add_argument("--datasets", default=None, help="comma list, a subset of the budget's (shapes,digits)")
    p.add_argument("--arms", default=None, help="distances to compare, 'NAME=override,override;NAME=...' instead of "
                   "pseudo_huber and mfd (the baseline is the arm named pseudo_huber, the claims use mfd); use a new --out")
    p.add_argument("--budget-json", default=None, help="JSON object of Budget fields replacing the size's (tests, variants)")
    p.add_argument("--out", default=None, help="run folders (default runs/bench/convergence[-quick|-long|-near])")
    p.add_argument("--results", default=None, help="JSON + PNG folder (default benchmarks/results; quick: OUT/results)")
    p.add_argument("--workers", type=int, default=2, help="parallel runs, 1 torch thread each (cuda: all share the GPU)")
    p.add_argument("--deadline-min", type=float, default=None, help="start no new run after this many minutes")
    p.add_argument("--write", default=None, help="write the 'convergence[-quick|-long|-near]' section of this markdown file")
    p.add_argument("--notes", default=None, help="markdown appended to the section (findings, ablations), if it exists "
                   "(default benchmarks/results/convergence[-long|-near]-notes.md)")
    p.add_argument("--report-only", action="store_true", help="rebuild tables / plots from the saved JSON")
    p.add_argument("--ablations", default=None, help="comma list of ablations, seed 0 unless --ablation-seeds (" + ", ".join(ABLATIONS) + ")")
    p.add_argument("--ablation-batch", type=int, default=64)
    p.add_argument("--ablation-seeds", default="0", help="comma list of seeds for --ablations (default 0)")
    p.add_argument("--ablation-data", choices=["shapes", "digits"], default="shapes", help="dataset of --ablations")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    budget = QUICK if args.quick else LONG if args.long else NEAR if args.near else FULL
    try:
        extra = json.loads(args.budget_json or "{}")
        budget = replace(budget, **extra, **({"arms": parse_arms(args.arms)} if args.arms else {}),
                         **({"datasets": args.datasets.split(",")} if args.datasets else {}))
    except (ValueError, TypeError) as err:  # bad JSON, or a field Budget does not have
        raise UsageError(f"--budget-json {args.budget_json!r}: {str(err).splitlines()[0]}; give a JSON object of "
                         f"Budget fields ({', '.join(Budget.__dataclass_fields__)})") from None
    unknown = sorted(set(budget.datasets) - set(PRIMARY))
    if unknown:
        raise UsageError(f"--datasets: unknown {unknown}; choose from {', '.join(PRIMARY)}")
    if budget.arms and budget.name in ("full", "quick", "long", "near"):
        raise UsageError(f"--arms replaces the main arms: name the variant, e.g. --budget-json "
                         f"'{{\"name\": \"{budget.name}-variant\"}}', so that its results and section do not "
                         f"overwrite the {budget.name} budget's")
    _reexec_with_malloc_env()
    from ayt.runtime import check_device

    check_device(args.device, "--device")
    suffix = "" if budget.name == "full" else f"-{budget.name}"
    out = Path(args.out or ROOT / "runs" / "bench" / f"convergence{suffix}")
    init_root = ROOT / "runs" / "bench" / "convergence" if args.long else out
    results_dir = Path(args.results or (out / "results" if args.quick else ROOT / "benchmarks" / "results"))
    prefix = f"convergence{suffix}"
    defaults = vars(parse_args([]))  # the command records the options that change what is measured
    size = next((f"--{k}" for k in ("quick", "long", "near") if getattr(args, k)), None)
    command = " ".join(["python benchmarks/convergence.py", *([size] if size else []),
                        *(f"--{k.replace('_', '-')} {shlex.quote(str(v))}" for k, v in vars(args).items()
                          if k in ("device", "datasets", "arms", "budget_json", "workers", "out") and v != defaults[k])])
    if args.ablations:
        names = args.ablations.split(",")
        unknown = [n for n in names if n not in ABLATIONS]
        if unknown:
            raise UsageError(f"unknown ablation {unknown}; choose from {', '.join(ABLATIONS)}")
        seeds = tuple(int(v) for v in args.ablation_seeds.split(","))
        res = run_ablations(out, args.workers, budget, names, args.ablation_batch, seeds, args.ablation_data, init_root,
                            args.device)
        results_dir.mkdir(parents=True, exist_ok=True)
        path = results_dir / f"{prefix}-ablations-b{args.ablation_batch}.json"
        old = json.loads(path.read_text()) if path.is_file() else {}
        old.update({k: v for k, v in res.items() if v})
        path.write_text(json.dumps(old, indent=1))
        print(f"ablations -> {path}")
        return
    json_path = results_dir / f"{prefix}.json"
    if args.report_only:
        results = json.loads(json_path.read_text())
    else:
        deadline = None if args.deadline_min is None else time.time() + 60 * args.deadline_min
        from common import machine_info

        results = run_benchmark(budget, out, args.workers, deadline, init_root, args.device)
        results.update(machine=machine_info(), command=command)
        results_dir.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(results, indent=1))
    summary = summarise(results)
    (results_dir / f"{prefix}-summary.json").write_text(json.dumps(summary, indent=1))
    plots = {ds: plot(results, ds, results_dir / f"{prefix}-{ds}.png") for ds in summary}
    command = results.get("command", command) + (f" --write {Path(args.write).name}" if args.write else "")
    notes_path = Path(args.notes or results_dir / f"{prefix}-notes.md")
    notes = notes_path.read_text() if notes_path.is_file() and not args.quick else None
    target = Path(args.write) if args.write else None
    rel = {ds: os.path.relpath(p, (target or ROOT / "BENCHMARKS.md").resolve().parent) for ds, p in plots.items()}
    ablation_files = [results_dir / f"{prefix}-ablations-b{b}.json" for b in (64, 8)]
    ablations = []
    for ds in summary:
        table = ablation_table(ablation_files, results, summary, ds)
        ablations += [f"#### {ds}", "", *table, "", *lr_sweep(ablation_files, results, summary, ds)] if table else []
        ablations += late_stability(ablation_files, results, ds)
    long_path = results_dir / "convergence-long.json"
    extra = None
    if budget.name == "full" and long_path.is_file():
        extra = long_markdown(json.loads(long_path.read_text()), results_dir, target)
    text = markdown(results, summary, rel, command, notes, ablations, extra)
    print(text)
    if target:
        from common import write_section

        write_section(target, prefix, text)
        print(f"wrote the {prefix} section of {target}")


if __name__ == "__main__":
    run_main(main)
