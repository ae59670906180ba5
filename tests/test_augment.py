"""Perturbations and targets for the feature network (method.md section 4)."""

from __future__ import annotations

import math

import pytest
import torch

from ayt.config import FeaturesConfig
from ayt.errors import AytError
from ayt.features.augment import (
    PERTURBATIONS,
    SUBSETS,
    TARGET_NAMES,
    Perturber,
    RECIPES,
    SYM6,
    add_noise,
    adjust_brightness,
    adjust_contrast,
    adjust_saturation,
    affine_matrix,
    affine_warp,
    downsample_2x,
    gaussian_blur,
    gaussian_kernels,
    hue_rotate,
    mixup,
    perturbation_slices,
    target_groups,
    unit_rms,
    upsample_2x,
)

DIMS = {"geo": 7, "geo_colour": 12, "geo_degrade": 10, "degrade": 3, "all": 15}


def _images(b: int = 4, c: int = 3, res: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, c, res, res, generator=g) * 2 - 1


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# -- subsets, names, dimensions ----------------------------------------------------------------


@pytest.mark.parametrize("subset", list(DIMS))
def test_target_dim_per_subset(subset: str) -> None:
    p = Perturber(subset, p=1.0)
    assert p.target_dim == DIMS[subset] == len(TARGET_NAMES[subset])
    groups = target_groups(subset)
    assert sum(s.stop - s.start for s in groups.values()) == DIMS[subset]
    assert list(groups) == list(SUBSETS[subset])
    _, t = p(_images(), _gen())
    assert t.shape == (4, DIMS[subset])


def test_group_slices_of_all() -> None:
    assert target_groups("all") == {"geometric": slice(0, 7), "colour": slice(7, 12), "degradation": slice(12, 15)}


def test_unknown_subset_and_bad_p_raise() -> None:
    with pytest.raises(AytError, match="geo_colour"):
        Perturber("colour")
    with pytest.raises(AytError):
        Perturber(p=1.5)
    with pytest.raises(AytError):
        Perturber(ramp_steps=-1)
    with pytest.raises(AytError):
        Perturber()(torch.zeros(2, 3, 4, 4))


def test_from_config() -> None:
    p = Perturber.from_config(FeaturesConfig(subset="geo", p=0.3, ramp_steps=10))
    assert (p.subset, p.p, p.ramp_steps, p.target_dim) == ("geo", 0.3, 10, 7)


# -- not applied: exact identity and zero targets ---------------------------------------------


@pytest.mark.parametrize("subset", list(DIMS))
def test_p_zero_is_exact_identity(subset: str) -> None:
    x = _images()
    y, t = Perturber(subset, p=0.0)(x, _gen())
    assert torch.equal(y, x)
    assert torch.equal(t, torch.zeros_like(t))


def test_ramp_start_is_identity() -> None:
    x = _images()
    y, t = Perturber(p=1.0, ramp_steps=100)(x, _gen(), step=0)
    assert torch.equal(y, x) and not t.any()


@pytest.mark.parametrize("name", list(PERTURBATIONS))
def test_single_perturbation_mask(name: str) -> None:
    """Only `name` on image 0, nothing on image 1: image 1 bit-identical, targets only in `name`'s slots."""
    x = _images(b=2)
    per = Perturber(p=1.0)
    prm = per.sample_params(2, 3, generator=_gen())
    prm.applied = {n: torch.tensor([n == name, False]) for n in PERTURBATIONS}
    y, t = per.apply(x, prm, _gen(1)), per.targets(prm)
    sl = perturbation_slices("all")[name]
    assert torch.equal(y[1], x[1]) and not t[1].any()
    assert not torch.equal(y[0], x[0])
    assert t[0, sl].abs().sum() > 0
    rest = torch.ones(15, dtype=torch.bool)
    rest[sl] = False
    assert not t[0, rest].any()


# -- pure functions with known parameters -----------------------------------------------------


def _warp(x: torch.Tensor, scale=1.0, angle=0.0, aniso=1.0, u=0.0, shift=(0.0, 0.0), **kw) -> torch.Tensor:
    b = x.shape[0]
    full = lambda v: torch.full((b,), float(v))  # noqa: E731
    return affine_warp(x, full(scale), full(angle), full(aniso), full(u), torch.tensor([shift] * b), **kw)


def test_rotation_by_90_degrees_is_rot90() -> None:
    x = _images(b=2, res=16)  # random, hence asymmetric
    assert not torch.allclose(x, torch.rot90(x, 1, (2, 3)))
    y = _warp(x, angle=math.pi / 2)
    assert torch.allclose(y[..., 1:-1, 1:-1], torch.rot90(x, 1, (2, 3))[..., 1:-1, 1:-1], atol=1e-5)


