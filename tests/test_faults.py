"""Faults and bad input (issue 14): what a demanding user does to `ayt`, each case a test.

- a table of bad inputs: each row is one command line; it must end with exit code 2, one line
  naming the problem, no traceback, and every file under the test's folder unchanged (hashed
  before and after; only ``RUN/.lock``, which names the last process that opened a run, may change);
- concurrent writers of one run folder (the lock, including a holder killed with -9);
- NaN / inf at a checkpoint step, a full disk, malicious pickles wherever a file is read;
- kill -9 during each phase of a checkpoint write and at random points, then a bitwise resume
  (slow; the "before latest" phase runs by default).
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from test_checkpoint import _Payload, reseal, write_malicious_pickle
from test_train import ROOT, tiny

import ayt.checkpoint as ckpt
from ayt.checkpoint import find_latest, list_checkpoints, load_checkpoint, save_checkpoint
from ayt.cli import main
from ayt.config import load_config
from ayt.errors import AytError
from ayt.runlock import RunLock
from ayt.train import Trainer, train

COMMON = ["train.batch_size=4", "objective.stage_steps=2", "network.dropout=0.3"]


# ---------------------------------------------------------------- helpers
def folder_hash(root: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under `root` (RUN/.lock excluded)."""
    out = {}
    for path in sorted(root.rglob("*")):
        if path.is_file() and path.name != ".lock":
            out[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
        elif path.is_dir():
            out[str(path.relative_to(root)) + "/"] = "dir"
    return out


def one_line_error(capsys, argv: list[str]) -> str:
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, (argv, code, err)
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


def tamper(run: Path, edit) -> Path:
    """Apply `edit(checkpoint_folder)` to the latest checkpoint of `run`, then reseal its digests."""
    path = find_latest(run)
    edit(path)
    reseal(path)
    return path


# ---------------------------------------------------------------- the world of the table test
@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """A folder with a tiny consistency run (checkpoints at 2 and 4), a feature run, damaged copies
    of the consistency run, and bad input files."""
    root = tmp_path_factory.mktemp("world")
    run = root / "run"
    train(load_config(None, tiny(run, *COMMON, "train.steps=4", "train.checkpoint_every=2")))
    assert main(["train-features", *tiny(root / "feats", "train.steps=2", "train.batch_size=8", "features.width=4",
                                         "features.holdout=16")]) == 0
    sentinel = root / "pwned"

    def nan_weights(path: Path) -> None:
        c = load_checkpoint(path)
        for name in ("net", "ema0"):
            c.modules[name] = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v
                               for k, v in c.modules[name].items()}
        save_checkpoint(path.parent.parent, c.step, c.modules, c.state, c.extra)

    def drop_key(path: Path) -> None:
        saved = json.loads((path / "state.json").read_text())
        del saved["state"]["images_seen"]
        (path / "state.json").write_text(json.dumps(saved))

    for name, edit in [("nan", nan_weights), ("evil", lambda p: write_malicious_pickle(p / "optim.pt", sentinel)),
                       ("nokey", drop_key)]:
        shutil.copytree(run, root / name)
        tamper(root / name, edit)
    shutil.copytree(run, root / "corrupt")
    weights = find_latest(root / "corrupt") / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    (root / "cfgdir").mkdir()
    (root / "train5.yaml").write_text("train: 5\n")
    (root / "text.npz").write_text("not an archive\n")
    np.savez(root / "objects.npz", images=np.array([{"a": 1}], dtype=object))
    write_malicious_pickle(root / "evil.pth", sentinel)
    batches = root / "cifar" / "cifar-10-batches-py"
    batches.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]:
        (batches / name).write_bytes(pickle.dumps({b"data": _Payload(sentinel)}))  # a plain pickle, as CIFAR's
    return root


