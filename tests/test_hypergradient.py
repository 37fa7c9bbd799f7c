"""The exact hypergradient through the multi-layer solver, against the solver itself.

``spread_updates`` replays Stage II differentiably; its gradient is checked against central finite
differences of the meta-loss after the *real* solver (``apply_spread`` with the solvers' own
update functions) wrote its weights, in float64. With one edit layer the exact hypergradient
must equal the structural proxy's.
"""

from __future__ import annotations

from contextlib import nullcontext
from functools import partial

import pytest
import torch
from test_editor import REQUESTS, _editor, _state
from tiny_models import tiny_model, tiny_tokenizer

from metake import MetakeError
from metake.evaluation.bench import method_spec
from metake.hparams import MemitHparams
from metake.models.adapters import get_adapter
from metake.planners.hypergradient import ProxyChannel, SpreadChannel, spread_updates
from metake.planners.metake import LOCALITY_PROMPTS, MetaObjective
from metake.requests import parse_requests
from metake.solvers.alphaedit import alphaedit_delta, alphaedit_gate, null_space
from metake.solvers.memit import (
    apply_spread,
    keys_and_values,
    memit_delta,
    memit_gate,
    subject_activations,
)

CONTEXTS = ["", "Some words. "]
LAYERS = (0, 1, 2)
DEEP = {"num_layers": 6, "layers": (1, 2, 4)}
"""Edit layers above layer 0 with a gap: the replay starts from cached lower layers and each
layer's forward from the residual stream that the previous one passed (``spread_updates``)."""


def _dense(updates):
    """``{layer: Delta [d_out, d_in]}`` from factored updates."""
    return {layer: update.dense() for layer, update in updates.items()}


def _moments(dim: int) -> dict[int, torch.Tensor]:
    """A random positive definite C0 per layer (``[dim, dim]``, float64)."""
    g = torch.Generator().manual_seed(11)
    out = {}
    for layer in range(DEEP["num_layers"]):
        a = torch.randn(dim, 2 * dim, generator=g, dtype=torch.float64)
        out[layer] = a @ a.T / a.shape[1]
    return out


def _solvers(dim: int):
    """Per solver: its gate ``(layer, keys) -> M`` and its own update ``(layer, K, R) -> Delta``."""
    mom2 = _moments(dim)
    projector = {layer: null_space(c, 0.5, relative=True).projector for layer, c in mom2.items()}
    prev = {layer: 0.2 * c for layer, c in mom2.items()}
    return {
        "memit": (
            lambda layer, k, _bare=None: memit_gate(k, mom2[layer], 3.0),
            lambda layer, k, r: memit_delta(k, r, mom2[layer], 3.0),
        ),
        "alphaedit": (
            lambda layer, k, _bare=None: alphaedit_gate(k, projector[layer], prev[layer], 0.5),
            lambda layer, k, r: alphaedit_delta(k, r, projector[layer], prev[layer], 0.5),
        ),
    }


def _setup(layers=LAYERS, model_type="gpt2", num_layers=None):
    """A float64 tiny model (GPT-2's norms, unlike Llama's or Gemma's, stay in float64),
    requests, targets at the last layer and the meta-objective."""
    model = tiny_model(model_type, num_layers=num_layers).double()
    tok = tiny_tokenizer()
    requests = parse_requests(REQUESTS)
    _, values = keys_and_values(model, tok, requests, CONTEXTS, layers[-1], layers[-1])
    g = torch.Generator().manual_seed(4)
    targets = values + 0.3 * torch.randn(values.shape, generator=g, dtype=torch.float64)
    hp = MemitHparams(layers=layers, metake_reg_weight=0.5)
    objective = MetaObjective(model, tok, requests, targets, hp, CONTEXTS, LOCALITY_PROMPTS[:3])
    return model, tok, requests, values, targets, objective


def _loss_after_solver(objective, tok, requests, v, solve) -> float:
    """Meta-loss after the real solver wrote its update for targets ``v``; weights restored."""
    model, adapter, layers = objective.model, objective.adapter, objective.hparams.layers
    before = {layer: adapter.weight(model, layer).detach().clone() for layer in layers}
    try:
        apply_spread(model, tok, requests, v, layers, CONTEXTS, solve)
        with torch.no_grad():
            loss, _, _ = objective(v, lambda _v: nullcontext())  # no virtual edit
        return float(loss)
    finally:
        for layer, weight in before.items():
            adapter.set_weight(model, layer, weight)


