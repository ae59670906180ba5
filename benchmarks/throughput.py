"""Training-step and sampling throughput: `ayt.train.Trainer.step()` with each distance.

    python benchmarks/throughput.py [--device cpu|cuda] [--presets tiny,cifar10-ddpmpp] [--distances NAMES]
        [--batches 16,64 | tiny=16,64 cifar10-ddpmpp=8] [--phases] [--compile] [--bf16-cpu] [--set KEY=VALUE ...]
        [--write BENCHMARKS.md [--section NAME]]       # NAMES: see --help (pseudo_huber, mfd, ..., meanflow_mfd)
    python benchmarks/throughput.py --merge SRC.md --write DST.md   # copy the throughput-* sections

Every distance is a real run's `Trainer`, built from a `Config` with overrides by the project's
own build code (ECT at the AYT reference stage, objective.q=256 fixed; `continuous*`, `meanflow*`:
those kinds) on a synthetic in-memory dataset: random images of the preset's
resolution in a temporary .npz (data.name=npz). What is timed is exactly `Trainer.step()`: the
batch gather from memory, student and target forwards, distance, backward, (clipping,) the
finiteness check, the optimizer with its LR schedule and the EMA. The trainers of one (preset,
batch, precision) run in interleaved rounds in one process, each round every distance once at the
same step (same noise), in rotated order; `x pseudo-Huber` is the median of the per-round ratios.
Feature networks and the LPIPS VGG16 trunk have random weights written to temporary files
(timing does not depend on weight values). `--phases` profiles extra steps and reads the step's
`ayt.step.<part>` ranges (`ayt.train.STEP_PHASES`). Sampling times `ayt.sampling.generate`.
"""

from __future__ import annotations

import argparse
import gc
import os
import re
import resource
import shlex
import statistics
import sys
import tempfile
import time
import traceback
from contextlib import nullcontext
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from ayt.build import build_net
from ayt.checkpoint import save_checkpoint
from ayt.config import load_config
from ayt.features.load import FEATURES_KIND, FEATURES_MODULE
from ayt.features.nets import build_feature_net
from ayt.sampling import generate, schedule_for
from ayt.train import STEP_PHASES, Trainer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (UsageError, load_average, machine_info, machine_line, markdown_table, read_section,  # noqa: E402
                    run_main, usable_cores, write_section)

PRESETS = {"tiny": (16, "tiny_vgg", None), "cifar10-ddpmpp": (32, "vgg16_bn", 0.2)}  # resolution, MFD features, ECT dropout
LABELS = {"pseudo_huber": "pseudo-Huber (pixel)", "mfd": "MFD aligned (AYT)", "mfd_plain": "MFD plain", "lpips": "LPIPS plain",
          "lpips_aligned": "LPIPS aligned", "continuous": "continuous CT (pixel JVP)", "continuous_mfd": "continuous CT (MFD JVP)",
          "continuous_warmup": "continuous CT + tangent warm-up", "continuous_adaptive": "continuous CT + adaptive weighting",
          "continuous_fd": "continuous CT (finite-difference JVP)", "meanflow": "MeanFlow (pixel)", "meanflow_mfd": "MeanFlow (MFD)"}
MFD_TARGETS = {"tiny": 1.25, "cifar10-ddpmpp": 1.10}  # MFD step time / pseudo-Huber step time
SAMPLING_TARGET = 1000.0  # images/s, 1-step sampling of the tiny preset on the CPU
VERDICT = {True: "**PASS**", False: "**MISS**"}
TARGET_DIM = 15  # regression targets of the feature network (subset "all")
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "1000000000", "MALLOC_TRIM_THRESHOLD_": "1000000000"}
log = partial(print, file=sys.stderr, flush=True)
PHASE_LABELS = {"loss": "forwards + distance", "check": "finiteness check", "ema": "EMA"}  # others: their name

