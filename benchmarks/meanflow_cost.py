"""Cost per training step of MeanFlow (pixel, MFD) next to ECT pseudo-Huber (method.md section 8).

    python benchmarks/meanflow_cost.py [--batch 16] [--rounds 15] [--warmup 2] [--threads 1]
        [--device cpu|cuda] [--preset tiny|cifar10-ddpmpp] [--precision fp32|bf16]

Each arm owns its network (default: the tiny preset on 16x16 shapes; cifar10-ddpmpp: 32x32
random images, dropout 0.2, VGG16-BN features) (ECT: `Precond`; MeanFlow: `MeanFlowNet`, which has one
more linear map), its EMA and a RAdam optimiser (taken past its non-adaptive first steps, as
`throughput.py` does), and runs one full step as `ayt.train.Trainer` does: the objective on a
batch of images, `.mean().backward()` (under bf16 autocast with `--precision bf16`), the optimiser step and the EMA update.
The arms are timed in interleaved rounds, in rotated order, so a load spike from another job
hits all alike; printed are the median step time of each arm and the median over rounds of its
ratio to ECT. ECT uses the AYT reference stage (q = 256, fixed); MeanFlow the CIFAR-10 setting
(75% of draws with r != t, so the JVP's cost is paid on every example); the MFD feature network
has random weights (timing does not depend on weight values).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from throughput import TARGET_DIM, prewarm_optimizer  # noqa: E402

from ayt.config import OptimConfig  # noqa: E402
from ayt.data import build_dataset  # noqa: E402
from ayt.features.nets import build_feature_net  # noqa: E402
from ayt.losses import Aligned, PseudoHuber  # noqa: E402
from ayt.losses.mfd import MFD  # noqa: E402
from ayt.nets import build_meanflow_network, build_network  # noqa: E402
from ayt.objectives import ECTObjective, MeanFlowObjective  # noqa: E402
from ayt.rng import StepRandom  # noqa: E402
from ayt.runtime import make_optimizer  # noqa: E402
from ayt.train import make_ema, update_ema  # noqa: E402

PRESETS = {"tiny": (16, "tiny_vgg", None), "cifar10-ddpmpp": (32, "vgg16_bn", 0.2)}  # resolution, phi, dropout
ARMS = ("ect_pseudo_huber", "meanflow", "meanflow_mfd")


def build_arm(name: str, preset: str, device: torch.device):
    """(net, EMA, optimizer, objective) of one arm on `device`, seeded."""
    resolution, arch, dropout = PRESETS[preset]
    torch.manual_seed(0)
    if name == "ect_pseudo_huber":
        net = build_network(preset, img_resolution=resolution, in_channels=3, dropout=dropout)
        objective = ECTObjective(PseudoHuber(), q=256.0, stage_steps=None)
    else:
        net = build_meanflow_network(preset, img_resolution=resolution, in_channels=3, dropout=dropout)
        aligned = None
        if name == "meanflow_mfd":
            phi = build_feature_net(arch, in_channels=3, target_dim=TARGET_DIM, resolution=resolution, width=32)
            aligned = Aligned(MFD(net=phi))
        objective = MeanFlowObjective(aligned, p_mean=-2.0, p_std=2.0, ratio=0.75, norm_p=0.75, norm_eps=1e-3)
    net = net.to(device).train()
    optimizer = make_optimizer(OptimConfig(), net.parameters())
    prewarm_optimizer(net, optimizer)
    return net, make_ema(net), optimizer, objective.to(device)


def step_seconds(arm: tuple, x0: torch.Tensor, step: int, precision: str) -> float:
    net, ema, optimizer, objective = arm
    cuda = x0.device.type == "cuda"
    autocast = torch.autocast(x0.device.type, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
    if cuda:
        torch.cuda.synchronize(x0.device)
    start = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    with autocast:
        loss = objective(net, x0, None, step, StepRandom.for_step(0, step, 0, x0.device)).mean()
    loss.backward()
    optimizer.step()
    update_ema(ema, net, 0.99)
    if cuda:
        torch.cuda.synchronize(x0.device)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--rounds", type=int, default=15, help="timed rounds (each arm once per round)")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    resolution = PRESETS[args.preset][0]
    if args.preset == "tiny":
        x0 = build_dataset("shapes", resolution=resolution, num_samples=args.batch, seed=0).images[: args.batch]
    else:
        x0 = torch.rand((args.batch, 3, resolution, resolution), generator=torch.Generator().manual_seed(0)) * 2 - 1
    x0 = x0.to(device)
    arms = {name: build_arm(name, args.preset, device) for name in ARMS}
    times: dict[str, list[float]] = {name: [] for name in ARMS}
    step = 0
    for round_ in range(args.warmup + args.rounds):
        shift = round_ % len(ARMS)
        for name in ARMS[shift:] + ARMS[:shift]:
            seconds = step_seconds(arms[name], x0, step, args.precision)
            step += 1
            if round_ >= args.warmup:
                times[name].append(seconds)
    base = times["ect_pseudo_huber"]
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {args.threads} thread(s)"
    print(f"{args.preset} preset, {resolution}x{resolution}, batch {args.batch}, {args.precision}, {where}, "
          f"{args.rounds} interleaved rounds after {args.warmup} warm-up rounds")
    print("| arm | median ms / step | median ratio to ECT (per round) |")
    print("|---|---|---|")
    for name in ARMS:
        ratio = statistics.median(a / b for a, b in zip(times[name], base))
        print(f"| {name} | {1000 * statistics.median(times[name]):.1f} | {ratio:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