def rows(w: Path) -> list[tuple[list[str], str]]:
    """(command line, a phrase its one-line error must contain). Paths under `w` (the world)."""
    run, feats, new = str(w / "run"), str(w / "feats"), w / "new"
    grid = str(w / "grid.png")
    return [
        # run folders: never overwritten, resumed only consistently
        (["train", *tiny(w / "run", "train.steps=8")], "already holds a run"),
        (["train", "--resume", run, "train.steps=2"], "train.steps=2 is below the step 4"),
        (["train", "--resume", feats], "is a feature-network run; resume it with 'ayt train-features --resume"),
        (["train-features", "--resume", run], "resume it with 'ayt train --resume"),
        (["train", "--resume", run, "--from-checkpoint", "3"], "no complete checkpoint at step 3; complete checkpoints there: 2, 4"),
        (["train", "--from-checkpoint", "2"], "--from-checkpoint STEP needs --resume"),
        (["train", "--resume", run, "--config", str(ROOT / "configs" / "shapes-ect.yaml")], "drop --config"),
        (["train", "--resume", str(w / "cfgdir")], "no checkpoints there"),
        (["train", "--resume", str(w / "corrupt")], f"'ayt train --resume {w / 'corrupt'} --from-checkpoint 2'"),
        (["train", "--resume", str(w / "nan")], "NaN or infinite weights"),
        (["train", "--resume", str(w / "evil")], "untrusted or corrupted checkpoint: "),
        (["train", "--resume", str(w / "nokey")], "has no 'images_seen'"),
        # configs
        (["train", "--config", str(w / "cfgdir")], "is a folder"),
        (["train", "--config", str(w / "train5.yaml")], "section 'train' must be a mapping"),
        (["train", *tiny(new, "optim.lr=.inf")], "'optim.lr' is inf; give a finite number"),
        (["train", *tiny(new, "train.batch_sise=3")], "did you mean 'batch_size'"),
        (["train", *tiny(new, "eval.best_mode=up")], "eval.best_mode='up' is not valid"),
        (["train", *tiny(new, "train.skip_nonfinite=-1")], "train.skip_nonfinite=-1 must be >= 0"),
        (["train", *tiny(new, f"objective.init={run}", "data.resolution=16")], "was trained on 3x8^2 images, this data is 3x16^2"),
        (["train", *tiny(new, "data.name=npz", f"data.root={w / 'text.npz'}")], "is not an .npz archive"),
        (["train", *tiny(new, "data.name=npz", f"data.root={w / 'objects.npz'}")], "holds pickled object arrays"),
        (["train", *tiny(new, "distance.name=lpips", f"distance.lpips_weights={w / 'evil.pth'}")],
         "untrusted or corrupted LPIPS trunk weights file"),
        (["train", *tiny(new, f"objective.init={w / 'evil'}")], "untrusted or corrupted checkpoint: "),
        (["train", *tiny(new, "eval.every=1", "eval.metric=fid", f"eval.inception_weights={w / 'evil.pth'}")],
         "untrusted or corrupted Inception weights file"),
        (["train", *tiny(new, "eval.every=1", "eval.metric=fid", f"eval.ref_stats={w / 'none.npz'}")],
         "statistics file"),
        (["train", *tiny(new, "eval.every=1", "eval.best_metric=bogus")], "eval.best_metric=bogus is not measured"),
        (["train", *tiny(new, "eval.every=1", "eval.best_metric=fid")], "choose one of: manifold_rms, param_fd"),
        (["train", *tiny(new, "distance.name=mfd", f"distance.features={w / 'evil'}")], "untrusted or corrupted checkpoint: "),
        (["train", *tiny(new, "data.name=cifar10", f"data.root={w / 'cifar'}", "data.resolution=32")],
         "global posix.system is not allowed"),
        # sampling and evaluation
        (["sample", run, "--out", str(w / "missing" / "g.png")], "does not exist; create it first"),
        (["sample", run, "--out", str(w / "g.gif")], "unknown file type '.gif'"),
        (["sample", run, "--npz", str(w / "s.txt")], "unknown file type '.txt'"),
        (["sample", run, "--batch", "0", "--out", grid], "--batch 0"),
        (["sample", run, "--device", "cuda:99", "--out", grid], "--device cuda:99"),
        (["sample", run, "--weights", "ema7", "--out", grid], "has no weights 'ema7'"),
        (["sample", feats, "--out", grid], "is a feature network"),
        (["sample", str(w / "nan"), "--out", grid], "NaN or infinite weights ("),
        (["sample", str(w / "evil"), "--out", grid], "untrusted or corrupted checkpoint: "),
        (["eval", run, "--metric", "fid", "--ref-stats", str(w / "none.npz")], "--ref-stats"),
        (["eval", run, "--metric", "fid", "--ref-stats", str(w / "text.npz")], "is not an .npz archive"),
        (["eval", run, "--metric", "fid", "--ref-stats", str(w / "objects.npz")], "holds pickled object arrays"),
        (["eval", run, "--metric", "fid", "--inception-weights", str(w / "evil.pth")], "untrusted or corrupted Inception weights file"),
        (["eval", run, "--batch", "0"], "--batch 0"),
        (["eval", str(w / "nan")], "NaN or infinite weights"),
        (["tangents", run, "--device", "cuda:99"], "--device cuda:99"),
        (["fid-stats", "--data", "shapes", "--out", str(w / "stats.txt")], "unknown file type '.txt'"),
    ]


