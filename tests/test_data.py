"""Datasets: shapes, value ranges, the shapes renderer's derivatives, file formats, bad input."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from ayt.data import build_dataset, shapes
from ayt.errors import AytError


def assert_images(dataset, count: int, channels: int, resolution: int) -> None:
    """The dataset holds `count` float32 [C, R, R] images in [-1, 1] with int64 scalar labels."""
    assert len(dataset) == count
    assert dataset.images.shape == (count, channels, resolution, resolution)
    assert (dataset.channels, dataset.resolution) == (channels, resolution)
    image, label = dataset[count - 1]
    assert image.dtype == torch.float32 and image.shape == (channels, resolution, resolution)
    assert label.dtype == torch.int64 and label.dim() == 0
    assert dataset.images.min() >= -1 and dataset.images.max() <= 1


# ---- shapes ---------------------------------------------------------------------------------

@pytest.mark.parametrize("resolution", [8, 16, 32, 64])
def test_shapes_range_and_shape(resolution):
    dataset = build_dataset("shapes", resolution=resolution, num_samples=20, seed=3)
    assert_images(dataset, 20, 3, resolution)
    assert dataset.params.shape == (20, shapes.NUM_PARAMS) and dataset.num_classes == 0
    assert (dataset.labels == -1).all()
    assert dataset.images.std() > 0.1  # not blank


def test_shapes_deterministic_by_seed():
    a = build_dataset("shapes", resolution=16, num_samples=10, seed=5)
    b = build_dataset("shapes", resolution=16, num_samples=10, seed=5)
    c = build_dataset("shapes", resolution=16, num_samples=10, seed=6)
    assert torch.equal(a.images, b.images) and torch.equal(a.params, b.params)
    assert not torch.allclose(a.images, c.images)


def test_shapes_params_inside_box_and_rendered_in_chunks():
    dataset = shapes.ShapesDataset(num_samples=50, resolution=8, seed=0, chunk=7)
    assert (dataset.params >= shapes.PARAM_LOW).all()
    assert (dataset.params <= shapes.PARAM_HIGH).all()
    assert torch.allclose(dataset.images, shapes.render(dataset.params, 8).clamp(-1, 1))


def test_render_background_and_colour():
    params = shapes.sample_params(1, torch.Generator().manual_seed(0))
    params[0, :5] = torch.tensor([0.0, 0.0, 0.4, 1.5, 0.3])
    image = shapes.render(params, 32)[0]
    corner, centre = image[:, 0, 0], image[:, 16, 16]
    background = torch.tensor(shapes.BACKGROUND) * 2 - 1
    assert torch.allclose(corner, background, atol=1e-4)
    assert torch.allclose(centre, params[0, 5:] * 2 - 1, atol=1e-4)


def test_render_edges_are_antialiased():
    """Each edge has a few partly covered pixels: neither a hard step nor a blur."""
    params = torch.tensor([[0.0, 0.0, 0.45, 1.2, 0.0, 1.0, 1.0, 1.0]])
    row = shapes.render(params, 64)[0, 0, 32]  # the middle row crosses two edges (off-centre)
    partial = ((row > -0.95) & (row < 0.95)).sum().item()
    assert 2 <= partial <= 8


def _one_image(params: torch.Tensor) -> torch.Tensor:
    return shapes.render(params[None], 16)[0].flatten()


def test_render_jacobian_nonzero_columns():
    params = shapes.sample_params(1, torch.Generator().manual_seed(1))[0].double()
    jacobian = torch.autograd.functional.jacobian(_one_image, params)
    assert jacobian.shape == (3 * 16 * 16, shapes.NUM_PARAMS)
    assert torch.isfinite(jacobian).all()
    assert (jacobian.abs().amax(dim=0) > 1e-3).all(), jacobian.abs().amax(dim=0)


def test_render_jacobian_matches_finite_differences():
    params = shapes.sample_params(1, torch.Generator().manual_seed(2))[0].double()
    jacobian = torch.autograd.functional.jacobian(_one_image, params)
    h = 1e-6
    for i in range(shapes.NUM_PARAMS):
        step = torch.zeros_like(params)
        step[i] = h
        numeric = (_one_image(params + step) - _one_image(params - step)) / (2 * h)
        assert torch.allclose(numeric, jacobian[:, i], atol=1e-6, rtol=1e-4), shapes.PARAM_NAMES[i]


def test_render_follows_params_dtype_and_is_batched():
    params = shapes.sample_params(4, torch.Generator().manual_seed(0))
    single = torch.stack([shapes.render(p[None], 8)[0] for p in params])
    batched64 = shapes.render(params.double(), 8)
    assert batched64.dtype == torch.float64
    assert torch.allclose(batched64.float(), single, atol=1e-5)
    # no tensor is created on a fixed device: a "meta" input (shapes only) stays on meta
    assert shapes.render(params.to("meta"), 8).device.type == "meta"


def test_canonicalize_keeps_the_image():
    params = shapes.sample_params(6, torch.Generator().manual_seed(4)).double()
    other = params.clone()
    other[:, 2] = -params[:, 2]  # negative size
    other[:, 3] = 1 / params[:, 3]  # swap long and short axis ...
    other[:, 4] = params[:, 4] + 2.5 * torch.pi  # ... by turning a quarter (+ two half) turns
    canonical = shapes.canonicalize(other)
    assert torch.allclose(canonical, params, atol=1e-9)
    assert torch.allclose(shapes.render(other, 16), shapes.render(params, 16), atol=1e-9)
    projected = shapes.project(params + 10)
    assert (projected <= shapes.PARAM_HIGH.double()).all()
    assert (projected >= shapes.PARAM_LOW.double()).all()


# ---- digits ---------------------------------------------------------------------------------

def test_digits_splits_and_values():
    train = build_dataset("digits", split="train", seed=123)
    test = build_dataset("digits", split="test")
    everything = build_dataset("digits", split="all")
    assert_images(train, 1500, 1, 8)
    assert len(test) == 297 and len(everything) == 1797
    assert torch.equal(train.images, build_dataset("digits", split="train", seed=0).images)
    assert everything.images.min() == -1 and everything.images.max() == 1
    assert set(train.labels.tolist()) == set(range(10)) and train.num_classes == 10
    # train and test are disjoint and together are all images (compared as byte strings)
    keys = lambda d: {img.numpy().tobytes() + bytes([int(l)]) for img, l in zip(d.images, d.labels)}
    assert keys(train) | keys(test) == keys(everything)


def test_digits_nearest_upscaling():
    small = build_dataset("digits", split="test")
    large = build_dataset("digits", split="test", resolution=32)
    assert_images(large, 297, 1, 32)
    assert torch.equal(large.images[:, :, ::4, ::4], small.images)
    assert torch.equal(large.labels, small.labels)
    with pytest.raises(AytError, match="multiple of 8"):
        build_dataset("digits", resolution=12)


# ---- cifar10 --------------------------------------------------------------------------------

def write_fake_cifar(root, per_batch: int = 3) -> dict[str, tuple[np.ndarray, list[int]]]:
    """Write a tiny CIFAR-10 set in the real python format (pickled dicts, protocol 2, bytes
    keys, uint8 data [N, 3072]). Written here rather than downloaded (no internet in tests);
    torchvision's md5 check would reject these files, so the loader reads the format itself."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    written = {}
    for index, name in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]):
        data = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        labels = [(index + j) % 10 for j in range(per_batch)]
        batch = {b"batch_label": name.encode(), b"labels": labels, b"data": data,
                 b"filenames": [f"{name}_{j}.png".encode() for j in range(per_batch)]}
        # the real files were written by numpy 1.x, whose arrays pickle as numpy.core.*
        raw = pickle.dumps(batch, protocol=2).replace(b"numpy._core.", b"numpy.core.")
        (folder / name).write_bytes(raw)
        written[name] = (data, labels)
    return written


