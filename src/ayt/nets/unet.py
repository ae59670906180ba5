"""EDM's DDPM++ U-Net ("SongUNet"): the raw network `F(c_in x, c_noise)` of method.md section 1.

Architecture after Song et al. 2021 (DDPM++) as configured in Karras et al. 2022 (EDM, config
B-F, 55.73M parameters on CIFAR-10): residual blocks (GroupNorm + SiLU + 3x3 conv), a noise
embedding (positional by default, or random Fourier features) mapped by a two-layer MLP to
`model_channels * channel_mult_emb` channels and injected into every block through a per-block
linear map (an additive shift in DDPM++, or ADM-style scale and shift), single-head
self-attention at chosen resolutions, dropout before each block's second conv, optional class
labels, residual and attention sums scaled by 1/sqrt(2), a standard encoder/decoder with skip
connections, and resampling (box filter) inside residual blocks.

The network never sees sigma: the `Precond` wrapper (precond.py) owns every scaling.
Tensor layouts (qkv channel order, sin/cos order, block order) follow EDM's so that a converter
for pretrained EDM weights stays possible.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from ayt.errors import check
from ayt.nets.dropout import SeededDropout, SeededLabelDropout

SKIP_SCALE = math.sqrt(0.5)


def group_norm(channels: int, eps: float = 1e-6) -> nn.GroupNorm:
    """GroupNorm with min(32, channels // 4) groups as in EDM (lowered until it divides channels)."""
    groups = max(1, min(32, channels // 4))
    while channels % groups:
        groups -= 1
    return nn.GroupNorm(groups, channels, eps=eps)


def init_weights(layer: nn.Linear | nn.Conv2d, gain: float = 1.0) -> None:
    """Xavier-uniform weights scaled by `gain`, zero bias (EDM's DDPM++ initialisation)."""
    nn.init.xavier_uniform_(layer.weight, gain=gain)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)


def fir_filter(taps: tuple[int, ...]) -> torch.Tensor:
    """2-D resampling filter `f f^T / sum(f)^2` from 1-D taps, `[k, k]` (EDM's `resample_filter`)."""
    f = torch.as_tensor(taps, dtype=torch.float32)
    return torch.outer(f, f) / f.sum() ** 2


class Conv2d(nn.Module):
    """Square conv with 'same' padding, optionally preceded by 2x up/downsampling with a FIR filter.

    `x [B, Cin, H, W] -> [B, Cout, H', W']`, H' = 2H (up), H/2 (down) or H. The resampling filter
    is `f f^T / sum(f)^2` of the 1-D taps `resample_filter`: `(1, 1)` (DDPM++, a box filter:
    nearest-neighbour upsampling, 2x2 average pooling) or `(1, 3, 3, 1)` (NCSN++), applied as a
    stride-2 depthwise (transposed) convolution with padding `(k - 1) // 2`. `fused=True` (NCSN++'s
    residual encoder path, downsampling only) convolves first, with padding `kernel // 2 + (k - 1) // 2`,
    then filters with stride 2 and no padding, as EDM's `Conv2d(fused_resample=True)`.
    """

    def __init__(self, cin: int, cout: int, kernel: int, up: bool = False, down: bool = False,
                 gain: float = 1.0, resample_filter: tuple[int, ...] = (1, 1), fused: bool = False) -> None:
        super().__init__()
        check(not (up and down), "a Conv2d resamples up or down, not both")
        check(not fused or down, "fused resampling is implemented for downsampling only")
        self.up, self.down, self.fused = up, down, fused
        self.box = tuple(resample_filter) == (1, 1) and not fused
        self.conv = nn.Conv2d(cin, cout, kernel, padding=kernel // 2)
        init_weights(self.conv, gain)
        if (up or down) and not self.box:  # not saved: it is a function of the architecture
            self.register_buffer("resample_filter", fir_filter(tuple(resample_filter)), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.box:
            if self.up:
                x = F.interpolate(x, scale_factor=2.0, mode="nearest")
            if self.down:
                x = F.avg_pool2d(x, 2)
            return self.conv(x)
        if not (self.up or self.down):
            return self.conv(x)
        f = self.resample_filter.to(x.dtype)
        pad = (f.shape[-1] - 1) // 2
        if self.fused:
            x = F.conv2d(x, self.conv.weight, self.conv.bias, padding=self.conv.padding[0] + pad)
            return F.conv2d(x, f.expand(x.shape[1], 1, *f.shape), groups=x.shape[1], stride=2)
        channels = x.shape[1]
        if self.up:
            x = F.conv_transpose2d(x, (4 * f).expand(channels, 1, *f.shape), groups=channels, stride=2, padding=pad)
        else:
            x = F.conv2d(x, f.expand(channels, 1, *f.shape), groups=channels, stride=2, padding=pad)
        return self.conv(x)


class SelfAttention(nn.Module):
    """Single-head self-attention over pixels, residual added by the caller.

    `x [B, C, H, W] -> [B, C, H, W]`: softmax(q^T k / sqrt(C)) weights over the H*W positions.
    Written with einsum (not fused kernels) so that `torch.func.jvp` works through it.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = group_norm(channels)
        self.qkv = Conv2d(channels, 3 * channels, 1, gain=math.sqrt(0.2))
        self.proj = Conv2d(channels, channels, 1, gain=1e-5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, c, 3, h * w).unbind(2)
        weights = torch.einsum("bci,bcj->bij", q, k / math.sqrt(c)).softmax(dim=2)
        out = torch.einsum("bij,bcj->bci", weights, v)
        return self.proj(out.reshape(b, c, h, w))


class UNetBlock(nn.Module):
    """DDPM++ residual block conditioned on the embedding.

    `x [B, Cin, H, W], emb [B, E] -> [B, Cout, H', W']`: `h = conv0(silu(norm0(x)))`, then
    `h = silu(norm1(h + shift))` (DDPM++, `adaptive_scale=False`) or
    `h = silu(shift + norm1(h) * (1 + scale))` (ADM-style, `adaptive_scale=True`), with
    `shift[, scale] = affine(emb)`; then `h = conv1(dropout(h))`, `x = (h + skip(x)) / sqrt(2)`
    and optionally `x = (x + attention(x)) / sqrt(2)`.
    """

    def __init__(self, cin: int, cout: int, emb_channels: int, up: bool = False,
                 down: bool = False, attention: bool = False, dropout: float = 0.0,
                 adaptive_scale: bool = False, resample_filter: tuple[int, ...] = (1, 1)) -> None:
        super().__init__()
        self.in_channels, self.out_channels = cin, cout
        self.adaptive_scale = adaptive_scale
        self.norm0 = group_norm(cin)
        self.conv0 = Conv2d(cin, cout, 3, up=up, down=down, resample_filter=resample_filter)
        self.affine = nn.Linear(emb_channels, (2 if adaptive_scale else 1) * cout)
        init_weights(self.affine)
        self.norm1 = group_norm(cout)
        self.dropout = SeededDropout(dropout)
        self.conv1 = Conv2d(cout, cout, 3, gain=1e-5)
        needs_skip = cin != cout or up or down
        self.skip = Conv2d(cin, cout, 1, up=up, down=down, resample_filter=resample_filter) if needs_skip else None
        self.attention = SelfAttention(cout) if attention else None

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv0(F.silu(self.norm0(x)))
        params = self.affine(emb)[:, :, None, None]
        if self.adaptive_scale:
            scale, shift = params.chunk(2, dim=1)
            h = F.silu(torch.addcmul(shift, self.norm1(h), scale + 1))
        else:
            h = F.silu(self.norm1(h + params))
        h = self.conv1(self.dropout(h))
        x = (h + (x if self.skip is None else self.skip(x))) * SKIP_SCALE
        if self.attention is not None:
            x = (x + self.attention(x)) * SKIP_SCALE
        return x


def class_label_vectors(class_labels: torch.Tensor | None, label_dim: int,
                        like: torch.Tensor) -> torch.Tensor:
    """Class labels as float `[B, label_dim]` with `like`'s dtype and device (`B = like.shape[0]`).

    `class_labels`: int `[B]` in `0..label_dim-1` (-1 = no label: a zero row), float one-hot or
    soft `[B, label_dim]` (used as is), or None (all rows zero). Bad shapes or values raise `AytError`.
    """
    b = like.shape[0]
    if class_labels is None:
        return like.new_zeros(b, label_dim)
    if class_labels.dtype.is_floating_point:
        shape = tuple(class_labels.shape)
        check(shape == (b, label_dim), f"float class labels have shape {shape}; expected ({b}, {label_dim})")
        return class_labels.to(like)
    check(class_labels.shape == (b,),
          f"int class labels have shape {tuple(class_labels.shape)}; expected ({b},)")
    # Checked on CPU only, as Precond's t > 0: on an accelerator the check would wait for the device
    # on every forward, and under torch.compile it would split the graph. Datasets validate labels.
    if class_labels.device.type == "cpu" and not torch.compiler.is_compiling():
        check(bool(((class_labels >= -1) & (class_labels < label_dim)).all()),
              f"class labels must lie in -1..{label_dim - 1}; check the dataset's label_dim")
    onehot = F.one_hot(class_labels.clamp(min=0).long(), label_dim).to(like)
    return onehot * (class_labels >= 0)[:, None].to(like)


class PositionalEmbedding(nn.Module):
    """Transformer sinusoidal embedding of `c_noise`: `[B] -> [B, channels]` (two halves).

    Frequencies `(1/max_positions)^(j/n)`, j = 0..channels/2-1, with `n = channels/2 - 1` when
    `endpoint` (DDPM++: the last frequency is exactly 1/max_positions) or `n = channels/2` (ADM).
    Halves `[sin, cos]` (DDPM++, which EDM's SongUNet gets by flipping its `[cos, sin]`), or
    `[cos, sin]` with `cos_first` (EDM's DhariwalUNet, no flip).
    """

    def __init__(self, channels: int, max_positions: int = 10000, endpoint: bool = True,
                 cos_first: bool = False) -> None:
        super().__init__()
        half = channels // 2
        exponents = torch.arange(half, dtype=torch.float32) / (max(half - 1, 1) if endpoint else half)
        self.register_buffer("freqs", (1.0 / max_positions) ** exponents, persistent=False)
        self.cos_first = cos_first

    def forward(self, c_noise: torch.Tensor) -> torch.Tensor:
        angles = c_noise.to(torch.promote_types(self.freqs.dtype, torch.float32))[:, None] * self.freqs[None, :]
        halves = [angles.cos(), angles.sin()] if self.cos_first else [angles.sin(), angles.cos()]
        return torch.cat(halves, dim=1)


class FourierEmbedding(nn.Module):
    """Random Fourier features of `c_noise` (NCSN++): `[B] -> [B, channels]` (sin, cos halves).

    Frequencies `~ N(0, scale^2)` are drawn once at construction and stored in the state dict.
    """

    def __init__(self, channels: int, scale: float = 16.0) -> None:
        super().__init__()
        self.register_buffer("freqs", torch.randn(channels // 2) * scale)

    def forward(self, c_noise: torch.Tensor) -> torch.Tensor:
        angles = c_noise.to(torch.promote_types(self.freqs.dtype, torch.float32))[:, None] * (2 * math.pi * self.freqs[None, :])
        return torch.cat([angles.sin(), angles.cos()], dim=1)


EMBEDDINGS = {"positional": PositionalEmbedding, "fourier": FourierEmbedding}
ENCODERS = ("standard", "residual")  # DDPM++, NCSN++


class SongUNet(nn.Module):
    """DDPM++ U-Net `F(x_in [B, Cin, H, W], c_noise [B], labels) -> [B, Cout, H, W]`.

    Encoder, per level `l` at resolution `H / 2^l`: a 3x3 input conv (level 0) or a downsampling
    block, then `num_blocks` blocks with `model_channels * channel_mult[l]` channels. Decoder,
    per level from the bottom: two blocks (the first with attention) at the bottom or an
    upsampling block elsewhere, then `num_blocks + 1` blocks each taking one encoder skip.
    Output: GroupNorm, SiLU, 3x3 conv. At resolutions in `attn_resolutions`, attention follows
    every encoder block and the last decoder block of the level. The embedding enters each block
    as an additive shift (DDPM++); `adaptive_scale=True` switches to ADM-style scale and shift.
    With the defaults at 32x32x3 this has 55,732,739 parameters (EDM reports 55.73M).

    NCSN++ (EDM's "ve" architecture) differs in four options: `embedding_type="fourier"`,
    `channel_mult_noise=2` (noise embedding of `2 * model_channels` channels),
    `resample_filter=(1, 3, 3, 1)`, and `encoder_type="residual"`: after each downsampling block
    the image-resolution path `aux` (starting as the input) joins, `x = aux = (x + conv(aux)) / sqrt(2)`,
    through a 3x3 fused-downsampling conv (`enc_residual`).

    Class labels (`label_dim > 0`): see `class_label_vectors`; `None` means all-zero (dropped)
    labels. With `label_dim = 0` labels are ignored.

    Second time input (`second_time=True`, for MeanFlow's `u(z, r, t)`; method.md section 8): a
    second noise label `noise_labels2 [B]` goes through the same noise embedding and its own
    linear map `map_time2` (no bias) into the first mapping layer, `map_layer0(emb) +
    map_time2(map_noise(c2))`. This equals MeanFlow's U-Net, which concatenates the two embeddings
    before `map_layer0` (a linear map of a concatenation is the sum of two linear maps). Off by
    default: the network and its state dict are then exactly as before.
    """

    def __init__(self, img_resolution: int, in_channels: int, out_channels: int,
                 label_dim: int = 0, model_channels: int = 128,
                 channel_mult: tuple[int, ...] = (2, 2, 2), channel_mult_emb: int = 4,
                 num_blocks: int = 4, attn_resolutions: tuple[int, ...] = (16,),
                 dropout: float = 0.10, label_dropout: float = 0.0,
                 embedding_type: str = "positional", adaptive_scale: bool = False,
                 channel_mult_noise: int = 1, encoder_type: str = "standard",
                 resample_filter: tuple[int, ...] = (1, 1), second_time: bool = False) -> None:
        super().__init__()
        check(embedding_type in EMBEDDINGS, f"unknown embedding_type {embedding_type!r}; "
              f"use one of {sorted(EMBEDDINGS)}")
        check(encoder_type in ENCODERS, f"unknown encoder_type {encoder_type!r}; use one of {list(ENCODERS)}")
        check(img_resolution % 2 ** (len(channel_mult) - 1) == 0,
              f"img_resolution {img_resolution} is not divisible by 2**{len(channel_mult) - 1}; "
              "use fewer channel_mult levels or another resolution")
        self.img_resolution, self.in_channels, self.out_channels = img_resolution, in_channels, out_channels
        self.label_dim = label_dim
        emb_channels = model_channels * channel_mult_emb
        noise_channels = model_channels * channel_mult_noise
        self.map_noise = EMBEDDINGS[embedding_type](noise_channels)
        self.map_label = nn.Linear(label_dim, noise_channels) if label_dim else None
        self.label_dropout = SeededLabelDropout(label_dropout) if label_dim else None
        self.map_layer0 = nn.Linear(noise_channels, emb_channels)
        self.map_layer1 = nn.Linear(emb_channels, emb_channels)
        self.map_time2 = nn.Linear(noise_channels, emb_channels, bias=False) if second_time else None
        for layer in (self.map_label, self.map_layer0, self.map_layer1, self.map_time2):
            if layer is not None:
                init_weights(layer)
        block = dict(emb_channels=emb_channels, dropout=dropout, adaptive_scale=adaptive_scale,
                     resample_filter=tuple(resample_filter))
        self.enc = self._build_encoder(in_channels, model_channels, channel_mult, num_blocks,
                                       attn_resolutions, block)
        self.enc_residual = None  # NCSN++: one fused-downsampling conv per downsampling block
        if encoder_type == "residual":
            couts = [in_channels] + [self.enc[i].out_channels for i in self.down_indices]
            self.enc_residual = nn.ModuleList(
                Conv2d(cin, cout, 3, down=True, resample_filter=tuple(resample_filter), fused=True)
                for cin, cout in zip(couts[:-1], couts[1:]))
        self.dec = self._build_decoder(model_channels, channel_mult, num_blocks,
                                       attn_resolutions, block)
        cout = model_channels * channel_mult[0]
        self.out_norm = group_norm(cout)
        self.out_conv = Conv2d(cout, out_channels, 3, gain=1e-5)

    def _build_encoder(self, in_channels: int, model_channels: int, channel_mult: tuple[int, ...],
                       num_blocks: int, attn_resolutions: tuple[int, ...], block: dict) -> nn.ModuleList:
        """Encoder layers in call order; each layer's output is one skip for the decoder."""
        layers: list[nn.Module] = [Conv2d(in_channels, model_channels, 3)]
        cout = model_channels
        self.down_indices: list[int] = []  # encoder layers that downsample
        for level, mult in enumerate(channel_mult):
            res = self.img_resolution >> level
            if level > 0:
                self.down_indices.append(len(layers))
                layers.append(UNetBlock(cout, cout, down=True, **block))
            for _ in range(num_blocks):
                cin, cout = cout, model_channels * mult
                layers.append(UNetBlock(cin, cout, attention=res in attn_resolutions, **block))
        self.skip_channels = [model_channels] + [m.out_channels for m in layers[1:]]
        return nn.ModuleList(layers)

    def _build_decoder(self, model_channels: int, channel_mult: tuple[int, ...], num_blocks: int,
                       attn_resolutions: tuple[int, ...], block: dict) -> nn.ModuleList:
        """Decoder blocks in call order; blocks with `takes_skip` concatenate one encoder skip."""
        skips, layers = list(self.skip_channels), []
        cout = skips[-1]
        for level in reversed(range(len(channel_mult))):
            res = self.img_resolution >> level
            if level == len(channel_mult) - 1:
                layers += [UNetBlock(cout, cout, attention=True, **block), UNetBlock(cout, cout, **block)]
            else:
                layers.append(UNetBlock(cout, cout, up=True, **block))
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * channel_mult[level]
                attention = idx == num_blocks and res in attn_resolutions
                layers.append(UNetBlock(cin, cout, attention=attention, **block))
                layers[-1].takes_skip = True
        return nn.ModuleList(layers)

    def embed(self, c_noise: torch.Tensor, class_labels: torch.Tensor | None,
              c_noise2: torch.Tensor | None = None) -> torch.Tensor:
        """Noise (and label) embedding: `c_noise [B]` (and `c_noise2 [B]` with `second_time`)
        -> `emb [B, model_channels * channel_mult_emb]`."""
        check((c_noise2 is not None) == (self.map_time2 is not None),
              "a second time input needs SongUNet(second_time=True), and such a network needs one")
        emb = self.map_noise(c_noise).to(self.map_layer0.weight.dtype)
        if self.map_label is not None:
            labels = self.label_dropout(class_label_vectors(class_labels, self.label_dim, emb))
            emb = emb + self.map_label(labels * math.sqrt(self.label_dim))
        hidden = self.map_layer0(emb)
        if self.map_time2 is not None:
            hidden = hidden + self.map_time2(self.map_noise(c_noise2).to(hidden.dtype))
        return F.silu(self.map_layer1(F.silu(hidden)))

    def forward(self, x: torch.Tensor, noise_labels: torch.Tensor,
                class_labels: torch.Tensor | None = None, noise_labels2: torch.Tensor | None = None) -> torch.Tensor:
        """`x [B, Cin, H, W]`, `noise_labels` = c_noise `[B]` (and `noise_labels2 [B]`, the second time
        input of a `second_time` network) -> `[B, Cout, H, W]`."""
        emb = self.embed(noise_labels, class_labels, noise_labels2).to(x.dtype)
        skips, aux = [], x
        for i, layer in enumerate(self.enc):
            x = layer(x) if i == 0 else layer(x, emb)
            if self.enc_residual is not None and i in self.down_indices:
                x = aux = (x + self.enc_residual[self.down_indices.index(i)](aux)) * SKIP_SCALE
            skips.append(x)
        for layer in self.dec:
            if getattr(layer, "takes_skip", False):
                x = torch.cat([x, skips.pop()], dim=1)
            x = layer(x, emb)
        return self.out_conv(F.silu(self.out_norm(x)))
