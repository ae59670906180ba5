"""Training-step and sampling throughput of the ECT objective with each distance.

    python benchmarks/throughput.py [--quick] [--device cpu|cuda] [--presets tiny,cifar10-ddpmpp]
        [--batches 16,64 | tiny=16,64 cifar10-ddpmpp=8] [--repeats N] [--write BENCHMARKS.md]

What is timed (each configuration in a fresh child process, torch threads <= cores, glibc malloc
thresholds raised as in the Makefile):

- a full ECT training step, exactly as `ayt.train.Trainer` does one: `objective(net, x0).mean()`
  (the student forward, the no-grad target forward and the distance), `backward()`, the RAdam
  step and the EMA update. Inputs are random images in [-1, 1] (data loading is not timed).
  The distances of one (preset, batch, precision) are timed in one process in interleaved
  rounds (every round runs each distance once, in rotated order), so a load spike from another
  job hits all of them alike; the ratio to pseudo-Huber is the median of the per-round ratios;
- 1-step consistency sampling (`ayt.sampling.consistency_sample` at sigma_max = 80).

Feature networks have random weights: timing does not depend on weight values. LPIPS gets a
randomly initialised torchvision VGG16 trunk written to a temporary file for the same reason.
Peak memory: on CPU the peak RSS (VmHWM) of a separate process that builds just that
configuration and runs two steps; on CUDA `torch.cuda.max_memory_allocated` over the steps of
that distance, less the weights of the other distances resident in the same process.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    load_average,
    machine_info,
    machine_line,
    markdown_table,
    read_section,
    usable_cores,
    write_section,
)

PRESETS = {  # network preset -> (resolution, feature network, ECT dropout)
    "tiny": (16, "tiny_vgg", None),
    "cifar10-ddpmpp": (32, "vgg16_bn", 0.2),
}
DISTANCES = ("pseudo_huber", "mfd", "lpips", "lpips_aligned")
DISTANCE_LABELS = {
    "pseudo_huber": "pseudo-Huber (pixel)",
    "mfd": "MFD aligned (AYT)",
    "mfd_plain": "MFD plain",
    "lpips": "LPIPS plain",
    "lpips_aligned": "LPIPS aligned",
    "continuous": "continuous CT (pixel JVP)",
    "continuous_mfd": "continuous CT (MFD JVP)",
    "continuous_warmup": "continuous CT (pixel JVP) + tangent warm-up",
    "continuous_adaptive": "continuous CT (pixel JVP) + adaptive weighting",
    "continuous_fd": "continuous CT (pixel, finite-difference JVP)",
}
MFD_TARGETS = {"tiny": 1.25, "cifar10-ddpmpp": 1.10}  # MFD step time / pseudo-Huber step time
SAMPLING_TARGET = 1000.0  # images/s, 1-step sampling of the tiny preset on the CPU
TARGET_DIM = 15  # regression targets of the feature network (subset "all")
EMA_DECAY = 0.9999
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "1000000000", "MALLOC_TRIM_THRESHOLD_": "1000000000"}
PHASES = ("draw", "distance", "backward", "optimizer", "ema")
PHASE_LABELS = {
    "draw": "student + target forward",
    "distance": "distance (value, aligned gradient)",
    "backward": "backward",
    "optimizer": "RAdam",
    "ema": "EMA",
}

# Per device (and for --quick): training batches, sampling batches, (warm-up, timed) rounds.
DEFAULTS = {
    "cpu": {
        "batches": {"tiny": [16, 64], "cifar10-ddpmpp": [8]},
        "sample_batches": {"tiny": [256, 1024], "cifar10-ddpmpp": [64]},
        "train_rounds": {"tiny": (2, 15), "cifar10-ddpmpp": (2, 5)},
        "sample_rounds": {"tiny": (2, 10), "cifar10-ddpmpp": (1, 3)},
    },
    "cuda": {
        "batches": {"tiny": [16, 64], "cifar10-ddpmpp": [64, 128]},
        "sample_batches": {"tiny": [256, 1024], "cifar10-ddpmpp": [256, 1024]},
        "train_rounds": {"tiny": (5, 20), "cifar10-ddpmpp": (3, 10)},
        "sample_rounds": {"tiny": (5, 20), "cifar10-ddpmpp": (3, 10)},
    },
}
QUICK = {
    "cpu": {
        "batches": {"tiny": [16, 64], "cifar10-ddpmpp": [2]},
        "sample_batches": {"tiny": [256, 1024], "cifar10-ddpmpp": [8]},
        "train_rounds": {"tiny": (1, 5), "cifar10-ddpmpp": (1, 2)},
        "sample_rounds": {"tiny": (1, 5), "cifar10-ddpmpp": (1, 2)},
    },
    "cuda": {
        "batches": {"tiny": [64], "cifar10-ddpmpp": [128]},
        "sample_batches": {"tiny": [1024], "cifar10-ddpmpp": [1024]},
        "train_rounds": {"tiny": (3, 5), "cifar10-ddpmpp": (2, 5)},
        "sample_rounds": {"tiny": (3, 5), "cifar10-ddpmpp": (2, 5)},
    },
}


# ====================================================================== child side: measuring
def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def peak_rss_mib() -> float | None:
    """Peak resident set size (VmHWM) of this process in MiB; None where /proc is missing."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


class CpuUse:
    """Share of `threads` cores this process used since `start()`: well below 1 means other jobs took CPU."""

    def start(self) -> None:
        self.wall, self.cpu = time.perf_counter(), self._cpu()

    @staticmethod
    def _cpu() -> float:
        import resource

        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime

    def share(self, threads: int) -> float:
        return (self._cpu() - self.cpu) / max(1e-9, (time.perf_counter() - self.wall) * threads)


