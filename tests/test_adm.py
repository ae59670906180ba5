"""Tests for ayt.nets.adm: EDM's ADM U-Net (DhariwalUNet) as an ayt network preset.

The key-list tests compare against an independent transcription of EDM's naming scheme
(NVlabs/edm `training/networks.py`, `DhariwalUNet.__init__` L403-433 and `UNetBlock.__init__`
L150-164), so that a converter can copy EDM's ImageNet-64 weights name by name.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from ayt.errors import AytError
from ayt.nets import DhariwalUNet, Precond, SeededDropout, build_network, count_parameters, shared_dropout
from ayt.nets.adm import ADMBlock, resample
from ayt.nets.dropout import SeededLabelDropout

# A narrow ADM: two levels at 8x8 / 4x4, attention (two 8-channel heads) at 4x4 and the bottom.
TINY = dict(model_channels=16, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(4,),
            channels_per_head=8)


def tiny_adm(label_dim: int = 0, dropout: float = 0.0, label_dropout: float = 0.0) -> Precond:
    torch.manual_seed(0)
    overrides = {k: v for k, v in TINY.items()}
    overrides["label_dropout"] = label_dropout
    return build_network("imagenet64-adm", img_resolution=8, in_channels=3, label_dim=label_dim,
                         dropout=dropout, overrides=overrides)


def perturb(net: nn.Module, scale: float = 0.05) -> nn.Module:
    """Noise on every parameter so that EDM's zero-initialised layers carry signal."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return net