# Per device: training batches, sampling batches, (warm-up, timed) rounds, profiled steps.
DEFAULTS = {  # key: {tiny, cifar10-ddpmpp}
    "cpu": {"batches": ([16, 64], [8]), "sample_batches": ([256, 1024], [8]), "train_rounds": ((2, 10), (1, 3)),
            "sample_rounds": ((1, 4), (1, 1)), "phase_steps": (2, 1)},
    "cuda": {"batches": ([16, 64], [64, 128]), "sample_batches": ([256, 1024], [256, 1024]), "train_rounds": ((5, 20), (3, 10)),
             "sample_rounds": ((5, 20), (3, 10)), "phase_steps": (5, 3)},
}


# ====================================================================== inputs: random images and weights
def write_inputs(folder: str, presets: list[str], batches: dict[str, list[int]], distances: list[str], width: int) -> dict:
    """Random images (.npz, twice the largest batch) per preset, random MFD feature runs, a random LPIPS trunk."""
    files: dict = {}
    rng = np.random.default_rng(0)
    for preset in presets:
        res, arch, _ = PRESETS[preset]
        images = rng.uniform(-1, 1, (2 * max(batches[preset]), 3, res, res)).astype(np.float32)
        files[preset] = os.path.join(folder, f"images-{preset}.npz")
        np.savez(files[preset], images=images)
        if any("mfd" in d for d in distances):
            torch.manual_seed(0)
            net = build_feature_net(arch, in_channels=3, target_dim=TARGET_DIM, resolution=res, width=width)
            state = {"kind": FEATURES_KIND, "arch": arch, "in_channels": 3, "target_dim": TARGET_DIM, "resolution": res,
                     "width": width}
            files[f"features-{preset}"] = os.path.join(folder, f"features-{preset}")
            save_checkpoint(files[f"features-{preset}"], 0, {FEATURES_MODULE: net.state_dict()}, state)
    if any(d.startswith("lpips") for d in distances):
        from torchvision.models.vgg import cfgs, make_layers

        torch.manual_seed(0)
        trunk = make_layers(cfgs["D"], batch_norm=False)
        files["lpips"] = os.path.join(folder, "vgg16-random.pth")
        torch.save({f"features.{k}": v for k, v in trunk.state_dict().items()}, files["lpips"])
    return files


def config_for(spec: dict, distance: str, files: dict, run_dir: str):
    """The `Config` of one distance's run: preset, batch, precision, compile, device, random data."""
    preset = spec["preset"]
    res, _, dropout = PRESETS[preset]
    features, ct = f"distance.features={files.get(f'features-{preset}')}", ["objective.kind=continuous", "distance.name=l2"]
    lpips = ["distance.name=lpips", f"distance.lpips_weights={files.get('lpips')}"]
    mf = ["objective.kind=meanflow", "objective.mf_ratio=0.75"]
    arm = {  # continuous_*: sCM's stabilisers on pixel tangents (the tangent warm-up never ends here); meanflow: 75% r != t (CIFAR-10)
        "pseudo_huber": ["distance.name=pseudo_huber"], "lpips": lpips, "lpips_aligned": [*lpips, "distance.mode=aligned"],
        "mfd": ["distance.name=mfd", "distance.mode=aligned", features], "mfd_plain": ["distance.name=mfd", features],
        "continuous": ct, "continuous_mfd": ["objective.kind=continuous", "distance.name=mfd", features],
        "continuous_warmup": [*ct, "objective.warmup_steps=1000000000"], "continuous_fd": [*ct, "objective.jvp=fd"],
        "continuous_adaptive": [*ct, "objective.adaptive_weight=true"],
        "meanflow": [*mf, "distance.name=squared_l2"], "meanflow_mfd": [*mf, "distance.name=mfd", "distance.mode=aligned", features],
    }[distance]
    common = [
        "data.name=npz", f"data.root={files[preset]}", f"data.resolution={res}", f"network.preset={preset}",
        "objective.q=256", "objective.stage_steps=null", f"train.batch_size={spec['batch']}",
        f"train.precision={spec['precision']}", f"train.compile={str(spec['compile']).lower()}",
        f"train.device={spec['device']}", f"train.run_dir={run_dir}", "train.ema_decays=[0.9999]",
        "log.progress=false", "log.tensorboard=false",
    ] + ([f"network.dropout={dropout}"] if dropout else [])
    return load_config(None, common + arm + spec["overrides"])