def test_identity_warp_and_one_pixel_shift() -> None:
    x = _images(b=2, res=16)
    assert torch.allclose(_warp(x), x, atol=1e-5)
    right = _warp(x, shift=(1 / 16, 0.0))  # content moves one pixel right
    assert torch.allclose(right[..., :, 1:], x[..., :, :-1], atol=1e-5)
    down = _warp(x, shift=(0.0, 2 / 16))  # two pixels down
    assert torch.allclose(down[..., 2:, :], x[..., :-2, :], atol=1e-5)


def test_aniso_scale_is_area_preserving_and_iso_scale_zooms() -> None:
    x = torch.zeros(1, 1, 33, 33)
    x[..., 12:21, 12:21] = 1.0  # a 9x9 square in the middle
    area = x.sum()
    assert abs(float(_warp(x, aniso=1.5, u=0.3).sum()) - float(area)) < 0.05 * float(area)
    assert abs(float(_warp(x, scale=2.0).sum()) - 4 * float(area)) < 0.05 * 4 * float(area)


def test_brightness_adds_constant_and_contrast_keeps_mean() -> None:
    x = _images(b=2)
    d = torch.tensor([0.2, -0.4])
    assert torch.allclose(adjust_brightness(x, d) - x, d.view(2, 1, 1, 1).expand_as(x), atol=1e-6)
    f = torch.tensor([2.0, 0.5])
    y = adjust_contrast(x, f, about_mean=True)  # legacy recipe
    assert torch.allclose(y.mean((1, 2, 3)), x.mean((1, 2, 3)), atol=1e-6)
    assert torch.allclose(y.std((1, 2, 3)), f * x.std((1, 2, 3)), rtol=1e-5)


def test_hue_rotation_identity_luma_and_chroma_norm() -> None:
    x = _images(b=3)
    assert torch.allclose(hue_rotate(x, torch.zeros(3)), x, atol=1e-6)
    assert torch.allclose(hue_rotate(x, torch.full((3,), 2 * math.pi)), x, atol=1e-5)
    y = hue_rotate(x, torch.tensor([0.7, -2.0, 3.0]))
    assert torch.allclose(y.mean(1), x.mean(1), atol=1e-6)  # luma (channel mean) preserved
    chroma = lambda v: (v - v.mean(1, keepdim=True)).norm(dim=1)  # noqa: E731
    assert torch.allclose(chroma(y), chroma(x), atol=1e-5)
    assert not torch.allclose(y, x, atol=1e-2)
    # three successive turns by 2pi/3 return to the start
    third = torch.full((3,), 2 * math.pi / 3)
    assert torch.allclose(hue_rotate(hue_rotate(hue_rotate(x, third), third), third), x, atol=1e-5)


def test_saturation_zero_is_gray_and_one_is_identity() -> None:
    x = _images(b=2)
    gray = adjust_saturation(x, torch.zeros(2))
    assert torch.allclose(gray, x.mean(1, keepdim=True).expand_as(x), atol=1e-6)
    assert torch.allclose(adjust_saturation(x, torch.ones(2)), x, atol=1e-6)
    with pytest.raises(AytError):
        adjust_saturation(x[:, :1], torch.ones(2))


