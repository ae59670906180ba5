"""CUDA checks (run with `pytest -m gpu` on a machine with a GPU; skipped elsewhere)."""

import pytest
import torch

from ayt.cli import main
from ayt.checkpoint import load_checkpoint
from test_edm_pickle import fake_persistence, write_edm_pickle  # noqa: F401 (a fixture)

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

#: Seen on an H200 (torch 2.11, Triton 3.6, 2026-11-30): Inductor folded the seeded dropout hash's
#: `arange * 0x9E3779B9` into an index expression whose constants Triton refused ("Scalar ... is out
#: of range for type int32"), so train.compile=true failed on CUDA. The multiplier is now loaded from
#: the key tensor (`dropout.INDEX_MULTIPLIER`; a CPU test checks Inductor no longer folds it), which
#: has not run on a GPU yet: these stay xfail (non-strict) until a GPU run shows them passing (XPASS).
COMPILE_ON_CUDA = pytest.mark.xfail(reason="train.compile on CUDA: dropout-hash fix not yet confirmed on a GPU",
                                    strict=False)

TINY = [
    "data.resolution=16", "data.num_samples=512", "train.grid_size=16", "train.sample_every=0",
    "log.progress=false", "log.tensorboard=false", "train.device=cuda",
]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_edm_then_ect_then_ayt_on_cuda(tmp_path, precision):
    edm, feats, ayt = tmp_path / "edm", tmp_path / "features", tmp_path / "ayt"
    assert main(["train", *TINY, "objective.kind=edm", "train.steps=20", f"train.precision={precision}", f"train.run_dir={edm}"]) == 0
    assert main(["train-features", *TINY, "train.steps=20", "train.batch_size=64", "features.holdout=128", f"train.run_dir={feats}"]) == 0
    argv = [*TINY, "train.steps=20", f"train.precision={precision}", f"objective.init={edm}", "distance.name=mfd",
            "distance.mode=pixel+aligned", f"distance.features={feats}", "eval.every=10", "eval.num_samples=128", f"train.run_dir={ayt}"]
    assert main(["train", *argv]) == 0
    ckpt = load_checkpoint(ayt)
    assert ckpt.step == 20 and all(torch.isfinite(v).all() for v in ckpt.modules["ema0"].values())
    assert len(ckpt.state["metrics"]) == 2
    assert main(["sample", str(ayt), "-n", "32", "--steps", "2", "--device", "cuda", "--npz", str(tmp_path / "s.npz")]) == 0


def test_shared_dropout_masks_on_cuda():
    from ayt.nets import build_network
    from ayt.nets.dropout import shared_dropout

    net = build_network("tiny", img_resolution=16, in_channels=3, dropout=0.5).cuda().train()
    x, t = torch.randn(4, 3, 16, 16, device="cuda"), torch.full((4,), 1.0, device="cuda")
    with shared_dropout(net, 7):
        a = net(x, t)
    with shared_dropout(net, 7):
        b = net(x, t)
    assert torch.equal(a, b)


def test_dropout_masks_equal_on_cpu_and_cuda():
    from ayt.nets.dropout import INDEX_MULTIPLIER, hashed_keep_mask

    seed = torch.tensor([123456789, -42, INDEX_MULTIPLIER], dtype=torch.int32)
    assert torch.equal(hashed_keep_mask((64, 32, 16, 16), seed, 0.2),
                       hashed_keep_mask((64, 32, 16, 16), seed.cuda(), 0.2).cpu())


@COMPILE_ON_CUDA
def test_compiled_dropout_masks_equal_eager_on_cuda():
    """Inductor's generated kernels reproduce the int32 hash (wrapping products) bit for bit."""
    from ayt.nets.dropout import INDEX_MULTIPLIER, hashed_keep_mask

    seed = torch.tensor([987654321, -5, INDEX_MULTIPLIER], dtype=torch.int32, device="cuda")
    compiled = torch.compile(lambda s: hashed_keep_mask((64, 32, 16, 16), s, 0.2, part=1))
    assert torch.equal(compiled(seed).cpu(), hashed_keep_mask((64, 32, 16, 16), seed.cpu(), 0.2, part=1))


@COMPILE_ON_CUDA
def test_compiled_bf16_training_on_cuda(tmp_path):
    run = tmp_path / "compiled"
    assert main(["train", *TINY, "train.steps=6", "train.precision=bf16", "train.compile=true",
                 "network.dropout=0.2", f"train.run_dir={run}"]) == 0
    ckpt = load_checkpoint(run)
    assert ckpt.step == 6 and all(torch.isfinite(v).all() for v in ckpt.modules["net"].values())
    assert main(["sample", str(run), "-n", "32", "--steps", "2", "--device", "cuda", "--precision", "bf16",
                 "--npz", str(tmp_path / "s.npz")]) == 0


