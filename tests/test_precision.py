"""``planner_autocast``: Stage I and the look-ahead in bfloat16, everything else as it was."""

from __future__ import annotations

import pytest
import torch
from test_planner import CONTEXTS, REQUESTS
from tiny_models import tiny_model, tiny_tokenizer

from metake.hparams import MemitHparams
from metake.models.adapters import get_adapter
from metake.planners.metake import lookahead_targets
from metake.planners.standard import compute_targets
from metake.precision import planner_precision
from metake.trace import capture


def _frozen(model_type: str) -> torch.nn.Module:
    """A tiny model whose parameters need no gradient, as ``load_model`` gives them."""
    model = tiny_model(model_type)
    model.requires_grad_(False)
    return model


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_inside_products_run_in_bfloat16_and_everything_is_put_back(model_type):
    model = _frozen(model_type)
    adapter = get_adapter(model)
    before = {name: p for name, p in model.named_parameters()}
    values = {name: p.detach().clone() for name, p in before.items()}
    attention = model.config._attn_implementation
    ids = torch.tensor([[3, 4, 5, 6]])
    with planner_precision(model, "bfloat16"):
        with capture(model, [adapter.mlp_out_name(1), adapter.layer_name(1)]) as seen:
            model(input_ids=ids)
        assert seen.outputs[adapter.mlp_out_name(1)].dtype == torch.bfloat16
        assert seen.outputs[adapter.layer_name(1)].dtype == torch.float32  # residual stream
        assert get_adapter(model).weight(model, 1).dtype == torch.bfloat16  # cast once
        if attention == "sdpa":
            assert model.config._attn_implementation == "eager"
        embedding = model.get_input_embeddings().weight
        assert embedding.dtype == torch.float32  # a tied LM head does not drag it along
    with pytest.raises(RuntimeError, match="inside"), planner_precision(model, "bfloat16"):
        raise RuntimeError("inside")
    after = dict(model.named_parameters())
    assert after.keys() == before.keys()
    assert all(after[name] is before[name] for name in before)  # the same Parameter objects
    assert all(torch.equal(after[name], values[name]) for name in values)
    assert model.config._attn_implementation == attention
    with planner_precision(model, None), capture(model, [adapter.mlp_out_name(1)]) as seen:
        model(input_ids=ids)
    assert seen.outputs[adapter.mlp_out_name(1)].dtype == torch.float32


def test_bfloat16_stage_one_and_lookahead_stay_close_to_float32():
    """Same starting values; the losses they see within 1% of float32's (but not equal: really
    computed in bfloat16); deterministic. (A random tiny model cannot learn its targets, so its
    optimised vectors are noise-driven and not compared; see docs/scaling.md for SmolLM2.)"""
    model, tok = _frozen("llama"), tiny_tokenizer()
    full = MemitHparams(layers=(1, 2), v_steps=8, metake_steps=3, metake_lr=0.05)
    half = full.with_overrides(planner_autocast="bfloat16")
    plans = [compute_targets(model, tok, REQUESTS, hp, CONTEXTS) for hp in (full, half, half)]
    assert torch.equal(plans[0].v_init, plans[1].v_init)  # read at full precision
    assert torch.equal(plans[1].v_target, plans[2].v_target)  # deterministic
    for term in ("nll", "kl"):
        first = [plan.history[0][term] for plan in plans[:2]]
        assert first[1] == pytest.approx(first[0], rel=1e-2, abs=1e-4)
    assert plans[1].history[0]["nll"] != plans[0].history[0]["nll"]
    torch.testing.assert_close(torch.tensor(plans[1].final_nll), torch.tensor(plans[0].final_nll),
                               rtol=1e-2, atol=1e-3)  # fmt: skip
    gate = torch.randn(len(REQUESTS), get_adapter(model).weight(model, 2).shape[1])
    refined = [lookahead_targets(model, tok, REQUESTS, plans[0], 1e-3 * gate.double(), hp,
                                 CONTEXTS) for hp in (full, half)]  # fmt: skip
    losses = [r.history[0]["loss"] for r in refined]
    assert losses[1] == pytest.approx(losses[0], rel=1e-2)
    assert losses[1] != losses[0]


def test_planner_autocast_accepts_bfloat16_or_none():
    hp = MemitHparams(layers=(1,)).with_overrides(planner_autocast="bfloat16")
    assert hp.with_overrides(planner_autocast="none").planner_autocast is None
    with pytest.raises(ValueError, match="planner_autocast"):
        MemitHparams(layers=(1,), planner_autocast="float16")
