"""Checkpoints without pickle: nested state (dicts, lists, numbers, strings, tensors) in one
safetensors file, the structure as JSON in its metadata, written atomically.

Opening a run folder someone sent you must not run their code: ``torch.load`` of a pickle can.
A checkpoint here holds tensors as safetensors data and everything else as JSON; dicts whose
keys are not all strings (per-layer dicts keyed by ``int``) keep their key types. A truncated or
corrupt file raises :class:`CheckpointError` instead of loading half a state.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from metake.errors import MetakeError
from metake.files import write_file_atomically

FORMAT = "metake-checkpoint-1"


class CheckpointError(MetakeError):
    """A checkpoint file is missing, truncated, corrupt or not in metake's format."""


def _encode(value: Any, tensors: dict[str, torch.Tensor], path: str) -> Any:
    """``value`` as JSON, its tensors moved into ``tensors`` under names built from ``path``."""
    if isinstance(value, torch.Tensor):
        name = f"t{len(tensors)}"
        tensors[name] = value.detach().cpu().contiguous()
        return {"__tensor__": name}
    if isinstance(value, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in value):
            return {k: _encode(v, tensors, f"{path}/{k}") for k, v in value.items()}
        items = []
        for k, v in value.items():
            if not isinstance(k, (str, int)) or isinstance(k, bool):
                raise TypeError(f"checkpoint: key {k!r} at {path} is neither str nor int")
            items.append([k, _encode(v, tensors, f"{path}/{k}")])
        return {"__items__": items}
    if isinstance(value, (list, tuple)):
        return [_encode(v, tensors, f"{path}/{i}") for i, v in enumerate(value)]
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    raise TypeError(f"checkpoint: cannot store {type(value).__name__} at {path}")


def _decode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The inverse of :func:`_encode`."""
    if isinstance(value, dict):
        if set(value) == {"__tensor__"}:
            return tensors[value["__tensor__"]]
        if set(value) == {"__items__"}:
            return {k: _decode(v, tensors) for k, v in value["__items__"]}
        return {k: _decode(v, tensors) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    return value


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """Write ``state`` to ``path`` (safetensors + JSON structure), atomically: a temporary file in
    the same folder, flushed to disk, then renamed over ``path``."""
    path = Path(path)
    tensors: dict[str, torch.Tensor] = {}
    structure = _encode(state, tensors, "")
    meta = {"format": FORMAT, "structure": json.dumps(structure)}
    return write_file_atomically(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """The state :func:`save_checkpoint` wrote to ``path``; :class:`CheckpointError` otherwise."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            meta = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    except Exception as err:  # truncated, corrupt, not safetensors
        raise CheckpointError(f"checkpoint {path} is unreadable (truncated or corrupt): {err}") \
            from None  # fmt: skip
    if meta.get("format") != FORMAT or "structure" not in meta:
        raise CheckpointError(f"checkpoint {path} is not a metake checkpoint ({FORMAT})")
    try:
        return _decode(json.loads(meta["structure"]), tensors)
    except (json.JSONDecodeError, KeyError) as err:
        raise CheckpointError(f"checkpoint {path} has a corrupt structure: {err}") from None


def peek_checkpoint(path: str | Path) -> dict[str, Any]:
    """The state :func:`save_checkpoint` wrote to ``path`` with every tensor left out (``None``):
    reads only the file's header, so a progress report need not load the edited weights."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            meta = handle.metadata() or {}
            names = list(handle.keys())
    except Exception as err:  # missing, truncated, corrupt, not safetensors
        raise CheckpointError(f"checkpoint {path} is unreadable: {err}") from None
    if meta.get("format") != FORMAT or "structure" not in meta:
        raise CheckpointError(f"checkpoint {path} is not a metake checkpoint ({FORMAT})")
    try:
        return _decode(json.loads(meta["structure"]), dict.fromkeys(names))
    except (json.JSONDecodeError, KeyError) as err:
        raise CheckpointError(f"checkpoint {path} has a corrupt structure: {err}") from None


def load_legacy_checkpoint(path: str | Path) -> dict[str, Any]:
    """A checkpoint of older metake versions (``torch.save``), read with ``weights_only=True``:
    plain containers and tensors only, so that a crafted pickle cannot run code."""
    import pickle

    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as err:
        raise CheckpointError(
            f"refusing checkpoint {path}: it is not a plain tensor checkpoint ({err}); metake "
            "never unpickles code"
        ) from None
