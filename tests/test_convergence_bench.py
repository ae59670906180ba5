"""The convergence benchmark's arm sets and report (benchmarks/convergence.py), on synthetic results."""

import sys
from dataclasses import asdict, replace
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import convergence as bench  # noqa: E402


def test_arm_sets_parse_and_replace_the_two_distances():
    arms = bench.parse_arms("pseudo_huber=distance.name=pseudo_huber,distance.mode=pixel;"
                            "mfd=distance.name=mfd,train.ema_decays=[0.9,0.99]")
    assert arms == {"pseudo_huber": ["distance.name=pseudo_huber", "distance.mode=pixel"],
                    "mfd": ["distance.name=mfd", "train.ema_decays=[0.9,0.99]"]}
    labels = [a.label for a in bench.main_arms(replace(bench.NEAR, arms=arms, batches=[64]))]
    assert labels == ["pseudo_huber b64", "mfd b64"]
    assert [a.overrides for a in bench.main_arms(bench.FULL)][::2] == list(bench.MAIN_DISTANCES.values())


def _results() -> dict:
    """Two seeds on digits: MFD is better at every step; the EDM init's FD is best at its first evaluation."""
    budget = replace(bench.NEAR, datasets=["digits"], seeds=[0, 1], ect_steps=4, eval_steps=[2, 4])
    arms = {}
    for arm in bench.main_arms(budget):
        for seed in budget.seeds:
            start = 10.0 if arm.name == "mfd" else 20.0
            curve = [{"step": s, "wall_s": s, "fd_digits": start / s + seed} for s in budget.eval_steps]
            arms[f"digits/{arm.folder}-s{seed}"] = {"dataset": "digits", "arm": arm.name, "batch": arm.batch, "seed": seed,
                                                     "steps": 4, "images": 4 * arm.batch, "wall_s": 4.0, "curve": curve}
    edm = {"kind": "edm", "dataset": "digits", "steps": 40, "batch": 32, "images": 1280, "wall_s": 9.0,
           "curve": [{"step": 20, "wall_s": 4.0, "fd_digits": 5.0}, {"step": 40, "wall_s": 9.0, "fd_digits": 6.0}]}
    machine = {"cpu": "x", "cores": 16, "torch": "2.11", "gpu": "NVIDIA H200", "python": "3.12", "date": "d", "load": "0"}
    return {"budget": asdict(budget), "workers": 8, "device": "cuda", "lpips_skipped": None, "inits": {"digits/edm": edm},
            "arms": arms, "noise": {}, "total_wall_s": 60.0, "machine": machine}


def test_near_report_states_the_gpu_the_init_curve_and_each_step():
    results = _results()
    summary = bench.summarise(results)
    text = bench.markdown(results, summary, {}, "python benchmarks/convergence.py --near --device cuda", None)
    assert text.startswith("## Convergence, near-convergence regime")
    assert "GPU NVIDIA H200" in text and "all on one GPU (cuda)" in text
    assert "- fd_digits: best 5 at step 20 of 40; no later evaluation improves on it (last: 6)." in text
    assert "| mfd b64 | fd_digits | 2 | 5.5 ± 0.71 | 3 ± 0.71 |" in text
    assert summary["digits"]["claims"]["10x/fd_digits"]["reach_step"] == 2  # MFD at step 2 beats pH's final 5.5


def test_arms_need_their_own_budget_name():
    """--arms with a stock budget would overwrite that budget's results and section: refused."""
    with pytest.raises(bench.UsageError, match="name the variant"):
        bench.main(["--arms", "pseudo_huber=distance.name=l2", "--report-only"])


def test_objectives_report_renders_from_the_saved_results(tmp_path, monkeypatch):
    """benchmarks/objectives.py --report-only rebuilds its section (tables, findings, plot) from the JSON."""
    import objectives

    for key, value in bench.MALLOC_ENV.items():  # already set: the script does not re-exec itself
        monkeypatch.setenv(key, value)

    target = tmp_path / "B.md"
    results = tmp_path / "results"
    results.mkdir()
    for name in ("objectives.json", "objectives-notes.md"):
        (results / name).write_text((Path(bench.ROOT) / "benchmarks" / "results" / name).read_text())
    objectives.main(["--report-only", "--results", str(results), "--write", str(target)])
    text = target.read_text()
    assert "<!-- objectives:start -->" in text and "| scratch | meanflow |" in text and "### Findings" in text
