"""Fault injection: a NaN or an exception in any stage leaves the weights bit-identical, names
the stage, and nothing non-finite is committed, cached or saved (issue 18)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_baselines import _shrunk_model
from test_editor import REQUESTS, TEXTS, _assert_same_state, _editor, _state
from tiny_models import tiny_model, tiny_tokenizer

import metake.planners.standard as standard
import metake.solvers.options as options
import metake.stats as stats
from metake.corpus import TextCorpus
from metake.errors import NonFiniteError
from metake.planners.metake import MetaObjective
from metake.stats import StatsCache, get_second_moments


def _nan_for_request(index: int):
    """Patch for Stage I's per-request terms: request ``index``'s NLL becomes NaN."""
    real = standard._Stage1Terms.__call__

    def wrapped(self, delta, backward):
        nll, kl = real(self, delta, backward)
        nll = nll.clone()
        nll[index] = float("nan")
        return nll, kl

    return wrapped


@pytest.mark.parametrize("method", ["memit", "alphaedit", "rome", "alphaedit_blue"])
def test_a_nan_in_stage1_names_the_request_and_changes_nothing(method, tmp_path, monkeypatch):
    model = tiny_model("llama")
    editor = _editor(model, tmp_path, method=method)
    editor.edit(REQUESTS[:1])  # a committed first batch must survive the failing second
    committed = _state(model)
    monkeypatch.setattr(standard._Stage1Terms, "__call__", _nan_for_request(0))
    with pytest.raises(NonFiniteError, match=r"Stage I.*Carl Dunn.*rolled back"):
        editor.edit(REQUESTS[1:])
    _assert_same_state(model, committed)
    assert len(editor.history) == 1


def test_a_nan_in_the_second_request_of_a_batch_is_named_alone(tmp_path, monkeypatch):
    model = tiny_model("llama")
    editor = _editor(model, tmp_path)
    original = _state(model)
    monkeypatch.setattr(standard._Stage1Terms, "__call__", _nan_for_request(1))
    with pytest.raises(NonFiniteError) as raised:
        editor.edit(REQUESTS)
    assert "#1 'Carl Dunn'" in str(raised.value) and "Anna Berg" not in str(raised.value)
    _assert_same_state(model, original)


def test_an_exception_in_stage1_changes_nothing(tmp_path, monkeypatch):
    model = tiny_model("llama")
    editor = _editor(model, tmp_path)
    original = _state(model)

    def broken(*args, **kwargs):
        raise RuntimeError("simulated failure in Stage I")

    monkeypatch.setattr(standard._Stage1Terms, "__call__", broken)
    with pytest.raises(RuntimeError, match="simulated"):
        editor.edit(REQUESTS)
    _assert_same_state(model, original)
    assert editor.history == []


@pytest.mark.parametrize("failure", ["nan", "exception"])
def test_a_fault_in_the_lookahead_changes_nothing(failure, tmp_path, monkeypatch):
    model = tiny_model("llama")
    editor = _editor(model, tmp_path, method="metake", solver="alphaedit", metake_steps=2)
    original = _state(model)
    real_evaluate = MetaObjective.evaluate

    def faulty(self, *args, **kwargs):
        loss, nll, terms = real_evaluate(self, *args, **kwargs)
        if failure == "exception":
            raise RuntimeError("simulated failure in the look-ahead")
        return loss * float("nan"), nll, terms

    monkeypatch.setattr(MetaObjective, "evaluate", faulty)
    kind, message = (NonFiniteError, "MetaKE look-ahead")
    if failure == "exception":
        kind, message = RuntimeError, "simulated"
    with pytest.raises(kind, match=message):
        editor.edit(REQUESTS)
    _assert_same_state(model, original)


@pytest.mark.parametrize("method", ["memit", "alphaedit", "rome", "rect", "alphaedit_blue"])
def test_a_nan_in_a_solve_names_the_layer_and_changes_nothing(method, tmp_path, monkeypatch):
    model = tiny_model("llama")
    editor = _editor(model, tmp_path, method=method)
    original = _state(model)
    real = editor.stage2.delta
    calls = []

    def nan_in_the_last_solve(layer, *args, **kwargs):
        calls.append(layer)
        delta = real(layer, *args, **kwargs)
        return delta * float("nan") if layer == editor.hparams.layers[-1] else delta

    monkeypatch.setattr(editor.stage2, "delta", nan_in_the_last_solve)
    layer = editor.hparams.layers[-1]
    with pytest.raises(
        NonFiniteError, match=rf"Stage II \({editor.solver} solve\) at layer {layer}"
    ):
        editor.edit(REQUESTS)
    assert calls  # the solver ran (and, for spread solvers, changed lower layers first)
    _assert_same_state(model, original)
    assert editor.history == [] and editor.stage2.state_dict().get("prev_keys_cov", {}) == {}


def test_a_nan_in_prune_finalize_keeps_the_raw_weights(tmp_path, monkeypatch):
    model = _shrunk_model()
    editor = _editor(model, tmp_path, method="prune")
    editor.edit(REQUESTS)
    raw = _state(model)

    def nan_spectrum(delta, sigma_max):
        restrained, sigma = options_prune(delta, sigma_max)
        return restrained * float("nan"), sigma

    options_prune = options.prune_with_spectrum
    monkeypatch.setattr(options, "prune_with_spectrum", nan_spectrum)
    with pytest.raises(NonFiniteError, match="PRUNE"):
        editor.finalize()
    _assert_same_state(model, raw)
    assert not editor.finalized


def test_non_finite_statistics_are_never_cached(tmp_path, monkeypatch, caplog):
    model, tok = tiny_model("llama"), tiny_tokenizer()
    corpus = TextCorpus.from_texts(TEXTS, name="fault texts")
    cache = StatsCache(tmp_path / "stats")
    real = stats.compute_second_moments

    def nan_moments(*args, **kwargs):
        moments = real(*args, **kwargs)
        moments[1].mom2[0, 0] = float("nan")
        return moments

    monkeypatch.setattr(stats, "compute_second_moments", nan_moments)
    with pytest.raises(
        NonFiniteError, match=r"key statistics \(C0\) at layer 1.*nothing was cached"
    ):
        get_second_moments(model, tok, [0, 1], corpus, model_id="tiny", num_samples=10,
                           cache=cache)  # fmt: skip
    assert not list((tmp_path / "stats").glob("*.safetensors"))  # layer 0 not cached either
    monkeypatch.setattr(stats, "compute_second_moments", real)
    good = get_second_moments(model, tok, [1], corpus, model_id="tiny", num_samples=10,
                              cache=cache)  # fmt: skip
    # a cache file that holds a NaN (written by older code) is ignored and recomputed
    (path,) = (tmp_path / "stats").glob("*.safetensors")
    with safe_open(str(path), framework="pt") as f:
        meta = {k: v for k, v in f.metadata().items() if k != "sha256"}  # as older code wrote
    tensors = load_file(str(path))
    tensors["mom2"][0, 0] = float("nan")
    save_file(tensors, str(path), metadata=meta)
    with caplog.at_level(logging.WARNING, logger="metake.stats"):
        again = get_second_moments(model, tok, [1], corpus, model_id="tiny", num_samples=10,
                                   cache=cache)  # fmt: skip
    assert "non-finite" in caplog.text
    torch.testing.assert_close(again[1].mom2, good[1].mom2)


def test_a_model_with_non_finite_edits_is_not_saved(tmp_path):
    model = tiny_model("llama")
    editor = _editor(model, tmp_path)
    editor.edit(REQUESTS[:1])
    layer = editor.hparams.layers[0]
    weight = editor.adapter.weight(model, layer).detach().clone()
    weight[0, 0] = float("inf")
    editor.adapter.set_weight(model, layer, weight)  # as a bug elsewhere might leave it
    with pytest.raises(NonFiniteError, match="nothing was saved"):
        editor.save(tmp_path / "saved")
    assert not (tmp_path / "saved").exists()


def test_an_interrupted_save_leaves_no_folder_and_keeps_an_earlier_one(tmp_path, monkeypatch):
    model = tiny_model("llama")
    editor = _editor(model, tmp_path)
    editor.edit(REQUESTS[:1])
    target = tmp_path / "saved"

    def broken(*args, **kwargs):
        raise OSError("disk full (simulated)")

    with monkeypatch.context() as patch:
        patch.setattr(editor.tokenizer, "save_pretrained", broken)
        with pytest.raises(OSError, match="disk full"):
            editor.save(target)
    assert not target.exists() and [p.name for p in tmp_path.iterdir()] == ["stats"]
    editor.save(target)  # a complete first save
    first = sorted(p.name for p in target.iterdir())
    first_edits = (target / "metake_edits.json").read_text()
    editor.edit(REQUESTS[1:])
    with monkeypatch.context() as patch:
        patch.setattr(editor.tokenizer, "save_pretrained", broken)
        with pytest.raises(OSError, match="disk full"):
            editor.save(target)
    assert sorted(p.name for p in target.iterdir()) == first  # the earlier save, untouched
    assert (target / "metake_edits.json").read_text() == first_edits
    editor.save(target)  # replaced once complete
    assert "Carl Dunn" in (target / "metake_edits.json").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["saved", "stats"]


CHILD = r"""
import sys, time
sys.path.insert(0, sys.argv[1])
from safetensors.torch import save_file
from tiny_models import tiny_model, tiny_tokenizer
import metake.stats as stats
from metake.corpus import TextCorpus
from test_editor import TEXTS