N_ROWS = 46


def test_bad_input_table(world, capsys):
    """Every row: exit 2, one line containing its phrase, no traceback, nothing written anywhere."""
    table = rows(world)
    assert len(table) == N_ROWS  # the count quoted in the README
    failures = []
    for argv, phrase in table:
        before = folder_hash(world)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            err = one_line_error(capsys, argv)
        if phrase not in err:
            failures.append((argv[:3], phrase, err))
        assert folder_hash(world) == before, f"{argv} changed files"
    assert failures == []
    assert not (world / "pwned").exists()  # no file ever ran code


# ---------------------------------------------------------------- one writer per run folder
def test_second_writer_is_refused_naming_the_holder(tmp_path, capsys):
    run = tmp_path / "run"
    train(load_config(None, tiny(run, *COMMON, "train.steps=2", "train.checkpoint_every=2")))
    before = folder_hash(tmp_path)
    with RunLock(run):  # the original is "still training"
        err = one_line_error(capsys, ["train", "--resume", str(run), "train.steps=4"])
        assert f"run folder {run} is in use by process {os.getpid()}" in err
        err = one_line_error(capsys, ["train", *tiny(run, "train.steps=4")])  # a fresh one into it
        assert f"is in use by process {os.getpid()}" in err
    assert folder_hash(tmp_path) == before
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    with RunLock(fresh):  # two fresh trainings into one new folder
        assert "is in use by process" in one_line_error(capsys, ["train", *tiny(fresh, "train.steps=2")])
    assert main(["train", "--resume", str(run), "train.steps=4"]) == 0  # released: the resume runs


def test_lock_of_a_killed_process_is_released(tmp_path, capsys):
    """The holder is killed with -9 while it holds the lock: the OS frees it, no stale lock remains."""
    run = tmp_path / "run"
    run.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from ayt.runlock import RunLock; "
                               "lock = RunLock(sys.argv[1]).acquire(); print('locked', flush=True); time.sleep(60)", str(run)],
                              stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(AytError, match=f"in use by process {holder.pid} "):
            RunLock(run).acquire()
    finally:
        holder.kill()
        holder.wait()
    with RunLock(run) as lock:
        assert lock.held


