"""NVlabs EDM network pickles, read without running a line of their code.

EDM's released models (`edm-cifar10-32x32-uncond-vp.pkl`, ...) and training snapshots
(`network-snapshot-*.pkl`) are plain `pickle` files holding `{"ema": EDMPrecond, "loss_fn": ...,
"augment_pipe": ..., "dataset_kwargs": ...}`. EDM's classes are "persistent": each object is
stored as a call `torch_utils.persistence._reconstruct_persistent_obj(meta)` whose `meta` holds
the *source code of its Python module* (`module_src`), the class name and the object's
`__dict__` (`state`: `_parameters`, `_buffers`, `_modules`, `_init_kwargs`, ...). A plain
`pickle.load` executes that source. This module never does:

- `read_edm_pickle` unpickles with an allow-list: tensors (rebuilt by torch's own weights-only
  loader), plain containers, numpy scalars of non-object dtypes, `ModuleDict` and `EasyDict`
  as inert records, and EDM's persistent objects as `PersistentRecord`s (class name, init
  kwargs, parameters, buffers, submodules; the source is kept as text and never compiled).
  Any other global is refused with one line naming it.
- `edm_network` turns the `ema` record into an `ayt` `Precond` (EDMPrecond -> `boundary="edm"`,
  same scalings) around a `SongUNet` (DDPM++ "vp" and NCSN++ "ve" configurations) or a
  `DhariwalUNet` (ADM, `edm-imagenet-64x64-cond-adm.pkl`), mapping every EDM tensor onto exactly
  one `ayt` tensor of the same shape and refusing the file if any is left over or missing. Dropped, with a note: the augmentation-label embedding `map_augment`
  (EDM's models see no augmentation labels when sampling, so dropping it is exact; ECT and AYT
  drop it too) and the resampling filters stored as buffers (checked to equal the filter the
  architecture implies).

EDM's other preconditionings (`VPPrecond`, `VEPrecond`, `iDDPMPrecond`, the "baseline" models)
use other scalings and noise conditioning and are refused with a clear message.
"""

from __future__ import annotations

import pickle
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ayt.checkpoint import first_mismatch, first_non_finite, load_storage_bytes
from ayt.errors import AytError, check
from ayt.nets.adm import DhariwalUNet
from ayt.nets.precond import Precond
from ayt.nets.unet import SongUNet, fir_filter

PERSISTENT_RECONSTRUCT = ("torch_utils.persistence", "_reconstruct_persistent_obj")
EDM_PRECONDS = ("EDMPrecond",)
OTHER_PRECONDS = {"VPPrecond": "VP", "VEPrecond": "VE", "iDDPMPrecond": "iDDPM"}


def is_edm_pickle(path: str | Path) -> bool:
    """True for a `.pkl` file (EDM network pickles are the only pickles `ayt` accepts)."""
    return Path(path).suffix == ".pkl"


# ------------------------------------------------------------------------------ records
@dataclass
class PersistentRecord:
    """One EDM persistent object, as data: its class name and its `__dict__` (`state`)."""

    class_name: str
    state: dict[str, Any]
    module_src: str = field(default="", repr=False)  # kept as text, never executed

    @property
    def init_kwargs(self) -> dict[str, Any]:
        return dict(self.state.get("_init_kwargs") or {})


class ModuleRecord:
    """A non-persistent `torch.nn` container (`ModuleDict`) as data: its `__dict__` in `state`."""

    def __init__(self, *args: Any) -> None:
        self.state: dict[str, Any] = {}

    def __setstate__(self, state: Any) -> None:
        self.state = dict(state or {})


class PlainDict(dict):
    """`dnnlib.EasyDict` (a dict subclass) read as a plain dict."""

    def __setstate__(self, state: Any) -> None:
        pass


def _reconstruct_persistent(meta: dict) -> PersistentRecord:
    check(isinstance(meta, dict) and meta.get("type") == "class" and isinstance(meta.get("class_name"), str)
          and isinstance(meta.get("state"), dict),
          "malformed EDM persistent record (expected type='class', class_name and state)")
    return PersistentRecord(meta["class_name"], dict(meta["state"]), str(meta.get("module_src", "")))


def _storage_from_bytes(data: bytes) -> Any:
    """A tensor storage saved by `torch.save` inside the pickle, read by torch's weights-only loader."""
    check(isinstance(data, (bytes, bytearray)), "malformed tensor storage in the pickle")
    return load_storage_bytes(bytes(data))


