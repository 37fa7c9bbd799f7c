"""CUDA parity of the planners and the benchmark (skipped on machines without a GPU)."""

from __future__ import annotations

import copy

import pytest
import torch
from test_bench import _capture_final_edits, _config, _run
from test_editor import REQUESTS, _editor
from tiny_models import tiny_model, tiny_tokenizer

from metake.hparams import MemitHparams
from metake.planners.standard import compute_targets
from metake.requests import parse_requests

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
CONTEXTS = ["", "Some words here. ", "X. "]


@pytest.mark.parametrize("model_type", ["gpt2", "llama", "qwen2", "gemma3_text"])
def test_stage_one_on_cuda_matches_cpu(model_type):
    model, tok = tiny_model(model_type), tiny_tokenizer()
    requests = parse_requests(REQUESTS)
    # layer 2 stays above the edit layer (the targets need a path); a small lr because Adam
    # turns the float noise of near-zero gradients (tiny random gemma3 is almost flat) into
    # whole steps, on either device
    hp = MemitHparams(layers=(0, 1), v_steps=4, v_lr=0.01)
    cpu = compute_targets(model, tok, requests, hp, CONTEXTS)
    gpu = compute_targets(copy.deepcopy(model).to("cuda"), tok, requests, hp, CONTEXTS)
    for a, b in zip(gpu.history, cpu.history, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
    torch.testing.assert_close(gpu.v_target.cpu(), cpu.v_target, rtol=0, atol=0.05)


@pytest.mark.parametrize(
    ("method", "solver"),
    [("metake", "memit"), ("metake", "alphaedit"), ("metake", "rome"),
     ("metake_exact", "memit"), ("metake_exact", "alphaedit")],
)  # fmt: skip
def test_metake_edit_on_cuda_matches_cpu(method, solver, tmp_path):
    base = tiny_model("llama")
    settings = dict(method=method, solver=solver, metake_steps=3, metake_lr=0.05,
                    nullspace_threshold=0.5, nullspace_relative=True)  # fmt: skip
    on_cpu = _editor(copy.deepcopy(base), tmp_path, **settings).edit(REQUESTS)
    on_gpu = _editor(copy.deepcopy(base).to("cuda"), tmp_path, **settings).edit(REQUESTS)
    for name, delta in on_cpu.deltas.items():
        torch.testing.assert_close(on_gpu.deltas[name].cpu(), delta, rtol=1e-3, atol=1e-4)


def test_diagnose_on_cuda(tmp_path):
    from metake.diagnostics.run import diagnose

    editor = _editor(tiny_model("llama").to("cuda"), tmp_path, method="metake", metake_steps=2,
                     nullspace_threshold=0.5, nullspace_relative=True)  # fmt: skip
    report = diagnose(editor, editor.prepare(REQUESTS), batch_size=2, progress=False)
    assert report["summary"]["median_cosine"] is not None


def test_bench_runs_and_resumes_on_cuda(tmp_path, monkeypatch):
    """A resumed CUDA run ends on the edits of an uninterrupted one (within float noise: CUDA
    kernels need not be bit-reproducible) with the same per-record scores."""
    finals = _capture_final_edits(monkeypatch)
    model = tiny_model("llama").to("cuda")
    config = _config(tmp_path, seeds=[0], device="cuda")
    full = _run(config, tmp_path / "full", model, tmp_path)
    full_finals = list(finals)
    assert _run(config, tmp_path / "part", model, tmp_path, stop_after_batches=1) == {}
    finals.clear()
    resumed = _run(config, tmp_path / "part", model, tmp_path)
    assert len(finals) == len(full_finals) == len(config.methods)
    for (deltas, caches, _), (want_deltas, want_caches, _) in zip(finals, full_finals,
                                                                  strict=True):  # fmt: skip
        assert deltas.keys() == want_deltas.keys() and deltas
        for name, delta in deltas.items():
            torch.testing.assert_close(delta, want_deltas[name], atol=1e-5, rtol=1e-4)
        for layer, cache in caches.items():
            torch.testing.assert_close(cache, want_caches[layer], atol=1e-6, rtol=1e-6)
    for method in config.methods:
        a = full["runs"]["0"]["methods"][method]["per_record"]
        assert a == resumed["runs"]["0"]["methods"][method]["per_record"], method
    assert next(model.parameters()).is_cuda


SPLIT = {"model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": "cpu",
         "model.layers.2": 0, "model.layers.3": "cpu", "model.norm": "cpu",
         "model.rotary_emb": "cpu", "lm_head": 0}  # fmt: skip


@pytest.mark.parametrize("method", ["memit", "alphaedit", "rome", "metake", "metake_exact"])
def test_model_split_over_cuda_and_cpu_edits_like_one_device(method, tmp_path):
    """Edit layers on different devices (layer 0 on cuda:0, layer 1 on the CPU), the LM head
    back on the GPU: keys, values, statistics, deltas each on their layer's device."""
    from test_device_map import _edited

    from metake.models.load import load_model
    from metake.stats import StatsCache

    folder = tmp_path / "llama4"
    tiny_model("llama", seed=3, num_layers=4).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    plain, _ = load_model(str(folder), device="cuda")
    spread, _ = load_model(str(folder), device_map=SPLIT)
    got = _edited(spread, method, StatsCache(tmp_path / "b"))
    want = _edited(plain, method, StatsCache(tmp_path / "a"))
    assert got[0].device.type == "cuda" and got[1].device.type == "cpu"
    for layer in (0, 1):
        torch.testing.assert_close(got[layer].cpu(), want[layer].cpu(), rtol=1e-3, atol=1e-4)
