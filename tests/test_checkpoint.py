"""Checkpoints: bitwise round trips, atomic saves, pruning, corruption and compatibility errors."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import ayt.checkpoint as ckpt
from ayt.checkpoint import (
    check_compatible,
    find_latest,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from ayt.errors import AytError

SRC = Path(ckpt.__file__).resolve().parent


def _modules(seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    sd = net.state_dict()
    ema = {k: v.clone() * 0.5 for k, v in sd.items()}
    return {"net": sd, "ema_0.9999": ema,
            "odd": {"half": torch.randn(2, 3, generator=g).half(), "flags": torch.tensor([True, False]),
                    "bf": torch.randn(5, generator=g).bfloat16(), "nan": torch.tensor([float("nan"), -0.0])}}


def _save(run: Path, step: int, **kw) -> Path:
    return save_checkpoint(run, step, _modules(step), {"step": step, "config": {"lr": 1e-3}}, **kw)


def test_round_trip_is_bitwise(tmp_path: Path) -> None:
    modules = _modules()
    opt_param = nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([opt_param], lr=1e-3, momentum=0.9)
    opt_param.grad = torch.full((3,), 0.5)
    opt.step()
    state = {"config": {"net": {"channels": 32}, "lr": 2e-4}, "images_seen": 1234, "stage": 2,
             "history": [{"step": 10, "fid": 12.5}, {"step": 20, "fid": float("nan")}]}
    extra = {"optim": opt.state_dict(), "sampler": {"epoch": 3, "offset": 17}}
    path = save_checkpoint(tmp_path, 20, modules, state, extra)
    assert path == tmp_path / "checkpoints" / "step-000000020"
    got = load_checkpoint(tmp_path)
    assert got.path == path and got.step == 20
    assert set(got.modules) == set(modules)
    for name, sd in modules.items():
        assert list(got.modules[name]) == list(sd)
        for key, value in sd.items():
            loaded = got.modules[name][key]
            assert loaded.dtype == value.dtype and loaded.shape == value.shape
            assert torch.equal(loaded.reshape(-1).view(torch.uint8), value.reshape(-1).view(torch.uint8))  # bitwise
    assert got.state["config"] == state["config"] and got.state["images_seen"] == 1234
    assert np.isnan(got.state["history"][1]["fid"])
    assert got.extra["sampler"] == {"epoch": 3, "offset": 17}
    opt2 = torch.optim.SGD([nn.Parameter(torch.ones(3))], lr=1e-3, momentum=0.9)
    opt2.load_state_dict(got.extra["optim"])
    buf = opt.state_dict()["state"][0]["momentum_buffer"]
    assert buf.abs().sum() > 0 and torch.equal(opt2.state_dict()["state"][0]["momentum_buffer"], buf)


def test_tied_weights_and_non_contiguous_tensors_save(tmp_path: Path) -> None:
    w = torch.arange(12.0).reshape(3, 4)
    save_checkpoint(tmp_path, 1, {"net": {"a": w, "b": w, "t": w.t()}}, {})
    got = load_checkpoint(tmp_path).modules["net"]
    assert torch.equal(got["a"], w) and torch.equal(got["b"], w) and torch.equal(got["t"], w.t())


def test_optim_file_is_read_weights_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    save_checkpoint(tmp_path, 1, {"net": {"w": torch.zeros(1)}}, {}, {"x": torch.ones(2)})
    assert torch.equal(load_checkpoint(tmp_path).extra["x"], torch.ones(2))
    assert calls and all(kw.get("weights_only") is True for kw in calls)


def test_non_weights_only_extra_is_refused_before_writing(tmp_path: Path) -> None:
    with pytest.raises(AytError, match=r"extra\['gen'\].*weights-only"):
        save_checkpoint(tmp_path, 1, {"net": {"w": torch.zeros(1)}}, {}, {"gen": np.random.default_rng(0)})
    assert list_checkpoints(tmp_path) == []
    with pytest.raises(AytError, match="JSON"):
        save_checkpoint(tmp_path, 1, {"net": {"w": torch.zeros(1)}}, {"bad": object()})


def test_crash_mid_save_keeps_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = _save(tmp_path, 10)
    latest_before = (tmp_path / "checkpoints" / "latest").read_text()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        _save(tmp_path, 20, keep=1)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["latest", "step-000000010"]  # no stray .tmp-*, nothing pruned
    assert (tmp_path / "checkpoints" / "latest").read_text() == latest_before
    assert load_checkpoint(tmp_path).path == first


def test_crash_when_replacing_same_step_keeps_old(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _save(tmp_path, 10)
    monkeypatch.setattr(torch, "save", lambda *a, **k: (_ for _ in ()).throw(OSError("crash")))
    with pytest.raises(OSError):
        save_checkpoint(tmp_path, 10, {"net": {"w": torch.ones(1)}}, {"new": True})
    got = load_checkpoint(tmp_path)
    assert "new" not in got.state and got.step == 10
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step-000000010"]


def test_same_step_is_replaced(tmp_path: Path) -> None:
    _save(tmp_path, 10)
    save_checkpoint(tmp_path, 10, {"net": {"w": torch.ones(1)}}, {"new": True})
    got = load_checkpoint(tmp_path)
    assert got.state == {"new": True} and torch.equal(got.modules["net"]["w"], torch.ones(1))
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000000010"]
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")]


def test_keep_prunes_oldest(tmp_path: Path) -> None:
    for step in (1, 2, 3, 4):
        _save(tmp_path, step, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000000003", "step-000000004"]
    _save(tmp_path, 5, keep=1)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000000005"]
    assert find_latest(tmp_path).name == "step-000000005"


def test_older_step_just_written_is_never_pruned(tmp_path: Path) -> None:
    _save(tmp_path, 50)
    path = _save(tmp_path, 7, keep=1)
    assert path.is_dir() and find_latest(tmp_path) == path
    assert load_checkpoint(tmp_path).step == 7


def test_truncated_weights_is_reported_as_corrupted(tmp_path: Path) -> None:
    older = _save(tmp_path, 1)
    newer = _save(tmp_path, 2)
    weights = newer / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    with pytest.raises(AytError, match=r"corrupted.*weights\.safetensors.*" + re.escape(str(older))):
        load_checkpoint(tmp_path)
    assert load_checkpoint(older).step == 1


def test_corruption_without_older_checkpoint_suggests_fresh_run(tmp_path: Path) -> None:
    path = _save(tmp_path, 3)
    (path / "state.json").write_text("{}")
    with pytest.raises(AytError, match=r"corrupted.*state\.json.*fresh run"):
        load_checkpoint(path)


def test_latest_to_missing_dir_falls_back_with_warning(tmp_path: Path) -> None:
    _save(tmp_path, 1)
    second = _save(tmp_path, 2)
    (tmp_path / "checkpoints" / "latest").write_text("step-000000009\n")
    with pytest.warns(UserWarning, match="newest complete checkpoint"):
        got = load_checkpoint(tmp_path)
    assert got.path == second


def test_incomplete_checkpoint_is_skipped_or_refused(tmp_path: Path) -> None:
    first = _save(tmp_path, 1)
    partial = tmp_path / "checkpoints" / "step-000000002"
    partial.mkdir()
    (tmp_path / "checkpoints" / "latest").write_text(partial.name)
    with pytest.warns(UserWarning, match="incomplete"):
        assert load_checkpoint(tmp_path).path == first
    assert list_checkpoints(tmp_path) == [first]
    with pytest.raises(AytError, match=r"incomplete.*" + re.escape(str(first))):
        load_checkpoint(partial)


def test_no_checkpoint_errors(tmp_path: Path) -> None:
    with pytest.raises(AytError, match="no checkpoint in .*--resume"):
        load_checkpoint(tmp_path)
    with pytest.raises(AytError, match="does not exist"):
        load_checkpoint(tmp_path / "nope")
    assert find_latest(tmp_path) is None and list_checkpoints(tmp_path) == []


def test_unwritable_run_dir_errors_before_writing(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(AytError, match="cannot write checkpoints"):
        _save(blocker / "run", 1)
    assert blocker.read_text() == "not a folder"


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(AytError, match="keep"):
        _save(tmp_path, 1, keep=0)
    with pytest.raises(AytError, match="step"):
        _save(tmp_path, -1)
    with pytest.raises(AytError, match="not a tensor"):
        save_checkpoint(tmp_path, 1, {"net": {"w": 1.0}}, {})
    assert not (tmp_path / "checkpoints" / "latest").exists()


def test_check_compatible(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    check_compatible(model.state_dict(), model, "a")
    other = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2))
    with pytest.raises(AytError, match=r"checkpoint run/x was trained with another architecture: '0\.weight'.*shape.*state\.json"):
        check_compatible(other.state_dict(), model, "run/x")
    fewer = {k: v for k, v in model.state_dict().items() if not k.startswith("2.")}
    with pytest.raises(AytError, match=r"'2\.weight'"):
        check_compatible(fewer, model, "run/x")


# Direct ways to unpickle arbitrary objects; a restricted `pickle.Unpickler` subclass (one that
# overrides find_class, as data/cifar10.py does for the CIFAR batch files) is allowed.
_UNSAFE = re.compile(r"torch\.load\(|pickle\.loads?\(|\bdill\b|\bcloudpickle\b|joblib\.load\(|allow_pickle=True")


def test_only_checkpoint_module_touches_torch_load_or_pickle() -> None:
    offenders = []
    for file in sorted(SRC.rglob("*.py")):
        text = file.read_text()
        if file == SRC / "checkpoint.py":
            loads = re.findall(r"torch\.load\((.*)\)", text)
            assert loads and all("weights_only=True" in args for args in loads)
            assert not re.search(r"\bimport pickle\b|pickle\.", text)
            continue
        unrestricted = "pickle.Unpickler" in text and "def find_class" not in text
        if _UNSAFE.search(text) or unrestricted:
            offenders.append(str(file.relative_to(SRC)))
    assert offenders == [], f"only ayt/checkpoint.py may call torch.load, and only weights-only: {offenders}"


def test_leftovers_of_crashed_saves_are_cleaned(tmp_path: Path) -> None:
    first = _save(tmp_path, 1)
    root = tmp_path / "checkpoints"
    (root / ".tmp-abc").mkdir()
    (root / ".tmp-latest-xyz").write_text("step-000000001")
    first.rename(root / ".old-step-000000001-123")  # crash between the two renames of a replace
    _save(tmp_path, 2)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-000000001", "step-000000002"]
    assert load_checkpoint(first).step == 1


class _Payload:
    """Unpickling this runs `touch SENTINEL` (if anything ever unpickles it without weights_only)."""

    def __init__(self, sentinel: Path) -> None:
        self.sentinel = sentinel

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.sentinel}",))


def write_malicious_pickle(path: Path, sentinel: Path) -> None:
    torch.save({"state": _Payload(sentinel)}, path)


def reseal(checkpoint: Path) -> None:
    """Rewrite COMPLETE's digests so that a tampered file passes the integrity check."""
    import json

    marker = checkpoint / "COMPLETE"
    meta = json.loads(marker.read_text())
    meta["sha256"] = {name: ckpt._sha256(checkpoint / name) for name in meta["sha256"]}
    marker.write_text(json.dumps(meta))