def test_tangents_on_cuda(tmp_path):
    run = tmp_path / "ect"
    assert main(["train", *TINY, "train.steps=4", "train.checkpoint_every=2", f"train.run_dir={run}"]) == 0
    assert main(["tangents", str(run), "--distances", "pseudo_huber,continuous", "--num", "8", "--buckets", "2",
                 "--device", "cuda", "--out", str(tmp_path / "tan")]) == 0
    assert (tmp_path / "tan" / "tangents.json").is_file()


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_continuous_mfd_distillation_on_cuda(tmp_path, precision):
    """The JVP runs in fp32 under bf16 autocast (machine-notes: bf16 autocast + jvp fails otherwise)."""
    edm, feats, cd = tmp_path / "edm", tmp_path / "features", tmp_path / "cd"
    assert main(["train", *TINY, "objective.kind=edm", "train.steps=10", f"train.run_dir={edm}"]) == 0
    assert main(["train-features", *TINY, "train.steps=10", "train.batch_size=64", "features.holdout=128", f"train.run_dir={feats}"]) == 0
    assert main(["train", *TINY, "objective.kind=continuous", f"objective.init={edm}", f"objective.teacher={edm}",
                 "distance.name=mfd", f"distance.features={feats}", "network.dropout=0.2", "train.steps=10",
                 f"train.precision={precision}", f"train.run_dir={cd}"]) == 0
    ckpt = load_checkpoint(cd)
    assert ckpt.step == 10 and all(torch.isfinite(v).all() for v in ckpt.modules["net"].values())


@COMPILE_ON_CUDA
def test_compiled_continuous_training_on_cuda(tmp_path):
    """A compiled model under torch.func.jvp (compiling the jvp call itself fails: machine-notes)."""
    run = tmp_path / "ct"
    assert main(["train", *TINY, "objective.kind=continuous", "distance.name=l2", "train.steps=6",
                 "train.compile=true", "train.precision=bf16", f"train.run_dir={run}"]) == 0
    assert load_checkpoint(run).step == 6


def test_edm_pickle_init_and_sample_on_cuda(tmp_path, fake_persistence):
    """An EDM-format pickle (built as EDM writes it) initialises ECT on CUDA and samples there."""
    pkl = tmp_path / "edm.pkl"
    write_edm_pickle(pkl)
    arch = "network.overrides={model_channels: 16, num_blocks: 1}"
    run = tmp_path / "ect"
    assert main(["train", "--config", "configs/shapes-ect.yaml", *TINY, f"objective.init={pkl}", "train.steps=4",
                 "eval.every=0", arch, f"train.run_dir={run}"]) == 0
    for source in (pkl, run):
        assert main(["sample", str(source), "-n", "8", "--steps", "1", "--device", "cuda",
                     "--npz", str(tmp_path / f"s-{source.name}.npz")]) == 0


@pytest.mark.parametrize("precision,compile_", [("fp32", False), ("bf16", False),
                                                  pytest.param("bf16", True, marks=COMPILE_ON_CUDA)])
def test_meanflow_pixel_and_mfd_on_cuda(tmp_path, precision, compile_):
    """MeanFlow trains from scratch on CUDA (fp32 JVP under bf16 autocast, also with torch.compile),
    with the pixel loss and the MFD direction, and samples in 1 and 2 steps."""
    feats = tmp_path / "features"
    assert main(["train-features", *TINY, "train.steps=10", "train.batch_size=64", "features.holdout=128",
                 f"train.run_dir={feats}"]) == 0
    common = [*TINY, "objective.kind=meanflow", "train.steps=12", "train.batch_size=32", f"train.precision={precision}",
              f"train.compile={str(compile_).lower()}", "objective.mf_ratio=0.75"]
    for name, extra in (("pixel", ["distance.name=squared_l2"]),
                        ("mfd", ["distance.name=mfd", "distance.mode=aligned", f"distance.features={feats}"])):
        run = tmp_path / name
        assert main(["train", *common, *extra, f"train.run_dir={run}"]) == 0
        ckpt = load_checkpoint(run)
        assert ckpt.step == 12 and all(torch.isfinite(v).all() for v in ckpt.modules["ema0"].values())
        for steps in ("1", "2"):
            assert main(["sample", str(run), "-n", "16", "--steps", steps, "--device", "cuda",
                         "--npz", str(tmp_path / f"{name}-{steps}.npz")]) == 0
