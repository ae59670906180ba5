"""Helpers shared by the benchmark scripts: machine facts and sections of BENCHMARKS.md.

A section is the text between `<!-- NAME:start -->` and `<!-- NAME:end -->`. `write_section`
replaces it (or appends it, creating the file with a title when missing), so each benchmark
script owns one section and rewrites only that. Standard library only at import time; torch is
imported inside `machine_info`.
"""

from __future__ import annotations

import datetime
import os
import platform
import re
import sys
from pathlib import Path

TITLE = "# Benchmarks\n\nEvery number below comes from the command printed with it (scripts in `benchmarks/`).\n"


def _markers(name: str) -> tuple[str, str]:
    return f"<!-- {name}:start -->", f"<!-- {name}:end -->"


def write_section(path: str | os.PathLike, name: str, markdown: str) -> Path:
    """Put `markdown` between the `name` markers of the file at `path` (replace or append); returns the path.

    The file is locked while it is rewritten, so two scripts updating different sections at the
    same time do not lose each other's text.
    """
    path = Path(path)
    start, end = _markers(name)
    block = f"{start}\n{markdown.strip()}\n{end}"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.DOTALL)
    with open(os.open(path, os.O_RDWR | os.O_CREAT, 0o644), "r+", encoding="utf-8") as fh:
        _lock(fh)
        text = fh.read() or TITLE
        if pattern.search(text):
            text = pattern.sub(lambda _: block, text, count=1)
        else:
            text = text.rstrip("\n") + "\n\n" + block + "\n"
        fh.seek(0)
        fh.truncate()
        fh.write(text)
    return path


def _lock(fh) -> None:
    """Exclusive advisory lock until the file is closed (no-op where fcntl is missing)."""
    try:
        import fcntl
    except ImportError:
        return
    fcntl.flock(fh.fileno(), fcntl.LOCK_EX)


def read_section(path: str | os.PathLike, name: str) -> str | None:
    """The markdown between the `name` markers of the file at `path`, or None when absent."""
    start, end = _markers(name)
    path = Path(path)
    text = path.read_text() if path.is_file() else ""
    match = re.search(re.escape(start) + r"\n?(.*?)\n?" + re.escape(end), text, re.DOTALL)
    return match.group(1) if match else None


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (or platform.processor())."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def usable_cores() -> int:
    """CPU cores this process may run on (affinity-aware)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def load_average() -> str:
    """The 1/5/15-minute load averages as text, e.g. '1.20 0.80 0.50' ('n/a' where unknown)."""
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def machine_info() -> dict:
    """CPU model, usable cores, torch version, GPU name (or None), date and load averages."""
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "cpu": cpu_model(),
        "cores": usable_cores(),
        "torch": torch.__version__,
        "gpu": gpu,
        "python": platform.python_version(),
        "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "load": load_average(),
    }


def machine_line(info: dict) -> str:
    """One markdown line describing the machine of `machine_info()`."""
    gpu = f", GPU {info['gpu']}" if info.get("gpu") else ", no GPU"
    return (f"Machine: {info['cpu']}, {info['cores']} cores{gpu}; torch {info['torch']}, Python {info['python']}; "
            f"{info['date']}; load average (1/5/15 min) {info['load']}.")


from ayt.markdown import markdown_table  # noqa: E402,F401  (the library's one table writer, re-exported)


class UsageError(Exception):
    """Bad command-line input: one line on stderr, exit code 2 (`run_main`)."""


def run_main(main_fn) -> None:
    """Run a benchmark's `main`; bad input (UsageError, or the library's AytError such as a bad
    --device) ends with one line and exit code 2 instead of a traceback."""
    from ayt.errors import AytError

    try:
        main_fn()
    except (UsageError, AytError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