def test_malicious_optim_file_is_refused_in_one_line(tmp_path: Path) -> None:
    path = _save(tmp_path, 1)
    sentinel = tmp_path / "pwned"
    write_malicious_pickle(path / "optim.pt", sentinel)
    reseal(path)
    with pytest.raises(AytError) as info:
        load_checkpoint(tmp_path)
    message = str(info.value)
    assert message.startswith(f"untrusted or corrupted checkpoint: {path / 'optim.pt'}")
    assert "weights_only" not in message and "\n" not in message and not sentinel.exists()
    other = tmp_path / "weights.pth"
    write_malicious_pickle(other, sentinel)
    with pytest.raises(AytError, match="untrusted or corrupted LPIPS trunk weights file") as info:
        ckpt.load_weights_file(other, "LPIPS trunk weights")
    assert "weights_only" not in str(info.value) and not sentinel.exists()


def test_non_finite_weights_are_never_saved_and_refused_on_load(tmp_path: Path) -> None:
    good = _save(tmp_path, 1)
    bad = {"net": {"w": torch.tensor([1.0, float("inf")]), "n": torch.tensor([3])}}
    with pytest.raises(AytError, match=r"refusing to save checkpoint step-000000002: net\.w holds NaN or infinite values; the last good checkpoint is "):
        save_checkpoint(tmp_path, 2, bad, {}, require_finite=True)
    assert list_checkpoints(tmp_path) == [good] and find_latest(tmp_path) == good
    save_checkpoint(tmp_path, 2, bad, {})  # without require_finite: a bitwise store of anything
    with pytest.raises(AytError, match=r"NaN or infinite weights \(w\).*--from-checkpoint 1"):
        ckpt.check_finite(load_checkpoint(tmp_path).modules["net"], find_latest(tmp_path))