def test_cifar10_reads_the_python_format(tmp_path):
    written = write_fake_cifar(tmp_path)
    train = build_dataset("cifar10", root=str(tmp_path), split="train")
    test = build_dataset("cifar10", root=str(tmp_path / "cifar-10-batches-py"), split="test")
    assert_images(train, 15, 3, 32)
    assert_images(test, 3, 3, 32)
    data, labels = written["data_batch_2"]
    image, label = train[3]  # first image of the second batch
    red_row0 = data[0, :32].astype(np.float32) / 255 * 2 - 1
    blue_last = data[0, 2048 + 31 * 32 + 31] / 255 * 2 - 1
    assert np.allclose(image[0, 0].numpy(), red_row0, atol=1e-6)
    assert abs(image[2, 31, 31].item() - blue_last) < 1e-6
    assert label.item() == labels[0]
    assert test.labels.tolist() == written["test_batch"][1]
    assert len(build_dataset("cifar10", root=str(tmp_path), split="all")) == 18


def test_cifar10_refuses_foreign_pickles(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    write_fake_cifar(tmp_path)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"data": Image.new("RGB", (2, 2)), b"labels": [0]}, f)  # a foreign class
    with pytest.raises(AytError, match="test_batch"):
        build_dataset("cifar10", root=str(tmp_path), split="test")


