"""RECT, PRUNE and BLUE: the formulas against independent computations, and in a session."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from test_editor import REQUESTS, _assert_same_state, _editor, _state
from tiny_models import tiny_model, tiny_tokenizer

from metake import MetakeError
from metake.methods import TABLE1_METHODS, SolverSpec, parse_solver, resolve_method
from metake.planners.standard import compute_targets
from metake.solvers.memit import keys_and_values
from metake.solvers.prune import prune_delta, prune_with_spectrum, restrain_singular_values
from metake.solvers.rect import rect_delta, rect_mask


# ----- names ------------------------------------------------------------------------------------
def test_solver_names_compose_and_bad_names_are_clear():
    assert parse_solver("alphaedit_blue") == SolverSpec("alphaedit", blue=True)
    assert parse_solver("rect") == SolverSpec("memit", rect=True)
    assert parse_solver("prune").name == "memit_prune"
    assert parse_solver("alphaedit_prune_rect").name == "alphaedit_rect_prune"
    assert resolve_method("rect") == ("rect", "memit_rect")
    assert resolve_method("metake", "alphaedit_blue") == ("metake", "alphaedit_blue")
    blue = "alphaedit_blue"
    assert resolve_method(blue, blue) == (blue, blue)
    with pytest.raises(MetakeError, match="unknown solver 'ft'"):
        parse_solver("ft")
    with pytest.raises(MetakeError, match="options must be distinct"):
        parse_solver("memit_rect_rect")
    with pytest.raises(MetakeError, match="options must be distinct"):
        parse_solver("memit_fast")
    with pytest.raises(MetakeError, match="BLUE needs two"):
        parse_solver("rome_blue")
    with pytest.raises(MetakeError, match="unknown method 'metake_blue'"):
        resolve_method("metake_blue")
    with pytest.raises(MetakeError, match="only"):
        resolve_method("rect", "alphaedit")


# ----- RECT -------------------------------------------------------------------------------------
@pytest.mark.parametrize("fraction", [0.4, 0.2, 1.0, 0.013])
def test_rect_mask_keeps_exactly_the_top_entries_by_relative_change(fraction):
    gen = torch.Generator().manual_seed(3)
    delta = torch.randn(12, 20, generator=gen)
    weight = torch.randn(12, 20, generator=gen)
    mask = rect_mask(delta, weight, fraction)
    relative = np.abs(delta.numpy() / weight.numpy()).ravel()
    count = math.ceil(fraction * relative.size)
    expected = np.zeros(relative.size, dtype=bool)
    expected[np.argsort(-relative, kind="stable")[:count]] = True  # no ties in random data
    assert int(mask.sum()) == count
    assert np.array_equal(mask.numpy().ravel(), expected)
    kept = rect_delta(delta, weight, fraction)
    assert torch.equal(kept[mask], delta[mask])  # kept entries are not rescaled
    assert torch.all(kept[~mask] == 0)


def test_rect_treats_a_zero_weight_as_infinite_change_and_checks_input():
    delta = torch.tensor([[0.1, 5.0], [0.2, 0.3]])
    weight = torch.tensor([[0.0, 100.0], [1.0, 1.0]])
    assert rect_mask(delta, weight, 0.25).tolist() == [[True, False], [False, False]]
    with pytest.raises(ValueError, match="keep_fraction"):
        rect_mask(delta, weight, 0.0)
    with pytest.raises(ValueError, match="differ"):
        rect_mask(delta, weight.T[:1], 0.5)


# ----- PRUNE ------------------------------------------------------------------------------------
def test_prune_map_is_log_above_sigma_max_and_continuous():
    sigma = torch.tensor([10.0, 3.0, 2.0, 0.5], dtype=torch.float64)
    out = restrain_singular_values(sigma, 2.0)
    expected = [math.log(10) + 2 - math.log(2), math.log(3) + 2 - math.log(2), 2.0, 0.5]
    assert torch.allclose(out, torch.tensor(expected, dtype=torch.float64))
    eps = 1e-9
    assert abs(float(restrain_singular_values(torch.tensor([2.0 + eps]), 2.0)) - 2.0) < 1e-6
    with pytest.raises(ValueError, match="positive"):
        restrain_singular_values(sigma, 0.0)


def test_prune_delta_keeps_singular_vectors_and_maps_singular_values():
    gen = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(16, 6, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(24, 6, generator=gen, dtype=torch.float64))
    sigma = torch.tensor([40.0, 12.0, 5.0, 3.0, 1.0, 0.2], dtype=torch.float64)
    delta = (u * sigma) @ v.T
    sigma_max = 4.0
    out = prune_delta(delta, sigma_max)
    mapped = torch.where(sigma >= sigma_max, torch.log(sigma) + sigma_max - math.log(sigma_max),
                         sigma)  # fmt: skip
    # the same left/right singular vectors: U^T out V is diagonal with the mapped values
    assert torch.allclose(u.T @ out @ v, torch.diag(mapped), atol=1e-10)
    assert torch.allclose(torch.linalg.svdvals(out)[:6], mapped.sort(descending=True).values)
    # nothing changes when every singular value is below sigma_max
    assert torch.allclose(prune_delta(delta, 100.0), delta, atol=1e-10)
    # the spectrum reported with it is the edit's own, before the map
    same, spectrum = prune_with_spectrum(delta, sigma_max)
    assert torch.equal(same, out)
    assert torch.allclose(spectrum[:6], sigma, atol=1e-10)


# ----- in a session -----------------------------------------------------------------------------
def _layer_weights(model, layers):
    return {i: model.model.layers[i].mlp.down_proj.weight.detach().clone() for i in layers}


def test_rect_session_keeps_top_entries_of_each_batch_update(tmp_path):
    plain_model, rect_model = tiny_model("llama"), tiny_model("llama")
    plain = _editor(plain_model, tmp_path, method="memit")
    rect = _editor(rect_model, tmp_path, method="rect", rect_keep_fraction=0.3)
    assert (rect.method, rect.solver) == ("rect", "memit_rect")
    before = _layer_weights(rect_model, [0, 1])
    plain.edit(REQUESTS)
    result = rect.edit(REQUESTS)
    full = {i: w - before[i] for i, w in _layer_weights(plain_model, [0, 1]).items()}
    for layer in (0, 1):
        applied = rect_model.model.layers[layer].mlp.down_proj.weight.detach() - before[layer]
        mask = rect_mask(full[layer], before[layer], 0.3)
        assert int((applied != 0).sum()) <= mask.sum()
        assert torch.allclose(applied, full[layer] * mask, atol=1e-6)  # the mask after all layers
        name = f"model.layers.{layer}.mlp.down_proj"
        assert torch.allclose(result.deltas[name], applied, atol=1e-6)
    # a second batch is MEMIT's update from where the first left the weights, masked against them
    start = _layer_weights(rect_model, [0, 1])
    unmasked_model = tiny_model("llama")
    unmasked = _editor(unmasked_model, tmp_path, method="memit", contexts=rect.contexts)
    unmasked.load_statistics()  # C0 of the unedited model, as the RECT session has
    for layer, weight in start.items():
        unmasked.adapter.set_weight(unmasked_model, layer, weight)
    unmasked.edit(REQUESTS[:1])
    rect.edit(REQUESTS[:1])
    for layer in (0, 1):
        change = rect_model.model.layers[layer].mlp.down_proj.weight.detach() - start[layer]
        full2 = unmasked_model.model.layers[layer].mlp.down_proj.weight.detach() - start[layer]
        assert int((change != 0).sum()) <= math.ceil(0.3 * change.numel())
        torch.testing.assert_close(change, full2 * rect_mask(full2, start[layer], 0.3),
                                   atol=1e-6, rtol=0)  # fmt: skip


def _shrunk_model():
    """A tiny model whose edit layers' weights are small, so edits exceed their sigma_max."""
    model = tiny_model("llama")
    with torch.no_grad():
        for layer in (0, 1):
            model.model.layers[layer].mlp.down_proj.weight.mul_(0.02)
    return model


