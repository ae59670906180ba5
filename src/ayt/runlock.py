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
        if not _try_lock(fd, fcntl.LOCK_EX, tries=5):  # a few tries: `check_free` may hold it for a moment
            holder = _read_holder(fd)
            os.close(fd)
            raise AytError(self._busy(holder))
        os.ftruncate(fd, 0)
        os.write(fd, _describe_self().encode())
        self._fd = fd
        return self

    def check_free(self) -> None:
        """AytError naming the holder if another process holds the lock now; takes nothing, writes
        nothing (an early check, so that a refused writer does not first build its data and networks)."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError:
            return  # no lock file: nobody ever trained here
        try:
            if not _try_lock(fd, fcntl.LOCK_SH, tries=1):
                raise AytError(self._busy(_read_holder(fd)))
        finally:
            os.close(fd)  # releases the shared lock

    def _busy(self, holder: str) -> str:
        return (f"run folder {self.run_dir} is in use by {holder}; wait for it to finish (or stop it), "
                "or set train.run_dir to another folder")

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


def _try_lock(fd: int, mode: int, tries: int) -> bool:
    for attempt in range(tries):
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
            return True
        except OSError:
            if attempt + 1 < tries:
                time.sleep(0.02)
    return False


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
