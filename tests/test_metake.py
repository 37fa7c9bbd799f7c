"""MetaKE's look-ahead planner: the proxy gradient, the locality set, sessions on tiny models."""

from __future__ import annotations

import pytest
import torch
from test_editor import REQUESTS, _editor, _state
from tiny_models import tiny_model, tiny_tokenizer
from torch.func import functional_call

import metake.editor as editor_module
from metake import MetakeError
from metake.editor import Editor, resolve_method
from metake.hparams import MemitHparams
from metake.models.adapters import get_adapter
from metake.planners.metake import LOCALITY_PROMPTS, _joint_batch, lookahead_targets
from metake.planners.standard import (
    TargetPlan,
    base_hidden,
    build_planner_batch,
    mean_per_row,
    target_log_probs,
)
from metake.requests import parse_requests
from metake.solvers.alphaedit import alphaedit_delta, alphaedit_gate, null_space
from metake.solvers.memit import keys_and_values, memit_delta, memit_gate
from metake.solvers.rome import rome_delta, rome_gate
from metake.trace import add_low_rank

LAYER = 1
CONTEXTS = ["", "Some words. "]


def _problem(num_requests: int):
    """A float64 tiny Llama, parsed requests, their keys/values at LAYER, a C0 and a batch."""
    model = tiny_model("llama").double()
    tok = tiny_tokenizer()
    requests = parse_requests(REQUESTS[:num_requests])
    keys, values = keys_and_values(model, tok, requests, CONTEXTS, LAYER, LAYER)
    g = torch.Generator().manual_seed(3)
    a = torch.randn(keys.shape[1], 2 * keys.shape[1], generator=g, dtype=torch.float64)
    mom2 = a @ a.T / a.shape[1]
    batch = build_planner_batch(tok, requests, CONTEXTS, "{} is a").batch
    targets = values.double() + 0.5 * torch.randn(values.shape, generator=g, dtype=torch.float64)
    return model, requests, keys.double(), values.double(), mom2, batch, targets


def _edit_nll(model, batch) -> torch.Tensor:
    """Mean target NLL over the batch's rewriting rows (a scalar meta-loss stand-in)."""
    adapter = get_adapter(model)
    logp = target_log_probs(model, adapter, base_hidden(model, batch), batch)
    return -mean_per_row(logp, batch.target_rows, batch.input_ids.shape[0]).mean()


def _gates(keys, mom2):
    """Each solver's gate and its closed-form update as a function of the residuals."""
    ns = null_space(mom2, 0.5, relative=True)
    prev = 0.3 * mom2
    return {
        "memit": (memit_gate(keys, mom2, 7.0), lambda r: memit_delta(keys, r, mom2, 7.0)),
        "alphaedit": (
            alphaedit_gate(keys, ns.projector, prev, 2.0),
            lambda r: alphaedit_delta(keys, r, ns.projector, prev, 2.0),
        ),
        "rome": (
            rome_gate(keys, mom2),
            lambda r: sum(rome_delta(k, ri, mom2) for k, ri in zip(keys, r, strict=True)),
        ),
    }