real = stats.compute_second_moments
def counted(*args, **kwargs):
    with open(sys.argv[3], "a") as marker:
        marker.write("computed\n")
    time.sleep(1.0)  # long enough for the other process to arrive and wait
    return real(*args, **kwargs)
stats.compute_second_moments = counted
moments = stats.get_second_moments(tiny_model("llama"), tiny_tokenizer(), [0, 1],
                                   TextCorpus.from_texts(TEXTS, name="shared texts"),
                                   model_id="tiny", num_samples=10,
                                   cache=stats.StatsCache(sys.argv[2]))
save_file({str(k): v.mom2 for k, v in moments.items()}, sys.argv[4])
"""


def test_two_processes_computing_the_same_statistics_share_one_pass(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    tests = str(Path(__file__).parent)
    marker = tmp_path / "calls.txt"
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                CHILD,
                tests,
                str(tmp_path / "stats"),
                str(marker),
                str(tmp_path / f"out{i}.safetensors"),
            ]
        )  # fmt: skip
        for i in range(2)
    ]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    assert marker.read_text().count("computed") == 1  # the second waited and read the cache
    assert len(list((tmp_path / "stats").glob("*.safetensors"))) == 2  # one entry per layer
    a, b = (
        load_file(str(tmp_path / "out0.safetensors")),
        load_file(str(tmp_path / "out1.safetensors")),
    )
    for layer in ("0", "1"):
        assert torch.equal(a[layer], b[layer])


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_a_damaged_cache_file_is_detected_and_recomputed(damage, tmp_path, caplog):
    model, tok = tiny_model("llama"), tiny_tokenizer()
    corpus = TextCorpus.from_texts(TEXTS, name="damage texts")
    cache = StatsCache(tmp_path / "stats")
    good = get_second_moments(model, tok, [1], corpus, model_id="tiny", num_samples=10,
                              cache=cache)  # fmt: skip
    (path,) = (tmp_path / "stats").glob("*.safetensors")
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[-8] ^= 0xFF  # one byte of the tensor data: still a valid file
    else:
        data = data[: len(data) // 2]
    path.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="metake.stats"):
        again = get_second_moments(model, tok, [1], corpus, model_id="tiny", num_samples=10,
                                   cache=cache)  # fmt: skip
    assert "ignoring" in caplog.text
    assert torch.equal(again[1].mom2, good[1].mom2)
    (path,) = (tmp_path / "stats").glob("*.safetensors")
    assert path.read_bytes() != bytes(data)  # rewritten with the recomputed values


BENCH_CHILD = r"""
import sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import metake.checkpoint as checkpoint
from test_bench import _config, _run
from tiny_models import tiny_model

