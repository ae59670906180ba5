"""EDM network pickles: read without running their code, every weight mapped, usable everywhere.

The files here are built by the tests in EDM's on-disk format: `pickle` of a dict whose networks
are persistent records `torch_utils.persistence._reconstruct_persistent_obj(meta)` carrying
module source, with EDM's module tree and names (`enc.16x16_block0.conv0.weight`, ...). The
fake `torch_utils.persistence` is importable while the tests run, so a plain `pickle.load` of
these files *would* run code: the embedded source and the reconstruct hook both write a marker
file. The tests check that `ayt` never does.

With real files: `AYT_EDM_PKL=edm-cifar10-32x32-uncond-vp.pkl pytest -m real_files` checks the
conversion of a published file; `AYT_EDM_REPO=PATH_TO_NVLABS_EDM_CLONE pytest -m real_files`
builds networks with EDM's own code and checks `ayt`'s outputs against EDM's.
"""

from __future__ import annotations

import copy
import os
import pickle
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from ayt.build import build_net, load_model
from ayt.errors import AytError
from ayt.nets.edm_pickle import edm_network, read_edm_pickle

MARKER = Path(os.environ.get("PYTEST_EDM_MARKER_DIR", "/tmp")) / f"ayt-edm-marker-{os.getpid()}"


# ------------------------------------------------------------------------- EDM-format writer
def _reconstruct(meta):  # what EDM's hook would do first: run code. Here: leave a marker.
    MARKER.write_text("reconstruct hook ran")
    raise RuntimeError("code from the pickle ran")


@pytest.fixture(autouse=True)
def fake_persistence(monkeypatch):
    """`torch_utils.persistence._reconstruct_persistent_obj` importable, as on a machine with EDM."""
    pkg, mod = types.ModuleType("torch_utils"), types.ModuleType("torch_utils.persistence")
    _reconstruct.__module__, _reconstruct.__qualname__ = "torch_utils.persistence", "_reconstruct_persistent_obj"
    mod._reconstruct_persistent_obj = _reconstruct
    pkg.persistence = mod
    monkeypatch.setitem(sys.modules, "torch_utils", pkg)
    monkeypatch.setitem(sys.modules, "torch_utils.persistence", mod)
    MARKER.unlink(missing_ok=True)
    yield
    MARKER.unlink(missing_ok=True)


EVIL_SOURCE = f"open({str(MARKER)!r}, 'w').write('module source ran')\n"


class Persistent(nn.Module):
    """Stand-in for an EDM persistent class: pickles as `_reconstruct_persistent_obj(meta)`."""

    def __init__(self, class_name: str, **init_kwargs):
        super().__init__()
        self._edm_class, self._init_args, self._init_kwargs = class_name, (), copy.deepcopy(init_kwargs)

    def __reduce__(self):
        state = dict(self.__dict__)
        meta = dict(type="class", version=6, module_src=EVIL_SOURCE, class_name=state.pop("_edm_class"), state=state)
        return _reconstruct, (meta,)


def _param(*shape):
    return nn.Parameter(torch.randn(*shape) * 0.1)


def linear(cin, cout, bias=True):
    m = Persistent("Linear", in_features=cin, out_features=cout, bias=bias)
    m.weight, m.bias = _param(cout, cin), (_param(cout) if bias else None)
    return m


def conv(cin, cout, kernel, up=False, down=False, taps=(1, 1), fused=False):
    m = Persistent("Conv2d", in_channels=cin, out_channels=cout, kernel=kernel, up=up, down=down,
                   resample_filter=list(taps), fused_resample=fused)
    m.weight, m.bias = _param(cout, cin, kernel, kernel), _param(cout)
    f = torch.tensor(taps, dtype=torch.float32)
    m.register_buffer("resample_filter", (torch.outer(f, f) / f.sum() ** 2)[None, None] if up or down else None)
    return m


def group_norm(c):
    m = Persistent("GroupNorm", num_channels=c, eps=1e-6)
    m.weight, m.bias = nn.Parameter(1 + torch.randn(c) * 0.1), _param(c)
    return m


def block(cin, cout, emb, up=False, down=False, attention=False, taps=(1, 1)):
    m = Persistent("UNetBlock", in_channels=cin, out_channels=cout, emb_channels=emb, up=up, down=down,
                   attention=attention, skip_scale=np.sqrt(0.5))  # a numpy scalar, as in EDM's kwargs
    m.norm0, m.conv0 = group_norm(cin), conv(cin, cout, 3, up, down, taps)
    m.affine, m.norm1, m.conv1 = linear(emb, cout), group_norm(cout), conv(cout, cout, 3)
    if cin != cout or up or down:
        m.skip = conv(cin, cout, 1, up, down, taps)
    if attention:
        m.norm2, m.qkv, m.proj = group_norm(cout), conv(cout, 3 * cout, 1), conv(cout, cout, 1)
    return m


