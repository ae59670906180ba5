"""EDM's ADM U-Net ("DhariwalUNet"): the raw network `F(c_in x, c_noise)` of method.md section 1.

The architecture of Dhariwal & Nichol 2021 ("Diffusion Models Beat GANs") as reimplemented in
Karras et al. 2022 (EDM, `training/networks.py`, class `DhariwalUNet`), whose ImageNet-64 model
`edm-imagenet-64x64-cond-adm.pkl` (295.9M parameters, class-conditional) this mirrors. `Precond`
(precond.py) wraps it exactly as it wraps `SongUNet`.

Weight layout guarantee (for the EDM-pickle converter). Constructor arguments carry EDM's names
and defaults, except `augment_dim` (ayt has no augmentation labels; the converter drops
`map_augment.*`, absent anyway from the `--augment=0` ImageNet model), plus `channels_per_head`
(default 64, EDM's fixed value). For the same arguments, `state_dict()` keys, their
order and shapes equal EDM's `DhariwalUNet.state_dict()` minus:
  - `map_augment.weight` (see above);
  - the `resample_filter` buffers of EDM's `Conv2d` (`*.conv0.resample_filter`,
    `*.skip.resample_filter` of every `_down` / `_up` block): the constant [1, 1] box filter,
    which here is 2x2 average pooling / nearest-neighbour upsampling, not a tensor.
ayt adds no persistent buffers (the dropout seeds are non-persistent). Inside `Precond` every
key gains the prefix `net.` (EDM's `EDMPrecond` uses `model.`). Keys: `map_layer0.*`,
`map_layer1.*`, `map_label.weight`, `enc.{R}x{R}_conv.*`, `enc.{R}x{R}_down.*`,
`enc.{R}x{R}_block{i}.*`, `dec.{R}x{R}_in0.*` / `_in1.*` (bottom level) or `dec.{R}x{R}_up.*`,
`dec.{R}x{R}_block{i}.*`, `out_norm.*`, `out_conv.*`; a block holds `norm0 conv0 affine norm1
conv1 [skip] [norm2 qkv proj]`.

EDM facts implemented (EDM git HEAD 008a4e5, `training/networks.py`, line numbers there):
  - Defaults model_channels 192, channel_mult [1,2,3,4], channel_mult_emb 4, num_blocks 3,
    attn_resolutions [32,16,8], dropout 0.10, label_dropout 0 (L380-386); EDM's ImageNet-64 run
    uses them with label_dim 1000 (`train.py` L124, README "imagenet-64x64-cond-adm":
    `--cond=1 --arch=adm --dropout=0.10 --augment=0`).
  - Blocks use UNetBlock's defaults (L393 passes only emb_channels, channels_per_head 64,
    dropout, init, init_zero; defaults L137-138): GroupNorm eps 1e-5, skip_scale 1 (no
    1/sqrt(2) anywhere), adaptive_scale True with `scale, shift = affine(emb).chunk(2)` in that
    order and `h = silu(shift + norm1(h) * (scale + 1))` (L170-173), resample_proj False so a
    same-width up/down block's skip is a pure resampling without weights (L157-159), attention
    heads `out_channels // 64` (L145).
  - Block order (L166-187): `h = conv0(silu(norm0(x)))` (up/down resampling before conv0),
    the scale/shift above, `h = conv1(dropout(h))`, `x = h + skip(x)`; then, with attention,
    `x = x + proj(attention(norm2(x)))`.
  - Attention (L181-186, AttentionOp L116): qkv channels reshaped to `[B * heads, C / heads, 3, H*W]`
    (head-major, then channel, then q/k/v), weights `softmax(q^T k / sqrt(C / heads))` over keys,
    computed in float32 and cast back; output reshaped to `[B, C, H, W]` head-major.
  - GroupNorm groups `min(32, C // 4)` (L97-99); the output norm also eps 1e-5 (L432, default).
  - Resampling (L64-66, L82-89): filter [1, 1] -> `f = [[1,1],[1,1]] / 4`; down = depthwise stride-2
    conv with f = 2x2 average pooling; up = depthwise stride-2 transposed conv with 4f =
    nearest-neighbour 2x upsampling; then the 'same'-padded conv; bias added last.
  - Noise embedding (L396, L194, L200-205): PositionalEmbedding(model_channels), endpoint False,
    frequencies `(1/10000)^(j / (C/2))`, halves `[cos, sin]`, no flip (SongUNet flips, L323; ADM
    does not, L437).
  - Mapping (L437-447): `emb = map_layer1(silu(map_layer0(pos)))`, then `+ map_label(labels)`
    (bias-free Linear to emb_channels, L400, labels not rescaled: the sqrt(label_dim) sits in its
    init), then `silu(emb)`. Label dropout zeroes whole label rows without rescaling (L444-445).
  - Encoder (L403-417): level 0 starts with `{R}x{R}_conv` (3x3, in_channels ->
    model_channels * channel_mult[0]); later levels start with a `_down` block; every level has
    num_blocks blocks, with attention iff R in attn_resolutions. Every encoder output is a skip.
  - Decoder (L420-431): bottom level `_in0` (attention always) and `_in1`; other levels an `_up`
    block; then num_blocks + 1 blocks, each with attention iff R in attn_resolutions, each taking
    the last skip (concatenated after x) when the width differs (L457-458).
  - Output (L432-433, L460): `out_conv(silu(out_norm(x)))`, 3x3.
  - Initialisation (L19-24, L391-392, L400): weights and biases U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    (kaiming_uniform scaled by sqrt(1/3)); conv1, proj, out_conv zero; map_label N(0, 1).
Dropout is ayt's `SeededDropout` (masks shared by the consistency student and target, see
dropout.py) and label dropout `SeededLabelDropout`; attention is einsum so `torch.func.jvp`
goes through it.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from ayt.errors import check
from ayt.nets.dropout import SeededDropout, SeededLabelDropout
from ayt.nets.unet import PositionalEmbedding, class_label_vectors, group_norm

GROUPNORM_EPS = 1e-5


def resample(x: torch.Tensor, up: bool, down: bool) -> torch.Tensor:
    """EDM's [1, 1] resampling: `[B, C, H, W]` -> `[B, C, 2H, 2W]` (up, nearest) or `[B, C, H/2, W/2]` (down, 2x2 mean)."""
    if up:
        return F.interpolate(x, scale_factor=2.0, mode="nearest")
    if down:
        return F.avg_pool2d(x, 2)
    return x