# ====================================================================== measuring
def cpu_seconds() -> float:
    return sum(resource.getrusage(resource.RUSAGE_SELF)[:2])  # user + system


def sync(device) -> None:
    torch.cuda.synchronize(device) if device.type == "cuda" else None


def prewarm_optimizer(trainer, steps: int = 6) -> None:
    """RAdam's first ~5 steps skip the rectified update (cheaper steps); pass them with zero gradients (no weight change)."""
    for p in trainer.params:  # the network's and those of the task's trained modules (e.g. a log-variance head)
        p.grad = torch.zeros_like(p)
    for _ in range(steps):
        trainer.optimizer.step()
    trainer.optimizer.zero_grad(set_to_none=True)


def resident_bytes(trainer) -> int:
    """Bytes of the tensors one trainer keeps between steps: network, EMAs, optimizer state, distance networks."""
    modules = [trainer.net, *trainer.emas, *trainer.extras.values(), trainer.task.objective]
    tensors = [t for m in modules for t in (*m.parameters(), *m.buffers())]
    tensors += [v for s in trainer.optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())


def timed_step(trainer, step: int, device) -> tuple[float, int]:
    """Seconds of `trainer.step(step)` and, on CUDA, the bytes it allocated above what was resident before."""
    cuda = device.type == "cuda"
    trainer.optimizer.zero_grad(set_to_none=True)  # the step's own first action: its gradients count in its peak
    sync(device)
    torch.cuda.reset_peak_memory_stats(device) if cuda else None
    before = torch.cuda.memory_allocated(device) if cuda else 0
    start = time.perf_counter()
    trainer.step(step)
    sync(device)
    return time.perf_counter() - start, (torch.cuda.max_memory_allocated(device) - before if cuda else 0)


def profile_phases(trainer, first_step: int, steps: int, device) -> dict[str, float]:
    """Seconds per step of each `ayt.step.<part>` range over `steps` profiled steps: CPU wall time on the
    CPU, the GPU time of the kernels launched inside the range on CUDA."""
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for i in range(steps):
            trainer.step(first_step + i)
        sync(device)
    totals = dict.fromkeys(STEP_PHASES, 0.0)
    for event in prof.events():
        part = event.name.removeprefix("ayt.step.")
        if part in totals and event.device_type == DeviceType.CPU:
            totals[part] += event.device_time_total if cuda else event.cpu_time_total
    return {part: us / 1e6 / steps for part, us in totals.items()}


def run_train(spec: dict, files: dict) -> list[dict]:
    """One Trainer per distance, interleaved rounds of `Trainer.step()`; one row per distance."""
    device = torch.device(spec["device"])
    warmup, repeats = spec["rounds"]
    with tempfile.TemporaryDirectory() as tmp:
        arms = {}
        try:
            for name in spec["distances"]:
                arms[name] = Trainer(config_for(spec, name, files, tempfile.mkdtemp(dir=tmp)))
                prewarm_optimizer(arms[name])
            times, peaks, names = {name: [] for name in arms}, dict.fromkeys(arms, 0), list(arms)
            for round_ in range(warmup + repeats):
                if round_ == warmup:
                    cpu0, wall0 = cpu_seconds(), time.perf_counter()
                log(f"[{describe(spec)}] round {round_ + 1}/{warmup + repeats}{' (warm-up)' if round_ < warmup else ''}")
                shift = round_ % len(names)
                for name in names[shift:] + names[:shift]:
                    seconds, peak = timed_step(arms[name], round_, device)
                    if round_ >= warmup:
                        times[name].append(seconds)
                        peaks[name] = max(peaks[name], peak)
            share = (cpu_seconds() - cpu0) / ((time.perf_counter() - wall0) * spec["threads"])
            phases = {}
            if spec["phases"]:
                log(f"[{describe(spec)}] profiling {spec['phase_steps']} step(s) per distance")
                phases = {n: profile_phases(t, warmup + repeats, spec["phase_steps"], device) for n, t in arms.items()}
            resident = {name: resident_bytes(t) for name, t in arms.items()}
        finally:
            for trainer in arms.values():
                trainer.close()
    base = times["pseudo_huber"]
    return [{
        "preset": spec["preset"], "batch": spec["batch"], "variant": describe(spec, short=True), "distance": name,
        "times": times[name], "ratio": statistics.median(a / b for a, b in zip(times[name], base)),
        "peak_mib": (peaks[name] + resident[name]) / 2**20 if device.type == "cuda" else None,
        "phases": phases.get(name), "cpu_share": share,
    } for name in times]