class Clock:
    """`perf_counter`; with `sync` (or `force`) it first waits for queued CUDA work."""

    def __init__(self, device, sync: bool) -> None:
        import torch

        self.cuda = device.type == "cuda"
        self.sync = sync
        self.torch = torch

    def __call__(self, force: bool = False) -> float:
        if self.cuda and (self.sync or force):
            self.torch.cuda.synchronize()
        return time.perf_counter()


def build_feature_net(preset: str, width: int):
    """The feature network of a preset, random weights (timing only)."""
    from ayt.features.nets import build_feature_net as build

    resolution, arch, _ = PRESETS[preset]
    return build(arch, in_channels=3, target_dim=TARGET_DIM, resolution=resolution, width=width)


def build_distance(name: str, preset: str, width: int, lpips_weights: str | None, shared: dict):
    """A distance module by benchmark name; one LPIPS module serves the plain and aligned arms."""
    from ayt.losses import Aligned, PseudoHuber
    from ayt.losses.mfd import MFD

    if name == "pseudo_huber":
        return PseudoHuber()
    if name in ("mfd", "mfd_plain"):
        mfd = MFD(net=build_feature_net(preset, width))
        return Aligned(mfd) if name == "mfd" else mfd
    if "lpips" not in shared:
        from ayt.losses.lpips import LPIPS

        shared["lpips"] = LPIPS("vgg", upsample=False, weights=lpips_weights)
    return Aligned(shared["lpips"]) if name == "lpips_aligned" else shared["lpips"]


# sCM's stabilisers on the pixel objective; the warm-up never ends here (r < 1 costs what r = 1 does)
CONTINUOUS_OPTIONS = {"continuous_warmup": {"warmup_steps": 10**9}, "continuous_adaptive": {"adaptive_weight": True},
                      "continuous_fd": {"jvp": "fd"}}


def continuous_objective(name: str, spec: dict):
    """Continuous-time consistency training (no teacher) with pixel or MFD tangents, or a stabiliser."""
    from ayt.losses.mfd import MFD
    from ayt.objectives import ContinuousObjective

    mfd = MFD(net=build_feature_net(spec["preset"], spec["tiny_width"])) if name == "continuous_mfd" else None
    return ContinuousObjective(mfd, **CONTINUOUS_OPTIONS.get(name, {}))


def build_net(spec: dict, device):
    """The preset's preconditioned U-Net on `device`, seeded."""
    import torch

    from ayt.nets import build_network

    resolution, _, dropout = PRESETS[spec["preset"]]
    torch.manual_seed(0)
    net = build_network(spec["preset"], img_resolution=resolution, in_channels=3, dropout=dropout)
    return net.to(device)


def maybe_compile(net, spec: dict):
    import torch

    # As the trainer: one graph per grad mode (seeded dropout traces without breaks), static shapes.
    return torch.compile(net, dynamic=False) if spec["compile"] else net


def autocast(spec: dict, device):
    import torch

    if spec["precision"] == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def random_images(batch: int, resolution: int, device):
    import torch

    generator = torch.Generator().manual_seed(0)
    return (torch.rand((batch, 3, resolution, resolution), generator=generator) * 2 - 1).to(device)


def tensor_bytes(module) -> dict[int, int]:
    """Storage pointer -> bytes of every parameter and buffer of `module`."""
    tensors = list(module.parameters()) + list(module.buffers())
    return {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}


class TrainArm:
    """One distance inside a training benchmark: its objective, times and peak memory."""

    def __init__(self, name: str, objective) -> None:
        self.name, self.objective = name, objective
        self.totals: list[float] = []
        self.phases: dict[str, list[float]] = {p: [] for p in PHASES}
        self.peak_bytes = 0


def train_step(arm: TrainArm, setup: tuple, x0, step: int, spec: dict, clock: Clock) -> list[float]:
    """One ECT step as in `ayt.train.Trainer.run`; returns the time marks around the phases."""
    from ayt.rng import StepRandom
    from ayt.train import update_ema

    net, model, ema, optimizer = setup
    marks = [clock(force=True)]
    optimizer.zero_grad(set_to_none=True)
    rng = StepRandom.for_step(0, step, 0, x0.device)
    with autocast(spec, x0.device):
        pair = arm.objective.draw(model, x0, None, step, rng)
        marks.append(clock())
        loss = arm.objective.loss(pair, step).mean()
    marks.append(clock())
    loss.backward()
    marks.append(clock())
    optimizer.step()
    marks.append(clock())
    update_ema(ema, net, EMA_DECAY)
    marks.append(clock(force=True))
    return marks


def prewarm_optimizer(net, optimizer, steps: int = 6) -> None:
    """Take RAdam past its first steps with zero gradients (no change to the weights).

    RAdam skips the adaptive (rectified) update while its `rho_t <= 5`, i.e. for about the first 5
    steps, and those steps are cheaper; a long training run spends all its time after them.
    """
    import torch

    for p in net.parameters():
        p.grad = torch.zeros_like(p)
    for _ in range(steps):
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def build_train(spec: dict, device) -> tuple[tuple, list[TrainArm]]:
    """(net, model, EMA, optimizer) and one arm per distance, all on `device`."""
    from ayt.config import OptimConfig
    from ayt.objectives import ECTObjective
    from ayt.runtime import make_optimizer
    from ayt.train import make_ema

    net = build_net(spec, device).train()
    setup = (net, maybe_compile(net, spec), make_ema(net), make_optimizer(OptimConfig(), net.parameters()))
    prewarm_optimizer(net, setup[3])
    shared: dict = {}
    arms = []
    for name in spec["distances"]:
        if name.startswith("continuous"):  # draw: JVP tangent + student forward; loss: the 1/t-weighted MSE
            arms.append(TrainArm(name, continuous_objective(name, spec).to(device)))
            continue
        distance = build_distance(name, spec["preset"], spec["tiny_width"], spec.get("lpips_weights"), shared)
        objective = ECTObjective(distance, q=256.0, stage_steps=None).to(device)  # the AYT reference stage
        arms.append(TrainArm(name, objective))
    return setup, arms


