"""Checkpoints: safetensors weights + JSON state + weights-only optimiser state, written atomically.

This is the only module in `ayt` that touches `torch.load` / pickles, and it only ever calls
`torch.load(..., weights_only=True)`, so a checkpoint cannot run code when it is opened.

Layout of one checkpoint (``RUN_DIR/checkpoints/step-000001234/``)::

    weights.safetensors  every model tensor, flattened as "<module>.<key>" (e.g. "net.<k>",
                         "ema_0.9999.<k>"); the metadata holds {module: [keys]} as JSON
    state.json           {"format": 1, "step": int, "state": <the trainer's JSON-able dict>}
    optim.pt             the `extra` dict (the optimiser state) saved with torch.save; only
                         tensors, numbers, strings, lists, tuples and dicts
    COMPLETE             written last: {"step": int, "sha256": {file: hex digest}}

A save writes into ``checkpoints/.tmp-...``, fsyncs, renames the folder into place, then points
``checkpoints/latest`` at it (temp file + os.replace) and prunes old checkpoints. A crash at any
moment leaves the previous checkpoints and ``latest`` loadable.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import re
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from ayt.files import atomic_write
from ayt.errors import AytError

CHECKPOINTS = "checkpoints"
LATEST = "latest"
WEIGHTS = "weights.safetensors"
STATE = "state.json"
OPTIM = "optim.pt"
MARKER = "COMPLETE"
SUPERSEDED = "superseded"
FORMAT = 1
_STEP_DIR = re.compile(r"^step-(\d+)$")
_LEFTOVER = (".tmp-", ".old-")
_SAFE_LEAVES = (torch.Tensor, int, float, bool, str, bytes, type(None), torch.dtype, torch.device, torch.Size)


@dataclass
class Checkpoint:
    """A loaded checkpoint: `modules` maps a module name ("net", "ema_0.9999") to its state dict."""

    path: Path
    step: int
    modules: dict[str, dict[str, torch.Tensor]]
    state: dict[str, Any]
    extra: dict[str, Any] = field(default_factory=dict)


def step_dir_name(step: int) -> str:
    """Folder name of the checkpoint at `step`, e.g. ``step-000001234``."""
    return f"step-{step:09d}"


# ----------------------------------------------------------------------------------- saving


def save_checkpoint(
    run_dir: str | os.PathLike,
    step: int,
    modules: dict[str, dict[str, torch.Tensor]],
    state: dict[str, Any],
    extra: dict[str, Any] | None = None,
    keep: int = 3,
    require_finite: bool = False,
) -> Path:
    """Write the checkpoint of `step` atomically and return its folder.

    `modules` are state dicts of tensors; `state` must be JSON-able (config, step, images_seen,
    metric history); `extra` holds the optimiser state and anything else made only of tensors,
    numbers, strings, lists and dicts (no RNG state is needed: training draws are keyed by
    `(seed, step)`, see `ayt.rng`). Afterwards only the newest `keep` complete checkpoints
    remain. A same-step checkpoint is replaced safely. On failure nothing already
    on disk changes and the temporary folder is removed; a full disk raises AytError naming the
    checkpoint that is still the good one. With `require_finite`, a NaN or infinite value in any
    floating-point tensor of `modules` raises AytError before anything is written.
    """
    _check_save_args(step, keep)
    root = _writable_checkpoint_root(Path(run_dir))
    if require_finite:
        bad = first_non_finite(modules)
        if bad:
            raise AytError(f"refusing to save checkpoint {step_dir_name(step)}: {bad} holds NaN or infinite values; "
                           f"{_good_checkpoint(root)}")
    tensors, layout = _flatten(modules)
    state_text = _state_json(step, state)
    extra = {} if extra is None else extra
    _check_weights_only(extra, "extra")
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
    try:
        _write_files(tmp, step, tensors, layout, state_text, extra)
        final = _move_into_place(tmp, root / step_dir_name(step))
        _write_latest(root, final.name)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            raise AytError(f"the disk is full: checkpoint {step_dir_name(step)} could not be written to {root}; "
                           f"{_good_checkpoint(root)}; free some space, then resume") from None
        raise
    _prune(root, keep, {final.name})
    return final


def first_non_finite(modules: dict[str, dict[str, torch.Tensor]]) -> str | None:
    """The name ("module.key") of the first floating-point tensor holding NaN or inf, else None."""
    for name, sd in modules.items():
        for key, value in sd.items():
            if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                return f"{name}.{key}"
    return None


def check_finite(weights: dict[str, torch.Tensor], path: str | os.PathLike) -> None:
    """Raise AytError if a state dict read from `path` holds NaN or infinite values (such weights
    produce black images and meaningless scores)."""
    bad = first_non_finite({"weights": weights})
    if bad:
        raise AytError(f"checkpoint {path} holds NaN or infinite weights ({bad.split('.', 1)[1]}); "
                       f"{_fallback_hint(Path(path))}")


def _good_checkpoint(root: Path) -> str:
    latest = find_latest(root)
    if latest is None:
        return "no complete checkpoint exists yet"
    return f"the last good checkpoint is {latest}"


def _check_save_args(step: int, keep: int) -> None:
    if not isinstance(step, int) or step < 0:
        raise AytError(f"checkpoint step must be an integer >= 0, got {step!r}; pass the training step")
    if not isinstance(keep, int) or keep < 1:
        raise AytError(f"keep must be an integer >= 1, got {keep!r}; set how many checkpoints to keep")


def _writable_checkpoint_root(run_dir: Path) -> Path:
    """Create RUN_DIR/checkpoints and prove it is writable by creating a temp file there."""
    root = run_dir / CHECKPOINTS
    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=root):
            pass
    except OSError as err:
        raise AytError(
            f"cannot write checkpoints to {root} ({err.strerror or err}); pass a writable run folder"
        ) from None
    return root


def _flatten(modules: dict[str, dict[str, torch.Tensor]]) -> tuple[dict[str, torch.Tensor], dict[str, list[str]]]:
    """Flatten {module: {key: tensor}} to {"module.key": CPU tensor} plus {module: [keys]}."""
    tensors: dict[str, torch.Tensor] = {}
    layout: dict[str, list[str]] = {}
    seen: set[int] = set()
    for name, sd in modules.items():
        layout[name] = list(sd)
        for key, value in sd.items():
            if not isinstance(value, torch.Tensor):
                raise AytError(f"module {name!r} entry {key!r} is a {type(value).__name__}, not a tensor; "
                               "put non-tensor values in state or extra")
            t = value.detach().to("cpu").contiguous()
            ptr = t.untyped_storage().data_ptr()
            shared = t.numel() > 0 and ptr in seen
            tensors[f"{name}.{key}"] = t.clone() if shared else t  # safetensors refuses shared memory
            seen.add(ptr)
    if len(tensors) != sum(len(v) for v in layout.values()):
        raise AytError("two module entries flatten to the same name; rename the modules so that none is "
                       "a dotted prefix of another")
    return tensors, layout


def _state_json(step: int, state: dict[str, Any]) -> str:
    try:
        return json.dumps({"format": FORMAT, "step": step, "state": state}, indent=1)
    except (TypeError, ValueError) as err:
        raise AytError(f"checkpoint state is not JSON-able ({err}); pass numbers, strings, lists and dicts") from None


def _check_weights_only(obj: Any, where: str) -> None:
    """Raise unless `obj` is made of what `torch.load(weights_only=True)` accepts."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            _check_weights_only(k, where)
            _check_weights_only(v, f"{where}[{k!r}]")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _check_weights_only(v, f"{where}[{i}]")
    elif not isinstance(obj, _SAFE_LEAVES):
        raise AytError(f"{where} is a {type(obj).__name__}, which a weights-only load cannot read; "
                       "convert it to tensors, numbers, strings, lists or dicts")


