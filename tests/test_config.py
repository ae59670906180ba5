"""Typed configs: presets resolve, overrides apply, bad input raises one clear error."""

import dataclasses
import math
from pathlib import Path

import pytest

from ayt.config import Config, config_from_dict, load_config, save_config
from ayt.errors import AytError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_defaults_validate_and_round_trip(tmp_path):
    config = load_config()
    save_config(config, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == config


def test_overrides_are_typed_yaml():
    c = load_config(None, ["train.batch_size=8", "distance.c=null", "train.ema_decays=[0.99,0.999]", "optim.lr=1"])
    assert c.train.batch_size == 8 and c.distance.c is None
    assert c.train.ema_decays == [0.99, 0.999]
    assert c.optim.lr == 1.0 and isinstance(c.optim.lr, float)


@pytest.mark.parametrize(
    "override, message",
    [
        (["train.batch_sise=8"], "unknown config key 'train.batch_sise'; did you mean 'batch_size'"),
        (["trian.steps=3"], "unknown config key 'trian'"),
        (["train.batch_size=-4"], "train.batch_size=-4 must be > 0"),
        (["train.batch_size=abc"], "wrong type"),
        (["optim.name=sgd"], "optim.name='sgd' is not valid; choose one of: radam, adam"),
        (["objective.q=1"], "objective.q=1.0 must be > 1"),
        (["train.batch_size=10", "train.grad_accum=3"], "not divisible"),
        (["distance.name=mfd"], "needs distance.features"),
        (["trainsteps"], "section.key=value"),
    ],
)
def test_bad_values_raise_clear_errors(override, message):
    with pytest.raises(AytError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        load_config(None, override)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(AytError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(AytError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(AytError, match="must be a mapping"):
        config_from_dict({"train": 3})


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_preset_resolves(path):
    assert isinstance(load_config(path), Config)


def test_cifar10_ect_preset_is_the_published_recipe():
    c = load_config(CONFIGS / "cifar10-ect.yaml")
    assert c.network.preset == "cifar10-ddpmpp" and c.network.dropout == 0.2
    assert c.train.batch_size == 128 and c.optim.name == "radam" and c.optim.lr == 1e-4
    assert c.train.ema_decays == [0.9999]
    assert (c.objective.p_mean, c.objective.p_std, c.objective.q, c.objective.stage_steps) == (-1.1, 2.0, 2.0, 25000)
    edm = load_config(CONFIGS / "cifar10-edm.yaml")
    assert edm.objective.kind == "edm" and edm.network.dropout == 0.13


def test_ayt_presets_are_the_reference_recipe():
    c = load_config(CONFIGS / "cifar10-ect-ayt.yaml")
    assert (c.distance.name, c.distance.mode, c.distance.form) == ("mfd", "aligned", "reference")
    assert c.objective.q == 256 and c.objective.stage_steps is None and c.train.batch_size == 64
    f = load_config(CONFIGS / "cifar10-features.yaml")
    assert (f.features.arch, f.features.subset, f.features.p, f.features.ramp_steps) == ("vgg16_bn", "all", 0.15, 50000)
    assert f.train.batch_size == 512 and f.train.steps == 400000 and f.optim.lr == 1e-4


def test_exponent_floats_without_a_dot_are_accepted(tmp_path):
    """YAML 1.1 reads 1e-4 and 3e-4 as strings; every float field takes them (issue 14, item 6)."""
    c = load_config(None, ["optim.lr=1e-4", "eval.denoise_sigmas=[2e-1, 1]", "distance.c=5E-3"])
    assert c.optim.lr == 1e-4 and c.eval.denoise_sigmas == [0.2, 1.0] and c.distance.c == 5e-3
    preset = tmp_path / "p.yaml"
    preset.write_text("optim:\n  lr: 3e-4\n  betas: [0.9, 99e-2]\n")
    c = load_config(preset)
    assert c.optim.lr == 3e-4 and isinstance(c.optim.lr, float) and c.optim.betas == [0.9, 0.99]
    with pytest.raises(AytError, match="wrong type"):
        load_config(None, ["optim.lr=1e-4x"])
    with pytest.raises(AytError, match="wrong type"):
        load_config(None, ["train.steps=1e3"])  # an int field stays an int field


@pytest.mark.parametrize("text, value", [(".inf", math.inf), ("-.inf", -math.inf), (".nan", math.nan), ("1e400", math.inf)])
def test_non_finite_numbers_are_refused(text, value):
    with pytest.raises(AytError, match="finite"):
        load_config(None, [f"optim.lr={text}"])
    with pytest.raises(AytError, match="finite"):  # also when built in Python
        Config(optim=dataclasses.replace(Config().optim, lr=value)).validate()


def test_section_that_is_not_a_mapping_and_folder_as_config(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: 5\n")
    with pytest.raises(AytError, match="section 'train' must be a mapping"):
        load_config(bad, ["train.steps=3"])
    with pytest.raises(AytError, match="is a folder"):
        load_config(tmp_path)


def test_retired_key_of_older_runs_is_ignored():
    """train.num_workers was validated but never read; the config.yaml of older runs still holds it."""
    config = config_from_dict({"train": {"num_workers": 4, "steps": 3}})
    assert config.train.steps == 3 and not hasattr(config.train, "num_workers")
