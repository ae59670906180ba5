"""Run logging for the trainer: ``RUN_DIR/log.jsonl``, TensorBoard, optional wandb, a progress bar.

The trainer creates these on rank 0 only. Every `RunLogger.log` call appends one JSON line::

    {"step": 1200, "time": 1764201234.5, "wall_s": 311.2, "loss": 0.031, "images_seen": 76800}

``time`` is the unix time, ``wall_s`` the seconds of run time, continued across resumes. On
resume, ``RunLogger(..., resume_step=k)`` drops the entries with ``step > k`` (written after the
restored checkpoint) so that the log matches the restored state; TensorBoard is told the same
through ``purge_step``.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, TextIO

from tqdm import tqdm

from ayt.files import atomic_write
from ayt.errors import AytError

LOG_FILE = "log.jsonl"
TB_DIR = "tb"
WANDB_ID_FILE = "wandb_id.txt"
_RESERVED = ("step", "time", "wall_s")
HIGHER_IS_BETTER = ("coverage", "precision", "recall", "accuracy")
_warned_no_tensorboard = False


class RunLogger:
    """Append metrics to ``RUN_DIR/log.jsonl`` and, if asked, to TensorBoard and wandb."""

    def __init__(
        self,
        run_dir: str | os.PathLike,
        use_tensorboard: bool = True,
        use_wandb: bool = False,
        wandb_project: str | None = None,
        config: dict[str, Any] | None = None,
        resume_step: int | None = None,
    ) -> None:
        self.run_dir = _make_run_dir(Path(run_dir))
        self.path = self.run_dir / LOG_FILE
        kept = _rewrite_log(self.path, resume_step)
        self._wall_offset = float(kept[-1].get("wall_s", 0.0)) if kept else 0.0
        self._start = time.monotonic()
        self._file: TextIO | None = None
        self._tb: Any = None
        self._wandb: Any = None
        try:
            self._wandb = _open_wandb(self.run_dir, wandb_project, config, resume_step) if use_wandb else None
            self._tb = _open_tensorboard(self.run_dir, resume_step) if use_tensorboard else None
            self._file = open(self.path, "a", encoding="utf-8")
        except BaseException:
            self.close()
            raise

    def log(self, step: int, metrics: dict[str, float], **context: Any) -> None:
        """Append one line {step, time, wall_s, **metrics, **context}; metrics also go to
        TensorBoard/wandb as scalars at `step`. Values may be floats or 0-d tensors."""
        if self._file is None:
            raise AytError("log() called after close(); create a new RunLogger")
        values = {k: _scalar(k, v) for k, v in metrics.items()}
        clash = [k for k in (*values, *context) if k in _RESERVED]
        if clash:
            raise AytError(f"metric name {clash[0]!r} is reserved in the run log; rename it")
        wall = self._wall_offset + time.monotonic() - self._start
        record = {"step": int(step), "time": round(time.time(), 3), "wall_s": round(wall, 3), **values, **context}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        self._log_scalars(int(step), values)

    def _log_scalars(self, step: int, values: dict[str, float]) -> None:
        if self._tb is not None:
            for key, value in values.items():
                self._tb.add_scalar(key, value, step)
        if self._wandb is not None:
            self._wandb.log(values, step=step)

    def close(self) -> None:
        """Flush and close the log file, TensorBoard writer and wandb run (idempotent)."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _make_run_dir(run_dir: Path) -> Path:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=run_dir):
            pass
    except OSError as err:
        raise AytError(f"cannot write the run log to {run_dir} ({err.strerror or err}); pass a writable run folder") from None
    return run_dir


def _scalar(key: str, value: Any) -> float:
    """A metric value as a float (accepts python numbers and 0-d tensors)."""
    try:
        return float(value)
    except (TypeError, ValueError, RuntimeError):
        raise AytError(f"metric {key!r} is a {type(value).__name__}, not a number; log scalars only") from None


def _parse_lines(text: str, path: Path) -> list[tuple[str, dict[str, Any]]]:
    """(raw line, record) pairs; a last line that is unparsable (crash mid-write) is dropped."""
    lines = [line for line in text.split("\n") if line.strip()]
    pairs = []
    for number, line in enumerate(lines, start=1):
        try:
            pairs.append((line, json.loads(line)))
        except ValueError:
            if number == len(lines):
                break  # truncated last line
            raise AytError(f"{path} line {number} is not valid JSON; fix or delete that line") from None
    return pairs


