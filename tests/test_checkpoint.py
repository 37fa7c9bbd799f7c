"""Checkpoints without pickle: exact round trips, truncation detected, crafted pickles refused."""

from __future__ import annotations

import os
import pickle

import pytest
import torch

from metake.checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_legacy_checkpoint,
    peek_checkpoint,
    save_checkpoint,
)


def _state() -> dict:
    g = torch.Generator().manual_seed(0)
    return {
        "editor": {
            "method": "alphaedit",
            "layers": [3, 4],
            "weights": {3: torch.randn(4, 5, generator=g), 4: torch.randn(4, 5, generator=g)},
            "prev_keys_cov": {3: torch.randn(5, 5, generator=g, dtype=torch.float64)},
            "finalized": False,
            "contexts": ["", "The day. "],
            "history": [{"prompt": "{} is", "subject": "A", "target_new": "B"}],
        },
        "batches": [{"seconds": 1.5, "n": 2}],
        "curve": [],
        "nothing": None,
    }


def _assert_equal(a, b) -> None:
    assert type(a) is type(b)
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert list(a) == list(b)  # keys, their types and order
        for k in a:
            _assert_equal(a[k], b[k])
    elif isinstance(a, list):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            _assert_equal(x, y)
    else:
        assert a == b


def test_round_trip_is_exact_with_int_keys_and_dtypes(tmp_path):
    state = _state()
    path = save_checkpoint(tmp_path / "run.state.safetensors", state)
    _assert_equal(load_checkpoint(path), state)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # no leftovers


def test_a_truncated_checkpoint_is_detected(tmp_path):
    path = save_checkpoint(tmp_path / "run.state.safetensors", _state())
    size = path.stat().st_size
    with open(path, "r+b") as handle:
        handle.truncate(size - 40)
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(path)
    (tmp_path / "other.safetensors").write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "other.safetensors")


def _without_tensors(value):
    """``value`` with every tensor replaced by None (what a peek returns)."""
    if isinstance(value, torch.Tensor):
        return None
    if isinstance(value, dict):
        return {k: _without_tensors(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_without_tensors(v) for v in value]
    return value


def test_a_peek_reads_everything_but_the_tensors(tmp_path):
    path = save_checkpoint(tmp_path / "run.state.safetensors", _state())
    peeked = peek_checkpoint(path)
    _assert_equal(peeked, _without_tensors(_state()))
    assert list(peeked["editor"]["weights"]) == [3, 4]  # int keys kept
    path.write_bytes(path.read_bytes()[:6])  # the header cut: unreadable, not a half state
    with pytest.raises(CheckpointError, match="unreadable"):
        peek_checkpoint(path)
    with pytest.raises(CheckpointError, match="unreadable"):
        peek_checkpoint(tmp_path / "missing.safetensors")


class _Payload:
    """Unpickling this calls os.system: what a crafted checkpoint would do."""

    def __reduce__(self):
        return (os.system, ("echo pwned > pwned.txt",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_a_crafted_pickle_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "memit.state.pt"
    with open(path, "wb") as handle:
        pickle.dump({"editor": _Payload()}, handle)
    with pytest.raises(CheckpointError, match="never unpickles code"):
        load_legacy_checkpoint(path)
    assert not (tmp_path / "pwned.txt").exists()
    # a plain legacy checkpoint (tensors and containers only) still loads
    torch.save(_state(), tmp_path / "plain.state.pt")
    _assert_equal(load_legacy_checkpoint(tmp_path / "plain.state.pt"), _state())