def edm_songunet(res=16, ch=3, label_dim=0, mc=16, mult=(1, 2), blocks=1, attn=(8,), ncsn=False, augment_dim=9):
    """EDM's SongUNet module tree and names (training/networks.py), for DDPM++ or NCSN++."""
    taps = (1, 3, 3, 1) if ncsn else (1, 1)
    kw = dict(img_resolution=res, in_channels=ch, out_channels=ch, label_dim=label_dim, augment_dim=augment_dim,
              model_channels=mc, channel_mult=list(mult), num_blocks=blocks, attn_resolutions=list(attn), dropout=0.13,
              embedding_type="fourier" if ncsn else "positional", channel_mult_noise=2 if ncsn else 1,
              encoder_type="residual" if ncsn else "standard", decoder_type="standard", resample_filter=list(taps))
    net = Persistent("SongUNet", **kw)
    emb, noise = mc * 4, mc * (2 if ncsn else 1)
    net.map_noise = Persistent("FourierEmbedding" if ncsn else "PositionalEmbedding", num_channels=noise)
    if ncsn:
        net.map_noise.register_buffer("freqs", torch.randn(noise // 2) * 16)
    net.map_label = linear(label_dim, noise) if label_dim else None
    net.map_augment = linear(augment_dim, noise, bias=False) if augment_dim else None
    net.map_layer0, net.map_layer1 = linear(noise, emb), linear(emb, emb)
    net.enc, net.dec = nn.ModuleDict(), nn.ModuleDict()
    cout, caux = ch, ch
    for level, m in enumerate(mult):
        r = res >> level
        if level == 0:
            net.enc[f"{r}x{r}_conv"], cout = conv(cout, mc, 3), mc
        else:
            net.enc[f"{r}x{r}_down"] = block(cout, cout, emb, down=True, taps=taps)
            if ncsn:
                net.enc[f"{r}x{r}_aux_residual"], caux = conv(caux, cout, 3, down=True, taps=taps, fused=True), cout
        for i in range(blocks):
            net.enc[f"{r}x{r}_block{i}"], cout = block(cout, mc * m, emb, attention=r in attn), mc * m
    skips = [b._init_kwargs.get("out_channels") for n, b in net.enc.items() if "aux" not in n]
    for level, m in reversed(list(enumerate(mult))):
        r = res >> level
        if level == len(mult) - 1:
            net.dec[f"{r}x{r}_in0"] = block(cout, cout, emb, attention=True)
            net.dec[f"{r}x{r}_in1"] = block(cout, cout, emb)
        else:
            net.dec[f"{r}x{r}_up"] = block(cout, cout, emb, up=True, taps=taps)
        for i in range(blocks + 1):
            cin, cout = cout + skips.pop(), mc * m
            net.dec[f"{r}x{r}_block{i}"] = block(cin, cout, emb, attention=i == blocks and r in attn)
        if level == 0:
            net.dec[f"{r}x{r}_aux_norm"], net.dec[f"{r}x{r}_aux_conv"] = group_norm(cout), conv(cout, ch, 3)
    return net


def write_edm_pickle(path: Path, precond: str = "EDMPrecond", **unet) -> nn.Module:
    """Write `{"ema": EDMPrecond(SongUNet), "loss_fn": ..., "augment_pipe": ..., "dataset_kwargs": ...}` as EDM does."""
    model = edm_songunet(**unet)
    ema = Persistent(precond, img_resolution=model._init_kwargs["img_resolution"], img_channels=3,
                     label_dim=model._init_kwargs["label_dim"], use_fp16=False, sigma_data=0.5, model_type="SongUNet")
    ema.model = model
    data = dict(ema=ema.eval().requires_grad_(False), loss_fn=Persistent("EDMLoss", P_mean=-1.2),
                augment_pipe=Persistent("AugmentPipe", p=0.12), dataset_kwargs=dict(class_name="ImageFolderDataset"))
    with path.open("wb") as f:
        pickle.dump(data, f)
    return model


def _edm_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if not k.startswith("map_augment") and "resample_filter" not in k}


# ------------------------------------------------------------------------- tests
@pytest.mark.parametrize("ncsn", [False, True], ids=["ddpmpp", "ncsnpp"])
@pytest.mark.parametrize("label_dim", [0, 10])
def test_edm_pickle_loads_every_weight_without_running_code(tmp_path, ncsn, label_dim):
    path = tmp_path / "edm.pkl"
    model = write_edm_pickle(path, ncsn=ncsn, label_dim=label_dim)
    with path.open("rb") as f:  # the file is dangerous: a plain unpickler runs its code
        with pytest.raises(RuntimeError, match="code from the pickle ran"):
            pickle.load(f)
    assert MARKER.exists()
    MARKER.unlink()

    net, arch = edm_network(path)
    assert not MARKER.exists()
    ours = net.net.state_dict()
    edm = _edm_tensors(model)
    assert len(ours) == len(edm) and sum(v.numel() for v in ours.values()) == sum(v.numel() for v in edm.values())
    # every EDM tensor lands, bit for bit, in exactly one ayt tensor (the random values are unique)
    ours_by_value = {tuple(v.flatten()[:4].tolist()) + (v.numel(),): v for v in ours.values()}
    for key, value in edm.items():
        twin = ours_by_value[tuple(value.flatten()[:4].tolist()) + (value.numel(),)]
        assert torch.equal(twin, value), key
    # and in the right place
    assert torch.equal(ours["enc.0.conv.weight"], edm["enc.16x16_conv.weight"])
    assert torch.equal(ours["enc.1.conv0.conv.weight"], edm["enc.16x16_block0.conv0.weight"])
    assert torch.equal(ours["dec.0.attention.qkv.conv.weight"], edm["dec.8x8_in0.qkv.weight"])
    assert torch.equal(ours["dec.0.attention.norm.bias"], edm["dec.8x8_in0.norm2.bias"])
    assert torch.equal(ours["out_conv.conv.bias"], edm["dec.16x16_aux_conv.bias"])
    assert torch.equal(ours["out_norm.weight"], edm["dec.16x16_aux_norm.weight"])
    if ncsn:
        assert torch.equal(ours["enc_residual.0.conv.weight"], edm["enc.8x8_aux_residual.weight"])
        assert torch.equal(ours["map_noise.freqs"], edm["map_noise.freqs"])
    assert any("map_augment" in note for note in arch.notes)
    assert net.label_dim == label_dim and net.sigma_data == 0.5 and net.boundary == "edm"


def as_edm_records(module: nn.Module) -> nn.Module:
    """The same tree as EDM persistent records (ModuleDicts stay ModuleDicts), parameters shared."""
    if isinstance(module, nn.ModuleDict):
        return nn.ModuleDict({k: as_edm_records(v) for k, v in module.items()})
    record = Persistent(type(module).__name__)
    for name, param in module.named_parameters(recurse=False):
        setattr(record, name, nn.Parameter(param.detach().clone()))
    for name, child in module.named_children():
        setattr(record, name, as_edm_records(child))
    return record


def test_edm_adm_pickle_loads_every_weight(tmp_path):
    from ayt.nets.adm import DhariwalUNet

    torch.manual_seed(0)
    kw = dict(img_resolution=16, in_channels=3, out_channels=3, label_dim=10, model_channels=32,
              channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8], dropout=0.1)
    source = DhariwalUNet(**kw)
    model = as_edm_records(source)
    model._init_kwargs = {**kw, "augment_dim": 9}
    model._edm_class = "DhariwalUNet"
    model.map_augment = linear(9, 32 * 4, bias=False)
    f = torch.full((1, 1, 2, 2), 0.25)
    model.enc["8x8_down"].conv0.register_buffer("resample_filter", f)
    ema = Persistent("EDMPrecond", img_resolution=16, img_channels=3, label_dim=10, sigma_data=0.5,
                     model_type="DhariwalUNet", use_fp16=True)
    ema.model = model
    path = tmp_path / "adm.pkl"
    path.write_bytes(pickle.dumps({"ema": ema}))
    net, config = load_model(path)
    assert not MARKER.exists()
    ours = net.net.state_dict()
    assert ours.keys() == source.state_dict().keys()
    for key, value in source.state_dict().items():
        assert torch.equal(ours[key], value), key
    assert config.network.preset == "imagenet64-adm" and config.network.conditional
    assert build_net(config, 16, 3, 10).state_dict().keys() == net.state_dict().keys()


