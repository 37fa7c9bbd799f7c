"""ArchAdapter: every supported family's module paths and weight orientation, on tiny models."""

from __future__ import annotations

import pytest
import torch
from tiny_models import MODEL_TYPES, VOCAB, hidden_and_intermediate, tiny_model
from torch import nn
from transformers import OPTConfig, OPTForCausalLM
from transformers.pytorch_utils import Conv1D

from metake.errors import MetakeError, UnsupportedModelError
from metake.models.adapters import ADAPTERS, get_adapter
from metake.trace import capture

# Written out independently of the adapters table: decoder layer list, MLP output projection
# (relative to a layer), final norm, and whether the stored weight is [in, out].
EXPECTED = {
    "gpt2": ("transformer.h", "mlp.c_proj", "transformer.ln_f", True),
    "gptj": ("transformer.h", "mlp.fc_out", "transformer.ln_f", False),
    "gpt_neox": ("gpt_neox.layers", "mlp.dense_4h_to_h", "gpt_neox.final_layer_norm", False),
    "llama": ("model.layers", "mlp.down_proj", "model.norm", False),
    "mistral": ("model.layers", "mlp.down_proj", "model.norm", False),
    "qwen2": ("model.layers", "mlp.down_proj", "model.norm", False),
    "gemma3_text": ("model.layers", "mlp.down_proj", "model.norm", False),
    "gemma3": (
        "model.language_model.layers",
        "mlp.down_proj",
        "model.language_model.norm",
        False,
    ),
}

ATOL = 1e-5


@pytest.fixture(params=MODEL_TYPES)
def model(request):
    return tiny_model(request.param)


def _ids(seed: int = 1, batch: int = 2, seq: int = 6) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, seq), generator=g)


def _bias(module: nn.Module) -> torch.Tensor | float:
    b = getattr(module, "bias", None)
    return 0.0 if b is None else b


def test_every_tiny_model_type_has_an_adapter():
    assert set(MODEL_TYPES) <= set(ADAPTERS)


def test_lookup(model):
    model_type = model.config.model_type
    adapter = get_adapter(model)
    assert adapter is ADAPTERS[model_type]
    assert adapter.model_type == model_type

    layers_path, mlp_path, norm_path, transposed = EXPECTED[model_type]
    n = model.config.get_text_config().num_hidden_layers
    hidden, inter = hidden_and_intermediate(model)
    assert adapter.num_layers(model) == n
    assert adapter.layers(model) is model.get_submodule(layers_path)
    assert adapter.weight_is_transposed is transposed
    assert adapter.final_norm(model) is model.get_submodule(norm_path)
    assert adapter.unembed(model) is model.get_output_embeddings()

    for i in range(n):
        assert adapter.layer_name(i) == f"{layers_path}.{i}"
        assert adapter.mlp_out_name(i) == f"{layers_path}.{i}.{mlp_path}"
        assert adapter.layer_module(model, i) is model.get_submodule(f"{layers_path}.{i}")
        module = adapter.mlp_out(model, i)
        assert module is model.get_submodule(f"{layers_path}.{i}.{mlp_path}")
        assert isinstance(module, Conv1D if transposed else nn.Linear)

        w = adapter.weight(model, i)
        assert tuple(w.shape) == (hidden, inter)  # [d_out, d_in]
        # a view of the stored parameter, not a copy
        assert w.data_ptr() == module.weight.data_ptr()
        expected_storage = (inter, hidden) if transposed else (hidden, inter)
        assert tuple(module.weight.shape) == expected_storage


def test_weight_reproduces_the_mlp_output_from_its_key(model):
    """y = k @ W.T + b with W from adapter.weight: right module, right orientation."""
    adapter = get_adapter(model)
    n = adapter.num_layers(model)
    names = [adapter.mlp_out_name(i) for i in range(n)]
    with torch.no_grad(), capture(model, names) as trace:
        model(_ids())
    hidden, inter = hidden_and_intermediate(model)
    for i, name in enumerate(names):
        k, y = trace.inputs[name], trace.outputs[name]
        assert k.shape == (2, 6, inter)
        assert y.shape == (2, 6, hidden)
        w = adapter.weight(model, i)
        expected = k @ w.T + _bias(adapter.mlp_out(model, i))
        torch.testing.assert_close(y, expected, atol=ATOL, rtol=1e-4)


