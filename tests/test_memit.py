"""MEMIT Stage II: the closed form against independent solves; the layer loop on tiny models."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_model, tiny_tokenizer

from metake.models.adapters import get_adapter
from metake.requests import EditRequest
from metake.solvers.memit import (
    apply_memit,
    keys_and_values,
    lower_layers,
    memit_delta,
    subject_activations,
)
from metake.tokens import encode_request
from metake.trace import capture


def _random_problem(n=5, d_in=12, d_out=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(n, d_in, generator=g, dtype=torch.float64)
    resid = torch.randn(n, d_out, generator=g, dtype=torch.float64)
    a = torch.randn(d_in, 3 * d_in, generator=g, dtype=torch.float64)
    mom2 = a @ a.T / a.shape[1]  # a positive-definite second moment
    return keys, resid, mom2


@pytest.mark.parametrize("lam", [1e-3, 1.0, 1e4])
def test_memit_delta_equals_least_squares(lam):
    """Delta minimises ||Delta K^T - R^T||^2 + lam * tr(Delta C0 Delta^T): an augmented lstsq."""
    keys, resid, mom2 = _random_problem()
    chol = torch.linalg.cholesky(mom2)  # C0 = L L^T
    design = torch.cat([keys, lam**0.5 * chol.T])  # [n + d_in, d_in]
    rhs = torch.cat([resid, torch.zeros(chol.shape[0], resid.shape[1], dtype=torch.float64)])
    expected = torch.linalg.lstsq(design, rhs).solution.T  # [d_out, d_in]
    got = memit_delta(keys, resid, mom2, lam)
    assert got.dtype == torch.float64 and got.shape == (resid.shape[1], keys.shape[1])
    torch.testing.assert_close(got, expected, rtol=1e-8, atol=1e-10)


def test_memit_delta_satisfies_normal_equations():
    keys, resid, mom2 = _random_problem(n=7, d_in=20, d_out=6, seed=1)
    lam = 15.0
    delta = memit_delta(keys.float(), resid.float(), mom2, lam)
    lhs = delta @ (lam * mom2 + keys.T @ keys)
    torch.testing.assert_close(lhs, resid.T @ keys, rtol=1e-6, atol=1e-6)


def test_memit_delta_small_lambda_hits_the_residuals():
    keys, resid, mom2 = _random_problem(n=4, d_in=16, d_out=8, seed=2)
    delta = memit_delta(keys, resid, mom2, 1e-9)
    torch.testing.assert_close(keys @ delta.T, resid, rtol=1e-5, atol=1e-5)


REQUESTS = [
    EditRequest("{} lives in", "Anna Berg", "Oslo"),
    EditRequest("The home of {} is", "Carl Dunn", "Lima"),
]


@pytest.mark.parametrize("model_type", ["gpt2", "llama", "gpt_neox"])
@pytest.mark.parametrize("layers", [(1,), (0, 1)])
def test_apply_memit_reaches_the_targets(model_type, layers):
    """With a tiny lambda and no context prefixes, the last layer's values become the targets."""
    torch.manual_seed(0)
    model, tok = tiny_model(model_type), tiny_tokenizer()
    contexts = [""]
    last = layers[-1]
    _, values = keys_and_values(model, tok, REQUESTS, contexts, last, last)
    targets = values + 0.5 * torch.randn_like(values)
    d_in = get_adapter(model).weight(model, 0).shape[1]
    identity = torch.eye(d_in, dtype=torch.float64)
    deltas = apply_memit(
        model, tok, REQUESTS, targets, layers, lambda _layer: identity, 1e-8, contexts
    )
    assert sorted(deltas) == list(layers)
    _, after = keys_and_values(model, tok, REQUESTS, contexts, last, last)
    torch.testing.assert_close(after, targets, rtol=1e-3, atol=1e-3)


def test_apply_memit_changes_only_the_edit_layers():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    contexts = ["", "Some context. "]
    _, values = keys_and_values(model, tok, REQUESTS, contexts, 1, 1)
    d_in = get_adapter(model).weight(model, 0).shape[1]
    apply_memit(model, tok, REQUESTS, values + 1.0, [1], lambda _l: torch.eye(d_in), 1.0, contexts)
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert changed == ["model.layers.1.mlp.down_proj.weight"]


def test_one_forward_for_several_layers_equals_one_per_layer():
    model, tok = tiny_model("gpt2"), tiny_tokenizer()
    contexts = ["", "Some context. "]
    keys, values, projections, _ = subject_activations(model, tok, REQUESTS, contexts, [0, 1, 2], 2)
    adapter = get_adapter(model)
    for layer in (0, 1, 2):
        one_keys, one_values = keys_and_values(model, tok, REQUESTS, contexts, layer, 2)
        torch.testing.assert_close(keys[layer], one_keys)
        torch.testing.assert_close(values, one_values)
        # the projection's output is its key (the plain prompt's, not the average) times W^T
        plain = subject_activations(model, tok, REQUESTS, [""], [layer], 2).keys[layer]
        bias = adapter.mlp_out(model, layer).bias
        expected = plain @ adapter.weight(model, layer).T + bias
        torch.testing.assert_close(projections[layer], expected, rtol=1e-4, atol=1e-5)