def images(b: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- EDM's key names, transcribed

def edm_state_keys(img_resolution, in_channels, out_channels, label_dim=0, model_channels=192,
                   channel_mult=(1, 2, 3, 4), channel_mult_emb=4, num_blocks=3,
                   attn_resolutions=(32, 16, 8), channels_per_head=64, **_):
    """(name, shape) of EDM DhariwalUNet's parameters, in registration order (augment_dim=0)."""
    keys: list[tuple[str, tuple[int, ...]]] = []
    emb = model_channels * channel_mult_emb

    def params(name, weight, bias=True):
        keys.append((f"{name}.weight", weight))
        if bias:
            keys.append((f"{name}.bias", (weight[0],)))

    def norm(name, c):
        params(name, (c,))

    def block(name, cin, cout, up=False, down=False, attention=False):
        norm(f"{name}.norm0", cin)
        params(f"{name}.conv0", (cout, cin, 3, 3))
        params(f"{name}.affine", (2 * cout, emb))  # adaptive_scale=True
        norm(f"{name}.norm1", cout)
        params(f"{name}.conv1", (cout, cout, 3, 3))
        if cout != cin:  # resample_proj=False: kernel 0 (no parameters) when widths match
            params(f"{name}.skip", (cout, cin, 1, 1))
        if attention and cout // channels_per_head:
            norm(f"{name}.norm2", cout)
            params(f"{name}.qkv", (3 * cout, cout, 1, 1))
            params(f"{name}.proj", (cout, cout, 1, 1))

    params("map_layer0", (emb, model_channels))
    params("map_layer1", (emb, emb))
    if label_dim:
        params("map_label", (emb, label_dim), bias=False)
    cout, skips = in_channels, []
    for level, mult in enumerate(channel_mult):
        res = img_resolution >> level
        if level == 0:
            cin, cout = cout, model_channels * mult
            params(f"enc.{res}x{res}_conv", (cout, cin, 3, 3))
        else:
            block(f"enc.{res}x{res}_down", cout, cout, down=True)
        skips.append(cout)
        for idx in range(num_blocks):
            cin, cout = cout, model_channels * mult
            block(f"enc.{res}x{res}_block{idx}", cin, cout, attention=res in attn_resolutions)
            skips.append(cout)
    for level, mult in reversed(list(enumerate(channel_mult))):
        res = img_resolution >> level
        if level == len(channel_mult) - 1:
            block(f"dec.{res}x{res}_in0", cout, cout, attention=True)
            block(f"dec.{res}x{res}_in1", cout, cout)
        else:
            block(f"dec.{res}x{res}_up", cout, cout, up=True)
        for idx in range(num_blocks + 1):
            cin, cout = cout + skips.pop(), model_channels * mult
            block(f"dec.{res}x{res}_block{idx}", cin, cout, attention=res in attn_resolutions)
    norm("out_norm", cout)
    params("out_conv", (out_channels, cout, 3, 3))
    return keys


def state_keys(net: nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    return [(k, tuple(v.shape)) for k, v in net.state_dict().items()]


def test_state_dict_keys_are_edm_keys_for_a_tiny_net():
    kwargs = dict(img_resolution=8, in_channels=3, out_channels=3, label_dim=5, **TINY)
    net = DhariwalUNet(**kwargs)
    assert state_keys(net) == edm_state_keys(**kwargs)
    assert any(".qkv." in k for k, _ in state_keys(net))  # attention is present


def test_state_dict_keys_are_edm_keys_for_imagenet64():
    """EDM's ImageNet-64 model (label_dim 1000), built without memory on the meta device."""
    with torch.device("meta"):
        net = build_network("imagenet64-adm", img_resolution=64, in_channels=3, label_dim=1000)
    keys = state_keys(net.net)
    assert keys == edm_state_keys(64, 3, 3, label_dim=1000)
    names = [k for k, _ in keys]
    assert names[:3] == ["map_layer0.weight", "map_layer0.bias", "map_layer1.weight"]
    assert "enc.64x64_conv.weight" in names and "enc.64x64_block0.norm0.weight" in names
    assert "dec.8x8_in0.qkv.weight" in names and names[-2:] == ["out_conv.weight", "out_conv.bias"]
    assert not any("resample_filter" in k or "map_augment" in k for k in names)


def test_imagenet64_parameter_count_matches_edm():
    with torch.device("meta"):
        net = build_network("imagenet64-adm", img_resolution=64, in_channels=3, label_dim=1000)
    assert count_parameters(net) == 295_899_267
    assert abs(count_parameters(net) - 295.9e6) < 0.05e6  # EDM paper: 295.9M
    heads = {m.num_heads for m in net.modules() if isinstance(m, ADMBlock) and m.num_heads}
    assert heads == {3 * 2, 3 * 3, 3 * 4}  # 384, 576 and 768 channels at 64 per head


# ---------------------------------------------------------------- EDM's math, piece by piece

def test_positional_embedding_is_edm_adm_variant():
    c_noise = torch.tensor([-1.5, 0.0, 2.0])
    emb = tiny_adm().net.map_noise(c_noise)  # model_channels 16
    freqs = (1 / 10000) ** (torch.arange(8) / 8)  # endpoint=False: j / (C/2)
    angles = c_noise[:, None] * freqs
    torch.testing.assert_close(emb, torch.cat([angles.cos(), angles.sin()], dim=1))


def test_resample_equals_edm_box_filter_convolutions():
    x = torch.randn(2, 3, 4, 4)
    f = torch.ones(1, 1, 2, 2) / 4  # [1,1] outer [1,1] / sum^2
    up = F.conv_transpose2d(x, (4 * f).tile([3, 1, 1, 1]), groups=3, stride=2)
    down = F.conv2d(x, f.tile([3, 1, 1, 1]), groups=3, stride=2)
    torch.testing.assert_close(resample(x, up=True, down=False), up)
    torch.testing.assert_close(resample(x, up=False, down=True), down)


def test_block_is_edm_formula_with_head_major_qkv():
    torch.manual_seed(0)
    block = perturb(ADMBlock(16, 16, emb_channels=12, attention=True, channels_per_head=8)).eval()
    x, emb = torch.randn(2, 16, 4, 4), torch.randn(2, 12)
    scale, shift = block.affine(emb)[:, :, None, None].chunk(2, dim=1)
    h = F.silu(shift + block.norm1(block.conv0(F.silu(block.norm0(x)))) * (1 + scale))
    x1 = block.conv1(h) + x  # skip_scale 1
    qkv = block.qkv(block.norm2(x1)).reshape(2, 2, 8, 3, 16)  # [B, head, channel, q/k/v, HW]
    heads = []
    for head in range(2):
        q, k, v = qkv[:, head].unbind(2)
        w = torch.softmax(torch.einsum("bcq,bck->bqk", q, k) / math.sqrt(8), dim=2)
        heads.append(torch.einsum("bqk,bck->bcq", w, v))
    expected = x1 + block.proj(torch.cat(heads, dim=1).reshape(2, 16, 4, 4))
    torch.testing.assert_close(block(x, emb), expected)


def test_label_embedding_is_added_after_map_layer1_without_bias():
    net = perturb(tiny_adm(label_dim=4).net).eval()
    assert net.map_label.bias is None
    c_noise = torch.tensor([0.1, -0.3])
    pos = net.map_noise(c_noise)
    base = net.map_layer1(F.silu(net.map_layer0(pos)))
    onehot = torch.eye(4)[[1, 3]]
    torch.testing.assert_close(net.embed(c_noise, torch.tensor([1, 3])), F.silu(base + onehot @ net.map_label.weight.T))


# ---------------------------------------------------------------- behaviour inside ayt

def test_shapes_and_resolution_16():
    net = tiny_adm().eval()
    assert isinstance(net.net, DhariwalUNet) and net.img_resolution == 8 and net.img_channels == 3
    assert net(images(), torch.tensor([0.5, 5.0])).shape == (2, 3, 8, 8)
    wide = build_network("imagenet64-adm", img_resolution=16, in_channels=1, overrides=TINY).eval()
    assert wide(torch.randn(1, 1, 16, 16), 1.0).shape == (1, 1, 16, 16)


def test_labels_int_onehot_none_and_errors():
    net = perturb(tiny_adm(label_dim=4)).eval()
    x, t = images(), torch.tensor([1.0, 1.0])
    y = net(x, t, torch.tensor([1, 3]))
    assert not torch.allclose(y, net(x, t, torch.tensor([0, 0])), atol=1e-4)
    torch.testing.assert_close(y, net(x, t, F.one_hot(torch.tensor([1, 3]), 4).float()))
    torch.testing.assert_close(net(x, t, torch.tensor([-1, -1])), net(x, t, None))
    with pytest.raises(AytError, match="class labels"):
        net(x, t, torch.tensor([0, 4]))


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch's own jvp decompositions
def test_jvp_through_adm():
    net = perturb(tiny_adm(label_dim=3))
    x, t, labels = images(), torch.tensor([0.5, 2.0]), torch.tensor([0, 2])
    y, dy = torch.func.jvp(lambda t_: net(x, t_, labels), (t,), (torch.ones_like(t),))
    eps = 1e-3
    fd = (net(x, t + eps, labels) - net(x, t - eps, labels)) / (2 * eps)
    torch.testing.assert_close(y, net(x, t, labels))
    torch.testing.assert_close(dy, fd, rtol=1e-2, atol=1e-3)


def test_shared_dropout_masks_for_student_and_target():
    net = perturb(tiny_adm(label_dim=3, dropout=0.5, label_dropout=0.5)).train()
    masks: list[torch.Tensor] = []
    layers = [m for m in net.modules() if isinstance(m, SeededDropout)]
    assert sum(type(m) is SeededLabelDropout for m in layers) == 1 and len(layers) > 10
    hooks = [m.register_forward_hook(lambda m, i, o: masks.append(o != 0)) for m in layers]
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    x1, x2 = torch.randn(8, 3, 8, 8), torch.randn(8, 3, 8, 8)
    with shared_dropout(net, seed=5):
        net(x1, torch.full((8,), 2.0), labels)
        student = list(masks)
        masks.clear()
        torch.manual_seed(99)
        with torch.no_grad():
            net(x2, torch.full((8,), 1.0), labels)
    for h in hooks:
        h.remove()
    assert len(student) == len(masks) == len(layers)
    assert all(torch.equal(a, b) for a, b in zip(student, masks))
    assert 0.3 < torch.cat([m.flatten() for m in student[1:]]).float().mean() < 0.7


def test_gradient_reaches_every_parameter():
    net = tiny_adm(label_dim=3)
    net(images(), torch.tensor([0.3, 3.0]), torch.tensor([0, 2])).square().sum().backward()
    # EDM zero-initialises conv1, proj and out_conv, so only they (and what feeds them) get
    # gradients at first; after one perturbation every parameter must.
    perturb(net)
    net.zero_grad()
    net(images(), torch.tensor([0.3, 3.0]), torch.tensor([0, 2])).square().sum().backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


def test_traces_as_one_graph():
    import torch._dynamo

    net = perturb(tiny_adm(label_dim=3, dropout=0.3)).train()
    x, t, labels = images(), torch.full((2,), 1.0), torch.eye(3)[[0, 1]]  # int labels are checked eagerly
    torch._dynamo.reset()
    compiled = torch.compile(net, backend="eager", fullgraph=True, dynamic=False)
    with shared_dropout(net, 3):
        torch.testing.assert_close(compiled(x, t, labels), net(x, t, labels))
    torch._dynamo.reset()


def test_overrides_are_checked_against_dhariwal_unet():
    with pytest.raises(AytError, match="DhariwalUNet"):
        build_network("imagenet64-adm", img_resolution=8, in_channels=3, overrides={"embedding_type": "fourier"})
    with pytest.raises(AytError, match="channels per head"):
        build_network("imagenet64-adm", img_resolution=8, in_channels=3,
                      overrides={**TINY, "channels_per_head": 64})
    with pytest.raises(AytError, match="divisible"):
        build_network("imagenet64-adm", img_resolution=12, in_channels=3)


def test_imagenet64_ect_preset_builds_the_conditional_adm():
    from pathlib import Path

    from ayt.build import build_net
    from ayt.config import load_config

    path = Path(__file__).resolve().parents[1] / "configs" / "imagenet64-ect.yaml"
    c = load_config(path)
    assert (c.network.preset, c.network.conditional, c.network.dropout) == ("imagenet64-adm", True, 0.1)
    assert (c.objective.p_mean, c.objective.p_std, c.objective.q, c.objective.stage_steps) == (-0.8, 1.6, 4.0, 25000)
    assert (c.distance.c, c.train.batch_size, c.train.steps, c.optim.lr) == (0.06, 128, 100000, 1e-4)
    with torch.device("meta"):
        net = build_net(c, 64, 3, num_classes=1000)
    assert isinstance(net.net, DhariwalUNet) and net.label_dim == 1000
    assert {m.p for m in net.modules() if type(m) is SeededDropout} == {0.1}
    folder = load_config(path, ["data.name=folder", "data.root=imagenet/train", "data.class_folders=true"])
    assert folder.data.class_folders
    with pytest.raises(AytError, match="class_folders"):
        load_config(path, ["data.class_folders=true"])  # npz brings its own labels


def test_cli_conditional_ect_on_labelled_npz_then_sample(tmp_path):
    """The ImageNet-64 preset end to end at 8x8: labels flow from the npz into ECT and sampling."""
    from pathlib import Path

    import numpy as np

    from ayt.cli import main
    from ayt.checkpoint import load_checkpoint

    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", images=rng.integers(0, 256, (8, 8, 8, 3), dtype=np.uint8),
             labels=rng.integers(0, 4, 8))
    config = Path(__file__).resolve().parents[1] / "configs" / "imagenet64-ect.yaml"
    run = tmp_path / "run"
    tiny = "{model_channels: 16, channel_mult: [1, 2], num_blocks: 1, attn_resolutions: [4], channels_per_head: 8}"
    assert main(["train", "--config", str(config), f"data.root={tmp_path / 'd.npz'}", "data.resolution=8",
                 "objective.init=null", f"network.overrides={tiny}", "train.steps=2", "train.batch_size=4",
                 f"train.run_dir={run}", "train.checkpoint_every=2", "train.sample_every=0", "train.grid_size=4",
                 "log.progress=false", "log.tensorboard=false"]) == 0
    ckpt = load_checkpoint(run)
    assert ckpt.state["data_info"]["num_classes"] == 4
    assert tuple(ckpt.modules["net"]["net.map_label.weight"].shape) == (64, 4)
    assert main(["sample", str(run), "-n", "4", "--steps", "2", "--npz", str(tmp_path / "s.npz")]) == 0
    assert np.load(tmp_path / "s.npz")["images"].shape == (4, 8, 8, 3)
