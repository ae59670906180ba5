"""End to end: evaluate_model / build_evaluator / evaluate_runs on tiny random-weight nets, and the CLI."""

from __future__ import annotations

import argparse
import json
import math

import pytest
import torch

from ayt.build import build_net
from ayt.checkpoint import save_checkpoint
from ayt.config import Config, DataConfig, NetworkConfig
from ayt.data import build_dataset
from ayt.errors import AytError
from ayt.metrics import classifier, evaluate, inception
from ayt.commands.evaluate import add_parsers
from ayt.metrics.evaluate import build_evaluator, evaluate_model, evaluate_runs
from ayt.sampling import schedule_for, stream
from ayt.metrics.frechet import FeatureStats

SMALL_NET = {"model_channels": 16}



def make(data: str, resolution: int, channels: int, kind: str = "ect") -> tuple[torch.nn.Module, Config]:
    config = Config(data=DataConfig(name=data, resolution=resolution, num_samples=64 if data == "shapes" else None),
                    network=NetworkConfig(preset="tiny", overrides=dict(SMALL_NET)))
    config.objective.kind = kind
    torch.manual_seed(0)
    return build_net(config, resolution, channels).eval(), config


def finite(metrics: dict[str, float]) -> bool:
    return all(isinstance(v, float) and math.isfinite(v) for v in metrics.values())


class FakeInception:
    """Stands in for Inception: a fixed random projection of the pixels to 16 features."""

    kind, dim = inception.FEATURE_KIND, 16

    def __init__(self, weights=None, device="cpu", batch=64):
        self.projection = None

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = images.flatten(1).float().cpu()
        if self.projection is None:
            self.projection = torch.randn(x.shape[1], 16, generator=torch.Generator().manual_seed(0))
        return x @ self.projection


def test_generate_streams_batches_deterministically():
    net, config = make("shapes", 8, 3)
    schedule = schedule_for(config, "2")
    batches = list(stream(net, schedule, 10, batch=4, seed=3))
    assert [len(b) for b in batches] == [4, 4, 2] and batches[0].shape[1:] == (3, 8, 8)
    torch.testing.assert_close(torch.cat(batches), torch.cat(list(stream(net, schedule, 10, batch=10, seed=3))))


def test_shapes_end_to_end_with_denoising():
    net, config = make("shapes", 8, 3)
    metrics = evaluate_model(net, config, num_samples=16, denoise_sigmas=[0.4])
    assert list(metrics) == ["manifold_rms", "param_fd", "param_swd", "coverage", "manifold_rms_denoise_0.4"]
    assert finite(metrics) and metrics["manifold_rms"] > 0


def test_digits_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setenv("AYT_CACHE", str(tmp_path))
    monkeypatch.setattr(classifier, "EPOCHS", 1)  # the pipeline, not the classifier (tested on its own)
    net, config = make("digits", 8, 1)
    metrics = evaluate_model(net, config, num_samples=80)
    assert list(metrics) == ["fd_digits", "kid_digits"] and finite(metrics)
    assert (tmp_path / "digits-classifier-8.safetensors").is_file()


def test_edm_models_use_heun_sampling():
    net, config = make("shapes", 8, 3, kind="edm")
    metrics = evaluate_model(net, config, num_samples=8, heun_steps=2)
    assert finite(metrics)


def test_fid_family_plumbing_with_reference_statistics(tmp_path, monkeypatch):
    monkeypatch.setattr(evaluate, "InceptionFeatures", FakeInception)
    net, config = make("shapes", 8, 3)
    metrics = evaluate_model(net, config, metric="fid", num_samples=32, denoise_sigmas=[0.2])
    assert list(metrics) == ["fid", "kid", "kid_std", "precision", "recall", "fid_denoise_0.2"] and finite(metrics)
    # the same scores from a saved statistics file (no data needed)
    images = build_dataset("shapes", resolution=8, num_samples=64).images
    stats = evaluate.reference_stats(FakeInception(), images, inception.FEATURE_KIND)
    path = stats.save(tmp_path / "ref.npz")
    from_file = evaluate_model(net, config, metric="fid", num_samples=32, ref_stats=path)
    assert from_file["fid"] == pytest.approx(metrics["fid"], rel=1e-6)