def _write_files(folder: Path, step: int, tensors: dict[str, torch.Tensor], layout: dict[str, list[str]],
                 state_text: str, extra: dict[str, Any]) -> None:
    """Write weights, state, optim and finally the COMPLETE marker with digests; fsync all."""
    save_file(tensors, str(folder / WEIGHTS), metadata={"ayt_modules": json.dumps(layout)})
    (folder / STATE).write_text(state_text)
    torch.save(extra, folder / OPTIM)
    digests = {name: _sha256(folder / name) for name in (WEIGHTS, STATE, OPTIM)}
    for name in (WEIGHTS, STATE, OPTIM):
        _fsync(folder / name)
    (folder / MARKER).write_text(json.dumps({"step": step, "sha256": digests}, indent=1))
    _fsync(folder / MARKER)
    _fsync(folder)


def _move_into_place(tmp: Path, final: Path) -> Path:
    """Rename `tmp` to `final`; an existing `final` is renamed aside first and deleted after."""
    old = None
    if final.exists():
        old = final.with_name(f".old-{final.name}-{os.getpid()}")
        os.replace(final, old)
    try:
        os.replace(tmp, final)
    except BaseException:
        if old is not None:
            os.replace(old, final)
        raise
    _fsync(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _write_latest(root: Path, name: str) -> None:
    """Point ``checkpoints/latest`` at `name` atomically."""
    atomic_write(root / LATEST, name + "\n")
    _fsync(root)


def _prune(root: Path, keep: int, protect: set[str]) -> None:
    """Delete complete checkpoints older than the newest `keep`, except `protect`; drop leftovers
    of crashed saves first (``.tmp-*``/``.old-*``). Incomplete ``step-*`` folders are left alone."""
    for path in root.iterdir():
        if path.name.startswith(_LEFTOVER):
            _clean_leftover(path)
    complete = _complete_dirs(root)
    for path in complete[: max(len(complete) - keep, 0)]:
        if path.name not in protect:
            shutil.rmtree(path, ignore_errors=True)


def _clean_leftover(path: Path) -> None:
    """Remove what a crashed save left behind; an ``.old-step-N-pid`` folder whose replacement
    never arrived (crash between the two renames) is renamed back to ``step-N`` instead."""
    match = re.match(r"^\.old-(step-\d+)-\d+$", path.name)
    target = path.parent / match.group(1) if match else None
    if target is not None and not target.exists() and (path / MARKER).is_file():
        os.replace(path, target)
    elif path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    """fsync a file or a folder (so that a rename inside it is durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------- finding


def _checkpoint_root(run_dir: Path) -> Path:
    """RUN_DIR/checkpoints; a path that already is the checkpoints folder is accepted too."""
    if run_dir.name == CHECKPOINTS and not (run_dir / CHECKPOINTS).is_dir():
        return run_dir
    return run_dir / CHECKPOINTS


def _step_of(path: Path) -> int | None:
    match = _STEP_DIR.match(path.name)
    return int(match.group(1)) if match else None


def _complete_dirs(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _step_of(p) is not None and (p / MARKER).is_file()]
    return sorted(found, key=lambda p: _step_of(p))


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints of a run (those with a COMPLETE marker), oldest first."""
    return _complete_dirs(_checkpoint_root(Path(run_dir)))


def find_latest(run_dir: str | os.PathLike) -> Path | None:
    """The checkpoint ``latest`` points to; if it is missing or incomplete, the newest complete
    one (with a warning); None when the run has no complete checkpoint."""
    root = _checkpoint_root(Path(run_dir))
    complete = _complete_dirs(root)
    pointer = root / LATEST
    name = pointer.read_text().strip() if pointer.is_file() else None
    if name and Path(name).name == name and (root / name / MARKER).is_file():
        return root / name
    if complete:
        why = f"points to {name!r}, which is missing or incomplete" if name else "is missing"
        warnings.warn(f"{pointer} {why}; using the newest complete checkpoint {complete[-1]}", stacklevel=2)
        return complete[-1]
    return None


def continue_from(run_dir: str | os.PathLike, step: int) -> list[Path]:
    """Make the complete checkpoint at `step` the run's latest: the checkpoints after it (complete or
    not) move to ``checkpoints/superseded/`` (kept, never loaded or pruned) and ``latest`` points to
    `step`. Returns the moved folders. Used by ``--resume RUN --from-checkpoint STEP``."""
    root = _checkpoint_root(Path(run_dir))
    target = checkpoint_at(run_dir, step)
    newer = sorted(p for p in root.iterdir() if _step_of(p) is not None and _step_of(p) > step)
    moved = []
    if newer:
        aside = root / SUPERSEDED
        aside.mkdir(exist_ok=True)
        for path in newer:
            dest = aside / path.name
            if dest.exists():
                dest = aside / f"{path.name}-{os.getpid()}"
            os.replace(path, dest)
            moved.append(dest)
    _write_latest(root, target.name)
    return moved


# ---------------------------------------------------------------------------------- loading


def load_checkpoint(path_or_run_dir: str | os.PathLike, map_location: str | torch.device = "cpu") -> Checkpoint:
    """Load a checkpoint folder, or the latest checkpoint of a run folder, after checking the
    COMPLETE marker and the sha256 digest of every file. Tensors go to `map_location`."""
    path = _resolve(Path(path_or_run_dir))
    _verify(path)
    try:
        modules = _read_weights(path / WEIGHTS, map_location)
        saved = json.loads((path / STATE).read_text())
    except (OSError, ValueError, RuntimeError, SafetensorError, KeyError) as err:
        raise AytError(f"checkpoint {path} is corrupted ({err}); {_fallback_hint(path)}") from None
    extra = _load_weights_only(path / OPTIM, map_location, f"checkpoint: {path / OPTIM}; {_fallback_hint(path)}")
    step, state = _step_and_state(saved, path)
    return Checkpoint(path=path, step=step, modules=modules, state=state, extra=extra)


def read_state(path_or_run_dir: str | os.PathLike, step: int | None = None) -> tuple[Path, int, dict[str, Any]]:
    """(checkpoint folder, step, JSON state) of the latest checkpoint of a run (or of its checkpoint
    at `step`), reading only state.json (checked against its sha256); no tensors are loaded."""
    path = checkpoint_at(path_or_run_dir, step) if step is not None else _resolve(Path(path_or_run_dir))
    try:
        digest = json.loads((path / MARKER).read_text())["sha256"][STATE]
        text = (path / STATE).read_bytes()
    except (OSError, ValueError, KeyError, TypeError):
        raise AytError(f"checkpoint {path} is corrupted: {STATE} or {MARKER} is unreadable; {_fallback_hint(path)}") from None
    if hashlib.sha256(text).hexdigest() != digest:
        raise AytError(f"checkpoint {path} is corrupted: {path / STATE} does not match its sha256 (truncated or "
                       f"modified); {_fallback_hint(path)}")
    try:
        saved = json.loads(text)
    except ValueError:
        raise AytError(f"checkpoint {path} is corrupted: {STATE} is not JSON; {_fallback_hint(path)}") from None
    return (path, *_step_and_state(saved, path))


def checkpoint_at(run_dir: str | os.PathLike, step: int) -> Path:
    """The complete checkpoint folder of `run_dir` at `step` (AytError listing the steps there)."""
    root = _checkpoint_root(Path(run_dir))
    path = root / step_dir_name(step)
    if not (path / MARKER).is_file():
        steps = ", ".join(str(_step_of(p)) for p in _complete_dirs(root)) or "none"
        raise AytError(f"{run_dir} has no complete checkpoint at step {step}; complete checkpoints there: {steps}")
    return path


def require_keys(state: dict[str, Any], keys: tuple[str, ...], path: str | os.PathLike) -> None:
    """Raise AytError if the JSON state of the checkpoint at `path` lacks one of `keys`."""
    missing = [k for k in keys if k not in state]
    if missing:
        raise AytError(f"checkpoint {path} is not usable: its {STATE} has no '{missing[0]}' (edited, or written by "
                       f"another program); {_fallback_hint(Path(path))}")


def _step_and_state(saved: Any, path: Path) -> tuple[int, dict[str, Any]]:
    if not (isinstance(saved, dict) and isinstance(saved.get("step"), int) and isinstance(saved.get("state"), dict)):
        raise AytError(f"checkpoint {path} is not usable: its {STATE} lacks 'step' or 'state'; {_fallback_hint(path)}")
    return saved["step"], saved["state"]


def _load_weights_only(file: Path, map_location: str | torch.device, refusal: str) -> Any:
    """`torch.load(weights_only=True)`; anything it refuses (a pickle holding code or foreign objects,
    or a damaged file) becomes AytError("untrusted or corrupted " + refusal). torch's own message is
    not repeated: it advises `weights_only=False`, which would run the file's code."""
    try:
        return torch.load(file, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001 - every failure here means: do not trust this file
        hint = ("; it holds Python objects besides tensors (a pickled model?): save model.state_dict() instead"
                if "Unsupported global" in str(err) else "")
        raise AytError(f"untrusted or corrupted {refusal}{hint}") from None


def _resolve(path: Path) -> Path:
    """Turn a checkpoint folder or a run folder into the checkpoint folder to load."""
    if not path.exists():
        raise AytError(f"{path} does not exist; pass a run folder or a checkpoints/step-* folder")
    if (path / MARKER).is_file():
        return path
    if _step_of(path) is not None:
        raise AytError(f"checkpoint {path} is incomplete (no {MARKER} marker: its save was interrupted); "
                       f"{_fallback_hint(path)}")
    latest = find_latest(path)
    if latest is None:
        raise AytError(f"no checkpoint in {path}; train first or pass the right --resume folder")
    return latest


def _verify(path: Path) -> None:
    """Check every file listed in COMPLETE against its sha256 digest."""
    try:
        digests = json.loads((path / MARKER).read_text())["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        raise AytError(f"checkpoint {path} is corrupted: {MARKER} is unreadable; {_fallback_hint(path)}") from None
    for name in (WEIGHTS, STATE, OPTIM):
        if name not in digests or not (path / name).is_file():
            raise AytError(f"checkpoint {path} is corrupted: {name} is missing; {_fallback_hint(path)}")
        if _sha256(path / name) != digests[name]:
            raise AytError(f"checkpoint {path} is corrupted: {path / name} does not match its sha256 "
                           f"(truncated or modified); {_fallback_hint(path)}")


def _fallback_hint(path: Path) -> str:
    """The exact command that resumes from the newest complete checkpoint older than `path`
    (`--resume RUN --from-checkpoint STEP`), or advice to start a fresh run."""
    step = _step_of(path)
    older = [p for p in _complete_dirs(path.parent) if step is None or (_step_of(p) or 0) < step]
    if not older:
        return f"no older complete checkpoint exists in {path.parent}: start a fresh run"
    run, older_step = older[-1].parent.parent, _step_of(older[-1])
    try:
        kind = json.loads((older[-1] / STATE).read_text())["state"].get("kind")
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        kind = None
    command = "train-features" if kind == "features" else "train"
    return (f"the older checkpoint {older[-1]} is complete: continue from it with "
            f"'ayt {command} --resume {run} --from-checkpoint {older_step}'")


def _read_weights(file: Path, map_location: str | torch.device) -> dict[str, dict[str, torch.Tensor]]:
    """Unflatten weights.safetensors into {module: {key: tensor}} using the stored layout."""
    with safe_open(str(file), framework="pt") as f:
        layout = json.loads((f.metadata() or {})["ayt_modules"])
    flat = load_file(str(file), device=str(torch.device(map_location)))
    return {name: {key: flat[f"{name}.{key}"] for key in keys} for name, keys in layout.items()}


# ---------------------------------------------------------------------------- compatibility


def check_compatible(saved: dict[str, torch.Tensor], model: torch.nn.Module, what: str) -> None:
    """Raise AytError unless `saved` has exactly the keys and shapes of `model.state_dict()`."""
    expected = model.state_dict()
    problem = first_mismatch(saved, expected)
    if problem:
        raise AytError(f"checkpoint {what} was trained with another architecture: {problem}; "
                       "use the config it was trained with (saved in its state.json)")


def first_mismatch(saved: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> str | None:
    missing = [k for k in expected if k not in saved]
    if missing:
        return f"the model has {missing[0]!r} but the checkpoint does not"
    unexpected = [k for k in saved if k not in expected]
    if unexpected:
        return f"the checkpoint has {unexpected[0]!r} but the model does not"
    for key, value in expected.items():
        if tuple(saved[key].shape) != tuple(value.shape):
            return f"{key!r} has shape {tuple(saved[key].shape)} in the checkpoint, {tuple(value.shape)} in the model"
    return None


def load_weights_file(path: str | os.PathLike, what: str) -> dict[str, torch.Tensor]:
    """A third-party weights file (torchvision or torch-fidelity `.pth`), read weights-only.

    `what` names the file's role in the error message, e.g. "LPIPS trunk weights".
    Raises `AytError` if the file cannot be read or is not a state_dict.
    """
    path = Path(path)
    if not path.is_file():
        raise AytError(f"{what} file {path} does not exist")
    state = _load_weights_only(path, "cpu", f"{what} file: {path}")
    if not isinstance(state, dict):
        raise AytError(f"{what} {path} is not a state_dict")
    return state


def load_storage_bytes(data: bytes) -> Any:
    """A tensor storage serialised by `torch.save` inside another file (EDM network pickles), read weights-only."""
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