@pytest.mark.slow
def test_resume_while_the_original_trains_is_refused(tmp_path, capsys):
    """A real `ayt train` process in the folder; a --resume and a fresh run into it both get exit 2."""
    run = tmp_path / "run"
    argv = tiny(run, *COMMON, "objective.stage_steps=null", "train.steps=100000", "train.checkpoint_every=5")
    proc = subprocess.Popen([sys.executable, "-m", "ayt", "train", *argv], env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while find_latest(run) is None and time.monotonic() < deadline:
            assert proc.poll() is None, proc.stderr.read()
            time.sleep(0.1)
        before = sorted(p.name for p in (run / "checkpoints").iterdir())
        for argv in (["train", "--resume", str(run)], ["train", *tiny(run, "train.steps=3")]):
            assert f"is in use by process {proc.pid} (" in one_line_error(capsys, argv)
        assert proc.poll() is None  # the original still trains
    finally:
        proc.kill()
        proc.wait()
    assert set(before) <= set(p.name for p in (run / "checkpoints").iterdir()) | {"latest"}
    assert main(["train", "--resume", str(run), f"train.steps={load_checkpoint(run).step + 1}"]) == 0  # lock freed


# ---------------------------------------------------------------- non-finite steps
class _Poison(torch.autograd.Function):
    """Identity forward; the backward pass returns `value` (inf or NaN) gradients."""

    @staticmethod
    def forward(ctx, x, value):
        ctx.value = value
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return torch.full_like(grad, ctx.value), None


def poisoned(trainer: Trainer, steps: set[int], where: str) -> Trainer:
    """Make the loss (where='loss') or only the gradients (where='grad') non-finite at `steps`."""
    task_loss = trainer.task.loss

    def wrapped(model, batch, step, rng):
        loss = task_loss(model, batch, step, rng)
        if step in steps:
            return loss * float("nan") if where == "loss" else _Poison.apply(loss, float("inf"))
        return loss

    trainer.task.loss = wrapped
    return trainer


@pytest.mark.parametrize("where", ["loss", "grad"])
def test_non_finite_step_at_a_checkpoint_stops_and_saves_nothing(tmp_path, where):
    run = tmp_path / "run"
    config = load_config(None, tiny(run, *COMMON, "train.steps=6", "train.checkpoint_every=2"))
    trainer = poisoned(Trainer(config), {3}, where)  # step index 3 ends at done = 4, a checkpoint step
    with pytest.raises(AytError, match=r"at step 3; the step was not applied and nothing non-finite was saved"):
        trainer.run()
    assert [p.name for p in list_checkpoints(run)] == ["step-000000002"] and find_latest(run).name == "step-000000002"
    weights = load_checkpoint(run).modules
    assert all(torch.isfinite(v).all() for sd in weights.values() for v in sd.values() if v.is_floating_point())
    with RunLock(run) as lock:  # released after the error
        assert lock.held


def test_skip_nonfinite_skips_up_to_n_in_a_row(tmp_path):
    run = tmp_path / "run"
    config = load_config(None, tiny(run, *COMMON, "train.steps=4", "train.checkpoint_every=2", "train.skip_nonfinite=2"))
    with pytest.warns(UserWarning, match="step skipped"):
        result = poisoned(Trainer(config), {1, 2}, "loss").run()
    assert result.step == 4
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert log[-1]["skipped_nonfinite"] == 2
    config = load_config(None, tiny(tmp_path / "b", *COMMON, "train.steps=5", "train.skip_nonfinite=2"))
    with pytest.warns(UserWarning), pytest.raises(AytError, match="for 3 steps in a row"):
        poisoned(Trainer(config), {1, 2, 3}, "loss").run()


def test_nan_at_the_first_step_does_not_blame_the_learning_rate(tmp_path):
    config = load_config(None, tiny(tmp_path / "run", *COMMON, "train.steps=2"))
    with pytest.raises(AytError, match="before any weight update, so the learning rate is not the cause"):
        poisoned(Trainer(config), {0}, "loss").run()


# ---------------------------------------------------------------- resume keeps the config of its checkpoint
def test_failed_resume_leaves_config_and_run_unchanged(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *tiny(run, *COMMON, "train.steps=2", "train.checkpoint_every=2")]) == 0
    config_before = (run / "config.yaml").read_text()
    # a resume that diverges at its first step: stops, and the next plain resume is unaffected
    assert "learning rate is not the cause" not in one_line_error(
        capsys, ["train", "--resume", str(run), "train.steps=6", "optim.lr=1e30"])
    assert (run / "config.yaml").read_text() == config_before and load_checkpoint(run).step == 2
    assert load_checkpoint(run).state["config"]["optim"]["lr"] == 1e-4
    assert main(["train", "--resume", str(run), "train.steps=4"]) == 0
    assert "lr: 0.0001" in (run / "config.yaml").read_text() and "steps: 4" in (run / "config.yaml").read_text()


def test_from_checkpoint_continues_exactly(tmp_path, capsys):
    """Resuming from an older checkpoint (the advice after a corrupt latest one) equals a straight run."""
    args = [*COMMON, "train.checkpoint_every=2"]
    straight = tmp_path / "straight"
    train(load_config(None, tiny(straight, *args, "train.steps=4")))
    run = tmp_path / "run"
    train(load_config(None, tiny(run, *args, "train.steps=4")))
    latest = find_latest(run)
    (latest / "weights.safetensors").write_bytes(b"junk")
    advice = one_line_error(capsys, ["train", "--resume", str(run)])
    command = advice.split("continue from it with '")[1].rstrip("'").split()
    assert command[:2] == ["ayt", "train"]
    assert main([*command[1:], "train.steps=4"]) == 0
    assert (run / "checkpoints" / "superseded" / latest.name).is_dir()  # set aside, not deleted
    a, b = load_checkpoint(straight), load_checkpoint(run)
    assert b.step == 4 and all(torch.equal(v, b.modules["net"][k]) for k, v in a.modules["net"].items())