def test_fid_without_reference_or_data_raises(monkeypatch):
    monkeypatch.setattr(evaluate, "InceptionFeatures", FakeInception)
    net, config = make("shapes", 8, 3)
    config.data = DataConfig(name="cifar10", root="/nonexistent", resolution=8)
    with pytest.raises(AytError, match="--ref-stats"):
        evaluate_model(net, config, num_samples=8)


def test_build_evaluator_has_the_trainer_signature():
    net, config = make("shapes", 8, 3)
    config.eval.num_samples = 16
    dataset = build_dataset("shapes", resolution=8, num_samples=64)
    evaluator = build_evaluator(config, dataset)
    first, second = evaluator(net, 10), evaluator(net, 20)
    assert next(iter(first)) == "manifold_rms" and finite(first)
    assert first == second  # fixed noise and reference: comparable across steps
    config.eval.metric = "none"
    assert build_evaluator(config, dataset) is None


def test_evaluate_runs_summaries():
    net, config = make("shapes", 8, 3)
    runs = evaluate_runs(net, config, runs=2, num_samples=8)
    summary = runs["manifold_rms"]
    assert len(summary["values"]) == 2 and summary["min"] <= summary["mean"] <= summary["max"]
    assert summary["values"][0] != summary["values"][1]  # independent noise per run


def test_unknown_or_mismatched_metric_raises():
    net, config = make("shapes", 8, 3)
    with pytest.raises(AytError, match="unknown metric 'bogus'"):
        evaluate_model(net, config, metric="bogus", num_samples=4)
    with pytest.raises(AytError, match="1-channel digits"):
        evaluate_model(net, config, metric="fd_digits", num_samples=4)


# ---------------------------------------------------------------- CLI
def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    add_parsers(p.add_subparsers(dest="command"))
    return p


def save_run(tmp_path, modules_key: str = "ema0") -> str:
    net, config = make("shapes", 8, 3)
    info = {"name": "shapes", "resolution": 8, "channels": 3, "num_classes": 0}
    save_checkpoint(tmp_path / "run", 5, {modules_key: net.state_dict()}, {"config": config.to_dict(), "data_info": info})
    return str(tmp_path / "run")


def test_cli_eval_writes_table_and_json(tmp_path, capsys):
    run = save_run(tmp_path)
    out = tmp_path / "results.json"
    args = parser().parse_args(["eval", run, "--num", "8", "--steps", "1", "2", "--runs", "2", "--out", str(out)])
    assert args.func(args) == 0
    table = capsys.readouterr().out
    assert "| schedule | manifold_rms |" in table and "| 2 |" in table
    record = json.loads(out.read_text())
    assert set(record["results"]) == {"1", "2"} and len(record["results"]["1"]["param_fd"]["values"]) == 2


def test_cli_eval_bad_input(tmp_path):
    run = save_run(tmp_path)
    with pytest.raises(AytError, match="separate them by spaces"):
        args = parser().parse_args(["eval", run, "--steps", "1,2"])
        args.func(args)
    with pytest.raises(AytError, match="--denoise"):
        args = parser().parse_args(["eval", run, "--denoise", "0.2,x"])
        args.func(args)
    no_ema = save_run(tmp_path / "raw", modules_key="net")
    with pytest.raises(AytError, match="no EMA"):
        args = parser().parse_args(["eval", no_ema, "--num", "4"])
        args.func(args)


def test_cli_fid_stats(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(inception, "InceptionFeatures", FakeInception)
    out = tmp_path / "stats.npz"
    args = parser().parse_args(["fid-stats", "--data", "shapes", "--resolution", "8", "--num-samples", "40",
                                "--keep-features", "30", "--out", str(out)])
    assert args.func(args) == 0 and "40 images" in capsys.readouterr().out
    stats = FeatureStats.load(out, kind=inception.FEATURE_KIND)
    assert stats.n == 40 and stats.dim == 16 and stats.features.shape == (30, 16)