def test_cifar10_missing_root(tmp_path):
    with pytest.raises(AytError, match="download=True") as error:
        build_dataset("cifar10", root=str(tmp_path / "nowhere"))
    assert "nowhere" in str(error.value)
    with pytest.raises(AytError, match="data.root"):
        build_dataset("cifar10")
    with pytest.raises(AytError, match="resolution"):
        build_dataset("cifar10", root=str(tmp_path), resolution=64)


# ---- folder ---------------------------------------------------------------------------------

def test_folder_png_and_jpeg(tmp_path):
    (tmp_path / "sub").mkdir()
    Image.new("RGB", (40, 20), (255, 0, 0)).save(tmp_path / "a.png")
    Image.new("RGB", (30, 30), (0, 0, 255)).save(tmp_path / "sub" / "b.JPG", quality=95)
    (tmp_path / "notes.txt").write_text("not an image")
    rgb = build_dataset("folder", root=str(tmp_path), resolution=8)
    assert_images(rgb, 2, 3, 8)
    assert torch.allclose(rgb.images[0, :, 4, 4], torch.tensor([1.0, -1.0, -1.0]), atol=0.02)
    assert torch.allclose(rgb.images[1, :, 4, 4], torch.tensor([-1.0, -1.0, 1.0]), atol=0.1)
    gray = build_dataset("folder", root=str(tmp_path), resolution=4, channels=1)
    assert_images(gray, 2, 1, 4)
    assert (gray.labels == -1).all()


def test_folder_centre_crop(tmp_path):
    """A 30x10 image with a white centre third crops to the white square."""
    image = np.zeros((10, 30, 3), dtype=np.uint8)
    image[:, 10:20] = 255
    Image.fromarray(image).save(tmp_path / "wide.png")
    dataset = build_dataset("folder", root=str(tmp_path), resolution=5)
    assert torch.allclose(dataset.images, torch.ones(1, 3, 5, 5))


def test_folder_bad_input(tmp_path):
    with pytest.raises(AytError, match="no .png"):
        build_dataset("folder", root=str(tmp_path), resolution=8)
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(AytError, match="broken.png"):
        build_dataset("folder", root=str(tmp_path), resolution=8)
    with pytest.raises(AytError, match="resolution is required"):
        build_dataset("folder", root=str(tmp_path))


def test_folder_class_folders_label_by_sorted_subfolder(tmp_path):
    for name, colour in (("zebra", (0, 0, 0)), ("ant", (255, 255, 255)), ("bee", (0, 0, 0))):
        (tmp_path / name / "deeper").mkdir(parents=True)
        Image.new("RGB", (8, 8), colour).save(tmp_path / name / "deeper" / "x.png")
    dataset = build_dataset("folder", root=str(tmp_path), resolution=4, class_folders=True)
    assert dataset.num_classes == 3
    assert dataset.labels.tolist() == [0, 1, 2]  # ant, bee, zebra in sorted path order
    assert torch.allclose(dataset.images[0], torch.ones(3, 4, 4))  # ant is the white one
    subset = build_dataset("folder", root=str(tmp_path), resolution=4, class_folders=True, num_samples=2, seed=1)
    assert subset.num_classes == 3 and len(subset.labels) == 2  # classes counted over all files
    assert (build_dataset("folder", root=str(tmp_path), resolution=4).labels == -1).all()
    Image.new("RGB", (8, 8)).save(tmp_path / "loose.png")
    with pytest.raises(AytError, match="loose.png.*class subfolder"):
        build_dataset("folder", root=str(tmp_path), resolution=4, class_folders=True)


