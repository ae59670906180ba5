"""One writer per run folder: an exclusive `fcntl.flock` on ``RUN_DIR/.lock``.

The lock belongs to an open file, so the operating system releases it when the process ends in
any way (`kill -9` included): there is never a stale lock to clean up. The file is never deleted
(deleting a lock file lets two processes lock two different files); it holds one line naming
the holder (pid, command, start time), which a refused second writer prints.

Stdlib only, so that the CLI can take or test the lock without importing torch.
"""

from __future__ import annotations

import fcntl
import os
import sys
import time
from pathlib import Path

from ayt.errors import AytError

LOCK_FILE = ".lock"


class RunLock:
    """An exclusive lock on a run folder, held from `acquire` until `release` or process exit."""

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> RunLock:
        """Lock the (existing) run folder; AytError naming the holder if another process has it."""
        if self._fd is not None:
            return self
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise AytError(f"cannot write to run folder {self.run_dir} ({err.strerror}); choose a writable train.run_dir") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = _read_holder(fd)
            os.close(fd)
            raise AytError(f"run folder {self.run_dir} is in use by {holder}; wait for it to finish (or stop it), "
                           "or set train.run_dir to another folder") from None
        os.ftruncate(fd, 0)
        os.write(fd, _describe_self().encode())
        self._fd = fd
        return self

    def release(self) -> None:
        """Unlock (idempotent). The holder line stays; it is only read while the file is locked."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)  # closing the last descriptor releases the flock

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __del__(self) -> None:
        self.release()


def _describe_self() -> str:
    command = " ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv))[:200]
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    return f"process {os.getpid()} ({command or 'python'}, started {started})\n"


def _read_holder(fd: int) -> str:
    try:
        text = os.pread(fd, 400, 0).decode(errors="replace").strip()
    except OSError:
        text = ""
    return text.splitlines()[0] if text else "another process"