def _gemma_spread_miss(monkeypatch=None) -> float:
    """Relative miss ``|z' - v*| / |v* - z|`` of a 3-layer MEMIT edit on a tiny Gemma3."""
    torch.manual_seed(0)
    model, tok = tiny_model("gemma3_text"), tiny_tokenizer()
    _, values = keys_and_values(model, tok, REQUESTS, [""], 2, 2)
    targets = values + 0.5 * torch.randn_like(values)
    identity = torch.eye(get_adapter(model).weight(model, 0).shape[1], dtype=torch.float64)
    apply_memit(model, tok, REQUESTS, targets, [0, 1, 2], lambda _l: identity, 1e-8, [""])
    _, after = keys_and_values(model, tok, REQUESTS, [""], 2, 2)
    return float((after - targets).norm() / (targets - values).norm())


def test_apply_memit_reaches_gemma3_targets_through_the_post_mlp_norm(monkeypatch):
    """Gemma3 normalises the MLP output: with the residual mapped through that norm the edit
    lands near the targets; adding the residual to the projection as it is overshoots."""
    assert _gemma_spread_miss() < 0.15
    adapter_type = type(get_adapter(tiny_model("gemma3_text")))
    monkeypatch.setattr(adapter_type, "residual_to_projection", lambda *args: args[3])
    assert _gemma_spread_miss() > 1.0


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_keys_average_each_context_type_first_as_memit_compute_ks(family):
    """Key = 1/2 bare-prompt key + 1/2 mean of the prefixed prompts' keys (MEMIT's compute_ks).

    Each prompt's key is computed alone here (one context per call), so the weighting is checked
    against an independent average, not against the code's own mean.
    """
    model, tok = tiny_model(family), tiny_tokenizer()
    prefixed = ["Some context. ", "Other words here. ", "A third one. "]
    acts = subject_activations(model, tok, REQUESTS, ["", *prefixed], [1], 1)
    one = [subject_activations(model, tok, REQUESTS, [""], [1], 1).keys[1]]
    for context in prefixed:  # a context alone: prefix the prompt template by hand
        shifted = [EditRequest(context + r.prompt, r.subject, r.target_new) for r in REQUESTS]
        one.append(subject_activations(model, tok, shifted, [""], [1], 1).keys[1])
    expected = 0.5 * one[0] + 0.5 * torch.stack(one[1:]).mean(0)
    torch.testing.assert_close(acts.keys[1], expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(acts.bare_keys[1], one[0], rtol=1e-4, atol=1e-5)
    plain_mean = torch.stack(one).mean(0)  # ROME's flat average (1/4 each here)
    assert (acts.keys[1] - plain_mean).abs().max() > 1e-3
    rome = subject_activations(model, tok, REQUESTS, ["", *prefixed], [1], 1, key_average="plain")
    torch.testing.assert_close(rome.keys[1], plain_mean, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("model_type", ["gpt2", "llama", "gemma3_text", "gpt_neox"])
def test_replaying_the_layers_below_gives_the_same_activations(model_type):
    """Keys, values and projections read after skipping the layers below (their output cached
    once) equal a full forward, also after an edit of the layers above."""
    model, tok = tiny_model(model_type), tiny_tokenizer()
    contexts = ["", "Some words here. "]
    lower = lower_layers(model, tok, REQUESTS, contexts, 1)
    adapter = get_adapter(model)
    with torch.no_grad():
        weight = adapter.weight(model, 2)
        adapter.set_weight(model, 2, weight + 0.01 * torch.randn_like(weight))
    full = subject_activations(model, tok, REQUESTS, contexts, [1, 2], 2)
    fast = subject_activations(model, tok, REQUESTS, contexts, [1, 2], 2, lower=lower)
    for layer in (1, 2):
        torch.testing.assert_close(fast.keys[layer], full.keys[layer], rtol=0, atol=0)
        torch.testing.assert_close(fast.projections[layer], full.projections[layer], rtol=0, atol=0)
    torch.testing.assert_close(fast.values, full.values, rtol=0, atol=0)
    with pytest.raises(ValueError, match="below the cached layer"):
        subject_activations(model, tok, REQUESTS, contexts, [0], 2, lower=lower)


@pytest.mark.parametrize("model_type", ["gpt2", "llama", "gemma3_text"])
def test_activations_read_at_the_subject_equal_a_forward_of_the_whole_prompt(model_type):
    """``subject_activations`` cuts each prompt after the subject's last token; what it reads
    there equals the same position of a forward of the whole prompt, one prompt at a time."""
    model, tok = tiny_model(model_type), tiny_tokenizer()
    adapter = get_adapter(model)
    requests = [EditRequest("{} is a friend of the band", "Bob", "x"), *REQUESTS]
    acts = subject_activations(model, tok, requests, [""], [1], 2)
    for i, request in enumerate(requests):
        encoded = encode_request(tok, request, "", with_target=False)
        if i == 0:  # this prompt goes on after its subject: the cut matters
            assert encoded.subject_last + 1 < len(encoded.input_ids)
        names = [adapter.mlp_out_name(1), adapter.layer_name(2)]
        with torch.no_grad(), capture(model, names) as seen:
            model(input_ids=torch.tensor([encoded.input_ids]))
        at = encoded.subject_last
        torch.testing.assert_close(acts.keys[1][i], seen.inputs[names[0]][0, at],
                                   rtol=1e-5, atol=1e-6)  # fmt: skip
        torch.testing.assert_close(acts.values[i], seen.outputs[names[1]][0, at],
                                   rtol=1e-5, atol=1e-6)  # fmt: skip


@pytest.mark.parametrize("model_type", ["gpt2", "llama", "gemma3_text"])
@pytest.mark.parametrize("rows", [1, 2, 5])
def test_activations_in_row_pieces_equal_one_forward_of_every_row(model_type, rows, monkeypatch):
    """Without a graph the prompts run in length-sorted pieces, each trimmed to its own length
    and replayed from its slice of the lower layers' cache; keys, values and projections come
    back in request order, equal to the single forward that the exact replay uses."""
    import metake.solvers.memit as memit

    model, tok = tiny_model(model_type), tiny_tokenizer()
    contexts = ["", "Some words here. ", "X. "]
    lower = lower_layers(model, tok, REQUESTS, contexts, 1)
    whole = subject_activations(model, tok, REQUESTS, contexts, [1, 2], 2, lower=lower,
                                track_grad=True)  # fmt: skip
    monkeypatch.setattr(memit, "ACTIVATION_ROWS", rows)
    for cache in (lower, None):
        pieces = subject_activations(model, tok, REQUESTS, contexts, [1, 2], 2, lower=cache)
        for layer in (1, 2):
            torch.testing.assert_close(pieces.keys[layer], whole.keys[layer].detach(),
                                       rtol=1e-4, atol=1e-5)  # fmt: skip
            torch.testing.assert_close(pieces.bare_keys[layer], whole.bare_keys[layer].detach(),
                                       rtol=1e-4, atol=1e-5)  # fmt: skip
            torch.testing.assert_close(
                pieces.projections[layer], whole.projections[layer].detach(), rtol=1e-4, atol=1e-5
            )
        torch.testing.assert_close(pieces.values, whole.values.detach(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("model_type", ["gpt2", "llama", "gemma3_text", "gpt_neox"])
@pytest.mark.parametrize("layers", [(0, 1, 2), (0, 2), (1, 2), (2,)])
@pytest.mark.parametrize("rows", [2, 128])
def test_spread_activations_equal_a_full_forward_along_memit_loop(model_type, layers, rows,
                                                                   monkeypatch):  # fmt: skip
    """Along MEMIT's loop (edit a layer, read the next), the cheaper reads (every prompt only up
    to the key layer, from the stream where the layer edited before begins; the bare prompts
    alone on to the value layer) equal a full forward of every prompt at every layer."""
    import metake.solvers.memit as memit
    from metake.solvers.memit import spread_activations

    monkeypatch.setattr(memit, "ACTIVATION_ROWS", rows)
    model, tok = tiny_model(model_type), tiny_tokenizer()
    adapter = get_adapter(model)
    contexts = ["", "Some words here. ", "X. "]
    last = layers[-1]
    lower = lower_layers(model, tok, REQUESTS, contexts, layers[0])
    g = torch.Generator().manual_seed(0)
    for layer in layers:
        full = subject_activations(model, tok, REQUESTS, contexts, [layer], last)
        fast, lower = spread_activations(model, tok, REQUESTS, contexts, layer, last, lower=lower)
        assert lower is None or lower.layer == layer
        torch.testing.assert_close(fast.keys[layer], full.keys[layer], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(fast.bare_keys[layer], full.bare_keys[layer],
                                   rtol=1e-5, atol=1e-6)  # fmt: skip
        torch.testing.assert_close(fast.projections[layer], full.projections[layer],
                                   rtol=1e-5, atol=1e-6)  # fmt: skip
        torch.testing.assert_close(fast.values, full.values, rtol=1e-5, atol=1e-6)
        with torch.no_grad():  # MEMIT's edit of this layer before the next one is read
            weight = adapter.weight(model, layer)
            noise = torch.randn(weight.shape, generator=g, dtype=weight.dtype)
            adapter.set_weight(model, layer, weight + 0.05 * noise)


def test_spread_activations_refuse_a_value_layer_below_the_keys():
    from metake.solvers.memit import spread_activations

    model, tok = tiny_model("gpt2"), tiny_tokenizer()
    with pytest.raises(ValueError, match="value layer 0 lies below"):
        spread_activations(model, tok, REQUESTS, [""], 1, 0)
    lower = lower_layers(model, tok, REQUESTS, [""], 2)
    with pytest.raises(ValueError, match="below the cached layer"):
        spread_activations(model, tok, REQUESTS, [""], 1, 2, lower=lower)