def test_prune_session_restrains_the_accumulated_edit_and_goes_on_raw(tmp_path):
    plain_model, prune_model = _shrunk_model(), _shrunk_model()
    original = _state(prune_model)
    plain = _editor(plain_model, tmp_path, method="memit")
    prune = _editor(prune_model, tmp_path, method="prune")
    w0 = _layer_weights(prune_model, [0, 1])
    plain.edit(REQUESTS[:1])
    prune.edit(REQUESTS[:1])
    _assert_same_state(prune_model, _state(plain_model))  # editing itself is MEMIT's
    counts = prune.finalize()
    assert prune.finalized and all(count >= 1 for count in counts.values()), counts
    raw = {i: w - w0[i] for i, w in _layer_weights(plain_model, [0, 1]).items()}
    for layer in (0, 1):
        sigma_max = float(torch.linalg.matrix_norm(w0[layer].double(), ord=2))
        u, sigma, vh = torch.linalg.svd(raw[layer].double(), full_matrices=False)
        restrained = (prune_model.model.layers[layer].mlp.down_proj.weight.detach().double()
                      - w0[layer].double())  # fmt: skip
        mapped = torch.where(sigma >= sigma_max,
                             torch.log(sigma) + sigma_max - math.log(sigma_max), sigma)  # fmt: skip
        core = u.T @ restrained @ vh.T
        assert torch.allclose(core, torch.diag(mapped), atol=1e-5)
    assert prune.finalize() == {}  # idempotent
    # the next batch continues from the raw weights, exactly as plain MEMIT does
    plain.edit(REQUESTS[1:])
    prune.edit(REQUESTS[1:])
    assert not prune.finalized
    _assert_same_state(prune_model, _state(plain_model))
    prune.finalize()
    prune.restore()
    _assert_same_state(prune_model, original)
    assert not prune.finalized


