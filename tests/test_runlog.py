"""Run log: JSON lines round trip, crash tolerance, resume truncation, TensorBoard, progress bar."""

from __future__ import annotations

import io
import json
import sys
import types
from pathlib import Path

import pytest
import torch

import ayt.runlog as runlog
from ayt.errors import AytError
from ayt.runlog import Progress, RunLogger, read_log


def test_lines_written_and_read_back(tmp_path: Path) -> None:
    with RunLogger(tmp_path, use_tensorboard=False) as logger:
        logger.log(1, {"loss": 0.5}, images_seen=64)
        logger.log(2, {"loss": torch.tensor(0.25), "lr": 1e-3}, images_seen=128)
        assert len(read_log(tmp_path)) == 2  # flushed after each line
    rows = read_log(tmp_path)
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[1]["loss"] == 0.25 and rows[1]["lr"] == 1e-3 and rows[1]["images_seen"] == 128
    assert rows[0]["time"] > 1e9 and 0 <= rows[0]["wall_s"] <= rows[1]["wall_s"]


def test_truncated_last_line_is_tolerated_and_repaired(tmp_path: Path) -> None:
    log = tmp_path / "log.jsonl"
    log.write_text(json.dumps({"step": 1, "loss": 1.0}) + "\n" + '{"step": 2, "lo')
    assert [r["step"] for r in read_log(tmp_path)] == [1]
    with RunLogger(tmp_path, use_tensorboard=False) as logger:
        logger.log(3, {"loss": 0.1})
    assert [r["step"] for r in read_log(tmp_path)] == [1, 3]


def test_corrupt_middle_line_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "log.jsonl").write_text('{"step": 1}\nnot json\n{"step": 3}\n')
    with pytest.raises(AytError, match="line 2"):
        read_log(tmp_path)
    with pytest.raises(AytError, match="no log.jsonl"):
        read_log(tmp_path / "elsewhere")


def test_resume_truncates_later_entries_and_continues_wall_time(tmp_path: Path) -> None:
    lines = [{"step": s, "time": 0.0, "wall_s": 10.0 * s, "loss": 1.0 / s} for s in (1, 2, 3, 4)]
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    with RunLogger(tmp_path, use_tensorboard=False, resume_step=2) as logger:
        assert [r["step"] for r in read_log(tmp_path)] == [1, 2]
        logger.log(3, {"loss": 0.9})
    rows = read_log(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[0] == lines[0] and rows[2]["loss"] == 0.9 and rows[2]["wall_s"] >= 20.0


def test_reserved_and_non_scalar_metrics_are_refused(tmp_path: Path) -> None:
    with RunLogger(tmp_path, use_tensorboard=False) as logger:
        with pytest.raises(AytError, match="reserved"):
            logger.log(1, {"time": 1.0})
        with pytest.raises(AytError, match="not a number"):
            logger.log(1, {"loss": [1.0, 2.0]})


def test_tensorboard_event_file_created(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    with RunLogger(tmp_path) as logger:
        logger.log(1, {"loss": 0.5})
    events = list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0


def test_missing_tensorboard_warns_and_continues(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # makes `import tensorboard` fail
    monkeypatch.setattr(runlog, "_warned_no_tensorboard", False)
    with pytest.warns(UserWarning, match="tensorboard is not installed"):
        logger = RunLogger(tmp_path)
    logger.log(1, {"loss": 0.5})
    logger.close()
    assert len(read_log(tmp_path)) == 1 and not (tmp_path / "tb").exists()


def test_wandb_missing_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(AytError, match="pip install wandb"):
        RunLogger(tmp_path, use_tensorboard=False, use_wandb=True)


def test_wandb_gets_metrics_and_resumes_same_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple] = []

    class FakeRun:
        id = "abc123"

        def log(self, values, step):
            calls.append(("log", values, step))

        def finish(self):
            calls.append(("finish",))

    def init(**kwargs):
        calls.append(("init", kwargs))
        return FakeRun()

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    with RunLogger(tmp_path, use_tensorboard=False, use_wandb=True, wandb_project="p", config={"a": 1}) as lg:
        lg.log(4, {"loss": 0.5})
    with RunLogger(tmp_path, use_tensorboard=False, use_wandb=True, wandb_project="p", resume_step=4):
        pass
    assert calls[0][1]["project"] == "p" and calls[0][1]["config"] == {"a": 1} and calls[0][1]["id"] is None
    assert ("log", {"loss": 0.5}, 4) in calls and ("finish",) in calls
    assert calls[3][0] == "init" and calls[3][1]["id"] == "abc123" and calls[3][1]["resume"] == "allow"


def test_unwritable_run_dir(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(AytError, match="cannot write the run log"):
        RunLogger(blocker / "run", use_tensorboard=False)


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_shows_rates_on_a_tty() -> None:
    out = _Tty()
    with Progress(total_steps=100, start_step=10, batch_size=32, file=out) as bar:
        bar.update(11, loss=0.1234)
        bar.update(12, loss=0.1)
    text = out.getvalue()
    assert "steps/s" in text and "img/s" in text and "loss 0.1" in text and "12/100" in text


def test_progress_disabled_when_not_tty_or_not_enabled() -> None:
    for out, enabled in ((io.StringIO(), True), (_Tty(), False)):
        bar = Progress(total_steps=10, start_step=0, batch_size=4, enabled=enabled, file=out)
        bar.update(5, loss=1.0)
        bar.close()
        assert not bar.enabled and out.getvalue() == ""