# ---------------------------------------------------------------- best checkpoint
def test_best_checkpoint_follows_eval_best_metric(tmp_path):
    """The first metric rises while the principal one falls: RUN/best follows eval.best_metric."""
    scores = {2: {"manifold_rms": 0.1, "param_fd": 0.8, "coverage": 0.2},
              4: {"manifold_rms": 0.2, "param_fd": 0.3, "coverage": 0.1}}

    def evaluator(net, step):
        return dict(scores[step])

    common = [*COMMON, "train.steps=4", "train.checkpoint_every=4", "eval.every=2"]
    train(load_config(None, tiny(tmp_path / "auto", *common)), evaluator=evaluator)  # shapes: param_fd
    best = load_checkpoint(tmp_path / "auto" / "best")
    assert best.step == 4 and best.state["best"]["best_metric"] == "param_fd"
    log = [json.loads(line) for line in (tmp_path / "auto" / "log.jsonl").read_text().splitlines()]
    assert [r["best_by"] for r in log if "best_by" in r] == ["param_fd (min)"] * 2
    train(load_config(None, tiny(tmp_path / "cov", *common, "eval.best_metric=coverage")), evaluator=evaluator)
    assert load_checkpoint(tmp_path / "cov" / "best").step == 2  # coverage: higher is better
    train(load_config(None, tiny(tmp_path / "rms", *common, "eval.best_metric=manifold_rms", "eval.best_mode=max")),
          evaluator=evaluator)
    assert load_checkpoint(tmp_path / "rms" / "best").step == 4


def test_short_smoke_run_skips_the_final_evaluation(tmp_path):
    calls = []
    train(load_config(None, tiny(tmp_path / "run", *COMMON, "train.steps=2", "eval.every=1000")),
          evaluator=lambda net, step: calls.append(step) or {"fid": 1.0})
    assert calls == []


# ---------------------------------------------------------------- full disk during training
def test_full_disk_during_training(tmp_path, capsys, monkeypatch):
    import errno

    run = tmp_path / "run"
    real = ckpt.save_file

    def fills_up(tensors, path, metadata=None):
        if list_checkpoints(run):  # the disk fills up after the first checkpoint
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, path, metadata=metadata)

    monkeypatch.setattr(ckpt, "save_file", fills_up)
    err = one_line_error(capsys, ["train", *tiny(run, *COMMON, "train.steps=4", "train.checkpoint_every=2")])
    assert "the disk is full: checkpoint step-000000004" in err and "last good checkpoint is" in err
    assert err.rstrip().endswith("free some space, then resume") and "step-000000002" in err
    assert [p.name for p in list_checkpoints(run)] == ["step-000000002"]
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".tmp")]


def test_full_disk_outside_a_checkpoint(tmp_path, capsys, monkeypatch):
    """Disk full while writing a sample grid (or config.yaml, the log): one line, exit 2."""
    import errno

    import ayt.train

    def full(images, path):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(ayt.train, "save_grid", full)
    run = tmp_path / "run"
    err = one_line_error(capsys, ["train", *tiny(run, *COMMON, "train.steps=2", "train.checkpoint_every=1")])
    assert err.startswith("error: the disk is full (writing ") and "samples/step-000000002.png" in err
    assert load_checkpoint(run).step == 1  # the grid of the final step comes before its checkpoint


# ---------------------------------------------------------------- kill -9
KILL_SCRIPT = """
import os, signal, sys
import ayt.checkpoint as c
from ayt.cli import main

phase, at = sys.argv[1], int(sys.argv[2])
calls = {"n": 0}

def die():
    os.kill(os.getpid(), signal.SIGKILL)

def before(name):
    real = getattr(c, name)
    def wrapped(*a, **k):
        if calls["n"] == at:
            die()
        return real(*a, **k)
    setattr(c, name, wrapped)

real_save = c.save_checkpoint
def counting(*a, **k):
    calls["n"] += 1
    return real_save(*a, **k)
c.save_checkpoint = counting
import ayt.train
ayt.train.save_checkpoint = counting

if phase == "temp-folder":        # the temp folder exists, no file written yet
    before("save_file")
elif phase == "after-optim":      # weights, state and optim.pt written, not fsynced
    real_torch_save = c.torch.save
    def save_then_die(*a, **k):
        real_torch_save(*a, **k)
        if calls["n"] == at:
            die()
    c.torch.save = save_then_die
elif phase == "before-complete":  # every file written and fsynced, no COMPLETE marker
    real_fsync = c._fsync
    def fsync_then_die(path):
        real_fsync(path)
        if calls["n"] == at and path.name == c.OPTIM:
            die()
    c._fsync = fsync_then_die
elif phase == "before-latest":    # the folder is in place, `latest` still names the previous one
    before("_write_latest")
elif phase == "before-prune":     # `latest` updated, old checkpoints not pruned yet
    before("_prune")
sys.exit(main(sys.argv[3:]))
"""