def run_sample(spec: dict, files: dict) -> list[dict]:
    """1-step sampling (`generate` with the run's `schedule_for(config, "1")`) at each batch of `spec['batches']`."""
    device = torch.device(spec["device"])
    config = config_for({**spec, "batch": 1}, "pseudo_huber", files, "unused")
    res = PRESETS[spec["preset"]][0]
    torch.manual_seed(0)
    net = build_net(config, res, 3).to(device).eval().requires_grad_(False)
    model = torch.compile(net, dynamic=False) if spec["compile"] else net
    schedule = schedule_for(config, "1")
    bf16 = torch.autocast(device.type, dtype=torch.bfloat16) if spec["precision"] == "bf16" else nullcontext()
    rows, (warmup, repeats) = [], spec["rounds"]
    for batch in spec["batches"]:
        z = torch.randn((batch, 3, res, res), generator=torch.Generator().manual_seed(0)).to(device)
        torch.cuda.reset_peak_memory_stats(device) if device.type == "cuda" else None
        log(f"[{describe(spec)} sampling B{batch}]")
        times, cpu0, wall0 = [], cpu_seconds(), time.perf_counter()
        for i in range(warmup + repeats):
            sync(device)
            start = time.perf_counter()
            with bf16:
                generate(model, z, schedule)
            sync(device)
            if i >= warmup:
                times.append(time.perf_counter() - start)
        share = (cpu_seconds() - cpu0) / ((time.perf_counter() - wall0) * spec["threads"])
        peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
        rows.append({"preset": spec["preset"], "batch": batch, "variant": describe(spec, short=True), "times": times,
                     "images_s": batch / statistics.median(times), "peak_mib": peak, "cpu_share": share})
    return rows


# ====================================================================== planning
def describe(spec: dict, short: bool = False) -> str:
    variant = spec["precision"] + ("+compile" if spec["compile"] else "")
    return variant if short else f"{spec['preset']} B{spec.get('batch', '')} {variant}"