def test_prune_checkpoint_resumes_finalised_session(tmp_path):
    model = _shrunk_model()
    original = _state(model)
    first = _editor(model, tmp_path, method="prune")
    first.edit(REQUESTS[:1])
    first.finalize()
    state = first.state_dict()
    finalised = _state(model)
    first.edit(REQUESTS[1:])
    first.finalize()
    expected = _state(model)
    first.restore()
    second = _editor(model, tmp_path, method="prune")
    second.load_state_dict(state)
    assert second.finalized
    _assert_same_state(model, finalised)
    second.edit(REQUESTS[1:])
    second.finalize()
    _assert_same_state(model, expected)
    second.restore()
    _assert_same_state(model, original)


def test_blue_touches_only_its_two_layers_with_a_target_at_each(tmp_path):
    model = tiny_model("llama")
    tok = tiny_tokenizer()
    untouched = _state(model)
    settings = dict(layers=[0, 1, 2], context_count=0, mom2_update_weight=1e-6)
    blue = _editor(model, tmp_path, method="memit_blue", **settings)
    assert blue.hparams.layers == (0, 2)
    request = REQUESTS[:1]
    parsed = blue.prepare(request)
    # BLUE's first target: Stage I at layer 0's own output, on the unedited model
    target0 = compute_targets(model, tok, parsed, blue.hparams.with_overrides(layers=[0]), [""])
    result = blue.edit(request)
    assert set(result.deltas) == {"model.layers.0.mlp.down_proj", "model.layers.2.mlp.down_proj"}
    now = model.state_dict()
    changed = {name for name, value in untouched.items() if not torch.equal(now[name], value)}
    assert changed == {"model.layers.0.mlp.down_proj.weight", "model.layers.2.mlp.down_proj.weight"}
    # full residual, no division over layers: with lambda -> 0 and one key, layer 0's output at
    # the subject now equals its own target (MEMIT would move it by half the residual)
    _, values0 = keys_and_values(model, tok, parsed, [""], 0, 0)
    assert torch.allclose(values0, target0.v_target, atol=1e-3 * float(target0.v_target.norm()))
    # the last layer's target is optimised at its own output on the model as layer 0's update
    # left it (BLUE's order), and the edit reaches it too
    replay = tiny_model("llama")
    with torch.no_grad():
        replay.model.layers[0].mlp.down_proj.weight += result.deltas["model.layers.0.mlp.down_proj"]
    target2 = compute_targets(replay, tok, parsed, blue.hparams, [""])
    assert target2.layer == 2
    _, values2 = keys_and_values(model, tok, parsed, [""], 2, 2)
    assert torch.allclose(values2, target2.v_target, atol=1e-3 * float(target2.v_target.norm()))
    assert len(result.report.stage1_target_prob) == 2  # one Stage I per BLUE layer


def test_alphaedit_blue_uses_its_own_lambda_and_checks_layers(tmp_path):
    model = tiny_model("llama")
    editor = _editor(model, tmp_path, method="alphaedit_blue", alphaedit_blue_lambda=95.0)
    assert editor.stage2.base.lam2 == 95.0
    assert _editor(model, tmp_path, method="alphaedit").stage2.base.lam2 == 10.0
    with pytest.raises(MetakeError, match="at least two layers"):
        _editor(model, tmp_path, method="alphaedit_blue", layers=[1])


def test_metake_over_blue_and_rect_runs_and_restores(tmp_path):
    model = tiny_model("llama")
    original = _state(model)
    for solver in ("alphaedit_blue", "rect"):
        editor = _editor(model, tmp_path, method="metake", solver=solver, layers=[0, 1, 2],
                         metake_steps=2)  # fmt: skip
        result = editor.edit(REQUESTS)
        assert result.report.solver == editor.solver
        assert result.report.lookahead_history
        editor.restore()
        _assert_same_state(model, original)


def test_table1_expands_to_the_papers_rows_and_cli_checks_names():
    from metake.cli import build_parser
    from metake.methods import expand_methods

    assert expand_methods("table1") == list(TABLE1_METHODS)
    assert expand_methods("memit, table1") == ["memit", *TABLE1_METHODS]
    assert TABLE1_METHODS == ("rome", "memit", "prune", "rect", "alphaedit", "alphaedit_blue",
                              "metake")  # fmt: skip
    for name in TABLE1_METHODS:
        resolve_method(name)
    args = build_parser().parse_args(["edit", "--method", "metake", "--solver", "alphaedit_blue"])
    assert (args.method, args.solver) == ("metake", "alphaedit_blue")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["edit", "--method", "alphaedit_fast"])


@pytest.mark.parametrize("model_type", ["gemma3_text", "gpt2", "gpt_neox"])
def test_options_run_on_other_families_and_restore(model_type, tmp_path):
    model = tiny_model(model_type)
    original = _state(model)
    for method in ("alphaedit_blue", "rect", "prune", "rome_rect"):
        editor = _editor(model, tmp_path, method=method, layers=[0, 1, 2])
        editor.edit(REQUESTS)
        editor.finalize()
        assert editor.accumulated_deltas()
        editor.restore()
        _assert_same_state(model, original)