@pytest.mark.parametrize("solver", ["memit", "alphaedit", "rome"])
@pytest.mark.parametrize("num_requests", [1, 2])
def test_proxy_gradient_equals_autograd_through_the_closed_form(solver, num_requests):
    """Task signal dL/dDelta times the gate M^T == d L(W + Delta*(V*)) / dV*, in float64."""
    model, _, keys, values, mom2, batch, targets = _problem(num_requests)
    gate, solve = _gates(keys, mom2)[solver]
    adapter = get_adapter(model)
    module = adapter.mlp_out(model, LAYER)
    weight_name = adapter.mlp_out_name(LAYER) + ".weight"
    weight = module.weight.detach()

    # (a) autograd through the solver's own closed form, the weight replaced functionally
    v_a = targets.clone().requires_grad_(True)
    delta = solve(v_a - values)  # [d_out, d_in]
    loss_a = _functional_nll(model, weight_name, weight + delta, batch)
    (grad_a,) = torch.autograd.grad(loss_a, v_a)

    # (b) the planner's path: the low-rank hook with the gate, autograd into V*
    v_b = targets.clone().requires_grad_(True)
    with add_low_rank(module, gate.T, v_b - values):
        loss_b = _edit_nll(model, batch)
    (grad_b,) = torch.autograd.grad(loss_b, v_b)

    # (c) the paper's Eq. 8 written out: task signal at Delta_proxy, times the gate
    delta_c = (solve(targets - values)).clone().requires_grad_(True)
    with add_low_rank(module, delta_c.T, torch.eye(delta_c.shape[0], dtype=torch.float64)):
        loss_c = _edit_nll(model, batch)
    (task_signal,) = torch.autograd.grad(loss_c, delta_c)  # [d_out, d_in]
    grad_c = gate @ task_signal.T  # [n, d_out]

    torch.testing.assert_close(loss_b, loss_a, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad_b, grad_a, rtol=1e-7, atol=1e-10)
    torch.testing.assert_close(grad_c, grad_a, rtol=1e-7, atol=1e-10)
    assert grad_a.abs().max() > 0


def _functional_nll(model, weight_name, weight, batch) -> torch.Tensor:
    adapter = get_adapter(model)
    out = functional_call(model.base_model, {weight_name.removeprefix("model."): weight}, (),
                          {"input_ids": batch.input_ids,
                           "attention_mask": batch.attention_mask})  # fmt: skip
    logp = target_log_probs(model, adapter, out[0], batch)
    return -mean_per_row(logp, batch.target_rows, batch.input_ids.shape[0]).mean()