tmp, out, phase = Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4]
real = checkpoint.save_file
def marked_save(tensors, path, metadata=None):
    real(tensors, path, metadata=metadata)
    (tmp / f"{phase}-written").write_text("")  # the temporary file exists, not yet renamed
    if phase == "write":
        time.sleep(30)  # killed here: mid-checkpoint-write
checkpoint.save_file = marked_save
_run(_config(tmp, methods=["alphaedit"], seeds=[0], edits=6, curve=False), out,
     tiny_model("llama"), tmp)
"""


@pytest.mark.parametrize("phase", ["write", "batch"])
def test_a_bench_killed_mid_run_resumes_to_identical_results(phase, tmp_path):
    """SIGKILL during a checkpoint write, or during the batch after a checkpoint: the resumed
    run's results equal an uninterrupted one's."""
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    from test_bench import _config, _run

    tests = str(Path(__file__).parent)
    child = subprocess.Popen([sys.executable, "-c", BENCH_CHILD, tests, str(tmp_path),
                              str(tmp_path / "killed"), phase])  # fmt: skip
    deadline = time.time() + 240
    while not (tmp_path / f"{phase}-written").exists():
        assert child.poll() is None and time.time() < deadline, "the bench ended too early"
        time.sleep(0.05)
    if phase == "batch":
        time.sleep(0.3)  # into the next batch
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=60)
    config = _config(tmp_path, methods=["alphaedit"], seeds=[0], edits=6, curve=False)
    resumed = _run(config, tmp_path / "killed", tiny_model("llama"), tmp_path)
    fresh = _run(config, tmp_path / "fresh", tiny_model("llama"), tmp_path)
    a = resumed["runs"]["0"]["methods"]["alphaedit"]
    b = fresh["runs"]["0"]["methods"]["alphaedit"]
    assert a["per_record"] == b["per_record"] and a["perplexity"] == b["perplexity"]


CONVERT_CHILD = r"""
import sys, time
from pathlib import Path
import metake.models.load as load

def slow_convert(gguf_path, folder):
    with open(sys.argv[2], "a") as marker:
        marker.write("converted\n")
    time.sleep(1.0)
    def write(staging):
        (staging / "config.json").write_text("{}")
    load.write_folder_atomically(folder, write)

load._convert_gguf = slow_convert
print(load._gguf_folder(Path(sys.argv[1])))
"""


def test_two_first_runs_convert_a_gguf_model_once(tmp_path):
    import os
    import subprocess
    import sys

    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF stand-in")
    marker = tmp_path / "calls.txt"
    env = {**os.environ, "METAKE_CACHE": str(tmp_path / "cache")}
    procs = [subprocess.Popen([sys.executable, "-c", CONVERT_CHILD, str(gguf), str(marker)],
                              env=env, stdout=subprocess.PIPE, text=True)  # fmt: skip
             for _ in range(2)]  # fmt: skip
    outputs = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert marker.read_text().count("converted") == 1  # the second waited, then reused it
    assert outputs[0] == outputs[1] and (Path(outputs[0]) / "config.json").is_file()