def test_full_disk_names_the_good_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    first = _save(tmp_path, 1)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(AytError, match=r"the disk is full: checkpoint step-000000002 .*last good checkpoint is .*step-000000001"):
        _save(tmp_path, 2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step-000000001"]
    assert load_checkpoint(tmp_path).path == first


def test_corruption_advice_is_a_runnable_command(tmp_path: Path) -> None:
    _save(tmp_path, 1)
    newer = _save(tmp_path, 2)
    (newer / "weights.safetensors").write_bytes(b"junk")
    with pytest.raises(AytError, match=re.escape(f"'ayt train --resume {tmp_path} --from-checkpoint 1'")):
        load_checkpoint(tmp_path)


def test_continue_from_sets_newer_checkpoints_aside(tmp_path: Path) -> None:
    for step in (1, 2, 3):
        _save(tmp_path, step)
    moved = ckpt.continue_from(tmp_path, 1)
    assert [p.name for p in moved] == ["step-000000002", "step-000000003"]
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000000001"] and load_checkpoint(tmp_path).step == 1
    assert all((p / "COMPLETE").is_file() for p in moved)  # kept, not deleted
    with pytest.raises(AytError, match="no complete checkpoint at step 7; complete checkpoints there: 1"):
        ckpt.continue_from(tmp_path, 7)


def test_read_state_checks_the_state_digest_and_keys(tmp_path: Path) -> None:
    path = _save(tmp_path, 4)
    assert ckpt.read_state(tmp_path) == (path, 4, {"step": 4, "config": {"lr": 1e-3}})
    (path / "state.json").write_text('{"format": 1, "step": 4, "state": {}}')
    with pytest.raises(AytError, match="does not match its sha256"):
        ckpt.read_state(tmp_path)
    reseal(path)
    assert ckpt.read_state(tmp_path)[2] == {}
    with pytest.raises(AytError, match="has no 'images_seen'"):
        ckpt.require_keys({}, ("images_seen",), path)