@pytest.mark.parametrize("layer", [0, -1])
def test_add_to_weight_changes_the_output_by_k_delta(model, layer):
    adapter = get_adapter(model)
    layer = layer % adapter.num_layers(model)
    name = adapter.mlp_out_name(layer)
    module = adapter.mlp_out(model, layer)
    ids = _ids()
    with torch.no_grad(), capture(model, [name]) as before:
        model(ids)
    hidden, inter = hidden_and_intermediate(model)
    delta = torch.randn(hidden, inter, generator=torch.Generator().manual_seed(3)) * 0.1
    param = module.weight
    w0 = adapter.weight(model, layer).detach().clone()

    adapter.add_to_weight(model, layer, delta)

    assert module.weight is param  # in place
    torch.testing.assert_close(adapter.weight(model, layer), w0 + delta)
    with torch.no_grad(), capture(model, [name]) as after:
        model(ids)
    k = before.inputs[name]
    # the key of the edited layer comes from the layers below it: unchanged
    torch.testing.assert_close(after.inputs[name], k, atol=0, rtol=0)
    torch.testing.assert_close(
        after.outputs[name] - before.outputs[name], k @ delta.T, atol=ATOL, rtol=1e-4
    )


def test_add_to_weight_casts_dtype(model):
    adapter = get_adapter(model)
    hidden, inter = hidden_and_intermediate(model)
    w0 = adapter.weight(model, 0).detach().clone()
    delta = torch.ones(hidden, inter, dtype=torch.float64)
    adapter.add_to_weight(model, 0, delta)
    assert adapter.weight(model, 0).dtype == torch.float32
    torch.testing.assert_close(adapter.weight(model, 0), w0 + 1)


def test_set_weight_round_trips(model):
    adapter = get_adapter(model)
    module = adapter.mlp_out(model, 1)
    param = module.weight
    w0 = adapter.weight(model, 1).detach().clone()
    other_layer = adapter.weight(model, 0).detach().clone()
    new = torch.randn_like(w0)

    adapter.set_weight(model, 1, new)
    assert module.weight is param
    torch.testing.assert_close(adapter.weight(model, 1), new, atol=0, rtol=0)
    stored = new.T if adapter.weight_is_transposed else new
    torch.testing.assert_close(param.detach(), stored, atol=0, rtol=0)
    torch.testing.assert_close(adapter.weight(model, 0), other_layer, atol=0, rtol=0)

    adapter.set_weight(model, 1, w0)
    torch.testing.assert_close(adapter.weight(model, 1), w0, atol=0, rtol=0)


def test_add_to_weight_rejects_a_wrong_shape(model):
    adapter = get_adapter(model)
    hidden, inter = hidden_and_intermediate(model)
    w0 = adapter.weight(model, 0).detach().clone()
    for shape in [(inter, hidden), (hidden, inter + 1), (hidden,)]:
        with pytest.raises(ValueError, match="shape"):
            adapter.add_to_weight(model, 0, torch.zeros(shape))
    torch.testing.assert_close(adapter.weight(model, 0), w0, atol=0, rtol=0)


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_set_weight_rejects_a_wrong_shape(model_type):
    model = tiny_model(model_type)
    adapter = get_adapter(model)
    hidden, inter = hidden_and_intermediate(model)
    for shape in [(1, inter), (hidden, 1), (inter,), (inter, hidden)]:
        with pytest.raises(ValueError, match="shape"):
            adapter.set_weight(model, 0, torch.zeros(shape))


def test_layer_outputs_are_the_residual_stream(model):
    """Layer i's output is hidden_states[i + 1]; the last one is before the final norm."""
    adapter = get_adapter(model)
    n = adapter.num_layers(model)
    names = [adapter.layer_name(i) for i in range(n)]
    with torch.no_grad(), capture(model, names, inputs=False) as trace:
        out = model(_ids(), output_hidden_states=True)
    hs = out.hidden_states
    assert len(hs) == n + 1
    for i in range(n - 1):
        torch.testing.assert_close(trace.outputs[names[i]], hs[i + 1], atol=ATOL, rtol=1e-4)
    last = trace.outputs[names[-1]]
    with torch.no_grad():
        normed = adapter.final_norm(model)(last)
    torch.testing.assert_close(normed, hs[-1], atol=ATOL, rtol=1e-4)
    # hidden_states[-1] really is normed (so the check above is not vacuous)
    assert not torch.allclose(last, hs[-1], atol=1e-3)