@pytest.mark.parametrize("sigma", [0.8, 1.5, 2.5])
def test_blur_of_delta_has_right_second_moment(sigma: float) -> None:
    n = 41
    x = torch.zeros(1, 1, n, n)
    x[..., n // 2, n // 2] = 1.0
    y = gaussian_blur(x, torch.tensor([sigma]))[0, 0]
    k = torch.arange(n, dtype=torch.float32) - n // 2
    assert abs(float(y.sum()) - 1.0) < 1e-5
    var_x = float((y.sum(0) * k**2).sum())
    var_y = float((y.sum(1) * k**2).sum())
    assert abs(var_x - sigma**2) < 0.01 * sigma**2 and abs(var_y - sigma**2) < 0.01 * sigma**2
    assert torch.allclose(y, y.T, atol=1e-7)


def test_blur_per_image_sigma_and_small_images() -> None:
    x = _images(b=2, res=8)
    y = gaussian_blur(x, torch.tensor([0.0, 3.0]))  # radius capped at 7 on 8x8
    assert torch.allclose(y[0], x[0], atol=1e-6)
    assert y[1].std() < 0.5 * x[1].std()


def test_mixup_weight_zero_is_identity() -> None:
    x, other = _images(b=2), _images(b=2, seed=1)
    assert torch.equal(mixup(x, other, torch.zeros(2)), x)
    assert torch.allclose(mixup(x, other, torch.full((2,), 0.5)), 0.5 * (x + other), atol=1e-6)


def test_noise_rms_matches_target() -> None:
    per = Perturber(p=1.0, recipe="legacy")
    x = _images(b=64, res=32)
    prm = per.sample_params(64, 3, generator=_gen())
    prm.applied = {n: torch.full((64,), n == "noise") for n in PERTURBATIONS}
    y, t = per.apply(x, prm, _gen(1)), per.targets(prm)
    rms = (y - x).pow(2).mean((1, 2, 3)).sqrt()
    w = t[:, -1]
    assert (w > 0).all() and (w < 0.5).all()
    assert ((rms - w).abs() < 0.05 * w + 1e-3).all()
    assert torch.equal(add_noise(x, torch.zeros(64), torch.randn_like(x)), x)


# -- ramp, frequency, targets, shapes ---------------------------------------------------------


def test_ramp() -> None:
    per = Perturber(p=0.2, ramp_steps=100)
    assert per.probability(0) == 0.0
    assert per.probability(50) == pytest.approx(0.1)
    assert per.probability(100) == pytest.approx(0.2) and per.probability(10_000) == pytest.approx(0.2)
    assert per.probability(None) == 0.2
    assert Perturber(p=0.2).probability(0) == 0.2


def test_frequency_of_application_is_p() -> None:
    per = Perturber(p=0.15)
    prm = per.sample_params(4000, 3, generator=_gen())
    for name in PERTURBATIONS:
        assert abs(prm.applied[name].float().mean().item() - 0.15) < 0.025, name
    nonzero = per.targets(prm).ne(0).float().mean(0)
    wsin = TARGET_NAMES["all"].index("aniso_wsin")  # the axis angle is 0 (sin u = 0) half of the time
    assert abs(nonzero[wsin] - 0.075) < 0.02
    nonzero[wsin] = 0.15
    assert ((nonzero - 0.15).abs() < 0.025).all()


def test_target_laws() -> None:
    per = Perturber(p=1.0)
    t = per.targets(per.sample_params(4000, 3, generator=_gen()))
    sl = perturbation_slices("all")
    rot = t[:, sl["rotation"]]
    assert torch.allclose((rot[:, 0] + 1) ** 2 + rot[:, 1] ** 2, torch.ones(4000), atol=1e-5)
    assert abs(t[:, sl["iso_scale"]].std().item() - 1.0) < 0.06
    assert (t[:, sl["blur"]] >= 0).all() and (t[:, sl["blur"]] <= 3).all()
    mix = t[:, sl["mixup"]]
    assert (mix >= 0).all() and (mix <= 0.5).all()
    assert abs(mix.mean().item() - 0.125) < 0.01  # E[0.5 Beta(1, 3)] = 0.125


def test_mixup_partner_is_another_image() -> None:
    prm = Perturber(p=1.0, recipe="legacy").sample_params(16, 3, generator=_gen())
    assert sorted(prm.partner.tolist()) == list(range(16))
    assert (prm.partner != torch.arange(16)).all()
    single = Perturber(p=1.0).sample_params(1, 3, generator=_gen())
    assert not single.applied["mixup"].any()


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("res", [8, 32])
def test_shapes_channels_resolutions(channels: int, res: int) -> None:
    x = _images(b=6, c=channels, res=res)
    y, t = Perturber(p=0.7)(x, _gen())
    assert y.shape == x.shape and t.shape == (6, 15) and t.dtype == x.dtype
    assert torch.isfinite(y).all() and torch.isfinite(t).all()


def test_gray_images_never_get_hue_or_saturation() -> None:
    per = Perturber(p=1.0)
    x = _images(b=8, c=1)
    _, t = per(x, _gen())
    colour = target_groups("all")["colour"]
    assert not t[:, colour][:, 2:].any()  # hue (2 slots) and saturation
    assert t[:, colour][:, :2].ne(0).all()  # brightness and contrast still apply


def test_same_seed_same_result() -> None:
    x = _images()
    y1, t1 = Perturber(p=0.5)(x, _gen(3))
    y2, t2 = Perturber(p=0.5)(x, _gen(3))
    y3, _ = Perturber(p=0.5)(x, _gen(4))
    assert torch.equal(y1, y2) and torch.equal(t1, t2) and not torch.equal(y1, y3)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_other_dtypes(dtype: torch.dtype) -> None:
    x = _images(b=4).to(dtype)
    y, t = Perturber(p=1.0)(x, _gen())
    assert y.dtype == dtype and t.dtype == dtype and torch.isfinite(y.float()).all()


def test_double_angle_aniso_target_is_a_function_of_the_warp() -> None:
    """(w, u), (w, u + pi) and (-w, u + pi/2) give one warp; only the double-angle target agrees."""
    from ayt.features.augment import _target, affine_matrix

    w, u = torch.tensor([0.7, -1.3]), torch.tensor([0.4, 2.0])
    same_warps = [(w, u), (w, u + math.pi), (-w, u + math.pi / 2)]
    one = torch.ones(2)
    matrices = [affine_matrix(one, 0 * one, 2.0 ** (0.2 * a), b) for a, b in same_warps]
    for m in matrices[1:]:
        torch.testing.assert_close(m, matrices[0])
    double = [_target("aniso_scale", torch.stack([a, b], 1), "double_angle") for a, b in same_warps]
    paper = [_target("aniso_scale", torch.stack([a, b], 1), "paper") for a, b in same_warps]
    for t in double[1:]:
        torch.testing.assert_close(t, double[0])
    assert not torch.allclose(paper[1], paper[0]) and not torch.allclose(paper[2], paper[0])
    torch.testing.assert_close(paper[0], torch.stack([w * u.cos(), w * u.sin()], 1))  # method.md's form
    with pytest.raises(AytError, match="aniso_target"):
        Perturber("geo", 0.5, 0, "half_angle")


# -- the reference recipe (issue 12): each difference against its formula ----------------------


def _only(per: Perturber, x: torch.Tensor, names: set[str], seed: int = 0, **w: torch.Tensor):
    """Apply exactly the perturbations `names` to every image of x (raw draws `w` replaced); returns (y, params)."""
    prm = per.sample_params(x.shape[0], x.shape[1], generator=_gen(seed))
    prm.applied = {n: torch.full((x.shape[0],), n in names) & (n != "mixup" or prm.applied[n]) for n in PERTURBATIONS}
    prm.w.update(w)
    return per.apply(x, prm, _gen(seed + 1)), prm


def test_recipes_and_config_name() -> None:
    assert set(RECIPES) == {"reference", "legacy"} and Perturber().recipe is RECIPES["reference"]
    assert Perturber.from_config(FeaturesConfig(recipe="legacy")).recipe is RECIPES["legacy"]
    with pytest.raises(AytError, match="recipe"):
        Perturber(recipe="paper")


def test_aniso_axis_is_zero_half_of_the_time_in_the_reference() -> None:
    u_ref = Perturber(p=1.0).sample_params(4000, 3, generator=_gen()).w["aniso_scale"][:, 1]
    u_old = Perturber(p=1.0, recipe="legacy").sample_params(4000, 3, generator=_gen()).w["aniso_scale"][:, 1]
    assert abs(u_ref.eq(0).float().mean().item() - 0.5) < 0.03
    tilted = u_ref[u_ref != 0]
    assert tilted.abs().max() <= math.pi and abs(tilted.abs().mean().item() - math.pi / 2) < 0.1  # U(-pi, pi)
    assert not u_old.eq(0).any()


def test_reference_contrast_multiplies_about_zero_after_brightness() -> None:
    x = _images(b=3)
    f = torch.tensor([2.0, 0.5, 1.3])
    torch.testing.assert_close(adjust_contrast(x, f), f.view(3, 1, 1, 1) * x)
    y, prm = _only(Perturber(p=1.0), x, {"brightness", "contrast"})
    b, c = 0.2 * prm.w["brightness"], 2.0 ** (0.5 * prm.w["contrast"])
    torch.testing.assert_close(y, c.view(3, 1, 1, 1) * (x + b.view(3, 1, 1, 1)))
    y_old, _ = _only(Perturber(p=1.0, recipe="legacy"), x, {"brightness", "contrast"})
    assert not torch.allclose(y_old, y, atol=1e-3)


def test_reference_blur_is_an_11_tap_kernel_whose_sigma_saturates() -> None:
    x = torch.zeros(2, 1, 21, 21)
    x[:, :, 10, 10] = 1.0
    sigma = torch.tensor([1.5, 3.0])
    y, _ = _only(Perturber(p=1.0), x, {"blur"}, blur=sigma)
    torch.testing.assert_close(y, gaussian_blur(x, sigma, radius=5))
    assert not y[:, :, 10, 4].any() and y[:, :, 10, 5].all()  # support: 5 pixels each side
    k = torch.arange(-5, 6, dtype=torch.float32)
    effective = (gaussian_kernels(torch.tensor([3.0]), 5)[0] * k**2).sum().sqrt()
    assert 2.4 < effective < 2.6  # sigma 3 truncated at 5 taps: about 2.5


def test_reference_mixup_partner_is_the_perturbed_batch_reversed() -> None:
    x = _images(b=5)
    per = Perturber(p=1.0)
    y, prm = _only(per, x, {"blur", "mixup"})
    blurred = gaussian_blur(x, prm.w["blur"], radius=5)
    lam = prm.w["mixup"].view(5, 1, 1, 1)
    expected = (1 - lam) * blurred + lam * blurred.flip(0)
    torch.testing.assert_close(y[[0, 1, 3, 4]], expected[[0, 1, 3, 4]])
    assert prm.partner.tolist() == [4, 3, 2, 1, 0]
    assert per.targets(prm)[2, perturbation_slices("all")["mixup"]].item() == 0  # the middle one is not mixed
    torch.testing.assert_close(y[2], blurred[2])


def test_reference_noise_has_rms_exactly_w() -> None:
    x = _images(b=16, res=8)
    per = Perturber(p=1.0)
    y, prm = _only(per, x, {"noise"})
    rms = (y - x).square().mean((1, 2, 3)).sqrt()
    torch.testing.assert_close(rms, per.targets(prm)[:, -1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(unit_rms(x).square().mean((1, 2, 3)), torch.ones(16))


def test_sym6_filter_is_orthonormal_and_resampling_reconstructs() -> None:
    h = torch.tensor(SYM6, dtype=torch.float64)
    assert abs(h.sum().item() - math.sqrt(2)) < 1e-12 and abs(h.square().sum().item() - 1) < 1e-12
    for shift in (2, 4, 6, 8, 10):  # orthogonal to its even shifts: perfect reconstruction
        assert abs((h[shift:] * h[:-shift]).sum().item()) < 1e-12
    x = _images(b=2, res=24)
    up = upsample_2x(x)
    assert up.shape[-2:] == (48, 48)
    torch.testing.assert_close(downsample_2x(up)[..., 6:-6, 6:-6], x[..., 6:-6, 6:-6], atol=1e-5, rtol=0)


def test_edm_warp_identity_and_integer_shift_are_exact() -> None:
    x = _images(b=2, res=16)
    edm = {"resample": "edm_2x", "aniso_last": True}
    torch.testing.assert_close(_warp(x, **edm), x, atol=2e-5, rtol=0)  # border included (reflect padding)
    right = _warp(x, shift=(1 / 16, 0.0), **edm)
    torch.testing.assert_close(right[..., 1:], x[..., :-1], atol=2e-5, rtol=0)
    down = _warp(x, shift=(0.0, 2 / 16), **edm)
    torch.testing.assert_close(down[..., 2:, :], x[..., :-2, :], atol=2e-5, rtol=0)
    with pytest.raises(AytError, match="resampling"):
        _warp(x, resample="nearest")


def test_edm_warp_blurs_a_half_pixel_shift_less_than_bilinear() -> None:
    x = torch.randn(32, 1, 16, 16, generator=_gen())
    half = (0.5 / 16, 0.0)
    inner = lambda y: y[..., 3:-3, 3:-3].std().item()  # noqa: E731
    bilinear, edm = inner(_warp(x, shift=half)), inner(_warp(x, shift=half, resample="edm_2x"))
    assert bilinear < 0.75 * inner(x)  # the average of two neighbours: std / sqrt(2)
    assert edm > 0.85 * inner(x)


def test_reference_warp_stretches_after_the_rotation() -> None:
    one, u, angle = torch.ones(1), torch.tensor([0.3]), torch.tensor([1.1])
    a = torch.tensor([1.4])
    stretch = affine_matrix(one, 0 * one, a, u)
    rot = affine_matrix(one, angle, one, 0 * one)
    torch.testing.assert_close(affine_matrix(one, angle, a, u, aniso_last=True), stretch @ rot)
    torch.testing.assert_close(affine_matrix(one, angle, a, u), rot @ stretch)
    x = _images(b=1, res=16)
    per = Perturber(p=1.0)
    y, prm = _only(per, x, {"rotation", "aniso_scale"})
    w = prm.w
    expected = affine_warp(x, one, w["rotation"], 2.0 ** (0.2 * w["aniso_scale"][:, 0]), w["aniso_scale"][:, 1],
                           torch.zeros(1, 2), aniso_last=True, resample="edm_2x")
    torch.testing.assert_close(y, expected)