def other_static_bytes(arm: TrainArm, arms: list[TrainArm]) -> int:
    """Bytes of weights resident for the other arms only (subtracted from CUDA peaks)."""
    mine = tensor_bytes(arm.objective)
    others: dict[int, int] = {}
    for other in arms:
        others.update(tensor_bytes(other.objective))
    return sum(n for ptr, n in others.items() if ptr not in mine)


def timed_round(arms: list[TrainArm], setup: tuple, x0, step: int, round_: int, spec: dict, record: bool) -> int:
    """Each arm once (rotated order): its total time, and phases where they are measured."""
    import torch

    cuda = x0.device.type == "cuda"
    free, synced = Clock(x0.device, sync=False), Clock(x0.device, sync=True)
    shift = round_ % len(arms)
    for arm in arms[shift:] + arms[:shift]:
        if cuda:
            torch.cuda.reset_peak_memory_stats(x0.device)
        marks = train_step(arm, setup, x0, step, spec, free)  # on CPU every mark is exact
        step += 1
        if record:
            arm.totals.append(marks[-1] - marks[0])
            arm.peak_bytes = max(arm.peak_bytes, torch.cuda.max_memory_allocated(x0.device)) if cuda else 0
        if cuda and spec["phases"]:
            marks = train_step(arm, setup, x0, step, spec, synced)  # an extra step, synchronised per phase
            step += 1
        if record and (spec["phases"] or not cuda):
            for name, a, b in zip(PHASES, marks, marks[1:]):
                arm.phases[name].append(b - a)
    return step


def run_train(spec: dict) -> dict:
    """Interleaved rounds over the distances; per-step totals, phases and peaks."""
    import torch

    device = torch.device(spec["device"])
    setup, arms = build_train(spec, device)
    x0 = random_images(spec["batch"], PRESETS[spec["preset"]][0], device)
    rounds, step, usage = spec["warmup"] + spec["repeats"], 0, CpuUse()
    for round_ in range(rounds):
        warm = round_ < spec["warmup"]
        if round_ == spec["warmup"]:
            usage.start()
        log(f"[{spec['preset']} B{spec['batch']} {variant_name(spec)}] round {round_ + 1}/{rounds}{' (warm-up)' if warm else ''}")
        step = timed_round(arms, setup, x0, step, round_, spec, record=not warm)
    result = {"arms": {}, "rss_mib": peak_rss_mib(), "compile_stats": compile_stats(spec),
              "cpu_share": usage.share(spec["threads"])}
    for arm in arms:
        peak = arm.peak_bytes - other_static_bytes(arm, arms) if device.type == "cuda" else None
        result["arms"][arm.name] = {
            "totals": arm.totals,
            "phases": {k: v for k, v in arm.phases.items() if v},
            "peak_mib": peak / 2**20 if peak is not None else None,
        }
    return result


def run_memory(spec: dict) -> dict:
    """Peak RSS of a process holding one distance's training set-up after `warmup` + 1 steps."""
    import torch

    device = torch.device(spec["device"])
    setup, arms = build_train(spec, device)
    x0 = random_images(spec["batch"], PRESETS[spec["preset"]][0], device)
    for step in range(spec["warmup"] + 1):
        train_step(arms[0], setup, x0, step, spec, Clock(device, sync=True))
    return {"rss_mib": peak_rss_mib()}


def run_sample(spec: dict) -> dict:
    """Time 1-step consistency sampling at each batch size of `spec['batches']`."""
    import torch

    from ayt.sampling import consistency_sample

    device = torch.device(spec["device"])
    net = build_net(spec, device).eval().requires_grad_(False)
    model, clock, out = maybe_compile(net, spec), Clock(device, sync=True), {}
    usage = CpuUse()
    usage.start()
    for batch in spec["batches"]:
        z = torch.randn((batch, 3, *[PRESETS[spec["preset"]][0]] * 2), generator=torch.Generator().manual_seed(0))
        z = z.to(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times = []
        log(f"[{spec['preset']} sampling B{batch} {variant_name(spec)}]")
        for i in range(spec["warmup"] + spec["repeats"]):
            start = clock(force=True)
            with autocast(spec, device):
                consistency_sample(model, z, (80.0,))
            if i >= spec["warmup"]:
                times.append(clock(force=True) - start)
        peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
        out[str(batch)] = {"times": times, "peak_mib": peak}
    return {"batches": out, "rss_mib": peak_rss_mib(), "compile_stats": compile_stats(spec),
            "cpu_share": usage.share(spec["threads"]), "gflop_per_image": forward_gflop(net, device),
            "matmul_gflops": matmul_gflops(spec, device)}


def forward_gflop(net, device) -> float:
    """GFLOP of one U-Net forward on one image (torch's FLOP counter: 2 per multiply-add)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros((1, net.img_channels, net.img_resolution, net.img_resolution), device=device)
    with FlopCounterMode(display=False) as flops, torch.no_grad():
        net(x, torch.full((1,), 80.0, device=device))
    return flops.get_total_flops() / 1e9


def matmul_gflops(spec: dict, device, repeats: int = 5) -> float:
    """A practical compute ceiling: GFLOP/s of an n x n matmul in the benchmark's precision (n = 2048 on CPU, 8192 on CUDA)."""
    import torch

    n = 8192 if device.type == "cuda" else 2048
    a = torch.randn((n, n), device=device)
    b = torch.randn((n, n), device=device)
    clock, times = Clock(device, sync=True), []
    for i in range(repeats + 1):
        start = clock(force=True)
        with autocast(spec, device):
            a @ b
        if i:
            times.append(clock(force=True) - start)
    return 2 * n**3 / statistics.median(times) / 1e9


def run_bare(spec: dict) -> dict:
    """Peak RSS of a process that only imports torch and ayt (the baseline of the RSS column)."""
    import torch  # noqa: F401

    import ayt  # noqa: F401

    return {"rss_mib": peak_rss_mib()}


def compile_stats(spec: dict) -> dict | None:
    """Dynamo's counters (graphs, graph breaks, recompiles) when the network was compiled."""
    if not spec["compile"]:
        return None
    from torch._dynamo.utils import counters

    return {k: {str(n): c for n, c in v.items()} for k, v in counters.items() if k in ("stats", "graph_break") and v}


# ---------------------------------------------------------------------- profiling (--profile)
class PhiTimer:
    """Forward-hook timer of a feature network: time of its forwards with and without gradient."""

    def __init__(self, feature_net, clock: Clock) -> None:
        self.clock, self.start = clock, 0.0
        self.times: dict[str, float] = {"grad": 0.0, "no_grad": 0.0}
        feature_net.stages[0].register_forward_pre_hook(self._begin)
        feature_net.head.register_forward_hook(self._end)

    def _begin(self, *_) -> None:
        self.start = self.clock()

    def _end(self, *_) -> None:
        import torch

        self.times["grad" if torch.is_grad_enabled() else "no_grad"] += self.clock() - self.start

    def take(self) -> dict[str, float]:
        out, self.times = self.times, {"grad": 0.0, "no_grad": 0.0}
        return out


def top_ops(prof, device_type: str, steps: int, count: int = 12) -> list[dict]:
    """The `count` operators with the largest self time, in ms per step."""
    key = "self_device_time_total" if device_type == "cuda" else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, key), reverse=True)[:count]
    return [{"op": e.key, "ms": getattr(e, key) / 1e3 / steps, "calls": e.count / steps} for e in events]