def test_edm_config_rebuilds_the_network(tmp_path):
    path = tmp_path / "edm.pkl"
    write_edm_pickle(path, ncsn=True, label_dim=10)
    net, config = load_model(path)
    rebuilt = build_net(config, 16, 3, 10)
    assert rebuilt.state_dict().keys() == net.state_dict().keys()
    assert config.objective.kind == "edm" and config.network.conditional and config.network.preset == "cifar10-ncsnpp"


def test_malicious_pickle_is_refused_and_never_run(tmp_path):
    class Evil:
        def __reduce__(self):
            return os.system, (f"touch {MARKER}",)

    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"ema": Evil()}))
    with pytest.raises(AytError, match=r"refusing global (posix|os|nt)\.system"):
        read_edm_pickle(path)
    proc = subprocess.run([sys.executable, "-m", "ayt", "sample", str(path), "--out", str(tmp_path / "x.png")],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and not MARKER.exists()
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr and "system" in proc.stderr


@pytest.mark.parametrize("content", ["torch_save", "truncated", "not_a_network", "vp_precond"])
def test_bad_pickles_fail_with_one_line(tmp_path, content):
    path = tmp_path / "bad.pkl"
    if content == "torch_save":
        torch.save({"ema": torch.zeros(2)}, path)
        expected = "not an EDM network pickle|untrusted or corrupted"
    elif content == "truncated":
        write_edm_pickle(path)
        path.write_bytes(path.read_bytes()[:5000])
        expected = "untrusted or corrupted"
    elif content == "not_a_network":
        path.write_bytes(pickle.dumps({"weights": [1, 2]}))
        expected = "no 'ema' entry"
    else:
        write_edm_pickle(path, precond="VPPrecond")
        expected = "VPPrecond .* not supported"
    with pytest.raises(AytError, match=expected) as info:
        load_model(path)
    assert "\n" not in str(info.value) and "weights_only=False" not in str(info.value)
    assert not MARKER.exists()


@pytest.mark.parametrize("fault", ["nan", "shape"])
def test_corrupted_weights_are_refused(tmp_path, monkeypatch, fault):
    """A readable file whose tensors are NaN or of the wrong shape: one line naming the tensor."""
    import ayt.nets.edm_pickle as reader

    path = tmp_path / "edm.pkl"
    write_edm_pickle(path)
    record = reader.read_edm_pickle(path)
    layer0 = record["ema"].state["_modules"]["model"].state["_modules"]["map_layer0"].state["_parameters"]
    if fault == "nan":
        layer0["weight"][0, 0] = float("nan")
        expected = "EDM weight map_layer0.weight holds NaN or inf"
    else:
        layer0["weight"] = layer0["weight"][:, :-1]
        expected = "do not match the architecture .*map_layer0.weight"
    monkeypatch.setattr(reader, "read_edm_pickle", lambda _: record)
    with pytest.raises(AytError, match=expected):
        load_model(path)


def test_convert_then_sample_init_and_teacher(tmp_path, capsys):
    from ayt.cli import main

    def ayt(*args):
        code = main([str(a) for a in args])
        return code, capsys.readouterr().err

    pkl = tmp_path / "edm.pkl"
    write_edm_pickle(pkl)
    out = tmp_path / "converted"
    assert ayt("convert", pkl, "--out", out)[0] == 0
    direct, _ = load_model(pkl)
    converted, config = load_model(out)
    for (k, a), (_, b) in zip(direct.state_dict().items(), converted.state_dict().items()):
        assert torch.equal(a, b), k
    code, err = ayt("convert", pkl, "--out", out)
    assert code == 2 and "not empty" in err
    for source in (pkl, out):
        assert ayt("sample", source, "-n", "4", "--heun-steps", "2", "--npz", tmp_path / f"s-{source.name}.npz")[0] == 0
    arch = "network.overrides={model_channels: 16, num_blocks: 1}"
    code, err = ayt("train", "--config", "configs/shapes-ect.yaml", f"objective.init={pkl}", "train.steps=1",
                    f"train.run_dir={tmp_path / 'ect'}", arch, "log.progress=false", "eval.every=0")
    assert code == 0, err
    code, err = ayt("train", "--config", "configs/shapes-ect.yaml", f"objective.init={pkl}", "train.steps=1",
                    f"train.run_dir={tmp_path / 'wrong'}", "log.progress=false")
    assert code == 2 and "network.preset=tiny" in err and "model_channels: 16" in err
    assert not MARKER.exists()
    from ayt.build import build_objective
    from ayt.config import load_config

    cfg = load_config("configs/shapes-continuous.yaml", [f"objective.teacher={pkl}", "distance.name=l2"])
    objective = build_objective(cfg, 16, 3)
    assert objective.teacher is not None and not any(p.requires_grad for p in objective.teacher.parameters())


# ------------------------------------------------------------------------- real files
@pytest.mark.real_files
@pytest.mark.skipif(not os.environ.get("AYT_EDM_PKL"), reason="set AYT_EDM_PKL to a published EDM network pickle")
def test_real_edm_pickle_converts_and_samples():
    path = Path(os.environ["AYT_EDM_PKL"])
    net, config = load_model(path)
    assert not MARKER.exists()
    expected = {(32, 3): 55.73e6, (64, 3): None}.get((net.img_resolution, net.img_channels))
    n = sum(p.numel() for p in net.parameters())
    if expected and config.network.preset == "cifar10-ddpmpp":
        assert abs(n - expected) < 0.01e6, n  # EDM's paper: 55.73M for DDPM++ on CIFAR-10
    z = torch.randn(2, net.img_channels, net.img_resolution, net.img_resolution, generator=torch.Generator().manual_seed(0))
    from ayt.sampling import edm_heun_sample
    from ayt.schedules import karras_sigmas

    with torch.no_grad():
        x = edm_heun_sample(net, z * 80, karras_sigmas(4, 0.002, 80.0))
    assert torch.isfinite(x).all() and x.abs().max() < 3


@pytest.mark.real_files
@pytest.mark.skipif(not os.environ.get("AYT_EDM_REPO"), reason="set AYT_EDM_REPO to a clone of NVlabs/edm")
@pytest.mark.parametrize("arch", ["ddpmpp", "ncsnpp", "adm"])
def test_outputs_match_edm_source(tmp_path, monkeypatch, arch):
    """Build a small network with EDM's own code, pickle it as EDM does, load it with ayt, compare D(x, sigma)."""
    for name in [m for m in sys.modules if m.split(".")[0] in ("torch_utils", "dnnlib", "training")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.syspath_prepend(os.environ["AYT_EDM_REPO"])
    networks = __import__("training.networks", fromlist=["EDMPrecond"])
    ncsn = arch == "ncsnpp"
    kw = dict(model_type="SongUNet", model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8],
              augment_dim=9, embedding_type="fourier" if ncsn else "positional", channel_mult_noise=2 if ncsn else 1,
              encoder_type="residual" if ncsn else "standard", resample_filter=[1, 3, 3, 1] if ncsn else [1, 1])
    if arch == "adm":
        kw = dict(model_type="DhariwalUNet", model_channels=32, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8],
                  augment_dim=9)
    torch.manual_seed(0)
    edm = networks.EDMPrecond(img_resolution=16, img_channels=3, label_dim=10, **kw)
    with torch.no_grad():
        for p in edm.parameters():
            p.copy_(torch.randn_like(p) * 0.1)
    path = tmp_path / "edm.pkl"
    path.write_bytes(pickle.dumps({"ema": copy.deepcopy(edm).eval().requires_grad_(False)}))
    net, _ = load_model(path)
    x, sigma = torch.randn(4, 3, 16, 16), torch.tensor([0.01, 0.5, 3.0, 60.0])
    labels = torch.nn.functional.one_hot(torch.tensor([0, 3, 9, 1]), 10).float()
    with torch.no_grad():
        assert torch.allclose(net(x, sigma, labels), edm.eval()(x, sigma, labels), atol=1e-5)


