"""The editing session on tiny models: restore, determinism, atomicity, validation, saving."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import tiny_model, tiny_tokenizer
from transformers import AutoModelForCausalLM

from metake import Editor, InvalidRequestError, MetakeError
from metake.corpus import TextCorpus
from metake.editor import DELTA_FILE, EDITS_FILE
from metake.solvers.memit import subject_activations
from metake.stats import StatsCache

TEXTS = [
    "The river runs through the old town and meets the sea.",
    "A small library opened near the station last spring.",
    "Music and painting were taught at the village school.",
    "The bridge was rebuilt after the flood of that year.",
] * 5

REQUESTS = [
    {"prompt": "{} lives in", "subject": "Anna Berg", "target_new": "Oslo"},
    {"prompt": "The home of {} is", "subject": "Carl Dunn", "target_new": "Lima"},
]


def _editor(model, tmp_path, **overrides) -> Editor:
    settings = dict(
        layers=[0, 1],
        v_steps=4,
        mom2_samples=20,
        mom2_update_weight=10.0,
        context_count=2,
        context_length=3,
    )
    settings.update(overrides)
    return Editor(
        model,
        tiny_tokenizer(),
        corpus=TextCorpus.from_texts(TEXTS, name="editor test texts"),
        stats_cache=StatsCache(tmp_path / "stats"),
        progress=False,
        **settings,
    )


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same_state(model, state) -> None:
    now = model.state_dict()
    assert set(now) == set(state)
    for name, value in state.items():
        assert torch.equal(now[name], value), name


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_edit_then_restore_is_bit_identical(model_type, tmp_path):
    model = tiny_model(model_type)
    original = _state(model)
    editor = _editor(model, tmp_path)
    result = editor.edit(REQUESTS)
    adapter = editor.adapter
    assert set(result.deltas) == {adapter.mlp_out_name(0), adapter.mlp_out_name(1)}
    assert all(d.abs().max() > 0 for d in result.deltas.values())
    # the returned deltas are exactly what changed (up to float32 rounding of the addition)
    for layer in (0, 1):
        stored = original[adapter.mlp_out_name(layer) + ".weight"]
        before = stored.T if adapter.weight_is_transposed else stored
        change = adapter.weight(model, layer) - before
        torch.testing.assert_close(change, result.deltas[adapter.mlp_out_name(layer)])
    assert result.report.num_requests == 2 and result.report.stage1_history
    editor.restore()
    _assert_same_state(model, original)


def test_same_seed_gives_identical_deltas(tmp_path):
    base = tiny_model("llama")
    first = _editor(copy.deepcopy(base), tmp_path, seed=3).edit(REQUESTS)
    second = _editor(copy.deepcopy(base), tmp_path, seed=3).edit(REQUESTS)
    for name, delta in first.deltas.items():
        assert torch.equal(delta, second.deltas[name]), name
    assert first.report.stage1_history == second.report.stage1_history


@pytest.mark.parametrize("method", ["memit", "metake_exact"])
def test_a_trainable_model_in_training_mode_edits_as_a_frozen_one(method, tmp_path):
    """A model straight from ``from_pretrained`` (every weight trainable) or put in training
    mode (GPT-2's dropout on) edits exactly as a frozen model in eval mode, fills no ``.grad``,
    and gets its modes and flags back."""
    base = tiny_model("gpt2")
    assert base.config.resid_pdrop > 0  # dropout would change the edit if it ran
    frozen_model = copy.deepcopy(base).requires_grad_(False)
    user_model = copy.deepcopy(base).train()
    user_model.transformer.h[0].eval()  # a submodule's own mode is kept as well
    expected = _editor(frozen_model, tmp_path, method=method).edit(REQUESTS)
    got = _editor(user_model, tmp_path, method=method).edit(REQUESTS)
    for name, delta in expected.deltas.items():
        assert torch.equal(delta, got.deltas[name]), name
    assert all(p.grad is None for p in user_model.parameters())
    assert all(p.requires_grad for p in user_model.parameters())
    assert user_model.training and user_model.transformer.h[1].training
    assert not user_model.transformer.h[0].training


def test_sequential_edits_accumulate_and_restore(tmp_path):
    model = tiny_model("llama")
    original = _state(model)
    editor = _editor(model, tmp_path)
    one = editor.edit(REQUESTS[:1])
    two = editor.edit(REQUESTS[1:])
    total = editor.accumulated_deltas()
    for name, delta in total.items():
        torch.testing.assert_close(delta, one.deltas[name] + two.deltas[name], atol=1e-5, rtol=0)
    assert len(editor.history) == 2
    editor.restore()
    _assert_same_state(model, original)
    assert editor.history == []


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"prompt": "lives in", "subject": "Anna Berg", "target_new": "Oslo"}, "placeholder"),
        ({"prompt": "{} lives in", "subject": "  ", "target_new": "Oslo"}, "subject"),
        ({"prompt": "{} lives in", "subject": "Anna Berg", "target_new": ""}, "target_new"),
        ({"prompt": "{} lives", "subject": "A", "target_new": "B", "colour": 1}, "colour"),
        ({"src": "Where does Anna live?", "subject": "Bob", "answers": ["Oslo"]}, "subject"),
    ],
)
def test_bad_requests_fail_before_any_change(bad, message, tmp_path):
    model = tiny_model("llama")
    original = _state(model)
    editor = _editor(model, tmp_path)
    with pytest.raises(InvalidRequestError, match=message):
        editor.edit([REQUESTS[0], bad])
    _assert_same_state(model, original)
    assert editor.history == []


def test_failing_solve_rolls_the_batch_back(tmp_path, monkeypatch):
    model = tiny_model("llama")
    editor = _editor(model, tmp_path)
    editor.edit(REQUESTS[:1])
    after_first = _state(model)
    real = editor.stage2.delta
    calls = []

    def fail_on_second_layer(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("simulated failure in the second layer's solve")
        return real(*args, **kwargs)

    monkeypatch.setattr(editor.stage2, "delta", fail_on_second_layer)
    with pytest.raises(RuntimeError, match="simulated"):
        editor.edit(REQUESTS[1:])
    assert len(calls) == 2  # the first layer had been changed before the failure
    _assert_same_state(model, after_first)
    assert len(editor.history) == 1


def test_save_writes_model_deltas_and_edits(tmp_path):
    model = tiny_model("llama")
    editor = _editor(model, tmp_path)
    editor.edit(REQUESTS)
    out = editor.save(tmp_path / "edited")
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    for name, value in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], value), name
    deltas = load_file(str(out / DELTA_FILE))
    for name, delta in editor.accumulated_deltas().items():
        assert torch.equal(deltas[name], delta)
    edits = json.loads((out / EDITS_FILE).read_text())
    assert [r["subject"] for r in edits["requests"]] == ["Anna Berg", "Carl Dunn"]
    assert edits["hparams"]["layers"] == [0, 1]


def test_statistics_come_from_the_unedited_model(tmp_path):
    model = tiny_model("llama")
    editor = _editor(model, tmp_path, layers=[1])
    editor.edit(REQUESTS[:1])
    with pytest.raises(MetakeError, match="unedited"):
        editor.load_statistics([0])


def test_unknown_method_and_bad_layers_are_clear_errors(tmp_path):
    model = tiny_model("llama")
    with pytest.raises(MetakeError, match="unknown method"):
        Editor(model, tiny_tokenizer(), method="magic")
    with pytest.raises(ValueError, match="out of range"):
        _editor(model, tmp_path, layers=[7])
    with pytest.raises(ValueError, match="unknown hyper-parameter"):
        _editor(model, tmp_path, learning_rate=0.1)


def test_sessions_do_not_share_state(tmp_path):
    base = tiny_model("llama")
    a = _editor(copy.deepcopy(base), tmp_path)
    b = _editor(copy.deepcopy(base), tmp_path)
    a.edit(REQUESTS[:1])
    assert b.history == [] and b.accumulated_deltas() == {}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_cuda_edit_matches_cpu(tmp_path):
    base = tiny_model("llama")
    on_cpu = _editor(copy.deepcopy(base), tmp_path).edit(REQUESTS)
    on_gpu = _editor(copy.deepcopy(base).to("cuda"), tmp_path).edit(REQUESTS)
    for name, delta in on_cpu.deltas.items():
        torch.testing.assert_close(on_gpu.deltas[name].cpu(), delta, rtol=1e-3, atol=1e-4)


def test_alphaedit_session_projects_updates_and_accumulates_keys(tmp_path):
    model = tiny_model("llama")
    original = _state(model)
    # a threshold relative to C0's largest eigenvalue leaves a proper null space on tiny models
    editor = _editor(
        model, tmp_path, method="alphaedit", nullspace_threshold=0.05, nullspace_relative=True
    )
    first = editor.edit(REQUESTS[:1])
    for layer in (0, 1):
        ns = editor.null_space(layer)
        assert 0 < ns.rank < ns.projector.shape[0]
        delta = first.deltas[editor.adapter.mlp_out_name(layer)].double()
        eye = torch.eye(ns.projector.shape[0], dtype=torch.float64)
        assert (delta @ (eye - ns.projector)).norm() < 1e-5 * delta.norm()
    ranks = {layer: editor.null_space(layer).rank for layer in (0, 1)}
    assert first.report.null_space_rank == ranks
    after_one = {k: v.clone() for k, v in editor.stage2.base.prev_keys_cov.items()}
    assert set(after_one) == {0, 1}

    def layer0_keys(requests) -> torch.Tensor:
        """Keys of layer 0 (no edit of a down projection changes them): ``[n, d_in]``."""
        parsed = editor.prepare(requests)
        acts = subject_activations(model, editor.tokenizer, parsed, editor.contexts, [0], 0)
        return acts.keys[0].double().cpu()

    k1 = layer0_keys(REQUESTS[:1])
    torch.testing.assert_close(after_one[0], k1.T @ k1)  # C_prev = K1^T K1
    editor.edit(REQUESTS[1:])
    k2 = layer0_keys(REQUESTS[1:])
    torch.testing.assert_close(editor.stage2.base.prev_keys_cov[0], k1.T @ k1 + k2.T @ k2)
    assert not torch.equal(editor.stage2.base.prev_keys_cov[1], after_one[1])
    editor.restore()
    _assert_same_state(model, original)
    assert editor.stage2.base.prev_keys_cov == {}


def test_rome_session_writes_rank_one_updates_at_one_layer(tmp_path):
    model = tiny_model("llama")
    original = _state(model)
    editor = _editor(model, tmp_path, method="rome")
    assert editor.hparams.layers == (1,)
    one = editor.edit(REQUESTS[:1])
    (name,) = one.deltas
    assert name == editor.adapter.mlp_out_name(1)
    assert torch.linalg.matrix_rank(one.deltas[name].double(), rtol=1e-6) == 1
    two = editor.edit(REQUESTS)  # two requests: two rank-one updates, one after the other
    assert torch.linalg.matrix_rank(two.deltas[name].double(), rtol=1e-6) == 2
    assert len(two.report.stage1_target_prob) == 2
    editor.restore()
    _assert_same_state(model, original)


def test_state_dict_continues_a_session_exactly(tmp_path):
    model = tiny_model("llama")
    original = _state(model)
    first = _editor(model, tmp_path, method="alphaedit", nullspace_threshold=0.5,
                    nullspace_relative=True)  # fmt: skip
    first.edit(REQUESTS[:1])
    state = first.state_dict()
    first.edit(REQUESTS[1:])
    expected = _state(model)
    first.restore()
    _assert_same_state(model, original)

    second = _editor(model, tmp_path, method="alphaedit", nullspace_threshold=0.5,
                     nullspace_relative=True)  # fmt: skip
    second.load_state_dict(state)
    assert [r.subject for r in second.history] == ["Anna Berg"]
    second.edit(REQUESTS[1:])
    _assert_same_state(model, expected)
    with pytest.raises(MetakeError, match="unedited session"):
        second.load_state_dict(state)
    second.restore()
    _assert_same_state(model, original)
    with pytest.raises(MetakeError, match="checkpoint is for alphaedit"):
        _editor(model, tmp_path).load_state_dict(state)
    changed = _editor(model, tmp_path, method="alphaedit", nullspace_threshold=0.4,
                      nullspace_relative=True)  # fmt: skip
    with pytest.raises(MetakeError, match=r"other hyper-parameters \(nullspace_threshold 0.5 "
                       r"\(now 0.4\)\)"):  # fmt: skip
        changed.load_state_dict(state)
    assert not changed.history  # refused before anything changed
    _assert_same_state(model, original)


def test_solve_targets_is_the_edits_stage_two(tmp_path):
    from metake.planners.standard import compute_targets

    edited, scripted = tiny_model("llama"), tiny_model("llama")
    result = _editor(edited, tmp_path).edit(REQUESTS)
    editor = _editor(scripted, tmp_path)
    parsed = editor.prepare(REQUESTS)
    editor.load_statistics()
    plan = compute_targets(scripted, editor.tokenizer, parsed, editor.hparams, editor.contexts)
    deltas = editor.solve_targets(parsed, plan.v_target, editor.contexts)
    for layer, delta in deltas.items():
        torch.testing.assert_close(delta, result.deltas[f"model.layers.{layer}.mlp.down_proj"])
    with pytest.raises(MetakeError, match="does not"):
        _editor(scripted, tmp_path, method="memit_blue").solve_targets(parsed, plan.v_target, [""])


@pytest.mark.parametrize("method", ["memit", "alphaedit"])
def test_apply_targets_equals_edit_with_the_same_targets(method, tmp_path):
    from metake.planners.standard import compute_targets

    planned, direct = tiny_model("llama"), tiny_model("llama")
    first = _editor(planned, tmp_path, method=method)
    result = first.edit(REQUESTS)
    second = _editor(direct, tmp_path, method=method)
    torch.manual_seed(second.seed)
    second.load_statistics()
    requests = second.prepare(REQUESTS)
    plan = compute_targets(direct, second.tokenizer, requests, second.hparams, second.contexts)
    deltas = second.apply_targets(requests, plan.v_target)
    for layer in second.hparams.layers:
        name = second.adapter.mlp_out_name(layer)
        torch.testing.assert_close(deltas[layer], result.deltas[name])
    assert len(second.history) == len(REQUESTS)
    if method == "alphaedit":  # the key cache advanced exactly as in edit()
        for layer in second.hparams.layers:
            torch.testing.assert_close(
                second.stage2.base.prev_keys_cov[layer], first.stage2.base.prev_keys_cov[layer]
            )
    with pytest.raises(MetakeError, match="targets must be"):
        second.apply_targets(requests, plan.v_target[:1])


@pytest.mark.parametrize("method", ["alphaedit", "prune"])
def test_a_saved_session_continues_exactly(method, tmp_path):
    """Edit A, save, load, edit B == edit A then B in one session (bit-identical weights, key
    cache and history); restore() after the load gives the original weights back."""
    one = tiny_model("llama")
    original = _state(one)
    session = _editor(one, tmp_path, method=method)
    session.edit(REQUESTS[:1])
    session.save(tmp_path / "after-a")
    session.edit(REQUESTS[1:])
    session.finalize()
    continuous = _state(one)

    corpus = TextCorpus.from_texts(TEXTS, name="editor test texts")
    loaded = Editor.load(tmp_path / "after-a", corpus=corpus,
                         stats_cache=StatsCache(tmp_path / "stats"), progress=False)  # fmt: skip
    assert (loaded.method, loaded.solver) == (session.method, session.solver)
    assert [r.subject for r in loaded.history] == ["Anna Berg"]
    loaded.edit(REQUESTS[1:])
    loaded.finalize()
    resumed = loaded.model.state_dict()
    for name, value in continuous.items():
        assert torch.equal(resumed[name], value), name
    for layer, cache in session.stage2.state_dict().get("prev_keys_cov", {}).items():
        assert torch.equal(loaded.stage2.state_dict()["prev_keys_cov"][layer], cache)
    loaded.restore()
    restored = loaded.model.state_dict()
    for name, value in original.items():
        assert torch.equal(restored[name], value), name


def test_loading_a_folder_without_a_session_is_a_clear_error(tmp_path):
    model = tiny_model("llama")
    model.save_pretrained(tmp_path / "plain")
    with pytest.raises(MetakeError, match="holds no saved metake session"):
        Editor.load(tmp_path / "plain")


def test_a_given_stage1_plan_replaces_the_edits_first_stage_one(tmp_path, monkeypatch):
    """``edit(requests, stage1=plan)`` with the plan the edit would compute gives its deltas
    without running Stage I (MetaKE's look-ahead and the solve still run); a plan for other
    requests or another layer, or one given to ROME, is refused."""
    import metake.editor as editor_module
    from metake.planners.standard import compute_targets

    model = tiny_model("llama")
    settings = dict(method="metake", metake_steps=2, nullspace_threshold=0.5,
                    nullspace_relative=True)  # fmt: skip
    first = _editor(model, tmp_path, **settings)
    parsed = first.prepare(REQUESTS)
    plan = compute_targets(model, first.tokenizer, parsed, first.hparams, first.contexts,
                           max_rows=first.group_rows)  # fmt: skip
    expected = first.edit(REQUESTS).deltas
    first.restore()

    def no_stage1(*args, **kwargs):
        raise AssertionError("Stage I ran although a plan was given")

    monkeypatch.setattr(editor_module, "compute_targets", no_stage1)
    second = _editor(model, tmp_path, **settings)
    got = second.edit(REQUESTS, stage1=plan).deltas
    assert got.keys() == expected.keys()
    for name in got:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-6)
    second.restore()
    with pytest.raises(MetakeError, match="plan is for 2 requests at layer 1; this edit plans 1"):
        second.edit(REQUESTS[:1], stage1=plan)
    with pytest.raises(MetakeError, match="takes no stage1 plan"):
        _editor(model, tmp_path, method="rome").edit(REQUESTS, stage1=plan)
