"""Activation tracing: capture(), add_at_positions(), main_tensor()."""

from __future__ import annotations

import pytest
import torch
from tiny_models import MODEL_TYPES, VOCAB, tiny_model
from torch import nn

from metake.models.adapters import get_adapter
from metake.trace import StopForward, add_at_positions, capture, main_tensor

BATCH, SEQ = 2, 6


@pytest.fixture(params=MODEL_TYPES)
def model(request):
    return tiny_model(request.param)


def _ids(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(seed))


def _hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


# ----- capture -------------------------------------------------------------------------------
def test_capture_several_modules_and_remove_hooks(model):
    adapter = get_adapter(model)
    n = adapter.num_layers(model)
    names = [adapter.layer_name(0), adapter.mlp_out_name(1), adapter.layer_name(n - 1)]
    assert _hook_count(model) == 0
    with torch.no_grad():
        out = model(_ids(), output_hidden_states=True)
    # transformers 5 installs its own output-recording hooks, for good, on the first forward
    # with output_hidden_states=True: count relative to what is there now
    baseline = _hook_count(model)
    with torch.no_grad(), capture(model, names) as trace:
        assert _hook_count(model) == baseline + len(names)
        model(_ids(), output_hidden_states=True)
    assert _hook_count(model) == baseline

    assert set(trace.inputs) == set(trace.outputs) == set(names)
    d = model.config.get_text_config().hidden_size
    for name in names:
        assert trace.outputs[name].shape == (BATCH, SEQ, d)
        assert not trace.outputs[name].requires_grad
    # the input of layer 0 is the embedding output, its output the residual after layer 0
    torch.testing.assert_close(trace.inputs[names[0]], out.hidden_states[0])
    torch.testing.assert_close(trace.outputs[names[0]], out.hidden_states[1])


def test_capture_inputs_or_outputs_only_and_without_detach():
    model = tiny_model("llama")
    adapter = get_adapter(model)
    name = adapter.mlp_out_name(0)
    with capture(model, [name], inputs=False) as trace:
        model(_ids())
    assert list(trace.outputs) == [name] and not trace.inputs
    with capture(model, [name], outputs=False) as trace:
        model(_ids())
    assert list(trace.inputs) == [name] and not trace.outputs
    with capture(model, [name], detach=False) as trace:
        model(_ids())
    assert trace.outputs[name].requires_grad  # still in the autograd graph
    trace.outputs[name].sum().backward()
    assert adapter.mlp_out(model, 0).weight.grad is not None


def test_capture_removes_hooks_when_the_forward_raises():
    model = tiny_model("gpt2")
    adapter = get_adapter(model)
    names = [adapter.layer_name(0), adapter.mlp_out_name(1)]

    def boom(_module, _args):
        raise RuntimeError("boom")

    # a failure in the middle of the forward: after layer 0 ran, before layer 1's MLP
    own = adapter.layer_module(model, 1).register_forward_pre_hook(boom)
    try:
        with (
            pytest.raises(RuntimeError, match="boom"),
            torch.no_grad(),
            capture(model, names) as trace,
        ):
            model(_ids())
    finally:
        own.remove()
    assert _hook_count(model) == 0
    assert list(trace.outputs) == [names[0]]  # what ran before the failure was recorded

    # a failure raised in the body of the with-block itself
    with pytest.raises(KeyError), capture(model, names, stop_after=names[1]):
        raise KeyError("x")
    assert _hook_count(model) == 0

    # an unknown module name fails before any hook stays behind
    with pytest.raises(AttributeError), capture(model, [names[0], "no.such.module"]):
        pass
    assert _hook_count(model) == 0


def test_stop_after_ends_the_forward_early(model):
    adapter = get_adapter(model)
    n = adapter.num_layers(model)
    name = adapter.mlp_out_name(0)
    ids = _ids()
    with torch.no_grad(), capture(model, [name]) as full:
        model(ids)

    fired = []
    own = adapter.layer_module(model, 1).register_forward_hook(lambda *_: fired.append(1))
    own_last = adapter.layer_module(model, n - 1).register_forward_hook(
        lambda *_: fired.append(n - 1)
    )
    reached_end_of_body = False
    try:
        with torch.no_grad(), capture(model, [name], stop_after=name) as early:
            model(ids)
            reached_end_of_body = True
    finally:
        own.remove()
        own_last.remove()
    assert fired == []
    assert not reached_end_of_body  # the forward (and the rest of the body) was cut short
    assert _hook_count(model) == 0
    torch.testing.assert_close(early.inputs[name], full.inputs[name], atol=0, rtol=0)
    torch.testing.assert_close(early.outputs[name], full.outputs[name], atol=0, rtol=0)


def test_stop_after_a_module_not_among_names():
    model = tiny_model("qwen2")
    adapter = get_adapter(model)
    want, stop = adapter.layer_name(0), adapter.mlp_out_name(1)
    with torch.no_grad(), capture(model, [want], stop_after=stop) as trace:
        model(_ids())
    assert want in trace.outputs and stop in trace.outputs
    assert _hook_count(model) == 0


