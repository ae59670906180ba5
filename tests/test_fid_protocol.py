"""FID statistics from the field (pytorch-fid, EDM fid-refs): accepted, their unknown provenance
recorded in every FID result and warned about once; ayt files from another pipeline refused."""

from __future__ import annotations

import argparse
import json
import math
import warnings

import numpy as np
import pytest

from ayt.checkpoint import save_checkpoint
from ayt.errors import AytError
from ayt.metrics import evaluate, inception
from ayt.commands.evaluate import add_parsers
from ayt.metrics.evaluate import fid_protocol, load_ref_stats
from ayt.metrics.frechet import FeatureStats
from ayt.metrics.inception import FEATURE_KIND, PIPELINE
from test_evaluate import FakeInception, make

UNKNOWN = "unknown (external mu/sigma file)"


def field_stats(dim: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A mean and a positive definite covariance, as a file from the field would hold."""
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(dim, dim))
    return rng.normal(size=dim), a @ a.T / dim + np.eye(dim)


def pytorch_fid_file(path, dim: int = 16):
    """pytorch-fid --save-stats: np.savez(path, mu=mu, sigma=sigma), mu float32 (mean of float32
    activations), sigma float64 (np.cov)."""
    mu, sigma = field_stats(dim)
    np.savez(path, mu=mu.astype(np.float32), sigma=sigma)
    return path


def edm_file(path, dim: int = 16):
    """EDM fid.py ref: np.savez(dest, mu=mu, sigma=sigma), both float64."""
    mu, sigma = field_stats(dim, seed=1)
    with open(path, "wb") as f:
        np.savez(f, mu=mu, sigma=sigma)
    return path


@pytest.fixture(autouse=True)
def fresh_warnings(monkeypatch):
    monkeypatch.setattr(evaluate, "_WARNED_UNKNOWN", set())


@pytest.mark.parametrize("writer", [pytorch_fid_file, edm_file])
def test_field_files_load_with_unknown_provenance_and_warn_once(tmp_path, writer):
    path = writer(tmp_path / "ref.npz")
    with pytest.warns(UserWarning, match="no provenance .*same Inception network .*FID protocol"):
        stats = load_ref_stats(path, dim=16)
    assert stats.n == 0 and stats.kind == "" and stats.provenance == UNKNOWN
    assert stats.mu.dtype == np.float64 and stats.sigma.shape == (16, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_ref_stats(path, dim=16)  # the same file again: no second warning
    assert fid_protocol(path)["ref_provenance"] == UNKNOWN


def test_ayt_files_record_network_and_pipeline_and_others_are_refused(tmp_path):
    mu, sigma = field_stats()
    FeatureStats(mu, sigma, 100, FEATURE_KIND, pipeline=PIPELINE).save(tmp_path / "ayt.npz")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        stats = load_ref_stats(tmp_path / "ayt.npz", dim=16)
    assert stats.pipeline == PIPELINE and stats.provenance == f"{FEATURE_KIND}; {PIPELINE}"
    FeatureStats(mu, sigma, 100, FEATURE_KIND, pipeline="float images; PyTorch bilinear resize").save(tmp_path / "other.npz")
    with pytest.raises(AytError, match="image pipeline 'float images; PyTorch bilinear resize' .*ayt fid-stats"):
        load_ref_stats(tmp_path / "other.npz", dim=16)
    FeatureStats(mu, sigma, 100, "digits-8/64").save(tmp_path / "digits.npz")
    with pytest.raises(AytError, match="'digits-8/64' features"):
        load_ref_stats(tmp_path / "digits.npz", dim=16)
    pytorch_fid_file(tmp_path / "dims768.npz", dim=8)
    with pytest.raises(AytError, match="8-d features but the Inception pool features are 16-d.*--dims 2048"):
        load_ref_stats(tmp_path / "dims768.npz", dim=16)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    add_parsers(p.add_subparsers(dest="command"))
    return p


def run_folder(tmp_path) -> str:
    net, config = make("shapes", 8, 3)
    info = {"name": "shapes", "resolution": 8, "channels": 3, "num_classes": 0}
    save_checkpoint(tmp_path / "run", 5, {"ema0": net.state_dict()}, {"config": config.to_dict(), "data_info": info})
    return str(tmp_path / "run")


def test_cli_eval_with_a_pytorch_fid_file_records_the_protocol(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(evaluate, "InceptionFeatures", FakeInception)
    run, ref = run_folder(tmp_path), pytorch_fid_file(tmp_path / "cifar10-32x32.npz")
    out = tmp_path / "fid.json"
    args = parser().parse_args(["eval", run, "--metric", "fid", "--ref-stats", str(ref), "--num", "24",
                                "--steps", "1", "2", "--out", str(out)])
    with pytest.warns(UserWarning, match="no provenance") as caught:
        assert args.func(args) == 0
    assert sum("no provenance" in str(w.message) for w in caught) == 1  # two schedules, one warning
    printed = capsys.readouterr().out
    assert f"FID reference: {UNKNOWN}" in printed and f"FID samples: {FEATURE_KIND}; {PIPELINE}" in printed
    record = json.loads(out.read_text())
    assert record["fid_protocol"]["ref_provenance"] == UNKNOWN and record["fid_protocol"]["ref_stats"] == str(ref)
    assert set(record["results"]["1"]) == {"fid"}  # mu/sigma only: no feature rows for KID / precision
    fid_field = record["results"]["1"]["fid"]["mean"]
    # the same mu and sigma in an ayt file give the same FID, now with a known provenance
    mu, sigma = field_stats()
    FeatureStats(mu.astype(np.float32), sigma, 0, FEATURE_KIND, pipeline=PIPELINE).save(tmp_path / "ayt.npz")
    args = parser().parse_args(["eval", run, "--metric", "fid", "--ref-stats", str(tmp_path / "ayt.npz"),
                                "--num", "24", "--out", str(out)])
    assert args.func(args) == 0
    record = json.loads(out.read_text())
    assert record["results"]["1"]["fid"]["mean"] == pytest.approx(fid_field, rel=1e-9)
    assert record["fid_protocol"]["ref_provenance"] == f"{FEATURE_KIND}; {PIPELINE}"


@pytest.mark.slow  # about 2 minutes on 2 shared cores, nearly all of it in sqrtm of the 2048 x 2048 product
def test_eval_with_the_real_inception_network_and_an_edm_style_file(tmp_path, weights_file):
    """torch-fidelity's network with random weights (the real ones are not available offline)."""
    net, config = make("shapes", 8, 3)
    ref = edm_file(tmp_path / "edm-ref.npz", dim=2048)
    with pytest.warns(UserWarning, match="no provenance"), pytest.warns(UserWarning, match="not full rank"):
        metrics = evaluate.evaluate_model(net, config, metric="fid", num_samples=6, batch=6,
                                          inception_weights=weights_file, ref_stats=ref)
    assert list(metrics) == ["fid"] and math.isfinite(metrics["fid"]) and metrics["fid"] > 0


def test_fid_stats_files_carry_the_pipeline(tmp_path, monkeypatch):
    monkeypatch.setattr(inception, "InceptionFeatures", FakeInception)
    out = tmp_path / "stats.npz"
    args = parser().parse_args(["fid-stats", "--data", "shapes", "--resolution", "8", "--num-samples", "40",
                                "--keep-features", "0", "--out", str(out)])
    assert args.func(args) == 0
    assert fid_protocol(out)["ref_provenance"] == f"{FEATURE_KIND}; {PIPELINE}"
    assert fid_protocol(None)["ref_provenance"].startswith(f"{FEATURE_KIND}; {PIPELINE}")
    assert FeatureStats.load(out).pipeline == PIPELINE