def profiler(device):
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    return profile(activities=activities)


def run_profile(spec: dict) -> dict:
    """Aligned MFD's distance phase split by forward hooks on the feature network (interleaved with pseudo-Huber)."""
    import torch

    device = torch.device(spec["device"])
    setup, arms = build_train(spec, device)
    x0 = random_images(spec["batch"], PRESETS[spec["preset"]][0], device)
    clock = Clock(device, sync=True)
    phi = PhiTimer(next(a for a in arms if a.name == "mfd").objective.distance.distance.net, clock)
    out: dict = {"phi": {"grad": [], "no_grad": [], "distance": []}}
    step, rounds = 0, spec["warmup"] + spec["repeats"]
    for round_ in range(rounds):
        log(f"[profile {spec['preset']} B{spec['batch']}] round {round_ + 1}/{rounds}")
        for arm in arms:
            marks = train_step(arm, setup, x0, step, spec, clock)
            step, times = step + 1, phi.take()
            if arm.name == "mfd" and round_ >= spec["warmup"]:
                for key, value in (("grad", times["grad"]), ("no_grad", times["no_grad"]), ("distance", marks[2] - marks[1])):
                    out["phi"][key].append(value)
    return out


def run_profile_sample(spec: dict) -> dict:
    """Operator profile and FLOPs of 1-step sampling at the first batch size."""
    import torch

    from ayt.sampling import consistency_sample

    device = torch.device(spec["device"])
    net = build_net(spec, device).eval().requires_grad_(False)
    z = random_images(spec["batches"][0], PRESETS[spec["preset"]][0], device)
    for i in range(spec["warmup"]):
        consistency_sample(net, z, (80.0,))
    with profiler(device) as prof:
        for _ in range(spec["repeats"]):
            with autocast(spec, device):
                consistency_sample(net, z, (80.0,))
    return {"ops": top_ops(prof, device.type, spec["repeats"]), "gflop_per_image": forward_gflop(net, device)}


def child_main(spec: dict) -> None:
    import torch

    torch.set_num_threads(spec["threads"])
    if spec["device"] == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda was asked for but torch.cuda.is_available() is False")
    runners = {"train": run_train, "memory": run_memory, "sample": run_sample, "bare": run_bare,
               "profile": run_profile, "profile_sample": run_profile_sample}
    print("RESULT " + json.dumps(runners[spec["mode"]](spec)), flush=True)


# ====================================================================== parent side: planning
def variant_name(spec: dict) -> str:
    return spec["precision"] + ("+compile" if spec["compile"] else "")


def child_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    for key, value in MALLOC_ENV.items():
        env.setdefault(key, value)
    env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    return env


