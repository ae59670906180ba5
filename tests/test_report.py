"""`ayt report`: plots per logged quantity, a table holding the logged values, the latest grids."""

import json

from ayt.cli import main
from ayt.images import save_grid

import torch


def fake_run(path, losses, metrics):
    """A run folder as `ayt train` writes it: log.jsonl (+ a sample grid)."""
    (path / "samples").mkdir(parents=True)
    lines = []
    for i, loss in enumerate(losses, 1):
        lines.append({"step": i * 10, "time": 0.0, "wall_s": i * 2.0, "loss": loss, "images_seen": i * 160, "device": "cpu"})
    for i, value in enumerate(metrics, 1):
        coverage = [0.2, 0.5, 0.4][i - 1]
        lines.append({"step": i * 20, "time": 0.0, "wall_s": i * 4.0, "eval/manifold_rms": value, "eval/coverage": coverage, "images_seen": i * 320})
    (path / "log.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    save_grid(torch.zeros(4, 3, 8, 8), path / "samples" / "latest.png")


def test_report_on_two_runs(tmp_path):
    fake_run(tmp_path / "ph", [3.0, 2.0, 1.5, 1.25], [0.30, 0.20])
    fake_run(tmp_path / "mfd", [5.0, 4.0, 3.0, 2.5], [0.25, 0.125])
    out = tmp_path / "report"
    assert main(["report", str(tmp_path / "ph"), str(tmp_path / "mfd"), "--out", str(out)]) == 0
    for name in ("report.md", "loss.png", "eval_manifold_rms.png", "samples-ph.png", "samples-mfd.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    table = (out / "report.md").read_text()
    rows = {line.split("|")[1].strip(): line for line in table.splitlines() if line.startswith("| ph ") or line.startswith("| mfd ")}
    # final and best values of each run, as logged
    assert "| 1.25 | 1.25 |" in rows["ph"] and "| 0.2 | 0.2 |" in rows["ph"]
    assert "| 2.5 | 2.5 |" in rows["mfd"] and "| 0.125 | 0.125 |" in rows["mfd"]
    assert "| 40 | 640 | 8 | cpu |" in rows["ph"]  # steps, images seen, seconds, device of the last entry
    # coverage (logged 0.2 then 0.5): higher is better, so its best is the maximum, not the minimum 0.2
    cols = [c.strip() for c in table.splitlines()[4].split("|")[1:-1]]
    row = [c.strip() for c in rows["ph"].split("|")[1:-1]]
    assert row[cols.index("eval/coverage (best)")] == "0.5" and row[cols.index("eval/coverage (final)")] == "0.5"


def test_report_needs_run_folders(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "no log.jsonl" in capsys.readouterr().err