def test_logits_from_the_normed_last_hidden_state(model):
    adapter = get_adapter(model)
    with torch.no_grad():
        out = model(_ids(), output_hidden_states=True)
        logits = adapter.logits(model, out.hidden_states[-1])
    torch.testing.assert_close(logits, out.logits, atol=ATOL, rtol=1e-4)


def test_logits_apply_the_soft_cap():
    model = tiny_model("gemma3_text")
    cap = model.config.final_logit_softcapping
    assert cap  # the tiny gemma3_text model turns it on
    adapter = get_adapter(model)
    with torch.no_grad():
        out = model(_ids(), output_hidden_states=True)
        raw = adapter.unembed(model)(out.hidden_states[-1])
    torch.testing.assert_close(torch.tanh(raw / cap) * cap, out.logits, atol=ATOL, rtol=1e-4)
    assert not torch.allclose(raw, out.logits, atol=1e-4)


def test_unknown_model_type_is_unsupported():
    torch.manual_seed(0)
    config = OPTConfig(
        vocab_size=VOCAB, hidden_size=16, ffn_dim=32, num_hidden_layers=2,
        num_attention_heads=2, word_embed_proj_dim=16, max_position_embeddings=32,
    )  # fmt: skip
    opt = OPTForCausalLM(config).eval()
    with pytest.raises(UnsupportedModelError, match="'opt'") as info:
        get_adapter(opt)
    assert isinstance(info.value, MetakeError)
    assert isinstance(info.value, ValueError)

    with pytest.raises(UnsupportedModelError, match="None"):
        get_adapter(nn.Linear(2, 2))  # no config at all


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_out_of_range_layer(model_type):
    model = tiny_model(model_type)
    adapter = get_adapter(model)
    n = adapter.num_layers(model)
    hidden, inter = hidden_and_intermediate(model)
    for layer in (n, n + 5, -1):
        with pytest.raises(ValueError, match="out of range"):
            adapter.mlp_out(model, layer)
        with pytest.raises(ValueError, match="out of range"):
            adapter.layer_module(model, layer)
        with pytest.raises(ValueError, match="out of range"):
            adapter.weight(model, layer)
        with pytest.raises(ValueError, match="out of range"):
            adapter.add_to_weight(model, layer, torch.zeros(hidden, inter))
        with pytest.raises(ValueError, match="out of range"):
            adapter.set_weight(model, layer, torch.zeros(hidden, inter))


@pytest.mark.parametrize("model_type", [t for t in MODEL_TYPES if not t.startswith("gemma3")])
def test_no_post_mlp_norm_means_residual_changes_pass_through(model_type):
    model = tiny_model(model_type)
    adapter = get_adapter(model)
    assert adapter.mlp_out_norm(model, 0) is None
    resid = torch.randn(2, model.config.get_text_config().hidden_size)
    assert adapter.residual_to_projection(model, 0, resid, torch.randn_like(resid)) is resid