def test_real_files_marker_is_registered(pytestconfig):
    assert any(m.startswith("real_files") for m in pytestconfig.getini("markers"))
    assert "not real_files" in " ".join(pytestconfig.getini("addopts"))


def test_eval_an_edm_pickle_against_field_statistics(tmp_path, monkeypatch, capsys):
    """`ayt eval FILE.pkl`: Heun samples of the EDM model scored against a pytorch-fid-style file."""
    from test_evaluate import FakeInception
    from test_fid_protocol import pytorch_fid_file

    from ayt.cli import main
    from ayt.metrics import evaluate

    monkeypatch.setattr(evaluate, "InceptionFeatures", FakeInception)
    pkl = tmp_path / "edm32.pkl"
    write_edm_pickle(pkl, res=32, mult=(1, 2), attn=(16,))
    ref = pytorch_fid_file(tmp_path / "cifar10-32x32.npz")
    with pytest.warns(UserWarning, match="no provenance"):
        code = main(["eval", str(pkl), "--metric", "fid", "--ref-stats", str(ref), "--num", "24",
                     "--heun-steps", "2", "--out", str(tmp_path / "fid.json")])
    assert code == 0 and not MARKER.exists()
    assert "heun2" in capsys.readouterr().out
    record = (tmp_path / "fid.json").read_text()
    assert '"fid"' in record and str(pkl) in record
