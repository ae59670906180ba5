"""The training runtime: exact resume, 2-process DDP (gloo), CLI smoke runs and bad input."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ayt.build import build_net
from ayt.checkpoint import load_checkpoint
from ayt.cli import main
from ayt.config import load_config
from ayt.train import train

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "data.resolution=8", "data.num_samples=256",
    "network.overrides={model_channels: 16, num_blocks: 1, attn_resolutions: []}",
    "train.grid_size=4", "train.sample_every=0", "train.log_every=1",
    "log.progress=false", "log.tensorboard=false",
]


def tiny(run_dir: Path, *extra: str) -> list[str]:
    return TINY + [f"train.run_dir={run_dir}", *extra]


def test_resume_is_bitwise_identical(tmp_path):
    """A run stopped at step 3 and resumed to 6 equals an uninterrupted run (weights, EMA, optimiser)."""
    common = ["objective.stage_steps=2", "network.dropout=0.3", "train.checkpoint_every=3", "train.batch_size=4"]
    straight = train(load_config(None, tiny(tmp_path / "a", *common, "train.steps=6")))
    train(load_config(None, tiny(tmp_path / "b", *common, "train.steps=3")))
    resumed = train(load_config(None, tiny(tmp_path / "b", *common, "train.steps=6")), resume=True)
    assert straight.step == resumed.step == 6
    a, b = load_checkpoint(tmp_path / "a"), load_checkpoint(tmp_path / "b")
    for name in ("net", "ema0"):
        for key, value in a.modules[name].items():
            assert torch.equal(value, b.modules[name][key]), (name, key)
    opt_a, opt_b = a.extra["optimizer"]["state"], b.extra["optimizer"]["state"]
    assert all(torch.equal(opt_a[i]["exp_avg"], opt_b[i]["exp_avg"]) for i in opt_a)
    # the log was continued, not duplicated
    assert main(["report", str(tmp_path / "b"), "--out", str(tmp_path / "rep")]) == 0


def _run_worker(out: Path, args: list[str], nproc: int) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    cmd = [sys.executable, str(ROOT / "tests" / "ddp_worker.py"), str(out), *args]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *cmd[1:]]
    subprocess.run(cmd, check=True, env=env, timeout=240, capture_output=True)


def test_two_process_gloo_matches_one_process(tmp_path):
    """2 ranks at global batch 8 hold identical weights, equal to 1 process at batch 8 (with dropout:
    rank r takes its slice of the global batch's masks)."""
    args = ["objective.stage_steps=2", "network.dropout=0.3", "train.batch_size=8", "train.steps=6", "train.checkpoint_every=6",
            "train.device=cpu", "optim.lr=0.01"]  # a large rate: the inner layers (and their dropout) matter soon
    (tmp_path / "ddp").mkdir()
    (tmp_path / "one").mkdir()
    _run_worker(tmp_path / "ddp", tiny(tmp_path / "ddp" / "run", *args), nproc=2)
    _run_worker(tmp_path / "one", tiny(tmp_path / "one" / "run", *args), nproc=1)
    r0, r1 = load_file(tmp_path / "ddp" / "rank0.safetensors"), load_file(tmp_path / "ddp" / "rank1.safetensors")
    single = load_file(tmp_path / "one" / "rank0.safetensors")
    torch.manual_seed(0)  # the trainer's initial weights (train.seed = 0)
    start = build_net(load_config(None, tiny(tmp_path, *args)), 8, 3).state_dict()
    moved = 0.0
    for key in r0:
        assert torch.equal(r0[key], r1[key]), key  # DDP keeps ranks in lockstep
        # same data, noise and dropout masks: only the float reduction order differs
        assert torch.allclose(r0[key], single[key], atol=1e-6, rtol=0), key
        moved = max(moved, (single[key] - start[key]).abs().max().item())
    assert moved > 1e-4  # training really changed the weights, so the comparison means something
    ema = load_checkpoint(tmp_path / "ddp" / "run").modules["ema0"]
    assert all(torch.isfinite(v).all() for v in ema.values())


def test_cli_train_then_sample(tmp_path, capsys):
    run = tmp_path / "run"
    # a large rate, so that the zero-initialised output layer carries signal after 3 steps
    assert main(["train", *tiny(run, "train.steps=3", "train.checkpoint_every=2", "optim.lr=0.01")]) == 0
    assert (run / "config.yaml").is_file() and (run / "samples" / "latest.png").is_file()
    assert len(list((run / "checkpoints").glob("step-*"))) == 2
    assert main(["sample", str(run), "-n", "6", "--steps", "2", "--out", str(tmp_path / "g.png"), "--npz", str(tmp_path / "s.npz")]) == 0
    import numpy as np

    images = np.load(tmp_path / "s.npz")["images"]
    assert images.shape == (6, 8, 8, 3) and images.dtype == np.uint8
    assert (tmp_path / "g.png").stat().st_size > 0
    # bf16 autocast sampling runs and agrees with fp32 up to bf16 rounding (uint8 levels)
    # (the raw weights: after 3 steps the EMA is still the initialisation, whose output layer is zero)
    for precision in ("fp32", "bf16"):
        assert main(["sample", str(run), "-n", "6", "--steps", "2", "--weights", "net", "--precision", precision,
                     "--npz", str(tmp_path / f"{precision}.npz")]) == 0
    full, low = (np.load(tmp_path / f"{p}.npz")["images"].astype(float) for p in ("fp32", "bf16"))
    assert low.shape == full.shape and 0 < np.abs(low - full).mean() < 3.0  # autocast was on


def test_cli_dry_run_prints_resolved_config(capsys):
    assert main(["train", "--config", str(ROOT / "configs" / "cifar10-ect.yaml"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "preset: cifar10-ddpmpp" in out and "batch_size: 128" in out and "stage_steps: 25000" in out


def _error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    return err


def test_cli_bad_input_exits_2_with_one_line(tmp_path, capsys):
    assert "did you mean 'batch_size'" in _error(capsys, ["train", "train.batch_sise=3"])
    assert "must be > 0" in _error(capsys, ["train", "train.batch_size=-1"])
    assert "no checkpoints there" in _error(capsys, ["train", "--resume", str(tmp_path)])
    assert "--config configs/shapes-ect.yaml" in _error(capsys, ["train", "configs/shapes-ect.yaml"])
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert "cannot write" in _error(capsys, ["train", *tiny(blocker / "run", "train.steps=1")])


def test_existing_run_is_never_overwritten_and_bad_checkpoints_are_refused(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *tiny(run, "train.steps=2", "train.checkpoint_every=1")]) == 0
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert "already holds a run" in _error(capsys, ["train", *tiny(run, "train.steps=4")])
    # another architecture
    wider = "network.overrides={model_channels: 24, num_blocks: 1, attn_resolutions: []}"
    assert "another architecture" in _error(capsys, ["train", "--resume", str(run), "train.steps=4", wider])
    # a truncated checkpoint
    latest = load_checkpoint(run).path
    weights = latest / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    assert "corrupt" in _error(capsys, ["train", "--resume", str(run), "train.steps=4"])
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before  # nothing deleted


def test_module_entry_point_help():
    out = subprocess.run([sys.executable, "-m", "ayt", "--help"], capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert out.returncode == 0 and "train" in out.stdout and "sample" in out.stdout


_LIGHT_PROBE = """
import contextlib, io, sys
from ayt.cli import main

def code(argv):
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        try:
            return main(argv)
        except SystemExit as exit:  # --help
            return exit.code

codes = [code(["--help"]), code(["train", "--help"]), code(["train", "--config", "configs/cifar10-ect.yaml", "--dry-run"]),
         code(["train", "train.batch_sise=3"]), code(["train", "--config", "configs"])]
print(codes, "torch" in sys.modules)
"""


def test_help_dry_run_and_config_errors_do_not_import_torch():
    """`ayt --help`, `--dry-run` and config errors answer without loading torch (0.1 s instead of 3.5 s)."""
    out = subprocess.run([sys.executable, "-c", _LIGHT_PROBE], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert out.stdout.strip() == "[0, 0, 0, 2, 2] False", out.stdout + out.stderr


def test_cli_ect_with_aligned_mfd(tmp_path, capsys):
    """train-features, then ECT with the aligned MFD of that network, then sampling."""
    feats = tmp_path / "features"
    assert main(["train-features", *tiny(feats, "train.steps=2", "train.batch_size=8", "features.width=4", "features.holdout=16")]) == 0
    run = tmp_path / "ayt"
    argv = tiny(run, "train.steps=2", "distance.name=mfd", "distance.mode=aligned", f"distance.features={feats}")
    assert main(["train", *argv]) == 0
    assert load_checkpoint(run).step == 2
    # a feature network of another resolution is refused before training starts
    other = tmp_path / "other"
    assert "resolution" in _error(capsys, ["train", *tiny(other, "data.resolution=16", "train.steps=1", "distance.name=mfd", "distance.mode=aligned", f"distance.features={feats}")])
    assert not (other / "checkpoints").exists()


@pytest.mark.slow
def test_compiled_training_matches_eager(tmp_path):
    """`train.compile=true` (inductor) trains the ECT model with seeded dropout: the same losses as
    eager to float tolerance, and no recompilation beyond the target's no-grad graph."""
    import torch._dynamo

    common = ["objective.stage_steps=2", "network.dropout=0.3", "train.batch_size=4", "train.steps=4",
              "train.checkpoint_every=4"]
    eager = train(load_config(None, tiny(tmp_path / "eager", *common)))
    torch._dynamo.reset()
    with torch._dynamo.config.patch(recompile_limit=2, fail_on_recompile_limit_hit=True):
        compiled = train(load_config(None, tiny(tmp_path / "compiled", *common, "train.compile=true")))
    torch._dynamo.reset()
    assert compiled.step == 4
    assert abs(compiled.last_loss - eager.last_loss) <= 1e-4 * abs(eager.last_loss)
    a, b = load_checkpoint(tmp_path / "eager"), load_checkpoint(tmp_path / "compiled")
    for key, value in a.modules["net"].items():
        torch.testing.assert_close(b.modules["net"][key], value, rtol=1e-4, atol=1e-5)


def test_step_phases_are_profiler_ranges(tmp_path):
    """`Trainer.step` runs each part inside its `ayt.step.<part>` range (what throughput.py --phases reads)."""
    from torch.profiler import profile

    from ayt.train import STEP_PHASES, Trainer

    trainer = Trainer(load_config(None, tiny(tmp_path / "run", "train.batch_size=2", "train.device=cpu", "optim.grad_clip=1.0")))
    try:
        with profile() as prof:
            trainer.step(0)
    finally:
        trainer.close()
    names = {e.key for e in prof.key_averages()}
    assert {f"ayt.step.{p}" for p in STEP_PHASES} <= names