def better_is_higher(key: str) -> bool:
    """Whether a larger value of a logged metric is better (coverage, precision, recall)."""
    return key.rsplit("/", 1)[-1].startswith(HIGHER_IS_BETTER)


def read_log(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """All entries of ``RUN_DIR/log.jsonl`` (or of the given .jsonl file), in file order.

    A truncated last line, left by a crash mid-write, is ignored."""
    path = Path(run_dir)
    path = path if path.is_file() else path / LOG_FILE
    if not path.is_file():
        raise AytError(f"no {LOG_FILE} in {path.parent}; pass a run folder written by `ayt train`")
    return [record for _, record in _parse_lines(path.read_text(encoding="utf-8"), path)]


def _rewrite_log(path: Path, resume_step: int | None) -> list[dict[str, Any]]:
    """Drop a truncated last line and, on resume, the entries with step > `resume_step`. Kept
    lines stay verbatim; the file is rewritten atomically only if it changes. Returns the kept."""
    if not path.is_file():
        return []
    text = path.read_text(encoding="utf-8")
    pairs = _parse_lines(text, path)
    kept = [(line, r) for line, r in pairs if resume_step is None or int(r.get("step", 0)) <= resume_step]
    new_text = "".join(line + "\n" for line, _ in kept)
    if new_text != text:
        atomic_write(path, new_text)
    return [r for _, r in kept]


def _open_tensorboard(run_dir: Path, resume_step: int | None) -> Any:
    """A SummaryWriter on RUN_DIR/tb, or None (with one warning) if tensorboard is missing."""
    global _warned_no_tensorboard
    try:
        import tensorboard  # noqa: F401  (SummaryWriter needs it)
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        if not _warned_no_tensorboard:
            warnings.warn("tensorboard is not installed; logging to log.jsonl only (pip install tensorboard)",
                          stacklevel=3)
            _warned_no_tensorboard = True
        return None
    purge = None if resume_step is None else resume_step + 1
    return SummaryWriter(log_dir=str(run_dir / TB_DIR), purge_step=purge)


def _open_wandb(run_dir: Path, project: str | None, config: dict[str, Any] | None, resume_step: int | None) -> Any:
    """Start (or, on resume, continue) a wandb run whose id is kept in RUN_DIR/wandb_id.txt."""
    try:
        import wandb
    except ImportError:
        raise AytError("wandb logging was asked for but wandb is not installed; pip install wandb "
                       "or turn wandb logging off") from None
    id_file = run_dir / WANDB_ID_FILE
    run_id = id_file.read_text().strip() if resume_step is not None and id_file.is_file() else None
    run = wandb.init(project=project, config=config, dir=str(run_dir), id=run_id,
                     resume="allow" if run_id else None)
    id_file.write_text(str(run.id) + "\n")
    return run


class Progress:
    """A tqdm bar over training steps showing loss, steps/s, images/s and the ETA.

    Disabled (every call a no-op) when `enabled` is False or `file` (default stderr) is not a TTY."""

    def __init__(self, total_steps: int, start_step: int, batch_size: int, enabled: bool = True,
                 file: TextIO | None = None) -> None:
        out = sys.stderr if file is None else file
        self.enabled = bool(enabled) and _is_tty(out)
        self.start_step = start_step
        self.batch_size = batch_size
        self._t0 = time.monotonic()
        self._bar = tqdm(total=total_steps, initial=start_step, file=out, unit="step", dynamic_ncols=True,
                         disable=not self.enabled, smoothing=0.1)

    def update(self, step: int, loss: float | None = None) -> None:
        """Move the bar to `step` (the number of steps done) and refresh the rates."""
        if not self.enabled:
            return
        self._bar.update(step - self._bar.n)
        rate = (step - self.start_step) / max(time.monotonic() - self._t0, 1e-9)
        loss_text = "" if loss is None else f"loss {float(loss):.4g}, "
        self._bar.set_postfix_str(f"{loss_text}{rate:.2f} steps/s, {rate * self.batch_size:.1f} img/s")

    def close(self) -> None:
        self._bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _is_tty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False