def _gemma_mlp_trace(model: nn.Module, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Projection output ``x`` and post-norm output ``y`` (``[tokens, d]``) of ``layer``."""
    adapter = get_adapter(model)
    norm_name = f"{adapter.layer_name(layer)}.{adapter.mlp_out_norm_path}"
    proj_name = adapter.mlp_out_name(layer)
    with torch.no_grad(), capture(model, [proj_name, norm_name], inputs=False) as trace:
        model(_ids())
    return trace.outputs[proj_name].flatten(0, 1), trace.outputs[norm_name].flatten(0, 1)


def _rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    return torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)


@pytest.mark.parametrize("model_type", ["gemma3_text", "gemma3"])
def test_residual_to_projection_reaches_any_output_the_norm_can_give(model_type):
    """Asked for the change to another token's post-norm output, the mapped change of ``x``
    makes the norm give exactly that output (with ``eps = 0``, which would otherwise make the
    reachable set depend on ``rms(x)`` a little)."""
    model = tiny_model(model_type)
    adapter = get_adapter(model)
    adapter.mlp_out_norm(model, 1).eps = 0.0
    x, y = _gemma_mlp_trace(model, 1)
    resid = y.roll(1, dims=0) - y  # every row's goal is a reachable output
    moved = x + adapter.residual_to_projection(model, 1, resid, x)
    with torch.no_grad():
        reached = adapter.mlp_out_norm(model, 1)(moved)
    torch.testing.assert_close(reached, y + resid, rtol=1e-4, atol=1e-4)
    eps = adapter.mlp_out_norm(model, 1).eps
    torch.testing.assert_close(_rms(moved, eps), _rms(x, eps), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("model_type", ["gemma3_text", "gemma3"])
def test_residual_to_projection_gives_the_nearest_reachable_output(model_type):
    """For an unreachable goal ``y + R`` the output reached is the nearest point of the norm's
    output ellipsoid ``{g * u : rms(u) = 1}``: the miss is normal to it there (``(y + R) - y'
    = mu * y' / g^2``) and random points of the ellipsoid are farther away."""
    model = tiny_model(model_type)
    adapter = get_adapter(model)
    norm = adapter.mlp_out_norm(model, 2)
    x, y = _gemma_mlp_trace(model, 2)
    x, y = x.double(), y.double()
    g = (1.0 + norm.weight).double().detach()
    resid = 0.5 * torch.randn_like(y, generator=torch.Generator().manual_seed(0))
    moved = x + adapter.residual_to_projection(model, 2, resid, x)
    reached = g * moved / _rms(moved, norm.eps)
    miss = y + resid - reached
    normal = reached / g**2
    mu = (miss * normal).sum(-1, keepdim=True) / (normal * normal).sum(-1, keepdim=True)
    torch.testing.assert_close(miss, mu * normal, rtol=1e-6, atol=1e-6)
    others = torch.randn(200, *x.shape, dtype=torch.float64, generator=torch.Generator())
    others = reached + 0.05 * others * reached.abs().mean()
    on_ellipsoid = g * others / _rms(others, 0.0)
    farther = (on_ellipsoid - (y + resid)).norm(dim=-1) >= miss.norm(dim=-1) - 1e-9
    assert bool(farther.all())


def test_residual_to_projection_leaves_zero_gain_coordinates_and_has_the_implicit_gradient():
    """Coordinates whose gain is 0 are not moved; autograd through the bisection's root equals
    central finite differences (float64)."""
    model = tiny_model("gemma3_text").double()
    adapter = get_adapter(model)
    norm = adapter.mlp_out_norm(model, 1)
    with torch.no_grad():
        norm.weight[3] = -1.0  # Gemma's gain 1 + w is 0 there
    x, _ = _gemma_mlp_trace(model, 1)
    resid = 0.3 * torch.randn_like(x, generator=torch.Generator().manual_seed(1))
    change = adapter.residual_to_projection(model, 1, resid, x)
    assert torch.equal(change[:, 3], torch.zeros_like(change[:, 3]))

    def first_row(r: torch.Tensor) -> torch.Tensor:
        return adapter.residual_to_projection(model, 1, r.unsqueeze(0), x[:1])[0]

    r0 = resid[0].clone().requires_grad_(True)
    weights = torch.randn_like(x[0], generator=torch.Generator().manual_seed(2))
    (grad,) = torch.autograd.grad((first_row(r0) * weights).sum(), r0)
    direction = torch.randn_like(r0, generator=torch.Generator().manual_seed(3))
    step = 1e-5
    with torch.no_grad():
        up = (first_row(resid[0] + step * direction) * weights).sum()
        down = (first_row(resid[0] - step * direction) * weights).sum()
    numeric = (up - down) / (2 * step)
    assert float((grad * direction).sum()) == pytest.approx(float(numeric), rel=1e-5)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_mlp_out_gain_is_gemmas_one_plus_w_and_none_elsewhere(model_type):
    model = tiny_model(model_type)
    adapter = get_adapter(model)
    gain = adapter.mlp_out_gain(model, 1)
    if not model_type.startswith("gemma3"):
        assert gain is None
        return
    expected = 1.0 + adapter.mlp_out_norm(model, 1).weight.double()
    torch.testing.assert_close(gain, expected, rtol=1e-6, atol=1e-6)