KILL_PHASES = ["temp-folder", "after-optim", "before-complete", "before-latest", "before-prune"]
KILL_ARGS = [*COMMON, "train.steps=6", "train.checkpoint_every=2", "train.keep_checkpoints=2"]


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("straight") / "run"
    train(load_config(None, tiny(run, *KILL_ARGS)))
    return run


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}


def assert_bitwise_equal(a: Path, b: Path) -> None:
    x, y = load_checkpoint(a), load_checkpoint(b)
    assert x.step == y.step
    for name, sd in x.modules.items():
        for key, value in sd.items():
            assert torch.equal(value, y.modules[name][key]), (name, key)
    ox, oy = x.extra["optimizer"]["state"], y.extra["optimizer"]["state"]
    assert all(torch.equal(ox[i]["exp_avg"], oy[i]["exp_avg"]) for i in ox)


def resume_to_the_end(run: Path) -> None:
    """Resume after a kill (or start again when no checkpoint was complete) and finish the run."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "latest ... is missing or incomplete" after some kills
        if find_latest(run) is None:
            assert main(["train", *tiny(run, *KILL_ARGS)]) == 0
        else:
            assert main(["train", "--resume", str(run)]) == 0


def kill_during_checkpoint(tmp_path: Path, phase: str, straight: Path) -> None:
    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-c", KILL_SCRIPT, phase, "2", "train", *tiny(run, *KILL_ARGS)],
                          env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    # the checkpoint before the killed save is intact (after `latest` moved on: the new one)
    assert load_checkpoint(run).step == (4 if phase == "before-prune" else 2)
    resume_to_the_end(run)
    assert_bitwise_equal(straight, run)
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith((".tmp", ".old"))]


def test_kill_before_latest_then_resume_is_bitwise(tmp_path, straight_run):
    kill_during_checkpoint(tmp_path, "before-latest", straight_run)


@pytest.mark.slow
@pytest.mark.parametrize("phase", [p for p in KILL_PHASES if p != "before-latest"])
def test_kill_during_each_checkpoint_phase_then_resume_is_bitwise(tmp_path, straight_run, phase):
    kill_during_checkpoint(tmp_path, phase, straight_run)


KILL_SEEDS = [0, 1, 2, 3]


FEATURE_ARGS = ["train.batch_size=8", "features.width=4", "features.holdout=16", "train.steps=6",
                "train.checkpoint_every=2"]


@pytest.mark.slow
def test_kill_train_features_before_complete_then_resume_is_bitwise(tmp_path):
    straight = tmp_path / "straight"
    assert main(["train-features", *tiny(straight, *FEATURE_ARGS)]) == 0
    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-c", KILL_SCRIPT, "before-complete", "2", "train-features",
                           *tiny(run, *FEATURE_ARGS)], env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert load_checkpoint(run).step == 2
    assert main(["train-features", "--resume", str(run)]) == 0
    assert_bitwise_equal(straight, run)


@pytest.mark.slow
@pytest.mark.parametrize("seed", KILL_SEEDS)
def test_kill_at_a_random_moment_then_resume_is_bitwise(tmp_path, straight_run, seed):
    """`ayt train` killed with -9 at a random moment of its run (start-up, a step or a checkpoint)."""
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "ayt", "train", *tiny(run, *KILL_ARGS, "train.checkpoint_every=1")],
                            env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (run / "checkpoints").is_dir() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.01)
    time.sleep(random.Random(seed).uniform(0.0, 1.5))  # somewhere within the first checkpoints
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resume_to_the_end(run)
    assert_bitwise_equal(straight_run, run)