# ---- npz ------------------------------------------------------------------------------------

def test_npz_uint8_nhwc(tmp_path):
    array = np.random.default_rng(0).integers(0, 256, size=(4, 6, 6, 3), dtype=np.uint8)
    np.savez(tmp_path / "x.npz", images=array, labels=np.array([0, 2, 1, 2]))
    dataset = build_dataset("npz", root=str(tmp_path / "x.npz"), resolution=6)
    assert_images(dataset, 4, 3, 6)
    expected = torch.from_numpy(array).permute(0, 3, 1, 2).float() / 127.5 - 1
    assert torch.allclose(dataset.images, expected)
    assert dataset.labels.tolist() == [0, 2, 1, 2] and dataset.num_classes == 3


def test_npz_float_nchw_only_array(tmp_path):
    array = np.linspace(-1, 1, 2 * 1 * 5 * 5).reshape(2, 1, 5, 5)
    np.savez(tmp_path / "x.npz", array)  # stored under the default key arr_0
    dataset = build_dataset("npz", root=str(tmp_path / "x.npz"))
    assert_images(dataset, 2, 1, 5)
    assert torch.allclose(dataset.images.double(), torch.from_numpy(array), atol=1e-7)
    assert (dataset.labels == -1).all() and dataset.num_classes == 0


@pytest.mark.parametrize("array, message", [
    (np.full((2, 3, 4, 4), np.nan), "contain NaN or inf"),
    (np.zeros((2, 4, 4)), "rank 3 .* must be rank 4"),
    (np.full((2, 3, 4, 4), 2.0), r"span \[2, 2\] but must lie in \[-1, 1\]"),
    (np.zeros((2, 3, 4, 4), dtype=np.uint8), r"must be NHWC.*transpose\(0, 2, 3, 1\)"),
    (np.zeros((2, 4, 4, 3), dtype=np.float32), r"must be NCHW.*transpose\(0, 3, 1, 2\)"),
    (np.zeros((2, 4, 4, 3), dtype=np.int32), "have dtype int32"),
], ids=["nan", "rank", "range", "uint8-nchw", "float-nhwc", "int32"])
def test_npz_bad_arrays(tmp_path, array, message):
    np.savez(tmp_path / "bad.npz", images=array)
    with pytest.raises(AytError, match=message) as error:
        build_dataset("npz", root=str(tmp_path / "bad.npz"))
    assert "bad.npz" in str(error.value)


def test_npz_resolution_must_match(tmp_path):
    np.savez(tmp_path / "x.npz", images=np.zeros((2, 8, 8, 1), dtype=np.uint8))
    with pytest.raises(AytError, match="resolution=8"):
        build_dataset("npz", root=str(tmp_path / "x.npz"), resolution=16)


# ---- factory --------------------------------------------------------------------------------

def test_unknown_name_lists_valid_names():
    with pytest.raises(AytError, match="unknown dataset 'mnist'.*shapes.*digits.*cifar10"):
        build_dataset("mnist")


def test_invalid_arguments_raise():
    with pytest.raises(AytError, match="resolution 12"):
        build_dataset("shapes", resolution=12)
    with pytest.raises(AytError, match="channels"):
        build_dataset("digits", channels=3)
    with pytest.raises(AytError, match="split"):
        build_dataset("digits", split="validation")
    with pytest.raises(AytError, match="num_samples"):
        build_dataset("digits", split="test", num_samples=1000)


def test_num_samples_subset_is_seeded():
    a = build_dataset("digits", split="all", num_samples=50, seed=1)
    b = build_dataset("digits", split="all", num_samples=50, seed=1)
    c = build_dataset("digits", split="all", num_samples=50, seed=2)
    assert len(a) == 50 and torch.equal(a.images, b.images)
    assert not torch.equal(a.images, c.images)