@pytest.mark.parametrize("shape", ["shallow", "deep"])
@pytest.mark.parametrize("solver", ["memit", "alphaedit"])
def test_spread_updates_equal_the_solvers_updates(solver, shape):
    extra = DEEP if shape == "deep" else {}
    model, tok, requests, _, targets, _ = _setup(**extra)
    layers = extra.get("layers", LAYERS)
    dim = get_adapter(model).weight(model, 0).shape[1]
    gate, solve = _solvers(dim)[solver]
    state = _state(model)
    virtual = _dense(spread_updates(model, tok, requests, targets, layers, CONTEXTS, gate))
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())  # untouched
    real = apply_spread(model, tok, requests, targets, layers, CONTEXTS, solve)
    for layer in layers:
        torch.testing.assert_close(virtual[layer].detach().float(), real[layer], rtol=1e-5,
                                   atol=1e-7)  # fmt: skip


@pytest.mark.parametrize("shape", ["shallow", "deep"])
@pytest.mark.parametrize("solver", ["memit", "alphaedit"])
def test_exact_hypergradient_matches_finite_differences_of_the_real_solver(solver, shape):
    extra = DEEP if shape == "deep" else {}
    model, tok, requests, _, targets, objective = _setup(**extra)
    dim = get_adapter(model).weight(model, 0).shape[1]
    gate, solve = _solvers(dim)[solver]
    channel = SpreadChannel(model, tok, requests, extra.get("layers", LAYERS), CONTEXTS, gate)
    for _ in range(2):  # the second call reuses what does not depend on v* (SpreadStart)
        v = targets.clone().requires_grad_(True)
        loss, _, _ = objective(v, channel)
        (grad,) = torch.autograd.grad(loss, v)
    after_solver = _loss_after_solver(objective, tok, requests, targets, solve)
    assert loss.item() == pytest.approx(after_solver, rel=1e-9)
    g = torch.Generator().manual_seed(8)
    eps = 1e-4
    for _ in range(3):
        direction = torch.randn(targets.shape, generator=g, dtype=torch.float64)
        up = _loss_after_solver(objective, tok, requests, targets + eps * direction, solve)
        down = _loss_after_solver(objective, tok, requests, targets - eps * direction, solve)
        numeric = (up - down) / (2 * eps)
        assert float((grad * direction).sum()) == pytest.approx(numeric, rel=1e-5, abs=1e-9)


@pytest.mark.parametrize("solver", ["memit", "alphaedit"])
def test_exact_equals_proxy_when_one_layer_is_edited(solver):
    layer = 1
    model, tok, requests, values, targets, objective = _setup(layers=(layer,))
    dim = get_adapter(model).weight(model, 0).shape[1]
    gate, _ = _solvers(dim)[solver]
    keys, _ = keys_and_values(model, tok, requests, CONTEXTS, layer, layer)
    module = get_adapter(model).mlp_out(model, layer)
    proxy = ProxyChannel(module, layer, gate(layer, keys), values)
    exact = SpreadChannel(model, tok, requests, [layer], CONTEXTS, gate)
    grads, losses = [], []
    for channel in (proxy, exact):
        v = targets.clone().requires_grad_(True)
        loss, _, _ = objective(v, channel)
        grads.append(torch.autograd.grad(loss, v)[0])
        losses.append(loss.item())
    assert losses[0] == pytest.approx(losses[1], rel=1e-10)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-8, atol=1e-12)


