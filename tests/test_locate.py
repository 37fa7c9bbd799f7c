"""Causal tracing (metake.locate): exact identities, an independent recomputation, a synthetic
model whose answer reaches the output through one MLP only, and the error cases."""

from __future__ import annotations

import json
from contextlib import ExitStack

import pytest
import torch
from tiny_models import tiny_model, tiny_tokenizer
from torch import nn

from metake.errors import MetakeError
from metake.locate import TraceResult, causal_trace, embedding_std, window_layers
from metake.models.adapters import get_adapter
from metake.requests import EditRequest

# prompts end with a space so that, with the character-level tiny tokenizer, the answer's first
# token is its first character (not the separating space)
FACTS = [
    EditRequest("The {} plays the sport of ", "Michael Jordan", "basketball"),
    EditRequest("{} is located in ", "Paris", "France"),
]
TRACED_TYPES = ["gpt2", "llama"]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def _hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


# ----- result structure, determinism ----------------------------------------------------------
@pytest.mark.parametrize("model_type", TRACED_TYPES)
def test_shapes_determinism_and_json(model_type, tok):
    model = tiny_model(model_type)
    model(torch.tensor([[5, 6, 7]]))  # any first-forward set-up happens before hooks are counted
    hooks = _hook_count(model)
    a = causal_trace(model, tok, FACTS, samples=4, seed=3)
    assert _hook_count(model) == hooks  # every hook removed
    b = causal_trace(model, tok, FACTS, samples=4, seed=3)
    c = causal_trace(model, tok, FACTS, samples=4, seed=4)

    n_layers = get_adapter(model).num_layers(model)
    assert isinstance(a, TraceResult)
    assert a.p_clean.shape == a.p_corrupt.shape == (2,)
    assert a.ie.shape == a.p_restored.shape == (2, n_layers)
    assert a.mean_ie.shape == (n_layers,)
    assert a.peak_layer == int(a.mean_ie.argmax())
    torch.testing.assert_close(a.ie, a.p_restored - a.p_corrupt[:, None])
    # "The " is 4 characters, "Michael Jordan" 14: subject tokens 4..17; "Paris": 0..4
    assert a.subject_spans == [(4, 17), (0, 4)]
    assert a.answer_ids == [tok.convert_tokens_to_ids("b"), tok.convert_tokens_to_ids("F")]

    for name in ("p_clean", "p_corrupt", "p_restored", "ie"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name  # same seed: identical
    assert not torch.equal(a.p_corrupt, c.p_corrupt)  # another seed: other noise
    torch.testing.assert_close(a.p_clean, c.p_clean, rtol=0, atol=0)  # clean run has no noise

    data = json.loads(json.dumps(a.to_dict()))
    assert data["peak_layer"] == a.peak_layer
    assert data["ie"] == a.ie.tolist() and len(data["mean_ie"]) == n_layers
    assert data["samples"] == 4 and data["seed"] == 3 and data["window"] == 1
    assert data["restored_module"] == get_adapter(model).mlp_out_path


def test_chunked_forwards_match_one_forward(tok):
    model = tiny_model("llama")
    one = causal_trace(model, tok, FACTS, samples=5)
    chunked = causal_trace(model, tok, FACTS, samples=5, max_batch_rows=7)
    torch.testing.assert_close(chunked.p_restored, one.p_restored, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(chunked.p_corrupt, one.p_corrupt, rtol=1e-5, atol=1e-9)


def test_answer_field_and_progress(tok):
    model = tiny_model("gpt2")
    swapped = [EditRequest(f.prompt, f.subject, "zzz", target_true=f.target_new) for f in FACTS]
    a = causal_trace(model, tok, FACTS, samples=2)
    b = causal_trace(model, tok, swapped, samples=2, answer="target_true", progress=True)
    assert a.answer_ids == b.answer_ids
    torch.testing.assert_close(a.ie, b.ie)


def test_window_layers_follow_rome():
    assert window_layers(4, 1, 12) == [4]
    assert window_layers(4, 10, 12) == list(range(0, 9))  # l - 5 .. l + 4, clipped at 0
    assert window_layers(10, 10, 12) == list(range(5, 12))  # clipped at the top
    assert window_layers(1, 3, 3) == [0, 1, 2]
    assert window_layers(0, 2, 3) == [0]


# ----- exact identities ---------------------------------------------------------------------
@pytest.mark.parametrize("model_type", TRACED_TYPES + ["gemma3_text"])
def test_tiny_noise_changes_nothing(model_type, tok):
    model = tiny_model(model_type)
    r = causal_trace(model, tok, FACTS, noise_scale=1e-6, samples=3)
    torch.testing.assert_close(r.p_corrupt, r.p_clean, rtol=1e-4, atol=0)
    assert r.ie.abs().max() < 1e-4 * float(r.p_clean.min())


@pytest.mark.parametrize("model_type", TRACED_TYPES)
def test_last_layer_cannot_act_before_the_last_position(model_type, tok):
    """The subject ends before the last prompt position: the last layer's MLP output there
    reaches no later position (no attention after it), so its indirect effect is exactly 0."""
    r = causal_trace(tiny_model(model_type), tok, FACTS, samples=3)
    assert r.ie[:, -1].abs().max() < 1e-9
    assert r.ie[:, :-1].abs().max() > 0


# ----- independent recomputation ------------------------------------------------------------
def _reference_p(model, ids, first, last, answer_id, noise=None, restore=None):
    """P(answer) at the last position of ``ids`` [1, S] from the full logits, with noise
    ``[n_subject, d]`` added to the subject's embeddings and ``restore`` = {module: vector}
    written into the output of each module at position ``last``."""
    with ExitStack() as stack:
        if noise is not None:

            def add_noise(_m, _a, out):
                out = out.clone()
                out[0, first : last + 1] += noise
                return out

            h = model.get_input_embeddings().register_forward_hook(add_noise)
            stack.callback(h.remove)
        for module, vector in (restore or {}).items():

            def put(_m, _a, out, vector=vector):
                out = out.clone()
                out[0, last] = vector
                return out

            h = module.register_forward_hook(put)
            stack.callback(h.remove)
        logits = model(input_ids=ids).logits[0, -1].float()
    return float(torch.softmax(logits, -1)[answer_id])


@pytest.mark.parametrize("model_type", TRACED_TYPES + ["gemma3_text"])
@pytest.mark.parametrize("window", [1, 2])
def test_matches_an_independent_recomputation(model_type, window, tok):
    """Fact #1 (its noise drawn after fact #0's), every layer, with hand-written hooks.

    The reference restores the down projection's output (also for Gemma3, where causal_trace
    restores the post-MLP norm's output: the same thing at one position), reads P from the full
    logits (causal_trace stops after the final norm) and runs one noise draw per forward.
    """
    model = tiny_model(model_type)
    adapter = get_adapter(model)
    samples, scale, seed = 3, 2.5, 11
    result = causal_trace(model, tok, FACTS, noise_scale=scale, samples=samples, seed=seed,
                          window=window)  # fmt: skip

    fact = FACTS[1]
    text = fact.prompt.replace("{}", fact.subject)
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
    first = text.index(fact.subject)
    last = first + len(fact.subject) - 1  # one token per character
    answer_id = tok.convert_tokens_to_ids(fact.target_new[0])
    embed = model.get_input_embeddings()
    with torch.no_grad():
        std = float(embed(torch.arange(embed.weight.shape[0])).std())
        n_layers = adapter.num_layers(model)
        projections = [adapter.mlp_out(model, layer) for layer in range(n_layers)]
        clean_out = {}
        hooks = [
            p.register_forward_hook(lambda _m, _a, out, p=p: clean_out.__setitem__(p, out[0, last]))
            for p in projections
        ]
        p_clean = _reference_p(model, ids, first, last, answer_id)
        for h in hooks:
            h.remove()

        g = torch.Generator().manual_seed(seed)
        d = clean_out[projections[0]].shape[-1]
        n0 = len(FACTS[0].subject)
        torch.randn(samples, n0, d, generator=g)  # fact #0's draw comes first
        noise = torch.randn(samples, len(fact.subject), d, generator=g) * scale * std

        p_corrupt = (
            sum(_reference_p(model, ids, first, last, answer_id, noise[s]) for s in range(samples))
            / samples
        )
        ie = []
        for layer in range(n_layers):
            lo, hi = max(0, layer - window // 2), min(n_layers, layer + (window + 1) // 2)
            restore = {projections[m]: clean_out[projections[m]] for m in range(lo, hi)}
            p = (
                sum(
                    _reference_p(model, ids, first, last, answer_id, noise[s], restore)
                    for s in range(samples)
                )
                / samples
            )
            ie.append(p - p_corrupt)

    assert result.noise_std == pytest.approx(scale * std, rel=1e-5)
    assert result.p_clean[1] == pytest.approx(p_clean, rel=1e-5)
    assert result.p_corrupt[1] == pytest.approx(p_corrupt, rel=1e-5)
    torch.testing.assert_close(result.ie[1], torch.tensor(ie, dtype=torch.float64),
                               rtol=0, atol=1e-6 * p_clean)  # fmt: skip
    assert max(abs(x) for x in ie) > 1e-5 * p_clean  # the check is not vacuous


def test_embedding_std_includes_the_module_scaling():
    model = tiny_model("gemma3_text")  # its embedding module multiplies by sqrt(hidden)
    embed = model.get_input_embeddings()
    with torch.no_grad():
        expected = float(embed(torch.arange(embed.weight.shape[0])).std())
    assert embedding_std(model, chunk=50) == pytest.approx(expected, rel=1e-6)
    assert embedding_std(model) > 2 * float(embed.weight.detach().std())


# ----- synthetic model: the answer depends on the subject through one MLP only -------------------
def _one_mlp_model(model_type: str, k: int, tok) -> tuple[nn.Module, EditRequest]:
    """A tiny model with every attention output and every MLP but layer ``k``'s zeroed.

    Positions do not interact, so the last position (the subject's last token) is a function of
    its own embedding through layer ``k``'s MLP only, which is scaled up to dominate the residual.
    The head row of the answer is set along the clean final hidden state, so P(answer) is high.
    """
    model = tiny_model(model_type)
    adapter = get_adapter(model)
    with torch.no_grad():
        for layer in range(adapter.num_layers(model)):
            block = adapter.layer_module(model, layer)
            attn_out = block.attn.c_proj if model_type == "gpt2" else block.self_attn.o_proj
            mlp_out = adapter.mlp_out(model, layer)
            for module, factor in ((attn_out, 0.0), (mlp_out, 30.0 if layer == k else 0.0)):
                module.weight.mul_(factor)
                if module.bias is not None:  # a constant output would not depend on the subject
                    module.bias.zero_()
        if model_type == "gpt2":  # untie the head from the input embeddings
            model.lm_head.weight = nn.Parameter(model.lm_head.weight.clone())
    fact = EditRequest("Sport of {}", "Jordan", "a")  # answer token: " " (prompt ends in "n")
    ids = torch.tensor([tok("Sport of Jordan", add_special_tokens=False)["input_ids"]])
    name = adapter.final_norm_path
    with torch.no_grad():
        hidden = {}
        h = model.get_submodule(name).register_forward_hook(
            lambda _m, _a, out: hidden.__setitem__("h", out[0, -1])
        )
        model(input_ids=ids)
        h.remove()
        space = tok.convert_tokens_to_ids(" ")
        model.lm_head.weight[space] = hidden["h"] * 12.0 / hidden["h"].pow(2).sum()  # logit 12
    return model, fact


@pytest.mark.parametrize("model_type", TRACED_TYPES)
@pytest.mark.parametrize("k", [0, 1, 2])
def test_peak_at_the_only_mlp_on_the_path(model_type, k, tok):
    model, fact = _one_mlp_model(model_type, k, tok)
    r = causal_trace(model, tok, [fact], samples=6)
    assert r.p_clean[0] > 0.9
    assert r.p_corrupt[0] < r.p_clean[0] - 0.1  # the noise damages the fact
    assert r.peak_layer == k
    assert r.ie[0, k] > 0.1
    others = [layer for layer in range(r.num_layers) if layer != k]
    assert r.ie[0, others].abs().max() < 1e-9  # restoring a zero output changes nothing

    # window 3: a layer's window covers k exactly when it is within one layer of k
    wide = causal_trace(model, tok, [fact], samples=6, window=3)
    for layer in range(r.num_layers):
        if abs(layer - k) <= 1:
            assert wide.ie[0, layer] == pytest.approx(float(r.ie[0, k]), abs=1e-6)
        else:
            assert abs(wide.ie[0, layer]) < 1e-9


# ----- errors -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("facts", "kwargs", "match"),
    [
        ([], {}, "at least one fact"),
        (FACTS, {"noise_scale": 0.0}, "noise_scale"),
        (FACTS, {"noise_scale": -1.0}, "noise_scale"),
        (FACTS, {"samples": 0}, "samples"),
        (FACTS, {"window": 0}, "window"),
        (FACTS, {"max_batch_rows": 0}, "max_batch_rows"),
        ([EditRequest("Paris is in ", "Paris", "France")], {}, "not found"),
        ([FACTS[0], EditRequest("The city of ", "Rome", "Italy")], {}, "fact #1.*not found"),
        ([EditRequest("{} is in ", "  ", "France")], {}, "subject is empty"),
        (FACTS, {"answer": "target_true"}, "target_true is not set"),
    ],
)
def test_errors(facts, kwargs, match, tok):
    model = tiny_model("gpt2")
    with pytest.raises(MetakeError, match=match):
        causal_trace(model, tok, facts, **kwargs)