def parse_batches(items: list[str] | None, presets: list[str], default: dict[str, list[int]]) -> dict[str, list[int]]:
    """`16,64` (every preset) or `tiny=16,64 cifar10-ddpmpp=8` -> preset -> batches."""
    out = {p: list(default[p]) for p in presets}
    for item in items or []:
        name, _, values = item.rpartition("=")
        for preset in [name] if name else presets:
            if preset not in PRESETS:
                raise UsageError(f"unknown preset {preset!r} in a batch list; use {', '.join(PRESETS)}")
            try:
                out[preset] = [int(v) for v in values.split(",") if v]
            except ValueError:
                raise UsageError(f"batch list {item!r}: give whole numbers, e.g. 16,64 or tiny=16,64") from None
            if not out[preset] or min(out[preset]) < 1:
                raise UsageError(f"batch list {item!r}: give positive batch sizes, e.g. 16,64 or tiny=16,64")
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")
    p.add_argument("--presets", default="tiny,cifar10-ddpmpp", help="comma list of network presets")
    p.add_argument("--distances", default="pseudo_huber,mfd,lpips,lpips_aligned", help=f"comma list of {', '.join(LABELS)}")
    p.add_argument("--batches", nargs="*", help="training batches: 16,64 or tiny=16,64 cifar10-ddpmpp=8")
    p.add_argument("--sample-batches", nargs="*", help="1-step sampling batches, same syntax")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds (each distance once per round)")
    p.add_argument("--warmup", type=int, default=None, help="untimed rounds first")
    p.add_argument("--precisions", default=None, help="comma list of fp32,bf16 (default: fp32 on CPU, fp32,bf16 on CUDA)")
    p.add_argument("--bf16-cpu", action="store_true", help="CPU: also bf16 autocast for sampling (the trainer runs fp32 on CPU)")
    p.add_argument("--compile", action="store_true", help="also train.compile=true with the last precision at the largest batch")
    p.add_argument("--phases", action="store_true", help="profile extra steps for the time of each part of the step")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides for every run, e.g. optim.grad_clip=1.0")
    p.add_argument("--tiny-width", type=int, default=16, help="tiny_vgg base width of the tiny preset's MFD features")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default and maximum: usable cores)")
    p.add_argument("--skip", choices=["train", "sample"], action="append", default=[], help="skip a part")
    p.add_argument("--write", metavar="PATH", help="write (and update as it goes) this file's section")
    p.add_argument("--section", default=None, help="section name (default: throughput-<device>)")
    p.add_argument("--merge", metavar="PATH", help="copy the throughput-* sections of PATH into --write, then stop")
    return p.parse_args(argv)


def plan(args: argparse.Namespace) -> dict:
    """Resolve defaults into the configurations to run."""
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is visible to torch")
    presets = [p for p in args.presets.split(",") if p]
    if any(p not in PRESETS for p in presets):
        raise UsageError(f"unknown preset in {args.presets!r}; use {', '.join(PRESETS)}")
    distances = [d for d in args.distances.split(",") if d and d != "pseudo_huber"]
    if any(d not in LABELS for d in distances):
        raise UsageError(f"unknown distance in {args.distances!r}; use {', '.join(LABELS)}")
    defaults = {key: dict(zip(PRESETS, values)) for key, values in DEFAULTS[device].items()}
    precisions = args.precisions.split(",") if args.precisions else (["fp32", "bf16"] if device == "cuda" else ["fp32"])
    if not precisions or any(p not in ("fp32", "bf16") for p in precisions):
        raise UsageError(f"--precisions {args.precisions!r}: give a comma list of fp32,bf16")
    if args.threads is not None and args.threads < 1:
        raise UsageError(f"--threads {args.threads}: give at least 1 (default: the usable cores)")
    sample_precisions = precisions + (["bf16"] if args.bf16_cpu and "bf16" not in precisions else [])
    if device == "cpu" and "bf16" in precisions:
        log("note: train.precision=bf16 uses autocast on CUDA only, so a CPU training step runs fp32; bf16 is timed for sampling")
        precisions = [p for p in precisions if p != "bf16"] or ["fp32"]
    threads = min(args.threads or usable_cores(), usable_cores())
    batches = parse_batches(args.batches, presets, defaults["batches"])
    sample_batches = parse_batches(args.sample_batches, presets, defaults["sample_batches"])
    common = {"device": device, "threads": threads, "phases": args.phases, "overrides": list(args.set),
              "distances": ["pseudo_huber", *distances]}  # the reference first

    def rounds(kind: str, preset: str) -> tuple[int, int]:
        warmup, repeats = defaults[f"{kind}_rounds"][preset]
        return (warmup if args.warmup is None else args.warmup), (repeats if args.repeats is None else args.repeats)

    train, sample = [], []
    for preset in presets:
        base = {**common, "preset": preset, "phase_steps": defaults["phase_steps"][preset]}
        variants = [(p, False, batches[preset]) for p in precisions]
        variants += [(precisions[-1], True, [max(batches[preset])])] if args.compile else []
        train += [{**base, "precision": p, "compile": c, "batch": b, "rounds": rounds("train", preset)}
                  for p, c, chosen in variants for b in chosen]
        variants = [(p, False, sample_batches[preset]) for p in sample_precisions]
        variants += [(sample_precisions[-1], True, [max(sample_batches[preset])])] if args.compile else []
        sample += [{**base, "precision": p, "compile": c, "batches": chosen, "rounds": rounds("sample", preset)}
                   for p, c, chosen in variants]
    return {"device": device, "threads": threads, "presets": presets, "batches": batches,
            "distances": common["distances"], "train": [] if "train" in args.skip else train,
            "sample": [] if "sample" in args.skip else sample, "section": args.section or f"throughput-{device}"}


