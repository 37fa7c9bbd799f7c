"""The model state an edit runs in: evaluation mode and frozen weights, put back afterwards."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn


@contextmanager
def frozen(model: nn.Module) -> Iterator[None]:
    """Run the enclosed code with ``model`` in eval mode and no parameter requiring a gradient.

    An edit differentiates with respect to its own vectors only. A model fresh from
    ``from_pretrained`` has every parameter trainable: each backward pass of the planners would
    then also form the weight gradients of every layer above the edit layer (more time and
    memory) and leave them in ``.grad``, growing across edits; in training mode its dropout
    would also perturb keys and targets. Both settings (the mode of every submodule, the flag
    of every parameter) are put back afterwards, also after an error; the values of the
    weights are not touched here.
    """
    modes = {module: module.training for module in model.modules()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    model.eval()
    for parameter in trainable:
        parameter.requires_grad_(False)
    try:
        yield
    finally:
        for parameter in trainable:
            parameter.requires_grad_(True)
        for module, training in modes.items():
            module.training = training