def run_child(spec: dict, threads: int) -> dict | None:
    """Run one configuration in a fresh Python; its progress goes to our stderr; None on failure."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=child_env(threads), stdout=subprocess.PIPE, text=True, check=False)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    what = f"{spec['mode']} {spec['preset']} B{spec.get('batch', spec.get('batches'))} {variant_name(spec)}"
    log(f"   ({what}: {time.perf_counter() - start:.0f} s)")
    if proc.returncode != 0 or not lines:
        log(f"!! configuration failed (exit {proc.returncode}): {what}")
        return None
    return json.loads(lines[-1][len("RESULT "):])


def parse_batches(items: list[str] | None, presets: list[str], default: dict[str, list[int]]) -> dict[str, list[int]]:
    """`16,64` (every preset) or `tiny=16,64 cifar10-ddpmpp=8` -> preset -> batches."""
    out = {p: list(default[p]) for p in presets}
    for item in items or []:
        name, _, values = item.rpartition("=")
        for preset in [name] if name else presets:
            if preset not in PRESETS:
                raise SystemExit(f"unknown preset {preset!r} in a batch list; use {', '.join(PRESETS)}")
            out[preset] = [int(v) for v in values.split(",") if v]
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer rounds and batches: a few minutes on 2 CPU cores")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")
    p.add_argument("--presets", default="tiny,cifar10-ddpmpp", help="comma list of network presets")
    p.add_argument("--distances", default=",".join(DISTANCES), help=f"comma list of {', '.join(DISTANCE_LABELS)}")
    p.add_argument("--batches", nargs="*", help="training batches: 16,64 or tiny=16,64 cifar10-ddpmpp=8")
    p.add_argument("--sample-batches", nargs="*", help="1-step sampling batches, same syntax")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds (each distance once per round)")
    p.add_argument("--warmup", type=int, default=None, help="untimed rounds first")
    p.add_argument("--precisions", default=None, help="comma list of fp32,bf16 (default: fp32 on CPU, fp32,bf16 on CUDA)")
    p.add_argument("--bf16-cpu", action="store_true", help="also bf16 autocast on CPU")
    p.add_argument("--compile", action="store_true",
                   help="also torch.compile(net) with the last precision, at the largest batch of each preset")
    p.add_argument("--phases", action="store_true", help="CUDA: extra synchronised steps for the phase table")
    p.add_argument("--profile", action="store_true", help="also profile pseudo-Huber vs MFD and sampling")
    p.add_argument("--tiny-width", type=int, default=16, help="tiny_vgg base width of the tiny preset's features")
    p.add_argument("--threads", type=int, default=None, help="torch threads per process (default and maximum: cores)")
    p.add_argument("--no-memory", action="store_true", help="CPU: skip the separate peak-RSS processes")
    p.add_argument("--skip", choices=["train", "sample"], action="append", default=[], help="skip a part")
    p.add_argument("--write", metavar="PATH", help="write (and update as it goes) this file's section")
    p.add_argument("--section", default=None, help="section name (default: throughput-<device>)")
    p.add_argument("--merge", metavar="PATH", help="copy the throughput-* sections of PATH into --write, then stop")
    p.add_argument("--child", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def plan(args: argparse.Namespace) -> dict:
    """Resolve defaults into the lists of configurations to run."""
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible to torch")
    presets = [p for p in args.presets.split(",") if p]
    if any(p not in PRESETS for p in presets):
        raise SystemExit(f"unknown preset in {args.presets!r}; use {', '.join(PRESETS)}")
    distances = [d for d in args.distances.split(",") if d and d != "pseudo_huber"]
    if any(d not in DISTANCE_LABELS for d in distances):
        raise SystemExit(f"unknown distance in {args.distances!r}; use {', '.join(DISTANCE_LABELS)}")
    defaults = (QUICK if args.quick else DEFAULTS)[device]
    precisions = args.precisions.split(",") if args.precisions else (["fp32", "bf16"] if device == "cuda" else ["fp32"])
    if args.bf16_cpu and "bf16" not in precisions:
        precisions.append("bf16")
    return {
        "device": device, "presets": presets, "distances": ["pseudo_huber", *distances],  # the reference first
        "variants": [(p, False) for p in precisions], "compile": (precisions[-1], True) if args.compile else None,
        "threads": min(args.threads or usable_cores(), usable_cores()),
        "batches": parse_batches(args.batches, presets, defaults["batches"]),
        "sample_batches": parse_batches(args.sample_batches, presets, defaults["sample_batches"]),
        "train_rounds": defaults["train_rounds"], "sample_rounds": defaults["sample_rounds"],
        "section": args.section or f"throughput-{device}",
    }


def base_spec(args, cfg: dict, mode: str, preset: str, variant: tuple[str, bool], rounds: dict) -> dict:
    warmup, repeats = rounds[preset]
    return {
        "mode": mode, "device": cfg["device"], "preset": preset, "precision": variant[0], "compile": variant[1],
        "threads": cfg["threads"], "warmup": args.warmup if args.warmup is not None else warmup,
        "repeats": args.repeats if args.repeats is not None else repeats, "tiny_width": args.tiny_width,
        "phases": args.phases, "distances": cfg["distances"], "lpips_weights": cfg.get("lpips_weights"),
    }


def train_configs(cfg: dict, preset: str) -> list[tuple[tuple[str, bool], int]]:
    """(variant, batch) pairs: every precision at every batch, compile at the largest batch."""
    out = [(v, b) for v in cfg["variants"] for b in cfg["batches"][preset]]
    return out + ([(cfg["compile"], max(cfg["batches"][preset]))] if cfg["compile"] else [])


def write_random_lpips_trunk(folder: str) -> str:
    """A randomly initialised torchvision VGG16 `features.*` state_dict file (LPIPS timing only)."""
    import torch
    from torchvision.models.vgg import cfgs, make_layers

    torch.manual_seed(0)
    features = make_layers(cfgs["D"], batch_norm=False)
    path = os.path.join(folder, "vgg16-random.pth")
    torch.save({f"features.{k}": v for k, v in features.state_dict().items()}, path)
    return path


# ====================================================================== parent side: statistics
def median(values: list[float]) -> float:
    return statistics.median(values)


def iqr(values: list[float]) -> tuple[float, float]:
    if len(values) < 2:
        return values[0], values[0]
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], q[2]


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def train_rows(preset: str, batch: int, variant: str, result: dict, memory: dict[str, float | None]) -> list[dict]:
    """Table rows of one training child: medians, paired ratios to pseudo-Huber, targets, peaks."""
    base = result["arms"]["pseudo_huber"]["totals"]
    rows = []
    for name, arm in result["arms"].items():
        ratio = median([a / b for a, b in zip(arm["totals"], base)])  # paired by round
        limit = MFD_TARGETS.get(preset) if name == "mfd" else None
        rows.append({
            "preset": preset, "batch": batch, "variant": variant, "distance": name,
            "median_s": median(arm["totals"]), "iqr": iqr(arm["totals"]), "ratio": ratio,
            "target": None if limit is None else (limit, ratio <= limit),
            "peak_mib": arm["peak_mib"] if arm["peak_mib"] is not None else memory.get(name),
            "phases": {k: median(v) for k, v in arm["phases"].items()}, "cpu_share": result["cpu_share"],
        })
    return rows


def sample_rows(preset: str, variant: str, result: dict) -> list[dict]:
    rows = []
    for batch, r in result["batches"].items():
        t = median(r["times"])
        rows.append({"preset": preset, "batch": int(batch), "variant": variant, "median_s": t, "iqr": iqr(r["times"]),
                     "images_s": int(batch) / t, "peak_mib": r["peak_mib"] if r["peak_mib"] is not None else result["rss_mib"],
                     "gflop": result["gflop_per_image"], "matmul": result["matmul_gflops"], "cpu_share": result["cpu_share"]})
    return rows


# ====================================================================== parent side: markdown
def fmt_ms(r: dict) -> str:
    lo, hi = r["iqr"]
    return f"{r['median_s'] * 1e3:,.1f} [{lo * 1e3:,.1f}-{hi * 1e3:,.1f}]"


def fmt_mem(mib: float | None) -> str:
    return "-" if mib is None else f"{mib:,.0f}"


def train_table(rows: list[dict], device: str) -> str:
    header = ["preset", "batch", "precision", "distance", "ms/step (median [IQR])", "steps/s", "images/s",
              "x pseudo-Huber", "peak RSS MiB" if device == "cpu" else "peak CUDA MiB", "target"]
    body = []
    for r in rows:
        target = "" if r["target"] is None else f"<= {r['target'][0]:.2f}x: **{verdict(r['target'][1])}**"
        body.append([r["preset"], r["batch"], r["variant"], DISTANCE_LABELS[r["distance"]], fmt_ms(r),
                     f"{1 / r['median_s']:.2f}", f"{r['batch'] / r['median_s']:,.1f}", f"{r['ratio']:.3f}",
                     fmt_mem(r["peak_mib"]), target])
    return markdown_table(header, body)


def target_lines(state: dict) -> list[str]:
    """Each target with its verdict and, from the measurements, what limits it."""
    lines = []
    for r in state["train"]:
        if r["target"] is None:
            continue
        base = next(b for b in state["train"] if b["distance"] == "pseudo_huber"
                    and (b["preset"], b["batch"], b["variant"]) == (r["preset"], r["batch"], r["variant"]))
        extra = (r["median_s"] - base["median_s"]) * 1e3
        where = ""
        if r["phases"] and base["phases"]:
            dist = (r["phases"]["distance"] - base["phases"]["distance"]) * 1e3
            where = (f"; the aligned-MFD distance phase (feature network forward on student and target, backward "
                     f"through it) adds {dist:,.1f} ms of it")
        lines.append(f"- MFD step <= {r['target'][0]:.2f}x pseudo-Huber at {r['preset']} (batch {r['batch']}, "
                     f"{r['variant']}): **{verdict(r['target'][1])}** at {r['ratio']:.3f}x, {extra:+,.1f} ms/step{where}.")
    for r in state["sample"]:
        if r["preset"] != "tiny" or state["cfg"]["device"] != "cpu":
            continue
        need, got = SAMPLING_TARGET * r["gflop"], r["images_s"] * r["gflop"]
        lines.append(f"- tiny 1-step sampling >= {SAMPLING_TARGET:,.0f} images/s on CPU (batch {r['batch']}, {r['variant']}): "
                     f"**{verdict(r['images_s'] >= SAMPLING_TARGET)}** at {r['images_s']:,.0f} images/s. The U-Net forward "
                     f"costs {r['gflop']:.3f} GFLOP per image, so the target needs {need:,.0f} GFLOP/s; the sampler "
                     f"sustains {got:,.0f} GFLOP/s, {got / r['matmul']:.0%} of what a {r['variant'].split('+')[0]} 2048x2048 "
                     f"matmul reaches on the same cores ({r['matmul']:,.0f} GFLOP/s); the target needs "
                     f"{need / r['matmul']:.0%} of that rate.")
    return (["### Targets", "", *lines, *conv_share_lines(state), ""]) if lines else []


def conv_share_lines(state: dict) -> list[str]:
    """Share of convolution in the profiled sampling time (shows whether sampling is compute-bound)."""
    lines = []
    for p in state["profiles"]:
        ops = (p.get("sample") or {}).get("ops")
        if ops:
            conv = sum(o["ms"] for o in ops if "conv" in o["op"]) / sum(o["ms"] for o in ops)
            lines.append(f"- Profile of {p['preset']} 1-step sampling (batch {p['sample_batch']}, {p['variant']}): "
                         f"convolutions take {conv:.0%} of the top operators' self time.")
    return lines


def cpu_share_line(state: dict) -> list[str]:
    """How much of its cores each timing process got (other jobs lower it)."""
    if state["cfg"]["device"] != "cpu":
        return []
    seen = {(r["preset"], r["batch"], r["variant"], "train"): r["cpu_share"] for r in state["train"]}
    seen |= {(r["preset"], r["batch"], r["variant"], "sampling"): r["cpu_share"] for r in state["sample"]}
    parts = [f"{kind} {p} B{b} {v} {share:.0%}" for (p, b, v, kind), share in seen.items()]
    return ([(f"CPU time / (wall time x threads) of each timing process (100% = it had its cores; lower = other jobs "
             f"competed): {'; '.join(parts)}."), ""] if parts else [])


def phase_table(rows: list[dict]) -> str:
    header = ["preset", "batch", "precision", "distance"] + [f"{PHASE_LABELS[p]} ms" for p in PHASES]
    body = [[r["preset"], r["batch"], r["variant"], DISTANCE_LABELS[r["distance"]]]
            + [f"{r['phases'][p] * 1e3:,.1f}" for p in PHASES] for r in rows if r["phases"]]
    return markdown_table(header, body) if body else ""


def sample_table(rows: list[dict], device: str) -> str:
    header = ["preset", "batch", "precision", "ms/batch (median [IQR])", "images/s", "GFLOP/s (matmul ceiling)",
              "peak RSS MiB" if device == "cpu" else "peak CUDA MiB", "target"]
    body = []
    for r in rows:
        target = ""
        if r["preset"] == "tiny" and device == "cpu":
            target = f">= {SAMPLING_TARGET:,.0f} images/s: **{verdict(r['images_s'] >= SAMPLING_TARGET)}**"
        gflops = f"{r['images_s'] * r['gflop']:,.0f} ({r['matmul']:,.0f})"
        body.append([r["preset"], r["batch"], r["variant"], fmt_ms(r), f"{r['images_s']:,.0f}", gflops,
                     fmt_mem(r["peak_mib"]), target])
    return markdown_table(header, body)


def extra_time_lines(rows: list[dict]) -> list[str]:
    """Where the extra time of each feature distance goes, phase by phase, against pseudo-Huber."""
    base = {(r["preset"], r["batch"], r["variant"]): r for r in rows if r["distance"] == "pseudo_huber"}
    lines = []
    for r in rows:
        b = base.get((r["preset"], r["batch"], r["variant"]))
        if r["distance"] == "pseudo_huber" or b is None or not r["phases"] or not b["phases"]:
            continue
        parts = ", ".join(f"{PHASE_LABELS[p]} {(r['phases'][p] - b['phases'][p]) * 1e3:+,.1f}" for p in PHASES)
        target = "" if r["target"] is None else f" (target <= {r['target'][0]:.2f}x: {verdict(r['target'][1])})"
        lines.append(f"- {r['preset']} B{r['batch']} {r['variant']}, {DISTANCE_LABELS[r['distance']]}: {r['ratio']:.3f}x"
                     f"{target}, {(r['median_s'] - b['median_s']) * 1e3:+,.1f} ms/step; by phase (ms): {parts}.")
    return lines


def profile_lines(profiles: list[dict]) -> list[str]:
    out = ["### Where the time goes (`--profile`)", ""]
    for p in profiles:
        if p.get("train"):
            phi = p["train"]["phi"]
            dist, grad, nograd = (median(phi[k]) * 1e3 for k in ("distance", "grad", "no_grad"))
            out += [(f"**{p['preset']}, training batch {p['train_batch']}, {p['variant']}**: the aligned MFD distance "
                    f"phase takes {dist:,.1f} ms/step: feature-network forward on the target (no gradient) "
                    f"{nograd:,.1f} ms, on the student output (with gradient) {grad:,.1f} ms, the rest (the feature "
                    f"network's backward to the student output, norms, normalisation) {dist - grad - nograd:,.1f} ms."), ""]
        if p.get("sample"):
            s = p["sample"]
            body = [[f"`{o['op']}`", f"{o['ms']:,.1f}", f"{o['calls']:.0f}"] for o in s["ops"]]
            out += [(f"**{p['preset']}, 1-step sampling batch {p['sample_batch']}, {p['variant']}**: "
                    f"{s['gflop_per_image']:.3f} GFLOP per image (one U-Net forward); operator self times (profiler on):"),
                    "", markdown_table(["operator", "ms/batch", "calls/batch"], body), ""]
    return out


def compile_lines(results: list[tuple[str, dict]]) -> list[str]:
    lines = [f"- {what}: {json.dumps(stats)}" for what, stats in results if stats]
    return (["Dynamo counters of the compiled runs (graph breaks split the network into several graphs):", ""]
            + lines + [""]) if lines else []


def section_markdown(state: dict) -> str:
    """The whole section from the results gathered so far."""
    cfg, info = state["cfg"], state["info"]
    extra = cfg["section"].removeprefix(f"throughput-{cfg['device']}").strip("-")
    title = f"## Throughput ({cfg['device'].upper()}{', ' + extra if extra else ''})"
    out = [title, "", f"Command: `{state['command']}`", "", machine_line(info),
           (f"Load average before the run: {state['load_before']}; after: {load_average()}. Torch threads per process: "
           f"{cfg['threads']}; `MALLOC_MMAP_THRESHOLD_`/`MALLOC_TRIM_THRESHOLD_` = {MALLOC_ENV['MALLOC_MMAP_THRESHOLD_']} "
           "unless set."), ""]
    if not state["done"]:
        out += ["**Partial: the run had not finished when this was written.**", ""]
    out += [("What is timed: one full ECT training step as the trainer does it (student forward, no-grad target forward, "
            "distance, `.mean().backward()`, RAdam step, EMA update; random input images, no data loading); medians "
            "over timed rounds after warm-up rounds. The distances of one (preset, batch, precision) run in one process "
            "in interleaved rounds, and `x pseudo-Huber` is the median of the per-round ratios. MFD is "
            "`Aligned(MFD(net=feature_net))` (reference form, every stage and the head), the AYT reference; its feature "
            f"network is `tiny_vgg` width {state['tiny_width']} at the tiny preset and `vgg16_bn` at cifar10-ddpmpp, "
            f"{TARGET_DIM} targets. Feature networks and the LPIPS VGG16 trunk have random weights (timing does not "
            "depend on weight values; the real LPIPS weights are not available offline); LPIPS runs without upsampling. "
            "Compiled variants use `torch.compile(net, dynamic=False)`."), ""]
    if cfg["device"] == "cpu":
        bare = f"{state['bare_rss']:,.0f} MiB" if state.get("bare_rss") else "unknown"
        out += [(f"Peak RSS: a separate process that builds just that configuration and runs two steps (one that only "
                f"imports torch and ayt peaks at {bare})."), ""]
    else:
        out += [("Peak CUDA memory: `torch.cuda.max_memory_allocated` over that distance's steps, less the weights of "
                "the other distances resident in the same process."), ""]
    out += target_lines(state)
    if state["train"]:
        out += ["### Training step", "", train_table(state["train"], cfg["device"]), ""]
        phases = phase_table(state["train"])
        if phases:
            out += [("Median time per phase (ms). An aligned distance's phase includes the feature network's forward on "
                    "student and target and its backward to the student output; `backward` is the U-Net backward "
                    "(plus the feature network's backward for a plain feature distance)."), "", phases, "",
                    "Extra time over pseudo-Huber:", "", *extra_time_lines(state["train"]), ""]
    if state["sample"]:
        out += ["### 1-step sampling", "", sample_table(state["sample"], cfg["device"]), ""]
    out += cpu_share_line(state)
    out += compile_lines(state["compile_stats"])
    if state["profiles"]:
        out += profile_lines(state["profiles"])
    if state["failures"]:
        out += ["Failed configurations (see the run's stderr): " + "; ".join(state["failures"]), ""]
    return "\n".join(out)


# ====================================================================== parent side: running
def publish(args, state: dict) -> None:
    if args.write:
        write_section(args.write, state["cfg"]["section"], section_markdown(state))


def measure_memory(args, cfg: dict, spec: dict) -> dict[str, float | None]:
    """CPU: peak RSS of one process per distance (1 warm-up step + 1 step)."""
    if cfg["device"] != "cpu" or args.no_memory or args.quick:
        return {}
    memory = {}
    for name in cfg["distances"]:
        log(f"[{spec['preset']} B{spec['batch']} {variant_name(spec)}] peak memory of {name}")
        result = run_child({**spec, "mode": "memory", "distances": [name], "warmup": 1}, cfg["threads"])
        memory[name] = result["rss_mib"] if result else None
    return memory


def run_training(args, state: dict) -> None:
    cfg = state["cfg"]
    for preset in cfg["presets"]:
        for variant, batch in train_configs(cfg, preset):
            spec = {**base_spec(args, cfg, "train", preset, variant, cfg["train_rounds"]), "batch": batch}
            result = run_child(spec, cfg["threads"])
            if result is None:
                state["failures"].append(f"train {preset} B{batch} {variant_name(spec)}")
                continue
            rows = train_rows(preset, batch, variant_name(spec), result, measure_memory(args, cfg, spec))
            state["train"] += rows
            state["compile_stats"].append((f"train {preset} B{batch}", result["compile_stats"]))
            print(train_table(rows, cfg["device"]), flush=True)
            publish(args, state)


def run_sampling(args, state: dict) -> None:
    cfg = state["cfg"]
    for preset in cfg["presets"]:
        batches = cfg["sample_batches"][preset]
        configs = [(v, batches) for v in cfg["variants"]] + ([(cfg["compile"], [max(batches)])] if cfg["compile"] else [])
        for variant, chosen in configs:
            spec = {**base_spec(args, cfg, "sample", preset, variant, cfg["sample_rounds"]), "batches": chosen}
            result = run_child(spec, cfg["threads"])
            if result is None:
                state["failures"].append(f"sample {preset} B{chosen} {variant_name(spec)}")
                continue
            state["sample"] += sample_rows(preset, variant_name(spec), result)
            state["compile_stats"].append((f"sample {preset} B{chosen}", result["compile_stats"]))
            publish(args, state)


def run_profiles(args, state: dict) -> None:
    """Per preset: training (first batch, pseudo-Huber vs MFD) and sampling (first batch) profiles."""
    cfg = state["cfg"]
    variant = cfg["variants"][0]
    for preset in cfg["presets"]:
        entry: dict = {"preset": preset, "variant": variant_name({"precision": variant[0], "compile": False})}
        if "train" not in args.skip and "mfd" in cfg["distances"]:
            spec = {**base_spec(args, cfg, "profile", preset, variant, cfg["train_rounds"]),
                    "batch": cfg["batches"][preset][0], "distances": ["pseudo_huber", "mfd"]}
            entry["train_batch"], entry["train"] = spec["batch"], run_child(spec, cfg["threads"])
        if "sample" not in args.skip:
            spec = {**base_spec(args, cfg, "profile_sample", preset, variant, cfg["sample_rounds"]),
                    "batches": cfg["sample_batches"][preset][:1]}
            entry["sample_batch"], entry["sample"] = spec["batches"][0], run_child(spec, cfg["threads"])
        if entry.get("train", True) is None or entry.get("sample", True) is None:
            state["failures"].append(f"profile {preset}")
        state["profiles"].append(entry)
        publish(args, state)


def merge(source: str, target: str | None) -> None:
    """Copy every `throughput*` section of the file `source` into the file `target`."""
    import re

    if not target:
        raise SystemExit("--merge needs --write TARGET")
    names = re.findall(r"<!-- (throughput[\w-]*):start -->", Path(source).read_text())
    if not names:
        raise SystemExit(f"{source} holds no throughput section")
    for name in names:
        write_section(target, name, read_section(source, name) or "")
        log(f"copied section {name} from {source} into {target}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        return child_main(json.loads(args.child))
    if args.merge:
        return merge(args.merge, args.write)
    cfg = plan(args)
    state = {"cfg": cfg, "info": machine_info(), "load_before": load_average(), "tiny_width": args.tiny_width,
             "command": "python benchmarks/throughput.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
             "train": [], "sample": [], "profiles": [], "compile_stats": [], "failures": [], "done": False}
    log(f"throughput: device {cfg['device']}, {cfg['threads']} threads, load {state['load_before']}")
    with tempfile.TemporaryDirectory() as tmp:
        if any(d.startswith("lpips") for d in cfg["distances"]) and "train" not in args.skip:
            cfg["lpips_weights"] = write_random_lpips_trunk(tmp)
        if "train" not in args.skip:
            run_training(args, state)
    if "sample" not in args.skip:
        run_sampling(args, state)
    if args.profile:
        run_profiles(args, state)
    if cfg["device"] == "cpu":
        bare = run_child({**base_spec(args, cfg, "bare", cfg["presets"][0], ("fp32", False), cfg["train_rounds"])},
                         cfg["threads"])
        state["bare_rss"] = bare and bare["rss_mib"]
    state["done"] = True
    print("\n" + section_markdown(state))
    publish(args, state)
    if args.write:
        log(f"wrote section {cfg['section']} of {args.write}")


if __name__ == "__main__":
    main()