def init_uniform(layer: nn.Conv2d | nn.Linear, zero: bool = False) -> None:
    """EDM's ADM init: weight and bias U(-1/sqrt(fan_in), 1/sqrt(fan_in)), or zeros with `zero`."""
    bound = 0.0 if zero else 1.0 / math.sqrt(layer.weight[0].numel())
    for p in (layer.weight, layer.bias):
        if p is not None:
            nn.init.uniform_(p, -bound, bound)


class Conv2d(nn.Conv2d):
    """Square 'same' conv (keys `weight`, `bias` as EDM's), optionally after 2x up/downsampling.

    `x [B, Cin, H, W] -> [B, Cout, H', W']` with H' = 2H (up), H/2 (down) or H.
    """

    def __init__(self, cin: int, cout: int, kernel: int, up: bool = False, down: bool = False,
                 zero: bool = False) -> None:
        super().__init__(cin, cout, kernel, padding=kernel // 2)
        self.up, self.down = up, down
        init_uniform(self, zero)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(resample(x, self.up, self.down))


class Resample(nn.Module):
    """Weightless skip of a same-width up/down block (EDM's `Conv2d(kernel=0)`): `resample(x)`."""

    def __init__(self, up: bool, down: bool) -> None:
        super().__init__()
        self.up, self.down = up, down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return resample(x, self.up, self.down)


def linear(cin: int, cout: int) -> nn.Linear:
    """`nn.Linear` with EDM's ADM init."""
    layer = nn.Linear(cin, cout)
    init_uniform(layer)
    return layer


class ADMBlock(nn.Module):
    """ADM residual block (EDM `UNetBlock` with ADM settings), optional multi-head attention.

    `x [B, Cin, H, W], emb [B, E] -> [B, Cout, H', W']`:
    `h = conv0(silu(norm0(x)))`; `scale, shift = affine(emb)`;
    `h = silu(shift + norm1(h) (1 + scale))`; `x = conv1(dropout(h)) + skip(x)`; with attention
    `x = x + proj(MHA(norm2(x)))`. No 1/sqrt(2) scaling (EDM skip_scale = 1 for ADM).
    """

    def __init__(self, cin: int, cout: int, emb_channels: int, up: bool = False,
                 down: bool = False, attention: bool = False, dropout: float = 0.0,
                 channels_per_head: int = 64) -> None:
        super().__init__()
        self.in_channels, self.out_channels = cin, cout
        self.num_heads = cout // channels_per_head if attention else 0
        # EDM silently drops attention from a block narrower than one head, and cannot reshape
        # a width that is no multiple of the head count; both raise here instead.
        check(not attention or (self.num_heads >= 1 and cout % self.num_heads == 0),
              f"attention at {cout} channels with {channels_per_head} channels per head: the width "
              "must be a positive multiple of the head count; change model_channels, "
              "channels_per_head or attn_resolutions")
        self.norm0 = group_norm(cin, GROUPNORM_EPS)
        self.conv0 = Conv2d(cin, cout, 3, up=up, down=down)
        self.affine = linear(emb_channels, 2 * cout)
        self.norm1 = group_norm(cout, GROUPNORM_EPS)
        self.dropout = SeededDropout(dropout)
        self.conv1 = Conv2d(cout, cout, 3, zero=True)
        self.skip: nn.Module | None = None
        if cin != cout:
            self.skip = Conv2d(cin, cout, 1, up=up, down=down)
        elif up or down:
            self.skip = Resample(up, down)
        if self.num_heads:
            self.norm2 = group_norm(cout, GROUPNORM_EPS)
            self.qkv = Conv2d(cout, 3 * cout, 1)
            self.proj = Conv2d(cout, cout, 1, zero=True)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv0(F.silu(self.norm0(x)))
        scale, shift = self.affine(emb)[:, :, None, None].to(h.dtype).chunk(2, dim=1)
        h = F.silu(torch.addcmul(shift, self.norm1(h), scale + 1))
        h = self.conv1(self.dropout(h))
        x = h + (x if self.skip is None else self.skip(x))
        if self.num_heads:
            x = x + self.proj(self.attention(self.norm2(x)))
        return x

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """Multi-head self-attention over pixels: `[B, C, H, W] -> [B, C, H, W]` (before `proj`)."""
        b, c, h, w = x.shape
        heads = self.num_heads
        q, k, v = self.qkv(x).reshape(b * heads, c // heads, 3, h * w).unbind(2)
        wide = torch.promote_types(q.dtype, torch.float32)  # EDM: weights in float32
        k = k / math.sqrt(c // heads)
        weights = torch.einsum("ncq,nck->nqk", q.to(wide), k.to(wide)).softmax(dim=2).to(q.dtype)
        return torch.einsum("nqk,nck->ncq", weights, v).reshape(b, c, h, w)


class DhariwalUNet(nn.Module):
    """ADM U-Net `F(x_in [B, Cin, H, W], c_noise [B], labels) -> [B, Cout, H, W]` (EDM's DhariwalUNet).

    Arguments as EDM's (without `augment_dim`), plus `channels_per_head` (EDM hard-codes 64,
    L393; smaller values give multi-head attention in narrow test networks). See the module
    docstring for the architecture.
    With the defaults, `img_resolution=64`, 3 channels and `label_dim=1000` this is EDM's
    ImageNet-64 model (295,899,267 parameters; EDM reports 295.9M).
    Class labels (`label_dim > 0`): see `ayt.nets.unet.class_label_vectors`; None = no label.
    """

    def __init__(self, img_resolution: int, in_channels: int, out_channels: int,
                 label_dim: int = 0, model_channels: int = 192,
                 channel_mult: tuple[int, ...] = (1, 2, 3, 4), channel_mult_emb: int = 4,
                 num_blocks: int = 3, attn_resolutions: tuple[int, ...] = (32, 16, 8),
                 dropout: float = 0.10, label_dropout: float = 0.0,
                 channels_per_head: int = 64) -> None:
        super().__init__()
        levels = len(channel_mult) - 1
        check(len(channel_mult) > 0 and img_resolution % 2 ** levels == 0,
              f"img_resolution {img_resolution} is not divisible by 2**{levels}; "
              "use fewer channel_mult levels or another resolution")
        self.img_resolution, self.in_channels, self.out_channels = img_resolution, in_channels, out_channels
        self.label_dim = label_dim
        emb_channels = model_channels * channel_mult_emb
        self.map_noise = PositionalEmbedding(model_channels, endpoint=False, cos_first=True)
        self.map_layer0 = linear(model_channels, emb_channels)
        self.map_layer1 = linear(emb_channels, emb_channels)
        self.map_label = nn.Linear(label_dim, emb_channels, bias=False) if label_dim else None
        if self.map_label is not None:
            nn.init.normal_(self.map_label.weight)
        self.label_dropout = SeededLabelDropout(label_dropout) if label_dim else None
        block = dict(emb_channels=emb_channels, dropout=dropout, channels_per_head=channels_per_head)
        self.enc, skips = self._build_encoder(in_channels, model_channels, channel_mult,
                                              num_blocks, attn_resolutions, block)
        self.dec = self._build_decoder(skips, model_channels, channel_mult, num_blocks,
                                       attn_resolutions, block)
        cout = model_channels * channel_mult[0]
        self.out_norm = group_norm(cout, GROUPNORM_EPS)
        self.out_conv = Conv2d(cout, out_channels, 3, zero=True)

    def _build_encoder(self, in_channels: int, model_channels: int, channel_mult: tuple[int, ...],
                       num_blocks: int, attn_resolutions: tuple[int, ...],
                       block: dict) -> tuple[nn.ModuleDict, list[int]]:
        """Encoder layers in call order (EDM's names) and the widths of their outputs (the skips)."""
        enc = nn.ModuleDict()
        cout = model_channels * channel_mult[0]
        for level, mult in enumerate(channel_mult):
            res = self.img_resolution >> level
            if level == 0:
                enc[f"{res}x{res}_conv"] = Conv2d(in_channels, cout, 3)
            else:
                enc[f"{res}x{res}_down"] = ADMBlock(cout, cout, down=True, **block)
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * mult
                enc[f"{res}x{res}_block{idx}"] = ADMBlock(cin, cout, attention=res in attn_resolutions, **block)
        return enc, [layer.out_channels for layer in enc.values()]

    def _build_decoder(self, skips: list[int], model_channels: int, channel_mult: tuple[int, ...],
                       num_blocks: int, attn_resolutions: tuple[int, ...], block: dict) -> nn.ModuleDict:
        """Decoder blocks in call order (EDM's names); each `_block{i}` takes one encoder skip."""
        dec, skips = nn.ModuleDict(), list(skips)
        cout = skips[-1]
        for level in reversed(range(len(channel_mult))):
            res = self.img_resolution >> level
            if level == len(channel_mult) - 1:
                dec[f"{res}x{res}_in0"] = ADMBlock(cout, cout, attention=True, **block)
                dec[f"{res}x{res}_in1"] = ADMBlock(cout, cout, **block)
            else:
                dec[f"{res}x{res}_up"] = ADMBlock(cout, cout, up=True, **block)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * channel_mult[level]
                dec[f"{res}x{res}_block{idx}"] = ADMBlock(cin, cout, attention=res in attn_resolutions, **block)
        return dec

    def embed(self, c_noise: torch.Tensor, class_labels: torch.Tensor | None) -> torch.Tensor:
        """`c_noise [B]` (and labels) -> `emb [B, model_channels * channel_mult_emb]`."""
        emb = self.map_noise(c_noise).to(self.map_layer0.weight.dtype)
        emb = self.map_layer1(F.silu(self.map_layer0(emb)))
        if self.map_label is not None:
            labels = self.label_dropout(class_label_vectors(class_labels, self.label_dim, emb))
            emb = emb + self.map_label(labels)
        return F.silu(emb)

    def forward(self, x: torch.Tensor, noise_labels: torch.Tensor,
                class_labels: torch.Tensor | None = None) -> torch.Tensor:
        """`x [B, Cin, H, W]`, `noise_labels` = c_noise `[B]` -> `[B, Cout, H, W]`."""
        emb = self.embed(noise_labels, class_labels).to(x.dtype)
        skips = []
        for layer in self.enc.values():
            x = layer(x, emb) if isinstance(layer, ADMBlock) else layer(x)
            skips.append(x)
        for layer in self.dec.values():
            if x.shape[1] != layer.in_channels:
                x = torch.cat([x, skips.pop()], dim=1)
            x = layer(x, emb)
        return self.out_conv(F.silu(self.out_norm(x)))