def _independent_updates(keys, mom2, resid) -> dict[str, torch.Tensor]:
    """Each solver's update ``[d_out, d_in]`` from its defining problem, by least squares or an
    explicit inverse (no gate, no solver code): the same settings as :func:`_gates`."""
    values, vectors = torch.linalg.eigh(mom2)
    root = vectors @ torch.diag(values.sqrt()) @ vectors.T  # C0 = root root^T
    d_out, d_in = resid.shape[1], keys.shape[1]

    def stacked_lstsq(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """argmin_X ||X a - b||^2 (``a``: ``[p, m]``, ``b``: ``[q, m]``)."""
        return torch.linalg.lstsq(a.T, b.T).solution.T

    # MEMIT: min ||Delta K^T - R^T||^2 + lambda tr(Delta C0 Delta^T), lambda = 7
    memit = stacked_lstsq(
        torch.cat([keys.T, 7.0**0.5 * root], 1),
        torch.cat([resid.T, torch.zeros(d_out, d_in, dtype=resid.dtype)], 1),
    )
    # AlphaEdit: Delta = Y U^T on the null space U of C0 (relative threshold 0.5), minimising
    # ||Y U^T K^T - R^T||^2 + ||Y U^T K_prev||^2 + lambda_2 ||Y||^2 with C_prev = 0.3 C0, lambda_2 2
    basis = vectors[:, values < 0.5 * values.max()]  # [d_in, r]
    rank = basis.shape[1]
    zeros = torch.zeros(d_out, d_in + rank, dtype=resid.dtype)
    y = stacked_lstsq(torch.cat([basis.T @ keys.T, basis.T @ (0.3**0.5 * root),
                                 2.0**0.5 * torch.eye(rank, dtype=resid.dtype)], 1),
                      torch.cat([resid.T, zeros], 1))  # fmt: skip
    # ROME: per request the rank-one update with Delta k_i = r_i along C0^-1 k_i, summed
    c_inv = torch.linalg.inv(mom2)
    rome = sum(
        torch.outer(r, c_inv @ k) / (k @ c_inv @ k) for k, r in zip(keys, resid, strict=True)
    )
    return {"memit": memit, "alphaedit": y @ basis.T, "rome": rome}


def test_gates_reproduce_their_solvers_updates():
    """R^T M of each gate equals the update of the solver's own optimisation problem."""
    _, _, keys, values, mom2, _, targets = _problem(2)
    resid = targets - values
    expected = _independent_updates(keys, mom2, resid)
    for solver, (gate, solve) in _gates(keys, mom2).items():
        torch.testing.assert_close(resid.T @ gate, expected[solver], msg=solver)
        torch.testing.assert_close(solve(resid), expected[solver], msg=solver)


def _plan_for(model, tok, requests, hp, contexts) -> TargetPlan:
    _, values = keys_and_values(model, tok, requests, contexts, hp.layers[-1], hp.layers[-1])
    g = torch.Generator().manual_seed(5)
    target = values + torch.randn(values.shape, generator=g)
    return TargetPlan(hp.layers[-1], values, target, 0)


def test_lookahead_leaves_the_model_untouched_and_logs_every_step():
    model = tiny_model("llama")
    tok = tiny_tokenizer()
    requests = parse_requests(REQUESTS)
    hp = MemitHparams(layers=(0, 1), metake_steps=4, metake_lr=0.01)
    plan = _plan_for(model, tok, requests, hp, CONTEXTS)
    keys, _ = keys_and_values(model, tok, requests, CONTEXTS, 1, 1)
    gate = memit_gate(keys, torch.eye(keys.shape[1]), 1.0)
    state = _state(model)
    refined = lookahead_targets(model, tok, requests, plan, gate, hp, CONTEXTS)
    for name, value in model.state_dict().items():
        assert torch.equal(value, state[name]), name
    assert all(not m._forward_hooks for m in model.modules())
    assert [h["step"] for h in refined.history] == [0, 1, 2, 3, 4]
    assert set(refined.history[0]) == {"step", "edit_nll", "locality_kl", "reg", "loss"}
    assert refined.history[0]["reg"] == 0.0  # V* starts at Stage I's target
    assert not torch.equal(refined.v_target, plan.v_target)
    assert refined.history[-1]["loss"] < refined.history[0]["loss"]


@pytest.mark.parametrize("model_type", ["gpt2", "llama", "gpt_neox", "gemma3_text"])
@pytest.mark.parametrize("max_groups", [1, 3])
def test_lookahead_from_cached_lower_layers_and_in_groups_equals_the_plain_run(
    model_type, max_groups
):
    model, tok = tiny_model(model_type), tiny_tokenizer()
    requests = parse_requests(REQUESTS)
    hp = MemitHparams(layers=(1, 2), metake_steps=3, metake_lr=0.05)
    plan = _plan_for(model, tok, requests, hp, CONTEXTS)
    keys, _ = keys_and_values(model, tok, requests, CONTEXTS, 2, 2)
    gate = memit_gate(keys, torch.eye(keys.shape[1]), 1.0)
    plain = lookahead_targets(model, tok, requests, plan, gate, hp, CONTEXTS, max_groups=1,
                              skip_lower=False)  # fmt: skip
    fast = lookahead_targets(model, tok, requests, plan, gate, hp, CONTEXTS,
                             max_groups=max_groups, skip_lower=True)  # fmt: skip
    torch.testing.assert_close(fast.v_target, plain.v_target, rtol=1e-5, atol=1e-6)
    for a, b in zip(fast.history, plain.history, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)


def test_edit_term_on_the_bare_prompts_alone_reads_no_context_prefix():
    """``metake_edit_contexts=0`` (the paper's -log P(y_e | x_e)) is the look-ahead whose
    meta-loss sees the bare prompts only; the plan and the gate are Stage I's and the solver's,
    prefixes included."""
    model, tok = tiny_model("llama"), tiny_tokenizer()
    requests = parse_requests(REQUESTS)
    hp = MemitHparams(layers=(0, 1), metake_steps=3, metake_lr=0.05)
    plan = _plan_for(model, tok, requests, hp, CONTEXTS)
    keys, _ = keys_and_values(model, tok, requests, CONTEXTS, 1, 1)
    gate = memit_gate(keys, torch.eye(keys.shape[1]), 1.0)
    bare = lookahead_targets(model, tok, requests, plan, gate,
                             hp.with_overrides(metake_edit_contexts=0), CONTEXTS)  # fmt: skip
    alone = lookahead_targets(model, tok, requests, plan, gate, hp, [""])
    every = lookahead_targets(model, tok, requests, plan, gate, hp, CONTEXTS)
    torch.testing.assert_close(bare.v_target, alone.v_target)
    assert bare.history == alone.history
    assert bare.history[0]["edit_nll"] != pytest.approx(every.history[0]["edit_nll"])
    same = lookahead_targets(model, tok, requests, plan, gate,
                             hp.with_overrides(metake_edit_contexts=1), CONTEXTS)  # fmt: skip
    torch.testing.assert_close(same.v_target, every.v_target)  # CONTEXTS has one prefix


def test_zero_residual_means_no_locality_change():
    model = tiny_model("llama")
    tok = tiny_tokenizer()
    requests = parse_requests(REQUESTS)
    hp = MemitHparams(layers=(1,), metake_steps=0)
    plan = _plan_for(model, tok, requests, hp, CONTEXTS)
    plan.v_target = plan.v_init.clone()  # V* = Z: the virtual update is zero
    keys, _ = keys_and_values(model, tok, requests, CONTEXTS, 1, 1)
    gate = memit_gate(keys, torch.eye(keys.shape[1]), 1.0)
    refined = lookahead_targets(model, tok, requests, plan, gate, hp, CONTEXTS)
    assert refined.history[0]["locality_kl"] == pytest.approx(0.0, abs=1e-6)
    assert refined.history[0]["reg"] == 0.0


def test_locality_set_is_subject_prompts_and_generic_prompts():
    tok = tiny_tokenizer()
    requests = parse_requests(REQUESTS)
    planner, locality = _joint_batch(tok, requests, CONTEXTS, "{} is a", LOCALITY_PROMPTS[:3])
    assert locality.num_prompts == len(requests) + 3
    batch = planner.batch
    for j, row in enumerate(planner.kl_rows().tolist()):  # subject prompts: from the subject on
        positions = locality.positions[locality.prompt_of_position == j].tolist()
        length = int(batch.attention_mask[row].sum())
        assert positions == list(range(int(batch.subject_last[row]), length))
    for j, prompt in enumerate(LOCALITY_PROMPTS[:3]):  # generic prompts: every position
        mine = locality.prompt_of_position == len(requests) + j
        rows = set(locality.rows[mine].tolist())
        assert len(rows) == 1
        assert locality.positions[mine].tolist() == list(range(int(mine.sum())))
        ids = batch.input_ids[rows.pop(), : int(mine.sum())].tolist()
        assert ids == tok(prompt, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("solver", ["memit", "alphaedit", "rome"])
def test_metake_without_steps_is_the_plain_solver(solver, tmp_path):
    """With zero look-ahead steps V* is Stage I's target, so the edit equals the solver's own."""
    plain = _editor(tiny_model("llama"), tmp_path, method=solver).edit(REQUESTS)
    meta = _editor(tiny_model("llama"), tmp_path, method="metake", solver=solver,
                   metake_steps=0).edit(REQUESTS)  # fmt: skip
    assert meta.report.solver == solver and meta.report.method == "metake"
    assert len(meta.report.lookahead_history) == (2 if solver == "rome" else 1)
    for name, delta in plain.deltas.items():
        torch.testing.assert_close(meta.deltas[name], delta)


@pytest.mark.parametrize("solver", ["memit", "alphaedit"])
def test_metake_never_mutates_weights_before_the_final_solve(solver, tmp_path, monkeypatch):
    model = tiny_model("llama")
    editor = _editor(model, tmp_path, method="metake", solver=solver, metake_lr=0.05)
    original = _state(model)
    real_layer_solve = editor.layer_solve
    seen = []

    def checked_layer_solve(*args):
        solve = real_layer_solve(*args)

        def checked(*args, **kwargs):
            if not seen:  # the first layer's solve: nothing may have changed yet
                for name, value in model.state_dict().items():
                    assert torch.equal(value, original[name]), f"{name} changed before the solve"
            seen.append(True)
            return solve(*args, **kwargs)

        return checked

    monkeypatch.setattr(editor, "layer_solve", checked_layer_solve)
    result = editor.edit(REQUESTS)
    assert seen and result.report.seconds_lookahead > 0
    history = result.report.lookahead_history
    assert len(history) == editor.hparams.metake_steps + 1
    assert len(result.report.lookahead_target_prob) == len(REQUESTS)
    assert any(not torch.equal(v, original[k]) for k, v in model.state_dict().items())
    editor.restore()
    for name, value in model.state_dict().items():
        assert torch.equal(value, original[name]), name


def test_metake_refines_targets_of_a_sequential_alphaedit_session(tmp_path, monkeypatch):
    """Second batch: the gate uses the key cache of the first, and the refined V* differs."""
    model = tiny_model("llama")
    editor = _editor(model, tmp_path, method="metake", solver="alphaedit", metake_lr=0.05,
                     nullspace_threshold=0.5, nullspace_relative=True)  # fmt: skip
    editor.edit(REQUESTS[:1])
    assert editor.stage2.base.prev_keys_cov  # the cache the next gate must use
    keys = torch.randn(1, 64, dtype=torch.float64)
    hp = editor.hparams
    cache = editor.stage2.base.prev_keys_cov[1]
    expected = alphaedit_gate(keys, editor.null_space(1).projector, cache, hp.alphaedit_lambda)
    torch.testing.assert_close(editor.gate(1, keys), expected)
    fresh = alphaedit_gate(keys, editor.null_space(1).projector, torch.zeros(64, 64),
                           hp.alphaedit_lambda)  # fmt: skip
    assert not torch.allclose(editor.gate(1, keys), fresh)
    plans = []
    real_plan = editor._plan

    def recording_plan(*args, **kwargs):
        plans.append(real_plan(*args, **kwargs))
        return plans[-1]

    monkeypatch.setattr(editor, "_plan", recording_plan)
    result = editor.edit(REQUESTS[1:])
    assert result.report.lookahead_history
    ((plan, refined, _),) = plans
    assert refined is not None and refined.v_target.shape == plan.v_target.shape
    moved = (refined.v_target - plan.v_target.to(refined.v_target)).norm(dim=-1)
    assert (moved > 1e-4 * plan.v_target.norm(dim=-1)).all()  # every request's V* refined


def test_method_and_solver_are_checked(tmp_path):
    assert resolve_method("metake") == ("metake", "alphaedit")
    assert resolve_method("metake", "rome") == ("metake", "rome")
    assert resolve_method("memit") == ("memit", "memit")
    with pytest.raises(MetakeError, match="unknown solver"):
        resolve_method("metake", "fast")
    with pytest.raises(MetakeError, match="for metake methods only"):
        resolve_method("memit", "alphaedit")
    with pytest.raises(MetakeError, match="unknown method"):
        Editor(tiny_model("llama"), tiny_tokenizer(), "meta")
    assert "metake" in editor_module.METHODS


@pytest.mark.parametrize(
    "bad",
    [
        {"metake_steps": -1},
        {"metake_lr": 0.0},
        {"metake_locality_weight": -0.5},
        {"metake_edit_contexts": -1},
    ],
)
def test_bad_metake_hparams_are_rejected(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        MemitHparams(layers=(1,), **bad)