def _rebuild_parameter(data: torch.Tensor, requires_grad: bool = False, hooks: Any = None, *_: Any) -> torch.Tensor:
    check(torch.is_tensor(data), "malformed parameter in the pickle")
    return data


def _numpy_scalar(dtype: np.dtype, data: bytes | None = None) -> Any:
    check(isinstance(dtype, np.dtype) and not dtype.hasobject and isinstance(data, bytes),
          "numpy scalar of an object dtype in the pickle")
    return np.frombuffer(data, dtype=dtype)[0].item()


def _numpy_dtype(*args: Any) -> np.dtype:
    check(all(isinstance(a, (str, bool, int)) for a in args), "malformed numpy dtype in the pickle")
    return np.dtype(*args)


_ALLOWED: dict[tuple[str, str], Callable[..., Any] | type] = {
    PERSISTENT_RECONSTRUCT: _reconstruct_persistent,
    ("collections", "OrderedDict"): OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch.storage", "_load_from_bytes"): _storage_from_bytes,
    ("torch.nn.modules.container", "ModuleDict"): ModuleRecord,
    ("torch.nn.modules.container", "ModuleList"): ModuleRecord,
    ("torch.nn.modules.container", "Sequential"): ModuleRecord,
    ("dnnlib.util", "EasyDict"): PlainDict,
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,
    ("numpy", "dtype"): _numpy_dtype,
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        raise AytError(f"refusing global {module}.{name}: an EDM network pickle holds only tensors, containers "
                       "and EDM's persistent records; this file is untrusted, corrupted or not an EDM network pickle")

    def persistent_load(self, pid: Any) -> Any:
        raise AytError("refusing a persistent id: this file was written by torch.save, not an EDM network pickle")


def read_edm_pickle(path: str | Path) -> Any:
    """Unpickle an EDM file with the allow-list above: plain data and `PersistentRecord`s, no code run."""
    path = Path(path)
    check(path.is_file(), f"{path}: no such file; download EDM's network pickles there "
          "(README: 'Start from the published files')")
    try:
        with path.open("rb") as f:
            return _RestrictedUnpickler(f).load()
    except AytError as err:
        raise AytError(f"{path}: {err}") from None
    except Exception as err:  # truncated file, bad opcode, a refused storage, ...
        raise AytError(f"{path}: untrusted or corrupted EDM pickle ({type(err).__name__}); "
                       "download the file again") from None


# ------------------------------------------------------------------------------ tensors
def _children(node: Any) -> dict[str, Any]:
    return node.state.get("_modules") or {} if isinstance(node, (PersistentRecord, ModuleRecord)) else {}


def flatten_tensors(node: PersistentRecord | ModuleRecord, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every parameter and persistent buffer under `node`, keyed as in EDM's `state_dict()`."""
    state = node.state
    skip = set(state.get("_non_persistent_buffers_set") or ())
    out = {}
    for group in ("_parameters", "_buffers"):
        for name, value in (state.get(group) or {}).items():
            if value is not None and name not in skip:
                check(torch.is_tensor(value), f"{prefix}{name} is not a tensor")
                out[prefix + name] = value
    for name, child in _children(node).items():
        if child is not None:
            out.update(flatten_tensors(child, f"{prefix}{name}."))
    return out


# ------------------------------------------------------------------------------ SongUNet mapping
_BLOCK_RENAMES = {  # EDM UNetBlock / layer names -> ayt's (prefix match on the first component)
    "conv0": "conv0.conv", "conv1": "conv1.conv", "skip": "skip.conv",
    "norm2": "attention.norm", "qkv": "attention.qkv.conv", "proj": "attention.proj.conv",
}


@dataclass
class EdmArchitecture:
    """What an EDM pickle's network is, in `ayt` terms."""

    model_type: str  # SongUNet | DhariwalUNet
    unet_kwargs: dict[str, Any]  # keyword arguments of that ayt class (img_resolution, ..., dropout)
    sigma_data: float
    notes: list[str]  # what was dropped or ignored, for the log


# EDM's constructor defaults (training/networks.py) for the arguments a record may omit.
_EDM_DEFAULTS: dict[str, dict[str, Any]] = {
    "SongUNet": dict(label_dim=0, model_channels=128, channel_mult=(1, 2, 2, 2), channel_mult_emb=4, num_blocks=4,
                     attn_resolutions=(16,), dropout=0.10, label_dropout=0.0, embedding_type="positional",
                     channel_mult_noise=1, encoder_type="standard", resample_filter=(1, 1)),
    "DhariwalUNet": dict(label_dim=0, model_channels=192, channel_mult=(1, 2, 3, 4), channel_mult_emb=4,
                         num_blocks=3, attn_resolutions=(32, 16, 8), dropout=0.10, label_dropout=0.0),
}


def model_kwargs(record: PersistentRecord) -> dict[str, Any]:
    """Keyword arguments of the `ayt.nets` class of an EDM SongUNet / DhariwalUNet record (EDM's defaults
    filled in; `augment_dim` and EDM-only options left out)."""
    kw = record.init_kwargs
    if record.class_name == "SongUNet":
        check(kw.get("decoder_type", "standard") == "standard",
              f"EDM SongUNet with decoder_type={kw.get('decoder_type')!r} is not supported; ayt implements 'standard' (DDPM++ and NCSN++)")
        check(kw.get("encoder_type", "standard") in ("standard", "residual"),
              f"EDM SongUNet with encoder_type={kw.get('encoder_type')!r} is not supported; ayt implements 'standard' (DDPM++) and 'residual' (NCSN++)")
    out = {k: kw[k] for k in ("img_resolution", "in_channels", "out_channels")}
    out.update({k: kw.get(k, default) for k, default in _EDM_DEFAULTS[record.class_name].items()})
    return {k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in out.items()}


def dhariwal_key_map(record: PersistentRecord, edm_keys: list[str]) -> tuple[dict[str, str], list[str]]:
    """EDM DhariwalUNet keys -> ayt DhariwalUNet keys: the same names (adm.py guarantees it), minus
    `map_augment` and the `resample_filter` buffers."""
    dropped = [k for k in edm_keys if k.startswith("map_augment.") or k.endswith(".resample_filter")]
    return {k: k for k in edm_keys if k not in dropped}, dropped


def _module_names(record: PersistentRecord, which: str) -> list[str]:
    container = _children(record).get(which)
    check(isinstance(container, ModuleRecord), f"the EDM SongUNet record has no '{which}' ModuleDict")
    return list(_children(container))


def songunet_key_map(record: PersistentRecord, edm_keys: list[str]) -> tuple[dict[str, str], list[str]]:
    """EDM SongUNet state-dict keys -> ayt SongUNet keys; returns (mapping, dropped EDM keys).

    `enc`/`dec` entries keep EDM's order (a ModuleDict is ordered) minus the `aux_*` entries:
    the encoder's `aux_residual` convs become `enc_residual.<k>`, the decoder's output
    `aux_norm` / `aux_conv` become `out_norm` / `out_conv`.
    """
    enc = [n for n in _module_names(record, "enc") if "aux" not in n]
    residual = [n for n in _module_names(record, "enc") if n.endswith("aux_residual")]
    dec_names = _module_names(record, "dec")
    dec = [n for n in dec_names if "aux" not in n]
    outputs = {n: "out_norm" for n in dec_names if n.endswith("aux_norm")}
    outputs.update({n: "out_conv.conv" for n in dec_names if n.endswith("aux_conv")})
    mapping, dropped = {}, []
    for key in edm_keys:
        parts = key.split(".")
        if parts[0] == "map_augment" or parts[-1] == "resample_filter":
            dropped.append(key)
            continue
        if parts[0] not in ("enc", "dec"):
            mapping[key] = key  # map_noise, map_label, map_layer0, map_layer1
            continue
        name, rest = parts[1], parts[2:]
        if parts[0] == "enc" and name in residual:
            mapping[key] = ".".join(["enc_residual", str(residual.index(name)), "conv", *rest])
        elif parts[0] == "dec" and name in outputs:
            mapping[key] = ".".join([outputs[name], *rest])
        else:
            names = enc if parts[0] == "enc" else dec
            check(name in names, f"unexpected EDM module {parts[0]}.{name}")
            inner = ".".join(rest)
            if len(rest) == 1:  # the encoder's first conv: enc.<res>_conv.weight
                inner = "conv." + rest[0]
            else:
                inner = ".".join([_BLOCK_RENAMES.get(rest[0], rest[0]), *rest[1:]])
            mapping[key] = f"{parts[0]}.{names.index(name)}.{inner}"
    return mapping, dropped


# EDM model type -> (ayt class, EDM key -> ayt key map)
_ARCHITECTURES = {"SongUNet": (SongUNet, songunet_key_map), "DhariwalUNet": (DhariwalUNet, dhariwal_key_map)}


def _check_filters(tensors: dict[str, torch.Tensor], dropped: list[str], taps: tuple[int, ...]) -> None:
    """The resampling filters EDM stores as buffers must be the ones the architecture implies."""
    expected = fir_filter(taps)
    for key in dropped:
        if key.endswith("resample_filter"):
            f = tensors[key].reshape(tensors[key].shape[-2:]).float()
            check(f.shape == expected.shape and torch.allclose(f, expected),
                  f"EDM buffer {key} is not the filter of resample_filter={list(taps)}; the file is inconsistent")


# ------------------------------------------------------------------------------ entry point
def network_record(obj: Any, path: Path, key: str = "ema") -> PersistentRecord:
    """The preconditioned network stored under `key` (EDM saves its EMA as `ema`)."""
    check(isinstance(obj, dict), f"{path}: expected a dict with an 'ema' network (an EDM network pickle); found {type(obj).__name__}")
    check(key in obj, f"{path}: no '{key}' entry; it holds {sorted(map(str, obj))}")
    record = obj[key]
    check(isinstance(record, PersistentRecord), f"{path}: '{key}' is not an EDM network")
    return record


def edm_architecture(record: PersistentRecord, path: Path) -> tuple[EdmArchitecture, PersistentRecord]:
    """Check the preconditioning and the network type; return the architecture and the inner model record."""
    cls = record.class_name
    if cls in OTHER_PRECONDS:
        raise AytError(f"{path}: {cls} (EDM's baseline {OTHER_PRECONDS[cls]} preconditioning) is not supported; "
                       "ayt tunes EDMPrecond models such as edm-cifar10-32x32-uncond-vp.pkl")
    check(cls in EDM_PRECONDS, f"{path}: the 'ema' network is a {cls}, not an EDMPrecond")
    model = _children(record).get("model")
    check(isinstance(model, PersistentRecord), f"{path}: the EDMPrecond record has no 'model' network")
    check(model.class_name in _ARCHITECTURES,
          f"{path}: EDM network type {model.class_name} is not supported; ayt loads SongUNet (DDPM++, NCSN++) and DhariwalUNet (ADM)")
    notes = []
    if model.init_kwargs.get("augment_dim"):
        notes.append(f"dropped EDM's augmentation-label embedding map_augment (augment_dim={model.init_kwargs['augment_dim']}); "
                     "sampling never used it")
    if record.init_kwargs.get("use_fp16"):
        notes.append("ignored use_fp16=True: ayt runs the network in fp32 (or bf16 autocast when asked)")
    sigma_data = float(record.init_kwargs.get("sigma_data", record.state.get("sigma_data", 0.5)))
    return EdmArchitecture(model.class_name, model_kwargs(model), sigma_data, notes), model


def edm_network(path: str | Path, key: str = "ema", sigma_min: float = 0.002,
                sigma_max: float = 80.0) -> tuple[Precond, EdmArchitecture]:
    """Load an EDM network pickle as an `ayt` `Precond` (eval mode, CPU) with every weight mapped.

    `sigma_min`/`sigma_max` are ayt's sampling range (EDM's EDMPrecond stores 0 and inf, and
    EDM's sampler uses 0.002 and 80).
    """
    path = Path(path)
    arch, model = edm_architecture(network_record(read_edm_pickle(path), path, key), path)
    tensors = flatten_tensors(model)
    cls, key_map = _ARCHITECTURES[arch.model_type]
    mapping, dropped = key_map(model, list(tensors))
    _check_filters(tensors, dropped, arch.unet_kwargs.get("resample_filter", (1, 1)))
    kw = dict(arch.unet_kwargs)
    net = cls(kw.pop("img_resolution"), kw.pop("in_channels"), kw.pop("out_channels"), **kw)
    weights = {mapping[k]: v for k, v in tensors.items() if k in mapping}
    problem = first_mismatch(weights, net.state_dict())
    check(problem is None, f"{path}: EDM weights do not match the architecture its kwargs describe: {problem}")
    bad = first_non_finite({"weights": weights})
    check(bad is None, f"{path}: EDM weight {bad and bad.split('.', 1)[1]} holds NaN or inf; the file is corrupted")
    net.load_state_dict({k: v.float() for k, v in weights.items()})
    precond = Precond(net, sigma_data=arch.sigma_data, sigma_min=sigma_min, sigma_max=sigma_max, boundary="edm")
    return precond.eval(), arch