# ====================================================================== markdown
def fmt_ms(times: list[float]) -> str:
    q = statistics.quantiles(times, n=4, method="inclusive") if len(times) > 1 else [times[0], 0, times[0]]
    return f"{statistics.median(times) * 1e3:,.1f} [{q[0] * 1e3:,.1f}-{q[2] * 1e3:,.1f}]"


def train_table(rows: list[dict], device: str) -> str:
    header = ["preset", "batch", "precision", "distance", "ms/step (median [IQR])", "steps/s", "images/s",
              "x pseudo-Huber"] + (["peak CUDA MiB"] if device == "cuda" else []) + ["target"]
    body = []
    for r in rows:
        t, limit = statistics.median(r["times"]), MFD_TARGETS.get(r["preset"]) if r["distance"] == "mfd" else None
        target = "" if limit is None else f"<= {limit:.2f}x: {VERDICT[r['ratio'] <= limit]}"
        memory = [f"{r['peak_mib']:,.0f}"] if device == "cuda" else []
        body.append([r["preset"], r["batch"], r["variant"], LABELS[r["distance"]], fmt_ms(r["times"]), f"{1 / t:.2f}",
                     f"{r['batch'] / t:,.1f}", f"{r['ratio']:.3f}", *memory, target])
    return markdown_table(header, body)


def phase_table(rows: list[dict]) -> str:
    parts = [p for p in STEP_PHASES if any(r["phases"][p] for r in rows if r["phases"])]
    body = [[r["preset"], r["batch"], r["variant"], LABELS[r["distance"]], f"{statistics.median(r['times']) * 1e3:,.1f}"]
            + [f"{r['phases'][p] * 1e3:,.1f}" for p in parts] for r in rows if r["phases"]]
    header = ["preset", "batch", "precision", "distance", "timed step ms"] + [f"{PHASE_LABELS.get(p, p)} ms" for p in parts]
    return markdown_table(header, body) if body else ""


def sample_table(rows: list[dict], device: str) -> str:
    header = ["preset", "batch", "precision", "ms/batch (median [IQR])", "images/s"] + \
        (["peak CUDA MiB"] if device == "cuda" else []) + ["target"]
    body = []
    for r in rows:
        tiny_cpu = r["preset"] == "tiny" and device == "cpu"
        target = f">= {SAMPLING_TARGET:,.0f} images/s: {VERDICT[r['images_s'] >= SAMPLING_TARGET]}" if tiny_cpu else ""
        memory = [f"{r['peak_mib']:,.0f}"] if device == "cuda" else []
        body.append([r["preset"], r["batch"], r["variant"], fmt_ms(r["times"]), f"{r['images_s']:,.0f}", *memory, target])
    return markdown_table(header, body)


def target_lines(state: dict) -> list[str]:
    lines = []
    for r in (r for r in state["train"] if r["distance"] == "mfd"):
        limit = MFD_TARGETS[r["preset"]]
        base = next(b for b in state["train"] if b["distance"] == "pseudo_huber"
                    and (b["preset"], b["batch"], b["variant"]) == (r["preset"], r["batch"], r["variant"]))
        extra = (statistics.median(r["times"]) - statistics.median(base["times"])) * 1e3
        lines.append(f"- MFD step <= {limit:.2f}x pseudo-Huber at {r['preset']} (batch {r['batch']}, {r['variant']}): "
                     f"{VERDICT[r['ratio'] <= limit]} at {r['ratio']:.3f}x, {extra:+,.1f} ms/step.")
    for r in state["sample"]:
        if r["preset"] == "tiny" and state["cfg"]["device"] == "cpu":
            lines.append(f"- tiny 1-step sampling >= {SAMPLING_TARGET:,.0f} images/s on CPU (batch {r['batch']}, "
                         f"{r['variant']}): {VERDICT[r['images_s'] >= SAMPLING_TARGET]} at {r['images_s']:,.0f} images/s.")
    return ["### Targets", "", *lines, ""] if lines else []


