"""The perturbation benchmark's measurement on the known shapes manifold (benchmarks/perturbations.py)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import perturbations  # noqa: E402


def test_on_and_off_manifold_perturbations_of_shapes():
    """Hue rotation recolours an ellipse (another valid shape); additive noise leaves the manifold."""
    rows = perturbations.measure(num=12, resolution=16, seed=0)
    assert rows["none"]["off"] < 0.01  # clean renderings fit (near) exactly
    assert rows["hue"]["off_fraction"] < 0.1 and rows["hue"]["change"] > 0.05
    assert rows["noise"]["off_fraction"] > 0.9
    assert rows["blur"]["off_fraction"] > rows["rotation"]["off_fraction"]


def test_throughput_times_the_trainer_step_and_merges_sections(tmp_path):
    """benchmarks/throughput.py: one round of `Trainer.step()` per distance, the profiled parts, the section, --merge."""
    import torch

    import throughput

    threads = torch.get_num_threads()
    out = tmp_path / "BENCHMARKS.md"
    throughput.main(["--device", "cpu", "--presets", "tiny", "--batches", "2", "--distances", "pseudo_huber,mfd",
                     "--warmup", "0", "--repeats", "1", "--phases", "--skip", "sample", "--threads", str(threads),
                     "--write", str(out), "--section", "throughput-cpu-test"])
    text = out.read_text()
    assert "<!-- throughput-cpu-test:start -->" in text and "**Partial" not in text
    assert "| tiny | 2 | fp32 | MFD aligned (AYT) |" in text and "forwards + distance ms" in text
    merged = tmp_path / "merged.md"
    throughput.main(["--merge", str(out), "--write", str(merged)])
    assert "<!-- throughput-cpu-test:end -->" in merged.read_text()


def test_throughput_bad_input_is_one_line_and_exit_2(capsys):
    """Bad input (unknown distance or preset, bad precision, batch list, thread count or --merge file)
    ends with one `error:` line naming the fix, exit code 2."""
    import pytest

    import throughput
    from common import run_main

    cases = ((["--distances", "bogus"], "pseudo_huber"), (["--presets", "nope"], "tiny"),
             (["--precisions", "fp16"], "fp32,bf16"), (["--batches", "tiny=abc"], "whole numbers"),
             (["--batches", "0"], "positive"), (["--threads", "0"], "at least 1"),
             (["--merge", "/no/such/BENCHMARKS.md", "--write", "x.md"], "no such file"))
    for argv, named in cases:
        with pytest.raises(SystemExit) as exit_info:
            run_main(lambda: throughput.main(["--device", "cpu", *argv]))
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and named in err and "\n" not in err