def test_gemma3_virtual_updates_and_one_layer_proxy_go_through_the_post_mlp_norm():
    """On Gemma3 (a norm after the MLP) the virtual updates still equal the real solver's, and
    with one edit layer the proxy, which maps its residual through that norm, equals the exact
    channel (float32 norms, so looser tolerances than GPT-2's float64)."""
    model, tok, requests, values, targets, objective = _setup(model_type="gemma3_text")
    dim = get_adapter(model).weight(model, 0).shape[1]
    gate, solve = _solvers(dim)["memit"]
    virtual = _dense(spread_updates(model, tok, requests, targets, LAYERS, CONTEXTS, gate))
    state = _state(model)
    real = apply_spread(model, tok, requests, targets, LAYERS, CONTEXTS, solve)
    for layer in LAYERS:
        torch.testing.assert_close(virtual[layer].detach(), real[layer].double(), rtol=1e-4,
                                   atol=1e-6)  # fmt: skip
    model.load_state_dict(state)
    layer = 2
    acts = subject_activations(model, tok, requests, CONTEXTS, [layer], layer)
    adapter = get_adapter(model)
    module = adapter.mlp_out(model, layer)
    to_projection = partial(adapter.residual_to_projection, model, layer,
                            outputs=acts.projections[layer])  # fmt: skip
    proxy = ProxyChannel(module, layer, gate(layer, acts.keys[layer]), values, to_projection)
    exact = SpreadChannel(model, tok, requests, [layer], CONTEXTS, gate)
    losses = [objective(targets, channel)[0].item() for channel in (proxy, exact)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    unscaled = ProxyChannel(module, layer, gate(layer, acts.keys[layer]), values)
    assert objective(targets, unscaled)[0].item() != pytest.approx(losses[1], rel=1e-3)


def test_exact_and_proxy_differ_over_several_layers():
    model, tok, requests, values, targets, objective = _setup()
    dim = get_adapter(model).weight(model, 0).shape[1]
    gate, _ = _solvers(dim)["memit"]
    keys, _ = keys_and_values(model, tok, requests, CONTEXTS, LAYERS[-1], LAYERS[-1])
    module = get_adapter(model).mlp_out(model, LAYERS[-1])
    proxy = ProxyChannel(module, LAYERS[-1], gate(LAYERS[-1], keys), values)
    exact = SpreadChannel(model, tok, requests, LAYERS, CONTEXTS, gate)
    grads = []
    for channel in (proxy, exact):
        v = targets.clone().requires_grad_(True)
        grads.append(torch.autograd.grad(objective(v, channel)[0], v)[0])
    assert not torch.allclose(grads[0], grads[1], rtol=1e-3)


def test_metake_exact_session_edits_and_reports_its_lookahead(tmp_path):
    model = tiny_model("llama")
    state = _state(model)
    exact = _editor(model, tmp_path, method="metake_exact", solver="memit", metake_steps=2)
    assert exact.hparams.metake_hypergradient == "exact"
    result = exact.edit(REQUESTS)
    assert [h["step"] for h in result.report.lookahead_history] == [0, 1, 2]
    assert result.report.seconds_lookahead > 0
    exact_deltas = {k: v.clone() for k, v in result.deltas.items()}
    exact.restore()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    proxy = _editor(model, tmp_path, method="metake", solver="memit", metake_steps=2)
    proxy_deltas = proxy.edit(REQUESTS).deltas
    assert any(not torch.allclose(exact_deltas[k], proxy_deltas[k]) for k in exact_deltas)


def test_metake_exact_names_and_errors(tmp_path):
    assert method_spec("metake_exact", "alphaedit") == ("metake_exact", "alphaedit")
    assert method_spec("metake_exact+memit", "alphaedit") == ("metake_exact", "memit")
    with pytest.raises(MetakeError, match="metake_exact"):
        _editor(tiny_model("llama"), tmp_path, method="metake_exact",
                metake_hypergradient="proxy")  # fmt: skip
    with pytest.raises(ValueError, match="metake_hypergradient"):
        MemitHparams(layers=(0,), metake_hypergradient="approximate")


@pytest.mark.parametrize("max_rows", [1, 3, 100])
@pytest.mark.parametrize("kind", ["proxy", "exact"])
def test_group_by_group_backward_equals_autograd_of_the_whole_loss(kind, max_rows):
    """``MetaObjective.evaluate`` back-propagates one row group at a time (the memory bound of
    the look-ahead); its accumulated gradient and loss equal autograd of the joint loss."""
    model, tok, requests, values, targets, _ = _setup()
    dim = get_adapter(model).weight(model, 0).shape[1]
    gate, _ = _solvers(dim)["alphaedit"]
    hp = MemitHparams(layers=LAYERS, metake_reg_weight=0.5)
    objective = MetaObjective(model, tok, requests, targets, hp, CONTEXTS, LOCALITY_PROMPTS[:3],
                              max_rows=max_rows)  # fmt: skip
    if kind == "proxy":
        keys, _ = keys_and_values(model, tok, requests, CONTEXTS, LAYERS[-1], LAYERS[-1])
        module = get_adapter(model).mlp_out(model, LAYERS[-1])
        channel = ProxyChannel(module, LAYERS[-1], gate(LAYERS[-1], keys), values)
    else:
        channel = SpreadChannel(model, tok, requests, LAYERS, CONTEXTS, gate)
    v = (targets + 0.1).requires_grad_(True)
    loss, nll, _ = objective(v, channel)
    (expected,) = torch.autograd.grad(loss, v)
    v_acc = (targets + 0.1).requires_grad_(True)
    got_loss, got_nll, terms = objective.evaluate(v_acc, channel)
    assert got_loss.item() == pytest.approx(loss.item(), rel=1e-10)
    torch.testing.assert_close(got_nll, nll.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(v_acc.grad, expected, rtol=1e-8, atol=1e-12)
    assert terms["loss"] == pytest.approx(loss.item(), rel=1e-10)
    if max_rows == 1:
        assert len(objective.groups) > 4  # really cut into pieces


@pytest.mark.parametrize("shape", ["shallow", "deep"])
def test_frozen_updates_equal_the_replay_at_its_targets_and_differentiate_its_direct_part(shape):
    """Held at a replay, the spread's updates equal the replay's at its own targets; their
    gradient there is the replay's direct part (keys, gates and values as constants), and away
    from it they are linear in the targets."""
    from metake.planners.hypergradient import frozen_updates

    extra = DEEP if shape == "deep" else {}
    model, tok, requests, _, targets, objective = _setup(**extra)
    layers = extra.get("layers", LAYERS)
    dim = get_adapter(model).weight(model, 0).shape[1]
    gate, _ = _solvers(dim)["alphaedit"]
    record = []
    replayed = spread_updates(model, tok, requests, targets, layers, CONTEXTS, gate,
                              record=record)  # fmt: skip
    assert [r.layer for r in record] == list(layers)
    held = frozen_updates(model, record, targets)
    for layer in layers:
        torch.testing.assert_close(held[layer].dense(), replayed[layer].dense().detach(),
                                   rtol=1e-12, atol=1e-14)  # fmt: skip
    g = torch.Generator().manual_seed(5)
    weights = {layer: torch.randn(held[layer].dense().shape, generator=g, dtype=torch.float64)
               for layer in layers}  # fmt: skip

    def score(updates):
        return sum((u.dense() * weights[layer]).sum() for layer, u in updates.items())

    v = targets.clone().requires_grad_(True)
    (frozen_grad,) = torch.autograd.grad(score(frozen_updates(model, record, v)), v)
    v = targets.clone().requires_grad_(True)
    direct = spread_updates(model, tok, requests, v, layers, CONTEXTS, gate, direct_only=True)
    (direct_grad,) = torch.autograd.grad(score(direct), v)
    torch.testing.assert_close(frozen_grad, direct_grad, rtol=1e-10, atol=1e-12)
    step = 0.1 * torch.randn(targets.shape, generator=g, dtype=torch.float64)
    there = score(frozen_updates(model, record, targets + step)) - score(held)
    twice = score(frozen_updates(model, record, targets + 2 * step)) - score(held)
    assert float(twice) == pytest.approx(2 * float(there), rel=1e-9)  # linear in the targets


def test_spread_channel_replays_every_k_calls(monkeypatch):
    """``replay_every=3``: the solver is replayed at calls 0 and 3, the calls in between take the
    held updates; 1 (the default) replays at every call."""
    import metake.planners.hypergradient as hg

    model, tok, requests, _, targets, _ = _setup()
    dim = get_adapter(model).weight(model, 0).shape[1]
    gate, _ = _solvers(dim)["memit"]
    replays = []
    real = hg.spread_updates
    monkeypatch.setattr(hg, "spread_updates", lambda *a, **k: replays.append(1) or real(*a, **k))
    for every, expected in ((3, 2), (1, 5)):
        replays.clear()
        channel = SpreadChannel(model, tok, requests, LAYERS, CONTEXTS, gate, replay_every=every)
        first = _dense(channel.updates(targets))
        second = _dense(channel.updates(targets))  # held (k = 3) or replayed: the same here
        for layer in LAYERS:
            torch.testing.assert_close(second[layer], first[layer], rtol=1e-12, atol=1e-14)
        for _ in range(3):
            channel.updates(targets + 0.05)
        assert len(replays) == expected
    with pytest.raises(ValueError, match="replay_every"):
        SpreadChannel(model, tok, requests, LAYERS, CONTEXTS, gate, replay_every=0)
    with pytest.raises(ValueError, match="metake_replay_every"):
        MemitHparams(layers=(0,), metake_replay_every=0)


def test_metake_exact_session_with_held_replays_edits_deterministically(tmp_path):
    """``metake_replay_every=2`` through the editor: the look-ahead runs every step, the result
    is reproducible and differs from replaying at every step."""
    model = tiny_model("llama")
    results = []
    for every in (2, 2, 1):
        editor = _editor(model, tmp_path, method="metake_exact", solver="memit", metake_steps=3,
                         metake_lr=0.5, metake_replay_every=every)  # fmt: skip
        result = editor.edit(REQUESTS)
        assert [h["step"] for h in result.report.lookahead_history] == [0, 1, 2, 3]
        results.append({k: v.clone() for k, v in result.deltas.items()})
        editor.restore()
    assert all(torch.equal(results[0][k], results[1][k]) for k in results[0])
    assert any(not torch.allclose(results[0][k], results[2][k]) for k in results[0])