def cpu_share_lines(state: dict) -> list[str]:
    if state["cfg"]["device"] != "cpu":
        return []
    seen = {(r["preset"], r["batch"], r["variant"], "train"): r["cpu_share"] for r in state["train"]}
    seen |= {(r["preset"], r["batch"], r["variant"], "sampling"): r["cpu_share"] for r in state["sample"]}
    parts = [f"{kind} {p} B{b} {v} {share:.0%}" for (p, b, v, kind), share in seen.items()]
    return [("CPU share, CPU time / (wall time x threads) over the rounds of each configuration (100% = the process had its cores; "
             f"lower = other jobs competed): {'; '.join(parts)}."), ""] if parts else []


def section_markdown(state: dict) -> str:
    cfg = state["cfg"]
    extra = cfg["section"].removeprefix(f"throughput-{cfg['device']}").strip("-")
    features = f"`tiny_vgg` width {state['tiny_width']} at tiny and `vgg16_bn` at cifar10-ddpmpp, {TARGET_DIM} targets"
    out = [f"## Throughput ({cfg['device'].upper()}{', ' + extra if extra else ''})", "",
           f"Command: `{state['command']}`", "", machine_line(state["info"]),
           (f"Load average before the run: {state['load_before']}; after: {load_average()}. Torch threads: {cfg['threads']}; "
            f"`MALLOC_MMAP_THRESHOLD_`/`MALLOC_TRIM_THRESHOLD_` = {MALLOC_ENV['MALLOC_MMAP_THRESHOLD_']} unless set."), ""]
    if not state["done"]:
        out += ["**Partial: the run had not finished when this was written.**", ""]
    out += [("What is timed: `ayt.train.Trainer.step()` itself, the engine's training step, for a `Trainer` built from a "
             "`Config` (ECT at the AYT reference stage, `objective.q=256`, fixed; continuous CT: `objective.kind=continuous`; MeanFlow: `objective.kind=meanflow`, 75% of draws with r != t; "
             "RAdam, EMA 0.9999) on a synthetic in-memory dataset of random images of the preset's resolution (`data.name=npz`, "
             "no file reading in the step): batch gather, student and no-grad target forwards, distance, backward, "
             "finiteness check, LR schedule, optimizer, EMA (clipping when `optim.grad_clip` is set; it is not here unless the "
             "command sets it). Medians over timed rounds after warm-up rounds; RAdam is first taken past its 5 "
             "unrectified steps with zero gradients. The distances of one (preset, batch, precision) are trainers in one "
             "process, run in interleaved rounds at the same step (same draws); `x pseudo-Huber` is the median of the "
             f"per-round ratios. MFD is `distance.mode=aligned` over MFD with {features}; LPIPS is a VGG16 trunk without "
             "upsampling. Feature networks and the LPIPS trunk have random weights (timing does not depend on weight "
             "values; the real LPIPS weights are not available offline). On the CPU the trainer runs fp32 "
             "(`train.precision=bf16` is CUDA autocast), so bf16 there is timed for sampling only. Compiled variants set "
             "`train.compile=true` (`torch.compile(net, dynamic=False)`)."), ""]
    out += [("Peak CUDA memory: the distance's own resident tensors (network, EMA, optimizer state, distance networks) plus "
             "the most `torch.cuda.max_memory_allocated` rose above the allocation before a step." if cfg["device"] == "cuda"
             else "Peak memory is not measured on the CPU (one process holds every distance's trainer)."), ""]
    out += target_lines(state)
    if state["train"]:
        out += ["### Training step", "", train_table(state["train"], cfg["device"]), ""]
        phases = phase_table(state["train"])
        if phases:
            what = "GPU time of the kernels launched in" if cfg["device"] == "cuda" else "wall time of"
            steps = ", ".join(dict.fromkeys(f"{s['preset']} {s['phase_steps']}" for s in cfg["train"]))
            out += [(f"Per part of the step (`--phases`): the mean {what} each `ayt.step.<part>` profiler range of "
                     f"`Trainer.step` over a few extra profiled steps per distance after the timed rounds ({steps}), so one "
                     "load spike moves a part; the profiler's own cost is included, the timed column has none and is the "
                     "reference. `forwards + distance` is the task's loss: student and "
                     "target forwards (or the JVP) and the distance, with its aligned gradient."), "", phases, ""]
    if state["sample"]:
        out += ["### 1-step sampling", "", ("`ayt.sampling.generate` with the run's 1-step schedule (`schedule_for`, "
                "sigma_max = 80) on the same network, random weights, no gradient."), "",
                sample_table(state["sample"], cfg["device"]), ""]
    out += cpu_share_lines(state)
    if state["failures"]:
        out += ["Failed configurations (see the run's stderr): " + "; ".join(state["failures"]), ""]
    return "\n".join(out)