def test_stop_forward_outside_stop_after_is_swallowed_only_by_capture():
    model = tiny_model("llama")
    with pytest.raises(StopForward), torch.no_grad():
        own = get_adapter(model).layer_module(model, 0).register_forward_hook(_raise_stop)
        try:
            model(_ids())
        finally:
            own.remove()


def _raise_stop(*_):
    raise StopForward


# ----- add_at_positions ----------------------------------------------------------------------
def test_add_at_positions_is_exact_causal_and_differentiable(model):
    adapter = get_adapter(model)
    d = model.config.get_text_config().hidden_size
    ids = _ids()
    lname, nname = adapter.layer_name(0), adapter.layer_name(1)
    rows = torch.tensor([0, 1])
    positions = torch.tensor([2, 4])
    vectors = torch.randn(2, d, generator=torch.Generator().manual_seed(5))

    with torch.no_grad(), capture(model, [lname, nname], inputs=False) as base:
        model(ids)
    baseline = _hook_count(model)
    with (
        torch.no_grad(),
        add_at_positions(adapter.layer_module(model, 0), rows, positions, vectors),
        capture(model, [lname, nname], inputs=False) as patched,
    ):
        model(ids)
    assert _hook_count(model) == baseline == 0

    # the patched layer's own output changes by exactly the vectors, nowhere else
    expected = torch.zeros(BATCH, SEQ, d)
    expected[rows, positions] = vectors
    torch.testing.assert_close(
        patched.outputs[lname] - base.outputs[lname], expected, atol=1e-6, rtol=0
    )

    # the next layer: unchanged before the patched position of each row, changed from it on
    diff = (patched.outputs[nname] - base.outputs[nname]).abs().amax(-1)  # [batch, seq]
    for row, pos in zip(rows.tolist(), positions.tolist(), strict=True):
        assert torch.all(diff[row, :pos] <= 1e-6), diff[row]
        assert torch.all(diff[row, pos:] > 1e-6), diff[row]

    # gradients flow into the vectors
    vec = vectors.clone().requires_grad_(True)
    with add_at_positions(adapter.layer_module(model, 0), rows, positions, vec):
        logits = model(ids).logits
    logits[:, -1].log_softmax(-1)[:, 3].sum().neg().backward()
    assert vec.grad is not None
    assert torch.all(vec.grad.abs().sum(-1) > 0)
    assert _hook_count(model) == 0

    # the unpatched forward is back to the baseline
    with torch.no_grad(), capture(model, [nname]) as again:
        model(ids)
    torch.testing.assert_close(again.outputs[nname], base.outputs[nname], atol=0, rtol=0)


def test_add_at_positions_accumulates_repeated_pairs_and_keeps_tuples():
    class TupleOut(nn.Module):
        def forward(self, x):
            return x * 1.0, "extra"

    module = TupleOut()
    x = torch.zeros(2, 3, 4)
    vectors = torch.arange(12.0).reshape(3, 4)
    rows, positions = torch.tensor([1, 1, 0]), torch.tensor([2, 2, 0])
    with add_at_positions(module, rows, positions, vectors):
        out, extra = module(x)
    assert extra == "extra"
    expected = torch.zeros(2, 3, 4)
    expected[1, 2] = vectors[0] + vectors[1]
    expected[0, 0] = vectors[2]
    torch.testing.assert_close(out, expected)
    assert not module._forward_hooks
    # removed also when the forward raises
    with pytest.raises(ValueError), add_at_positions(module, rows, positions, vectors):
        raise ValueError
    assert not module._forward_hooks


def test_add_at_positions_is_seen_by_hooks_registered_before_it():
    model = tiny_model("llama")
    adapter = get_adapter(model)
    layer, name = adapter.layer_module(model, 0), adapter.layer_name(0)
    rows, positions = torch.tensor([0]), torch.tensor([1])
    vectors = torch.ones(1, model.config.hidden_size)
    ids = _ids()
    with torch.no_grad():
        ref = model(ids, output_hidden_states=True)  # installs transformers' recording hooks
        with add_at_positions(layer, rows, positions, vectors):
            out = model(ids, output_hidden_states=True)
        with capture(model, [name]) as trace, add_at_positions(layer, rows, positions, vectors):
            model(ids)
    expected = ref.hidden_states[1].clone()
    expected[0, 1] += vectors[0]
    torch.testing.assert_close(trace.outputs[name], expected)
    torch.testing.assert_close(out.hidden_states[1], expected)


# ----- main_tensor ---------------------------------------------------------------------------
def test_main_tensor():
    t = torch.ones(2, 3)
    assert main_tensor(t) is t
    assert main_tensor((t, None)) is t
    assert main_tensor((t,)) is t
    assert main_tensor([t, torch.zeros(1)]) is t
    for bad in [None, (), [], (None, t), {"hidden": t}, "tensor", 3.0]:
        with pytest.raises(TypeError):
            main_tensor(bad)
