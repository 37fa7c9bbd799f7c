"""Activation tracing: read a module's input/output, or add a vector to its output.

Both are context managers over ``register_forward_hook`` and always remove their hooks, also
when the forward raises. Decoder layers of transformers 5 return a tensor, older versions a tuple
whose first element is the hidden state: :func:`main_tensor` handles both.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, suppress
from dataclasses import dataclass, field

import torch
from torch import nn


class StopForward(Exception):
    """Raised inside a hook to end a forward pass early (everything needed was captured)."""


def main_tensor(output: object) -> torch.Tensor:
    """The hidden-state tensor of a module output (tensor, or first element of a tuple)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"cannot find a hidden-state tensor in a module output of type {type(output)}")


def _replace_main_tensor(output: object, new: torch.Tensor) -> object:
    if isinstance(output, torch.Tensor):
        return new
    return (new, *output[1:]) if isinstance(output, tuple) else [new, *output[1:]]


@dataclass
class Trace:
    """What :func:`capture` recorded: ``inputs[name]``, ``outputs[name]`` (``[batch, seq, d]``)."""

    inputs: dict[str, torch.Tensor] = field(default_factory=dict)
    outputs: dict[str, torch.Tensor] = field(default_factory=dict)
    tuple_outputs: set[str] = field(default_factory=set)  # modules that returned a tuple


@contextmanager
def capture(
    model: nn.Module,
    names: Sequence[str],
    *,
    inputs: bool = True,
    outputs: bool = True,
    detach: bool = True,
    stop_after: str | None = None,
) -> Iterator[Trace]:
    """Record the first positional input and/or main output of each named module.

    With ``stop_after`` set to a module name, the forward ends right after that module runs
    (a :class:`StopForward` raised by its hook is swallowed by this context manager), which saves
    the layers above it when only lower activations are needed.
    """
    trace = Trace()
    handles = []

    def make_hook(name: str):
        def hook(_module, args, output):
            if inputs:
                x = args[0]
                trace.inputs[name] = x.detach() if detach else x
            if outputs:
                if not isinstance(output, torch.Tensor):
                    trace.tuple_outputs.add(name)
                y = main_tensor(output)
                trace.outputs[name] = y.detach() if detach else y
            if name == stop_after:
                raise StopForward

        return hook

    wanted = list(names) + ([stop_after] if stop_after and stop_after not in names else [])
    try:
        for name in wanted:
            handles.append(model.get_submodule(name).register_forward_hook(make_hook(name)))
        with suppress(StopForward):
            yield trace
    finally:
        for h in handles:
            h.remove()


@contextmanager
def add_at_positions(
    module: nn.Module, rows: torch.Tensor, positions: torch.Tensor, vectors: torch.Tensor
) -> Iterator[None]:
    """Add ``vectors[j]`` (``[n, d]``) to the module's output at ``(rows[j], positions[j])``.

    ``rows`` and ``positions`` are ``[n]`` integer tensors indexing batch row and sequence
    position. Gradients flow into ``vectors`` (the addition is out of place).
    """

    def hook(_module, _args, output):
        hidden = main_tensor(output)
        index = (rows.to(hidden.device), positions.to(hidden.device))
        patched = hidden.index_put(index, vectors.to(hidden.device, hidden.dtype), accumulate=True)
        return _replace_main_tensor(output, patched)

    handle = module.register_forward_hook(hook, prepend=True)
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def _add_to_output(
    module: nn.Module, change: Callable[[torch.Tensor], torch.Tensor]
) -> Iterator[None]:
    """Add ``change(input)`` to the module's main output in every forward (out of place)."""

    def hook(_module, args, output):
        hidden = main_tensor(output)
        x = args[0].to(hidden.device)  # accelerate's hooks may have moved it for the forward only
        return _replace_main_tensor(output, hidden + change(x).to(hidden.dtype))

    handle = module.register_forward_hook(hook, prepend=True)
    try:
        yield
    finally:
        handle.remove()


def add_low_rank(
    module: nn.Module, down: torch.Tensor, up: torch.Tensor
) -> AbstractContextManager[None]:
    """Make a linear module act as ``W + (down @ up)^T``: output ``+= (input @ down) @ up``.

    ``down`` is ``[d_in, r]`` and ``up`` is ``[r, d_out]``; the module's weight is not touched
    (the change is computed from its input at every position, on the input's device: a model
    spread over devices), and gradients flow into both factors. This is how a weight update
    ``Delta = up^T down^T`` is tried out functionally.
    """
    return _add_to_output(
        module, lambda x: (x.to(down.dtype) @ down.to(x.device)) @ up.to(x.device)
    )


def add_delta(module: nn.Module, delta: torch.Tensor) -> AbstractContextManager[None]:
    """Make a linear module act as ``W + delta`` (``delta``: ``[d_out, d_in]``) without writing W.

    The output gains ``input @ delta^T`` at every position; gradients flow into ``delta``. The
    dense counterpart of :func:`add_low_rank`, for updates that are not kept in factored form.
    """
    return _add_to_output(module, lambda x: x.to(delta.dtype) @ delta.T.to(x.device))


@contextmanager
def skip_layers_below(
    layers: Sequence[nn.Module], hidden: torch.Tensor, as_tuple: bool = False
) -> Iterator[None]:
    """Make the decoder ``layers`` (all those below some layer ``L``) return ``hidden`` at once.

    ``hidden`` (``[batch, seq, d]``) is what the last of them returned in an earlier forward of
    the same inputs; the layer above then sees exactly its usual input, and the compute of the
    lower layers is saved. Only ``forward`` is replaced (hooks and attributes stay), always
    undone on exit. ``as_tuple``: the layers return ``(hidden, ...)`` tuples (older
    transformers; :attr:`Trace.tuple_outputs` records which kind a real forward gave).
    """
    output = (hidden,) if as_tuple else hidden
    patched = []

    def forward(*args, **kwargs):
        return output

    try:
        for module in layers:
            module.forward = forward
            patched.append(module)
        yield
    finally:
        for module in patched:
            del module.forward


@dataclass
class LowerLayers:
    """The output of decoder layers ``modules`` (layers ``0 .. layer - 1``) for one batch,
    cached so that later forwards of the same inputs replay it (:meth:`replay`)."""

    modules: list[nn.Module]
    hidden: torch.Tensor  # [batch, seq, d]
    as_tuple: bool

    @property
    def layer(self) -> int:
        """The first layer that still runs."""
        return len(self.modules)

    def select(self, rows: torch.Tensor, width: int) -> LowerLayers:
        """The cache of batch rows ``rows`` (``[R]``), cut to the first ``width`` positions (for
        a forward of those rows alone, as :meth:`PromptBatch.select` trims them)."""
        return LowerLayers(self.modules, self.hidden[rows, :width], self.as_tuple)

    def replay(self) -> AbstractContextManager[None]:
        """Within this context the cached layers return their output at once."""
        return skip_layers_below(self.modules, self.hidden, self.as_tuple)


@torch.no_grad()
def cache_lower_layers(
    model: nn.Module, modules: Sequence[nn.Module], name: str, run: Callable[[], object]
) -> LowerLayers:
    """Run ``run()`` (a forward of ``model``) up to module ``name``, the last of ``modules``
    (decoder layers ``0 .. L - 1``), and keep its output for :meth:`LowerLayers.replay`."""
    with capture(model, [name], inputs=False, stop_after=name) as trace:
        run()
    return LowerLayers(list(modules), trace.outputs[name], name in trace.tuple_outputs)