# ====================================================================== running
def merge(source: str, target: str | None) -> None:
    """Copy every `throughput*` section of the file `source` into the file `target`."""
    if not Path(source).is_file():
        raise UsageError(f"--merge {source}: no such file; give the BENCHMARKS.md a GPU run wrote (e.g. $OUT/BENCHMARKS.md)")
    names = re.findall(r"<!-- (throughput[\w-]*):start -->", Path(source).read_text())
    if not target or not names:
        raise UsageError("--merge needs --write TARGET" if not target else f"{source} holds no throughput section")
    for name in names:
        write_section(target, name, read_section(source, name) or "")
        log(f"copied section {name} from {source} into {target}")


def run_all(args, state: dict, files: dict) -> None:
    """Each configuration in turn; the section is rewritten after each (a timeout keeps what was done)."""
    for kind, runner in (("train", run_train), ("sample", run_sample)):
        for spec in state["cfg"][kind]:
            try:
                state[kind] += runner(spec, files)
            except Exception:  # noqa: BLE001 - one failed configuration (e.g. out of memory) must not stop the rest
                traceback.print_exc()
                state["failures"].append(f"{kind} {describe(spec)}")
            gc.collect()
            torch.cuda.empty_cache() if torch.cuda.is_available() else None
            if args.write:
                write_section(args.write, state["cfg"]["section"], section_markdown(state))


def main(argv: list[str] | None = None) -> None:
    if argv is None and any(k not in os.environ for k in MALLOC_ENV):  # glibc reads these at start-up only
        os.execve(sys.executable, [sys.executable, *sys.argv], {**MALLOC_ENV, **os.environ})
    args = parse_args(argv)
    if args.merge:
        return merge(args.merge, args.write)
    cfg = plan(args)
    torch.set_num_threads(cfg["threads"])
    torch._dynamo.config.recompile_limit = 64  # --compile: every trainer compiles its own network (same code objects)
    state = {"cfg": cfg, "info": machine_info(), "load_before": load_average(), "tiny_width": args.tiny_width,
             "command": "python benchmarks/throughput.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
             "train": [], "sample": [], "failures": [], "done": False}
    log(f"throughput: device {cfg['device']}, {cfg['threads']} threads, load {state['load_before']}")
    with tempfile.TemporaryDirectory() as tmp:
        run_all(args, state, write_inputs(tmp, cfg["presets"], cfg["batches"], cfg["distances"], args.tiny_width))
    state["done"] = True
    print("\n" + section_markdown(state))
    if args.write:
        log(f"wrote section {cfg['section']} of {write_section(args.write, cfg['section'], section_markdown(state))}")


if __name__ == "__main__":
    run_main(main)
